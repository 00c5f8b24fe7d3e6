"""Gated delta rule: GPU check and benchmark of every backend against FLA, in one command.

Two processes of this script, one after the other in the same command on the same card:

    python3 benchmarks/gdn_bench.py --fla --json /tmp/fla.json     # torch: FLA times + card ceilings
    python3 benchmarks/gdn_bench.py --json /tmp/fla.json           # jax: checks, our times, the table

The FLA process imports ``fla_baseline`` from ``.bench_peer/`` (a git-ignored copy of the peer
script, carried to the GPU machine with FLA's wheels); the project itself never needs it. FLA's
backward runs with its Triton<3.7.1 Hopper guard lifted, for TIMING ONLY (its backward values are
not used). Our times: jax, block_until_ready, median over many calls after warm-up; FLA's:
triton.testing.do_bench median. Inputs as FLA's peer script draws them (l2-normalised q/k,
g = log sigmoid(2 n + 4), beta = 2 sigmoid(n)), bf16 q/k/v, fp32 g/beta.

Sequential (token-by-token) is the correctness oracle here, not a timed row: at T = 8192 it is a
lax.scan of 8192 steps, and its backward keeps every token's state.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
import traceback

import numpy as np

SHAPES = [(1, 8192, 30, 96, 192), (4, 8192, 30, 96, 192), (1, 32768, 30, 96, 192), (2, 8192, 16, 128, 256)]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


# ----------------------------------------------------------------------------- FLA (torch) process


def fla_kernel_profile(shapes=None):
    """FLA's forward kernel by kernel (torch.profiler CUDA times, mean of 10 calls per shape)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    sys.path.insert(0, os.path.join(ROOT, ".bench_peer"))
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule

    for shp in shapes or SHAPES:
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


