"""Evaluation CLI: lm-eval tasks on this project's model, and perplexity of files.

    python -m olmo_hybrid_jax.eval lm-eval --checkpoint DIR --tasks hellaswag,arc_easy [--include-path TASKS_DIR]
        [--num-fewshot 0] [--limit N] [--batch-size 4] [--model-args tokenizer=...,max_length=2048]
        [--output results.json]
    python -m olmo_hybrid_jax.eval ppl --checkpoint DIR [--tokenizer tokenizer.json] [--max-length 2048]
        [--batch-size 4] [--output ppl.json] FILE...

``--checkpoint`` is an HF directory, an orbax model directory or a training run directory (latest
checkpoint, or ``--step N``). lm-eval's own ``lm_eval`` CLI cannot load models from other packages
(0.4.13 has no plugin mechanism for models), hence the ``lm-eval`` subcommand here, which registers
the model ``olmo_hybrid_jax`` and calls ``lm_eval.simple_evaluate``.

``ppl``: token files (``.npy`` / ``.u8`` / ``.u16`` / ``.u32``, or ``--token-dtype``; the training data
format) or text files (``.txt``: one document; ``.jsonl``: one per line, ``--text-field``), tokenized as
``train.data tokenize`` does (the tokenizer's ids, EOS after each document). Documents are split at
EOS (a document owns its EOS) and each is scored from its start: the input is EOS followed by the
document, so every token of the document, its EOS included, is predicted, the first from the EOS that
precedes every document in a packed stream (lm-eval's rolling convention with EOS as the prefix
token). Long documents run in windows of ``--max-length`` tokens with the cache carried (exact; not
re-encoded). Reported: loss (mean nats per token), perplexity ``exp(loss)``, and bits per byte
(total nats / ln 2 / UTF-8 bytes of the documents' text; EOS has no bytes) when a tokenizer (or byte
level ids) gives the text.

Bad input (a missing checkpoint or file, an unknown task, token ids >= the vocabulary) ends with one
``error: ...`` line and exit status 2 before any scoring.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
from pathlib import Path

import numpy as np

_TEXT_SUFFIXES = {".txt", ".jsonl"}


class InputError(ValueError):
    """Bad command-line input: reported as one ``error:`` line, exit status 2."""


# ----------------------------------------------------------------------------------------- ppl
def _split_documents(tokens: np.ndarray, eos: int) -> list[np.ndarray]:
    """Documents of a token stream: each ends at (and holds) its EOS; a trailing piece without one counts too."""
    ends = np.flatnonzero(tokens == eos) + 1
    return [d for d in np.split(np.asarray(tokens, np.int64), ends) if d.size]


def _load_documents(path: Path, tok, eos: int, args) -> tuple[list[np.ndarray], list[int] | None]:
    """(documents as token arrays, UTF-8 bytes per document or None) for one input file."""
    from olmo_hybrid_jax.train.data import DataError, open_token_file, read_documents

    try:
        if path.suffix in _TEXT_SUFFIXES:
            if tok is None:
                raise InputError(f"{path}: text input needs a tokenizer (--tokenizer, or the checkpoint's own)")
            texts = list(read_documents([str(path)], args.text_field))
            docs = [np.asarray(tok.encode(t, add_special_tokens=False) + [eos], np.int64) for t in texts]
            return docs, [len(t.encode("utf-8")) for t in texts]
        docs = _split_documents(np.asarray(open_token_file(path, args.token_dtype)), eos)
    except DataError as e:
        raise InputError(str(e)) from e
    if tok is None:
        return docs, None
    return docs, [tok.text_bytes(d) for d in docs]


def _summary(nll: float, tokens: int, nbytes: int | None, docs: int) -> dict:
    loss = nll / tokens if tokens else float("nan")
    return {"documents": docs, "tokens": tokens, "nll": nll, "loss": loss,
            "perplexity": math.exp(loss) if tokens else float("nan"),
            "bytes": nbytes, "bits_per_byte": nll / math.log(2) / nbytes if nbytes else None}


def ppl(args) -> dict:
    from tqdm.auto import tqdm

    from olmo_hybrid_jax.eval.loading import TextTokenizer, checkpoint_kind, load_model
    from olmo_hybrid_jax.eval.scoring import score_documents

    checkpoint_kind(args.checkpoint)
    files = [Path(f) for f in args.files]
    for f in files:
        if not f.is_file():
            raise InputError(f"input file not found: {f}")
    model = load_model(args.checkpoint, step=args.step, dtype=args.dtype)
    cfg = model.config
    tok_path = args.tokenizer or (Path(args.checkpoint) / "tokenizer.json")
    try:
        tok = TextTokenizer(tok_path if Path(tok_path).is_file() or args.tokenizer else None,
                            vocab_size=cfg.vocab_size, eos_token_id=cfg.eos_token_id)
    except ValueError:  # no tokenizer and no byte-level ids: scores without bits per byte
        tok = None
    eos = args.eos_id if args.eos_id is not None else (tok.eos_token_id if tok else None)
    if eos is None:
        eos = cfg.eos_token_id[0] if isinstance(cfg.eos_token_id, tuple) else cfg.eos_token_id
    if eos is None:
        raise InputError("no EOS id: the tokenizer and the model config name none; pass --eos-id")
    window = args.max_length or cfg.max_position_embeddings
    loaded = {}
    for f in files:  # every file read and checked before any scoring
        docs, nbytes = _load_documents(f, tok, eos, args)
        if args.limit:
            docs, nbytes = docs[:args.limit], None if nbytes is None else nbytes[:args.limit]
        hi = max((int(d.max()) for d in docs), default=-1)
        if hi >= cfg.vocab_size or eos >= cfg.vocab_size:
            raise InputError(f"{f}: token id {max(hi, eos)} >= the model's vocab_size {cfg.vocab_size}")
        loaded[f] = (docs, nbytes)
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else 0
    out: dict = {"checkpoint": str(args.checkpoint), "max_length": window, "files": {}}
    tot_nll, tot_tok, tot_bytes, tot_docs = 0.0, 0, 0, 0
    for f, (docs, nbytes) in loaded.items():
        seqs = [np.concatenate([[eos], d]) for d in docs]
        with tqdm(total=len(seqs), desc=f"ppl {f.name}", unit="doc", disable=args.quiet) as bar:
            res = score_documents(model, seqs, window=window, batch_size=args.batch_size, pad_id=pad,
                                  progress=bar.update)
        nll, n = -sum(lp for lp, _ in res), sum(k for _, k in res)
        b = None if nbytes is None else sum(nbytes)
        out["files"][str(f)] = _summary(nll, n, b, len(docs))
        tot_nll, tot_tok, tot_docs = tot_nll + nll, tot_tok + n, tot_docs + len(docs)
        tot_bytes = None if b is None or tot_bytes is None else tot_bytes + b
    out["total"] = _summary(tot_nll, tot_tok, tot_bytes, tot_docs)
    return out


# ----------------------------------------------------------------------------------------- lm-eval
def _model_args(args) -> dict:
    from lm_eval.utils import simple_parse_args_string

    kw = simple_parse_args_string(args.model_args or "")
    kw["pretrained"] = args.checkpoint
    for key in ("step", "dtype", "tokenizer", "max_length"):
        if getattr(args, key, None) is not None:
            kw[key] = getattr(args, key)
    kw["batch_size"] = args.batch_size
    return kw


@functools.lru_cache(maxsize=4)
def task_manager(include_path: tuple[str, ...] = ()):
    """lm-eval's TaskManager (it indexes every task YAML it ships: seconds; kept for the process)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(include_path) or None)


