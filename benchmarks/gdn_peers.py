"""Peers of ``gdn_bench.py``: FLA (torch + Triton) and jax-linear-attention (jla, jax + Mosaic GPU).

Each peer runs in its own process on the same card as ours. ``gdn_bench.py --role all`` starts them
all at once: every process first compiles and runs each of its cells once (the *warm* phase, GPU
shared, nothing timed), then each times its cells alone on the card in turn (FLA, jla, ours), as
``Sync`` orders through files in one folder. FLA's Triton autotuning is the slow part of a fresh
machine (about 2-3 minutes per (H, K, V) in earlier runs), so extra ``fla-warm`` processes compile
FLA's kernels for each (H, K, V) in parallel during the warm phase, with ``FLA_CACHE_RESULTS=0``:
their (contended) autotune choices are not kept, only Triton's on-disk kernel cache. The timed FLA
process autotunes again in its own turn, alone on the card, from cached binaries.

Peers are called through their public entry points on the same draws as ours (``gdn_inputs``;
bf16 q/k/v, fp32 g/beta, [B, T, H, D] layout):

* FLA 0.6.0 ``fla.ops.gated_delta_rule.chunk_gated_delta_rule``; with segments, rows flattened to
  [1, B*T] with ``cu_seqlens`` (FLA's varlen form; the reshape is outside the timed region). Its
  backward runs with its Triton<3.7.1 Hopper guard lifted (as ``shared/bench/fla_baseline.py``
  does); the correctness table shows whether its gradients are right here.
* jla 0.1.0 ``jla.ops.linear_attention("gated_deltanet", q, k, v, g=g, beta=beta,
  segment_ids=...)`` with ``impl="auto"``: its Mosaic GPU kernel where that accepts the call
  (Hopper, K and V in {64, 128}, or (K, V) = (128, 256) and other K = 256 pairs), else its
  plain-JAX chunked path. Each row says which ran (probed with ``impl="mosaic_gpu"``, whose
  refusal gives the reason).

Peers' outputs and gradients at small check shapes are saved (``*_check.npz``) and compared by the
ours process against the fp32 sequential oracle.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import traceback

import numpy as np

N_DOCS = 16  # documents a row in the segment rows


# ----------------------------------------------------------------------------- shared inputs


def gdn_inputs(B, T, H, K, V, seed=0):
    """fp32 numpy inputs drawn like FLA's peer script (l2-normalised q/k, g = log sigmoid(2n + 4),
    beta = 2 sigmoid(n))."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, T, H, K)).astype(np.float32)
    k = rng.standard_normal((B, T, H, K)).astype(np.float32)
    q /= np.linalg.norm(q, axis=-1, keepdims=True)
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    v = rng.standard_normal((B, T, H, V)).astype(np.float32)
    g = np.log(1 / (1 + np.exp(-(rng.standard_normal((B, T, H)) * 2 + 4)))).astype(np.float32)
    beta = (2 / (1 + np.exp(-rng.standard_normal((B, T, H))))).astype(np.float32)
    return q, k, v, g, beta


def segment_ids(B, T, n_docs=N_DOCS, seed=0):
    """int32 [B, T]: each row cut into ``n_docs`` documents at random (fixed-seed) places."""
    rng = np.random.default_rng(1000 + seed)
    n = max(1, min(n_docs, T))
    seg = np.zeros((B, T), np.int32)
    for b in range(B):
        cuts = np.sort(rng.choice(np.arange(1, T), size=n - 1, replace=False)) if n > 1 else []
        for i, c in enumerate(cuts):
            seg[b, c:] = i + 1
    return seg


def cu_seqlens(seg):
    """FLA's varlen offsets for ``seg`` [B, T] with the rows laid end to end ([1, B*T])."""
    B, T = seg.shape
    starts = [0]
    for b in range(B):
        starts += [b * T + int(t) for t in np.nonzero(np.diff(seg[b]))[0] + 1] + [(b + 1) * T]
    return np.asarray(starts, np.int64)


def check_shapes(shapes, T=1024, B=2):
    """One small check shape per distinct (H, K, V) of ``shapes`` (FLA's autotune keys: no new tuning)."""
    out = []
    for shp in shapes:
        c = (B, min(T, shp[1]), *shp[2:])
        if c not in out:
            out.append(c)
    return out


