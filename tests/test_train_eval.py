"""In-loop evaluation (issue 15, item 3) and the training loggers (item 6), on the 2-layer tiny model (T=32, B=4)
in-process: eval rows land at every ``eval.every``-th step with the loss an independent forward + log-softmax
gives on the held-out rows (document-aware), evaluation changes no training loss (eval on = eval off; stopped
at step 3 and resumed = uninterrupted), a 4-device mesh evaluates as one device does, TensorBoard's event file
and a stand-in W&B get the rows of metrics.jsonl, and a bad eval or logger setting (or a logger package
missing) is one line and exit 2 before any work."""

from __future__ import annotations

import contextlib
import io
import json
import os
import struct
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import jax
import numpy as np
import pytest

from olmo_hybrid_jax.train.__main__ import main
from olmo_hybrid_jax.train.config import CONFIG_DIR, ConfigError, load_config
from olmo_hybrid_jax.train.metrics import read_metrics
from olmo_hybrid_jax.train.trainer import run

REPO = Path(__file__).resolve().parents[1]
TINY = str(CONFIG_DIR / "tiny.yaml")
STEPS, EVERY, EOS = 6, 2, 1
SMALL = ["model.overrides.num_hidden_layers=2", "model.overrides.layer_types=[linear_attention,full_attention]",
         "data.seq_len=32", "data.global_batch_size=4", "train.progress=false", "checkpoint.every=2",
         "checkpoint.keep=10", f"train.steps={STEPS}", "data.document_aware=true"]


def cfg(*extra):
    return load_config(TINY, SMALL + list(extra))


def rows(out):
    return read_metrics(Path(out) / "metrics.jsonl")


def train_losses(out):
    return [(r["step"], r["loss"], r["grad_norm"]) for r in rows(out)]


class FakeWandb(types.ModuleType):
    """Stands in for the wandb package: records init's arguments and every log call (no network, no files)."""

    def __init__(self):
        super().__init__("wandb")
        self.inits, self.logged, self.finished = [], [], 0

    def init(self, **kw):
        self.inits.append(kw)
        return types.SimpleNamespace(log=lambda d, step: self.logged.append((step, d)), finish=self._finish)

    def _finish(self):
        self.finished += 1


@pytest.fixture(scope="module")
def held_out(tmp_path_factory) -> Path:
    """8 rows of 32 byte tokens (2 eval batches of 4), several documents a row."""
    rng = np.random.default_rng(0)
    toks = rng.integers(2, 256, size=8 * 32).astype(np.uint8)
    toks[rng.choice(toks.size, size=20, replace=False)] = EOS
    p = tmp_path_factory.mktemp("held_out") / "valid.u8"
    toks.tofile(p)
    return p


def eval_args(held_out):
    return [f"eval.every={EVERY}", f"eval.paths=[{held_out}]", "eval.batches=null"]


