"""Gated delta rule: GPU check and benchmark of our backends against FLA and jax-linear-attention, in one command.

One command starts every process on the same card (``--role all``; the jax ones import
``olmo_hybrid_jax.kernels``):

    python3 benchmarks/gdn_bench.py --role all --peers fla,jla --peer-path /tmp/peers --out $OUT

``--peer-path`` holds the peers' pure-Python packages (FLA 0.6.0, fla-core, jax-linear-attention 0.1.0,
carried as wheels, installed with ``pip install --no-deps --target``); the project itself never
needs them, and a missing one gives a "peer unavailable: <reason>" line instead of its columns.
How the processes share the card (compile together, time one at a time) and how each peer is
called: ``gdn_peers.py``. Shapes: today's four plus two K = V = 128 ones; each shape twice, dense
and with ``segment_ids`` (16 documents a row; FLA gets the same rows flattened with
``cu_seqlens``). Before timing, every implementation's output and gradients at small shapes (one per
(H, K, V)) are compared with the fp32 sequential oracle, so a wrong peer shows.

Ours: jax, block_until_ready, median over many calls after warm-up (jla likewise); FLA's:
triton.testing.do_bench median, its backward with its Triton<3.7.1 Hopper guard lifted. Inputs as
FLA's peer script draws them (l2-normalised q/k, g = log sigmoid(2 n + 4), beta = 2 sigmoid(n)),
bf16 q/k/v, fp32 g/beta. fwd+bwd = grad of sum(o^2) w.r.t. q, k, v, g, beta.

Everything of ours goes through the public ``gated_delta_rule``. Rows: a backend name,
``pallas[NAME]`` (the Pallas kernels with ``PALLAS_VARIANTS[NAME]``), or ``pallas+inputs`` (the
model's call: raw q, k, gate input and beta logits, the transforms in-kernel). The per-kernel
breakdown reads the device times of the named Pallas kernels from a profile of the public call.

Sequential (token-by-token) is the correctness oracle here, not a timed row. ``--smoke``: the same
orchestration at tiny shapes on CPU (Pallas interpret mode, jla's plain-JAX path, FLA unavailable).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import glob
import gzip
import json
import os
import sys
import tempfile
import time
import traceback

import numpy as np

SHAPES = ((1, 8192, 30, 96, 192), (4, 8192, 30, 96, 192), (1, 32768, 30, 96, 192), (2, 8192, 16, 128, 256),
          (1, 8192, 32, 128, 128), (4, 8192, 16, 128, 128))
TINY_SHAPES = ((1, 130, 2, 96, 192), (2, 70, 2, 64, 64))  # --tiny: a CPU smoke test of this script
XLA_BACKENDS = ("chunked", "associative_scan", "sequential")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gdn_peers  # noqa: E402
from gdn_peers import CHECK_NAMES, check_cotangent, check_shapes, gdn_inputs, key, segment_ids  # noqa: E402


def model_flops_bytes(B, T, H, K, V, C=64):
    """(fwd FLOPs, fwd+bwd FLOPs, fwd bytes, fwd+bwd bytes): the floor counts of gdn_kernels.md.

    FLOPs per token-head: fwd 6CK + 4CV + 6KV, bwd (recompute) 18CK + 10CV + 16KV (x2 for
    multiply-add already inside). Bytes: read q, k, v (bf16), g, beta (fp32), write o (bf16);
    the backward also reads dO and writes dq, dk, dv (bf16), dg, dbeta (fp32).
    """
    n = B * T * H
    f_fwd = n * (6 * C * K + 4 * C * V + 6 * K * V)
    f_bwd = n * (18 * C * K + 10 * C * V + 16 * K * V)
    io_fwd = n * (2 * (2 * K + V) + 8 + 2 * V)
    io_bwd = n * (2 * (2 * K + V) + 8 + 2 * V + 2 * (2 * K + V) + 8)
    return f_fwd, f_fwd + f_bwd, io_fwd, io_fwd + io_bwd


def kernel_bytes(B, T, H, K, V, C=64):
    """HBM bytes each Pallas kernel must move at a bf16 call (to place its time), by kernel name.

    Per token-head: q, k, v, W, h, Vn, dh, dVn bf16; g, beta, gamma fp32; Tm and P one bf16 row of C.
    ``gdn_fwd_walk_out+res`` is the custom_vjp forward's walk, which also writes h and Vn.
    """
    n = B * T * H
    io = 2 * (2 * K + V) + 8  # q, k, v bf16 + g, beta fp32
    hb = B * H * -(-T // C) * K * V * 2  # h: one bf16 state per chunk
    walk = n * (4 * K + 4 + 4 + 2 * K + 2 * V + 2 * V + 4 * C)
    return {
        "gdn_prep": n * (2 * K + 8 + 4 + 2 * C),
        "gdn_wu": n * (4 * K + 4 + 4 + 2 * C + 2 * K + 2 * C),
        "gdn_fwd_walk_out": walk,
        "gdn_fwd_walk_out+res": walk + n * 2 * V + hb,
        "gdn_bwd_walk": n * (4 * K + 4 + 2 * K + 2 * V + 2 * V) + hb,
        "gdn_bwd_grads": n * (2 * io + 4 + 2 * C + 6 * V + 8) + 2 * hb,
    }


# ----------------------------------------------------------------------------- FLA (torch) process


def fla_kernel_profile(shapes, peer_path=None):
    """FLA's forward kernel by kernel (torch.profiler CUDA times, mean of 10 calls per shape)."""
    torch, _, chunk_gated_delta_rule = gdn_peers.fla_import(peer_path)
    from torch.profiler import ProfilerActivity, profile

    for shp in shapes:
        B, T, H, K, V = shp
        q, k, v, g, beta = gdn_inputs(*shp)
        tq, tk, tv = (torch.tensor(x, dtype=torch.bfloat16, device="cuda") for x in (q, k, v))
        tg, tb = (torch.tensor(x, device="cuda") for x in (g, beta))
        with torch.no_grad():
            for _ in range(3):
                chunk_gated_delta_rule(tq, tk, tv, tg, tb, scale=K ** -0.5)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(10):
                    chunk_gated_delta_rule(tq, tk, tv, tg, tb, scale=K ** -0.5)
                torch.cuda.synchronize()
        tot = 0.0
        for e in sorted(prof.key_averages(), key=lambda e: -e.device_time_total):
            if e.device_time_total <= 0:
                continue
            ms = e.device_time_total / 10 / 1e3
            tot += ms
            print(f"[fla-kernels] {shp} {e.key[:60]:>60}: {ms:.3f} ms/call (x{e.count // 10})", flush=True)
        print(f"[fla-kernels] {shp} total {tot:.3f} ms/call", flush=True)


