"""End-to-end training on 4 emulated CPU devices, in subprocesses (XLA_FLAGS must be set before JAX
starts): the loss falls, a run stopped at step 25 and resumed to 40 logs the same losses as an
uninterrupted one, a process killed mid-save leaves the previous checkpoint restorable (and resuming
from it still matches), sharded steps equal single-device steps, bad paths fail clearly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
DEVICES = 4


def _env(devices=DEVICES):
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("JAX_PLATFORMS", None)
    return env


def train(out, *args, check=True, timeout=300):
    cmd = [sys.executable, "train.py", "--config", "configs/tiny.yaml", "--out", str(out), "train.progress=false",
           *args]
    p = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stderr[-4000:]}")
    return p


def losses(out):
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows], [r["loss"] for r in rows], rows


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    train(out, "--steps", "40")
    return out


def test_loss_falls_and_metrics_are_complete(baseline):
    steps, loss, rows = losses(baseline)
    assert steps == list(range(1, 41))
    assert sum(loss[-5:]) / 5 < sum(loss[:5]) / 5 - 1.0, loss
    for key in ("grad_norm", "lr", "tokens_per_s", "tokens_per_s_per_device", "mfu", "skipped"):
        assert key in rows[-1]
    assert rows[-1]["tokens_per_s_per_device"] == pytest.approx(rows[-1]["tokens_per_s"] / DEVICES)
    assert (baseline / "config.yaml").is_file()


def test_resume_matches_uninterrupted_run(baseline, tmp_path):
    train(tmp_path, "--steps", "25")
    assert losses(tmp_path)[0] == list(range(1, 26))
    p = train(tmp_path, "--steps", "40", "--resume")
    assert "resumed from" in p.stderr and "at step 25" in p.stderr
    steps, loss, _ = losses(tmp_path)
    assert steps == list(range(1, 41))
    assert loss == losses(baseline)[1]  # bit-identical


_KILL_DURING_SAVE = textwrap.dedent("""
    import os, signal, sys
    from olmo_hybrid_jax.train import checkpoint, trainer
    from olmo_hybrid_jax.train.config import load_config
    orig = checkpoint.Checkpointer.save
    def save(self, step, *a, **k):
        out = orig(self, step, *a, **k)
        if step == 20:  # the async write of step 20 is in flight: die now, as a crash would
            os.kill(os.getpid(), signal.SIGKILL)
        return out
    checkpoint.Checkpointer.save = save
    trainer.run(load_config("configs/tiny.yaml", ["train.progress=false", "train.steps=40"]), sys.argv[1])
