"""Single-token gated delta rule step for generation (T = 1 with a cached state).

Per (b, h), with state S in R^{K x V} (fp32):

    S <- exp(g) S;   S <- S + k (beta (v - S^T k))^T;   o = S^T (scale q)

(``common.delta_rule_token``, the same update the token-by-token oracle runs.)

Plain JAX on purpose: one step reads and writes the [B, H, K, V] state once and
does O(K V) work per head, so it is bound by the state's bytes; XLA fuses the
whole step into a couple of passes over the state, and a custom kernel could
not move fewer bytes. Rounding: fp32 throughout, o rounded once to v.dtype.
"""

from __future__ import annotations

import jax.numpy as jnp

from .common import delta_rule_token
from .gates import InputTransforms, apply_input_transforms


def gated_delta_rule_step(
    q,
    k,
    v,
    g,
    beta,
    state,
    *,
    scale=None,
    use_qk_l2norm_in_kernel: bool = False,
    A_log=None,
    dt_bias=None,
    beta_sigmoid: bool = False,
    beta_scale: float = 1.0,
):
    """One token of the gated delta rule.

    q, k [B, H, K]; v [B, H, V]; g, beta [B, H]; state [B, H, K, V] (fp32; the
    state before this token). scale=None means K ** -0.5. The options have the
    meaning they have in :func:`kernels.gated_delta_rule` (g is the raw gate
    input a when A_log is given, beta raw logits when beta_sigmoid).
    Returns (o [B, H, V] in v.dtype, new_state float32 [B, H, K, V]).
    """
    if q.ndim != 3 or k.shape != q.shape:
        raise ValueError(f"q and k must both be [B, H, K]; got q {tuple(q.shape)}, k {tuple(k.shape)}")
    B, H, K = q.shape
    if v.ndim != 3 or tuple(v.shape[:2]) != (B, H):
        raise ValueError(f"v must be [B, H, V] = [{B}, {H}, V]; got {tuple(v.shape)}")
    V = v.shape[-1]
    for name, x in (("g", g), ("beta", beta)):
        if tuple(x.shape) != (B, H):
            raise ValueError(f"{name} must be [B, H] = {[B, H]}; got {tuple(x.shape)}")
    if tuple(state.shape) != (B, H, K, V):
        raise ValueError(f"state must be [B, H, K, V] = {[B, H, K, V]}; got {tuple(state.shape)}")
    if A_log is None and dt_bias is not None:
        raise ValueError("dt_bias is only used with A_log (the in-kernel gate)")
    scale = float(K) ** -0.5 if scale is None else float(scale)
    tr = InputTransforms(qk_l2norm=bool(use_qk_l2norm_in_kernel), gate=A_log is not None,
                         beta_sigmoid=bool(beta_sigmoid), beta_scale=float(beta_scale))
    q, k, g, beta = apply_input_transforms(q, k, g, beta, transforms=tr, A_log=A_log, dt_bias=dt_bias)
    o, S = delta_rule_token(state.astype(jnp.float32), q, k, v.astype(jnp.float32), g, beta, scale=scale)
    return o.astype(v.dtype), S