def check_cotangent(shp, seed=3):
    """The fixed output cotangent of the checks (bf16-exact values): loss = sum(o * ct)."""
    B, T, H, _, V = shp
    ct = np.random.default_rng(seed).standard_normal((B, T, H, V)).astype(np.float32)
    return (ct.view(np.uint32) & np.uint32(0xFFFF0000)).view(np.float32)  # round toward zero to bf16


def key(shp, seg):
    return f"{tuple(shp)}|{'seg' if seg else 'dense'}"


CHECK_NAMES = ("o", "dq", "dk", "dv", "dg", "dbeta")


# ----------------------------------------------------------------------------- turn-taking


class Sync:
    """Warm phase together, timed phase one process at a time, through files in ``folder``.

    A process touches ``warm.NAME`` once compiled, waits for ``go.NAME``, times, touches
    ``done.NAME``. Without a folder every call returns at once (processes run one after another).
    """

    def __init__(self, folder, name):
        self.folder, self.name = folder, name

    def _touch(self, what):
        if self.folder:
            with open(os.path.join(self.folder, f"{what}.{self.name}"), "w") as fh:
                fh.write(str(time.time()))

    def warm_done(self):
        self._touch("warm")

    def wait_turn(self, log=print):
        """Blocks until this process's turn; returns the time it began."""
        if not self.folder:
            return time.time()
        t = time.time()
        path = os.path.join(self.folder, f"go.{self.name}")
        while not os.path.exists(path):
            time.sleep(0.2)
        log(f"[{self.name}] turn after {time.time() - t:.0f} s waiting (alone on the card from here)")
        return time.time()

    def done(self):
        self._touch("done")


def stop_time(turn_start, budget):
    """When a process stops timing: ``budget`` = (global deadline, its turn's seconds, seconds it leaves
    to the processes after it); None = no limit."""
    if not budget:
        return None
    deadline, turn_s, stop_before = budget
    ts = [x for x in (deadline and deadline - (stop_before or 0), turn_s and turn_start + turn_s) if x]
    return min(ts) if ts else None


def coordinate(folder, warm_names, order, *, procs, deadline, turn_s=None):
    """Wait until every warm file exists (or its process ended), then give each of ``order`` its turn."""

    def exists(what, n):
        return os.path.exists(os.path.join(folder, f"{what}.{n}"))

    def alive(n):
        p = procs.get(n)
        return p is not None and p.poll() is None

    t0 = time.time()
    while any(not exists("warm", n) and alive(n) for n in warm_names) and time.time() < deadline:
        time.sleep(0.5)
    print(f"[coord] warm phase over after {time.time() - t0:.0f} s "
          f"(not warm: {[n for n in warm_names if not exists('warm', n)] or 'none'})", flush=True)
    for n in (p for p in warm_names if p.startswith("fla-warm")):  # their compile work is cached now
        if alive(n):
            procs[n].kill()
    for n in order:
        t = time.time()
        open(os.path.join(folder, f"go.{n}"), "w").close()
        limit = min(deadline, t + (turn_s or {}).get(n, 1e9))
        while alive(n) and not exists("done", n) and time.time() < limit:
            time.sleep(0.2)
        print(f"[coord] {n}: turn {time.time() - t:.0f} s"
              + ("" if exists("done", n) else " (not done: ended or out of time)"), flush=True)


# ----------------------------------------------------------------------------- FLA (torch)


def fla_import(peer_path):
    """(torch, triton, chunk_gated_delta_rule) or raises with the reason."""
    if peer_path:
        sys.path.insert(0, peer_path)
    import torch
    import triton  # noqa: F401  (FLA needs it; no Triton, no FLA)

    if not torch.cuda.is_available():
        raise RuntimeError("no CUDA device for torch")
    import fla.ops.common.chunk_o as chunk_o
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule

    chunk_o.IS_NVIDIA_HOPPER = False  # FLA's Triton<3.7.1 Hopper backward guard (its issue 640): lifted
    return torch, triton, chunk_gated_delta_rule


def _fla_case(torch, fn, shp, seg, seed=0, grad=True):
    """Leaf tensors (bf16 q/k/v, fp32 g/beta), flattened to [1, B*T] with cu_seqlens when ``seg``."""
    B, T, H, K, V = shp
    xs = gdn_inputs(*shp, seed=seed)
    kw = {"scale": K ** -0.5}
    if seg:
        xs = [x.reshape(1, B * T, *x.shape[2:]) for x in xs]
        cu = cu_seqlens(segment_ids(B, T, seed=seed))
        kw["cu_seqlens"] = torch.tensor(cu, device="cuda")
        kw["cu_seqlens_cpu"] = torch.tensor(cu)
    ts = [torch.tensor(x, dtype=torch.bfloat16 if i < 3 else torch.float32, device="cuda", requires_grad=grad)
          for i, x in enumerate(xs)]
    return ts, kw