def lm_eval_tasks(args) -> dict:
    try:
        import lm_eval
    except ImportError as e:
        raise InputError("lm-eval is not installed: pip install 'olmo_hybrid_jax[eval]'") from e
    from olmo_hybrid_jax.eval.harness import OlmoHybridLM
    from olmo_hybrid_jax.eval.loading import checkpoint_kind

    checkpoint_kind(args.checkpoint)
    for p in args.include_path or []:
        if not Path(p).is_dir():
            raise InputError(f"--include-path {p} is not a directory")
    tm = task_manager(tuple(args.include_path or ()))
    tasks = [t for t in args.tasks.split(",") if t]
    unknown = [t for t in tasks if t not in tm.all_tasks]
    if unknown or not tasks:
        raise InputError(f"unknown task {unknown[0]!r} (list them with `lm-eval ls tasks`; local YAMLs need "
                         "--include-path)" if unknown else "no task given")
    lm = OlmoHybridLM(**_model_args(args))
    res = lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=args.num_fewshot, limit=args.limit,
                                  task_manager=tm, log_samples=False, random_seed=args.seed,
                                  numpy_random_seed=args.seed, torch_random_seed=args.seed,
                                  fewshot_random_seed=args.seed)
    from lm_eval.utils import make_table

    if not args.quiet:
        print(make_table(res))
    return {k: res[k] for k in ("results", "versions", "n-shot", "higher_is_better", "n-samples") if k in res}


