"""Tests for kernels.gated_delta_rule (CPU, float32).

The sequential backend is checked against an independent float64 numpy
recurrence written here; the chunked backend is checked against the
sequential one (values and input gradients).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gdn_helpers import make_inputs, make_segments, np_gated_delta_rule, rel_err

from olmo_hybrid_jax.kernels import BACKENDS, ChunkConfig, gated_delta_rule, shapes_supported
from olmo_hybrid_jax.kernels.gated_delta_rule.xla_chunked import chunked_gated_delta_rule

jax.config.update("jax_enable_x64", False)


# --------------------------------------------------------------------------- helpers


# Jitted entry used by most tests: one compile per shape instead of op-by-op dispatch.
gdr = jax.jit(gated_delta_rule, static_argnames=("scale", "output_final_state", "backend"))


@functools.partial(jax.jit, static_argnames=("backend",))
def run_with_vjp(q, k, v, g, beta, s0, segment_ids, ct_o, ct_s, *, backend):
    """Values and the vjp w.r.t. (q, k, v, g, beta, initial_state) for a given cotangent."""

    def f(q, k, v, g, beta, s0):
        return gated_delta_rule(
            q, k, v, g, beta, initial_state=s0, segment_ids=segment_ids, output_final_state=True, backend=backend
        )

    (o, s), pullback = jax.vjp(f, q, k, v, g, beta, s0)
    return o, s, pullback((ct_o, ct_s))


# --------------------------------------------------------------------------- sequential vs numpy


@pytest.mark.parametrize(
    "B,T,H,K,V,seg_kind,init",
    [
        (1, 1, 1, 4, 3, None, False),
        (2, 37, 2, 12, 20, None, True),
        (2, 70, 2, 8, 5, "short", True),
        (2, 70, 1, 8, 5, "mixed", False),
    ],
)
def test_sequential_matches_numpy_float64(B, T, H, K, V, seg_kind, init):
    q, k, v, g, beta, s0 = make_inputs(1, B, T, H, K, V, init=init)
    seg = make_segments(seg_kind, B, T)
    o, s = gdr(
        q, k, v, g, beta, initial_state=s0, segment_ids=seg, output_final_state=True, backend="sequential"
    )
    o_ref, s_ref = np_gated_delta_rule(
        q, k, v, g, beta, K**-0.5, None if s0 is None else np.asarray(s0), None if seg is None else np.asarray(seg)
    )
    assert o.dtype == jnp.float32 and s.dtype == jnp.float32
    assert rel_err(o, o_ref) < 1e-5
    assert rel_err(s, s_ref) < 1e-5


def test_segment_ids_restart_on_change_not_value():
    """Ids are compared with the previous token, so a reused id still restarts."""
    B, T, H, K, V = 1, 12, 1, 4, 3
    q, k, v, g, beta, s0 = make_inputs(2, B, T, H, K, V)
    seg = jnp.asarray([[0, 0, 0, 1, 1, 0, 0, 0, 2, 2, 0, 0]], jnp.int32)
    o_ref, s_ref = np_gated_delta_rule(q, k, v, g, beta, K**-0.5, np.asarray(s0), np.asarray(seg))
    for backend in ("sequential", "chunked"):
        o, s = gdr(
            q, k, v, g, beta, initial_state=s0, segment_ids=seg, output_final_state=True, backend=backend
        )
        assert rel_err(o, o_ref) < 1e-5, backend
        assert rel_err(s, s_ref) < 1e-5, backend


def test_restart_discards_state_regardless_of_decay():
    """After a restart, outputs equal a fresh run on the new segment alone."""
    B, T, H, K, V = 1, 80, 2, 6, 7
    q, k, v, g, beta, s0 = make_inputs(3, B, T, H, K, V, g_range=(1e-4, 1e-3))  # nearly no decay
    seg = jnp.asarray([[0] * 50 + [1] * 30], jnp.int32)
    for backend in ("sequential", "chunked"):
        o, s = gdr(
            q, k, v, g, beta, initial_state=s0, segment_ids=seg, output_final_state=True, backend=backend
        )
        tail = lambda x: x[:, 50:]
        o2, s2 = gdr(
            tail(q), tail(k), tail(v), tail(g), tail(beta), output_final_state=True, backend=backend
        )
        np.testing.assert_allclose(o[:, 50:], o2, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(s, s2, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- chunked vs sequential

CHUNKED_CASES = [
    # id, B, T, H, K, V, g_range, init, seg_kind
    ("T1", 2, 1, 2, 12, 20, (0.005, 5.0), True, None),
    ("T37", 2, 37, 2, 12, 20, (0.005, 5.0), True, None),
    ("T64", 2, 64, 2, 12, 20, (0.005, 5.0), False, None),
    ("T130", 2, 130, 2, 12, 20, (0.005, 5.0), True, None),
    ("weak_decay", 1, 130, 2, 12, 20, (0.005, 0.05), True, None),
    ("strong_decay", 1, 130, 2, 12, 20, (1.0, 5.0), True, None),
    ("odd_dims", 2, 70, 1, 7, 5, (0.005, 5.0), True, None),
    ("seg_chunk_boundary", 2, 130, 2, 12, 20, (0.005, 5.0), False, "chunk_boundary"),
    ("seg_inside_init", 2, 130, 2, 12, 20, (0.005, 5.0), True, "inside"),
    ("seg_t1_init", 2, 70, 2, 12, 20, (0.005, 0.05), True, "t1"),
    ("seg_short_init", 2, 130, 2, 12, 20, (0.005, 5.0), True, "short"),
    ("seg_mixed_weak_init", 2, 130, 2, 12, 20, (0.005, 0.05), True, "mixed"),
]


@pytest.mark.parametrize(
    "B,T,H,K,V,g_range,init,seg_kind", [c[1:] for c in CHUNKED_CASES], ids=[c[0] for c in CHUNKED_CASES]
)
def test_chunked_matches_sequential_values_and_grads(B, T, H, K, V, g_range, init, seg_kind):
    q, k, v, g, beta, s0 = make_inputs(10 + T, B, T, H, K, V, g_range=g_range, init=True)
    if not init:
        s0 = jnp.zeros_like(s0)  # zeros, but still differentiated through
    seg = make_segments(seg_kind, B, T, seed=T)
    rng = np.random.default_rng(99)
    ct_o = jnp.asarray(rng.standard_normal((B, T, H, V)), jnp.float32)
    ct_s = jnp.asarray(rng.standard_normal((B, H, K, V)), jnp.float32)

    o_ref, s_ref, grads_ref = run_with_vjp(q, k, v, g, beta, s0, seg, ct_o, ct_s, backend="sequential")
    o, s, grads = run_with_vjp(q, k, v, g, beta, s0, seg, ct_o, ct_s, backend="chunked")

    assert rel_err(o, o_ref) < 1e-5
    assert rel_err(s, s_ref) < 1e-5
    for name, gr, gr_ref in zip(("q", "k", "v", "g", "beta", "initial_state"), grads, grads_ref):
        assert np.all(np.isfinite(np.asarray(gr))), name
        assert rel_err(gr, gr_ref) < 1e-4, (name, rel_err(gr, gr_ref))


def test_chunked_extreme_decay_is_finite():
    """|g| = 5 every token: gamma reaches -320 within a chunk; no inf/NaN anywhere."""
    B, T, H, K, V = 1, 128, 1, 8, 8
    q, k, v, _, beta, s0 = make_inputs(5, B, T, H, K, V)
    g = jnp.full((B, T, H), -5.0)
    seg = make_segments("inside", B, T)
    ct_o = jnp.ones((B, T, H, V))
    ct_s = jnp.ones((B, H, K, V))
    o_ref, s_ref, gr_ref = run_with_vjp(q, k, v, g, beta, s0, seg, ct_o, ct_s, backend="sequential")
    o, s, gr = run_with_vjp(q, k, v, g, beta, s0, seg, ct_o, ct_s, backend="chunked")
    for x in (o, s) + tuple(gr):
        assert np.all(np.isfinite(np.asarray(x)))
    assert rel_err(o, o_ref) < 1e-5
    for a, b in zip(gr, gr_ref):
        assert rel_err(a, b) < 1e-4


@pytest.mark.parametrize("chunk_size", [1, 16, 37])
def test_other_chunk_sizes(chunk_size):
    B, T, H, K, V = 2, 70, 2, 8, 5
    q, k, v, g, beta, s0 = make_inputs(4, B, T, H, K, V)
    seg = make_segments("mixed", B, T)
    o_ref, s_ref = np_gated_delta_rule(q, k, v, g, beta, 0.5, np.asarray(s0), np.asarray(seg))
    o, s = chunked_gated_delta_rule(
        q, k, v, g, beta, scale=0.5, initial_state=s0, segment_ids=seg, config=ChunkConfig(chunk_size)
    )
    assert rel_err(o, o_ref) < 1e-5
    assert rel_err(s, s_ref) < 1e-5


def test_auto_and_custom_scale():
    B, T, H, K, V = 2, 37, 2, 12, 20
    q, k, v, g, beta, s0 = make_inputs(6, B, T, H, K, V)
    o_auto, s_auto = gated_delta_rule(q, k, v, g, beta, scale=0.3, initial_state=s0, output_final_state=True)
    o_ref, s_ref = np_gated_delta_rule(q, k, v, g, beta, 0.3, np.asarray(s0))
    assert rel_err(o_auto, o_ref) < 1e-5
    assert rel_err(s_auto, s_ref) < 1e-5


# --------------------------------------------------------------------------- dtypes, jit, flags


@pytest.mark.parametrize("backend", ["sequential", "chunked"])
def test_bf16_inputs(backend):
    B, T, H, K, V = 2, 70, 2, 12, 20
    inputs = make_inputs(7, B, T, H, K, V, dtype=jnp.bfloat16)
    seg = make_segments("inside", B, T)
    o, s = gdr(*inputs[:5], initial_state=inputs[5], segment_ids=seg, output_final_state=True,
                            backend=backend)
    assert o.dtype == jnp.bfloat16
    assert s.dtype == jnp.float32
    # Same (bf16-representable) values in fp32: the only difference is rounding o once.
    f32 = [x.astype(jnp.float32) for x in inputs]
    o32, s32 = gdr(*f32[:5], initial_state=f32[5], segment_ids=seg, output_final_state=True,
                                backend=backend)
    assert rel_err(o, o32) < 1e-2
    assert rel_err(s, s32) < 1e-5
    # And against the original fp32 inputs, at bf16 input-rounding tolerance.
    q, k, v, g, beta, s0 = make_inputs(7, B, T, H, K, V)
    o_full, _ = gdr(q, k, v, g, beta, initial_state=s0, segment_ids=seg, backend=backend)
    assert rel_err(o, o_full) < 5e-2


def test_jit_and_output_final_state_flag():
    B, T, H, K, V = 2, 37, 2, 12, 20
    q, k, v, g, beta, s0 = make_inputs(8, B, T, H, K, V)
    f = jax.jit(functools.partial(gated_delta_rule, backend="chunked"))
    o, s = f(q, k, v, g, beta, initial_state=s0)
    assert s is None
    assert o.shape == (B, T, H, V) and o.dtype == jnp.float32
    f2 = jax.jit(functools.partial(gated_delta_rule, backend="chunked", output_final_state=True))
    o2, s2 = f2(q, k, v, g, beta, initial_state=s0)
    assert s2.shape == (B, H, K, V) and s2.dtype == jnp.float32
    np.testing.assert_allclose(o, o2, rtol=1e-6, atol=1e-6)
    # grad under jit
    loss = lambda q: jnp.sum(gated_delta_rule(q, k, v, g, beta, backend="chunked")[0] ** 2)
    gq = jax.jit(jax.grad(loss))(q)
    assert gq.shape == q.shape and np.all(np.isfinite(np.asarray(gq)))


def test_backend_registry():
    assert {"sequential", "chunked"} <= set(BACKENDS)
    q = jax.ShapeDtypeStruct((2, 10, 3, 8), jnp.float32)
    v = jax.ShapeDtypeStruct((2, 10, 3, 5), jnp.float32)
    for b in ("auto", "sequential", "chunked"):
        assert shapes_supported(b, q, q, v) is None
    assert "nope" in shapes_supported("nope", q, q, v)
    bad_v = jax.ShapeDtypeStruct((2, 11, 3, 5), jnp.float32)
    assert "v" in shapes_supported("chunked", q, q, bad_v)


# --------------------------------------------------------------------------- validation


def _good():
    return make_inputs(9, 2, 10, 3, 8, 5)


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda a: a.update(q=a["q"][0]), r"q must have rank 4"),
        (lambda a: a.update(g=a["g"][..., None]), r"g must have rank 3"),
        (lambda a: a.update(v=a["v"][:, :9]), r"v has leading dims"),
        (lambda a: a.update(beta=a["beta"][:1]), r"beta has leading dims"),
        (lambda a: a.update(k=a["k"][..., :7]), r"q and k must share the key dim"),
        (lambda a: a.update(initial_state=jnp.zeros((2, 3, 5, 8))), r"initial_state must have shape"),
        (lambda a: a.update(segment_ids=jnp.zeros((2, 10), jnp.float32)), r"segment_ids must have an integer dtype"),
        (lambda a: a.update(segment_ids=jnp.zeros((2, 9), jnp.int32)), r"segment_ids must have shape"),
        (lambda a: a.update(q=a["q"].astype(jnp.int32)), r"q must be a floating dtype"),
        (lambda a: a.update(backend="pallas_typo"), r"unknown gated_delta_rule backend 'pallas_typo'.*chunked"),
    ],
    ids=["q_rank", "g_rank", "v_T", "beta_B", "K_mismatch", "init_shape", "seg_float", "seg_shape", "int_q",
         "backend"],
)
def test_bad_inputs_raise(mutate, match):
    q, k, v, g, beta, s0 = _good()
    args = dict(q=q, k=k, v=v, g=g, beta=beta, initial_state=s0, backend="chunked")
    mutate(args)
    with pytest.raises(ValueError, match=match):
        gated_delta_rule(
            args.pop("q"), args.pop("k"), args.pop("v"), args.pop("g"), args.pop("beta"), **args
        )


def test_config_and_shard_axes_errors():
    """A config of another backend, shard_axes without a mesh, unknown mesh axes: one clear error each."""
    from olmo_hybrid_jax.kernels import PallasConfig, ShardAxes

    q = jnp.zeros((1, 4, 1, 8))
    v, g = jnp.zeros((1, 4, 1, 8)), jnp.zeros((1, 4, 1))
    with pytest.raises(ValueError, match="'chunked' takes a ChunkConfig or None"):
        gated_delta_rule(q, q, v, g, g, backend="chunked", config=PallasConfig())
    with pytest.raises(ValueError, match="'sequential' takes no config"):
        gated_delta_rule(q, q, v, g, g, backend="sequential", config=ChunkConfig())
    with pytest.raises(ValueError, match="shard_axes needs a mesh"):
        gated_delta_rule(q, q, v, g, g, backend="chunked", shard_axes=ShardAxes(batch="data"))
    mesh = jax.make_mesh((1,), ("data",))
    with pytest.raises(ValueError, match=r"mesh axes \['tensor'\]"):
        gated_delta_rule(q, q, v, g, g, backend="chunked", shard_axes=ShardAxes(heads="tensor"), mesh=mesh)
    with pytest.raises(ValueError, match="only used with shard_axes"):
        gated_delta_rule(q, q, v, g, g, backend="chunked", mesh=mesh)
    with pytest.raises(ValueError, match="one dim only"):
        ShardAxes(batch=("data",), heads="data")
    with pytest.raises(ValueError, match="power of two"):
        PallasConfig(block_v=48)
    # a ChunkConfig reaches the chunked backend: chunk size 16 gives the same function
    o16 = gated_delta_rule(*[jnp.ones_like(x) * 0.1 for x in (q, q, v)], g - 0.1, g + 0.5, backend="chunked",
                           config=ChunkConfig(16))[0]
    o64 = gated_delta_rule(*[jnp.ones_like(x) * 0.1 for x in (q, q, v)], g - 0.1, g + 0.5, backend="chunked")[0]
    np.testing.assert_allclose(np.asarray(o16), np.asarray(o64), rtol=1e-5, atol=1e-6)


def test_tuned_pallas_config_table():
    """The table's most specific row wins, then the any-device row; configs are validated."""
    from olmo_hybrid_jax.kernels import PallasConfig, tuned_pallas_config
    from olmo_hybrid_jax.kernels.gated_delta_rule import config as cfg_mod

    special = PallasConfig(block_v_fused=32)
    table = dict(cfg_mod.TUNED_PALLAS_CONFIGS)
    try:
        cfg_mod.TUNED_PALLAS_CONFIGS[("NVIDIA H200", 96, 192)] = special
        assert tuned_pallas_config("NVIDIA H200", 96, 192) is special
        assert tuned_pallas_config("NVIDIA H200", 128, 256) == cfg_mod.TUNED_PALLAS_CONFIGS[("NVIDIA H200", None, None)]
        assert tuned_pallas_config("some new card", 96, 192) == cfg_mod.TUNED_PALLAS_CONFIGS[("*", None, None)]
    finally:
        cfg_mod.TUNED_PALLAS_CONFIGS.clear()
        cfg_mod.TUNED_PALLAS_CONFIGS.update(table)
