"""Evaluate a series of checkpoints into one table (CSV + JSON) and a plot of every metric against tokens.

    python -m olmo_hybrid_jax.eval sweep --checkpoints SOURCE --output sweep.json [--tasks t1,t2]
        [--include-path TASKS_DIR] [--ppl FILE ...] [--tokens-per-step N | STAGE=N ...]
        [--stage-offset STAGE=TOKENS ...] [lm-eval / ppl options]

``SOURCE`` is one of

- a training run directory (``config.yaml``): its finished orbax steps ``checkpoints/<step>``, rows
  named ``stepN``;
- a folder of checkpoint folders named ``stageK-stepN`` (the released OLMo Hybrid's intermediate HF
  revisions: ``stage1-stepN``, ``stage2-stepN``, ...) and/or ``stepN`` (OLMo-core's save folders), each an
  HF safetensors or orbax model directory (what ``loading.checkpoint_kind`` accepts). A name may end in
  ``-tokensNB`` (OLMo 2's revision names; K/M/B/T), which then gives the tokens seen. Hidden folders
  and plain files are ignored; any other folder name is an error.

Rows are ordered by (stage, step); ``stepN`` and run steps have no stage and sort first. Tokens seen:

1. ``--tokens-per-step N`` (every stage) or ``STAGE=N`` (that stage; wins over N) when given:
   ``offset(stage) + N * step``, where ``offset`` is ``--stage-offset STAGE=TOKENS`` if given, else 0 for
   stage 1 and for no stage, else the tokens of the last stage K-1 checkpoint of the sweep (the stage
   continues where the previous one ended; without one, ``--stage-offset`` is required). Pass
   ``--stage-offset K=0`` for a stage whose step count does not restart.
2. else the ``-tokensN`` of the name;
3. else a training run's own counter: the ``tokens`` of its ``metrics.jsonl`` row for that step, or
   ``data.seq_len * data.global_batch_size * step`` from its ``config.yaml``.

A checkpoint with none of these is an error (pass ``--tokens-per-step``). The row's ``tokens_source``
says which one was used.

Each checkpoint is loaded once (``--dtype``; default "auto": config.json's dtype, as lm-eval) and
serves both the ``--ppl`` files (the ``ppl`` subcommand's scoring, its inputs read and tokenized once,
with ``--tokenizer`` or the first checkpoint's, before any model loads) and the ``--tasks`` (the
``lm-eval`` subcommand's run; the harness uses each checkpoint's own tokenizer). The model is dropped
before the next one loads, so the host holds one checkpoint at a time. ``--model-args mesh=fsdp`` (the
harness's mesh option) places each checkpoint over this host's devices for both.

Outputs, rewritten after every checkpoint (a sweep that dies keeps what it finished): ``OUT.json``
(``{"source", "settings", "rows"}``), ``OUT.csv`` (the rows) and ``OUT.png`` (one subplot per metric,
a line per stage; stderr columns are not plotted). Row columns: ``name``, ``stage``, ``step``,
``tokens``, ``tokens_source``, ``path``, then ``ppl/FILE/{loss,perplexity,bits_per_byte}`` (FILE: the
file's name, its path as given when two share a name; and
``ppl/total/...`` over several files) and ``TASK/METRIC`` (lm-eval's ``acc,none`` becomes ``acc``).

Resuming: a checkpoint whose name already has a row in ``OUT.json`` is skipped (and said so); the
file's settings (tasks, files, limits, few-shot, seed, dtype, max length, model args) must equal this
call's, else it is an error. ``--batch-size`` may differ (it changes no score). Rows of checkpoints
no longer in ``SOURCE`` (a run's ``checkpoint.keep`` removes old steps) are kept.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import gc
import json
import math
import os
import re
import sys
from pathlib import Path

from olmo_hybrid_jax.eval.commands import InputError

_NAME = re.compile(r"^(?:stage(?P<stage>\d+)-)?step(?P<step>\d+)(?:-tokens(?P<tokens>\d+)(?P<unit>[KMBT]?))?$")
_UNITS = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "T": 10**12}
SETTINGS = ("tasks", "num_fewshot", "limit", "seed", "model_args", "ppl", "ppl_limit", "token_dtype", "text_field",
            "eos_id", "max_length", "dtype", "tokenizer")
FIXED = ("name", "stage", "step", "tokens", "tokens_source", "path")


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """One row of a sweep: ``load_model(path, step=run_step)`` loads it."""

    name: str
    path: Path
    stage: int | None
    step: int
    run_step: int | None = None  # a training run's step (the run directory is ``path``)
    tokens: int | None = None
    tokens_source: str | None = None

    @property
    def order(self) -> tuple:
        return (self.stage or 0, self.step, self.name)


def parse_name(name: str) -> tuple[int | None, int, int | None] | None:
    """(stage, step, tokens) of ``stageK-stepN[-tokensN[KMBT]]`` / ``stepN[...]``; None if it does not parse."""
    m = _NAME.match(name)
    if m is None:
        return None
    tokens = None if m["tokens"] is None else int(m["tokens"]) * _UNITS[m["unit"]]
    return (None if m["stage"] is None else int(m["stage"])), int(m["step"]), tokens


def _run_tokens(run: Path) -> tuple[dict[int, int], int | None]:
    """({step: tokens} from the run's metrics.jsonl, tokens per step from its config.yaml or None)."""
    from olmo_hybrid_jax.train.config import load_config
    from olmo_hybrid_jax.train.metrics import read_metrics

    by_step = {}
    if (run / "metrics.jsonl").is_file():
        by_step = {int(r["step"]): int(r["tokens"]) for r in read_metrics(run / "metrics.jsonl")
                   if r.get("tokens") is not None and "step" in r}
    d = load_config(run / "config.yaml").data
    return by_step, (d.seq_len * d.global_batch_size if d.seq_len and d.global_batch_size else None)


def discover(source: str | Path) -> list[Checkpoint]:
    """The checkpoints of ``source`` (a run directory or a folder of named checkpoint folders) in (stage, step)
    order, with the tokens their names or run metadata give; InputError (one line) for bad input."""
    from olmo_hybrid_jax.eval.loading import checkpoint_kind

    src = Path(source)
    if not src.is_dir():
        raise InputError(f"--checkpoints {src} is not a directory")
    if (src / "config.yaml").is_file():  # a training run
        ck = src / "checkpoints"
        steps = sorted(int(d.name) for d in ck.iterdir() if d.is_dir() and d.name.isdigit()) if ck.is_dir() else []
        if not steps:
            raise InputError(f"{ck} holds no finished checkpoint")
        by_step, per_step = _run_tokens(src)
        out = []
        for s in steps:
            tokens, where = ((by_step[s], "metrics.jsonl") if s in by_step else
                             (per_step * s, "config.yaml") if per_step else (None, None))
            out.append(Checkpoint(f"step{s}", src, None, s, run_step=s, tokens=tokens, tokens_source=where))
        return out
    try:
        kind = checkpoint_kind(src)
    except FileNotFoundError:
        kind = None
    if kind is not None:
        raise InputError(f"{src} is one {kind} checkpoint, not a series: use the lm-eval or ppl subcommand")
    out, seen = [], {}
    for d in sorted(p for p in src.iterdir() if p.is_dir() and not p.name.startswith(".")):
        parsed = parse_name(d.name)
        if parsed is None:
            raise InputError(f"{d}: the folder name is neither stageK-stepN nor stepN (optionally -tokensN[KMBT])")
        stage, step, tokens = parsed
        if (stage, step) in seen:
            raise InputError(f"{d} and {seen[stage, step]} are the same checkpoint (stage {stage}, step {step})")
        seen[stage, step] = d
        try:
            checkpoint_kind(d)
        except FileNotFoundError as e:
            raise InputError(str(e)) from e
        out.append(Checkpoint(d.name, d, stage, step, tokens=tokens, tokens_source=None if tokens is None else "name"))
    if not out:
        raise InputError(f"{src} holds no checkpoint folders (stageK-stepN or stepN) and is no training run "
                         "(config.yaml)")
    return sorted(out, key=lambda c: c.order)


def per_stage(values: list[str] | None, flag: str) -> dict[int | None, int]:
    """``["N", "2=M"]`` -> ``{None: N, 2: M}`` (non-negative integers); InputError naming ``flag``."""
    out: dict[int | None, int] = {}
    for v in values or []:
        key, sep, num = v.rpartition("=")
        try:
            stage, n = (int(key) if sep else None), int(num)
            if n < 0 or (stage is not None and stage < 0):
                raise ValueError
        except ValueError:
            raise InputError(f"{flag} {v!r}: expected N or STAGE=N (non-negative integers)") from None
        out[stage] = n
    return out


def assign_tokens(ckpts: list[Checkpoint], tokens_per_step: dict, offsets: dict) -> list[Checkpoint]:
    """``ckpts`` (in order) with tokens seen as the module docstring's rules give; InputError for a missing one."""
    out, stage_end = [], {}
    for c in ckpts:
        tps = tokens_per_step.get(c.stage, tokens_per_step.get(None))
        if tps is not None:
            off = offsets.get(c.stage)
            if off is None and c.stage not in (None, 1):
                off = stage_end.get(c.stage - 1)
                if off is None:
                    raise InputError(f"{c.name}: no stage {c.stage - 1} checkpoint to continue from; pass "
                                     f"--stage-offset {c.stage}=TOKENS (the tokens seen before its step 0)")
            c = dataclasses.replace(c, tokens=(off or 0) + tps * c.step, tokens_source="--tokens-per-step")
        if c.tokens is None:
            raise InputError(f"{c.name}: no token count (no -tokensN in its name, no training run metadata); "
                             "pass --tokens-per-step N (or STAGE=N)")
        stage_end[c.stage] = c.tokens
        out.append(c)
    return out


def flatten_metrics(ppl_out: dict | None, lm_out: dict | None) -> dict:
    """One row's metric columns from ``score_ppl``'s and ``run_tasks``' results (numbers only; "N/A" -> None)."""
    row: dict = {}
    if ppl_out is not None:
        names = [Path(f).name for f in ppl_out["files"]]
        unique = len(set(names)) == len(names)  # short columns unless two files share a name
        parts = {(Path(f).name if unique else f): s for f, s in ppl_out["files"].items()}
        if len(parts) > 1:
            parts["total"] = ppl_out["total"]
        for f, s in parts.items():
            for k in ("loss", "perplexity", "bits_per_byte"):
                row[f"ppl/{f}/{k}"] = s[k]
    for task, res in (lm_out or {}).get("results", {}).items():
        for k, v in res.items():
            if k == "alias" or isinstance(v, bool):
                continue
            name = f"{task}/{k.removesuffix(',none')}"
            if isinstance(v, (int, float)):
                row[name] = v
            elif v in ("N/A", None):
                row[name] = None
    return row


def _settings(args) -> dict:
    s = {k: getattr(args, k, None) for k in SETTINGS}
    s["tasks"] = [t for t in (args.tasks or "").split(",") if t]
    s["ppl"] = [str(f) for f in args.ppl or []]
    return s


def _read_previous(path: Path, settings: dict) -> dict[str, dict]:
    """The rows of an earlier sweep's JSON by name (after checking its settings are this call's), or {}."""
    if not path.is_file():
        return {}
    try:
        old = json.loads(path.read_text())
        rows, prev = old["rows"], old["settings"]
    except (ValueError, KeyError, TypeError) as e:
        raise InputError(f"{path} exists but is no sweep output ({e}); pass another --output") from None
    for k in SETTINGS:
        if prev.get(k) != settings[k]:
            raise InputError(f"{path} was written with {k}={prev.get(k)!r}, this call has {settings[k]!r}: "
                             "use the same options to resume, or another --output")
    return {r["name"]: r for r in rows}


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)  # a sweep killed mid-write keeps the previous table