@pytest.fixture(scope="module")
def with_eval(tmp_path_factory, held_out):
    """A 6-step run with eval every 2 steps, logging to jsonl, TensorBoard and a stand-in W&B; its stderr."""
    out = tmp_path_factory.mktemp("eval") / "run"
    fake, err = FakeWandb(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stderr(err):
        mp.setitem(sys.modules, "wandb", fake)
        mp.setenv("WANDB_MODE", "offline")
        run(cfg(*eval_args(held_out), "train.loggers=[jsonl,tensorboard,wandb]"), out)
    return {"out": out, "wandb": fake, "stderr": err.getvalue()}


@pytest.mark.slow  # the module's eval run (13 s) starts here
def test_eval_rows_at_every_nth_step_equal_an_independent_forward(with_eval, held_out):
    from olmo_hybrid_jax.train.export import load_run_model

    out = with_eval["out"]
    got = {r["step"]: r for r in rows(out) if "eval/loss" in r}
    assert sorted(got) == [2, 4, 6] and [r["step"] for r in rows(out)] == list(range(1, STEPS + 1))
    tokens = np.fromfile(held_out, np.uint8).astype(np.int32).reshape(8, 32)
    # documents: a row's segment = EOS tokens strictly before; positions restart at each document's start
    seg = np.concatenate([np.zeros((8, 1), np.int32), np.cumsum(tokens[:, :-1] == EOS, axis=1)], axis=1)
    pos = np.array([[j - np.flatnonzero(s == s[j])[0] for j in range(32)] for s in seg], np.int32)
    for step, r in got.items():
        model = load_run_model(out, step=step, gdn_backend="sequential")
        logits = model(tokens, positions=pos, segment_ids=seg)
        logp = jax.nn.log_softmax(np.asarray(logits[:, :-1], np.float64), axis=-1)
        nll = -np.take_along_axis(np.asarray(logp), tokens[:, 1:, None], axis=-1)
        assert r["eval/tokens"] == nll.size == 8 * 31
        assert r["eval/loss"] == pytest.approx(float(nll.mean()), rel=2e-5), step
        assert r["eval/ppl"] == pytest.approx(np.exp(r["eval/loss"]), rel=1e-12) and r["eval/time_s"] >= 0
    assert "eval: every 2 steps, 2 batch(es) x 4 rows x 32 = 256 tokens" in with_eval["stderr"]
    assert f"step 6: eval loss {got[6]['eval/loss']:.4f}" in with_eval["stderr"]


@pytest.mark.slow
def test_eval_changes_no_training_loss_nor_does_a_resume(with_eval, held_out, tmp_path):
    off = tmp_path / "off"
    run(cfg(), off)
    assert train_losses(off) == train_losses(with_eval["out"])  # bit-identical
    assert not any("eval/loss" in r for r in rows(off))
    part = tmp_path / "resumed"
    run(cfg(*eval_args(held_out), "train.steps=3"), part)
    run(cfg(*eval_args(held_out)), part, resume=True)
    assert train_losses(part) == train_losses(with_eval["out"])
    full = {r["step"]: r["eval/loss"] for r in rows(with_eval["out"]) if "eval/loss" in r}
    assert {r["step"]: r["eval/loss"] for r in rows(part) if "eval/loss" in r} == full


_SHARDED_EVAL = textwrap.dedent("""
    import json, sys, jax
    from flax import nnx
    from olmo_hybrid_jax.train.config import load_config
    from olmo_hybrid_jax.train.data import held_out_batches
    from olmo_hybrid_jax.train.export import load_run_model
    from olmo_hybrid_jax.train.trainer import Trainer
    cfg = load_config(sys.argv[1] + "/config.yaml")
    tr = Trainer(cfg)  # mesh.fsdp=-1: the 4 devices
    params = nnx.to_pure_dict(nnx.state(load_run_model(sys.argv[1], step=2), nnx.Param))
    params = jax.tree.map(jax.device_put, params, tr.state_sharding["params"])
    held, _ = held_out_batches(cfg.eval.paths, cfg.data, tr.eos_id, batch_size=tr.micro_batch_size, batches=None)
    print(json.dumps({"mesh": dict(tr.mesh.shape), **tr.evaluate(params, held)}))
""")


@pytest.mark.slow
def test_eval_on_a_4_device_mesh_equals_one_device(with_eval):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
           "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    p = subprocess.run([sys.executable, "-c", _SHARDED_EVAL, str(with_eval["out"])], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    got = json.loads(p.stdout.strip().splitlines()[-1])
    assert got["mesh"]["fsdp"] == 4
    (want,) = [r for r in rows(with_eval["out"]) if r["step"] == 2]
    assert got["eval/tokens"] == want["eval/tokens"]
    assert got["eval/loss"] == pytest.approx(want["eval/loss"], rel=1e-5)


def read_scalars(logdir: Path) -> dict[tuple[str, int], float]:
    """{(tag, step): value} of the TFRecord event files in ``logdir``, parsed with tensorboardX's protos and
    each record's framing checked (length, masked CRC-32C of length and data)."""
    from tensorboardX.crc32c import crc32c
    from tensorboardX.proto.event_pb2 import Event

    def masked(b):
        c = crc32c(b)
        return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF

    out = {}
    for f in sorted(logdir.glob("events.out.tfevents.*")):
        data, i = f.read_bytes(), 0
        while i < len(data):
            head = data[i:i + 8]
            (n,), (hcrc,) = struct.unpack("<Q", head), struct.unpack("<I", data[i + 8:i + 12])
            body = data[i + 12:i + 12 + n]
            (bcrc,) = struct.unpack("<I", data[i + 12 + n:i + 16 + n])
            assert masked(head) == hcrc and masked(body) == bcrc, f"{f}: bad record at byte {i}"
            i += 16 + n
            ev = Event.FromString(body)
            for v in ev.summary.value:
                out[(v.tag, ev.step)] = v.simple_value
    return out


def test_tensorboard_and_wandb_get_the_rows_of_metrics_jsonl(with_eval):
    out = with_eval["out"]
    want = {(k, r["step"]): float(v) for r in rows(out) for k, v in r.items()
            if k != "step" and isinstance(v, (int, float))}
    assert ("eval/ppl", 4) in want and ("loss", 5) in want
    tb = read_scalars(out / "tensorboard")
    assert tb.keys() == want.keys()
    for key, v in want.items():
        assert tb[key] == pytest.approx(v, rel=1e-6), key  # TensorBoard stores float32
    fake = with_eval["wandb"]
    assert {(k, step): v for step, d in fake.logged for k, v in d.items()} == want
    (init,) = fake.inits
    assert init["mode"] == "offline" and init["id"] == (out / "wandb_run_id").read_text().strip()
    assert init["config"]["eval"]["every"] == EVERY and fake.finished == 1


def one_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.mark.parametrize("args,needle", [
    (["eval.every=2"], "eval.every=2 but eval.paths is empty"),
    (["eval.every=2", "eval.paths=[/nonexistent/valid.u8]"], "eval.paths: data file not found: /nonexistent/valid.u8"),
    (["eval.every=-1"], "eval.every must be >= 0"),
    (["eval.batches=0"], "eval.batches must be >= 1"),
    (["train.loggers=[jsonl,tensorbord]"], "train.loggers: unknown logger 'tensorbord' (did you mean tensorboard?)"),
    (["train.loggers=[jsonl,jsonl]"], "train.loggers names a logger twice"),
    (["train.wandb_mode=offlin"], "train.wandb_mode='offlin'; choose online, offline or disabled"),
])
def test_bad_eval_or_logger_config_is_one_line_and_exit_2(args, needle, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["--config", TINY, "--out", str(out), *SMALL, *args]) == 2
    assert needle in one_error(capsys)
    assert not out.exists()  # before any work: nothing written


def test_too_few_held_out_rows_and_a_missing_logger_package_fail_before_any_work(held_out, tmp_path, capsys,
                                                                                  monkeypatch):
    out = tmp_path / "run"
    base = ["--config", TINY, "--out", str(out), *SMALL]
    assert main([*base, *eval_args(held_out)[:2], "eval.batches=3"]) == 2
    assert "eval.paths hold 8 rows of data.seq_len=32, not the 3 batch(es) x 4 rows eval.batches asks for" in \
        one_error(capsys)
    assert not out.exists()
    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # import tensorboardX now raises ImportError
    assert main([*base, "train.loggers=[jsonl,tensorboard]"]) == 2
    assert "pip install 'olmo_hybrid_jax[tensorboard]'" in one_error(capsys)
    assert not out.exists()
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ConfigError, match=r"olmo_hybrid_jax\[wandb\]"):
        run(cfg("train.loggers=[wandb]"), out)
    assert json.loads(json.dumps(cfg().to_dict()))["train"]["loggers"] == ["jsonl"]  # the default
