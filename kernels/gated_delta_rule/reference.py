"""Sequential oracle for the gated delta rule: one ``lax.scan`` step per token.

Kept deliberately literal so it can be trusted; it is slow (T sequential
steps, each reading and writing the whole [B, H, K, V] state).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .common import delta_rule_token, segment_starts


def sequential_gated_delta_rule(q, k, v, g, beta, *, scale, initial_state=None, segment_ids=None):
    """Token-by-token gated delta rule.

    Shapes: q, k [B, T, H, K]; v [B, T, H, V]; g, beta [B, T, H];
    initial_state [B, H, K, V] or None (zeros); segment_ids int [B, T] or None.
    Returns o float32 [B, T, H, V] and the final state float32 [B, H, K, V].

    Per token t (state S in R^{K x V}):
        S <- 0                         if a segment starts at t (t >= 1)
        S <- exp(g_t) S
        S <- S + k_t (beta_t (v_t - S^T k_t))^T
        o_t = S^T (scale q_t)

    Everything is computed in float32 (inputs are upcast once); there is no
    rounding to a narrower type here — callers cast o afterwards.
    HBM traffic: the scan carries the state, so each of the T steps reads and
    writes the [B, H, K, V] state once (T passes over the state) plus one pass
    over the inputs and outputs.
    """
    f32 = jnp.float32
    q, k, v, g, beta = (x.astype(f32) for x in (q, k, v, g, beta))
    B, T, H, K = q.shape
    V = v.shape[-1]
    if initial_state is None:
        initial_state = jnp.zeros((B, H, K, V), f32)
    state0 = initial_state.astype(f32)
    if segment_ids is None:
        reset = jnp.zeros((B, T), bool)
    else:
        reset = segment_starts(segment_ids)

    def step(S, xs):
        q_t, k_t, v_t, g_t, b_t, r_t = xs  # [B,H,K] [B,H,K] [B,H,V] [B,H] [B,H] [B]
        S = jnp.where(r_t[:, None, None, None], 0.0, S)  # segment restart: forget everything
        o_t, S = delta_rule_token(S, q_t, k_t, v_t, g_t, b_t, scale=scale)
        return S, o_t

    time_major = lambda x: jnp.moveaxis(x, 1, 0)  # scan runs over the leading axis
    xs = tuple(time_major(x) for x in (q, k, v, g, beta, reset))
    final_state, o = jax.lax.scan(step, state0, xs)
    return jnp.moveaxis(o, 0, 1), final_state
