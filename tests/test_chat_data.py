"""post.chat: rendering and the assistant mask as transformers' apply_chat_template gives them; best-fit packing
into rows with one segment per conversation, read back by data.ChatRows; the prepare CLI's one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from eval_helpers import write_tokenizer

from olmo_hybrid_jax.post import chat
from olmo_hybrid_jax.train.data import ChatRows, DataError

# Tulu-style, with bos and a system role, the assistant reply + EOS + newline in a generation block
GEN_TEMPLATE = (
    "{{ bos_token if bos_token else '' }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}<|system|>\n{{ message['content'] }}\n"
    "{% elif message['role'] == 'user' %}<|user|>\n{{ message['content'] }}\n"
    "{% elif message['role'] == 'assistant' %}<|assistant|>\n"
    "{% generation %}{{ message['content'] + eos_token + '\n' }}{% endgeneration %}"
    "{% else %}{{ raise_exception('role ' + message['role'] + ' is not supported') }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
PLAIN_TEMPLATE = GEN_TEMPLATE.replace("{% generation %}", "").replace("{% endgeneration %}", "")

CONVS = [
    [{"role": "user", "content": "What is the sea?"}, {"role": "assistant", "content": "The sea is salt water."}],
    [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Colour of the sky?"},
     {"role": "assistant", "content": "Blue"}, {"role": "user", "content": "And the grass?"},
     {"role": "assistant", "content": "Green, the tea is hot."}],
    [{"role": "user", "content": "héllo ünïcode"}, {"role": "assistant", "content": "ça va, the mat"},
     {"role": "user", "content": "bye", "name": None}],
]


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    from transformers import PreTrainedTokenizerFast

    d = write_tokenizer(tmp_path_factory.mktemp("tok") / "tok")
    return d, PreTrainedTokenizerFast.from_pretrained(str(d))


@pytest.mark.parametrize("conv", range(len(CONVS)))
def test_render_and_mask_equal_transformers(hf_tokenizer, conv):
    d, hf = hf_tokenizer
    messages = CONVS[conv]
    tok = chat.load_tokenizer(d)
    want = hf.apply_chat_template(messages, chat_template=GEN_TEMPLATE, tokenize=True, return_dict=True,
                                  return_assistant_tokens_mask=True)
    ids, mask = chat.tokenize_conversation(messages, GEN_TEMPLATE, tok)
    assert ids.dtype == np.int32 and mask.dtype == np.bool_
    assert ids.tolist() == list(want["input_ids"])
    assert mask.astype(int).tolist() == list(want["assistant_masks"])
    assert mask.sum() > 0 and not mask.all()
    for gen in (False, True):
        text = chat.render(messages, GEN_TEMPLATE, tokenizer=tok, add_generation_prompt=gen)
        assert text == hf.apply_chat_template(messages, chat_template=GEN_TEMPLATE, tokenize=False,
                                              add_generation_prompt=gen)
    # without generation blocks: the same text as transformers, and the assistant turns found by prefixes
    # are the generation blocks' tokens (the template's generation block covers the whole turn after its header)
    plain = chat.render(messages, PLAIN_TEMPLATE, tokenizer=tok)
    assert plain == hf.apply_chat_template(messages, chat_template=PLAIN_TEMPLATE, tokenize=False)
    ids2, mask2 = chat.tokenize_conversation(messages, PLAIN_TEMPLATE, tok)
    assert ids2.tolist() == ids.tolist() and mask2.tolist() == mask.tolist()


def test_template_loading_vars_and_refusals(tmp_path, hf_tokenizer):
    d, _ = hf_tokenizer
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": GEN_TEMPLATE}))
    assert chat.load_chat_template(tmp_path) == GEN_TEMPLATE
    assert chat.load_chat_template(tmp_path / "tokenizer_config.json") == GEN_TEMPLATE
    (tmp_path / "chat_template.jinja").write_text(PLAIN_TEMPLATE)  # transformers 5 saves this file: it wins
    assert chat.load_chat_template(tmp_path) == PLAIN_TEMPLATE
    assert chat.load_chat_template("bytes") == chat.BYTE_TEMPLATE
    with pytest.raises(chat.ChatError, match="has no chat_template"):
        chat.load_chat_template(d)
    tok = chat.load_tokenizer(d)
    msgs = CONVS[0]
    assert chat.render(msgs, GEN_TEMPLATE, tokenizer=tok, bos_token="<B>").startswith("<B><|user|>")
    assert "{\"a\": \"<&>\"}" == chat.render([{"role": "user", "content": {"a": "<&>"}}],
                                             "{{ messages[0]['content'] | tojson }}")
    with pytest.raises(chat.ChatError, match="role tool is not supported"):
        chat.tokenize_conversation([{"role": "tool", "content": "x"}], GEN_TEMPLATE, tok)
    ids, mask = chat.tokenize_conversation(msgs, chat.BYTE_TEMPLATE, chat.ByteTokenizer())
    assert bytes(ids[mask].astype(np.uint8)) == b"The sea is salt water.\x01"


def _random_convs(n, rng):
    words = ["sea", "sky", "the", "mat", "sun", "tree", "bird", "road"]
    out = []
    for i in range(n):
        msgs = [{"role": "system", "content": "Be brief."}] if i % 3 == 0 else []
        for _ in range(int(rng.integers(1, 3))):
            msgs.append({"role": "user", "content": " ".join(rng.choice(words, int(rng.integers(1, 7))))})
            reply = " ".join(rng.choice(words, int(rng.integers(1, 9))))
            msgs.append({"role": "assistant", "content": f"{i}: {reply}"})
        out.append(msgs)
    return out


def test_best_fit_decreasing_packs_every_item_once():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 101, 500).tolist()
    rows = chat.best_fit_decreasing(lengths, 100)
    assert sorted(i for r in rows for i in r) == list(range(500))
    assert all(sum(lengths[i] for i in r) <= 100 for r in rows)
    assert len(rows) <= sum(lengths) / 100 * 1.25 + 1  # best-fit decreasing stays near the bound
    assert chat.best_fit_decreasing([60, 50, 40, 30, 20], 100) == [[0, 2], [1, 3, 4]]


def test_prepare_packs_each_conversation_once_with_its_own_segment(tmp_path):
    rng = np.random.default_rng(1)
    convs = _random_convs(40, rng)
    long = [{"role": "user", "content": "x" * 30}, {"role": "assistant", "content": "y" * 300}]
    convs.append(long)
    L = 256
    tok = chat.ByteTokenizer()
    meta = chat.prepare(enumerate(convs, 1), chat.BYTE_TEMPLATE, tok, tmp_path / "sft", L)
    assert meta["conversations"] == len(convs) and meta["truncated"] == 1 and meta["dropped"] == 0
    rows = ChatRows([str(tmp_path / "sft")], L, vocab_size=256)
    assert len(rows) == meta["rows"] < len(convs)
    index = np.load(tmp_path / "sft" / "index.npy")
    assert sorted(index[:, 0]) == list(range(len(convs)))  # each conversation exactly once
    seen = np.zeros((len(rows), L), bool)
    for k, r, start, n in index:
        ids, mask = chat.tokenize_conversation(convs[k], chat.BYTE_TEMPLATE, tok)
        ids, mask = ids[:L], mask[:L]
        row = rows[r]
        assert n == len(ids)
        np.testing.assert_array_equal(row["tokens"][start:start + n], ids)
        np.testing.assert_array_equal(row["assistant_mask"][start:start + n], mask)
        np.testing.assert_array_equal(row["positions"][start:start + n], np.arange(n))  # restarts per conversation
        seg = row["segment_ids"][start:start + n]
        assert (seg == seg[0]).all() and (start == 0 or row["segment_ids"][start - 1] != seg[0])
        assert not seen[r, start:start + n].any()
        seen[r, start:start + n] = True
    for r in range(len(rows)):  # the rest of a row is padding: its own segment, no assistant token
        row = rows[r]
        pad = ~seen[r]
        assert (row["tokens"][pad] == tok.pad_id).all() and not row["assistant_mask"][pad].any()
        if pad.any():
            assert (row["segment_ids"][pad] == row["segment_ids"][~pad].max() + 1).all()
    assert int(sum(rows[r]["assistant_mask"].sum() for r in range(len(rows)))) == meta["assistant_tokens"]
    with pytest.raises(DataError, match="rows of 256 tokens, but data.seq_len=128"):
        ChatRows([str(tmp_path / "sft")], 128)
    with pytest.raises(DataError, match="outside the model's vocabulary"):
        ChatRows([str(tmp_path / "sft")], L, vocab_size=100)
    with pytest.raises(chat.ChatError, match="already holds prepared chat data"):
        chat.prepare(enumerate(convs, 1), chat.BYTE_TEMPLATE, tok, tmp_path / "sft", L)


def test_prepare_cli_one_line_errors(tmp_path, capsys, hf_tokenizer):
    good = {"messages": CONVS[0]}
    cases = {
        "no assistant turn": [good, {"messages": [{"role": "user", "content": "hi"}]}],
        "not valid JSON": [good, good, "{oops"],
        "role tool is not supported": [{"messages": [{"role": "tool", "content": "x"},
                                                     {"role": "assistant", "content": "y"}]}],
    }
    d, _ = hf_tokenizer
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": GEN_TEMPLATE}))
    try:
        for (msg, lines), line_no in zip(cases.items(), (2, 3, 1)):
            f = tmp_path / "in.jsonl"
            f.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
            rc = chat.main(["prepare", "--tokenizer", str(d), "--input", str(f), "--out", str(tmp_path / "o"),
                            "--seq-len", "64"])
            err = capsys.readouterr().err.strip().splitlines()[-1]
            assert rc == 2 and err.startswith(f"error: {f}:{line_no}: ") and msg in err, err
            assert not (tmp_path / "o").exists()
        f.write_text(json.dumps(good) + "\n")
        assert chat.main(["prepare", "--tokenizer", str(d), "--input", str(f), "--out", str(tmp_path / "o"),
                          "--seq-len", "64"]) == 0
        assert "1 conversations in 1 rows" in capsys.readouterr().out
        written = json.loads((tmp_path / "o" / "tokenizer" / "tokenizer_config.json").read_text())
        assert written["chat_template"] == GEN_TEMPLATE and (tmp_path / "o" / "tokenizer" / "tokenizer.json").is_file()
    finally:
        (d / "tokenizer_config.json").write_text(json.dumps(cfg))
