"""Per-step metrics: ``OUT/metrics.jsonl`` (one JSON object per step) and a tqdm progress bar.

On resume from step s the file is first cut back to the rows with ``step <= s`` (rows an interrupted
run wrote after its last checkpoint are dropped, they will be recomputed), so the file always holds
exactly one row per step, in order. Only process 0 writes.
"""

from __future__ import annotations

import json
import math
import os
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


class MetricsWriter:
    def __init__(self, path: Path, *, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled
        self._f = open(self.path, "a") if enabled else None

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
