"""olmo_hybrid_jax.train.data: packing, token files and their errors, the grain iterator, the tokenize CLI."""

import json
import os

import numpy as np
import pytest

from olmo_hybrid_jax.train.config import CONFIG_DIR, load_config
from olmo_hybrid_jax.train.data import (
    DATA_DIR,
    DataError,
    PackedRows,
    make_dataset,
    make_iterator,
    open_token_file,
    pack_row,
    tokenize_files,
    write_token_file,
)


def test_pack_row_segments_and_positions():
    r = pack_row(np.array([5, 6, 1, 7, 1, 1, 8, 9]), eos_id=1)
    np.testing.assert_array_equal(r["segment_ids"], [0, 0, 0, 1, 1, 2, 3, 3])
    np.testing.assert_array_equal(r["positions"], [0, 1, 2, 0, 1, 0, 0, 1])


def test_token_files_rows_and_errors(tmp_path):
    a, _ = write_token_file([[2, 3, 4], [5, 6]], tmp_path / "a.u16", eos_id=1)
    b, _ = write_token_file([np.arange(10, 20)], tmp_path / "b.npy", eos_id=1, dtype="uint32")
    np.testing.assert_array_equal(open_token_file(a), [2, 3, 4, 1, 5, 6, 1])
    assert open_token_file(b).dtype == np.uint32
    rows = PackedRows([str(a), str(b)], seq_len=3, eos_id=1)
    assert len(rows) == 2 + 3
    np.testing.assert_array_equal(rows[1]["tokens"], [1, 5, 6])
    np.testing.assert_array_equal(rows[2]["tokens"], [10, 11, 12])
    with pytest.raises(DataError, match=r"data file not found: .*nope\.u16"):
        open_token_file(tmp_path / "nope.u16")
    (tmp_path / "raw.bin").write_bytes(b"\x00\x01\x02")
    with pytest.raises(DataError, match=r"raw\.bin: raw token file of unknown dtype"):
        open_token_file(tmp_path / "raw.bin")
    with pytest.raises(DataError, match=r"raw\.bin: size 3 B is not a multiple"):
        open_token_file(tmp_path / "raw.bin", "uint16")
    (tmp_path / "empty.u8").write_bytes(b"")
    with pytest.raises(DataError, match=r"empty\.u8"):
        open_token_file(tmp_path / "empty.u8")
    (tmp_path / "dir.u8").mkdir()
    with pytest.raises(DataError, match=r"not a file: .*dir\.u8"):
        open_token_file(tmp_path / "dir.u8")
    with pytest.raises(DataError, match=r"a\.u16: 7 tokens is shorter than one row"):
        PackedRows([str(a)], seq_len=100, eos_id=1)


def test_grain_iterator_state_resumes_exactly():
    cfg = load_config(CONFIG_DIR / "tiny.yaml", ["data.global_batch_size=4", "data.seq_len=32"])
    ds, rows = make_dataset(cfg.data, eos_id=1)
    it = make_iterator(ds, cfg.data)
    first = [next(it)["tokens"] for _ in range(3)]
    state = it.get_state()
    want = next(it)["tokens"]
    it2 = make_iterator(ds, cfg.data)
    it2.set_state(json.loads(json.dumps(state)))
    np.testing.assert_array_equal(next(it2)["tokens"], want)
    np.testing.assert_array_equal(ds[0]["tokens"], first[0])  # batch index = step: deterministic
    # two hosts read disjoint halves of the same global batch
    h0, _ = make_dataset(cfg.data, 1, process_index=0, process_count=2)
    h1, _ = make_dataset(cfg.data, 1, process_index=1, process_count=2)
    np.testing.assert_array_equal(np.concatenate([h0[1]["tokens"], h1[1]["tokens"]]), ds[1]["tokens"])