def _fla_check(torch, fn, shp, seg):
    B, T, H, K, V = shp
    ts, kw = _fla_case(torch, fn, shp, seg, seed=1)
    o = fn(*ts, **kw)[0]
    ct = torch.tensor(check_cotangent(shp).reshape(o.shape), device="cuda")
    (o.float() * ct).sum().backward()
    out = [o] + [t.grad for t in ts]
    return {n: x.detach().float().reshape((B, T) + tuple(x.shape[2:])).cpu().numpy() for n, x in zip(CHECK_NAMES, out)}


def _fla_times(torch, triton, fn, shp, seg):
    ts, kw = _fla_case(torch, fn, shp, seg)

    def fwd():
        return fn(*ts, **kw)[0]

    def fwd_bwd():
        fwd().float().pow(2).sum().backward()

    with torch.no_grad():
        ms_f = triton.testing.do_bench(fwd, return_mode="median")
    ms_fb = triton.testing.do_bench(fwd_bwd, return_mode="median")
    return ms_f, ms_fb


def card_ceilings(torch, triton):
    """Card ceilings (METHOD.md): device copy (bytes read + written) and a bf16 matmul."""
    x = torch.empty(2 * 1024**3 // 4, dtype=torch.float32, device="cuda").normal_()
    y = torch.empty_like(x)
    copy_ms = triton.testing.do_bench(lambda: y.copy_(x), return_mode="median")
    a, b = (torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda") for _ in range(2))
    mm_ms = triton.testing.do_bench(lambda: a @ b, return_mode="median")
    return {"copy_TBps": 2 * 2 * 1024**3 / (copy_ms * 1e-3) / 1e12,
            "matmul_TFLOPs": 2 * 8192**3 / (mm_ms * 1e-3) / 1e12}


def _unavailable(name, json_path, sync, e):
    msg = f"peer unavailable: {name}: {type(e).__name__}: {str(e)[:300]}"
    print(f"[{name}] {msg}", flush=True)
    if json_path:
        with open(json_path, "w") as fh:
            json.dump({"unavailable": msg}, fh)
    sync.warm_done()
    if not name.startswith("fla-warm"):  # the warm workers get no turn
        sync.wait_turn()
        sync.done()


def run_fla(json_path, check_path, shapes, segs, *, peer_path=None, sync=None, budget=None, warm_only=False):
    """FLA's times at ``shapes`` (dense and/or segments) and its check outputs; card ceilings."""
    name = sync.name if sync else "fla"
    sync = sync or Sync(None, name)
    try:
        torch, triton, fn = fla_import(peer_path)
    except Exception as e:
        return _unavailable(name, json_path, sync, e)
    import fla

    if warm_only:  # compile every kernel these shapes need (Triton's disk cache); nothing is kept
        for shp in shapes:
            for seg in segs:
                try:
                    ts, kw = _fla_case(torch, fn, shp, seg)
                    fn(*ts, **kw)[0].float().pow(2).sum().backward()
                    torch.cuda.synchronize()
                except Exception as e:
                    print(f"[{name}] warm {key(shp, seg)} failed: {e!r}"[:400], flush=True)
                torch.cuda.empty_cache()
        for shp in check_shapes(shapes):
            for seg in segs:
                try:
                    _fla_check(torch, fn, shp, seg)
                except Exception as e:
                    print(f"[{name}] warm check {key(shp, seg)} failed: {e!r}"[:400], flush=True)
        sync.warm_done()
        print(f"[{name}] compiled", flush=True)
        return
    sync.warm_done()
    deadline = stop_time(sync.wait_turn(), budget)
    res = {"impl": f"FLA {getattr(fla, '__version__', '?')} chunk_gated_delta_rule (Triton)",
           "card": torch.cuda.get_device_name(0), "torch": torch.__version__, "triton": triton.__version__}
    res.update(card_ceilings(torch, triton))
    torch.cuda.empty_cache()
    print(f"[fla] card {res['card']}: copy {res['copy_TBps']:.2f} TB/s, bf16 matmul {res['matmul_TFLOPs']:.0f} TFLOP/s",
          flush=True)
    res["cells"] = {}

    def save():
        if json_path:
            with open(json_path, "w") as fh:
                json.dump(res, fh, indent=1)

    for shp in shapes:  # times first: FLA autotunes at the timed shapes, the check shapes reuse it
        for seg in segs:
            if deadline and time.time() > deadline:
                res["cells"][key(shp, seg)] = {"error": "not reached (time budget)"}
                continue
            try:
                t = time.time()
                f, fb = _fla_times(torch, triton, fn, shp, seg)
                res["cells"][key(shp, seg)] = {"fwd": f, "fwd_bwd": fb, "path": "Triton kernels"}
                print(f"[fla] {key(shp, seg)}: fwd {f:.3f} ms, fwd+bwd {fb:.3f} ms ({time.time() - t:.0f} s)",
                      flush=True)
            except Exception as e:
                res["cells"][key(shp, seg)] = {"error": repr(e)[:300]}
                traceback.print_exc()
            torch.cuda.empty_cache()
            save()
    checks = {}
    for shp in check_shapes(shapes):
        for seg in segs:
            try:
                for n, x in _fla_check(torch, fn, shp, seg).items():
                    checks[f"{key(shp, seg)}|{n}"] = x
            except Exception as e:
                res.setdefault("check_errors", {})[key(shp, seg)] = repr(e)[:300]
    if check_path:
        np.savez(check_path, **checks)
    save()
    sync.done()


# ----------------------------------------------------------------------------- jla (jax)


def jla_fn(linear_attention, impl="auto"):
    """``f(q, k, v, g, beta, seg) -> o`` through jla's public op."""

    def f(q, k, v, g, beta, seg=None):
        kw = {} if seg is None else {"segment_ids": seg}
        return linear_attention("gated_deltanet", q, k, v, g=g, beta=beta, impl=impl, **kw)[0]

    return f


def jla_path(linear_attention, args, seg):
    """Which jla implementation ``impl="auto"`` runs for these inputs, and why."""
    import jax

    try:
        jax.eval_shape(jla_fn(linear_attention, "mosaic_gpu"), *args, seg)
        return "kernel", "Mosaic GPU kernel"
    except ValueError as e:
        return "fallback", f"FALLBACK: plain-JAX chunked ({str(e).split(': ', 1)[-1][:160]})"


def run_jla(json_path, check_path, shapes, segs, *, peer_path=None, sync=None, budget=None, timeit=None):
    """jla's times at ``shapes`` and its check outputs (jax process)."""
    sync = sync or Sync(None, "jla")
    try:
        if peer_path:
            sys.path.insert(0, peer_path)
        import jax
        import jax.numpy as jnp
        import jla
        from jla.ops import linear_attention
    except Exception as e:
        return _unavailable("jla", json_path, sync, e)
    res = {"impl": f"jla {jla.__version__} linear_attention('gated_deltanet', impl='auto')",
           "jax": jax.__version__, "device": jax.devices()[0].device_kind, "cells": {}}
    fauto = jla_fn(linear_attention)
    loss = lambda *a: jnp.sum(fauto(*a).astype(jnp.float32) ** 2)  # noqa: E731
    fwd = jax.jit(fauto)
    fb = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))

    def dev_args(shp, seed=0):
        xs = gdn_inputs(*shp, seed=seed)
        return [jnp.asarray(x, jnp.bfloat16) for x in xs[:3]] + [jnp.asarray(x) for x in xs[3:]]

    # checks (warm phase: not timed)
    checks = {}
    for shp in check_shapes(shapes):
        args = dev_args(shp, seed=1)
        ct = jnp.asarray(check_cotangent(shp), jnp.bfloat16)
        for seg in segs:
            sg = jnp.asarray(segment_ids(*shp[:2], seed=1)) if seg else None
            try:
                o, pb = jax.vjp(lambda *a, sg=sg: fauto(*a, sg), *args)
                grads = pb(ct.astype(o.dtype))
                for n, x in zip(CHECK_NAMES, (o,) + tuple(grads)):
                    checks[f"{key(shp, seg)}|{n}"] = np.asarray(x.astype(jnp.float32))
                checks[f"{key(shp, seg)}|path"] = np.asarray(jla_path(linear_attention, args, sg)[1])
            except Exception as e:
                res.setdefault("check_errors", {})[key(shp, seg)] = repr(e)[:300]
                print(f"[jla] check {key(shp, seg)} failed: {e!r}"[:600], flush=True)
    if check_path:
        np.savez(check_path, **checks)
    # compile and run each cell once
    cells = []
    for shp in shapes:
        args = dev_args(shp)
        for seg in segs:
            sg = jnp.asarray(segment_ids(*shp[:2])) if seg else None
            kind, path = jla_path(linear_attention, args, sg)
            row = res["cells"][key(shp, seg)] = {"path": path}
            for name, f in (("fwd", fwd), ("fwd_bwd", fb)):
                try:
                    t = time.perf_counter()
                    jax.block_until_ready(f(*args, sg))
                    row[name + "_compile_s"] = time.perf_counter() - t
                    cells.append((shp, seg, name, f, args, sg, kind))
                except Exception as e:
                    row[name + "_error"] = repr(e)[:400]
                    print(f"[jla] {key(shp, seg)} {name} FAILED: {e!r}"[:1500], flush=True)
            print(f"[jla] compiled {key(shp, seg)}: {path}", flush=True)
    sync.warm_done()
    deadline = stop_time(sync.wait_turn(), budget)
    for shp, seg, name, f, args, sg, kind in cells:
        row = res["cells"][key(shp, seg)]
        if deadline and time.time() > deadline:
            row[name + "_error"] = "not reached (time budget)"
            continue
        iters, warm = (20, 2) if kind == "kernel" else (5, 1)
        row[name] = timeit(f, *args, sg, iters=iters, warmup=warm)
        print(f"[jla] {key(shp, seg)} {name}: {row[name]:.3f} ms ({row['path']})", flush=True)
        if json_path:
            with open(json_path, "w") as fh:
                json.dump(res, fh, indent=1)
    if json_path:
        with open(json_path, "w") as fh:
            json.dump(res, fh, indent=1)
    sync.done()


