"""The short conv (``kernels.short_conv``): the Pallas kernels in interpret mode and the plain-JAX
reference against an independent token-by-token loop in numpy, values and both gradients (dx, dw)
through jax.vjp, over fp32 / bf16, with and without packed documents (one starting at t = 0, one of
a single token), T and C not multiples of the tile. Interpret mode fills kernel outputs with NaN
before the kernel runs, so the finiteness checks also check that every element was written.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from olmo_hybrid_jax.kernels import ShortConvConfig, short_conv, short_conv_reference, short_conv_shapes_supported

# Tiles much smaller than the inputs: several T-blocks (a walk of 2 per backward program, the last one
# partial), several C-blocks (the last one partial).
SMALL = ShortConvConfig(block_t=8, block_c=16, block_t_bwd=8, block_c_bwd=16, t_blocks_per_program=2)


def _silu(a):
    return a / (1 + np.exp(-a))


def _silu_slope(a):
    s = 1 / (1 + np.exp(-a))
    return s * (1 + a * (1 - s))


def oracle(x, w, dy, seg, history=None):
    """(y, dx, dw) in float64, token by token: y[t] = silu(sum_j w[j] x[t - (Kc-1) + j]) over taps in
    t's document (zeros, or ``history``, before t = 0)."""
    x, w, dy = (np.asarray(a, np.float64) for a in (x, w, dy))
    B, T, C = x.shape
    Kc = w.shape[0]
    seg = np.zeros((B, T), np.int64) if seg is None else np.asarray(seg)
    hist = np.zeros((B, Kc - 1, C)) if history is None else np.asarray(history, np.float64)
    acc = np.zeros((B, T, C))
    for b in range(B):
        for t in range(T):
            for j in range(Kc):
                s = t - (Kc - 1) + j
                if s >= 0 and seg[b, s] == seg[b, t]:
                    acc[b, t] += w[j] * x[b, s]
                elif s < 0:
                    acc[b, t] += w[j] * hist[b, Kc - 1 + s]
    dacc = dy * _silu_slope(acc)
    dx, dw = np.zeros_like(x), np.zeros_like(w)
    for b in range(B):
        for t in range(T):
            for j in range(Kc):
                s = t - (Kc - 1) + j
                if s >= 0 and seg[b, s] == seg[b, t]:
                    dx[b, s] += w[j] * dacc[b, t]
                    dw[j] += x[b, s] * dacc[b, t]
                elif s < 0:
                    dw[j] += hist[b, Kc - 1 + s] * dacc[b, t]
    return _silu(acc), dx, dw


@functools.partial(jax.jit, static_argnames=("backend", "activation", "config"))
def vjp(x, w, dy, seg, *, backend, activation="silu", config=None):
    f = lambda x, w: short_conv(x, w, activation=activation, segment_ids=seg, backend=backend, config=config,
                                interpret=True if backend == "pallas" else None)
    y, pull = jax.vjp(f, x, w)
    return (y, *pull(dy))


def inputs(B, T, C, Kc, dtype, seed=0):
    r = np.random.RandomState(seed)
    x = jnp.asarray(r.randn(B, T, C), dtype)
    w = jnp.asarray(0.5 * r.randn(Kc, C), dtype)
    dy = jnp.asarray(r.randn(B, T, C), dtype)
    return x, w, dy


def segments(B, T):
    """Row 0: documents from t = 0 with a one-token document and starts at and inside tile edges;
    row 1: one document (no restart)."""
    seg = np.zeros((B, T), np.int32)
    for s in (1, 2, 8, 13, 14, T - 1):  # [0], [1], [2..7], ..., a last one-token document
        seg[0, s:] += 1
    return jnp.asarray(seg)


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b).max() / (np.abs(b).max() + 1e-30)