# ----------------------------------------------------------------------------- JAX process


def _timeit(f, *args, iters=20, warmup=3, inner=5):
    """Median ms per call: each sample launches `inner` calls back to back (jax dispatches
    asynchronously, so host overhead overlaps device work) and blocks once at the end."""
    import jax

    for _ in range(warmup):
        jax.block_until_ready(f(*args))
    ts = []
    for _ in range(iters):
        t = time.perf_counter()
        for _ in range(inner):
            out = f(*args)
        jax.block_until_ready(out)
        ts.append((time.perf_counter() - t) / inner)
    return float(np.median(ts) * 1e3)


def _err(x, ref):
    x = np.asarray(x, np.float64)
    ref = np.asarray(ref, np.float64)
    return (float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30)),
            float(np.abs(x - ref).max() / max(np.abs(ref).max(), 1e-30)))


def row_fn(row: str):
    """The public call a table row times: ``f(q, k, v, g, beta, seg=None) -> o``."""
    import jax.numpy as jnp

    from olmo_hybrid_jax.kernels import PALLAS_VARIANTS, gated_delta_rule

    if row == "pallas+inputs":  # the model's call: raw q, k, gate input a, beta logits; transforms in-kernel
        def f(q, k, v, g, beta, seg=None):
            H = q.shape[2]
            A_log = jnp.log(jnp.linspace(1.0, 16.0, H, dtype=jnp.float32))
            dt_bias = jnp.linspace(-4.0, -2.0, H, dtype=jnp.float32)
            return gated_delta_rule(q, k, v, g, beta, segment_ids=seg, backend="pallas", use_qk_l2norm_in_kernel=True,
                                    A_log=A_log, dt_bias=dt_bias, beta_sigmoid=True, beta_scale=2.0)[0]
        return f
    if row.startswith("pallas["):  # same kernels, a registered launch variant
        config = PALLAS_VARIANTS[row[len("pallas["):-1]]
        return lambda *a, seg=None: gated_delta_rule(*a[:5], segment_ids=a[5] if len(a) > 5 else seg,
                                                     backend="pallas", config=config)[0]
    return lambda *a, seg=None: gated_delta_rule(*a[:5], segment_ids=a[5] if len(a) > 5 else seg, backend=row)[0]


