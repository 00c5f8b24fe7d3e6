"""Per-step metrics: the loggers of ``train.loggers`` (one row per step each) and a tqdm progress bar.

- ``jsonl`` (default): ``OUT/metrics.jsonl``, one JSON object per step. On resume from step s the file is
  first cut back to the rows with ``step <= s`` (rows an interrupted run wrote after its last checkpoint
  are dropped, they will be recomputed), so the file always holds exactly one row per step, in order.
- ``tensorboard``: event files in ``OUT/tensorboard/`` (tensorboardX, extra ``[tensorboard]``), one scalar
  per numeric key of the row (tag = the key, e.g. ``loss``, ``eval/ppl``) at the row's step; a resumed
  run's writer purges the steps after its checkpoint, so TensorBoard shows each step once too.
- ``wandb``: one ``wandb.log(row, step=step)`` per row (extra ``[wandb]``); mode from ``train.wandb_mode``,
  else ``$WANDB_MODE``, else online. A resumed run continues the W&B run whose id ``OUT/wandb_run_id``
  keeps; W&B drops rows for steps it already has, so those an interrupted run logged after its last
  checkpoint stay as first logged there.

Steps with in-loop evaluation carry ``eval/loss``, ``eval/ppl``, ``eval/tokens`` and ``eval/time_s`` in
the same row. Only process 0 writes.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import time
from pathlib import Path


def truncate_metrics(path: Path, last_step: int) -> int:
    """Keep the rows of ``path`` with step <= last_step (atomically); return how many remain."""
    if not path.exists():
        return 0
    keep = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                break  # a torn last line from a killed run
            if int(row.get("step", -1)) <= last_step:
                keep.append(line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)
    return len(keep)


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else (1e308 if v > 0 else -1e308)
    return v


#: train.loggers' names -> (module imported, pip extra that installs it); jsonl needs nothing
LOGGERS = {"jsonl": (None, None), "tensorboard": ("tensorboardX", "tensorboard"), "wandb": ("wandb", "wandb")}


def check_loggers(names) -> None:
    """Import each logger's package now (before any compile); ConfigError naming the extra when one is missing."""
    import importlib

    from olmo_hybrid_jax.train.config import ConfigError

    for name in names:
        module, extra = LOGGERS[name]
        if module is None:
            continue
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise ConfigError(f"train.loggers has {name} but {module} does not import ({e}); "
                              f"pip install 'olmo_hybrid_jax[{extra}]'") from e


def open_loggers(cfg, out: Path, *, start_step: int, enabled: bool = True) -> Loggers:
    """The loggers of ``cfg.train.loggers`` writing into the run folder ``out`` (none when not ``enabled``:
    processes other than 0), continuing after ``start_step`` (rows after it are dropped or purged)."""
    made = []
    if enabled:
        try:
            for name in cfg.train.loggers:
                if name == "jsonl":
                    made.append(MetricsWriter(out / "metrics.jsonl"))
                elif name == "tensorboard":
                    made.append(TensorBoardLogger(out / "tensorboard", start_step=start_step))
                else:
                    made.append(WandbLogger(cfg, out))
        except BaseException:
            Loggers(made).close()
            raise
    return Loggers(made)


class Loggers:
    """Every configured logger as one: ``write`` hands each the same row."""

    def __init__(self, loggers: list):
        self.loggers = loggers

    def write(self, row: dict) -> None:
        for lg in self.loggers:
            lg.write(row)

    def close(self) -> None:
        for lg in self.loggers:
            lg.close()


def _scalars(row: dict) -> dict[str, float]:
    """The row's numeric values (bools as 0/1) but ``step``: what TensorBoard and W&B plot."""
    return {k: float(v) for k, v in row.items() if k != "step" and isinstance(v, (int, float))}


class TensorBoardLogger:
    def __init__(self, logdir: Path, *, start_step: int = 0):
        from tensorboardX import SummaryWriter

        # purge_step: TensorBoard hides the events of steps >= it from earlier files (an interrupted run's tail)
        self._w = SummaryWriter(str(logdir), purge_step=start_step + 1 if start_step else None, flush_secs=30)

    def write(self, row: dict) -> None:
        for k, v in _scalars(row).items():
            self._w.add_scalar(k, v, global_step=row["step"])

    def close(self) -> None:
        self._w.close()


class WandbLogger:
    def __init__(self, cfg, out: Path):
        import wandb

        id_file = out / "wandb_run_id"
        if not id_file.is_file():  # a resumed run continues the same W&B run
            id_file.write_text(secrets.token_hex(4) + "\n")
        run_id = id_file.read_text().strip()
        t = cfg.train
        self._run = wandb.init(project=t.wandb_project, name=t.wandb_name or out.resolve().name, id=run_id,
                               resume="allow", dir=str(out), config=cfg.to_dict(),
                               mode=t.wandb_mode or os.environ.get("WANDB_MODE") or "online")

    def write(self, row: dict) -> None:
        self._run.log(_scalars(row), step=row["step"])

    def close(self) -> None:
        self._run.finish()


class MetricsWriter:
    """Appends rows to ``metrics.jsonl`` (the trainer cuts it back to the resumed step first)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._f = open(self.path, "a")

    def write(self, row: dict) -> None:
        if self._f is None:
            return
        self._f.write(json.dumps({k: _clean(v) for k, v in row.items()}) + "\n")
        self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def read_metrics(path: str | Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class Progress:
    """A tqdm bar driven by the flushed metrics rows, so its count and postfix are always the same step's.

    The rate (and ETA) counts from the first step this invocation finished: that step's time is mostly
    compilation. It draws at most every ``mininterval`` seconds and never for the final step, which
    ``close`` draws once (tqdm's close always redraws; drawing it here too printed the last line twice).
    """

    def __init__(self, start: int, total: int, enabled: bool):
        from tqdm.auto import tqdm

        self.bar = tqdm(initial=start, total=total, disable=not enabled, dynamic_ncols=True, unit="step",
                        desc="train")
        self._timed = False
        self._drawn = 0.0

    def update(self, row: dict, *, final: bool = False) -> None:
        bar = self.bar
        if bar.disable:
            return
        bar.n = row["step"]
        bar.set_postfix(format_postfix(row), refresh=False)
        if not self._timed:  # restart the clock after the first step: rate = later steps / their time
            bar.initial = row["step"]
            bar.unpause()
            self._timed = True
        now = time.monotonic()
        if not final and now - self._drawn >= bar.mininterval:
            bar.refresh()
            self._drawn = now

    def close(self) -> None:
        self.bar.close()


def format_postfix(row: dict) -> dict:
    out = {"loss": f"{row['loss']:.4f}", "gnorm": f"{row['grad_norm']:.3g}", "lr": f"{row['lr']:.2e}",
           "tok/s": f"{row['tokens_per_s']:,.0f}" if row.get("tokens_per_s") else "-"}
    if row.get("mfu") is not None:
        out["mfu"] = f"{100 * row['mfu']:.1f}%"
    return out
