"""Pallas (Triton) gated delta rule, run in interpret mode on CPU, against the sequential oracle.

Values, final state and every input gradient (q, k, v, g, beta, initial_state) through jax.vjp,
over fp32 / bf16, weak to strong decay (|g| from 0.005 to 5), beta in (0, 2), odd T / K / V,
segment restarts (at and inside chunk boundaries, one-token segments) and nonzero initial states.
Interpret mode fills kernel outputs with NaN before the kernel runs, so every check that the
results are finite also checks that every element was written.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gdn_helpers import make_inputs, make_segments, rel_err

from olmo_hybrid_jax.kernels import PALLAS_VARIANTS, PallasConfig, gated_delta_rule, shapes_supported
from olmo_hybrid_jax.kernels.gated_delta_rule.pallas_gpu import pallas_gated_delta_rule


@functools.partial(jax.jit, static_argnames=("backend",))
def vjp_all(q, k, v, g, beta, s0, seg, ct_o, ct_s, *, backend):
    def f(q, k, v, g, beta, s0):
        return gated_delta_rule(q, k, v, g, beta, initial_state=s0, segment_ids=seg, output_final_state=True,
                                backend=backend)

    (o, s), pull = jax.vjp(f, q, k, v, g, beta, s0)
    return (o, s) + tuple(pull((ct_o.astype(o.dtype), ct_s)))


NAMES = ("o", "state", "dq", "dk", "dv", "dg", "dbeta", "ds0")

# Interpret mode ignores warps and pipeline stages, so on CPU only the variants with other block
# widths compute differently; those (and the default) are the ones checked here.
_BLOCKS = lambda c: (c.block_v_walk, c.block_v, c.block_v_fused)  # noqa: E731
BLOCK_VARIANTS = ["default"] + sorted(n for n, c in PALLAS_VARIANTS.items()
                                      if _BLOCKS(c) != _BLOCKS(PALLAS_VARIANTS["default"]))

CASES = [
    # id, B, T, H, K, V, g_range, seg_kind, dtype
    ("T1", 2, 1, 2, 12, 20, (0.005, 5.0), None, jnp.float32),
    ("T37_mixed_segments", 2, 37, 2, 12, 20, (0.005, 5.0), "mixed", jnp.float32),
    ("T130_weak_decay_chunk_boundary", 2, 130, 1, 12, 20, (0.005, 0.05), "chunk_boundary", jnp.float32),
    ("T130_strong_decay_short_segments", 1, 130, 2, 12, 20, (1.0, 5.0), "short", jnp.float32),
    ("K96_V192_inside", 1, 70, 1, 96, 192, (0.005, 5.0), "inside", jnp.float32),
    ("bf16_T130_mixed", 2, 130, 1, 12, 20, (0.005, 5.0), "mixed", jnp.bfloat16),
    ("bf16_K96_V192", 1, 64, 1, 96, 192, (0.005, 1.0), None, jnp.bfloat16),
]


@pytest.mark.parametrize("B,T,H,K,V,g_range,seg_kind,dtype", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_pallas_matches_sequential(B, T, H, K, V, g_range, seg_kind, dtype):
    q, k, v, g, beta, s0 = make_inputs(100 + T + K, B, T, H, K, V, g_range=g_range, dtype=dtype)
    s0 = s0.astype(jnp.float32)
    seg = make_segments(seg_kind, B, T, seed=T)
    rng = np.random.default_rng(7)
    ct_o = jnp.asarray(rng.standard_normal((B, T, H, V)), dtype).astype(jnp.float32)
    ct_s = jnp.asarray(rng.standard_normal((B, H, K, V)), jnp.float32)

    out = vjp_all(q, k, v, g, beta, s0, seg, ct_o, ct_s, backend="pallas")
    # The oracle sees exactly the (bf16-rounded) values the kernel saw, in fp32.
    up = lambda x: x.astype(jnp.float32)  # noqa: E731
    ref = vjp_all(up(q), up(k), up(v), up(g), up(beta), s0, seg, ct_o, ct_s, backend="sequential")

    assert out[0].dtype == dtype and out[1].dtype == jnp.float32
    for name, x, x_in in zip(NAMES[2:], out[2:], (q, k, v, g, beta, s0)):
        assert x.dtype == x_in.dtype, name  # cotangents keep their primal's dtype
    # fp32: every dot is fp32 (IEEE on GPU). bf16: the dots take bf16 operands, and Tm, the
    # per-chunk states and Vn are stored in bf16, so errors are at bf16 level.
    tol = 2e-5 if dtype == jnp.float32 else 3e-2
    for name, x, r in zip(NAMES, out, ref):
        x = np.asarray(x.astype(jnp.float32))
        assert np.all(np.isfinite(x)), name
        assert rel_err(x, r) < tol, (name, rel_err(x, r))


def test_pallas_extreme_decay_is_finite():
    """|g| = 5 on every token (gamma reaches -320 inside a chunk) with restarts: no inf/NaN."""
    B, T, H, K, V = 1, 128, 1, 8, 8
    q, k, v, _, beta, s0 = make_inputs(5, B, T, H, K, V)
    g = jnp.full((B, T, H), -5.0)
    seg = make_segments("inside", B, T)
    ct_o, ct_s = jnp.ones((B, T, H, V)), jnp.ones((B, H, K, V))
    out = vjp_all(q, k, v, g, beta, s0, seg, ct_o, ct_s, backend="pallas")
    ref = vjp_all(q, k, v, g, beta, s0, seg, ct_o, ct_s, backend="sequential")
    for name, x, r in zip(NAMES, out, ref):
        assert np.all(np.isfinite(np.asarray(x))), name
        assert rel_err(x, r) < 2e-5, (name, rel_err(x, r))


def test_pallas_block_sizes_and_no_initial_state():
    """Other V-block widths (the last block partly masked) give the same function; no initial state."""
    B, T, H, K, V = 1, 70, 2, 20, 40
    q, k, v, g, beta, _ = make_inputs(11, B, T, H, K, V)
    seg = make_segments("mixed", B, T)
    o_ref, s_ref = gated_delta_rule(q, k, v, g, beta, segment_ids=seg, output_final_state=True, backend="sequential")
    for cfg in (PALLAS_VARIANTS[n] for n in BLOCK_VARIANTS):
        o, s = jax.jit(functools.partial(pallas_gated_delta_rule, scale=K ** -0.5, config=cfg))(
            q, k, v, g, beta, segment_ids=seg)
        assert rel_err(o, o_ref) < 2e-5 and rel_err(s, s_ref) < 2e-5, cfg


def test_pallas_dispatch_and_limits():
    q = jax.ShapeDtypeStruct((2, 10, 3, 96), jnp.bfloat16)
    v = jax.ShapeDtypeStruct((2, 10, 3, 192), jnp.bfloat16)
    assert shapes_supported("pallas", q, q, v) is None  # interpret mode on CPU
    big = jax.ShapeDtypeStruct((2, 10, 3, 300), jnp.bfloat16)
    assert "K = 300" in shapes_supported("pallas", big, big, v)
    f64 = jax.ShapeDtypeStruct((2, 10, 3, 96), jnp.int8)
    assert "floating" in shapes_supported("pallas", f64, q, v)
    # "auto" never picks the interpreter on CPU
    from olmo_hybrid_jax.kernels.gated_delta_rule.api import _resolve

    assert _resolve("auto", q, q, v) == ("pallas" if jax.default_backend() == "gpu" else "chunked")
    with pytest.raises(ValueError, match="cannot take this input: K = 300"):
        x = jnp.zeros((1, 4, 1, 300))
        gated_delta_rule(x, x, jnp.zeros((1, 4, 1, 8)), jnp.zeros((1, 4, 1)), jnp.zeros((1, 4, 1)), backend="pallas")


@pytest.mark.parametrize("variant", BLOCK_VARIANTS)
def test_pallas_configs_values_and_grads(variant):
    """The registered launch variants compute the same function and gradients as the oracle, at a
    K (100) that pads to 128 in registers and a V that the blocks cut with a masked remainder."""
    cfg = PALLAS_VARIANTS[variant]
    B, T, H, K, V = 1, 70, 1, 100, 20
    q, k, v, g, beta, s0 = make_inputs(21, B, T, H, K, V, g_range=(0.005, 5.0))
    seg = make_segments("inside", B, T)
    rng = np.random.default_rng(3)
    ct_o = jnp.asarray(rng.standard_normal((B, T, H, V)), jnp.float32)
    ct_s = jnp.asarray(rng.standard_normal((B, H, K, V)), jnp.float32)

    @jax.jit
    def run(q, k, v, g, beta, s0):
        f = functools.partial(pallas_gated_delta_rule, scale=K ** -0.5, segment_ids=seg, config=cfg)
        (o, s), pull = jax.vjp(lambda *a: f(*a[:5], initial_state=a[5]), q, k, v, g, beta, s0)
        return (o, s) + tuple(pull((ct_o, ct_s)))

    out = run(q, k, v, g, beta, s0)
    ref = vjp_all(q, k, v, g, beta, s0, seg, ct_o, ct_s, backend="sequential")
    for name, x, r in zip(NAMES, out, ref):
        assert np.all(np.isfinite(np.asarray(x))), name
        assert rel_err(x, r) < 2e-5, (name, rel_err(x, r))


def test_pallas_plain_forward_equals_differentiated_forward():
    """A plain call (no residuals written) and the custom_vjp forward (residuals written) give
    the same output and final state, bit for bit in fp32 and in bf16."""
    B, T, H, K, V = 2, 90, 2, 96, 40
    for dtype, cfg in ((jnp.float32, PallasConfig()), (jnp.bfloat16, PallasConfig()),
                       (jnp.bfloat16, PALLAS_VARIANTS["narrow_v"])):
        q, k, v, g, beta, s0 = make_inputs(4, B, T, H, K, V, dtype=dtype)
        s0 = s0.astype(jnp.float32)
        f = functools.partial(pallas_gated_delta_rule, scale=K ** -0.5, config=cfg)
        o1, s1 = jax.jit(lambda *a, f=f: f(*a[:5], initial_state=a[5]))(q, k, v, g, beta, s0)
        (o2, s2), _ = jax.jit(lambda *a, f=f: jax.vjp(lambda *b: f(*b[:5], initial_state=b[5]), *a))(
            q, k, v, g, beta, s0)
        np.testing.assert_array_equal(np.asarray(o1.astype(jnp.float32)), np.asarray(o2.astype(jnp.float32)))
        np.testing.assert_array_equal(np.asarray(s1), np.asarray(s2))