def run_checks(log, shapes, fp32=True):
    """Pallas vs the sequential fp32 oracle at 7B head shapes (bf16 and fp32 inputs)."""
    import jax
    import jax.numpy as jnp

    from olmo_hybrid_jax.kernels import gated_delta_rule

    def fwd(backend, *a, **kw):
        return jax.jit(lambda *x: gated_delta_rule(*x, output_final_state=True, backend=backend, **kw))(*a)

    # 1) forward at the 7B layer shape, bf16 inputs, against the oracle on the same (rounded) values
    shp = shapes[0]
    B, T, H, K, V = shp
    q, k, v, g, beta = gdn_inputs(*shp, seed=1)
    bf = [jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)]
    gb = [jnp.asarray(x) for x in (g, beta)]
    o, s = fwd("pallas", *bf, *gb)
    o_ref, s_ref = fwd("sequential", *[x.astype(jnp.float32) for x in bf], *gb)
    assert np.isfinite(np.asarray(o, np.float32)).all()
    eo, es = _err(o.astype(jnp.float32), o_ref), _err(s, s_ref)
    log(f"check fwd {shp} bf16 pallas vs sequential fp32: o rel-fro {eo[0]:.2e} max {eo[1]:.2e}; "
        f"final state rel-fro {es[0]:.2e} max {es[1]:.2e}")
    del o, s, o_ref, s_ref

    # 2) every gradient at T = 2048 (the oracle's backward keeps every token's state), bf16 and fp32
    Tg = min(2048, T)
    rng = np.random.default_rng(2)
    s0 = jnp.asarray(rng.standard_normal((B, H, K, V)) * 0.1, jnp.float32)
    ct_o = jnp.asarray(rng.standard_normal((B, Tg, H, V)), jnp.bfloat16).astype(jnp.float32)  # same for both
    ct_s = jnp.asarray(rng.standard_normal((B, H, K, V)), jnp.float32)
    seg = np.zeros((B, Tg), np.int32)
    seg[:, Tg // 3:] = 1
    seg[:, (3 * Tg) // 4 + 5:] = 2

    def vjp(backend, q, k, v, g, beta, s0, seg):
        def f(q, k, v, g, beta, s0):
            return gated_delta_rule(q, k, v, g, beta, initial_state=s0, segment_ids=seg, output_final_state=True,
                                    backend=backend)

        (o, s), pb = jax.vjp(f, q, k, v, g, beta, s0)
        return (o, s) + pb((ct_o.astype(o.dtype), ct_s))

    names = ("o", "state", "dq", "dk", "dv", "dg", "dbeta", "ds0")
    for dt in (jnp.bfloat16, jnp.float32) if fp32 else (jnp.bfloat16,):
        try:
            ins = [jnp.asarray(x[:, :Tg], dt) for x in (q, k, v)] + [jnp.asarray(x[:, :Tg]) for x in (g, beta)]
            ref_ins = [x.astype(jnp.float32) for x in ins]
            for sg in (None, jnp.asarray(seg)):
                out = jax.jit(lambda *a: vjp("pallas", *a))(*ins, s0, sg)
                ref = jax.jit(lambda *a: vjp("sequential", *a))(*ref_ins, s0, sg)
                errs = {n: _err(np.asarray(a.astype(jnp.float32)), r) for n, a, r in zip(names, out, ref)}
                log(f"check vjp {(B, Tg, H, K, V)} {jnp.dtype(dt).name} segments={sg is not None}: "
                    + ", ".join(f"{n} {e[0]:.1e}/{e[1]:.1e}" for n, e in errs.items()) + "  (rel-fro/max)")
        except Exception as e:
            if dt == jnp.bfloat16:
                raise
            log(f"check vjp float32 FAILED: {repr(e)[:600]}")


def kernel_device_ms(f, args, calls=10):
    """{kernel name: device ms per call} of the named Pallas kernels, from a profile of ``calls`` calls.

    Only device (GPU) events count; interpret mode on CPU has none, so this returns {} there.
    """
    import jax

    jax.block_until_ready(f(*args))  # compiled and warm outside the trace
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            for _ in range(calls):
                out = f(*args)
            jax.block_until_ready(out)
        (path,) = glob.glob(os.path.join(d, "**", "perfetto_trace.json.gz"), recursive=True)
        with gzip.open(path) as fh:
            events = json.load(fh)["traceEvents"]
    device = {e["pid"] for e in events if e.get("name") == "process_name"
              and str(e.get("args", {}).get("name", "")).startswith("/device:")}
    ms = collections.defaultdict(float)
    for e in events:
        if e.get("ph") == "X" and e.get("pid") in device and "gdn_" in e.get("name", ""):
            ms[e["name"]] += e.get("dur", 0) / 1e3 / calls
    return dict(ms)


def breakdown(args, log, variant):
    """Device time of each Pallas kernel in the forward and the forward + backward, with the bytes it must move."""
    import jax
    import jax.numpy as jnp

    row = "pallas" if variant == "default" else f"pallas[{variant}]"
    fn = row_fn(row)
    fb = jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a).astype(jnp.float32) ** 2), argnums=(0, 1, 2, 3, 4)))
    nbytes = kernel_bytes(*args[0].shape[:3], args[0].shape[3], args[2].shape[3])
    for label, f in (("fwd", jax.jit(fn)), ("fwd+bwd", fb)):
        times = kernel_device_ms(f, args)
        if not times:
            log(f"  [{variant}] {label}: no device kernel events in the profile (interpret mode?)")
        for name, ms in sorted(times.items()):
            key = next((k for k in sorted(nbytes, key=len, reverse=True) if k.split("+")[0] in name), None)
            if key == "gdn_fwd_walk_out+res" and label == "fwd":
                key = "gdn_fwd_walk_out"  # a plain forward writes no residuals
            mb = nbytes.get(key, 0) / 1e6
            place = f", >= {mb:.0f} MB -> {mb / ms / 1e3:.2f} TB/s" if key else ""
            log(f"  [{variant}] {label} kernel {name:>18} {tuple(args[0].shape[:3])}: {ms:.3f} ms{place}")