TOL = {jnp.float32: 2e-6, jnp.bfloat16: 1e-2}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("with_seg", [False, True], ids=["plain", "segments"])
@pytest.mark.parametrize("backend", ["pallas", "reference"])
def test_against_oracle(backend, with_seg, dtype):
    B, T, C, Kc = 2, 37, 20, 4  # T, C not multiples of the 8 x 16 tiles
    x, w, dy = inputs(B, T, C, Kc, dtype)
    seg = segments(B, T) if with_seg else None
    got = vjp(x, w, dy, seg, backend=backend, config=SMALL if backend == "pallas" else None)
    want = oracle(x.astype(jnp.float32), w.astype(jnp.float32), dy.astype(jnp.float32), seg)
    for name, g, r, dt in zip(("y", "dx", "dw"), got, want, (x.dtype, x.dtype, w.dtype)):
        assert g.dtype == dt and g.shape == r.shape, name
        assert np.isfinite(np.asarray(g, np.float32)).all(), f"{name}: not every element written"
        assert _rel(g, r) < TOL[dtype], f"{name}: rel err {_rel(g, r):.2e}"


def test_default_tiles_and_other_kernel_sizes():
    """The default launch (tiles clamped to the array) and Kc = 1, 3 against the oracle, fp32."""
    for T, C, Kc in ((50, 40, 4), (9, 5, 3), (6, 3, 1)):
        x, w, dy = inputs(1, T, C, Kc, jnp.float32, seed=Kc)
        seg = segments(1, T)
        for s in (None, seg):
            got = vjp(x, w, dy, s, backend="pallas")
            for name, g, r in zip(("y", "dx", "dw"), got, oracle(x, w, dy, s)):
                assert _rel(g, r) < 2e-6, f"T={T} C={C} Kc={Kc} seg={s is not None} {name}: {_rel(g, r):.2e}"


@pytest.mark.parametrize("activation", ["gelu_pytorch_tanh", "relu"])
def test_other_activations_match_reference(activation):
    x, w, dy = inputs(1, 19, 12, 4, jnp.float32, seed=3)
    seg = segments(1, 19)
    got = vjp(x, w, dy, seg, backend="pallas", activation=activation, config=SMALL)
    want = vjp(x, w, dy, seg, backend="reference", activation=activation)
    for name, g, r in zip(("y", "dx", "dw"), got, want):
        assert _rel(g, r) < 2e-6, f"{activation} {name}: {_rel(g, r):.2e}"


def test_history_is_the_inputs_before_t0():
    x, w, dy = inputs(2, 7, 6, 4, jnp.float32, seed=5)
    hist = jnp.asarray(np.random.RandomState(6).randn(2, 3, 6), jnp.float32)
    f = lambda x, w: short_conv(x, w, activation="silu", history=hist)
    y, pull = jax.vjp(f, x, w)
    for name, g, r in zip(("y", "dx", "dw"), (y, *pull(dy)), oracle(x, w, dy, None, history=hist)):
        assert _rel(g, r) < 2e-6, name


def test_auto_is_the_reference_off_gpu():
    """CPU keeps the plain-JAX form (no interpret-mode kernel in CPU training)."""
    x, w, _ = inputs(1, 8, 4, 4, jnp.float32)
    jaxpr = str(jax.make_jaxpr(lambda x, w: short_conv(x, w, activation="silu"))(x, w))
    assert "pallas_call" not in jaxpr
    np.testing.assert_array_equal(short_conv(x, w, activation="silu"),
                                  short_conv_reference(x, w, activation="silu"))


@pytest.mark.parametrize("x_shape, w_shape, kw, match", [
    ((8, 4), (4, 4), {}, "x must have rank 3"),
    ((1, 8, 4), (4, 5), {}, r"w must have shape \[Kc, C\]"),
    ((1, 8, 4), (4,), {}, r"w must have shape \[Kc, C\]"),
    ((1, 8, 4), (4, 4), {"activation": "tanh"}, "unknown activation"),
    ((1, 8, 4), (4, 4), {"backend": "cuda"}, "unknown short_conv backend"),
    ((1, 8, 4), (4, 4), {"activation": "gelu", "backend": "pallas"}, "no Triton lowering"),
    ((1, 8, 4), (4, 4), {"segment_ids": jnp.zeros((1, 7), jnp.int32)}, "segment_ids must have shape"),
])
def test_bad_input_is_one_line_value_error(x_shape, w_shape, kw, match):
    kw = {"activation": "silu", **kw}
    with pytest.raises(ValueError, match=match) as e:
        short_conv(jnp.zeros(x_shape), jnp.zeros(w_shape), **kw)
    assert "\n" not in str(e.value)
    assert short_conv_shapes_supported(kw.pop("backend", "auto"), jnp.zeros(x_shape), jnp.zeros(w_shape), **kw)
