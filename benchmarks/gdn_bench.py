"""Gated delta rule: GPU check and benchmark of every backend against FLA, in one command.

Two processes of this script, one after the other in the same command on the same card (the jax
one imports ``olmo_hybrid_jax.kernels``: install the package first, e.g. ``pip install --no-deps -e .``):

    python3 benchmarks/gdn_bench.py --fla --json /tmp/fla.json     # torch: FLA times + card ceilings
    python3 benchmarks/gdn_bench.py --json /tmp/fla.json           # jax: checks, our times, the table

The FLA process imports ``fla_baseline`` from ``.bench_peer/`` (a git-ignored copy of the peer
script, carried to the GPU machine with FLA's wheels); the project itself never needs it. FLA's
backward runs with its Triton<3.7.1 Hopper guard lifted, for TIMING ONLY (its backward values are
not used). Our times: jax, block_until_ready, median over many calls after warm-up; FLA's:
triton.testing.do_bench median. Inputs as FLA's peer script draws them (l2-normalised q/k,
g = log sigmoid(2 n + 4), beta = 2 sigmoid(n)), bf16 q/k/v, fp32 g/beta.

Everything goes through the public ``gated_delta_rule``. Rows: a backend name, ``pallas[NAME]``
(the Pallas kernels with ``PALLAS_VARIANTS[NAME]``, the registry the tests check against the
oracle), or ``pallas+inputs`` (the model's call: raw q, k, gate input and beta logits, the
transforms in-kernel). The per-kernel breakdown reads the device times of the named Pallas kernels
(``pl.pallas_call(name="gdn_...")``) from a profile of the public call.

Sequential (token-by-token) is the correctness oracle here, not a timed row: at T = 8192 it is a
lax.scan of 8192 steps, and its backward keeps every token's state.
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

SHAPES = ((1, 8192, 30, 96, 192), (4, 8192, 30, 96, 192), (1, 32768, 30, 96, 192), (2, 8192, 16, 128, 256))
TINY_SHAPES = ((1, 130, 2, 96, 192), (2, 70, 2, 12, 20))  # --tiny: a CPU smoke test of this script
XLA_BACKENDS = ("chunked", "associative_scan", "sequential")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLA_OUT = "/tmp/fla_out.npz"  # FLA's forward output at the first shape, for the values check


def gdn_inputs(B, T, H, K, V, seed=0):
    """fp32 numpy inputs drawn like the peer script's (see module docstring)."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, T, H, K)).astype(np.float32)
    k = rng.standard_normal((B, T, H, K)).astype(np.float32)
    q /= np.linalg.norm(q, axis=-1, keepdims=True)
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    v = rng.standard_normal((B, T, H, V)).astype(np.float32)
    g = np.log(1 / (1 + np.exp(-(rng.standard_normal((B, T, H)) * 2 + 4)))).astype(np.float32)
    beta = (2 / (1 + np.exp(-rng.standard_normal((B, T, H))))).astype(np.float32)
    return q, k, v, g, beta


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


def _fla_path():
    sys.path.insert(0, os.path.join(ROOT, ".bench_peer"))