def _config_delta(cfg):
    """The fields of a PallasConfig that differ from the defaults, as text."""
    from olmo_hybrid_jax.kernels import PallasConfig

    base = PallasConfig()
    return ", ".join(f"{f.name}={getattr(cfg, f.name)}" for f in dataclasses.fields(cfg)
                     if getattr(cfg, f.name) != getattr(base, f.name)) or "defaults"


def oracle_checks(log, shapes, segs, rows_ours):
    """fp32 sequential oracle and our rows at the check shapes: {key|name: array} each (warm phase, untimed)."""
    import jax
    import jax.numpy as jnp

    from olmo_hybrid_jax.kernels import gated_delta_rule

    def vjp(f, args, seg, ct):
        o, pb = jax.vjp(lambda *a: f(*a, seg), *args)
        return (o,) + tuple(pb(ct.astype(o.dtype)))

    oracle, ours = {}, {name: {} for name in rows_ours}
    seq = jax.jit(lambda q, k, v, g, beta, seg, ct: vjp(
        lambda *a: gated_delta_rule(*a[:5], segment_ids=a[5], backend="sequential")[0], (q, k, v, g, beta), seg, ct))
    for shp in check_shapes(shapes):
        xs = gdn_inputs(*shp, seed=1)
        bf = [jnp.asarray(x, jnp.bfloat16) for x in xs[:3]] + [jnp.asarray(x) for x in xs[3:]]
        f32 = [x.astype(jnp.float32) for x in bf]  # the oracle sees the same (rounded) values
        ct = jnp.asarray(check_cotangent(shp))
        for seg in segs:
            sg = jnp.asarray(segment_ids(*shp[:2], seed=1)) if seg else None
            t = time.perf_counter()
            for n, x in zip(CHECK_NAMES, seq(*f32, sg, ct)):
                oracle[f"{key(shp, seg)}|{n}"] = np.asarray(x, np.float32)
            for name in rows_ours:
                try:
                    fn = row_fn(name)
                    out = jax.jit(lambda *a, fn=fn: vjp(fn, a[:5], a[5], a[6]))(*bf, sg, ct.astype(jnp.bfloat16))
                    for n, x in zip(CHECK_NAMES, out):
                        ours[name][f"{key(shp, seg)}|{n}"] = np.asarray(x.astype(jnp.float32))
                except Exception as e:
                    log(f"check {name} {key(shp, seg)} FAILED: {e!r}"[:800])
            log(f"oracle + ours at check shape {key(shp, seg)}: {time.perf_counter() - t:.0f} s")
    return oracle, ours


CHECK_TOL = 2e-2  # rel-Frobenius; bf16 inputs give ~4e-3 here


