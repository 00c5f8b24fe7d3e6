"""Training-step throughput and MFU of the JAX trainer, with the HF transformers + FLA peer in the same run.

Cases (bf16 compute, fp32 master weights, skip-step AdamW, chunked CE + z-loss, seq 8192):

- ``8layer``: 7B widths, 8 layers (two 3:1 blocks, 2.44B params, unscanned, remat none), one GPU,
  batch ``--batch`` (1).
  ``--peer`` first times transformers' ``OlmoHybridForCausalLM`` + FLA (``hf_train_step_time`` of
  ``shared/bench/fla_baseline.py``, copied into the git-ignored ``.bench_peer/``) in a subprocess on the
  same card, then ours. The peer times forward+backward only, so ours is reported both as a full
  training step (with the optimizer) and as forward+backward only.
- ``7b``: the full 7B (32 layers, 7.43B params), FSDP over all visible GPUs (``mesh.fsdp=-1``), batch
  ``--batch`` rows per GPU, remat dots (``configs/7b.yaml``).

Several GPUs: ``--devices N`` takes the first N (8layer default 1, so ``--devices 2 mesh.context=2`` is
the context-parallel step of a 64k row; 7b default all). ``--processes N`` runs the case as N JAX
processes of one GPU each (jax.distributed on localhost, as a multi-host launch would), e.g. HSDP
``--processes 4 mesh.data=2 mesh.fsdp=2`` against ``--devices 4`` in one process; process 0 reports.

Every number is the median over ``--steps`` timed steps after ``--warmup`` steps, on synthetic tokens.
MFU uses ``olmo_hybrid_jax.train.flops`` (6N + causal attention + chunked GDN core; no remat counted)
and the device-kind peak table (H100/H200 989 TFLOP/s dense bf16).

    python3 benchmarks/train_bench.py --case 8layer --peer --fla-path /tmp/fla --out $OUT
    python3 benchmarks/train_bench.py --case 7b --out $OUT
    python3 benchmarks/train_bench.py --case 8layer --devices 2 --seq 65536 --remat full mesh.context=2 --out $OUT
    python3 benchmarks/train_bench.py --case 7b --processes 4 --out $OUT mesh.data=2 mesh.fsdp=2
    python benchmarks/train_bench.py --smoke          # CPU check of the script itself (tiny widths)

Results go to stdout and ``OUT/train_bench_<case>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

PEER_SNIPPET = """
import json, sys
sys.path.insert(0, {peer_dir!r})
import fla_baseline as fb
fb.lift_hopper_guard()  # FLA's gated backward guard on Hopper + Triton < 3.7.1: lifted for TIMING only
import torch
r = fb.hf_train_step_time(num_layers={layers}, batch={batch}, seq={seq})
r["device"] = torch.cuda.get_device_name(0)
r["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 1e9
print("PEER" + json.dumps(r))
"""


def run_peer(args) -> dict | None:
    peer_dir = REPO / ".bench_peer"
    if not (peer_dir / "fla_baseline.py").is_file():
        print("peer: .bench_peer/fla_baseline.py not found (copy shared/bench/fla_baseline.py there); skipped")
        return None
    env = dict(os.environ)
    if args.fla_path:
        env["PYTHONPATH"] = args.fla_path + os.pathsep + env.get("PYTHONPATH", "")
    code = PEER_SNIPPET.format(peer_dir=str(peer_dir), layers=args.layers, batch=args.batch, seq=args.seq)
    t = time.time()
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if p.returncode != 0 or "PEER" not in p.stdout:
        print(f"peer failed ({p.returncode}):\n{p.stderr[-3000:]}")
        return None
    r = json.loads(p.stdout.split("PEER", 1)[1])
    r["wall_s"] = time.time() - t
    print(f"peer (HF transformers + FLA, fwd+bwd, no optimizer): {r['ms']:.1f} ms/step, "
          f"{r['tokens_per_s']:,.0f} tok/s, {r['params'] / 1e9:.2f}B params, {r['device']}", flush=True)
    return r


def overrides_for(args) -> list[str]:
    ov = [f"data.seq_len={args.seq}", "train.progress=false", f"model.remat={args.remat}",
          f"train.loss_chunk={args.loss_chunk}", "optim.warmup_steps=10", "optim.decay_steps=1000"]
    if args.case == "8layer":  # unscanned: 2 blocks gain no compile time from a scan, which costs its residual copies
        ov += ["model.overrides.num_hidden_layers=8", "mesh.fsdp=1", f"data.global_batch_size={args.batch}",
               "model.scan_layers=false"]
    if args.smoke:
        ov += ["model.preset=tiny", "model.compute_dtype=float32", "model.gdn_backend=sequential"]
    return ov + list(args.override)


def median_time(fn, warmup: int, steps: int) -> list[float]:
    import jax

    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return times


def run_ours(args) -> dict:
    import jax
    import numpy as np

    from olmo_hybrid_jax.train.config import load_config
    from olmo_hybrid_jax.train.trainer import Trainer

    devices = jax.devices()
    if args.devices is not None:
        if args.devices > len(devices):
            raise SystemExit(f"--devices {args.devices}: only {len(devices)} visible ({devices[0].platform})")
        devices = devices[:args.devices]
    elif args.case == "8layer" and args.processes == 1:
        devices = devices[:1]
    ndev = len(devices)
    ov = overrides_for(args)
    if args.case == "7b":  # before the command line's overrides, which may set it (e.g. rows per context group)
        ov.insert(len(ov) - len(args.override), f"data.global_batch_size={args.batch * ndev}")
    cfg = load_config(REPO / args.config, ov)
    tr = Trainer(cfg, devices=devices)
    GB, T = cfg.data.global_batch_size, cfg.data.seq_len
    print(f"ours: {tr.param_count / 1e9:.2f}B params, {tr.mcfg.num_hidden_layers} layers "
          f"({'scanned' if tr.scanned else 'list'}), mesh {dict(tr.mesh.shape)}, batch {GB} x {T}, remat "
          f"{cfg.model.remat}, GDN backend {cfg.model.gdn_backend}, {jax.devices()[0].device_kind}", flush=True)
    t0 = time.time()
    state = tr.init_state()
    jax.block_until_ready(state)
    init_s = time.time() - t0
    rng = np.random.default_rng(0)
    rows = GB // jax.process_count()  # this process's rows (device_batch takes the process-local slice)
    tokens = rng.integers(0, tr.mcfg.vocab_size - 1, (rows, T), dtype=np.int32)
    host = {"tokens": tokens, "segment_ids": np.zeros_like(tokens),
            "positions": np.tile(np.arange(T, dtype=np.int32), (rows, 1))}
    batch = tr.device_batch(host)
    t0 = time.time()
    compiled = tr.step_fn.lower(state, batch).compile()
    compile_s = time.time() - t0
    holder = {"state": state}

    def step():
        holder["state"], m = compiled(holder["state"], batch)
        return m

    times = median_time(step, args.warmup, args.steps)
    loss = float(jax.device_get(step()["loss"]))
    prof = None
    if args.profile:
        from benchmarks.profile_ops import format_summary, profile_ops

        log_dir = Path("/tmp") / f"olmo_hybrid_trace_{args.case}_{os.getpid()}"  # traces are large: not in OUT
        prof = profile_ops(step, args.profile, log_dir, hlo_text=compiled.as_text())
        print(format_summary(prof), flush=True)
    step_s = statistics.median(times)
    res = {"case": args.case, "device": jax.devices()[0].device_kind, "devices": ndev,
           "processes": jax.process_count(), "params": tr.param_count,
           "batch": GB, "seq": T, "remat": cfg.model.remat, "mesh": dict(tr.mesh.shape), "init_s": init_s,
           "compile_s": compile_s, "step_ms": 1e3 * step_s, "step_ms_all": [1e3 * t for t in times],
           "tokens_per_s": GB * T / step_s, "tokens_per_s_per_device": GB * T / step_s / ndev,
           "flops_per_token": tr.flops_per_token, "peak_flops_per_device": tr.peak, "final_loss": loss}
    if prof is not None:
        res["profile"] = prof
    res["mfu"] = (res["tokens_per_s_per_device"] * tr.flops_per_token / tr.peak) if tr.peak else None
    del holder["state"], state
    if args.fwd_bwd:  # forward + backward only, the peer's measure
        fresh = tr.init_state()
        grad_fn = jax.jit(jax.value_and_grad(lambda p, b: tr.loss_fn(p, b)[0]),
                          in_shardings=(tr.state_sharding["params"], None))
        p = fresh["params"]
        times = median_time(lambda: grad_fn(p, batch), args.warmup, args.steps)
        res["fwd_bwd_ms"] = 1e3 * statistics.median(times)
        res["fwd_bwd_tokens_per_s"] = GB * T / statistics.median(times)
        del fresh, p
    try:
        res["peak_mem_gb"] = jax.local_devices()[0].memory_stats()["peak_bytes_in_use"] / 1e9
    except Exception:  # noqa: BLE001  (CPU has no memory stats)
        res["peak_mem_gb"] = None
    mfu = f"{100 * res['mfu']:.1f}%" if res["mfu"] is not None else "n/a"
    print(f"ours: step {res['step_ms']:.1f} ms, {res['tokens_per_s']:,.0f} tok/s, "
          f"{res['tokens_per_s_per_device']:,.0f} tok/s/device, MFU {mfu}, compile {compile_s:.0f}s, "
          f"peak mem {res['peak_mem_gb']} GB", flush=True)
    if "fwd_bwd_ms" in res:
        print(f"ours fwd+bwd only: {res['fwd_bwd_ms']:.1f} ms, {res['fwd_bwd_tokens_per_s']:,.0f} tok/s", flush=True)
    return res


def launch_processes(args, argv: list[str]) -> int:
    """Run this script as ``args.processes`` JAX processes on localhost, one GPU each (CUDA_VISIBLE_DEVICES),
    or on CPU for --smoke (one emulated device each, gloo collectives); process 0's output is shown."""
    import socket
    import tempfile

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    n = args.processes
    procs = []
    for i in range(n):
        env = dict(os.environ, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(n),
                   JAX_PROCESS_ID=str(i), PYTHONUNBUFFERED="1")
        if args.smoke:
            env.update(JAX_PLATFORMS="cpu", JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
                       XLA_FLAGS="--xla_force_host_platform_device_count=1")
        else:  # the i-th of the GPUs this launcher sees
            visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
            if visible and len(visible) < n:
                raise SystemExit(f"--processes {n}: CUDA_VISIBLE_DEVICES lists only {len(visible)} GPUs")
            env["CUDA_VISIBLE_DEVICES"] = visible[i] if visible else str(i)
        # the others print the same; their stderr goes to a file (a pipe nobody reads would block them)
        err = None if i == 0 else tempfile.TemporaryFile("w+")
        procs.append((subprocess.Popen([sys.executable, __file__, *argv, "--worker"], env=env,
                                       stdout=None if i == 0 else subprocess.DEVNULL, stderr=err, text=True), err))
    rcs = [p.wait() for p, _ in procs]
    bad = [i for i, rc in enumerate(rcs) if rc != 0]
    for i in bad[:2]:
        if procs[i][1] is not None:
            procs[i][1].seek(0)
            print(f"process {i} of {n} ended with {rcs[i]}:\n{procs[i][1].read()[-3000:]}", file=sys.stderr)
    if bad:
        print(f"train_bench: processes {bad} of {n} failed (exit codes {[rcs[i] for i in bad]})", file=sys.stderr)
        return 1
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--case", choices=["8layer", "7b"], default="8layer")
    ap.add_argument("--peer", action="store_true", help="time HF transformers + FLA first (1-GPU case)")
    ap.add_argument("--fla-path", default=None, help="where the FLA wheels were unpacked (PYTHONPATH for the peer)")
    ap.add_argument("--batch", type=int, default=1, help="rows (8layer) or rows per device (7b)")
    ap.add_argument("--seq", type=int, default=8192)
    ap.add_argument("--layers", type=int, default=8, help="peer depth (8layer case)")
    ap.add_argument("--remat", default=None, help="none | full | dots | dots_no_batch (default: none for "
                                                  "8layer, dots for 7b)")
    ap.add_argument("--loss-chunk", type=int, default=1024)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--no-fwd-bwd", dest="fwd_bwd", action="store_false", help="skip the fwd+bwd-only timing")
    ap.add_argument("--profile", type=int, default=0, help="profile N full steps (jax.profiler) and print "
                                                              "device time by named scope and kernel")
    ap.add_argument("--config", default="configs/7b.yaml", help="the recipe the case starts from (e.g. "
                    "configs/7b_long_context.yaml: 64k rows, context=2)")
    ap.add_argument("--devices", type=int, default=None, help="use the first N devices (8layer: 1, 7b: all)")
    ap.add_argument("--processes", type=int, default=1, help="run as N JAX processes of one GPU each (localhost)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # one of --processes' children
    ap.add_argument("--out", default=None)
    ap.add_argument("--smoke", action="store_true", help="tiny widths on CPU: checks the script runs")
    ap.add_argument("override", nargs="*", help="extra config overrides (key=value)")
    args = ap.parse_intermixed_args(argv)
    if args.processes < 1 or (args.devices is not None and args.devices < 1):
        ap.error("--processes and --devices must be >= 1")
    if args.processes > 1 and not args.worker:
        return launch_processes(args, sys.argv[1:] if argv is None else list(argv))
    if args.worker:
        from olmo_hybrid_jax.train.sharding import maybe_initialize_distributed

        maybe_initialize_distributed()  # the launcher's JAX_* variables; before any other JAX call
    if args.remat is None:
        args.remat = "none" if args.case == "8layer" else "dots"  # 51.9 / 60.7 GB peak (H200, 2026-11-26)
    if args.smoke:
        args.seq, args.warmup, args.steps = 128, 1, 2
    os.environ.setdefault("XLA_FLAGS", "--xla_gpu_enable_latency_hiding_scheduler=true")
    if args.profile:  # every kernel launched alone, so the trace names its HLO op (timings then include launches)
        os.environ["XLA_FLAGS"] += " --xla_gpu_enable_command_buffer="
    result = {"args": vars(args), "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    if args.peer and args.case == "8layer" and not args.worker:
        result["peer"] = run_peer(args)  # before JAX touches the GPU
    result["ours"] = run_ours(args)
    import jax

    if jax.process_index() != 0:  # every process timed the same steps; process 0 reports them
        return 0
    peer, ours = result.get("peer"), result["ours"]
    if peer:
        result["speedup_step_vs_peer"] = ours["tokens_per_s"] / peer["tokens_per_s"]
        line = f"ours (full step) / peer (fwd+bwd): {result['speedup_step_vs_peer']:.2f}x"
        if "fwd_bwd_tokens_per_s" in ours:
            result["speedup_fwd_bwd_vs_peer"] = ours["fwd_bwd_tokens_per_s"] / peer["tokens_per_s"]
            line += f"; fwd+bwd / fwd+bwd: {result['speedup_fwd_bwd_vs_peer']:.2f}x"
        print(line)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        p = Path(args.out) / f"train_bench_{args.case}.json"
        p.write_text(json.dumps(result, indent=2))
        print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