def fla_kernel_profile(shapes):
    """FLA's forward kernel by kernel (torch.profiler CUDA times, mean of 10 calls per shape)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    _fla_path()
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule

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


def card_ceilings(torch, triton):
    """Card ceilings (METHOD.md): device copy (bytes read + written) and a bf16 matmul."""
    x = torch.empty(2 * 1024**3 // 4, dtype=torch.float32, device="cuda").normal_()
    y = torch.empty_like(x)
    copy_ms = triton.testing.do_bench(lambda: y.copy_(x), return_mode="median")
    a, b = (torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda") for _ in range(2))
    mm_ms = triton.testing.do_bench(lambda: a @ b, return_mode="median")
    return {"copy_TBps": 2 * x.numel() * 4 / (copy_ms * 1e-3) / 1e12,
            "matmul_TFLOPs": 2 * 8192**3 / (mm_ms * 1e-3) / 1e12}


def run_fla(json_path, shapes):
    import torch
    import triton

    _fla_path()
    import fla_baseline

    fla_baseline.lift_hopper_guard()  # timing only
    res = {"card": torch.cuda.get_device_name(0), "torch": torch.__version__, "triton": triton.__version__}
    res.update(card_ceilings(torch, triton))
    print(f"[fla] card {res['card']}: copy {res['copy_TBps']:.2f} TB/s, "
          f"bf16 matmul {res['matmul_TFLOPs']:.0f} TFLOP/s", flush=True)
    res["shapes"] = {}
    for shp in shapes:
        try:
            f, fb, out = fla_baseline.fla_gdn_times(shp)
            res["shapes"][str(shp)] = {"fwd": f, "fwd_bwd": fb}
            if shp == shapes[0]:
                np.savez(FLA_OUT, out=out, shape=np.asarray(shp))
            print(f"[fla] {shp}: fwd {f:.3f} ms, fwd+bwd {fb:.3f} ms", flush=True)
            with open(json_path, "w") as fh:  # as it goes: a time limit keeps the shapes done
                json.dump(res, fh, indent=1)
        except Exception as e:  # keep going: the table shows what failed
            res["shapes"][str(shp)] = {"error": repr(e)[:300]}
            traceback.print_exc()
        torch.cuda.empty_cache()
    with open(json_path, "w") as fh:
        json.dump(res, fh, indent=1)


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
    """The public call a table row times: ``f(q, k, v, g, beta) -> o``."""
    import jax.numpy as jnp

    from olmo_hybrid_jax.kernels import PALLAS_VARIANTS, gated_delta_rule

    if row == "pallas+inputs":  # the model's call: raw q, k, gate input a, beta logits; transforms in-kernel
        def f(q, k, v, g, beta):
            H = q.shape[2]
            A_log = jnp.log(jnp.linspace(1.0, 16.0, H, dtype=jnp.float32))
            dt_bias = jnp.linspace(-4.0, -2.0, H, dtype=jnp.float32)
            return gated_delta_rule(q, k, v, g, beta, backend="pallas", use_qk_l2norm_in_kernel=True, A_log=A_log,
                                    dt_bias=dt_bias, beta_sigmoid=True, beta_scale=2.0)[0]
        return f
    if row.startswith("pallas["):  # same kernels, a registered launch variant
        config = PALLAS_VARIANTS[row[len("pallas["):-1]]
        return lambda *a: gated_delta_rule(*a, backend="pallas", config=config)[0]
    return lambda *a: gated_delta_rule(*a, backend=row)[0]


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


def check_vs_fla(log):
    """Our forward against FLA's forward on the same draw (FLA's forward values are a fair reference)."""
    import jax
    import jax.numpy as jnp

    if not os.path.exists(FLA_OUT):
        return
    saved = np.load(FLA_OUT)
    shp = tuple(int(x) for x in saved["shape"])
    args = gdn_inputs(*shp, seed=0)
    o = jax.jit(row_fn("pallas"))(*[jnp.asarray(x, jnp.bfloat16) for x in args[:3]], *map(jnp.asarray, args[3:]))
    ef = _err(o.astype(jnp.float32), saved["out"])
    log(f"check fwd {shp} bf16 pallas vs FLA fwd: rel-fro {ef[0]:.2e} max {ef[1]:.2e}")


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


def run_ours(json_path, out_dir, shapes, rows, *, skip_checks=False, fp32_check=True, breakdown_variants=("default",),
             fwd_only_variants=False):
    import jax
    import jax.numpy as jnp

    from olmo_hybrid_jax.kernels import PALLAS_VARIANTS, tuned_pallas_config

    lines = []

    def log(msg):
        print(msg, flush=True)
        lines.append(msg)
        if out_dir:  # as it goes: a command killed at its time limit keeps what it measured
            with open(os.path.join(out_dir, "gdn_bench.log"), "a") as fh:
                fh.write(msg + "\n")

    dev = jax.devices()[0]
    log(f"jax {jax.__version__} on {dev.device_kind} ({jax.default_backend()})")
    for shp in shapes:
        log(f"pallas launch for {shp}: {_config_delta(tuned_pallas_config(dev.device_kind, shp[3], shp[4]))}")
    peer = {}
    if json_path and os.path.exists(json_path):
        with open(json_path) as fh:
            peer = json.load(fh)
    if not skip_checks:
        try:
            run_checks(log, shapes, fp32=fp32_check)
        except Exception:
            log("CHECKS FAILED:\n" + traceback.format_exc())
    try:
        check_vs_fla(log)
    except Exception:
        log("FLA comparison failed:\n" + traceback.format_exc())

    table = {}
    for shp in shapes:
        q, k, v, g, beta = gdn_inputs(*shp)
        args = [jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)] + [jnp.asarray(x) for x in (g, beta)]
        del q, k, v, g, beta
        for be in rows:
            if be in XLA_BACKENDS and shp != shapes[0]:
                continue  # plain-XLA rows at the first shape only (compile time); see performance.md
            fn = row_fn(be)
            fwd = jax.jit(fn)
            fb = jax.jit(jax.grad(lambda *a, fn=fn: jnp.sum(fn(*a).astype(jnp.float32) ** 2), argnums=(0, 1, 2, 3, 4)))
            row = {}
            iters, warm = (20, 2) if be.startswith("pallas") else (3, 1)  # XLA rows: compile dominates
            todo = (("fwd", fwd), ("fwd_bwd", fb))
            if fwd_only_variants and be.startswith("pallas["):
                todo = todo[:1]
            for name, f in todo:
                try:
                    t0 = time.perf_counter()
                    jax.block_until_ready(f(*args))
                    row[name + "_compile_s"] = time.perf_counter() - t0
                    row[name] = _timeit(f, *args, iters=iters, warmup=warm)
                except Exception as e:
                    row[name] = None
                    row[name + "_error"] = repr(e)[:400]
                    log(f"{be} {name} {shp} FAILED: {repr(e)[:2000]}")
            table[(shp, be)] = row
            log(f"{be:>16} {shp}: fwd {row.get('fwd')} ms, fwd+bwd {row.get('fwd_bwd')} ms")
        if shp in shapes[:2]:
            for variant in breakdown_variants:
                try:
                    breakdown(args, log, variant)
                except Exception:
                    log("breakdown failed:\n" + traceback.format_exc())
        del args

    # ------------------------------------------------------------------ the table
    card = dev.device_kind
    log("")
    nan = float("nan")
    log(f"card: {card} (jax {jax.__version__}); FLA process saw: {peer.get('card')}, copy "
        f"{peer.get('copy_TBps', nan):.2f} TB/s, bf16 matmul {peer.get('matmul_TFLOPs', nan):.0f} TFLOP/s")
    hdr = "| shape (B,T,H,K,V) | " + " | ".join(f"{b} fwd | {b} fwd+bwd" for b in rows) + \
          " | FLA fwd | FLA fwd+bwd | pallas/FLA fwd | pallas/FLA fwd+bwd |"
    log(hdr)
    log("|" + "---|" * (hdr.count("|") - 1))
    fmt = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
    ratio = lambda a, b: "-" if (a is None or b is None) else f"{a / b:.2f}x"  # noqa: E731
    for shp in shapes:
        cells = []
        for be in rows:
            r = table.get((shp, be), {})
            cells += [fmt(r.get("fwd")), fmt(r.get("fwd_bwd"))]
        fla = peer.get("shapes", {}).get(str(shp), {})

        def best(key, shp=shp):  # the fastest pallas row on the benchmark's inputs (not pallas+inputs)
            xs = [table.get((shp, b), {}).get(key) for b in rows if b.startswith("pallas") and "+" not in b]
            return min([x for x in xs if x] or [None])

        log(f"| {shp} | " + " | ".join(cells) + f" | {fmt(fla.get('fwd'))} | {fmt(fla.get('fwd_bwd'))} | "
            f"{ratio(best('fwd'), fla.get('fwd'))} | {ratio(best('fwd_bwd'), fla.get('fwd_bwd'))} |")
    variants = [b[len("pallas["):-1] for b in rows if b.startswith("pallas[")]
    log("(pallas/FLA uses the fastest pallas row" + "".join(
        f"; pallas[{n}] = PallasConfig({_config_delta(PALLAS_VARIANTS[n])})" for n in variants) + ")")
    log("")
    bw, mm = peer.get("copy_TBps"), peer.get("matmul_TFLOPs")
    for shp in shapes:
        ff, ffb, bf_, bfb = model_flops_bytes(*shp)
        r = table.get((shp, "pallas"), {})
        if r.get("fwd") and bw and mm:
            floor_f = max(bf_ / (bw * 1e12), ff / (mm * 1e12)) * 1e3
            floor_fb = max(bfb / (bw * 1e12), ffb / (mm * 1e12)) * 1e3
            log(f"roofline {shp}: fwd {ff / 1e9:.0f} GFLOP, {bf_ / 1e6:.0f} MB -> floor {floor_f:.3f} ms "
                f"(pallas {r['fwd']:.3f}); fwd+bwd {ffb / 1e9:.0f} GFLOP, {bfb / 1e6:.0f} MB -> floor "
                f"{floor_fb:.3f} ms (pallas {r.get('fwd_bwd') or nan:.3f})")
    if out_dir:
        with open(os.path.join(out_dir, "gdn_bench.json"), "w") as fh:
            json.dump({"card": card, "peer": peer, "rows": {f"{s}|{b}": r for (s, b), r in table.items()}}, fh,
                      indent=1)


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
    ap.add_argument("--fla", action="store_true", help="run the FLA peer (torch) and write --json")
    ap.add_argument("--json", default="/tmp/fla.json")
    ap.add_argument("--out", default=os.environ.get("OUT"))
    ap.add_argument("--skip-checks", action="store_true")
    ap.add_argument("--no-fp32-check", action="store_true")
    ap.add_argument("--checks-only", action="store_true", help="only the correctness checks (exit 1 on failure)")
    ap.add_argument("--backends", default="pallas,pallas[walk_8_warps],chunked,associative_scan",
                    help="comma list of rows: a backend, pallas[VARIANT] (PALLAS_VARIANTS) or pallas+inputs")
    ap.add_argument("--variants", default="", help="comma list of PALLAS_VARIANTS (or 'all') added as pallas[...] rows")
    ap.add_argument("--breakdown", default="default", help="PALLAS_VARIANTS to profile kernel by kernel, or 'none'")
    ap.add_argument("--ncu-kernels", action="store_true", help="each pallas kernel once at the first shape (for ncu)")
    ap.add_argument("--fla-kernels", action="store_true", help="FLA's forward kernel by kernel (torch profiler)")
    ap.add_argument("--fwd-only-variants", action="store_true", help="time pallas[...] rows forward only")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test of this script at small shapes")
    ap.add_argument("--shapes", default=None, help="comma list of indices into the shapes (default: all)")
    a = ap.parse_args(argv)
    shapes = list(TINY_SHAPES if a.tiny else SHAPES)
    if a.shapes:
        try:
            shapes = [shapes[int(i)] for i in a.shapes.split(",")]
        except (ValueError, IndexError):
            ap.error(f"--shapes takes indices 0..{len(shapes) - 1} of {shapes}, got {a.shapes!r}")
    if a.fla_kernels:
        return fla_kernel_profile(shapes)
    if a.fla:
        return run_fla(a.json, shapes)

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
    run_ours(a.json, a.out, shapes, rows, skip_checks=a.skip_checks, fp32_check=not a.no_fp32_check,
             breakdown_variants=breakdown_variants, fwd_only_variants=a.fwd_only_variants)


if __name__ == "__main__":
    main()