def check_table(log, oracle, impls):
    """One line per implementation and check case: rel-Frobenius error of o and each gradient vs the oracle."""
    cases = sorted({k.rsplit("|", 1)[0] for k in oracle})
    log("")
    log("Correctness vs the fp32 sequential oracle (bf16 q/k/v; rel-Frobenius of o and of each gradient of "
        f"sum(o * ct); ok = all < {CHECK_TOL:g}):")
    log("| impl | check shape | docs | path | " + " | ".join(CHECK_NAMES) + " | verdict |")
    log("|" + "---|" * (len(CHECK_NAMES) + 5))
    verdicts = {}
    for name, (got, err) in impls.items():
        for c in cases:
            shp, seg = c.split("|")
            docs = "16/row" if seg == "seg" else "1"
            if err and not got:
                log(f"| {name} | {shp} | {docs} | - | " + " | ".join("-" for _ in CHECK_NAMES) + f" | {err} |")
                continue
            errs = []
            for n in CHECK_NAMES:
                x = got.get(f"{c}|{n}")
                errs.append(None if x is None else _err(x.reshape(oracle[f"{c}|{n}"].shape), oracle[f"{c}|{n}"])[0])
            path = str(got.get(f"{c}|path", "")) or "-"
            bad = [n for n, e in zip(CHECK_NAMES, errs) if e is None or not e < CHECK_TOL]
            v = "ok" if not bad else ("MISSING" if all(e is None for e in errs) else "MISMATCH: " + ",".join(bad))
            verdicts[f"{name}|{c}"] = {"errors": dict(zip(CHECK_NAMES, errs)), "verdict": v, "path": path}
            log(f"| {name} | {shp} | {docs} | {path} | "
                + " | ".join("-" if e is None else f"{e:.1e}" for e in errs) + f" | {v} |")
    return verdicts


def _load_peer(peer_dir, name):
    """(results dict, check arrays, error text) of a peer process."""
    res, chk, err = {}, {}, None
    path = os.path.join(peer_dir, f"{name}.json")
    if os.path.exists(path):
        with open(path) as fh:
            res = json.load(fh)
        err = res.get("unavailable")
    else:
        err = f"peer did not report (no {path})"
    cpath = os.path.join(peer_dir, f"{name}_check.npz")
    if os.path.exists(cpath):
        with np.load(cpath) as z:
            chk = {k: z[k] for k in z.files}
    elif not err:
        err = "no check outputs"
    return res, chk, err