def run_fla(json_path):
    import torch
    import triton

    sys.path.insert(0, os.path.join(ROOT, ".bench_peer"))
    import fla_baseline

    fla_baseline.lift_hopper_guard()  # timing only
    res = {"card": torch.cuda.get_device_name(0), "torch": torch.__version__, "triton": triton.__version__}
    # Card ceilings (METHOD.md): device copy (bytes read + written) and a bf16 matmul.
    x = torch.empty(2 * 1024**3 // 4, dtype=torch.float32, device="cuda").normal_()
    y = torch.empty_like(x)
    ms = triton.testing.do_bench(lambda: y.copy_(x), return_mode="median")
    res["copy_TBps"] = 2 * x.numel() * 4 / (ms * 1e-3) / 1e12
    del x, y
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    ms = triton.testing.do_bench(lambda: a @ b, return_mode="median")
    res["matmul_TFLOPs"] = 2 * 8192**3 / (ms * 1e-3) / 1e12
    del a, b
    print(f"[fla] card {res['card']}: copy {res['copy_TBps']:.2f} TB/s, bf16 matmul {res['matmul_TFLOPs']:.0f} TFLOP/s",
          flush=True)
    res["shapes"] = {}
    for shp in SHAPES:
        try:
            f, fb, out = fla_baseline.fla_gdn_times(shp)
            res["shapes"][str(shp)] = {"fwd": f, "fwd_bwd": fb}
            if shp == SHAPES[0]:
                np.save("/tmp/fla_out_7b.npy", out)
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


def run_checks(log, fp32=True):
    """Pallas vs the sequential fp32 oracle at 7B head shapes (bf16 and fp32 inputs)."""
    import jax
    import jax.numpy as jnp

    from olmo_hybrid_jax.kernels import gated_delta_rule

    def fwd(backend, *a, **kw):
        return jax.jit(lambda *x: gated_delta_rule(*x, output_final_state=True, backend=backend, **kw))(*a)

    # 1) forward at the 7B layer shape, bf16 inputs, against the oracle on the same (rounded) values
    shp = SHAPES[0]
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
    sl = lambda x: x[:, :Tg]  # noqa: E731
    s0 = jnp.asarray(rng.standard_normal((B, H, K, V)) * 0.1, jnp.float32)
    ct_o = jnp.asarray(rng.standard_normal((B, Tg, H, V)), jnp.bfloat16).astype(jnp.float32)  # same for both
    ct_s = jnp.asarray(rng.standard_normal((B, H, K, V)), jnp.float32)
    seg = np.zeros((B, Tg), np.int32)
    seg[:, Tg // 3:] = 1
    seg[:, (3 * Tg) // 4 + 5:] = 2
    seg = jnp.asarray(seg)

    def vjp(backend, q, k, v, g, beta, s0, seg):
        def f(q, k, v, g, beta, s0):
            return gated_delta_rule(q, k, v, g, beta, initial_state=s0, segment_ids=seg, output_final_state=True,
                                    backend=backend)

        (o, s), pb = jax.vjp(f, q, k, v, g, beta, s0)
        return (o, s) + pb((ct_o.astype(o.dtype), ct_s))

    names = ("o", "state", "dq", "dk", "dv", "dg", "dbeta", "ds0")
    for dt in (jnp.bfloat16, jnp.float32) if fp32 else (jnp.bfloat16,):
      try:
        ins = [jnp.asarray(sl(x), dt) for x in (q, k, v)] + [jnp.asarray(sl(x)) for x in (g, beta)]
        ref_ins = [x.astype(jnp.float32) for x in ins]
        for sg in (None, seg):
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

    from olmo_hybrid_jax.kernels import gated_delta_rule

    if not os.path.exists("/tmp/fla_out_7b.npy"):
        return
    shp = SHAPES[0]
    q0, k0, v0, g0, b0 = gdn_inputs(*shp, seed=0)
    f = jax.jit(lambda *x: gated_delta_rule(*x, backend="pallas")[0])
    o0 = f(*[jnp.asarray(x, jnp.bfloat16) for x in (q0, k0, v0)], jnp.asarray(g0), jnp.asarray(b0))
    ef = _err(o0.astype(jnp.float32), np.load("/tmp/fla_out_7b.npy"))
    log(f"check fwd {shp} bf16 pallas vs FLA fwd: rel-fro {ef[0]:.2e} max {ef[1]:.2e}")


BREAKDOWN_SET = ("default",)
FWD_ONLY_VARIANTS = False
XLA_BACKENDS = ("chunked", "associative_scan", "sequential")
ALT_CONFIG = dict(num_warps_walk=8, num_warps_bwd_walk=8)


def run_ours(json_path, out_dir, skip_checks=False, fp32_check=True, backends=("pallas", "chunked", "associative_scan")):
    import jax
    import jax.numpy as jnp

    from olmo_hybrid_jax.kernels import gated_delta_rule

    lines = []

    def log(msg):
        print(msg, flush=True)
        lines.append(msg)
        if out_dir:  # as it goes: a command killed at its time limit keeps what it measured
            with open(os.path.join(out_dir, "gdn_bench.log"), "a") as fh:
                fh.write(msg + "\n")

    dev = jax.devices()[0]
    log(f"jax {jax.__version__} on {dev.device_kind} ({jax.default_backend()})")
    peer = {}
    if json_path and os.path.exists(json_path):
        with open(json_path) as fh:
            peer = json.load(fh)
    if not skip_checks:
        try:
            run_checks(log, fp32=fp32_check)
        except Exception:
            log("CHECKS FAILED:\n" + traceback.format_exc())
    try:
        check_vs_fla(log)
    except Exception:
        log("FLA comparison failed:\n" + traceback.format_exc())

    from olmo_hybrid_jax.kernels.gated_delta_rule.config import PallasConfig
    from olmo_hybrid_jax.kernels.gated_delta_rule.pallas_gpu import pallas_gated_delta_rule

    alt = PallasConfig(**ALT_CONFIG)

    def call(be, *a):
        if be == "pallas+inputs":  # the model's call: raw q, k, gate input a, beta logits; transforms in-kernel
            H = a[0].shape[2]
            A_log = jnp.log(jnp.linspace(1.0, 16.0, H, dtype=jnp.float32))
            dt_bias = jnp.linspace(-4.0, -2.0, H, dtype=jnp.float32)
            return gated_delta_rule(*a, backend="pallas", use_qk_l2norm_in_kernel=True, A_log=A_log,
                                    dt_bias=dt_bias, beta_sigmoid=True, beta_scale=2.0)[0]
        if be.startswith("pallas["):  # same kernels, other launch parameters
            name = be[len("pallas["):-1]
            cfg = alt if name == "alt" else PallasConfig(**BREAKDOWN_CONFIGS[name])
            K = a[0].shape[-1]
            return pallas_gated_delta_rule(*a, scale=K ** -0.5, config=cfg)[0]
        return gated_delta_rule(*a, backend=be)[0]

    backends = list(backends)
    table = {}
    for shp in SHAPES:
        q, k, v, g, beta = gdn_inputs(*shp)
        args = [jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)] + [jnp.asarray(x) for x in (g, beta)]
        del q, k, v, g, beta
        for be in backends:
            if be in XLA_BACKENDS and shp != SHAPES[0]:
                continue  # plain-XLA rows at the first shape only (compile time); see performance.md
            fwd = jax.jit(lambda *a, be=be: call(be, *a))

            def loss(*a, be=be):
                return jnp.sum(call(be, *a).astype(jnp.float32) ** 2)

            fb = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))
            row = {}
            iters, warm = (20, 2) if be.startswith("pallas") else (3, 1)  # XLA rows: compile dominates
            todo = (("fwd", fwd), ("fwd_bwd", fb))
            if FWD_ONLY_VARIANTS and be.startswith("pallas[") and be != "pallas[unfused]":
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
        if shp in SHAPES[:2]:
            try:
                breakdown(args, log, configs=BREAKDOWN_SET)
            except Exception:
                log("breakdown failed:\n" + traceback.format_exc())
        del args

    # ------------------------------------------------------------------ the table
    card = dev.device_kind
    log("")
    log(f"card: {card} (jax {jax.__version__}); FLA process saw: {peer.get('card')}, "
        f"copy {peer.get('copy_TBps', float('nan')):.2f} TB/s, bf16 matmul {peer.get('matmul_TFLOPs', float('nan')):.0f} TFLOP/s")
    hdr = "| shape (B,T,H,K,V) | " + " | ".join(f"{b} fwd | {b} fwd+bwd" for b in backends) + \
          " | FLA fwd | FLA fwd+bwd | pallas/FLA fwd | pallas/FLA fwd+bwd |"
    log(hdr)
    log("|" + "---|" * (hdr.count("|") - 1))
    fmt = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
    for shp in SHAPES:
        cells = []
        for be in backends:
            r = table.get((shp, be), {})
            cells += [fmt(r.get("fwd")), fmt(r.get("fwd_bwd"))]
        fla = peer.get("shapes", {}).get(str(shp), {})
        best = lambda key: min([x for x in (table.get((shp, b), {}).get(key) for b in backends  # noqa: E731
                                            if b.startswith("pallas") and "+" not in b) if x] or [None])
        pf, pfb = best("fwd"), best("fwd_bwd")
        ratio = lambda a, b: "-" if (a is None or b is None) else f"{a / b:.2f}x"  # noqa: E731
        log(f"| {shp} | " + " | ".join(cells) + f" | {fmt(fla.get('fwd'))} | {fmt(fla.get('fwd_bwd'))} | "
            f"{ratio(pf, fla.get('fwd'))} | {ratio(pfb, fla.get('fwd_bwd'))} |")
    log("(pallas/FLA uses the faster of the two pallas rows; pallas[alt] = PallasConfig(" +
        ", ".join(f"{k}={v}" for k, v in ALT_CONFIG.items()) + "))")
    log("")
    bw, mm = peer.get("copy_TBps"), peer.get("matmul_TFLOPs")
    for shp in SHAPES:
        ff, ffb, bf_, bfb = model_flops_bytes(*shp)
        r = table.get((shp, "pallas"), {})
        if r.get("fwd") and bw and mm:
            floor_f = max(bf_ / (bw * 1e12), ff / (mm * 1e12)) * 1e3
            floor_fb = max(bfb / (bw * 1e12), ffb / (mm * 1e12)) * 1e3
            log(f"roofline {shp}: fwd {ff / 1e9:.0f} GFLOP, {bf_ / 1e6:.0f} MB -> floor {floor_f:.3f} ms "
                f"(pallas {r['fwd']:.3f}); fwd+bwd {ffb / 1e9:.0f} GFLOP, {bfb / 1e6:.0f} MB -> floor {floor_fb:.3f} ms "
                f"(pallas {r.get('fwd_bwd') or float('nan'):.3f})")
    if out_dir:
        with open(os.path.join(out_dir, "gdn_bench.json"), "w") as fh:
            json.dump({"card": card, "peer": peer, "rows": {f"{s}|{b}": r for (s, b), r in table.items()}}, fh,
                      indent=1)


