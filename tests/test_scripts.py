"""scripts/slurm/train.sbatch under stand-ins for srun, scontrol and python: the command it builds
(HSDP: mesh.data = nodes, mesh.fsdp = GPUs per node; --resume; the caller's overrides) is a valid
train invocation, SIGTERM's exit code 143 requeues the job, and other codes pass through unrequeued."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from olmo_hybrid_jax.train.config import load_config

REPO = Path(__file__).resolve().parents[1]
SBATCH = REPO / "scripts" / "slurm" / "train.sbatch"


def _stub(path: Path, body: str) -> None:
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(0o755)


def _run(tmp_path, rc: int, *args):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    log = tmp_path / "calls.jsonl"
    record = ('python3 -c \'import json, sys; print(json.dumps(sys.argv[1:]))\' "$(basename "$0")" "$@" >> '
              f'{log}\n')
    _stub(bin_dir / "srun", 'while [[ "$1" == --* ]]; do shift; done\nexec "$@"\n')  # drop srun's options
    _stub(bin_dir / "scontrol", record)
    _stub(bin_dir / "fake-python", record + f"exit {rc}\n")
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "PYTHON": "fake-python",
           "SLURM_NNODES": "2", "SLURM_GPUS_ON_NODE": "8", "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "hyb"}
    p = subprocess.run(["bash", str(SBATCH), *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=60)
    calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return p, calls


def test_sbatch_builds_an_hsdp_train_command(tmp_path):
    p, calls = _run(tmp_path, 0, "optim.lr=4e-4")
    assert p.returncode == 0, p.stderr
    (prog, *argv), = calls
    assert prog == "fake-python" and argv[:2] == ["-m", "olmo_hybrid_jax.train"]
    assert argv[argv.index("--config") + 1] == "configs/7b.yaml" and argv[argv.index("--out") + 1] == "runs/hyb"
    assert "--resume" in argv
    overrides = [a for a in argv if "=" in a and not a.startswith("-")]
    assert overrides == ["mesh.data=2", "mesh.fsdp=8", "optim.lr=4e-4"]
    cfg = load_config(REPO / "configs" / "7b.yaml", overrides)  # a valid invocation of the shipped config
    assert (cfg.mesh.data, cfg.mesh.fsdp, cfg.optim.lr) == (2, 8, 4e-4)


@pytest.mark.parametrize("rc,requeued", [(143, True), (3, False), (2, False), (130, False)])
def test_sbatch_requeues_only_after_sigterm(tmp_path, rc, requeued):
    p, calls = _run(tmp_path, rc)
    assert p.returncode == rc
    assert (["scontrol", "requeue", "4242"] in calls) == requeued
