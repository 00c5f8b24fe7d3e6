"""Train OLMo Hybrid: ``python -m olmo_hybrid_jax.train``, the ``olmo-hybrid-train`` script, or ``python train.py``.

    python -m olmo_hybrid_jax.train --config tiny.yaml --steps 40 --out runs/tiny
    python -m olmo_hybrid_jax.train --config tiny.yaml --steps 80 --out runs/tiny --resume     # continue to step 80
    python -m olmo_hybrid_jax.train --config 7b.yaml optim.lr=2e-4 mesh.data=2 data.paths=[/data/a.npy]

``--config`` takes a YAML path; a bare name (``tiny.yaml``) or ``configs/NAME.yaml`` that is not a file
in the cwd is the config shipped with the package (the repo's configs/), so these commands work from any
directory after a regular ``pip install``. ``--steps N`` is the total step count to reach (a resumed run
continues up to N). ``key=value`` arguments override config keys (``section.key``). Multi-host: start one
process per host with the launcher's environment (JAX_COORDINATOR_ADDRESS/JAX_NUM_PROCESSES/JAX_PROCESS_ID,
SLURM, Open MPI or torchrun-style MASTER_ADDR/WORLD_SIZE/RANK); jax.distributed is initialised before
anything else. CPU with several emulated devices: XLA_FLAGS=--xla_force_host_platform_device_count=4.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv=None) -> int:
    prog = "python -m olmo_hybrid_jax.train" if Path(sys.argv[0]).name == "__main__.py" else None
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                 epilog="overrides: section.key=value ...")
    ap.add_argument("--config", default="configs/base.yaml", help="YAML config (default configs/base.yaml)")
    ap.add_argument("--steps", type=int, default=None, help="total steps to reach (train.steps)")
    ap.add_argument("--out", default=None, help="run directory (default runs/<config name>)")
    ap.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    ap.add_argument("overrides", nargs="*", help="config overrides, e.g. optim.lr=1e-3")
    args = ap.parse_intermixed_args(argv)  # overrides may come before or after the options

    from olmo_hybrid_jax.train.sharding import maybe_initialize_distributed

    maybe_initialize_distributed()  # before any other JAX call

    from olmo_hybrid_jax.train.config import ConfigError, load_config
    from olmo_hybrid_jax.train.data import DataError

    overrides = list(args.overrides)
    if args.steps is not None:
        overrides.append(f"train.steps={args.steps}")
    try:
        cfg = load_config(args.config, overrides)
        out = args.out or str(Path("runs") / Path(args.config).stem)
        from olmo_hybrid_jax.train.trainer import run

        run(cfg, out, resume=args.resume)
    except (ConfigError, DataError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
