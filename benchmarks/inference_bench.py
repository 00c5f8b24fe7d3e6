"""Long-context inference: the hybrid (3 GDN : 1 attention) against the same model with every layer attention.

    PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 python benchmarks/inference_bench.py --out DIR
    python benchmarks/inference_bench.py --smoke          # CPU: tiny widths, short contexts (checks the flow)

For each model (7B widths, 32 layers, random bf16 weights, bf16 compute) and each context C (8k, 32k, 64k
total = prompt of C - 256 tokens + 256 generated):

- prefill: one row through ``generate``'s jitted prefill (fresh cache, fused causal attention, the GDN
  chunked/Pallas kernel from a zero state, last-position logits only); tokens/s = prompt / median time.
- decode: 256 greedy tokens for that row from the real prefilled cache, through ``generate``'s decode
  ``while_loop`` (one compiled loop, no per-token dispatch); tokens/s = 256 / time.
- end-to-end at the largest context, at the largest batch that fits next to a one-row prefill (what
  ``generate(..., prefill_batch_size=1)`` holds at its peak: the batch cache, the weights and one row's
  prefill; sized from XLA's memory analysis of the compiled prefill): time = B x (one-row prefill) +
  (decode of 256 tokens for B rows). The decode runs for real at B rows, from a cache filled with random
  values (same shapes, same bytes moved as a prefilled one; decode cost does not depend on the values).
  Throughput = B x (prompt + 256) / time; the ratio hybrid / all-attention is the acceptance number
  (>= 1.75x at 64k).

Weights are random (``random_like``: N(0, 0.02) matrices, unit norms), made leaf by leaf on the device.
Every executable is compiled ahead of time from abstract shapes, several at once in threads (XLA
compiles in C++ without the GIL), so compile time stays out of the timings and off the critical path.
The all-attention model is built from the same config with ``layer_types`` all "full_attention" (the
config refuses that on purpose, so a subclass skips that one check); it has fewer parameters (no GDN
projections), which favours the baseline.

Writes ``inference_bench.json`` and a markdown table under --out; prints the table last.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import dataclasses
import functools
import gc
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from olmo_hybrid_jax.cache import cache_shapes  # noqa: E402
from olmo_hybrid_jax.config import FULL, OlmoHybridConfig  # noqa: E402
from olmo_hybrid_jax.generate import Sampling, decode_loop, prefill_rows  # noqa: E402
from olmo_hybrid_jax.model import OlmoHybridForCausalLM  # noqa: E402

GiB = 1024 ** 3


class AllAttentionConfig(OlmoHybridConfig):
    """The baseline: same widths, every layer full attention. The hybrid config refuses a model without a GDN
    layer on purpose; this subclass skips validation (its fields come from the validated hybrid config)."""

    def validate(self) -> None:
        pass


def model_configs(args) -> dict[str, OlmoHybridConfig]:
    if args.smoke:
        base = OlmoHybridConfig.preset("tiny").replace(num_hidden_layers=8, layer_types=None, vocab_size=512)
    else:
        base = OlmoHybridConfig.preset(args.preset)
        if args.layers != base.num_hidden_layers:
            base = base.replace(num_hidden_layers=args.layers, layer_types=None)
    base = base.replace(max_position_embeddings=max(base.max_position_embeddings, max(args.contexts)))
    fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(base)}
    fields["layer_types"] = (FULL,) * base.num_hidden_layers
    return {"hybrid": base, "all_attention": AllAttentionConfig(**fields)}


def abstract_model(cfg, dtype, backend):
    m = nnx.eval_shape(lambda: OlmoHybridForCausalLM(cfg, rngs=nnx.Rngs(0), param_dtype=dtype, dtype=dtype,
                                                     gdn_backend=backend))
    return nnx.split(m)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _normal(key, shape, dtype):
    return jax.random.normal(key, shape, jnp.float32).astype(dtype)


def random_like(tree, seed=0, std=0.02):
    """Random values for every array leaf of an abstract tree: N(0, std) for matrices, ones for norm weights,
    A_log = log(4), dt_bias = -2 (mild decay). One small jitted generator per distinct shape: building
    the 7B through one jitted constructor took 147 s of compile on the H200 (2026-11-26), this takes seconds.
    """
    key = jax.random.key(seed)
    counter = [0]

    def leaf(path, x):
        name = jax.tree_util.keystr(path)
        counter[0] += 1
        if "norm" in name:
            return jnp.ones(x.shape, x.dtype)
        if "A_log" in name:
            return jnp.full(x.shape, np.log(4.0), x.dtype)
        if "dt_bias" in name:
            return jnp.full(x.shape, -2.0, x.dtype)
        if not jnp.issubdtype(x.dtype, jnp.floating):
            return jnp.zeros(x.shape, x.dtype)
        r = _normal(jax.random.fold_in(key, counter[0]), tuple(x.shape), jnp.dtype(x.dtype))
        return r * jnp.asarray(std, x.dtype) if x.ndim >= 2 else r

    out = jax.tree_util.tree_map_with_path(leaf, tree)
    jax.block_until_ready(out)
    return out


def real_state(abstract_state, seed=0):
    return random_like(abstract_state, seed)


def nbytes(tree) -> int:
    return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def mem_of(compiled) -> dict:
    try:
        ma = compiled.memory_analysis()
        d = {k: int(getattr(ma, k)) for k in ("argument_size_in_bytes", "output_size_in_bytes",
                                              "alias_size_in_bytes", "temp_size_in_bytes")}
        d["peak_bytes"] = (d["argument_size_in_bytes"] + d["output_size_in_bytes"] - d["alias_size_in_bytes"]
                           + d["temp_size_in_bytes"])
        return d
    except Exception as e:  # memory analysis is best effort
        return {"error": repr(e)}


# ----------------------------------------------------------------------------------------- compile
def lower_prefill(gd, ast, cfg, P, L, dtype):
    ids = jax.ShapeDtypeStruct((1, P), jnp.int32)
    return prefill_rows.lower(gd, ast, ids, None, None, 0, logits_to_keep=1, rows=1, max_len=L,
                               cache_dtype=jnp.dtype(dtype))


def decode_carry_shapes(cfg, B, L, n_new, dtype):
    return dict(cache=cache_shapes(cfg, B, L, dtype), logits=jax.ShapeDtypeStruct((B, cfg.vocab_size), jnp.float32),
                out=jax.ShapeDtypeStruct((B, n_new), jnp.int32), step=jax.ShapeDtypeStruct((), jnp.int32),
                done=jax.ShapeDtypeStruct((B,), bool), key=jax.eval_shape(lambda: jax.random.key(0)))


def lower_decode(gd, ast, cfg, B, L, n_new, dtype):
    return decode_loop.lower(gd, ast, decode_carry_shapes(cfg, B, L, n_new, dtype), jax.ShapeDtypeStruct((), jnp.int32),
                         sampling=Sampling(), eos=(), pad=0)


def compile_all(jobs: dict, threads: int) -> dict:
    """jobs: name -> zero-arg function returning a Lowered. Lowers serially (Python), compiles in threads."""
    lowered, out = {}, {}
    for name, fn in jobs.items():
        t0 = time.perf_counter()
        try:
            lowered[name] = (fn(), time.perf_counter() - t0)
        except Exception as e:
            out[name] = dict(error=f"lowering failed: {e!r}", traceback=traceback.format_exc(limit=8))
            print(f"  [lower FAILED] {name}: {e!r}", flush=True)

    def comp(name):
        low, tl = lowered[name]
        t0 = time.perf_counter()
        c = low.compile()
        return name, c, tl, time.perf_counter() - t0

    with cf.ThreadPoolExecutor(max_workers=max(1, threads)) as ex:
        futs = {ex.submit(comp, n): n for n in lowered}
        for f in cf.as_completed(futs):
            n = futs[f]
            try:
                name, c, tl, tc = f.result()
                out[name] = dict(compiled=c, lower_s=tl, compile_s=tc, memory=mem_of(c))
                print(f"  compiled {name}: lower {tl:.1f}s compile {tc:.1f}s", flush=True)
            except Exception as e:
                out[n] = dict(error=f"compile failed: {e!r}", traceback=traceback.format_exc(limit=8))
                print(f"  [compile FAILED] {n}: {e!r}", flush=True)
    return out


# ----------------------------------------------------------------------------------------- run
def random_cache(cfg, B, L, P, dtype, seed=0):
    """A B-row cache with P filled slots of random values (KV ~ N(0, 1), conv windows ~ N(0, 1), state ~ 0.05 N)."""
    cache = random_like(cache_shapes(cfg, B, L, dtype), seed, std=1.0)
    layers = tuple(dataclasses.replace(c, state=c.state * 0.05) if hasattr(c, "state") else c for c in cache.layers)
    cache = dataclasses.replace(cache, layers=layers, key_mask=jnp.zeros((B, L), bool).at[:, :P].set(True),
                                length=jnp.asarray(P, jnp.int32), positions=jnp.full((B,), P, jnp.int32))
    jax.block_until_ready(cache)
    return cache


def timed(fn, reps):
    """Median wall time of ``fn`` (blocked on its result); keeps no reference to the outputs."""
    ts = []
    for _ in range(reps):
        gc.collect()
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts)), ts


def run_model(kind, cfg, gd, ast, compiled, args, dtype, backend, res):
    print(f"\n== {kind}: building random weights ({backend} GDN backend)", flush=True)
    t0 = time.perf_counter()
    state = real_state(ast)
    res["weights_bytes"] = nbytes(state)
    res["build_s"] = time.perf_counter() - t0
    n_new = args.new_tokens
    rng = np.random.default_rng(0)
    for C in args.contexts:
        P = C - n_new
        row = res["contexts"].setdefault(str(C), {"prompt": P})
        pre = compiled.get(f"{kind}/prefill/{C}", {})
        dec = compiled.get(f"{kind}/decode1/{C}", {})
        if "compiled" not in pre:
            row["prefill_error"] = pre.get("error", "not compiled")
            continue
        ids = jnp.asarray(rng.integers(2, cfg.vocab_size - 2, (1, P)), jnp.int32)
        reps = args.reps if C <= 32768 else max(1, args.reps - 1)
        holder = {}

        def do_prefill(holder=holder, pre=pre, ids=ids, state=state):
            holder.clear()
            holder["out"] = pre["compiled"](gd, state, ids, None, None, 0)
            return holder["out"]
        try:
            do_prefill()  # warm-up run (first-execution setup stays out of the timing)
            jax.block_until_ready(holder["out"])
            med, ts = timed(do_prefill, reps)
        except Exception as e:
            row["prefill_error"] = repr(e)
            print(f"  prefill {C}: FAILED {e!r}", flush=True)
            holder.clear()
            continue
        row.update(prefill_s=med, prefill_runs_s=ts, prefill_tok_s=P / med)
        print(f"  prefill C={C}: {med:.3f}s  {P / med:,.0f} tok/s  (runs {[f'{t:.3f}' for t in ts]})", flush=True)
        logits, cache = holder.pop("out")
        if "compiled" not in dec:
            row["decode_error"] = dec.get("error", "not compiled")
            del logits, cache
            continue
        carry = dict(cache=cache, logits=logits[:, -1].astype(jnp.float32), out=jnp.zeros((1, n_new), jnp.int32),
                     step=jnp.zeros((), jnp.int32), done=jnp.zeros((1,), bool), key=jax.random.key(0))
        del logits, cache
        try:
            carry = dec["compiled"](gd, state, carry, jnp.int32(1))  # warm-up: the first token
            jax.block_until_ready(carry)
            t0 = time.perf_counter()
            out = dec["compiled"](gd, state, carry, jnp.int32(n_new))
            jax.block_until_ready(out)
            dt = time.perf_counter() - t0
            steps = int(out["step"]) - 1
            row.update(decode_b1_s=dt, decode_b1_tok_s=steps / dt, decode_b1_ms_per_token=1e3 * dt / steps)
            print(f"  decode  C={C} B=1: {steps} tokens in {dt:.3f}s = {steps / dt:,.1f} tok/s "
                  f"({1e3 * dt / steps:.2f} ms/token)", flush=True)
            del out
        except Exception as e:
            row["decode_error"] = repr(e)
            print(f"  decode {C}: FAILED {e!r}", flush=True)
        carry = None
        gc.collect()

    # end-to-end at the largest context and batch
    C = max(args.contexts)
    P = C - n_new
    e2e = res.setdefault("e2e", {"context": C})
    B = res.get("batch_max")
    dec = compiled.get(f"{kind}/decodeB/{C}", {})
    pre_s = res["contexts"].get(str(C), {}).get("prefill_s")
    if B and "compiled" in dec and pre_s:
        try:
            cache = random_cache(cfg, B, C, P, dtype)
            carry = dict(cache=cache, logits=jnp.asarray(rng.standard_normal((B, cfg.vocab_size)), jnp.float32),
                         out=jnp.zeros((B, n_new), jnp.int32), step=jnp.zeros((), jnp.int32),
                         done=jnp.zeros((B,), bool), key=jax.random.key(1))
            del cache
            carry = dec["compiled"](gd, state, carry, jnp.int32(1))  # warm-up: the first token
            jax.block_until_ready(carry)
            t0 = time.perf_counter()
            out = dec["compiled"](gd, state, carry, jnp.int32(n_new))
            jax.block_until_ready(out)
            dt1 = time.perf_counter() - t0
            steps = int(out["step"]) - 1
            del out, carry
            dt = dt1 * n_new / steps  # all n_new tokens at the measured per-step rate
            total = B * pre_s + dt
            e2e.update(batch=B, prefill_s_per_row=pre_s, decode_s=dt, decode_tok_s=B * steps / dt,
                       decode_ms_per_step=1e3 * dt / steps, total_s=total,
                       throughput_tok_s=B * (P + steps) / total, generated_tok_s=B * steps / total)
            print(f"  e2e C={C} B={B}: {B} x {pre_s:.3f}s prefill + {dt:.3f}s decode ({1e3 * dt / steps:.2f} ms/step)"
                  f" = {total:.2f}s -> {B * (P + steps) / total:,.0f} tok/s", flush=True)
        except Exception as e:
            e2e["error"] = repr(e)
            print(f"  e2e: FAILED {e!r}", flush=True)
    else:
        e2e["error"] = f"missing pieces: batch={B}, decode={'compiled' in dec}, prefill_s={pre_s}"
    del state
    gc.collect()


def _rerun_hybrid_chunked(kind, cfg, failed, results, graph, compiled, args, dtype, C_max):
    """The fast GDN backend compiled but failed to run: redo the hybrid on the plain-XLA chunked form."""
    print(f"!! hybrid prefill failed at {failed} with {results['gdn_backend']!r}; rerunning on 'chunked'", flush=True)
    results["backend_fallback"] = results["models"][kind]["contexts"][failed[0]]["prefill_error"]
    backend = results["gdn_backend"] = "chunked"
    graph[kind] = abstract_model(cfg, dtype, backend)
    gd, ast = graph[kind]
    B = results["models"][kind]["batch_max"]
    jobs = {}
    for C in args.contexts:
        jobs[f"{kind}/prefill/{C}"] = (lambda C=C: lower_prefill(gd, ast, cfg, C - args.new_tokens, C, dtype))
        jobs[f"{kind}/decode1/{C}"] = (lambda C=C: lower_decode(gd, ast, cfg, 1, C, args.new_tokens, dtype))
    if B >= 1:
        jobs[f"{kind}/decodeB/{C_max}"] = lambda: lower_decode(gd, ast, cfg, B, C_max, args.new_tokens, dtype)
    compiled.update(compile_all(jobs, args.threads))
    results["models"][kind] = {k: v for k, v in results["models"][kind].items() if k not in ("e2e",)}
    results["models"][kind]["contexts"] = {}
    run_model(kind, cfg, gd, ast, compiled, args, dtype, backend, results["models"][kind])
    return backend


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "out/inference_bench"))
    ap.add_argument("--preset", default="olmo_hybrid_7b")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--contexts", default="8192,32768,65536")
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=8, help="parallel XLA compiles")
    ap.add_argument("--gdn-backend", default="auto")
    ap.add_argument("--margin-gib", type=float, default=3.0, help="memory left free when sizing the batch")
    ap.add_argument("--batch", type=int, default=None, help="force the end-to-end batch (default: largest that fits)")
    ap.add_argument("--models", default="hybrid,all_attention")
    ap.add_argument("--smoke", action="store_true", help="tiny CPU run of the whole flow")
    args = ap.parse_args(argv)
    if args.smoke:
        args.contexts = "96,160"
        args.new_tokens = 16
        args.reps = 2
    args.contexts = [int(c) for c in str(args.contexts).split(",")]
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    dtype = jnp.bfloat16
    dev = jax.devices()[0]
    stats = dev.memory_stats() or {}
    limit = int(stats.get("bytes_limit", 8 * GiB if args.smoke else 0)) or 16 * GiB
    info = dict(date=time.strftime("%Y-%m-%d"), device=str(getattr(dev, "device_kind", dev.platform)),
                platform=dev.platform, jax=jax.__version__, python=platform.python_version(),
                bytes_limit=limit, args={k: v for k, v in vars(args).items()})
    print(f"device {info['device']} ({dev.platform}), jax {jax.__version__}, memory limit {limit / GiB:.1f} GiB",
          flush=True)
    cfgs = {k: v for k, v in model_configs(args).items() if k in args.models.split(",")}
    results = {"info": info, "models": {}}
    C_max = max(args.contexts)

    # Resolve the GDN backend once: try the requested one on the largest prefill, fall back to "chunked".
    backend = args.gdn_backend
    graph = {}
    for kind, cfg in cfgs.items():
        graph[kind] = abstract_model(cfg, dtype, backend)
        res = results["models"].setdefault(kind, {"contexts": {}})
        res["params"] = nbytes(graph[kind][1]) // 2
        res["layer_types"] = "".join("G" if t != FULL else "A" for t in cfg.layer_types)
        res["cache_bytes_per_row"] = {str(C): nbytes(cache_shapes(cfg, 1, C, dtype)) for C in args.contexts}

    t_all = time.perf_counter()
    print("\n-- compiling (wave 1: prefills and one-row decodes)", flush=True)
    jobs = {}
    for kind, cfg in cfgs.items():
        gd, ast = graph[kind]
        for C in args.contexts:
            P = C - args.new_tokens
            jobs[f"{kind}/prefill/{C}"] = (lambda gd=gd, ast=ast, cfg=cfg, P=P, C=C:
                                           lower_prefill(gd, ast, cfg, P, C, dtype))
            jobs[f"{kind}/decode1/{C}"] = (lambda gd=gd, ast=ast, cfg=cfg, C=C:
                                           lower_decode(gd, ast, cfg, 1, C, args.new_tokens, dtype))
    compiled = compile_all(jobs, args.threads)
    hyb_pre = compiled.get(f"hybrid/prefill/{C_max}", {})
    if "hybrid" in cfgs and "error" in hyb_pre and backend != "chunked":
        print(f"!! hybrid prefill failed to compile with gdn backend {backend!r}; retrying with 'chunked'", flush=True)
        results["backend_fallback"] = hyb_pre["error"]
        backend = "chunked"
        graph["hybrid"] = abstract_model(cfgs["hybrid"], dtype, backend)
        gd, ast = graph["hybrid"]
        jobs = {}
        for C in args.contexts:
            P = C - args.new_tokens
            jobs[f"hybrid/prefill/{C}"] = (lambda P=P, C=C: lower_prefill(gd, ast, cfgs["hybrid"], P, C, dtype))
            jobs[f"hybrid/decode1/{C}"] = (lambda C=C: lower_decode(gd, ast, cfgs["hybrid"], 1, C, args.new_tokens,
                                                                    dtype))
        compiled.update(compile_all(jobs, args.threads))
    results["gdn_backend"] = backend

    print("\n-- sizing the end-to-end batch and compiling (wave 2)", flush=True)
    jobs = {}
    margin = int(args.margin_gib * GiB) if not args.smoke else 0
    for kind, cfg in cfgs.items():
        res = results["models"][kind]
        row = res["cache_bytes_per_row"][str(C_max)]
        pre = compiled.get(f"{kind}/prefill/{C_max}", {})
        peak = pre.get("memory", {}).get("peak_bytes")
        if args.batch:
            B = args.batch
        elif peak:
            B = min(int((limit - peak - margin) // row), 4 if args.smoke else 256)
        else:
            B = 0
        res["prefill_peak_bytes"] = peak
        res["batch_max"] = max(B, 0)
        print(f"  {kind}: weights {nbytes(graph[kind][1]) / GiB:.1f} GiB, cache/row at {C_max}: {row / GiB:.2f} GiB, "
              f"prefill peak {0 if not peak else peak / GiB:.1f} GiB -> batch {B}", flush=True)
        if B >= 1:
            gd, ast = graph[kind]
            jobs[f"{kind}/decodeB/{C_max}"] = (lambda gd=gd, ast=ast, cfg=cfg, B=B:
                                               lower_decode(gd, ast, cfg, B, C_max, args.new_tokens, dtype))
    compiled.update(compile_all(jobs, args.threads))
    for kind in cfgs:
        d = compiled.get(f"{kind}/decodeB/{C_max}", {}).get("memory", {})
        if "peak_bytes" in d:
            results["models"][kind]["decodeB_peak_bytes"] = d["peak_bytes"]
    results["compile_wall_s"] = time.perf_counter() - t_all

    for kind, cfg in cfgs.items():
        run_model(kind, cfg, *graph[kind], compiled, args, dtype, backend if kind == "hybrid" else "-",
                  results["models"][kind])
        failed = [C for C, r in results["models"][kind]["contexts"].items() if "prefill_error" in r]
        if kind == "hybrid" and failed and backend != "chunked":
            try:
                backend = _rerun_hybrid_chunked(kind, cfg, failed, results, graph, compiled, args, dtype, C_max)
            except Exception as e:
                print(f"!! fallback failed: {e!r}", flush=True)
        (out_dir / "inference_bench.json").write_text(json.dumps(results, indent=2, default=str))

    results["compile"] = {k: {kk: vv for kk, vv in v.items() if kk != "compiled"} for k, v in compiled.items()}
    table = summarize(results, args)
    (out_dir / "inference_bench.md").write_text(table)
    (out_dir / "inference_bench.json").write_text(json.dumps(results, indent=2, default=str))
    print("\n" + table, flush=True)
    return 0


def summarize(results, args) -> str:
    info = results["info"]
    lines = [f"{info['device']}, jax {info['jax']}, {info['date']}, bf16, GDN backend {results.get('gdn_backend')}",
             "", "| model | context | prefill tok/s (B=1) | decode tok/s (B=1) | decode ms/token |",
             "|---|---|---|---|---|"]
    for kind, res in results["models"].items():
        for C, row in res["contexts"].items():
            lines.append(f"| {kind} | {C} | {row.get('prefill_tok_s', float('nan')):,.0f} | "
                         f"{row.get('decode_b1_tok_s', float('nan')):,.1f} | "
                         f"{row.get('decode_b1_ms_per_token', float('nan')):.2f} |")
    lines += ["", "| model | context | batch | prefill s/row | decode s (256 tok) | total s | tok/s (prompt+gen) |",
              "|---|---|---|---|---|---|---|"]
    thr = {}
    for kind, res in results["models"].items():
        e = res.get("e2e", {})
        if "throughput_tok_s" in e:
            thr[kind] = e["throughput_tok_s"]
            lines.append(f"| {kind} | {e['context']} | {e['batch']} | {e['prefill_s_per_row']:.3f} | "
                         f"{e['decode_s']:.3f} | {e['total_s']:.2f} | {e['throughput_tok_s']:,.0f} |")
        else:
            lines.append(f"| {kind} | {e.get('context')} | - | - | - | - | {e.get('error', 'n/a')} |")
    if "hybrid" in thr and "all_attention" in thr:
        r = thr["hybrid"] / thr["all_attention"]
        results["e2e_ratio"] = r
        lines += ["", f"hybrid / all-attention end-to-end throughput at {max(args.contexts)}: **{r:.2f}x** "
                      f"(target >= 1.75x)"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
