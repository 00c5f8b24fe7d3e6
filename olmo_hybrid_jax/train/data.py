"""Token files, packing into fixed-length rows, and the grain pipeline with checkpointable position.

Token files are OLMo-style flat arrays of token ids, documents separated by an EOS id, memory-mapped:

- a real ``.npy`` (header read, any of uint8/uint16/uint32/int32), or
- a raw binary file (OLMo's pre-tokenized "``.npy``" files have no header): dtype from
  ``data.token_dtype``, or from the suffix ``.u8`` / ``.u16`` / ``.u32``.

Packing is OLMo's fixed-sequence-length (FSL) scheme: each file is cut into rows of ``seq_len`` tokens
(the tail shorter than a row is dropped), so a row may hold the end of one document and the start of
others. Per row the pipeline also returns ``segment_ids`` (the number of EOS tokens before each
position: a document's EOS belongs to it) and per-document ``positions``; with
``data.document_aware`` the trainer passes them to the model, so GDN state, short conv and attention
restart at every document start. Targets are the next token; the last position of a row has none.

``data.format: chat`` reads folders prepared by ``python -m olmo_hybrid_jax.post.chat prepare`` instead
(``ChatRows``): rows already packed (best-fit, one segment per conversation, see ``post.chat``), with an
``assistant_mask``; the trainer keeps a target only where it is an assistant token of the same segment.

Order: rows are shuffled with grain's ``MapDataset.shuffle`` (a fresh permutation per epoch, from the
seed), repeated forever, and every global batch of ``global_batch_size`` consecutive rows is split
across hosts (host i takes its contiguous block). The iterator's ``get_state()`` (the next batch
index) goes into each checkpoint, so a resumed run reads exactly the batches it would have read.

The default corpus, ``data/pydoc_topics.u8``, is byte-level (token = byte, EOS = 1, vocab 256 as
``configs/models/tiny.json``): the 79 help topics of the CPython documentation that ship with Python as
``pydoc_data.topics`` (PSF license), one document each. Rebuild it with
``python -m olmo_hybrid_jax.train.data byte-corpus --out data/pydoc_topics.u8``.

CLI (writes token files)::

    python -m olmo_hybrid_jax.train.data tokenize --tokenizer tokenizer.json --out corpus.u32 FILE...
    python -m olmo_hybrid_jax.train.data bytes --out corpus.u8 FILE...
    python -m olmo_hybrid_jax.train.data byte-corpus --out data/pydoc_topics.u8
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Iterable, Iterator
from importlib import resources
from pathlib import Path

import numpy as np

from olmo_hybrid_jax.train.config import CONFIG_DIR

_SUFFIX_DTYPES = {".u8": np.uint8, ".u16": np.uint16, ".u32": np.uint32}
_NPY_MAGIC = b"\x93NUMPY"
#: The embedded corpus: the repo's data/, installed as the package data olmo_hybrid_jax.data.
DATA_DIR = Path(str(resources.files("olmo_hybrid_jax.data")))
#: Relative paths under these repo folders fall back to the copy shipped in the package.
_SHIPPED = {"data": DATA_DIR, "configs": CONFIG_DIR}


class DataError(ValueError):
    """A data file is missing, unreadable or malformed (the message names it)."""


def _shipped(p: Path) -> Path | None:
    """The packaged copy of a relative ``data/...`` or ``configs/...`` path (None for other paths)."""
    if p.is_absolute() or len(p.parts) < 2 or p.parts[0] not in _SHIPPED:
        return None
    return _SHIPPED[p.parts[0]].joinpath(*p.parts[1:])


def resolve_path(path: str | Path) -> Path:
    """``path`` as given (absolute, or relative to the cwd), else the package's copy of ``data/...`` or
    ``configs/...`` (so the default ``data/pydoc_topics.u8`` is found from any directory)."""
    p = Path(path).expanduser()
    if p.exists() or p.is_absolute():
        return p
    alt = _shipped(p)
    return alt if alt is not None and alt.exists() else p


def open_token_file(path: str | Path, token_dtype: str = "auto") -> np.ndarray:
    """Memory-map a token file as a 1-D integer array; DataError naming the file on any problem."""
    p = resolve_path(path)
    if not p.exists():
        tried = [Path(path).expanduser().absolute()]
        alt = _shipped(Path(path).expanduser())
        if alt is not None and alt.absolute() != tried[0]:  # from the repo root both name one file
            tried.append(alt.absolute())
        raise DataError(f"data file not found: {path} (looked for {' and '.join(map(str, tried))})")
    if not p.is_file():
        raise DataError(f"data path is not a file: {p}")
    try:
        with open(p, "rb") as f:
            head = f.read(6)
    except OSError as e:
        raise DataError(f"cannot read data file {p}: {e}") from e
    try:
        if head == _NPY_MAGIC:
            arr = np.load(p, mmap_mode="r")
            if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
                raise DataError(f"{p}: expected a 1-D integer token array, got {arr.dtype} {arr.shape}")
            if token_dtype != "auto" and np.dtype(token_dtype) != arr.dtype:
                raise DataError(f"{p}: .npy holds {arr.dtype} but data.token_dtype={token_dtype}")
        else:
            if token_dtype == "auto":
                dt = _SUFFIX_DTYPES.get(p.suffix)
                if dt is None:
                    raise DataError(f"{p}: raw token file of unknown dtype; set data.token_dtype "
                                    "(uint16/uint32) or name it *.u8 / *.u16 / *.u32")
            else:
                dt = np.dtype(token_dtype)
            size = p.stat().st_size
            if size == 0:
                raise DataError(f"data file is empty: {p}")
            if size % np.dtype(dt).itemsize:
                raise DataError(f"{p}: size {size} B is not a multiple of the {np.dtype(dt).name} token size")
            arr = np.memmap(p, dtype=dt, mode="r")
    except DataError:
        raise
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read data file {p}: {e}") from e
    return arr


_MAX_ID_BLOCK = 1 << 26  # tokens per block of the max-id scan (128 MiB of uint16)


def max_token_id(path: str | Path, arr: np.ndarray, *, cache: Path | None = None) -> int:
    """The largest token id in ``arr`` (the memory-mapped file ``path``): one pass in blocks.

    ``cache``: a JSON file (e.g. in the run directory) remembering the answer per file, keyed by its
    size and modification time, so a restarted run does not rescan a large corpus.
    """
    p = Path(path).resolve()
    st = p.stat()
    key = f"{p}|{st.st_size}|{st.st_mtime_ns}"
    seen = {}
    if cache is not None and cache.is_file():
        try:
            seen = json.loads(cache.read_text())
        except (OSError, ValueError):
            seen = {}  # an unreadable cache is rebuilt, never trusted
    if key in seen:
        return int(seen[key])
    blocks = range(0, len(arr), _MAX_ID_BLOCK)
    from tqdm.auto import tqdm

    m = 0
    for i in tqdm(blocks, desc=f"max token id {p.name}", disable=len(blocks) < 8, leave=False):
        m = max(m, int(np.max(arr[i:i + _MAX_ID_BLOCK])))
    if cache is not None:
        try:
            cache.write_text(json.dumps({**seen, key: m}))
        except OSError:
            pass  # a read-only run directory only costs the rescan
    return m


class PackedRows:
    """Random-access source of fixed-length rows over several token files (grain data source).

    With ``vocab_size`` every file's largest token id is checked against it before any row is read
    (an id >= vocab_size would index past the embedding: NaN losses, not an error, under jit).
    """

    def __init__(self, paths: Iterable[str], seq_len: int, eos_id: int, token_dtype: str = "auto", *,
                 vocab_size: int | None = None, max_id_cache: Path | None = None):
        self.seq_len, self.eos_id = int(seq_len), int(eos_id)
        paths = list(paths)
        self.paths = [str(resolve_path(p)) for p in paths]
        self.arrays = [open_token_file(p, token_dtype) for p in paths]
        counts = [len(a) // self.seq_len for a in self.arrays]
        for p, a, c in zip(paths, self.arrays, counts):
            if c == 0:
                raise DataError(f"{p}: {len(a)} tokens is shorter than one row of data.seq_len={self.seq_len}")
        if vocab_size is not None:
            for p, full, a in zip(paths, self.paths, self.arrays):
                m = max_token_id(full, a, cache=max_id_cache)
                if m >= vocab_size:
                    raise DataError(f"{p}: token id {m} is outside the model's vocabulary (vocab_size {vocab_size}); "
                                    "was it tokenized with a larger tokenizer?")
        self.offsets = np.cumsum([0] + counts)
        self.num_tokens = int(sum(len(a) for a in self.arrays))

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        i = int(i)
        f = int(np.searchsorted(self.offsets, i, side="right") - 1)
        r = i - int(self.offsets[f])
        L = self.seq_len
        tokens = np.asarray(self.arrays[f][r * L:(r + 1) * L]).astype(np.int32)
        return pack_row(tokens, self.eos_id)

    def __repr__(self) -> str:  # grain shows this in its errors
        return f"PackedRows({len(self)} rows x {self.seq_len}, files={self.paths})"


def pack_row(tokens: np.ndarray, eos_id: int) -> dict[str, np.ndarray]:
    """tokens [L] -> {tokens, segment_ids, positions} (segment = number of EOS strictly before)."""
    is_eos = tokens == eos_id
    seg = np.concatenate([[0], np.cumsum(is_eos[:-1])]).astype(np.int32)
    return {"tokens": tokens, "segment_ids": seg, "positions": segment_positions(seg)}


def segment_positions(seg: np.ndarray) -> np.ndarray:
    """Position of each token within its segment ([L] int32; a segment is a run of equal ids)."""
    starts = np.concatenate([[True], seg[1:] != seg[:-1]])
    idx = np.arange(len(seg))
    start_idx = np.maximum.accumulate(np.where(starts, idx, 0))
    return (idx - start_idx).astype(np.int32)


CHAT_FORMAT = "olmo_hybrid_jax.chat/1"  # post.chat.FORMAT (not imported: it pulls in jinja2)


class ChatRows:
    """Random-access source of the packed rows of prepared chat folders (``post.chat prepare``; grain source).

    Each row: {tokens, segment_ids (one per conversation, padding its own), positions, assistant_mask};
    the folders' arrays are memory-mapped. Every folder must have been packed at ``seq_len``; with
    ``vocab_size`` their largest token id (meta.json) is checked against it before any row is read.
    """

    def __init__(self, paths: Iterable[str], seq_len: int, *, vocab_size: int | None = None):
        self.seq_len = int(seq_len)
        self.paths, self.arrays, self.metas, counts = [], [], [], []
        for path in paths:
            d = resolve_path(path)
            mf = d / "meta.json"
            if not mf.is_file():
                raise DataError(f"{path}: not a prepared chat folder (no meta.json; run python -m "
                                "olmo_hybrid_jax.post.chat prepare) - data.format=chat reads those")
            try:
                meta = json.loads(mf.read_text())
                arrs = tuple(np.load(d / f"{k}.npy", mmap_mode="r")
                             for k in ("tokens", "segment_ids", "assistant_mask"))
            except (OSError, ValueError) as e:
                raise DataError(f"cannot read prepared chat folder {d}: {e}") from e
            if meta.get("format") != CHAT_FORMAT:
                raise DataError(f"{mf}: format {meta.get('format')!r}, expected {CHAT_FORMAT!r}")
            if meta.get("seq_len") != self.seq_len or any(a.shape != arrs[0].shape for a in arrs) or \
                    arrs[0].ndim != 2 or arrs[0].shape[1] != self.seq_len:
                raise DataError(f"{path}: rows of {meta.get('seq_len')} tokens, but data.seq_len={self.seq_len}; "
                                "prepare it again with --seq-len matching")
            if vocab_size is not None and meta["max_token_id"] >= vocab_size:
                raise DataError(f"{path}: token id {meta['max_token_id']} is outside the model's vocabulary "
                                f"(vocab_size {vocab_size}); was it prepared with another tokenizer?")
            self.paths.append(str(d))
            self.arrays.append(arrs)
            self.metas.append(meta)
            counts.append(arrs[0].shape[0])
        self.offsets = np.cumsum([0] + counts)
        self.num_tokens = int(sum(m["tokens"] for m in self.metas))  # conversation tokens, padding excluded
        self.assistant_tokens = int(sum(m["assistant_tokens"] for m in self.metas))
        self.conversations = int(sum(m["conversations"] for m in self.metas))

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        i = int(i)
        f = int(np.searchsorted(self.offsets, i, side="right") - 1)
        tokens, seg, mask = (np.asarray(a[i - int(self.offsets[f])]) for a in self.arrays[f])
        seg = seg.astype(np.int32)
        return {"tokens": tokens.astype(np.int32), "segment_ids": seg, "positions": segment_positions(seg),
                "assistant_mask": mask.astype(np.int32)}

    def __repr__(self) -> str:
        return f"ChatRows({len(self)} rows x {self.seq_len}, folders={self.paths})"


def open_rows(paths, dcfg, eos_id: int, *, vocab_size: int | None = None, max_id_cache: Path | None = None):
    """The row source of ``data.format``: ``PackedRows`` over token files (tokens) or ``ChatRows`` (chat)."""
    if dcfg.format == "chat":
        return ChatRows(paths, dcfg.seq_len, vocab_size=vocab_size)
    return PackedRows(paths, dcfg.seq_len, eos_id, dcfg.token_dtype, vocab_size=vocab_size,
                      max_id_cache=max_id_cache)


def make_dataset(dcfg, eos_id: int, *, process_index: int = 0, process_count: int = 1, vocab_size: int | None = None,
                 max_id_cache: Path | None = None):
    """The grain MapDataset of this host's batches (index = step): dicts of [local_batch, seq_len] arrays.

    ``vocab_size``: refuse files holding a token id >= it (``PackedRows``) before the first batch.
    """
    import grain

    GB = dcfg.global_batch_size
    if GB % process_count:
        raise DataError(f"data.global_batch_size={GB} is not divisible by the {process_count} processes")
    LB = GB // process_count
    rows = open_rows(dcfg.paths, dcfg, eos_id, vocab_size=vocab_size, max_id_cache=max_id_cache)
    ds = grain.MapDataset.source(rows)
    if dcfg.shuffle:
        ds = ds.shuffle(seed=dcfg.seed)
    ds = ds.repeat()  # infinite; a shuffled dataset gets a new permutation each epoch
    base = process_index * LB

    def host_row(i):  # host-local row i -> global row (contiguous block of each global batch)
        return ds[(i // LB) * GB + base + (i % LB)]

    local = grain.MapDataset.range(0, len(ds) // GB * LB).map(host_row).batch(LB, drop_remainder=True)
    return local, rows


def held_out_batches(paths, dcfg, eos_id: int, *, batch_size: int, batches: int | None, process_index: int = 0,
                     process_count: int = 1, vocab_size: int | None = None, max_id_cache: Path | None = None):
    """The fixed held-out set of in-loop evaluation: ({tokens, segment_ids, positions[, assistant_mask]} each
    [batches, this host's rows of a batch, seq_len], the ``PackedRows`` / ``ChatRows`` of ``data.format``).
    ``batches`` x ``batch_size`` rows evenly spaced over the files
    (``batches`` None: every whole batch they hold), in file order, the same at every evaluation.
    """
    if batch_size % process_count:
        raise DataError(f"eval batches of {batch_size} rows are not divisible by the {process_count} processes")
    try:
        rows = open_rows(paths, dcfg, eos_id, vocab_size=vocab_size, max_id_cache=max_id_cache)
    except DataError as e:
        raise DataError(f"eval.paths: {e}") from e
    have = len(rows) // batch_size
    if have == 0 or (batches is not None and batches > have):
        raise DataError(f"eval.paths hold {len(rows)} rows of data.seq_len={dcfg.seq_len}, not the "
                        f"{batches or 1} batch(es) x {batch_size} rows eval.batches asks for (at most {have})")
    nb = have if batches is None else batches
    pick = np.arange(nb * batch_size) * len(rows) // (nb * batch_size)  # evenly spaced: every file is sampled
    LB = batch_size // process_count
    pick = pick.reshape(nb, process_count, LB)[:, process_index].reshape(-1)
    got = [rows[i] for i in pick]
    return {k: np.stack([r[k] for r in got]).reshape(nb, LB, dcfg.seq_len) for k in got[0]}, rows


def make_iterator(dataset, dcfg):
    """A checkpointable iterator (``get_state`` / ``set_state``) with read threads and prefetch."""
    import grain

    opts = grain.ReadOptions(num_threads=max(int(dcfg.num_threads), 0), prefetch_buffer_size=max(int(dcfg.prefetch), 0))
    return iter(dataset.to_iter_dataset(opts))


# ------------------------------------------------------------------------------------ writing token files
def _out_dtype(out: Path, dtype: str | None, vocab_max: int) -> np.dtype:
    if dtype:
        return np.dtype(dtype)
    if out.suffix in _SUFFIX_DTYPES:
        return np.dtype(_SUFFIX_DTYPES[out.suffix])
    return np.dtype(np.uint16 if vocab_max < 2 ** 16 else np.uint32)


def write_token_file(docs: Iterable[Iterable[int]], out: str | Path, *, eos_id: int, dtype: str | None = None,
                     vocab_max: int = 2 ** 32 - 1, progress: bool = False) -> tuple[Path, int]:
    """Write documents (token-id sequences) each followed by ``eos_id``; .npy gets a header, else raw.

    Streams: each document is checked against the dtype's range and appended to a temporary file in
    the output dtype, so memory holds one document, not the corpus. The output appears only complete
    (renamed from the temporary); on an error neither it nor a folder this call created is left.
    """
    out = Path(out)
    dt = _out_dtype(out, dtype, vocab_max)
    info = np.iinfo(dt)
    if not info.min <= eos_id <= info.max:
        raise DataError(f"eos id {eos_id} does not fit {dt.name}")
    from tqdm.auto import tqdm

    made = [d for d in (out.parent, *out.parent.parents) if not d.exists()]
    out.parent.mkdir(parents=True, exist_ok=True)
    raw = out.with_name(out.name + ".tmp")
    eos = np.array([eos_id], dt)
    n = 0
    try:
        with open(raw, "wb") as f, tqdm(docs, unit="doc", disable=not progress, desc=out.name) as bar:
            for doc in bar:
                a = np.asarray(doc if isinstance(doc, np.ndarray) else list(doc))
                if a.size and (not np.issubdtype(a.dtype, np.integer) or a.min() < info.min or a.max() > info.max):
                    raise DataError(f"token ids up to {a.max()} do not fit {dt.name}; pass --dtype uint32")
                a.astype(dt).tofile(f)
                eos.tofile(f)
                n += a.size + 1
                bar.set_postfix(tokens=f"{n:,}", refresh=False)
        if out.suffix == ".npy":  # the header needs the length: prepend it to the raw stream
            npy = out.with_name(out.name + ".npy.tmp")
            with open(npy, "wb") as g, open(raw, "rb") as f:
                np.lib.format.write_array_header_1_0(g, {"descr": np.lib.format.dtype_to_descr(dt),
                                                         "fortran_order": False, "shape": (n,)})
                shutil.copyfileobj(f, g, 1 << 24)
            raw.unlink()
            raw = npy
        raw.replace(out)
    except BaseException:
        raw.unlink(missing_ok=True)
        out.with_name(out.name + ".npy.tmp").unlink(missing_ok=True)
        for d in made:  # innermost first
            if d.is_dir() and not any(d.iterdir()):
                d.rmdir()
        raise
    return out, n


def read_documents(paths: Iterable[str], text_field: str = "text") -> Iterator[str]:
    """Documents from .txt (one per file) and .jsonl (one per line, ``text_field``) files."""
    for path in paths:
        p = Path(path)
        if not p.is_file():
            raise DataError(f"input file not found: {p}")
        try:
            if p.suffix == ".jsonl":
                with open(p, encoding="utf-8") as f:
                    for n, line in enumerate(f, 1):
                        if line.strip():
                            try:
                                yield json.loads(line)[text_field]
                            except (json.JSONDecodeError, KeyError, TypeError) as e:
                                raise DataError(f"{p}:{n}: not a JSON object with a {text_field!r} field: {e}") from e
            else:
                yield p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"cannot read {p}: {e}") from e


def tokenize_files(tokenizer_json: str, inputs: list[str], out: str, *, eos_id: int | None = None,
                   dtype: str | None = None, text_field: str = "text", progress: bool = False) -> tuple[Path, int]:
    """Tokenize text with an HF ``tokenizers`` tokenizer.json into a token file (EOS after each doc)."""
    from tokenizers import Tokenizer

    tp = Path(tokenizer_json)
    if not tp.is_file():
        raise DataError(f"tokenizer file not found: {tp}")
    try:
        tok = Tokenizer.from_file(str(tp))
    except Exception as e:  # noqa: BLE001  (tokenizers raises its own exception type)
        raise DataError(f"cannot load tokenizer {tp}: {e}") from e
    if eos_id is None:
        for name in ("<|endoftext|>", "</s>", "<eos>", "[SEP]"):
            eos_id = tok.token_to_id(name)
            if eos_id is not None:
                break
        if eos_id is None:
            raise DataError(f"{tp}: no EOS token found (<|endoftext|>, </s>, <eos>); pass --eos-id")
    if not 0 <= eos_id < tok.get_vocab_size():
        raise DataError(f"eos id {eos_id} is outside {tp}'s vocabulary of {tok.get_vocab_size()}")

    def docs():  # encode_batch runs the tokenizer's threads over a block of documents at a time
        block: list[str] = []
        for text in read_documents(inputs, text_field):
            block.append(text)
            if len(block) == 256:
                yield from (e.ids for e in tok.encode_batch(block, add_special_tokens=False))
                block = []
        yield from (e.ids for e in tok.encode_batch(block, add_special_tokens=False))

    return write_token_file(docs(), out, eos_id=eos_id, dtype=dtype, vocab_max=tok.get_vocab_size(),
                            progress=progress)


def byte_documents(texts: Iterable[str]) -> Iterator[np.ndarray]:
    for t in texts:
        yield np.frombuffer(t.encode("utf-8"), np.uint8)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m olmo_hybrid_jax.train.data", description="write token files")
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("tokenize", help="text/jsonl -> token file with an HF tokenizer.json")
    t.add_argument("--tokenizer", required=True)
    t.add_argument("--out", required=True, help="*.npy (with header), *.u16/*.u32 or any name (raw, --dtype)")
    t.add_argument("--eos-id", type=int, default=None)
    t.add_argument("--dtype", default=None, choices=["uint16", "uint32"])
    t.add_argument("--text-field", default="text")
    t.add_argument("inputs", nargs="+")
    b = sub.add_parser("bytes", help="text/jsonl -> byte-level token file (token = byte, EOS id 1)")
    b.add_argument("--out", required=True)
    b.add_argument("--eos-id", type=int, default=1)
    b.add_argument("--text-field", default="text")
    b.add_argument("inputs", nargs="+")
    c = sub.add_parser("byte-corpus", help="the embedded default corpus (pydoc_data.topics, byte-level)")
    c.add_argument("--out", default="data/pydoc_topics.u8")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "tokenize":
            out, n = tokenize_files(args.tokenizer, args.inputs, args.out, eos_id=args.eos_id, dtype=args.dtype,
                                    text_field=args.text_field, progress=True)
        elif args.cmd == "bytes":
            out, n = write_token_file(byte_documents(read_documents(args.inputs, args.text_field)), args.out,
                                      eos_id=args.eos_id, dtype="uint8", progress=True)
        else:
            import pydoc_data.topics as topics

            texts = [topics.topics[k] for k in sorted(topics.topics)]
            out, n = write_token_file(byte_documents(texts), args.out, eos_id=1, dtype="uint8")
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}: {n:,} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
