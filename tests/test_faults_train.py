"""Faults in the training loop (issue 13), injected: NaN steps (never checkpointed; a streak aborts with exit
3), every kind of broken newest checkpoint (walked back over, reported in one line, moved aside, the resumed
run equal to an uninterrupted one), all checkpoints broken (exit 4, one line listing them), a changed
architecture or optimizer shape on resume (one-line ConfigError naming the field, exit 2, nothing touched),
``--resume=require`` without a checkpoint, failed setups leaving no folder, a resume already past the target
(nothing runs), SIGINT / SIGTERM (exit 130 / 143, a checkpoint at the step it stopped, the resumed run equal
to an uninterrupted one), kill -9 at three points of an async save (the previous checkpoint restores), and
the progress bar's count, postfix and rate.

One 2-layer tiny model (T=32, B=4) keeps each in-process run to one compile; ``main()`` is called in-process
for exit codes; subprocesses only for signals and kill -9, sharing a persistent compilation cache.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from olmo_hybrid_jax.train import trainer as trainer_mod
from olmo_hybrid_jax.train.__main__ import main
from olmo_hybrid_jax.train.checkpoint import Checkpointer
from olmo_hybrid_jax.train.config import CONFIG_DIR, ConfigError, load_config
from olmo_hybrid_jax.train.metrics import Progress, read_metrics
from olmo_hybrid_jax.train.trainer import Trainer, run

REPO = Path(__file__).resolve().parents[1]
TINY = str(CONFIG_DIR / "tiny.yaml")
STEPS = 10
SMALL = ["model.overrides.num_hidden_layers=2", "model.overrides.layer_types=[linear_attention,full_attention]",
         "data.seq_len=32", "data.global_batch_size=4", "train.progress=false", "checkpoint.every=2",
         "checkpoint.keep=10", f"train.steps={STEPS}"]


def cfg(*extra):
    return load_config(TINY, SMALL + list(extra))


def cli(out, *args):
    """``main()``'s argv for a tiny run into ``out``."""
    return ["--config", TINY, "--out", str(out), *SMALL, *args]


def rows(out):
    return read_metrics(Path(out) / "metrics.jsonl")


def steps_on_disk(out) -> list[int]:
    return sorted(int(d.name) for d in (Path(out) / "checkpoints").iterdir() if d.name.isdigit())


