"""Gradient accumulation (``train.grad_accum_steps``): one step over N microbatches equals one step on the
whole batch (loss, z-loss, grad norm, gradient, updated parameters), on packed multi-document rows, when
microbatches hold different numbers of valid targets, and sharded over 4 emulated CPU devices (in a
subprocess: XLA_FLAGS must be set before JAX starts, as in test_train_run.py; its step is compared with
this process's single-device one); bad splits fail naming the key. A 2-layer (GDN + attention) tiny
model and one shared initial state keep it to a few compiles of a few seconds each."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from olmo_hybrid_jax.train.config import CONFIG_DIR, ConfigError, load_config
from olmo_hybrid_jax.train.data import pack_row
from olmo_hybrid_jax.train.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
LR = 1e-3
SMALL = ["model.overrides.num_hidden_layers=2", "model.overrides.layer_types=[linear_attention,full_attention]",
         "data.seq_len=32", "data.global_batch_size=8", "data.document_aware=true", f"optim.lr={LR}",
         "optim.warmup_steps=0"]


def packed_batch(B=8, T=32, seed=0):
    """Random byte rows with EOS (1) sprinkled in: several documents per row, segment ids and positions."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(2, 256, (B, T))
    tokens[rng.random((B, T)) < 0.08] = 1
    rows = [pack_row(r, eos_id=1) for r in tokens]
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


class RaggedTargets(Trainer):
    """A loss mask that gives microbatches different target counts (row r of the batch loses its last 4r
    targets, and every target divisible by 3): a mean of microbatch means would no longer be the step's
    mean, and a mask recomputed per microbatch (rows renumbered) would be another mask."""

    @staticmethod
    def targets(tokens):
        labels, mask = Trainer.targets(tokens)
        B, T = tokens.shape
        keep = jnp.arange(T)[None, :] < T - 1 - 4 * jnp.arange(B)[:, None]
        return labels, mask & keep & (labels % 3 != 0)


_INIT: dict = {}


def one_step(accum, batch, cls=Trainer):
    cfg = load_config(CONFIG_DIR / "tiny.yaml", SMALL + [f"train.grad_accum_steps={accum}"])
    tr = cls(cfg, devices=jax.devices()[:1])
    if "state" not in _INIT:  # the initial state does not depend on accum: build (compile) it once
        _INIT["state"] = jax.tree.map(np.asarray, tr.init_state())
    state = jax.device_put(_INIT["state"], tr.state_sharding)
    before = _INIT["state"]["params"]
    state, m = tr.step_fn(state, tr.device_batch(batch))
    adam = next(s for s in state["opt_state"].inner if hasattr(s, "mu"))
    return {"metrics": {k: float(v) for k, v in m.items()}, "before": before,
            "params": jax.tree.map(np.asarray, state["params"]), "mu": jax.tree.map(np.asarray, adam.mu)}


def assert_same_step(got, ref):
    for key in ("loss", "total_loss", "z_loss", "grad_norm"):
        assert got["metrics"][key] == pytest.approx(ref["metrics"][key], rel=1e-5), key
    assert got["metrics"]["skipped"] == ref["metrics"]["skipped"] == 0
    # Adam's first moment after step 1 is (1 - b1) x the clipped gradient: compares the gradients themselves
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * np.abs(b).max()),
                 got["mu"], ref["mu"])
    # the first Adam step is ~lr * sign(g): rounding of near-zero gradient entries moves a few by << lr
    moved = max(float(np.abs(p - q).max()) for p, q in zip(jax.tree.leaves(ref["params"]),
                                                             jax.tree.leaves(ref["before"])))
    assert moved > 0.5 * LR
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=0.05 * LR), got["params"], ref["params"])


@pytest.fixture(scope="module")
def batch_and_full_step():
    batch = packed_batch()
    return batch, one_step(1, batch)


def test_accumulated_step_equals_full_batch_step(batch_and_full_step):
    batch, ref = batch_and_full_step
    assert (batch["segment_ids"].max(axis=1) > 0).sum() >= 6  # packed documents in most rows
    for accum in (2, 4):
        assert_same_step(one_step(accum, batch), ref)