""")


def test_kill_during_save_leaves_previous_checkpoint_restorable(baseline, tmp_path):
    p = subprocess.run([sys.executable, "-c", _KILL_DURING_SAVE, str(tmp_path)], cwd=REPO, env=_env(),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == -9, p.stderr[-3000:]
    ck = tmp_path / "checkpoints"
    finished = sorted(int(d.name) for d in ck.iterdir() if d.name.isdigit())
    assert finished == [10], sorted(d.name for d in ck.iterdir())  # step 20 never became a checkpoint
    # resuming picks up step 10 and reproduces the uninterrupted run exactly from there
    r = train(tmp_path, "--steps", "30", "--resume")
    assert "at step 10" in r.stderr
    steps, loss, _ = losses(tmp_path)
    assert steps == list(range(1, 31))
    assert loss == losses(baseline)[1][:30]


def test_existing_run_needs_resume_and_bad_paths_are_named(baseline, tmp_path):
    p = train(baseline, "--steps", "41", check=False)
    assert p.returncode == 2 and "already has checkpoints" in p.stderr and "--resume" in p.stderr
    p = train(tmp_path / "x", "--steps", "2", "data.paths=[/nonexistent/tokens.u16]", check=False)
    assert p.returncode == 2 and "data file not found: /nonexistent/tokens.u16" in p.stderr
    p = train(tmp_path / "y", "--steps", "2", "optim.lrr=1", check=False)
    assert p.returncode == 2 and "unknown config key 'optim.lrr'" in p.stderr
    p = train(tmp_path / "z", "--steps", "2", "data.global_batch_size=6", check=False)
    assert p.returncode == 2 and "not divisible by the 4 data-parallel shards" in p.stderr


_SHARDED_VS_SINGLE = textwrap.dedent("""
    import jax, json, numpy as np
    from olmo_hybrid_jax.train.config import load_config
    from olmo_hybrid_jax.train.trainer import Trainer
    from olmo_hybrid_jax.train.data import make_dataset
    from olmo_hybrid_jax.kernels import ShardAxes
    base = ["model.overrides.num_hidden_layers=8", "model.remat=full", "data.seq_len=64", "data.global_batch_size=8",
            "model.compute_dtype=float32", "data.document_aware=true"]
    results = {}
    # (plain fsdp=4 is what the resume test above trains on)
    for name, mesh in [("single", None), ("hsdp2x2", "mesh.data=2"), ("fsdp2_tp2", "mesh.tensor=2")]:
        cfg = load_config("configs/tiny.yaml", base + ([mesh] if mesh else []))
        tr = Trainer(cfg, devices=jax.devices()[:1] if mesh is None else None)
        assert tr.scanned
        state = tr.init_state()
        ds, _ = make_dataset(cfg.data, tr.eos_id)
        # the GDN op shards itself over the rules' batch / heads axes (not on one device)
        step_jaxpr = str(jax.make_jaxpr(tr.train_step)(state, tr.device_batch(ds[0])))
        assert ("shard_map" in step_jaxpr) == (mesh is not None), name
        if mesh is not None:
            want = ShardAxes(batch=("data", "fsdp"), heads=("tensor",), seq=("context",))  # context: size 1 here
            assert tr.kw["gdn_shard_axes"] == want, name
        out = []
        for step in range(3):
            state, m = tr.step_fn(state, tr.device_batch(ds[step]))
            out.append([float(m["loss"]), float(m["grad_norm"])])
        p = state["params"]["model"]["blocks"]["layers"][3]["self_attn"]["q_proj"]["kernel"]
        shards = len({tuple((s.start, s.stop) for s in sh.index) for sh in p.addressable_shards})
        results[name] = {"metrics": out, "param": np.asarray(p).ravel()[:64].tolist(), "shards": shards,
                         "spec": str(p.sharding.spec)}
    print("RESULTS" + json.dumps(results))
""")


def test_sharded_step_equals_single_device_step():
    p = subprocess.run([sys.executable, "-c", _SHARDED_VS_SINGLE], cwd=REPO, env=_env(), capture_output=True,
                       text=True, timeout=400)
    assert p.returncode == 0, p.stderr[-4000:]
    res = json.loads(p.stdout.split("RESULTS", 1)[1])
    ref = res.pop("single")
    assert ref["shards"] == 1
    for name, r in res.items():
        assert r["shards"] > 1, (name, r["spec"])
        for a, b in zip(r["metrics"], ref["metrics"]):
            assert a == pytest.approx(b, rel=2e-5), name
        assert r["param"] == pytest.approx(ref["param"], rel=1e-4, abs=1e-6), name


def test_out_of_vocabulary_data_fails_before_the_first_step(tmp_path):
    """train.py on a corpus tokenized for a larger vocabulary: exit 2 and one line naming the file and
    the id before any step runs (it used to train NaN losses to "done")."""
    corpus = tmp_path / "big_vocab.u16"
    np.array(list(range(2, 300)) * 20, np.uint16).tofile(corpus)
    out = tmp_path / "run"
    p = train(out, "--steps", "2", f"data.paths=[{corpus}]", check=False)
    assert p.returncode == 2, p.stderr[-2000:]
    assert "big_vocab.u16: token id 299 is outside the model's vocabulary (vocab_size 256)" in p.stderr
    metrics = out / "metrics.jsonl"
    assert not metrics.exists() or not metrics.read_text().strip()  # no step ran
    assert not any((out / "checkpoints").glob("*")) if (out / "checkpoints").is_dir() else True