def run_ours(out_dir, shapes, rows, segs, *, peers=(), peer_dir="/tmp/gdn_peers", sync=None, budget=None,
             skip_checks=False, full_checks=False, fp32_check=True, breakdown_variants=(), fwd_only_variants=False):
    import jax
    import jax.numpy as jnp

    from olmo_hybrid_jax.kernels import PALLAS_VARIANTS, tuned_pallas_config

    sync = sync or gdn_peers.Sync(None, "ours")

    def log(msg):
        print(msg, flush=True)
        if out_dir:  # as it goes: a command killed at its time limit keeps what it measured
            with open(os.path.join(out_dir, "gdn_bench.log"), "a") as fh:
                fh.write(msg + "\n")

    dev = jax.devices()[0]
    log(f"jax {jax.__version__} on {dev.device_kind} ({jax.default_backend()})")
    for shp in shapes:
        log(f"pallas launch for {shp}: {_config_delta(tuned_pallas_config(dev.device_kind, shp[3], shp[4]))}")
    # ---- warm phase (the card is shared; nothing here is timed)
    if full_checks:
        try:
            run_checks(log, shapes, fp32=fp32_check)
        except Exception:
            log("CHECKS FAILED:\n" + traceback.format_exc())
    oracle, ours_chk = {}, {}
    if not skip_checks:
        try:
            oracle, ours_chk = oracle_checks(log, shapes, segs, [r for r in rows if r.startswith("pallas")][:1])
        except Exception:
            log("oracle checks FAILED:\n" + traceback.format_exc())
    cells = []
    for shp in shapes:
        q, k, v, g, beta = gdn_inputs(*shp)
        args = [jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)] + [jnp.asarray(x) for x in (g, beta)]
        del q, k, v, g, beta
        for seg in segs:
            sg = jnp.asarray(segment_ids(*shp[:2])) if seg else None
            for be in rows:
                if be in XLA_BACKENDS and (shp != shapes[0] or seg):
                    continue  # plain-XLA rows at the first shape only (compile time); see performance.md
                fn = row_fn(be)
                fwd = jax.jit(fn)
                fb = jax.jit(jax.grad(lambda *a, fn=fn: jnp.sum(fn(*a).astype(jnp.float32) ** 2),
                                      argnums=(0, 1, 2, 3, 4)))
                todo = (("fwd", fwd), ("fwd_bwd", fb))
                if fwd_only_variants and be.startswith("pallas["):
                    todo = todo[:1]
                for name, f in todo:
                    cells.append((shp, seg, be, name, f, args, sg))
    table = {}
    for shp, seg, be, name, f, args, sg in cells:
        row = table.setdefault((key(shp, seg), be), {})
        try:
            t0 = time.perf_counter()
            jax.block_until_ready(f(*args, sg))
            row[name + "_compile_s"] = time.perf_counter() - t0
        except Exception as e:
            row[name + "_error"] = repr(e)[:400]
            log(f"{be} {name} {key(shp, seg)} FAILED: {repr(e)[:2000]}")
    log(f"compiled {len(cells)} cells")
    sync.warm_done()
    deadline = gdn_peers.stop_time(sync.wait_turn(log), budget)
    # ---- timed phase (alone on the card)
    for shp, seg, be, name, f, args, sg in cells:
        row = table[(key(shp, seg), be)]
        if name + "_error" in row:
            row[name] = None
            continue
        if deadline and time.time() > deadline:
            row[name], row[name + "_error"] = None, "not reached (time budget)"
            continue
        iters, warm = (20, 2) if be.startswith("pallas") else (3, 1)  # XLA rows: compile dominates
        row[name] = _timeit(f, *args, sg, iters=iters, warmup=warm)
        log(f"{be:>16} {key(shp, seg)} {name}: {row[name]:.3f} ms")
    for shp in shapes[:2]:
        if breakdown_variants and not (deadline and time.time() > deadline):
            args = next(c[5] for c in cells if c[0] == shp)
            for variant in breakdown_variants:
                try:
                    breakdown(args, log, variant)
                except Exception:
                    log("breakdown failed:\n" + traceback.format_exc())
    del cells

    # ------------------------------------------------------------------ peers, checks, the table
    peer_res, impls = {}, {}
    for name in rows[:1]:
        impls[f"ours {name}"] = (ours_chk.get(name, {}), None if ours_chk.get(name) else "no check outputs")
    for p in peers:
        res, chk, err = _load_peer(peer_dir, p)
        peer_res[p] = res
        if err:
            log(f"{p}: {err}")
        impls[p] = (chk, err)
    verdicts = check_table(log, oracle, impls) if oracle else {}
    if not oracle:
        log("no oracle checks (--skip-checks or failed)")
    fla = peer_res.get("fla", {})
    card = dev.device_kind
    nan = float("nan")
    log("")
    log(f"card: {card} (jax {jax.__version__}); FLA process saw: {fla.get('card')}, copy "
        f"{fla.get('copy_TBps', nan):.2f} TB/s, bf16 matmul {fla.get('matmul_TFLOPs', nan):.0f} TFLOP/s")
    for p in peers:
        r = peer_res[p]
        log(f"{p}: {r.get('unavailable') or r.get('impl', 'did not report')}")
    hdr = ("| shape (B,T,H,K,V) | docs | " + " | ".join(f"{b} fwd | {b} fwd+bwd" for b in rows)
           + "".join(f" | {p} fwd | {p} fwd+bwd" for p in peers) + (" | jla path" if "jla" in peers else "")
           + "".join(f" | ours/{p} fwd | ours/{p} fwd+bwd" for p in peers) + " |")
    log(hdr)
    log("|" + "---|" * (hdr.count("|") - 1))
    fmt = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
    ratio = lambda a, b: "-" if (a is None or not b) else f"{a / b:.2f}x"  # noqa: E731
    for shp in shapes:
        for seg in segs:
            kk = key(shp, seg)
            cells_txt = []
            for be in rows:
                r = table.get((kk, be), {})
                cells_txt += [fmt(r.get("fwd")), fmt(r.get("fwd_bwd"))]

            def best(k, kk=kk):  # the fastest pallas row on the benchmark's inputs (not pallas+inputs)
                xs = [table.get((kk, b), {}).get(k) for b in rows if b.startswith("pallas") and "+" not in b]
                return min([x for x in xs if x] or [None])

            pc, rt = [], []
            for p in peers:
                c = peer_res[p].get("cells", {}).get(kk, {})
                why = "unavailable" if peer_res[p].get("unavailable") else c.get("error")
                for k in ("fwd", "fwd_bwd"):
                    x = c.get(k)
                    pc.append(fmt(x) if x is not None else f"- ({str(why or c.get(k + '_error') or '')[:40]})")
                    rt.append(ratio(best(k), x))
            jp = []
            if "jla" in peers:
                jp = [peer_res["jla"].get("cells", {}).get(kk, {}).get("path", "-")]
            log(f"| {shp} | {'16/row' if seg else '1'} | " + " | ".join(cells_txt + pc + jp + rt) + " |")
    variants = [b[len("pallas["):-1] for b in rows if b.startswith("pallas[")]
    log("(median ms; ours/peer uses the fastest pallas row" + "".join(
        f"; pallas[{n}] = PallasConfig({_config_delta(PALLAS_VARIANTS[n])})" for n in variants)
        + "; jla 'FALLBACK' rows are its plain-JAX chunked path, not its kernel)")
    log("")
    bw, mm = fla.get("copy_TBps"), fla.get("matmul_TFLOPs")
    for shp in shapes:
        ff, ffb, bf_, bfb = model_flops_bytes(*shp)
        r = table.get((key(shp, False), "pallas"), {})
        if r.get("fwd") and bw and mm:
            floor_f = max(bf_ / (bw * 1e12), ff / (mm * 1e12)) * 1e3
            floor_fb = max(bfb / (bw * 1e12), ffb / (mm * 1e12)) * 1e3
            log(f"roofline {shp}: fwd {ff / 1e9:.0f} GFLOP, {bf_ / 1e6:.0f} MB -> floor {floor_f:.3f} ms "
                f"(pallas {r['fwd']:.3f}); fwd+bwd {ffb / 1e9:.0f} GFLOP, {bfb / 1e6:.0f} MB -> floor "
                f"{floor_fb:.3f} ms (pallas {r.get('fwd_bwd') or nan:.3f})")
    if out_dir:
        with open(os.path.join(out_dir, "gdn_bench.json"), "w") as fh:
            json.dump({"card": card, "jax": jax.__version__, "shapes": [list(s) for s in shapes],
                       "ours": {f"{k}|{b}": r for (k, b), r in table.items()}, "peers": peer_res,
                       "checks": verdicts}, fh, indent=1, default=str)
    sync.done()