def test_accumulation_normalises_by_the_whole_steps_target_count(batch_and_full_step):
    batch, plain = batch_and_full_step
    counts = np.asarray(RaggedTargets.targets(jnp.asarray(batch["tokens"]))[1]).sum(axis=1)
    per_micro = [int(counts[i::4].sum()) for i in range(4)]
    assert len(set(per_micro)) == 4, per_micro  # microbatch i = rows i, i+4: all counts differ
    ref = one_step(1, batch, RaggedTargets)
    assert abs(plain["metrics"]["loss"] - ref["metrics"]["loss"]) > 1e-3  # the ragged mask matters
    assert_same_step(one_step(4, batch, RaggedTargets), ref)


def test_grad_accum_steps_must_divide_the_batch():
    assert load_config(CONFIG_DIR / "tiny.yaml").train.grad_accum_steps == 1
    with pytest.raises(ConfigError, match=r"data.global_batch_size=16 is not divisible by train.grad_accum_steps=3"):
        load_config(CONFIG_DIR / "tiny.yaml", ["train.grad_accum_steps=3"])
    with pytest.raises(ConfigError, match=r"train.grad_accum_steps must be >= 1, got 0"):
        load_config(CONFIG_DIR / "tiny.yaml", ["train.grad_accum_steps=0"])
    with pytest.raises(ConfigError, match=r"unknown config key 'train.grad_acum_steps' \(did you mean grad_accum"):
        load_config(CONFIG_DIR / "tiny.yaml", ["train.grad_acum_steps=2"])


_SHARDED = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    from olmo_hybrid_jax.train.config import ConfigError, load_config
    from olmo_hybrid_jax.train.trainer import Trainer
    small, batch = json.loads(sys.argv[1]), {k: np.asarray(v) for k, v in json.loads(sys.argv[2]).items()}
    assert jax.device_count() == 4
    results = {}
    try:  # 8 rows / 4 microbatches = 2 rows, on 4 batch shards
        Trainer(load_config("configs/tiny.yaml", small + ["train.grad_accum_steps=4"]))
    except ConfigError as e:
        results["error"] = str(e)
    tr = Trainer(load_config("configs/tiny.yaml", small + ["train.grad_accum_steps=2"]))  # fsdp=4
    state, m = tr.step_fn(tr.init_state(), tr.device_batch(batch))
    p = state["params"]["model"]["layers"][1]["self_attn"]["q_proj"]["kernel"]
    adam = next(s for s in state["opt_state"].inner if hasattr(s, "mu"))
    results.update(metrics={k: float(v) for k, v in m.items()}, param=np.asarray(p).tolist(),
                   mu=np.asarray(adam.mu["lm_head"]["kernel"]).tolist(), micro_spec=str(tr.micro_sharding.spec),
                   shards=len({tuple((s.start, s.stop) for s in sh.index) for sh in p.addressable_shards}))
    print("RESULTS" + json.dumps(results))
""")


def test_sharded_accumulated_step_equals_single_device_step(batch_and_full_step):
    """fsdp=4 with 2 microbatches of 4 rows (one per device) against the single-device step of this process."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("JAX_PLATFORMS", None)
    batch, ref = batch_and_full_step
    batch = {k: v.tolist() for k, v in batch.items()}
    p = subprocess.run([sys.executable, "-c", _SHARDED, json.dumps(SMALL), json.dumps(batch)], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-4000:]
    res = json.loads(p.stdout.split("RESULTS", 1)[1])
    assert res["error"] == ("train.grad_accum_steps=4 makes microbatches of 2 rows (data.global_batch_size=8 / 4), "
                            "not divisible by the 4 data-parallel shards (mesh data x fsdp)")
    assert res["shards"] == 4 and "fsdp" in res["micro_spec"]  # params and each microbatch split 4 ways
    for key in ("loss", "total_loss", "z_loss", "grad_norm"):
        assert res["metrics"][key] == pytest.approx(ref["metrics"][key], rel=1e-5), key
    mu = ref["mu"]["lm_head"]["kernel"]
    np.testing.assert_allclose(res["mu"], mu, rtol=1e-4, atol=1e-5 * np.abs(mu).max())
    np.testing.assert_allclose(res["param"], ref["params"]["model"]["layers"][1]["self_attn"]["q_proj"]["kernel"],
                               rtol=0, atol=0.05 * LR)
