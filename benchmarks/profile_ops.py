"""Where a jitted step spends its device time: a JAX profiler trace, summed by kernel and by source op.

``profile_ops(fn, steps, log_dir)`` runs ``fn`` ``steps`` times under ``jax.profiler.trace`` (with the
Perfetto JSON export, which needs no TensorBoard plugin), then reads the trace back and returns, per
step, the device time of every kernel name and of every op-name prefix (the ``tf_op`` / ``long_name``
the XLA GPU trace attaches, e.g. ``jit(step)/.../dot_general``), largest first. With no device
track (CPU) it sums the host's XLA op events instead, so the code path is testable on CPU. Kernels that XLA:GPU
launches inside a command buffer (CUDA graph) are reported without their op: profile with
``--xla_gpu_enable_command_buffer=`` in XLA_FLAGS (``train_bench.py --profile`` sets it) to attribute all.

    python benchmarks/train_bench.py --smoke --profile 2 --out /tmp/p   # CPU check
"""

from __future__ import annotations

import gzip
import json
import re
from collections import defaultdict
from pathlib import Path


def _load_trace(log_dir: Path) -> list[dict]:
    paths = sorted(Path(log_dir).rglob("perfetto_trace.json.gz"), key=lambda p: p.stat().st_mtime)
    if not paths:
        raise FileNotFoundError(f"no perfetto_trace.json.gz under {log_dir} (did the profiler run?)")
    with gzip.open(paths[-1], "rt") as f:
        data = json.load(f)
    return data["traceEvents"] if isinstance(data, dict) else data


SCOPES = ("gdn_core", "short_conv", "gated_rmsnorm", "gdn", "attention", "mlp", "rmsnorm", "lm_head_ce", "optimizer")
_CORE = re.compile(r"^(?:[\w.]+\()*([\w.\-]+)\)*$")


def scope_of(op: str, scopes=SCOPES) -> str:
    """The innermost known ``jax.named_scope`` in an op path, + " bwd" when it is under a transpose."""
    found = "other"
    for part in op.split("/"):
        m = _CORE.match(part)
        if m and m.group(1) in scopes:
            found = m.group(1)
    return f"{found} {'bwd' if 'transpose(' in op else 'fwd'}"


_NOISE = re.compile(r"^(\$|Pjit|PjRt|Thunk|Common|Allocate|Slinky|Execute|Trace|tsl::|xla::|StreamExecutor|cu[A-Z])")


_HLO_LINE = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=.*?metadata=\{[^}]*?op_name="([^"]*)"')


def hlo_op_names(hlo_text: str) -> dict[str, str]:
    """HLO instruction name -> its ``op_name`` metadata (the JAX name stack), from ``compiled.as_text()``."""
    out = {}
    for line in hlo_text.splitlines():
        m = _HLO_LINE.match(line)
        if m:
            out.setdefault(_norm(m.group(1)), m.group(2))
    return out


def _norm(name: str) -> str:  # kernel names spell HLO's "fusion.12" / "custom-call.3" as "fusion_12"
    return re.sub(r"[.\-]", "_", name)


def summarize(events: list[dict], steps: int, top: int = 40, op_depth: int = 4, hlo_text: str | None = None) -> dict:
    """Per-step device ms by kernel name, by named scope and by op-name prefix (``op_depth`` components).

    A kernel's op path is the trace's ``tf_op``/``long_name`` argument, else the ``op_name`` metadata of
    its HLO instruction (``hlo_op`` argument or the event name) looked up in ``hlo_text``."""
    names = hlo_op_names(hlo_text) if hlo_text else {}
    procs = {e["pid"]: e.get("args", {}).get("name", "") for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    dev_pids = {p for p, n in procs.items() if "/device:" in n}
    use_pids = dev_pids or set(procs)
    by_kernel: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    by_op: dict[str, float] = defaultdict(float)
    by_scope: dict[str, float] = defaultdict(float)
    total = 0.0
    samples = []
    for e in events:
        if e.get("ph") != "X" or e.get("pid") not in use_pids:
            continue
        name = e.get("name", "")
        if not dev_pids and _NOISE.match(name):
            continue
        dur_ms = float(e.get("dur", 0.0)) / 1e3
        args = e.get("args", {}) or {}
        if dev_pids and len(samples) < 12:
            samples.append({"name": name, "args": {k: str(v)[:200] for k, v in args.items()}})
        k = by_kernel[name]
        k[0] += dur_ms
        k[1] += 1
        total += dur_ms
        hlo = str(args.get("hlo_op") or name)
        tf_op = str(args.get("tf_op") or args.get("long_name") or "")
        if tf_op.startswith("XlaModule"):  # inside a command buffer (CUDA graph): no op attribution
            tf_op = ""
        op = tf_op or names.get(_norm(hlo)) or names.get(_norm(name)) or hlo
        op = re.sub(r"\[.*$", "", str(op)).strip()
        parts = [p for p in op.split("/") if p and not p.startswith("jit(") and p != "jit(main)"]
        by_op["/".join(parts[:op_depth]) or name] += dur_ms
        by_scope[scope_of(op)] += dur_ms
    frac = lambda ms: ms / total if total else 0.0  # noqa: E731
    kernels = sorted(({"name": n, "ms": v[0] / steps, "count": v[1] // max(steps, 1), "frac": frac(v[0])}
                      for n, v in by_kernel.items()), key=lambda r: -r["ms"])
    ops = sorted(({"op": n, "ms": v / steps, "frac": v / total if total else 0.0} for n, v in by_op.items()),
                 key=lambda r: -r["ms"])
    scopes = sorted(({"scope": n, "ms": v / steps, "frac": v / total if total else 0.0} for n, v in by_scope.items()),
                    key=lambda r: -r["ms"])
    return {"device_track": bool(dev_pids), "total_ms_per_step": total / steps, "scopes": scopes,
            "kernels": kernels[:top], "ops": ops[:top], "event_samples": samples}


def profile_ops(fn, steps: int, log_dir, top: int = 40, op_depth: int = 4, hlo_text: str | None = None) -> dict:
    import jax

    Path(log_dir).mkdir(parents=True, exist_ok=True)
    with jax.profiler.trace(str(log_dir), create_perfetto_trace=True):
        for _ in range(steps):
            jax.block_until_ready(fn())
    return summarize(_load_trace(Path(log_dir)), steps, top=top, op_depth=op_depth, hlo_text=hlo_text)


def format_summary(s: dict, rows: int = 25) -> str:
    lines = [f"device time per step: {s['total_ms_per_step']:.2f} ms "
             f"({'device track' if s['device_track'] else 'host XLA ops, no device track'})",
             "by named scope (ms/step, share):"]
    lines += [f"  {r['ms']:9.3f}  {100 * r['frac']:5.1f}%  {r['scope']}" for r in s["scopes"]]
    lines.append("top kernels (ms/step, calls/step, share):")
    lines += [f"  {r['ms']:9.3f}  {r['count']:5d}  {100 * r['frac']:5.1f}%  {r['name'][:110]}"
              for r in s["kernels"][:rows]]
    lines.append("by op name:")
    lines += [f"  {r['ms']:9.3f}  {100 * r['frac']:5.1f}%  {r['op'][:120]}" for r in s["ops"][:rows]]
    return "\n".join(lines)
