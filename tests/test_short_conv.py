"""ShortConv (the GDN's causal depthwise conv + activation, with its written-out backward) against a numpy
token loop: values and the gradients of x, the kernel and the cache, with packed documents, fp32 and bf16."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from olmo_hybrid_jax.modules import ShortConv

ACTS = {  # numpy activation and its derivative
    "silu": (lambda a: a / (1 + np.exp(-a)),
             lambda a: (1 / (1 + np.exp(-a))) * (1 + a * (1 - 1 / (1 + np.exp(-a))))),
    "gelu_pytorch_tanh": (
        lambda a: 0.5 * a * (1 + np.tanh(0.7978845608 * (a + 0.044715 * a ** 3))),
        lambda a: 0.5 * (1 + np.tanh(u := 0.7978845608 * (a + 0.044715 * a ** 3)))
        + 0.5 * a * (1 - np.tanh(u) ** 2) * 0.7978845608 * (1 + 3 * 0.044715 * a ** 2)),
}


def oracle(x, w, dy, act, seg=None, cache=None):
    """y, dx, dw, dcache by explicit loops over (b, t, tap) in float64."""
    f, df = ACTS[act]
    B, T, C = x.shape
    Kc = w.shape[0]
    hist = np.zeros((B, Kc - 1, C)) if cache is None else cache
    xp = np.concatenate([hist, x], axis=1)  # xp[t + Kc - 1] = x[t]
    y, dxp, dw = np.zeros((B, T, C)), np.zeros_like(xp), np.zeros_like(w)
    for b in range(B):
        for t in range(T):
            taps = [(j, t + j) for j in range(Kc)  # xp row t + j is token t - (Kc - 1) + j
                    if seg is None or (t - (Kc - 1) + j >= 0 and seg[b, t - (Kc - 1) + j] == seg[b, t])]
            a = sum(w[j] * xp[b, s] for j, s in taps) if taps else np.zeros(C)
            y[b, t] = f(a)
            da = dy[b, t] * df(a)
            for j, s in taps:
                dxp[b, s] += w[j] * da
                dw[j] += da * xp[b, s]
    return y, dxp[:, Kc - 1:], dw, dxp[:, :Kc - 1]


def run(x, w, dy, act, dtype, seg=None, cache=None):
    conv = ShortConv(x.shape[-1], w.shape[0], activation=act, dtype=dtype, rngs=nnx.Rngs(0))
    conv.kernel[...] = jnp.asarray(w, jnp.float32)
    graphdef, state = nnx.split(conv)

    def f(x, state, cache):
        return nnx.merge(graphdef, state)(x, segment_ids=seg, cache=cache)

    args = (jnp.asarray(x, dtype), state, None if cache is None else jnp.asarray(cache, dtype))
    y, pull = jax.vjp(jax.jit(f), *args)
    dx, dstate, dc = pull(jnp.asarray(dy, y.dtype))
    dw = dstate["kernel"][...]
    return [np.asarray(a, np.float64) if a is not None else None for a in (y, dx, dw, dc)]


def rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("act,Kc", [("silu", 4), ("gelu_pytorch_tanh", 3)])
@pytest.mark.parametrize("mode", ["plain", "segments", "cache"])
def test_short_conv_matches_a_token_loop(act, Kc, mode):
    rng = np.random.default_rng(Kc)
    B, T, C = 2, 13, 5  # T odd and short: documents of one token, and taps before t = 0
    x, dy = rng.standard_normal((B, T, C)), rng.standard_normal((B, T, C))
    w = rng.standard_normal((Kc, C)) * 0.5
    seg = cache = None
    if mode == "segments":
        seg = np.array([[0, 0, 0, 1, 2, 2, 2, 2, 2, 3, 3, 4, 4], [5] * 6 + [6] * 7], np.int32)
    if mode == "cache":
        cache = rng.standard_normal((B, Kc - 1, C))
    want = oracle(x, w, dy, act, seg, cache)
    for dtype, tol in ((jnp.float32, 1e-5), (jnp.bfloat16, 2.5e-2)):
        got = run(x, w, dy, act, dtype, None if seg is None else jnp.asarray(seg), cache)
        for name, g, r in zip(("y", "dx", "dkernel", "dcache"), got, want):
            if name == "dcache" and cache is None:
                assert g is None
                continue
            assert g.shape == r.shape, (name, g.shape, r.shape)
            assert rel(g, r) < tol, (mode, act, jnp.dtype(dtype).name, name, rel(g, r))