def write_csv(path: Path, rows: list[dict]) -> None:
    cols = list(FIXED) + [k for k in dict.fromkeys(k for r in rows for k in r) if k not in FIXED]
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows({k: ("" if r.get(k) is None else r.get(k)) for k in cols} for r in rows)
    os.replace(tmp, path)


def plot(path: Path, rows: list[dict]) -> list[str]:
    """One subplot per numeric metric (stderr columns aside) against tokens, a line per stage; the metrics."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [k for k in dict.fromkeys(k for r in rows for k in r) if k not in FIXED and "_stderr" not in k
               and any(isinstance(r.get(k), (int, float)) and math.isfinite(r[k]) for r in rows)]
    n = max(1, len(metrics))
    ncols = min(3, n)
    nrows = -(-n // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.5 * ncols, 3.2 * nrows), dpi=100, squeeze=False)
    stages = sorted({r["stage"] for r in rows}, key=lambda s: s or 0)
    for ax, m in zip(axes.flat, metrics):
        for st in stages:
            pts = sorted((r["tokens"], r[m]) for r in rows if r["stage"] == st and isinstance(r.get(m), (int, float)))
            if pts:
                ax.plot(*zip(*pts), marker="o", ms=3, lw=1.2, label="run" if st is None else f"stage {st}")
        head, _, metric = m.rpartition("/")
        ax.set_title(f"{Path(head[4:]).name} {metric}" if m.startswith("ppl/") else m, fontsize=9)
        ax.set_xlabel("tokens")
        ax.grid(alpha=0.3)
        if len(stages) > 1:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return metrics


def outputs(output: str | Path) -> tuple[Path, Path, Path]:
    """(JSON, CSV, PNG) paths of ``--output``: the JSON path and its siblings with .csv / .png."""
    p = Path(output)
    p = p if p.suffix == ".json" else p.with_name(p.name + ".json")
    return p, p.with_suffix(".csv"), p.with_suffix(".png")


def sweep(args) -> dict:
    """Run the sweep ``args`` describe (the CLI's ``sweep`` options); returns the written JSON object."""
    from tqdm.auto import tqdm

    from olmo_hybrid_jax.eval.commands import _model_args, check_tasks, ppl_inputs, run_tasks, score_ppl
    from olmo_hybrid_jax.eval.loading import (
        batch_sharding,
        checkpoint_config,
        eval_mesh,
        load_model,
        mesh_model_kwargs,
        shard_model,
    )

    # every check before the first model loads
    if not args.tasks and not args.ppl:
        raise InputError("nothing to evaluate: give --tasks and/or --ppl files")
    ckpts = assign_tokens(discover(args.checkpoints), per_stage(args.tokens_per_step, "--tokens-per-step"),
                          per_stage(args.stage_offset, "--stage-offset"))
    tm, tasks = check_tasks(args) if args.tasks else (None, [])
    try:
        kw = _model_args(argparse.Namespace(**{**vars(args), "checkpoint": None, "step": None, "dtype": None}))
    except ImportError:  # --ppl alone needs no lm-eval
        if args.model_args:
            raise InputError("--model-args needs lm-eval: pip install 'olmo_hybrid_jax[eval]'") from None
        kw = {}
    mesh, rules = eval_mesh(kw.get("mesh"), kw.get("fsdp"))  # --model-args mesh=... serves --ppl too
    sharding = batch_sharding(mesh, rules, args.batch_size)
    loaded = eos = None
    if args.ppl:
        first = ckpts[0]
        ppl_args = argparse.Namespace(**{**vars(args), "limit": args.ppl_limit})
        loaded, eos = ppl_inputs(args.ppl, first.path, checkpoint_config(first.path), ppl_args)
    json_p, csv_p, png_p = outputs(args.output)
    json_p.parent.mkdir(parents=True, exist_ok=True)
    settings = _settings(args)
    done = _read_previous(json_p, settings)

    rows = dict(done)
    result: dict = {}

    def write():
        nonlocal result
        ordered = sorted(rows.values(), key=lambda r: ((r["stage"] or 0), r["step"], r["name"]))
        result = {"source": str(args.checkpoints), "settings": settings, "rows": ordered}
        _write_json(json_p, result)
        write_csv(csv_p, ordered)
        plot(png_p, ordered)

    say = (lambda m: tqdm.write(m, file=sys.stderr))
    bar = tqdm(ckpts, desc="sweep", unit="ckpt", disable=args.quiet)
    for c in bar:
        fixed = {"name": c.name, "stage": c.stage, "step": c.step, "tokens": c.tokens,
                 "tokens_source": c.tokens_source, "path": str(c.path)}
        if c.name in done:
            say(f"{c.name}: already in {json_p}, skipped")
            rows[c.name] = {**done[c.name], **fixed}  # token columns follow this call's options
            continue
        bar.set_postfix_str(c.name)
        model = load_model(c.path, step=c.run_step, dtype=args.dtype, **mesh_model_kwargs(mesh, rules))
        if mesh is not None:
            model = shard_model(model, mesh, rules)
        ppl_out = lm_out = None
        if loaded is not None:
            window = args.max_length or model.config.max_position_embeddings
            ppl_out = score_ppl(model, loaded, eos, window=window, batch_size=args.batch_size, quiet=True,
                                sharding=sharding)
        if tasks:
            from olmo_hybrid_jax.eval.harness import OlmoHybridLM

            tok = args.tokenizer or (c.path / "tokenizer.json" if (c.run_step is None and
                                                                    (c.path / "tokenizer.json").is_file()) else None)
            lm = OlmoHybridLM(**{**kw, "pretrained": model, "tokenizer": tok})
            lm_out = run_tasks(lm, tm, tasks, argparse.Namespace(**{**vars(args), "quiet": True}))
            del lm
        del model
        gc.collect()  # the model's arrays go before the next checkpoint loads: one copy in memory
        rows[c.name] = {**fixed, **flatten_metrics(ppl_out, lm_out)}
        write()
    bar.close()
    if not result:
        write()
    return result