BREAKDOWN_CONFIGS = {
    "default": {},
    "wide": dict(block_v_walk=64, num_warps_prep=4, num_warps_grad=4, num_warps_out=8),
    "narrow": dict(block_v_walk=32, num_warps_walk=2, num_stages_walk=3, num_warps_prep=1, num_warps_grad=4,
                   block_v=32),
    "bv16": dict(block_v_walk=16),
    "bv64": dict(block_v_walk=64),
    "w2s3": dict(num_warps_walk=2, num_stages_walk=3, num_warps_prep=8),
    "unfused": dict(fused_output=False),
    "f_s1": dict(num_stages_fused=1),
    "f_s3": dict(num_stages_fused=3),
    "f_w8": dict(num_warps_walk=8),
    "f_bv64": dict(block_v_walk=64),
    "f_bv16": dict(block_v_walk=16),
    "p4w": dict(num_warps_prep=4),
    "f_s3_bv64": dict(num_stages_fused=3, block_v_walk=64),
    "p1": dict(num_warps_prep=1),
    "p4": dict(num_warps_prep=4),
    "wu8": dict(num_warps_wu=8),
    "wu2s2": dict(num_warps_wu=2, num_stages_wu=2),
    "f_s2": dict(num_stages_fused=2),
    "f_bv32": dict(block_v_fused=32),
    "f_bv128": dict(block_v_fused=128),
    "p2": dict(num_warps_prep=2),
    "wu2": dict(num_warps_wu=2),
    "nosplit": dict(split_k=False),
    "split": dict(split_k=True),
    "f_s4": dict(num_stages_fused=4),
    "noprecompute": dict(precompute_qk=False),
    "pre_s2": dict(precompute_qk=True, num_stages_fused=2),
    "offchain": dict(output_off_chain=True),
    "offchain_s2": dict(output_off_chain=True, num_stages_fused=2),
    "pre_s2_bv32": dict(precompute_qk=True, num_stages_fused=3, block_v_fused=32),
    # the fused walk's loads (defaults since 2026-11-27: scale_after_dot and prefetch_fused on)
    "no_sad_pf": dict(scale_after_dot=False, prefetch_fused=False),
    "sad_only": dict(prefetch_fused=False),  # overflows shared memory at 3 stages (239,104 B, H200)
    "pf_only": dict(scale_after_dot=False),
    "sad_pf_s2": dict(num_stages_fused=2),
}


