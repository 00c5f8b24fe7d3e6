"""Per-device memory of a training step from XLA's memory analysis of the compiled step (nothing allocated).

The step is lowered on abstract arrays (the state and a batch of the config's shapes, with their
shardings) and compiled for the visible devices; ``compiled.memory_analysis()`` then gives, per device,
the arguments (parameters, optimizer state, the batch), the outputs (aliased to the arguments: the
state is donated), and XLA's temporaries (activations kept for the backward, gradients, workspace).
What it reports is XLA's plan, not a measured peak: allocator fragmentation and the runtime's own
buffers come on top (a few GB on a GPU).

    python3 benchmarks/memory_plan.py --out $OUT                            # the 7B at 64k, remat full
    python3 benchmarks/memory_plan.py --out $OUT data.seq_len=32768          # one CP=2 shard's tokens
    python benchmarks/memory_plan.py --smoke                                 # CPU check (tiny widths)

Rows go to stdout and ``OUT/memory_plan.json`` (appended, one object per run).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

_FIELDS = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
           "generated_code_size_in_bytes", "peak_memory_in_bytes")


def plan(config: str, overrides: list[str]) -> dict:
    import jax
    import jax.numpy as jnp

    from olmo_hybrid_jax.train.config import load_config
    from olmo_hybrid_jax.train.trainer import Trainer, _abstract_with_shardings

    cfg = load_config(REPO / config if not Path(config).is_absolute() else config, overrides)
    tr = Trainer(cfg)
    abstract = _abstract_with_shardings(tr)
    GB, T = cfg.data.global_batch_size, cfg.data.seq_len
    batch = {k: jax.ShapeDtypeStruct((GB, T), jnp.int32, sharding=tr.batch_sharding)
             for k in ("tokens", "segment_ids", "positions")}
    t0 = time.time()
    compiled = tr.step_fn.lower(abstract, batch).compile()
    compile_s = time.time() - t0
    ma = compiled.memory_analysis()
    stats = {f: getattr(ma, f, None) for f in _FIELDS}
    state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tr.abstract_state))
    n = jax.device_count()
    live = stats["argument_size_in_bytes"] + stats["output_size_in_bytes"] - stats["alias_size_in_bytes"]
    res = {"config": config, "overrides": overrides, "device": jax.devices()[0].device_kind, "devices": n,
           "mesh": dict(tr.mesh.shape), "params": tr.param_count, "layers": tr.mcfg.num_hidden_layers,
           "rows": GB, "seq": T, "remat": cfg.model.remat, "compile_s": compile_s,
           "state_gb_total": state_bytes / 1e9, **{k: v for k, v in stats.items()},
           "plan_gb_per_device": (live + stats["temp_size_in_bytes"]) / 1e9}
    print(f"{tr.param_count / 1e9:.2f}B params, {res['layers']} layers, mesh {res['mesh']}, {GB} x {T} tokens, "
          f"remat {cfg.model.remat}, {res['device']}: arguments {stats['argument_size_in_bytes'] / 1e9:.1f} GB, "
          f"temporaries {stats['temp_size_in_bytes'] / 1e9:.1f} GB, outputs not aliased "
          f"{(stats['output_size_in_bytes'] - stats['alias_size_in_bytes']) / 1e9:.1f} GB -> "
          f"{res['plan_gb_per_device']:.1f} GB a device (XLA's plan; compile {compile_s:.0f} s)", flush=True)
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/7b_long_context.yaml")
    ap.add_argument("--out", default=None)
    ap.add_argument("--smoke", action="store_true", help="tiny widths on CPU: checks the script runs")
    ap.add_argument("override", nargs="*", help="config overrides (key=value)")
    args = ap.parse_args(argv)
    ov = ["train.progress=false", "mesh.context=1", "mesh.fsdp=-1", "data.global_batch_size=1"]
    if args.smoke:
        ov += ["model.preset=tiny", "model.compute_dtype=float32", "data.seq_len=256", "model.gdn_backend=chunked"]
    res = plan(args.config, ov + list(args.override))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "memory_plan.json", "a") as f:
            f.write(json.dumps(res) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