# ----------------------------------------------------------------------------- all in one command


#: role -> (most seconds of its turn, seconds it leaves before the global deadline for those after it)
TURNS = {"fla": (170, 60), "jla": (100, 30), "ours": (None, 10)}  # jla and ours took ~10 s each (H200)


def orchestrate(script, common, *, peers, shapes, folder, budget_s, mem_fraction=0.3):
    """Start the peers' processes and ours (``script`` with ``common`` arguments), then coordinate."""
    os.makedirs(folder, exist_ok=True)
    for f in os.listdir(folder):
        if f.split(".")[0] in ("warm", "go", "done"):
            os.remove(os.path.join(folder, f))
    deadline = time.time() + budget_s
    base = [sys.executable, script, *common, "--sync", folder, "--deadline", f"{deadline:.0f}"]

    def role(r):
        turn, stop = TURNS[r]
        return ["--role", r, "--stop-before", str(stop)] + (["--turn-s", str(turn)] if turn else [])

    jax_env = dict(os.environ)
    jax_env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", str(mem_fraction))  # three processes share the card
    fla_env = dict(os.environ, FLA_CACHE_RESULTS="0")  # no autotune result kept on disk (warm ones are contended)
    procs, order, warm = {}, [], []
    if "fla" in peers:
        hkv = {}
        for i, s in enumerate(shapes):
            hkv.setdefault(tuple(s[2:]), []).append(str(i))
        for j, idx in enumerate(hkv.values()):
            n = f"fla-warm{j}"
            shape_list = ";".join(",".join(map(str, shapes[int(i)])) for i in idx)
            procs[n] = subprocess.Popen(base + ["--role", "fla-warm", "--name", n, "--shape-list", shape_list],
                                        env=fla_env)
            warm.append(n)
        procs["fla"] = subprocess.Popen(base + role("fla"), env=fla_env)
        order.append("fla")
    if "jla" in peers:
        procs["jla"] = subprocess.Popen(base + role("jla"), env=jax_env)
        order.append("jla")
    procs["ours"] = subprocess.Popen(base + role("ours"), env=jax_env)
    order.append("ours")
    warm += order
    try:
        coordinate(folder, warm, order, procs=procs, deadline=deadline,
                   turn_s={r: TURNS[r][0] + 30 for r in order if TURNS[r][0]})
    finally:
        for n, p in procs.items():
            if n == "ours" and p.poll() is None:
                try:
                    p.wait(timeout=max(5.0, deadline + 20 - time.time()))
                except subprocess.TimeoutExpired:
                    pass
            if p.poll() is None:
                p.kill()
    return procs["ours"].returncode
