"""Plot the loss curve of one or more runs to a PNG.

    python -m olmo_hybrid_jax.train.plot runs/tiny [runs/other ...] --out loss.png [--key loss]

Each argument is a run directory (its ``metrics.jsonl``) or a metrics file. Needs matplotlib.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from olmo_hybrid_jax.train.metrics import read_metrics


def _series(runs: list[str], key: str) -> list[tuple[str, list[int], list[float]]]:
    """(label, steps, values) of ``key`` per run; ValueError naming the keys there when a run has none."""
    out = []
    for run in runs:
        p = Path(run)
        f = p / "metrics.jsonl" if p.is_dir() else p
        if not f.is_file():
            raise FileNotFoundError(f"no metrics file at {f}")
        rows = list(read_metrics(f))
        have = [r for r in rows if r.get(key) is not None]
        if not have:
            keys = sorted({k for r in rows for k, v in r.items() if k != "step" and isinstance(v, (int, float))})
            raise ValueError(f"no {key!r} values in {f}; its metrics have: {', '.join(keys) or 'no rows'}")
        out.append((p.name if p.is_dir() else p.stem, [r["step"] for r in have], [r[key] for r in have]))
    return out


def plot_runs(runs: list[str], out: str, key: str = "loss", log_y: bool = False) -> Path:
    """Plot ``key`` over steps for each run into the PNG ``out``; every run is read and checked first,
    so a missing file or an unknown key writes nothing."""
    series = _series(runs, key)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover
        raise SystemExit("plotting needs matplotlib: pip install matplotlib") from e
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    for label, steps, values in series:
        ax.plot(steps, values, label=label, lw=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel(key)
    if log_y:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out_p = Path(out)
    out_p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_p)
    plt.close(fig)
    return out_p


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m olmo_hybrid_jax.train.plot", description=__doc__.split("\n")[1])
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--out", default=None, help="PNG path (default: <first run>/<key>.png)")
    ap.add_argument("--key", default="loss")
    ap.add_argument("--log-y", action="store_true")
    args = ap.parse_args(argv)
    first = Path(args.runs[0])
    out = args.out or str((first if first.is_dir() else first.parent) / f"{args.key}.png")
    try:
        p = plot_runs(args.runs, out, args.key, args.log_y)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
