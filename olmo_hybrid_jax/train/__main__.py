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

``--resume`` (= ``--resume=auto``) continues from the newest checkpoint in --out that restores (a broken one
is reported in one line and the previous one tried; nothing is deleted) or starts fresh when there is none;
``--resume=require`` fails when there is none. SIGTERM / SIGINT finish the current step, save it and exit;
a second Ctrl-C aborts at once.

Exit codes:

    0    done (or nothing to do: the checkpoint is already at train.steps)
    1    an unexpected error (a Python traceback)
    2    bad input: config, data (eval.paths too) or arguments; a train.loggers package not installed (the
         message names the extra to install); a checkpoint or model.init_from that does not fit the
         configured model; a run folder with checkpoints but no --resume; --resume=require without one
    3    training diverged: 8 steps in a row (trainer.MAX_BAD_STEPS) had a non-finite loss or were
         skipped; nothing newer than the last good checkpoint was saved
    4    no checkpoint in --out restores (each one tried is listed)
    130  SIGINT: stopped after saving the current step (or a second Ctrl-C: aborted without saving)
    143  SIGTERM: stopped after saving the current step
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
    ap.add_argument("--resume", nargs="?", const="auto", default=None, metavar="{auto,require}",
                    help="continue from the newest checkpoint in --out; auto (the default): start fresh when there "
                         "is none; require: fail then")
    ap.add_argument("overrides", nargs="*", help="config overrides, e.g. optim.lr=1e-3")
    args = ap.parse_intermixed_args(argv)  # overrides may come before or after the options
    overrides = list(args.overrides)
    if args.resume not in (None, "auto", "require"):
        if "=" not in args.resume:
            ap.error(f"argument --resume: expected auto or require, got {args.resume!r}")
        overrides.insert(0, args.resume)  # `--resume key=value`: the optional value was an override
        args.resume = "auto"

    from olmo_hybrid_jax.train.sharding import maybe_initialize_distributed

    maybe_initialize_distributed()  # before any other JAX call

    from olmo_hybrid_jax.convert import CheckpointMismatchError
    from olmo_hybrid_jax.train.checkpoint import UnrestorableCheckpoints
    from olmo_hybrid_jax.train.config import ConfigError, load_config
    from olmo_hybrid_jax.train.data import DataError
    from olmo_hybrid_jax.train.trainer import SIGNAL_EXIT_CODES, TrainingDiverged, run

    if args.steps is not None:
        overrides.append(f"train.steps={args.steps}")
    try:
        cfg = load_config(args.config, overrides)
        out = args.out or str(Path("runs") / Path(args.config).stem)
        summary = run(cfg, out, resume=args.resume or False)
    except (ConfigError, DataError, CheckpointMismatchError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except UnrestorableCheckpoints as e:
        print(f"error: {e}", file=sys.stderr)
        return 4
    except KeyboardInterrupt:
        print("aborted (SIGINT): nothing saved after the last checkpoint", file=sys.stderr)
        return 130
    return SIGNAL_EXIT_CODES.get(summary["stopped_by"], 0)


if __name__ == "__main__":
    sys.exit(main())