def test_tokenize_cli_with_a_tokenizer_json(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<|endoftext|>": 0, "hello": 1, "world": 2, "[UNK]": 3}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "a.txt").write_text("hello world hello")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "world foo"}) + "\n")
    from olmo_hybrid_jax.train.data import main

    assert main(["tokenize", "--tokenizer", str(tmp_path / "tokenizer.json"), "--out", str(tmp_path / "c.u16"),
                 str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl")]) == 0
    np.testing.assert_array_equal(open_token_file(tmp_path / "c.u16"), [1, 2, 1, 0, 2, 3, 0])
    with pytest.raises(DataError, match="tokenizer file not found"):
        tokenize_files(str(tmp_path / "none.json"), [str(tmp_path / "a.txt")], str(tmp_path / "d.u16"))
    assert main(["tokenize", "--tokenizer", str(tmp_path / "tokenizer.json"), "--out", str(tmp_path / "d.u16"),
                 str(tmp_path / "missing.txt")]) == 2


def test_embedded_corpus_is_byte_level():
    arr = open_token_file("data/pydoc_topics.u8")
    assert arr.dtype == np.uint8 and len(arr) > 400_000
    assert int((arr == 1).sum()) == 79  # one EOS per pydoc topic
    assert b"print" in arr[:200_000].tobytes()


def test_out_of_vocabulary_ids_are_refused_before_reading_rows(tmp_path):
    """A file holding an id >= vocab_size fails with one error naming the file, the id and the vocab;
    the max-id scan is cached per file (size + mtime) and a changed file is rescanned."""
    from olmo_hybrid_jax.train.data import max_token_id

    good = tmp_path / "good.u16"
    np.array([3, 255, 1, 7] * 8, np.uint16).tofile(good)
    bad = tmp_path / "bad.u16"
    np.array([3, 256, 1, 7] * 8, np.uint16).tofile(bad)
    cache = tmp_path / "run" / "ids.json"
    cache.parent.mkdir()
    rows = PackedRows([str(good)], seq_len=4, eos_id=1, vocab_size=256, max_id_cache=cache)
    assert len(rows) == 8 and json.loads(cache.read_text())  # the scan was remembered
    with pytest.raises(DataError, match=r"bad\.u16: token id 256 is outside the model's vocabulary \(vocab_size 256\)"):
        PackedRows([str(good), str(bad)], seq_len=4, eos_id=1, vocab_size=256, max_id_cache=cache)
    assert max_token_id(good, np.fromfile(good, np.uint16), cache=cache) == 255
    np.array([3, 999, 1, 7] * 8, np.uint16).tofile(good)  # same size, new contents: rescanned
    os.utime(good, ns=(os.stat(good).st_atime_ns, os.stat(good).st_mtime_ns + 1_000_000))
    with pytest.raises(DataError, match=r"token id 999"):
        PackedRows([str(good)], seq_len=4, eos_id=1, vocab_size=256, max_id_cache=cache)


def test_write_token_file_streams_and_leaves_nothing_on_error(tmp_path):
    # .npy with header and raw files hold the same stream; ids are checked per document
    docs = [np.arange(5), [7, 8], np.array([], np.int64), [300]]
    npy, n = write_token_file(docs, tmp_path / "s.npy", eos_id=1, dtype="uint16")
    raw, _ = write_token_file(docs, tmp_path / "s.u16", eos_id=1)
    want = [0, 1, 2, 3, 4, 1, 7, 8, 1, 1, 300, 1]
    assert n == len(want)
    np.testing.assert_array_equal(np.load(npy), want)
    np.testing.assert_array_equal(open_token_file(raw), want)
    # an id too large for the dtype: no output, no temporary, no folder the call created
    with pytest.raises(DataError, match="token ids up to 300 do not fit uint8"):
        write_token_file(docs, tmp_path / "new" / "deeper" / "x.u8", eos_id=1)
    assert not (tmp_path / "new").exists()
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "x.u8").write_bytes(b"\x02\x01")
    with pytest.raises(DataError, match="do not fit uint8"):
        write_token_file(docs, keep / "x.u8", eos_id=1)
    assert (keep / "x.u8").read_bytes() == b"\x02\x01" and sorted(p.name for p in keep.iterdir()) == ["x.u8"]
    with pytest.raises(DataError, match="eos id 256 does not fit uint8"):
        write_token_file(docs[:1], tmp_path / "e.u8", eos_id=256)


def test_missing_data_file_names_each_place_looked_once(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError) as e:
        open_token_file("data/nope.u8")
    msg = str(e.value)
    assert str(tmp_path / "data" / "nope.u8") in msg and msg.count(" and ") == 1  # cwd, then the package copy
    monkeypatch.chdir(DATA_DIR.parent)  # a checkout's root: both candidates are one file, named once
    with pytest.raises(DataError) as e:
        open_token_file("data/nope.u8")
    assert " and " not in str(e.value) and str(DATA_DIR / "nope.u8") in str(e.value)
