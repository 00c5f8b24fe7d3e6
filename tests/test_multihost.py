"""Training beyond one process, with real collectives: two JAX processes on localhost (jax.distributed,
CPU collectives over gloo, 2 emulated devices each) run train.py with HSDP (mesh.data=2 across the
processes, fsdp=2 inside each), and checkpoints move between meshes (elastic resume).

Checked against one process with 4 devices (fp32): the same losses; metrics written once (by process 0);
both processes killed mid-run (SIGKILL), the checkpoint they wrote restores in one process on another
device count and continues with the losses of the uninterrupted run; a mesh that cannot hold the saved
global batch is refused before anything in the run directory changes."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
ARGS = ["--config", "configs/tiny.yaml", "train.progress=false", "checkpoint.every=2", "checkpoint.keep=3",
        "data.seq_len=64"]


def _env(devices: int, **extra) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("JAX_PLATFORMS", None)
    env.update(extra)
    return env


def _train(out, *args, devices=4, check=True):
    p = subprocess.run([sys.executable, "train.py", *ARGS, "--out", str(out), *args], cwd=REPO, env=_env(devices),
                       capture_output=True, text=True, timeout=300)
    if check and p.returncode != 0:
        raise AssertionError(f"train.py {' '.join(args)} failed ({p.returncode}):\n{p.stderr[-4000:]}")
    return p


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# train.py, except that each process kills itself (SIGKILL, no cleanup) as it fetches step KILL_AT's batch
_KILLED_AT = textwrap.dedent("""
    import os, signal, sys
    from olmo_hybrid_jax.train.trainer import Trainer
    kill_at, orig, seen = int(os.environ["KILL_AT"]), Trainer.device_batch, [0]
    def device_batch(self, b):
        seen[0] += 1
        if seen[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return orig(self, b)
    Trainer.device_batch = device_batch
    from olmo_hybrid_jax.train.__main__ import main
    sys.exit(main(sys.argv[1:]))
""")


def _train_two_processes(out, *args, kill_at=None):
    """Process i of 2 with 2 devices each: JAX's own launcher variables, gloo for the CPU collectives.

    kill_at: both processes die by SIGKILL when step ``kill_at`` starts (a node lost mid-run)."""
    addr = f"127.0.0.1:{_free_port()}"
    entry = ["train.py"] if kill_at is None else ["-c", _KILLED_AT]
    extra = {} if kill_at is None else {"KILL_AT": str(kill_at)}
    procs = [subprocess.Popen([sys.executable, *entry, *ARGS, "--out", str(out), *args], cwd=REPO,
                              env=_env(2, JAX_COORDINATOR_ADDRESS=addr, JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i),
                                       JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo", **extra),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    results = []
    for p in procs:
        try:
            _, err = p.communicate(timeout=400)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        results.append((p.returncode, err))
    for i, (rc, err) in enumerate(results):
        want = 0 if kill_at is None else -9
        assert rc == want, f"process {i} ended with {rc}, not {want}:\n{err[-4000:]}"
    return [err for _, err in results]


def _rows(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def _losses(out) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in _rows(out)}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """One process, 4 devices (fsdp=4), 6 steps, checkpoints at 2, 4, 6."""
    out = tmp_path_factory.mktemp("one_process")
    _train(out, "--steps", "6")
    return out


@pytest.mark.slow
def test_two_processes_hsdp_match_one_process_and_killed_resume_in_one(uninterrupted, tmp_path):
    """HSDP over 2 processes logs the one-process losses; both processes then die by SIGKILL as step 6
    starts (step 4's save may still be in flight, step 5 may be in metrics.jsonl but is in no checkpoint),
    and ONE process on 2 devices (another process count, device count and data x fsdp split) resumes from
    the newest checkpoint that restores and logs the uninterrupted run's losses."""
    ref = _losses(uninterrupted)
    assert sorted(ref) == list(range(1, 7))
    run = tmp_path / "two"
    errs = _train_two_processes(run, "--steps", "6", "mesh.data=2", "mesh.fsdp=2", kill_at=6)
    assert "(2 process(es)); mesh data=2xfsdp=2" in errs[0]
    rows = _rows(run)
    assert [r["step"] for r in rows] in ([1, 2, 3, 4], [1, 2, 3, 4, 5])  # written once, a step late
    for r in rows:
        assert r["loss"] == pytest.approx(ref[r["step"]], rel=1e-5), r["step"]
    # each process wrote its own shards of one checkpoint; it restores in one process
    p = _train(run, "--steps", "6", "--resume", "mesh.data=1", "mesh.fsdp=2", devices=2)
    assert "at step 4" in p.stderr or "at step 2" in p.stderr, p.stderr[-3000:]
    got = _rows(run)
    assert [r["step"] for r in got] == list(range(1, 7))  # the killed run's step 5 row replaced, not doubled
    np.testing.assert_allclose([r["loss"] for r in got], [ref[s] for s in range(1, 7)], rtol=1e-5)


@pytest.mark.slow
def test_elastic_resume_four_devices_to_two_and_a_mesh_too_large_is_refused(uninterrupted, tmp_path):
    run = tmp_path / "elastic"
    shutil.copytree(uninterrupted, run)
    shutil.rmtree(run / "checkpoints" / "6")  # as if the 4-device job had stopped after step 4's save
    # 16 rows cannot be split over 3 data-parallel shards: refused before anything in the run changes
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    p = _train(run, "--steps", "6", "--resume", devices=3, check=False)
    assert p.returncode == 2, p.stderr[-3000:]
    assert "data.global_batch_size=16 is not divisible by the 3 data-parallel shards" in p.stderr
    assert {q.relative_to(run): q.read_bytes() for q in run.rglob("*") if q.is_file()} == before
    # 4 devices (fsdp=4) -> 2 devices (fsdp=2): same data position, same losses
    p = _train(run, "--steps", "6", "--resume", "mesh.fsdp=2", devices=2)
    assert "at step 4" in p.stderr
    got, ref = _losses(run), _losses(uninterrupted)
    assert sorted(got) == list(range(1, 7))
    assert [got[s] for s in range(1, 5)] == [ref[s] for s in range(1, 5)]  # the rows before the resume are kept
    np.testing.assert_allclose([got[s] for s in (5, 6)], [ref[s] for s in (5, 6)], rtol=1e-5)


@pytest.mark.slow
def test_train_bench_runs_its_case_as_two_processes(tmp_path):
    """benchmarks/train_bench.py --processes 2 (the HSDP run of the several-GPU benchmarks): two JAX processes
    (one device each, gloo) time one mesh data=2 step together and process 0 alone writes the result."""
    p = subprocess.run([sys.executable, "benchmarks/train_bench.py", "--case", "7b", "--smoke", "--processes", "2",
                        "--no-fwd-bwd", "--out", str(tmp_path), "mesh.data=2", "mesh.fsdp=1"], cwd=REPO,
                       env=_env(1), capture_output=True, text=True, timeout=400)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    assert p.stdout.count("ours: step") == 1, p.stdout  # the other process's report is not shown
    r = json.loads((tmp_path / "train_bench_7b.json").read_text())["ours"]
    assert (r["processes"], r["devices"], r["mesh"]["data"], r["batch"]) == (2, 2, 2, 2)
    assert np.isfinite(r["final_loss"]) and r["step_ms"] > 0
