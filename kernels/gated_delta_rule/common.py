"""Small helpers shared by the gated delta rule backends."""

from __future__ import annotations

import jax
import jax.numpy as jnp

_HI = jax.lax.Precision.HIGHEST  # keep fp32 dots fp32 on GPU/TPU (no TF32/bf16 passes)


def segment_starts(segment_ids: jnp.ndarray) -> jnp.ndarray:
    """bool [B, T]: True where the state restarts from zero before token t.

    A restart is any change of id between t-1 and t (t >= 1); comparing
    neighbours rather than ids lets a row reuse an id for a later segment.
    Token 0 never restarts: it continues from ``initial_state``.
    """
    changed = segment_ids[:, 1:] != segment_ids[:, :-1]
    return jnp.concatenate([jnp.zeros_like(changed[:, :1]), changed], axis=1)


def delta_rule_token(S, q, k, v, g, beta, *, scale):
    """One token of the gated delta rule: the state update of the oracle and of the decode step.

    S [B, H, K, V] fp32 (the state before the token); q, k [B, H, K], v [B, H, V], g, beta [B, H], fp32.
    Per (b, h):  S <- exp(g) S;  S <- S + k (beta (v - S^T k))^T;  o = S^T (scale q).
    Returns (o fp32 [B, H, V], new S fp32 [B, H, K, V]); every dot at HIGHEST precision.
    """
    S = jnp.exp(g)[..., None, None] * S
    pred = jnp.einsum("bhk,bhkv->bhv", k, S, precision=_HI)
    delta = beta[..., None] * (v - pred)
    S = S + k[..., :, None] * delta[..., None, :]
    o = jnp.einsum("bhk,bhkv->bhv", scale * q, S, precision=_HI)
    return o, S
