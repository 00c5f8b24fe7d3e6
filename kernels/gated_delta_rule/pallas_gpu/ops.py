"""The custom_vjp that chains the forward and backward kernels, and the backend entry point."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from ..common import segment_starts
from ..config import PallasConfig, tuned_pallas_config
from ..gates import NO_TRANSFORMS, InputTransforms, decay_gate, l2_normalize, write_strength
from .backward import bwd_grads, bwd_walk
from .forward import forward
from .tiles import SUB, C, Static, f32, next_pow2


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _gdr(st, q, k, v, g, beta, s0, alog, dtb, cnt):
    # A plain forward (no differentiation) writes no residuals.
    o, sT, _ = forward(dataclasses.replace(st, residuals=False), q, k, v, g, beta, s0, alog, dtb, cnt)
    return o, sT


def _gdr_fwd(st, q, k, v, g, beta, s0, alog, dtb, cnt):
    o, sT, inter = forward(st, q, k, v, g, beta, s0, alog, dtb, cnt)
    return (o, sT), (q, k, v, g, beta, alog, dtb, cnt) + inter


def _gdr_bwd(st, res, cts):
    q, k, v, g, beta, alog, dtb, cnt, gam, tm, w, hs, vn = res
    do, dsT = cts
    do = do.astype(v.dtype)
    qk_pull = None
    if st.tr.qk_l2norm:
        # The backward kernels take q, k normalised (one parallel XLA pass) instead of normalising
        # every tile in fp32 themselves (that doubled the registers of the latency-bound reverse
        # walk); their dq, dk come back in fp32 and the l2norm is chained through here.
        (qn, kn), qk_pull = jax.vjp(lambda a, b: (l2_normalize(a), l2_normalize(b)), q, k)
        q, k = qn.astype(q.dtype), kn.astype(k.dtype)
        st = dataclasses.replace(st, tr=dataclasses.replace(st.tr, qk_l2norm=False))
    dh, dvn, ds0 = bwd_walk(st, q, k, gam, cnt, w, do, dsT.astype(f32))
    dq, dk, dv, dg_eff, dbeta_eff = bwd_grads(st, q, k, v, g, beta, cnt, alog, dtb, gam, tm, do, hs, dh, vn, dvn,
                                              f32 if qk_pull is not None else q.dtype)
    if qk_pull is not None:
        dq, dk = qk_pull((dq, dk))
    # Chain rule from the effective (g, beta) to the raw inputs: the same helpers the kernels ran.
    if st.tr.gate:
        _, pull = jax.vjp(lambda a, al, db: decay_gate(a, al, db), g, alog, dtb)
        dg, dalog, ddtb = pull(dg_eff)
    else:
        dg, dalog, ddtb = dg_eff, jnp.zeros_like(alog), jnp.zeros_like(dtb)
    _, pull = jax.vjp(lambda x: write_strength(x, sigmoid=st.tr.beta_sigmoid, scale=st.tr.beta_scale), beta)
    (dbeta,) = pull(dbeta_eff)
    cnt_ct = np.zeros(cnt.shape, jax.dtypes.float0)
    return (dq, dk, dv, dg.astype(g.dtype), dbeta.astype(beta.dtype), ds0.astype(f32),
            dalog.astype(alog.dtype), ddtb.astype(dtb.dtype), cnt_ct)


_gdr.defvjp(_gdr_fwd, _gdr_bwd)


def chunk_segment_index(segment_ids, T: int, N: int):
    """int32 [B, N*C]: for each token, how many segment starts precede it inside its chunk (itself included).

    Pad tokens (t >= T) get no start, so they carry the last index of their chunk.
    """
    starts = segment_starts(segment_ids).astype(jnp.int32)
    B = starts.shape[0]
    starts = jnp.pad(starts, ((0, 0), (0, N * C - T)))
    return jnp.cumsum(starts.reshape(B, N, C), axis=-1).reshape(B, N * C)


def make_static(B, T, H, K, V, *, scale, cd, transforms=NO_TRANSFORMS, has_seg=False, interpret=False,
                config: PallasConfig) -> Static:
    """What the kernels specialise on, for these sizes (block widths clamped to V)."""
    vb = lambda w: min(w, max(SUB, next_pow2(V)))
    BVw, BVp, BVf = vb(config.block_v_walk), vb(config.block_v), vb(config.block_v_fused)
    return Static(
        B=B, T=T, H=H, K=K, V=V, KP=max(SUB, next_pow2(K)), BVw=BVw, NVw=-(-V // BVw), BVp=BVp,
        NVp=-(-V // BVp), BVf=BVf, NVf=-(-V // BVf), N=max(1, -(-T // C)), scale=float(scale), cd=cd,
        tr=transforms, has_seg=has_seg, interpret=bool(interpret), config=config,
    )


def supports(q, k, v, platform) -> str | None:
    """Why the Pallas backend cannot take these inputs, or None."""
    if platform not in ("gpu", "cuda", "rocm", "cpu"):
        return f"the pallas backend targets Triton GPUs (interpret mode on CPU); platform is {platform!r}"
    K = q.shape[-1]
    if K > 256:
        return f"K = {K} > 256: the padded [K, block_v] fp32 state would not fit in registers"
    for name, x in (("q", q), ("k", k), ("v", v)):
        if jnp.dtype(x.dtype) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
            return f"{name} has dtype {x.dtype}; the pallas kernels take float32, bfloat16 or float16"
    return None


def _compute_dtype(q, k, v):
    dts = {jnp.dtype(x.dtype) for x in (q, k, v)}
    if len(dts) == 1 and next(iter(dts)).itemsize == 2:
        return next(iter(dts)).name
    return "float32"


def pallas_gated_delta_rule(
    q,
    k,
    v,
    g,
    beta,
    *,
    scale,
    initial_state=None,
    segment_ids=None,
    transforms: InputTransforms = NO_TRANSFORMS,
    A_log=None,
    dt_bias=None,
    config: PallasConfig | None = None,
    interpret: bool | None = None,
):
    """Pallas (Triton) chunked gated delta rule; see the package docstring.

    Shapes: q, k [B, T, H, K]; v [B, T, H, V]; g, beta [B, T, H] (raw a / b when the
    transforms say so); initial_state [B, H, K, V] or None; segment_ids int [B, T]
    or None; A_log, dt_bias [H] (with transforms.gate). Inputs keep their dtypes.
    config: launch parameters (None: ``tuned_pallas_config`` for this device and K, V).
    Returns o [B, T, H, V] in v.dtype and the final state float32 [B, H, K, V].
    Differentiable (custom_vjp) w.r.t. q, k, v, g, beta, initial_state, A_log, dt_bias.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    if config is None:
        config = tuned_pallas_config(jax.devices()[0].device_kind, K, V)
    st = make_static(B, T, H, K, V, scale=scale, cd=_compute_dtype(q, k, v), transforms=transforms,
                     has_seg=segment_ids is not None, interpret=interpret, config=config)
    if initial_state is None:
        initial_state = jnp.zeros((B, H, K, V), f32)
    if segment_ids is None:
        cnt = jnp.zeros((1, C), jnp.int32)  # unused placeholder
    else:
        cnt = chunk_segment_index(segment_ids, T, st.N)
    if transforms.gate:
        alog = jnp.asarray(A_log, f32)
        dtb = jnp.zeros((H,), f32) if dt_bias is None else jnp.asarray(dt_bias, f32)
    else:
        alog = dtb = jnp.zeros((H,), f32)  # unused placeholders
    return _gdr(st, q, k, v, g, beta, initial_state.astype(f32), alog, dtb, cnt)
