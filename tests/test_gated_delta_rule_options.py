"""The fused input-transform options (q/k l2norm, gate from A_log/dt_bias/a, beta from logits) on
every backend, the single-token decode step, and the associative-scan backend.

The reference for the options is written out here independently of ``kernels/.../gates.py``
(numpy, float64), then fed to the independent float64 recurrence of test_gated_delta_rule.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gdn_helpers import make_inputs, make_segments, np_gated_delta_rule, rel_err

from olmo_hybrid_jax.kernels import gated_delta_rule, gated_delta_rule_step

BACKENDS = ("sequential", "chunked", "associative_scan", "pallas")


def raw_inputs(seed, B, T, H, K, V):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, T, H, K)) * 3  # not normalised: the option does it
    k = rng.standard_normal((B, T, H, K)) * 0.5
    v = rng.standard_normal((B, T, H, V))
    a = rng.standard_normal((B, T, H)) * 2
    b = rng.standard_normal((B, T, H)) * 2
    A_log = np.log(rng.uniform(0.5, 16, H))
    dt_bias = rng.uniform(-3, 1, H)
    s0 = rng.standard_normal((B, H, K, V))
    return [jnp.asarray(x, jnp.float32) for x in (q, k, v, a, b, A_log, dt_bias, s0)]


def np_transforms(q, k, a, b, A_log, dt_bias, beta_scale):
    q, k, a, b, A_log, dt_bias = (np.asarray(x, np.float64) for x in (q, k, a, b, A_log, dt_bias))
    l2 = lambda x: x / np.sqrt(np.sum(x * x, -1, keepdims=True) + 1e-6)  # noqa: E731
    g = -np.exp(A_log) * np.log1p(np.exp(a + dt_bias))
    beta = beta_scale / (1 + np.exp(-b))
    return l2(q), l2(k), g, beta


OPTS = dict(use_qk_l2norm_in_kernel=True, beta_sigmoid=True, beta_scale=2.0)


GRAD_NAMES = ("o", "state", "dq", "dk", "dv", "da", "db", "dA_log", "ddt_bias", "ds0")


def vjp_all_raw(f, q, k, v, a, b, A_log, dt_bias, s0, ct_o, ct_s):
    """(o, state) of f(q, k, v, a, b, A_log, dt_bias, s0) and its vjp for every input (GRAD_NAMES)."""
    (o, s), pull = jax.vjp(f, q, k, v, a, b, A_log, dt_bias, s0)
    return (o, s) + tuple(pull((ct_o, ct_s)))


def cotangents(seed, B, T, H, K, V, o_dtype=jnp.float32):
    """Random cotangents (for o [B, T, H, V] in o_dtype, for the final state [B, H, K, V] fp32)."""
    rng = np.random.default_rng(seed)
    return (jnp.asarray(rng.standard_normal((B, T, H, V)), o_dtype),
            jnp.asarray(rng.standard_normal((B, H, K, V)), jnp.float32))


@functools.partial(jax.jit, static_argnames=("backend",))
def run_opts(q, k, v, a, b, A_log, dt_bias, s0, seg, ct_o, ct_s, *, backend):
    def f(q, k, v, a, b, A_log, dt_bias, s0):
        return gated_delta_rule(q, k, v, a, b, initial_state=s0, segment_ids=seg, output_final_state=True,
                                backend=backend, A_log=A_log, dt_bias=dt_bias, **OPTS)

    return vjp_all_raw(f, q, k, v, a, b, A_log, dt_bias, s0, ct_o, ct_s)


def test_options_values_match_independent_reference():
    B, T, H, K, V = 2, 70, 2, 12, 20
    q, k, v, a, b, A_log, dt_bias, s0 = raw_inputs(1, B, T, H, K, V)
    seg = make_segments("inside", B, T)
    qn, kn, g, beta = np_transforms(q, k, a, b, A_log, dt_bias, 2.0)
    o_ref, s_ref = np_gated_delta_rule(qn, kn, v, g, beta, K ** -0.5, np.asarray(s0), np.asarray(seg))
    for backend in BACKENDS:
        o, s = gated_delta_rule(q, k, v, a, b, initial_state=s0, segment_ids=seg, output_final_state=True,
                                backend=backend, A_log=A_log, dt_bias=dt_bias, **OPTS)
        assert rel_err(o, o_ref) < 2e-5, backend
        assert rel_err(s, s_ref) < 2e-5, backend


@pytest.mark.parametrize("backend", ["chunked", "associative_scan", "pallas"])
def test_options_gradients_wrt_raw_inputs(backend):
    """d/d(q_raw, k_raw, v, a, b, A_log, dt_bias, s0) against the sequential backend (autodiff through
    the plain-JAX transforms); the pallas backend differentiates its in-kernel l2norm and the gate
    epilogue by hand."""
    B, T, H, K, V = 2, 70, 2, 12, 20
    q, k, v, a, b, A_log, dt_bias, s0 = raw_inputs(2, B, T, H, K, V)
    seg = make_segments("mixed", B, T)
    ct_o, ct_s = cotangents(3, B, T, H, K, V)
    ref = run_opts(q, k, v, a, b, A_log, dt_bias, s0, seg, ct_o, ct_s, backend="sequential")
    out = run_opts(q, k, v, a, b, A_log, dt_bias, s0, seg, ct_o, ct_s, backend=backend)
    for name, x, r in zip(GRAD_NAMES, out, ref):
        assert np.all(np.isfinite(np.asarray(x))), name
        assert float(np.abs(np.asarray(r)).max()) > 0, name  # a gradient that could be wrong
        assert rel_err(x, r) < 5e-5, (backend, name, rel_err(x, r))


@pytest.mark.parametrize("variant", ["narrow_v", "wide_v"])
def test_options_pallas_walk_variants(variant):
    """The registered launch variants with other V-block widths, with the in-kernel transforms
    (l2-normalised q, k whose norms scale the state dots' results; the gate; beta from logits):
    values and every gradient vs the oracle. (The default launch: test_options_gradients_wrt_raw_inputs.)"""
    from olmo_hybrid_jax.kernels import PALLAS_VARIANTS
    from olmo_hybrid_jax.kernels.gated_delta_rule.gates import InputTransforms
    from olmo_hybrid_jax.kernels.gated_delta_rule.pallas_gpu import pallas_gated_delta_rule

    cfg = PALLAS_VARIANTS[variant]
    B, T, H, K, V = 2, 70, 2, 12, 20
    q, k, v, a, b, A_log, dt_bias, s0 = raw_inputs(8, B, T, H, K, V)
    seg = make_segments("mixed", B, T)
    ct_o, ct_s = cotangents(5, B, T, H, K, V)
    ref = run_opts(q, k, v, a, b, A_log, dt_bias, s0, seg, ct_o, ct_s, backend="sequential")
    tr = InputTransforms(qk_l2norm=True, gate=True, beta_sigmoid=True, beta_scale=2.0)

    def f(q, k, v, a, b, A_log, dt_bias, s0):
        return pallas_gated_delta_rule(q, k, v, a, b, scale=K ** -0.5, initial_state=s0, segment_ids=seg,
                                       transforms=tr, A_log=A_log, dt_bias=dt_bias, config=cfg)

    out = jax.jit(functools.partial(vjp_all_raw, f))(q, k, v, a, b, A_log, dt_bias, s0, ct_o, ct_s)
    for name, x, r in zip(GRAD_NAMES, out, ref):
        assert rel_err(x, r) < 5e-5, (variant, name, rel_err(x, r))


def test_options_pallas_float16_small_norm_keys():
    """fp16 operands with the in-kernel l2norm. Forward: keys of norm ~1e-4 (1 / |k| ~ 2e3) and
    values of ~300 must not overflow fp16 inside the kernels (the walk scales Vn by 1 / |k| only for
    16-bit formats with fp32's exponent range). Gradients at keys of norm ~1e-2 and values of ~30
    (at 1e-4 the true dk exceeds fp16's range in every backend). Both vs the oracle on the same fp16 inputs."""
    B, T, H, K, V = 1, 70, 2, 12, 20
    q, k, v, a, b, A_log, dt_bias, s0 = raw_inputs(8, B, T, H, K, V)
    seg = make_segments("mixed", B, T)
    q = q.astype(jnp.float16)
    for backend in ("sequential", "pallas"):
        o, s = gated_delta_rule(q, (k * 1e-4).astype(jnp.float16), (v * 300).astype(jnp.float16), a, b,
                                initial_state=s0, segment_ids=seg, output_final_state=True, backend=backend,
                                A_log=A_log, dt_bias=dt_bias, **OPTS)
        assert o.dtype == jnp.float16 and np.all(np.isfinite(np.asarray(o, np.float32))), backend
        if backend == "sequential":
            o_ref, s_ref = o, s
    assert rel_err(o, o_ref) < 1e-2 and rel_err(s, s_ref) < 1e-2, (rel_err(o, o_ref), rel_err(s, s_ref))

    ct_o, ct_s = cotangents(6, B, T, H, K, V, jnp.float16)
    k, v = (k * 1e-2).astype(jnp.float16), (v * 30).astype(jnp.float16)
    ref = run_opts(q, k, v, a, b, A_log, dt_bias, s0, seg, ct_o, ct_s, backend="sequential")
    out = run_opts(q, k, v, a, b, A_log, dt_bias, s0, seg, ct_o, ct_s, backend="pallas")
    for name, x, r in zip(GRAD_NAMES, out, ref):
        assert np.all(np.isfinite(np.asarray(x, np.float32))), name
        assert rel_err(x, r) < 1e-2, (name, rel_err(x, r))


def test_options_defaults_leave_inputs_alone():
    B, T, H, K, V = 1, 20, 1, 8, 8
    q, k, v, g, beta, s0 = make_inputs(4, B, T, H, K, V)
    o1, _ = gated_delta_rule(q, k, v, g, beta, backend="chunked")
    o2, _ = gated_delta_rule(q, k, v, g, beta, backend="chunked", beta_scale=1.0, use_qk_l2norm_in_kernel=False)
    np.testing.assert_array_equal(o1, o2)
    # beta_scale alone scales beta
    o3, _ = gated_delta_rule(q, k, v, g, beta * 0.5, backend="chunked", beta_scale=2.0)
    np.testing.assert_allclose(o1, o3, rtol=1e-5, atol=1e-6)


def test_options_validation():
    q, k, v, g, beta, _ = make_inputs(5, 1, 4, 3, 8, 8)
    with pytest.raises(ValueError, match="dt_bias is only used with A_log"):
        gated_delta_rule(q, k, v, g, beta, dt_bias=jnp.zeros(3))
    with pytest.raises(ValueError, match=r"A_log must have shape \[H\] = \[3\]"):
        gated_delta_rule(q, k, v, g, beta, A_log=jnp.zeros(4))
    with pytest.raises(ValueError, match="beta_scale must be a static Python number"):
        gated_delta_rule(q, k, v, g, beta, beta_scale=jnp.float32(2.0))


# --------------------------------------------------------------------------- decode step


def test_decode_step_matches_oracle_over_several_tokens():
    """Stepping token by token from a cached state equals one call over the whole sequence."""
    B, T, H, K, V = 2, 6, 3, 12, 20
    q, k, v, g, beta, s0 = make_inputs(6, B, T, H, K, V)
    o_ref, s_ref = np_gated_delta_rule(q, k, v, g, beta, 0.3, np.asarray(s0))
    step = jax.jit(functools.partial(gated_delta_rule_step, scale=0.3))
    S = s0
    for t in range(T):
        o_t, S = step(q[:, t], k[:, t], v[:, t], g[:, t], beta[:, t], S)
        assert o_t.shape == (B, H, V) and S.dtype == jnp.float32
        assert rel_err(o_t, o_ref[:, t]) < 1e-5, t
    assert rel_err(S, s_ref) < 1e-5


def test_decode_step_options_and_dtypes():
    B, T, H, K, V = 1, 1, 2, 12, 20
    q, k, v, a, b, A_log, dt_bias, s0 = raw_inputs(7, B, T, H, K, V)
    o_ref, s_ref = gated_delta_rule(q, k, v, a, b, initial_state=s0, output_final_state=True, backend="sequential",
                                    A_log=A_log, dt_bias=dt_bias, **OPTS)
    o, s = gated_delta_rule_step(q[:, 0], k[:, 0], v[:, 0].astype(jnp.bfloat16), a[:, 0], b[:, 0], s0,
                                 A_log=A_log, dt_bias=dt_bias, **OPTS)
    assert o.dtype == jnp.bfloat16 and s.dtype == jnp.float32
    assert rel_err(s, s_ref) < 1e-2  # v rounded to bf16 first
    assert rel_err(o, o_ref[:, 0]) < 2e-2
    with pytest.raises(ValueError, match=r"state must be \[B, H, K, V\]"):
        gated_delta_rule_step(q[:, 0], k[:, 0], v[:, 0], a[:, 0], b[:, 0], s0[..., :5])


# --------------------------------------------------------------------------- associative scan


@pytest.mark.parametrize(
    "T,seg_kind,g_range", [(1, None, (0.005, 5.0)), (130, "mixed", (0.005, 5.0)), (200, "short", (0.005, 0.05))]
)
def test_associative_scan_matches_sequential(T, seg_kind, g_range):
    B, H, K, V = 2, 2, 12, 20
    q, k, v, g, beta, s0 = make_inputs(8 + T, B, T, H, K, V, g_range=g_range)
    seg = make_segments(seg_kind, B, T, seed=T)
    ct_o, ct_s = cotangents(9, B, T, H, K, V)

    @functools.partial(jax.jit, static_argnames=("backend",))
    def run(q, k, v, g, beta, s0, *, backend):
        f = lambda *x: gated_delta_rule(*x[:5], initial_state=x[5], segment_ids=seg,  # noqa: E731
                                        output_final_state=True, backend=backend)
        out, pull = jax.vjp(f, q, k, v, g, beta, s0)
        return out + tuple(pull((ct_o, ct_s)))

    ref = run(q, k, v, g, beta, s0, backend="sequential")
    out = run(q, k, v, g, beta, s0, backend="associative_scan")
    for i, (x, r) in enumerate(zip(out, ref)):
        assert rel_err(x, r) < 5e-5, (i, rel_err(x, r))