def ncu_run(shape):
    """One forward + backward of the default launch at ``shape``: each kernel runs once (for ncu)."""
    import jax
    import jax.numpy as jnp

    fn = row_fn("pallas")
    args = gdn_inputs(*shape)
    args = [jnp.asarray(x, jnp.bfloat16) for x in args[:3]] + [jnp.asarray(x) for x in args[3:]]
    jax.block_until_ready(jax.grad(lambda *a: jnp.sum(fn(*a).astype(jnp.float32) ** 2), argnums=(0, 1, 2, 3, 4))(*args))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--role", default="ours", choices=("ours", "fla", "fla-warm", "jla", "all"),
                    help="all: every process below in one command (warm together, timed in turn)")
    ap.add_argument("--fla", action="store_true", help="same as --role fla")
    ap.add_argument("--peers", default="fla,jla", help="comma list of peers (fla, jla) or 'none'")
    ap.add_argument("--peer-path", default=None, help="folder with the peers' packages (pip --target), put on sys.path")
    ap.add_argument("--peer-dir", default="/tmp/gdn_peers", help="where the processes exchange results")
    ap.add_argument("--out", default=os.environ.get("OUT"))
    ap.add_argument("--budget-s", type=float, default=420, help="--role all: the whole run's seconds")
    ap.add_argument("--no-segments", action="store_true", help="dense rows only (no segment_ids rows)")
    ap.add_argument("--skip-checks", action="store_true", help="no correctness table")
    ap.add_argument("--full-checks", action="store_true", help="also the 7B-shape pallas checks (fwd + vjp, bf16/fp32)")
    ap.add_argument("--no-fp32-check", action="store_true")
    ap.add_argument("--checks-only", action="store_true", help="only the 7B-shape pallas checks (exit 1 on failure)")
    ap.add_argument("--backends", default="pallas",
                    help="comma list of rows: a backend, pallas[VARIANT] (PALLAS_VARIANTS) or pallas+inputs")
    ap.add_argument("--variants", default="", help="comma list of PALLAS_VARIANTS (or 'all') added as pallas[...] rows")
    ap.add_argument("--breakdown", default="none", help="PALLAS_VARIANTS to profile kernel by kernel, or 'none'")
    ap.add_argument("--ncu-kernels", action="store_true", help="each pallas kernel once at the first shape (for ncu)")
    ap.add_argument("--fla-kernels", action="store_true", help="FLA's forward kernel by kernel (torch profiler)")
    ap.add_argument("--fwd-only-variants", action="store_true", help="time pallas[...] rows forward only")
    ap.add_argument("--tiny", action="store_true", help="small shapes (CPU smoke test of this script)")
    ap.add_argument("--smoke", action="store_true", help="CPU smoke test: --role all --tiny, peers in a temp folder")
    ap.add_argument("--shapes", default=None, help="comma list of indices into the shapes (default: all)")
    ap.add_argument("--shape-list", default=None, help=argparse.SUPPRESS)  # 'B,T,H,K,V;...' (fla-warm workers)
    ap.add_argument("--sync", default=None, help=argparse.SUPPRESS)  # turn-taking folder (--role all)
    ap.add_argument("--name", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)  # epoch seconds
    ap.add_argument("--turn-s", type=float, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--stop-before", type=float, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.smoke:
        a.role, a.tiny = "all", True
        a.budget_s = min(a.budget_s, 900)
    if a.fla:
        a.role = "fla"
    shapes = list(TINY_SHAPES if a.tiny else SHAPES)
    if a.shapes:
        try:
            shapes = [shapes[int(i)] for i in a.shapes.split(",")]
        except (ValueError, IndexError):
            ap.error(f"--shapes takes indices 0..{len(shapes) - 1} of {shapes}, got {a.shapes!r}")
    if a.shape_list:
        shapes = [tuple(int(x) for x in s.split(",")) for s in a.shape_list.split(";")]
    segs = (False,) if a.no_segments else (False, True)
    peers = [p for p in a.peers.split(",") if p and p != "none"]
    if bad := [p for p in peers if p not in ("fla", "jla")]:
        ap.error(f"unknown peers {bad}; known: fla, jla")
    os.makedirs(a.peer_dir, exist_ok=True)
    if a.out:
        os.makedirs(a.out, exist_ok=True)
    sync = gdn_peers.Sync(a.sync, a.name or a.role)
    budget = (a.deadline, a.turn_s, a.stop_before) if (a.deadline or a.turn_s) else None
    pj = lambda n: os.path.join(a.peer_dir, n)  # noqa: E731
    if a.fla_kernels:
        return fla_kernel_profile(shapes, a.peer_path)
    if a.role == "all":
        common = [x for x in (argv if argv is not None else sys.argv[1:]) if x != "--smoke"]
        for opt in ("--role", "--budget-s"):  # the children get their own
            while opt in common:
                i = common.index(opt)
                del common[i:i + 2]
        common += ["--peer-dir", a.peer_dir] + (["--tiny"] if a.tiny and "--tiny" not in common else [])
        for n in ("fla", "jla"):  # no stale results of an earlier run
            for f in (pj(f"{n}.json"), pj(f"{n}_check.npz")):
                if os.path.exists(f):
                    os.remove(f)
        t = time.time()
        rc = gdn_peers.orchestrate(os.path.abspath(__file__), common, peers=peers, shapes=shapes,
                                   folder=os.path.join(a.peer_dir, "sync"), budget_s=a.budget_s)
        print(f"[all] done in {time.time() - t:.0f} s (ours exited {rc})", flush=True)
        if a.out:
            for n in ("fla.json", "jla.json"):
                if os.path.exists(pj(n)):
                    with open(pj(n)) as src, open(os.path.join(a.out, f"peer_{n}"), "w") as dst:
                        dst.write(src.read())
        return rc
    if a.role in ("fla", "fla-warm"):
        warm = a.role == "fla-warm"  # compiles only: writes no results
        return gdn_peers.run_fla(None if warm else pj("fla.json"), None if warm else pj("fla_check.npz"), shapes, segs,
                                 peer_path=a.peer_path, sync=sync,
                                 budget=budget, warm_only=warm)
    if a.role == "jla":
        return gdn_peers.run_jla(pj("jla.json"), pj("jla_check.npz"), shapes, segs, peer_path=a.peer_path, sync=sync,
                                 budget=budget, timeit=_timeit)

    from olmo_hybrid_jax.kernels import BACKENDS, PALLAS_VARIANTS

    rows = [r for r in a.backends.split(",") if r]
    extra = list(PALLAS_VARIANTS) if a.variants == "all" else [n for n in a.variants.split(",") if n]
    rows += [f"pallas[{n}]" for n in extra if f"pallas[{n}]" not in rows]
    breakdown_variants = () if a.breakdown == "none" else tuple(a.breakdown.split(","))
    bad = [r for r in rows if r != "pallas+inputs" and r not in BACKENDS
           and not (r.startswith("pallas[") and r.endswith("]") and r[7:-1] in PALLAS_VARIANTS)]
    bad += [f"--breakdown {n}" for n in breakdown_variants if n not in PALLAS_VARIANTS]
    if bad:
        ap.error(f"unknown rows {bad}; backends {sorted(BACKENDS)}, pallas+inputs, pallas[NAME] with NAME in "
                 f"{sorted(PALLAS_VARIANTS)}")
    if a.ncu_kernels:
        return ncu_run(shapes[0])
    if a.checks_only:
        import jax

        print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}", flush=True)
        return run_checks(lambda m: print(m, flush=True), shapes)  # raises (non-zero exit) on failure
    run_ours(a.out, shapes, rows, segs, peers=peers, peer_dir=a.peer_dir, sync=sync, budget=budget,
             skip_checks=a.skip_checks, full_checks=a.full_checks, fp32_check=not a.no_fp32_check,
             breakdown_variants=breakdown_variants, fwd_only_variants=a.fwd_only_variants)


if __name__ == "__main__":
    sys.exit(main())