def breakdown(args, log, configs=("default",)):
    for name in configs:
        _breakdown(args, log, name)


def _breakdown(args, log, cfg_name):
    """Times of each Pallas kernel alone, with the bytes it must move (to place the time)."""
    import jax
    import jax.numpy as jnp

    from olmo_hybrid_jax.kernels.gated_delta_rule import pallas_gpu as pg
    from olmo_hybrid_jax.kernels.gated_delta_rule.config import PallasConfig

    q, k, v, g, beta = args
    B, T, H, K = q.shape
    V = v.shape[-1]
    cfg = PallasConfig(**BREAKDOWN_CONFIGS[cfg_name])
    st = pg.make_static(B, T, H, K, V, scale=K ** -0.5, cd="bfloat16", interpret=jax.default_backend() == "cpu",
                        config=cfg)
    cnt = jnp.zeros((1, 64), jnp.int32)
    z = jnp.zeros((H,), jnp.float32)
    s0 = jnp.zeros((B, H, K, V), jnp.float32)
    prep = jax.jit(lambda q, k, v, g, b: pg._prep(st, q, k, v, g, b, cnt, z, z))
    pre = prep(q, k, v, g, beta)
    prep_tm = jax.jit(lambda k, g, b: pg._prep_tm(st, k, g, b, cnt, z, z))
    prep_wu = jax.jit(lambda q, k, v, g, b, gam, tm: pg._prep_wu(st, q, k, v, g, b, cnt, z, z, gam, tm))
    ust = dataclasses.replace(st, config=dataclasses.replace(cfg, fused_output=False))
    gam, tm, w, u = jax.jit(lambda q, k, v, g, b: pg._prep(ust, q, k, v, g, b, cnt, z, z))(q, k, v, g, beta)
    walk = jax.jit(lambda k, gam, w, u: pg._walk(ust, k, gam, cnt, w, u, s0))
    hs, vn, sT = walk(k, gam, w, u)
    out = jax.jit(lambda q, k, gam, hs, vn: pg._out(ust, q, k, gam, cnt, hs, vn, v.dtype))
    do = out(q, k, gam, hs, vn)
    bwalk = jax.jit(lambda q, k, gam, w, do, sT: pg._bwd_walk(st, q, k, gam, cnt, w, do, sT))
    dh, dvn, _ = bwalk(q, k, gam, w, do, sT)
    grads = jax.jit(lambda *a: pg._bwd_grads(st, q, k, v, g, beta, cnt, z, z, *a, q.dtype))
    n = B * T * H
    io = 2 * (2 * K + V) + 8  # q, k, v bf16 + g, beta fp32 per token-head
    hb = hs.size * 2
    items = [
        ("gdn_prep+wu", lambda: prep(q, k, v, g, beta), n * (2 * K + 2 * V + 8 + 4 + 128 + 2 * K + 2 * V)),
        ("gdn_prep", lambda: prep_tm(k, g, beta), n * (2 * K + 8 + 4 + 128)),
        ("gdn_wu", lambda: prep_wu(q, k, v, g, beta, gam, tm), n * (4 * K + 2 * V + 8 + 4 + 2 * 128 + 2 * K + 2 * V)),
        ("gdn_fwd_walk", lambda: walk(k, gam, w, u), n * (2 * K + 4 + 2 * K + 2 * V + 2 * V) + hb),
        ("gdn_fwd_out", lambda: out(q, k, gam, hs, vn), n * (4 * K + 4 + 2 * V + 2 * V) + hb),
        ("gdn_bwd_walk", lambda: bwalk(q, k, gam, w, do, sT), n * (4 * K + 4 + 2 * K + 2 * V + 2 * V) + hb),
        ("gdn_bwd_grads", lambda: grads(gam, tm, do, hs, dh, vn, dvn), n * (2 * io + 4 + 128 + 6 * V + 8) + 2 * hb),
    ]
    if cfg.fused_output:
        pm = pre[3]
        fw = {r: jax.jit(lambda q, k, v, beta, gam, tm, w, pm, s=dataclasses.replace(st, residuals=r):
                         pg._fused_walk(s, q, k, v, beta, gam, cnt, tm, w, pm, s0, v.dtype)) for r in (False, True)}
        nb = n * (4 * K + 4 + 4 + 2 * K + 2 * V + 2 * V + 256)
        items += [
            ("fused walk+out", lambda: fw[False](q, k, v, beta, gam, tm, w, pm), nb),
            ("fused +residuals", lambda: fw[True](q, k, v, beta, gam, tm, w, pm), nb + n * 2 * V + hb),
        ]
    for name, f, nbytes in items:
        ms = _timeit(f, iters=20, warmup=2)
        log(f"  [{cfg_name}] kernel {name:>14} {tuple(q.shape[:3])}: {ms:.3f} ms, >= {nbytes / 1e6:.0f} MB -> "
            f"{nbytes / (ms * 1e-3) / 1e12:.2f} TB/s")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--fla", action="store_true", help="run the FLA peer (torch) and write --json")
    ap.add_argument("--json", default="/tmp/fla.json")
    ap.add_argument("--out", default=os.environ.get("OUT"))
    ap.add_argument("--skip-checks", action="store_true")
    ap.add_argument("--no-fp32-check", action="store_true")
    ap.add_argument("--checks-only", action="store_true", help="only the correctness checks (exit 1 on failure)")
    ap.add_argument("--backends", default="pallas,pallas[alt],chunked,associative_scan")
    ap.add_argument("--breakdown", default="default", help="comma list of BREAKDOWN_CONFIGS to time kernel by kernel")
    ap.add_argument("--ncu-kernels", action="store_true", help="run each pallas kernel once at the first shape (for ncu)")
    ap.add_argument("--fla-kernels", action="store_true", help="FLA's forward kernel by kernel (torch profiler)")
    ap.add_argument("--fwd-only-variants", action="store_true", help="time pallas[...] rows forward only")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test of this script at small shapes")
    ap.add_argument("--shapes", default=None, help="comma list of indices into SHAPES (default: all)")
    a = ap.parse_args()
    if a.tiny:
        SHAPES[:] = [(1, 130, 2, 96, 192), (2, 70, 2, 12, 20)]
    if a.shapes:
        try:
            SHAPES[:] = [SHAPES[int(i)] for i in a.shapes.split(",")]
        except (ValueError, IndexError):
            ap.error(f"--shapes takes indices 0..{len(SHAPES) - 1} of {SHAPES}, got {a.shapes!r}")
    BREAKDOWN_SET = () if a.breakdown == "none" else tuple(a.breakdown.split(","))
    FWD_ONLY_VARIANTS = a.fwd_only_variants
    if a.fla_kernels:
        fla_kernel_profile()
    elif a.ncu_kernels:
        sys.path.insert(0, ROOT)
        import jax.numpy as jnp

        _args = [jnp.asarray(x, jnp.bfloat16) for x in gdn_inputs(*SHAPES[0])[:3]] + \
            [jnp.asarray(x) for x in gdn_inputs(*SHAPES[0])[3:]]
        _breakdown(_args, print, "default")
    elif a.fla:
        run_fla(a.json)
    elif a.checks_only:
        sys.path.insert(0, ROOT)
        import jax

        print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}", flush=True)
        run_checks(lambda m: print(m, flush=True))  # raises (non-zero exit) on failure
    else:
        sys.path.insert(0, ROOT)
        run_ours(a.json, a.out, skip_checks=a.skip_checks, fp32_check=not a.no_fp32_check,
                 backends=a.backends.split(","))