def tree_listing(path) -> dict[str, int]:
    """{relative file path: size} of everything under ``path``."""
    path = Path(path)
    return {str(p.relative_to(path)): p.stat().st_size for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """An uninterrupted 10-step run (checkpoints 2, 4, ..., 10) with the progress bar on; its stderr."""
    out = tmp_path_factory.mktemp("faults") / "base"
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        summary = run(cfg("train.progress=true"), out)
    return {"out": out, "losses": [r["loss"] for r in rows(out)], "stderr": err.getvalue(), "summary": summary}


@pytest.fixture(scope="module")
def child_env(tmp_path_factory):
    """The subprocesses' environment: this one's (same devices), the repo importable, one compile cache."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path_factory.mktemp("jax_cache"))
    return env


def copy_run(base, dest) -> Path:
    shutil.copytree(base["out"], dest)
    return dest


def test_uninterrupted_run_summary_and_progress_bar(base):
    assert [r["step"] for r in rows(base["out"])] == list(range(1, STEPS + 1))
    assert steps_on_disk(base["out"]) == [2, 4, 6, 8, 10]
    s = base["summary"]
    assert (s["steps_run"], s["stopped_by"], s["last_finite_loss"]) == (10, None, base["losses"][-1])
    err = base["stderr"]
    assert f"done: step 10 of 10, 10 step(s) this run, last finite loss {base['losses'][-1]:.4f} (step 10)" in err
    # the final state is drawn once (tqdm's close), with the postfix of the same step
    assert err.count("10/10") == 1, err
    final = err[err.index("10/10"):].splitlines()[0]
    assert f"loss={base['losses'][-1]:.4f}" in final


def test_progress_rate_excludes_the_first_step(monkeypatch):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        bar = Progress(0, 5, True)
        time.sleep(0.5)  # the first step: compilation
        row = {"step": 1, "loss": 1.0, "grad_norm": 1.0, "lr": 1e-3, "tokens_per_s": None}
        bar.update(row)
        for s in range(2, 4):
            bar.update({**row, "step": s, "loss": float(s)})
        d = bar.bar.format_dict
        assert d["n"] == 3 and d["initial"] == 1 and d["elapsed"] < 0.3  # the clock restarted after step 1
        assert bar.bar.postfix.startswith("loss=3.0000")
        bar.close()


# ------------------------------------------------------------------------------------ non-finite
def test_nan_steps_are_never_checkpointed_and_a_streak_stops_the_run(base, tmp_path, monkeypatch, capsys):
    """Step 4 (a checkpoint boundary) and steps 7-9 report a NaN loss (the training math is untouched, so
    every other loss equals the uninterrupted run's): 4 is not saved (5 is, instead), one bad step does not
    stop the run, three in a row (K patched to 3) do, with exit 3 and nothing saved after step 6."""
    bad = jnp.array([4, 7, 8, 9])
    orig = Trainer.train_step

    def poisoned(self, state, batch):
        new, m = orig(self, state, batch)
        hit = jnp.isin(state["step"] + 1, bad)
        return new, {**m, "loss": jnp.where(hit, jnp.nan, m["loss"]), "skipped": m["skipped"] | hit}

    monkeypatch.setattr(Trainer, "train_step", poisoned)
    monkeypatch.setattr(trainer_mod, "MAX_BAD_STEPS", 3)
    out = tmp_path / "nan"
    assert main(cli(out)) == 3
    err = capsys.readouterr().err
    assert "step 4: loss nan (skipped); not checkpointed, the next good step will be" in err
    assert ("error: training diverged: 3 steps in a row (7-9) had a non-finite loss or were skipped (step 9: "
            "loss nan, grad_norm ") in err
    assert f"nothing after the last good step was saved (the newest checkpoint is step 6 in {out}/checkpoints)" in err
    assert "done" not in err
    assert steps_on_disk(out) == [2, 5, 6]
    got = rows(out)
    assert [r["step"] for r in got] == list(range(1, 10))
    assert [r["loss"] for r in got] == [None if s in (4, 7, 8, 9) else x
                                        for s, x in zip(range(1, 10), base["losses"])]


# ------------------------------------------------------------------------------------ broken checkpoints
def truncate_shards(step_dir):
    for f in (step_dir / "state" / "ocdbt.process_0" / "d").iterdir():
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def delete_state(step_dir):
    shutil.rmtree(step_dir / "state")


def truncate_json(step_dir, item):
    f = step_dir / item / "metadata"
    f.write_text(f.read_text()[:7])


CORRUPTIONS = {  # step -> (how, the one-line report's reason)
    10: (truncate_shards, "state/: ValueError: OUT_OF_RANGE: Error reading"),
    8: (delete_state, "state/ metadata: FileNotFoundError: no state item in"),
    6: (lambda d: truncate_json(d, "data"), "data/: JSONDecodeError:"),
    4: (lambda d: truncate_json(d, "meta"), "meta/: JSONDecodeError:"),
}


def test_broken_checkpoints_are_walked_back_over_and_kept(base, tmp_path, capsys):
    """Steps 10, 8, 6, 4 each broken another way: each is reported in one line, step 2 restores, the broken
    ones are moved (not deleted) to checkpoints_unrestorable/, and the resumed run equals the uninterrupted."""
    out = copy_run(base, tmp_path / "run")
    for step, (corrupt, _) in CORRUPTIONS.items():
        corrupt(out / "checkpoints" / str(step))
    before = {s: tree_listing(out / "checkpoints" / str(s)) for s in CORRUPTIONS}
    summary = run(cfg("train.steps=12"), out, resume=True)  # (10 would be "nothing to do": it is listed)
    err = capsys.readouterr().err
    for step, (_, reason) in CORRUPTIONS.items():
        line = next((ln for ln in err.splitlines() if ln.startswith(f"checkpoint step {step} ")), err)
        assert f"({out}/checkpoints/{step}) does not restore, {reason}" in line, line
        assert line.endswith("; trying the previous one")
    assert f"resumed from {out}/checkpoints/2 at step 2" in err
    assert (summary["resumed_from"], summary["steps_run"], sorted(summary["unrestorable"])) == (2, 10, [4, 6, 8, 10])
    for step, listing in before.items():  # nothing lost
        assert tree_listing(out / "checkpoints_unrestorable" / str(step)) == listing
    assert steps_on_disk(out) == [2, 4, 6, 8, 10, 12]
    assert [r["loss"] for r in rows(out)][:STEPS] == base["losses"]


def test_all_checkpoints_broken_is_one_error_listing_them(base, tmp_path, child_env):
    """Through the CLI (a subprocess, no compile): exit 4, one line per broken step and one error listing
    them; none of orbax's abandoned-read tracebacks (they used to follow by the thousand, at exit too)."""
    out = copy_run(base, tmp_path / "run")
    for step, (corrupt, _) in CORRUPTIONS.items():
        corrupt(out / "checkpoints" / str(step))
    (out / "checkpoints" / "2" / "data" / "metadata").write_text("{}")  # valid JSON, not an iterator state
    before = tree_listing(out)
    p = subprocess.run([sys.executable, "-m", "olmo_hybrid_jax.train", *cli(out, "--resume", "--steps", "12")],
                       cwd=REPO, env=child_env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 4, p.stderr[-3000:]
    lines = [ln for ln in p.stderr.splitlines() if not ln.startswith(("WARNING:absl", "devices:", "model:", "data:"))]
    assert len(lines) == 6, p.stderr[-3000:]  # 5 reports + the error
    assert all(ln.startswith("checkpoint step ") for ln in lines[:5])
    error = lines[5]
    assert error.startswith(f"error: no checkpoint in {out}/checkpoints restores (step 10: state/: ValueError: "
                            "OUT_OF_RANGE"), error
    for step, (_, reason) in CORRUPTIONS.items():
        assert f"step {step}: {reason}" in error
    assert "step 2: data/ (iterator state): " in error and error.endswith("nothing was deleted")
    assert tree_listing(out) == before  # nothing moved, rewritten or removed


# ------------------------------------------------------------------------------------ config mismatches
def test_changed_architecture_on_resume_is_one_line_naming_the_field(base, tmp_path, capsys):
    out = copy_run(base, tmp_path / "run")
    before = tree_listing(out)
    assert main(cli(out, "--resume", "--steps", "12", "model.overrides.hidden_size=96")) == 2
    err = capsys.readouterr().err
    error = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(error) == 1 and error[0].startswith(
        f"error: checkpoint step 10 in {out}/checkpoints has hidden_size=64, the config gives 96"), err
    assert "saved array(s) do not fit (e.g. " in error[0] and "Traceback" not in err
    assert "does not restore" not in err  # a misfit is not a broken checkpoint to walk back over
    with pytest.raises(ConfigError, match=r"has optim\.skip_window=128, the config gives 16: 2 saved array\(s\)"):
        run(cfg("train.steps=12", "optim.skip_window=16"), out, resume=True)
    assert tree_listing(out) == before


def test_resume_require_and_failed_setups_leave_no_folder(tmp_path, capsys, monkeypatch):
    out = tmp_path / "new"
    assert main(cli(out, "--resume=require")) == 2
    assert f"error: --resume=require: no checkpoint in {out}/checkpoints" in capsys.readouterr().err
    assert main(cli(out, "--resume", "require")) == 2
    assert main(cli(out, "data.paths=[/nonexistent/tokens.u16]")) == 2
    assert "data file not found: /nonexistent/tokens.u16" in capsys.readouterr().err
    # a mesh larger than the devices: one line, no traceback
    n = len(jax.devices())
    assert main(cli(out, f"mesh.fsdp={2 * n}")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: mesh data*fsdp*context*tensor = {2 * n} but there are {n} devices "
                   "(set one of mesh.data/fsdp/context/tensor to -1 to fill)"], err
    # model.init_from that does not fit (convert's one-line error): exit 2, no traceback
    from olmo_hybrid_jax import convert

    def mismatch(*a, **k):
        raise convert.CheckpointMismatchError("hf checkpoint /x does not match its config.json: 3 tensors differ")

    monkeypatch.setattr(trainer_mod, "load_init_params", mismatch)
    hf = tmp_path / "hf"
    hf.mkdir()
    shutil.copy(CONFIG_DIR / "models" / "tiny.json", hf / "config.json")
    assert main(cli(out, f"model.init_from=hf:{hf}")) == 2
    assert "error: hf checkpoint /x does not match its config.json" in capsys.readouterr().err
    assert not out.exists()
    # a folder that existed before keeps what it had
    keep = tmp_path / "existing"
    keep.mkdir()
    (keep / "notes.txt").write_text("mine")
    assert main(cli(keep, "data.paths=[/nonexistent/tokens.u16]")) == 2
    assert sorted(p.name for p in keep.iterdir()) == ["notes.txt"]


def test_resume_past_the_target_runs_nothing(base, tmp_path, capsys):
    out = copy_run(base, tmp_path / "run")
    before = tree_listing(out)
    assert main(cli(out, "--resume", "--steps", "4")) == 0
    err = capsys.readouterr().err
    assert f"nothing to do: the checkpoint at step 10 in {out}/checkpoints is past train.steps=4" in err
    assert main(cli(out, "--resume", "--steps", "10")) == 0
    assert "is already at train.steps=10" in capsys.readouterr().err
    assert "done" not in err and tree_listing(out) == before
    assert main(cli(tmp_path / "zero", "--steps", "0")) == 0
    assert "nothing to do: train.steps=0" in capsys.readouterr().err and not (tmp_path / "zero").exists()


# ------------------------------------------------------------------------------------ signals, kill -9
_SLOW_CLI = textwrap.dedent("""
    import sys, time
    from olmo_hybrid_jax.train.trainer import Trainer
    orig = Trainer.device_batch
    def slow(self, b):  # 0.25 s a step: the signal lands mid-run
        time.sleep(0.25)
        return orig(self, b)
    Trainer.device_batch = slow
    from olmo_hybrid_jax.train.__main__ import main
    sys.exit(main(sys.argv[1:]))
""")


def signal_run(out, env, sig, *args, twice=False):
    """Start the CLI, send ``sig`` (``twice``: again 20 ms later) once the metrics file has grown past its
    current rows; (rc, stderr)."""
    have = len(rows(out)) if (out / "metrics.jsonl").exists() else 0
    p = subprocess.Popen([sys.executable, "-c", _SLOW_CLI, *cli(out, "checkpoint.every=1000", *args)], cwd=REPO,
                         env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and p.poll() is None:
        f = out / "metrics.jsonl"
        if f.exists() and len([ln for ln in f.read_text().splitlines() if ln.strip()]) > have:
            break
        time.sleep(0.05)
    p.send_signal(sig)
    if twice:
        time.sleep(0.02)
        p.send_signal(sig)
    _, err = p.communicate(timeout=240)
    return p.returncode, err


@pytest.mark.slow
def test_sigint_and_sigterm_save_the_step_and_resume_matches(base, tmp_path, child_env):
    out = tmp_path / "run"
    rc, err = signal_run(out, child_env, signal.SIGINT)
    assert rc == 130, err[-3000:]
    n1 = steps_on_disk(out)[-1]
    assert 1 < n1 < STEPS and f"SIGINT: saved step {n1}; exiting (continue with --resume)" in err
    assert f"stopped by SIGINT: step {n1} of {STEPS}, {n1} step(s) this run" in err and "done" not in err
    assert [r["step"] for r in rows(out)] == list(range(1, n1 + 1))
    rc, err = signal_run(out, child_env, signal.SIGTERM, "--resume")
    assert rc == 143, err[-3000:]
    n2 = steps_on_disk(out)[-1]
    assert n1 < n2 < STEPS and steps_on_disk(out) == [n1, n2] and f"SIGTERM: saved step {n2}" in err
    run(cfg(), out, resume=True)
    assert [r["loss"] for r in rows(out)] == base["losses"]


@pytest.mark.slow
def test_a_second_sigint_aborts_without_saving(tmp_path, child_env):
    out = tmp_path / "run"
    rc, err = signal_run(out, child_env, signal.SIGINT, twice=True)
    assert rc == 130, err[-3000:]
    assert "aborted (SIGINT): nothing saved after the last checkpoint" in err and "saved step" not in err
    assert steps_on_disk(out) == []


_KILL_DURING_SAVE = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from orbax.checkpoint._src.path import atomicity
    from olmo_hybrid_jax.train import checkpoint, trainer
    from olmo_hybrid_jax.train.config import load_config
    out, point, config, small = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
    die = lambda: os.kill(os.getpid(), signal.SIGKILL)
    if point == "in_flight":  # save() returned, tensorstore still writing step 4
        orig_save = checkpoint.Checkpointer.save
        def save(self, step, *a, **k):
            r = orig_save(self, step, *a, **k)
            if step == 4:
                die()
            return r
        checkpoint.Checkpointer.save = save
    elif point == "before_commit":  # every item written, no commit marker yet
        orig_fin = atomicity.AtomicRenameTemporaryPath.finalize
        async def finalize(self, *a, **k):
            if self._final_path.name == "4":
                die()
            return await orig_fin(self, *a, **k)
        atomicity.AtomicRenameTemporaryPath.finalize = finalize
    else:  # commit marker written, the tmp folder not yet renamed to 4
        orig_rename = atomicity.async_path.rename
        async def rename(src, dst, *a, **k):
            if Path(str(dst)).name == "4":
                die()
            return await orig_rename(src, dst, *a, **k)
        atomicity.async_path.rename = rename
    trainer.run(load_config(config, small), out)
""")


@pytest.mark.slow
@pytest.mark.parametrize("point", ["in_flight", "before_commit", "before_rename"])
def test_kill_during_save_leaves_the_previous_checkpoint(base, tmp_path, child_env, point):
    out = tmp_path / "run"
    p = subprocess.run([sys.executable, "-c", _KILL_DURING_SAVE, str(out), point, TINY, *SMALL, "train.steps=6"],
                       cwd=REPO, env=child_env, capture_output=True, text=True, timeout=300)
    assert p.returncode == -9, p.stderr[-3000:]
    assert steps_on_disk(out) == [2], sorted(d.name for d in (out / "checkpoints").iterdir())
    tmp = [d for d in (out / "checkpoints").iterdir() if d.name.startswith("4.orbax-checkpoint-tmp")]
    assert len(tmp) == 1  # killed inside step 4's save, at the point asked for:
    assert (tmp[0] / "commit_success.txt").exists() == (point == "before_rename")
    tr = Trainer(cfg())
    abstract = trainer_mod._abstract_with_shardings(tr)
    ck = Checkpointer(out / "checkpoints", every=2, keep=10)
    step, state, _, failed = ck.restore_newest(abstract)
    ck.close()
    ref = Checkpointer(base["out"] / "checkpoints", every=2, keep=10)
    want, _, _ = ref.restore(2, abstract)
    ref.close()
    assert (step, failed) == (2, [])
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), state, want)



_VOTE = textwrap.dedent("""
    import sys, jax
    pid, port = int(sys.argv[1]), sys.argv[2]
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2, process_id=pid)
    from olmo_hybrid_jax.train.trainer import _StopSignals
    stop = _StopSignals()
    seen = []
    for i in range(5):
        if i == 2 and pid == 1:  # only process 1 is signalled, before the loop's third step
            stop.received = "SIGTERM"
        seen.append(stop.agreed())
    stop.restore()
    print("SEEN", seen)
""")


@pytest.mark.slow
def test_processes_agree_on_the_step_to_stop_at(child_env):
    """Two CPU processes (gloo): a signal seen by one stops both after the same step (one step later)."""
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = str(s.getsockname()[1])
    env = {**child_env, "XLA_FLAGS": ""}  # one device per process
    procs = [subprocess.Popen([sys.executable, "-c", _VOTE, str(i), port], cwd=REPO, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (stdout, stderr) in zip(procs, outs):
        assert p.returncode == 0, stderr[-2000:]
        assert "SEEN [None, None, None, 'SIGTERM', 'SIGTERM']" in stdout
