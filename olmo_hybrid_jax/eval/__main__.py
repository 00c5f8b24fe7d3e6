"""Evaluation CLI: lm-eval tasks on this project's model, and perplexity of files.

    python -m olmo_hybrid_jax.eval lm-eval --checkpoint DIR --tasks hellaswag,arc_easy [--include-path TASKS_DIR]
        [--num-fewshot 0] [--limit N] [--batch-size 4] [--model-args tokenizer=...,max_length=2048]
        [--output results.json]
    python -m olmo_hybrid_jax.eval ppl --checkpoint DIR [--tokenizer tokenizer.json] [--max-length 2048]
        [--batch-size 4] [--output ppl.json] FILE...
    python -m olmo_hybrid_jax.eval sweep --checkpoints RUN_OR_FOLDER --output sweep.json [--tasks ...]
        [--ppl FILE ...] [--tokens-per-step [STAGE=]N] [--stage-offset STAGE=TOKENS]
    python -m olmo_hybrid_jax.eval long-context --out TASKS_DIR [--lengths 4k,8k,...,128k] [--tokenizer CKPT]
        [--tasks niah_single,...] [--samples 100] [--seed 0]     (RULER-style tasks: see eval/long_context.py)

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

``sweep``: a series of checkpoints (a training run's steps, or a folder of ``stageK-stepN`` / ``stepN``
checkpoint folders) on tasks and/or files, one row each in OUT.json / OUT.csv, plus a plot OUT.png
of every metric against tokens seen; resumable. See ``olmo_hybrid_jax/eval/sweep.py``.

Bad input (a missing checkpoint or file, an unknown task, token ids >= the vocabulary) ends with one
``error: ...`` line and exit status 2 before any scoring.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from olmo_hybrid_jax.eval.commands import InputError, lm_eval_tasks, ppl, task_manager  # noqa: F401


def main(argv=None) -> int:
    from olmo_hybrid_jax.convert import DTYPE_NAMES

    ap = argparse.ArgumentParser(prog="python -m olmo_hybrid_jax.eval", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    one = argparse.ArgumentParser(add_help=False)  # the options of the one-checkpoint subcommands
    one.add_argument("--checkpoint", required=True, help="HF, orbax or training-run directory")
    one.add_argument("--step", type=int, default=None, help="checkpoint step of a training run (default: latest)")
    one.add_argument("--dtype", choices=sorted(DTYPE_NAMES), default=None, help="parameter dtype (default: stored)")
    one.add_argument("--output", default=None, help="write the results here as JSON")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--tokenizer", default=None, help="tokenizer.json (default: the checkpoint's)")
    common.add_argument("--max-length", type=int, default=None, help="tokens per forward (default: the config's)")
    common.add_argument("--batch-size", type=int, default=1)
    common.add_argument("--quiet", action="store_true", help="no progress bars or table")
    tasks = argparse.ArgumentParser(add_help=False)
    tasks.add_argument("--include-path", action="append", default=None, help="folder of local task YAMLs (repeatable)")
    tasks.add_argument("--num-fewshot", type=int, default=None)
    tasks.add_argument("--seed", type=int, default=0)
    tasks.add_argument("--model-args", default="", help="more model args, k=v,k=v (add_bos_token, max_gen_toks, ...)")
    files = argparse.ArgumentParser(add_help=False)
    files.add_argument("--token-dtype", default="auto", help="dtype of raw token files without a known suffix")
    files.add_argument("--text-field", default="text", help="the text field of .jsonl lines")
    files.add_argument("--eos-id", type=int, default=None, help="document separator (default: the tokenizer's EOS)")
    le = sub.add_parser("lm-eval", parents=[one, common, tasks], help="run lm-evaluation-harness tasks")
    le.add_argument("--tasks", required=True, help="comma-separated task (or group) names")
    le.add_argument("--limit", type=float, default=None, help="examples per task (a fraction if < 1)")
    pp = sub.add_parser("ppl", parents=[one, common, files], help="loss, perplexity and bits per byte of files")
    pp.add_argument("files", nargs="+", help="token files (.npy/.u8/.u16/.u32) or text files (.txt/.jsonl)")
    pp.add_argument("--limit", type=int, default=None, help="score the first N documents of each file")
    sw = sub.add_parser("sweep", parents=[common, tasks, files], help="evaluate a series of checkpoints into a table",
                        description="Evaluate a series of checkpoints (see olmo_hybrid_jax/eval/sweep.py).")
    sw.add_argument("--checkpoints", required=True,
                    help="a training run directory, or a folder of stageK-stepN / stepN checkpoint folders")
    sw.add_argument("--output", required=True, help="OUT.json; OUT.csv and OUT.png are written beside it")
    sw.add_argument("--tasks", default=None, help="comma-separated lm-eval task (or group) names")
    sw.add_argument("--limit", type=float, default=None, help="examples per task (a fraction if < 1)")
    sw.add_argument("--ppl", nargs="+", action="extend", default=None, metavar="FILE",
                    help="token or text files scored as the ppl subcommand does")
    sw.add_argument("--ppl-limit", type=int, default=None, help="score the first N documents of each --ppl file")
    sw.add_argument("--tokens-per-step", action="append", default=None, metavar="[STAGE=]N",
                    help="tokens per optimizer step, for every stage or for STAGE (repeatable)")
    sw.add_argument("--stage-offset", action="append", default=None, metavar="STAGE=TOKENS",
                    help="tokens seen before STAGE's step 0 (default: where stage STAGE-1 ended)")
    sw.add_argument("--dtype", choices=["auto", *sorted(DTYPE_NAMES)], default="auto",
                    help="parameter dtype (default auto: config.json's, as lm-eval)")
    from olmo_hybrid_jax.eval import long_context

    long_context.add_parser(sub)
    args = ap.parse_args(argv)
    if args.cmd == "long-context":  # writes task files; no model, no batch options
        return long_context.main(args)
    if args.batch_size < 1 or (args.max_length is not None and args.max_length < 1):
        ap.error("--batch-size and --max-length must be >= 1")
    try:
        if args.cmd == "sweep":
            from olmo_hybrid_jax.eval.sweep import outputs, sweep

            out = sweep(args)
            print(f"{len(out['rows'])} checkpoints: wrote {', '.join(map(str, outputs(args.output)))}",
                  file=sys.stderr)
            return 0
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