def main(argv=None) -> int:
    from olmo_hybrid_jax.convert import DTYPE_NAMES

    ap = argparse.ArgumentParser(prog="python -m olmo_hybrid_jax.eval", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--checkpoint", required=True, help="HF, orbax or training-run directory")
    common.add_argument("--step", type=int, default=None, help="checkpoint step of a training run (default: latest)")
    common.add_argument("--dtype", choices=sorted(DTYPE_NAMES), default=None, help="parameter dtype (default: stored)")
    common.add_argument("--tokenizer", default=None, help="tokenizer.json (default: the checkpoint's)")
    common.add_argument("--max-length", type=int, default=None, help="tokens per forward (default: the config's)")
    common.add_argument("--batch-size", type=int, default=1)
    common.add_argument("--output", default=None, help="write the results here as JSON")
    common.add_argument("--quiet", action="store_true", help="no progress bars or table")
    le = sub.add_parser("lm-eval", parents=[common], help="run lm-evaluation-harness tasks")
    le.add_argument("--tasks", required=True, help="comma-separated task (or group) names")
    le.add_argument("--include-path", action="append", default=None, help="folder of local task YAMLs (repeatable)")
    le.add_argument("--num-fewshot", type=int, default=None)
    le.add_argument("--limit", type=float, default=None, help="examples per task (a fraction if < 1)")
    le.add_argument("--seed", type=int, default=0)
    le.add_argument("--model-args", default="", help="more model args, k=v,k=v (add_bos_token, max_gen_toks, ...)")
    pp = sub.add_parser("ppl", parents=[common], help="loss, perplexity and bits per byte of files")
    pp.add_argument("files", nargs="+", help="token files (.npy/.u8/.u16/.u32) or text files (.txt/.jsonl)")
    pp.add_argument("--token-dtype", default="auto", help="dtype of raw token files without a known suffix")
    pp.add_argument("--text-field", default="text", help="the text field of .jsonl lines")
    pp.add_argument("--eos-id", type=int, default=None, help="document separator (default: the tokenizer's EOS)")
    pp.add_argument("--limit", type=int, default=None, help="score the first N documents of each file")
    args = ap.parse_args(argv)
    if args.batch_size < 1 or (args.max_length is not None and args.max_length < 1):
        ap.error("--batch-size and --max-length must be >= 1")
    try:
        out = ppl(args) if args.cmd == "ppl" else lm_eval_tasks(args)
    except (InputError, FileNotFoundError, ValueError) as e:  # InputError is a ValueError too
        print(f"error: {e}", file=sys.stderr)
        return 2
    text = json.dumps(out, indent=2, default=str)
    if args.cmd == "ppl" and not args.quiet:
        t = out["total"]
        bpb = "n/a" if t["bits_per_byte"] is None else f"{t['bits_per_byte']:.4f}"
        print(f"{t['documents']} documents, {t['tokens']} tokens: loss {t['loss']:.4f}, "
              f"perplexity {t['perplexity']:.4f}, bits/byte {bpb}")
    if args.output:
        Path(args.output).write_text(text + "\n")
    elif args.quiet:
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
