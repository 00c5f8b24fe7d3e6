"""olmo_hybrid_jax.train.optim: schedule, weight-decay mask, skip-step AdamW against optax, the skip guard."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from olmo_hybrid_jax import OlmoHybridConfig, OlmoHybridForCausalLM
from olmo_hybrid_jax.train.optim import decay_mask, lr_schedule, skip_guard_decision, skip_step_adamw


def test_schedule_warmup_and_cosine_floor():
    s = lr_schedule(1.0, 10, 110, 0.1)
    assert float(s(0)) == 0.0 and float(s(5)) == pytest.approx(0.5) and float(s(10)) == pytest.approx(1.0)
    assert float(s(60)) == pytest.approx(0.55, rel=1e-5) and float(s(110)) == pytest.approx(0.1)
    assert float(s(500)) == pytest.approx(0.1)


def test_schedule_linear_warmup_and_decay_to_the_floor():
    s = lr_schedule(1.0, 10, 110, 0.0, "linear")  # the long-context stage: warmup, then a straight line to 0
    assert float(s(0)) == 0.0 and float(s(5)) == pytest.approx(0.5) and float(s(10)) == pytest.approx(1.0)
    assert float(s(35)) == pytest.approx(0.75) and float(s(60)) == pytest.approx(0.5)
    assert float(s(110)) == 0.0 and float(s(500)) == 0.0
    s = lr_schedule(2.0, 0, 100, 0.1, "linear")  # no warmup: the first step is at the peak
    assert [float(s(i)) for i in (0, 50, 100)] == pytest.approx([2.0, 1.1, 0.2])
    with pytest.raises(ValueError, match="unknown lr schedule 'step'"):
        lr_schedule(1.0, 10, 110, kind="step")


def test_weight_decay_mask():
    m = nnx.eval_shape(lambda: OlmoHybridForCausalLM(OlmoHybridConfig.preset("tiny"), rngs=nnx.Rngs(0)))
    params = nnx.to_pure_dict(nnx.state(m))
    mask = decay_mask(params)
    assert mask["model"]["embed_tokens"]["embedding"] is False
    assert mask["lm_head"]["kernel"] is True and mask["model"]["norm"]["weight"] is True
    assert mask["model"]["layers"][0]["linear_attn"]["A_log"] is True
    mask = decay_mask(params, ("embeddings", "norms", "gdn_gates"))
    assert mask["model"]["norm"]["weight"] is False and mask["model"]["layers"][0]["linear_attn"]["dt_bias"] is False
    assert mask["model"]["layers"][0]["linear_attn"]["o_norm"]["weight"] is False
    assert mask["model"]["layers"][0]["mlp"]["up_proj"]["kernel"] is True


def test_adamw_matches_optax_adamw_when_nothing_is_skipped():
    params = {"w": jnp.arange(6.0).reshape(2, 3), "embed_tokens": {"embedding": jnp.ones((4, 2))}}
    mask = {"w": True, "embed_tokens": {"embedding": False}}
    sched = lr_schedule(1e-2, 3, 50, 0.1)
    ours = skip_step_adamw(sched, weight_decay=0.1, mask=mask, max_grad_norm=1.0, window=8)
    ref = optax.chain(optax.clip_by_global_norm(1.0),
                      optax.adamw(lambda c: sched(c + 1), b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, mask=mask))
    so, sr = ours.init(params), ref.init(params)
    po, pr = params, params
    for i in range(6):
        g = jax.tree.map(lambda x, i=i: jnp.sin(x * (i + 1)), po)
        uo, so = ours.update(g, so, po, loss=1.0)
        ur, sr = ref.update(g, sr, pr)
        po, pr = optax.apply_updates(po, uo), optax.apply_updates(pr, ur)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), po, pr)
    assert int(so.skipped) == 0 and int(so.step) == 6


def test_skip_guard_skips_spikes_and_freezes_state():
    W = 16
    tx = skip_step_adamw(lambda c: 0.1, weight_decay=0.0, window=W, sigma=6.0)
    params = {"w": jnp.ones(3)}
    state = tx.init(params)
    rng = np.random.default_rng(0)
    for _ in range(W):  # a noisy but steady history
        g = {"w": jnp.full(3, 1.0 + 0.01 * rng.standard_normal())}
        u, state = tx.update(g, state, params, loss=2.0 + 0.01 * rng.standard_normal())
        assert not bool(state.last_skipped)
    before = state
    u, state = tx.update({"w": jnp.full(3, 1.0)}, state, params, loss=5.0)  # loss spike
    assert bool(state.last_skipped) and int(state.skipped) == 1
    assert all(float(jnp.abs(x).max()) == 0 for x in jax.tree.leaves(u))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), before.inner, state.inner)
    assert int(state.step) == int(before.step) + 1
    u, state = tx.update({"w": jnp.full(3, 100.0)}, state, params, loss=2.0)  # grad-norm spike
    assert bool(state.last_skipped)
    u, state = tx.update({"w": jnp.full(3, jnp.nan)}, state, params, loss=2.0)  # non-finite: always
    assert bool(state.last_skipped) and int(state.skipped) == 3
    u, state = tx.update({"w": jnp.full(3, 1.0)}, state, params, loss=2.0)
    assert not bool(state.last_skipped)


def test_skip_guard_waits_for_half_a_window():
    buf = jnp.zeros(128)
    assert not bool(skip_guard_decision(buf.at[:63].set(1.0), buf.at[:63].set(1.0), jnp.int32(63), 1e6, 1.0,
                                        sigma=6.0, window=128))
    assert bool(skip_guard_decision(buf.at[:64].set(1.0), buf.at[:64].set(1.0), jnp.int32(64), 1e6, 1.0,
                                    sigma=6.0, window=128))
