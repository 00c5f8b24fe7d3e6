"""Input transforms of the gated delta rule, computed in one place for every backend.

Gated DeltaNet feeds the recurrence with

    q, k  <- x * rsqrt(sum(x^2) + 1e-6)                    (per head, fp32)    [qk_l2norm]
    g     <- -exp(A_log) * softplus(a + dt_bias)           (log decay <= 0)   [A_log given]
    beta  <- beta_scale * sigmoid(b)                       (2x: negative eigenvalues) [beta_sigmoid]

``InputTransforms`` names which of these a call asks for. The plain-JAX backends
apply :func:`apply_input_transforms` before the recurrence (XLA fuses it with
the upcast); the Pallas kernels call the same per-element helpers
(:func:`l2_normalize`, :func:`decay_gate`, :func:`write_strength`) on the tiles
they load, so every backend computes the same function, and gradients w.r.t.
the raw inputs come from differentiating these helpers (autodiff outside the
kernels, ``jax.vjp`` of the helper in the Pallas epilogue).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

L2NORM_EPS = 1e-6  # added to the sum of squares (FLA / HF convention)


@dataclasses.dataclass(frozen=True)
class InputTransforms:
    """Which transforms the caller asked for (hashable, static under jit).

    qk_l2norm: l2-normalise q and k over the key dim.
    gate: ``g`` holds the raw gate input a; the decay is -exp(A_log) softplus(a + dt_bias).
    beta_sigmoid: ``beta`` holds raw logits b; beta = beta_scale * sigmoid(b).
    beta_scale: multiplies beta (after the sigmoid when beta_sigmoid); 2.0 allows
        negative eigenvalues of the transition (OLMo Hybrid's allow_neg_eigval).
    """

    qk_l2norm: bool = False
    gate: bool = False
    beta_sigmoid: bool = False
    beta_scale: float = 1.0


NO_TRANSFORMS = InputTransforms()


def l2_normalize(x, eps: float = L2NORM_EPS):
    """``x * rsqrt(sum(x^2, -1) + eps)`` in fp32 (an all-zero row stays zero)."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


def softplus(x):
    """log(1 + e^x) without overflow: max(x, 0) + log1p(exp(-|x|)) (same values as jax.nn.softplus)."""
    return jnp.maximum(x, 0.0) + jnp.log1p(jnp.exp(-jnp.abs(x)))


def decay_gate(a, A_log, dt_bias):
    """g = -exp(A_log) * softplus(a + dt_bias), fp32. A_log, dt_bias broadcast against a."""
    a = a.astype(jnp.float32)
    return -jnp.exp(A_log.astype(jnp.float32)) * softplus(a + dt_bias.astype(jnp.float32))


def write_strength(b, *, sigmoid: bool, scale: float):
    """beta = scale * (sigmoid(b) if sigmoid else b), fp32."""
    b = b.astype(jnp.float32)
    if sigmoid:
        b = jax.nn.sigmoid(b)
    return b * scale if scale != 1.0 else b


def apply_input_transforms(q, k, g, beta, *, transforms: InputTransforms, A_log=None, dt_bias=None):
    """(q, k, g, beta) with the requested transforms applied, all fp32.

    Shapes: q, k [..., H, K]; g, beta [..., H]; A_log, dt_bias [H] (dt_bias may be None).
    """
    f32 = jnp.float32
    if transforms.qk_l2norm:
        q, k = l2_normalize(q), l2_normalize(k)
    if transforms.gate:
        g = decay_gate(g, A_log, jnp.zeros_like(A_log) if dt_bias is None else dt_bias)
    beta = write_strength(beta, sigmoid=transforms.beta_sigmoid, scale=transforms.beta_scale)
    return q.astype(f32), k.astype(f32), g.astype(f32), beta
