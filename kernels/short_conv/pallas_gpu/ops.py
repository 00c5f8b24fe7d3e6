"""The custom_vjp that chains short_conv_fwd and short_conv_bwd, and the backend entry point."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from ..config import DEFAULT_CONFIG, ShortConvConfig
from .backward import backward
from .forward import forward
from .tiles import Static


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _conv(st, st_bwd, x, w, seg):
    return forward(st, x, w, seg)


def _conv_fwd(st, st_bwd, x, w, seg):
    return forward(st, x, w, seg), (x, w, seg)  # the backward recomputes the pre-activation


def _conv_bwd(st, st_bwd, res, dy):
    x, w, seg = res
    dx, dwp = backward(st_bwd, x, w, seg, dy.astype(x.dtype))
    dw = jnp.sum(dwp, axis=(0, 1))  # [Kc, C] fp32, then one rounding to w's dtype
    return dx, dw.astype(w.dtype), np.zeros(seg.shape, jax.dtypes.float0)


_conv.defvjp(_conv_fwd, _conv_bwd)


def pallas_short_conv(x, w, *, activation: str, segment_ids=None, config: ShortConvConfig | None = None,
                      interpret: bool | None = None):
    """x [B, T, C], w [Kc, C] (validated by the api) -> act(conv) [B, T, C] in x.dtype; custom_vjp
    w.r.t. x and w (dx in x.dtype, dw in w.dtype). interpret None: interpret mode on CPU."""
    B, T, C = x.shape
    Kc = w.shape[0]
    cfg = DEFAULT_CONFIG if config is None else config
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    common = dict(B=B, T=T, C=C, Kc=Kc, activation=activation, has_seg=segment_ids is not None,
                  interpret=bool(interpret))
    # tiles no larger than the array (next power of two): a tiny call launches no idle lanes
    fit = lambda n, cap: min(cap, 1 << max(0, (n - 1).bit_length()))
    st = Static(BT=fit(T, cfg.block_t), BC=fit(C, cfg.block_c), num_warps=cfg.num_warps,
                num_stages=cfg.num_stages, **common)
    BTb = fit(T, cfg.block_t_bwd)
    st_bwd = Static(BT=BTb, BC=fit(C, cfg.block_c_bwd), num_warps=cfg.num_warps_bwd, num_stages=1,
                    steps=min(cfg.t_blocks_per_program, -(-T // BTb)), **common)
    seg = jnp.zeros((1, 1), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)  # placeholder
    return _conv(st, st_bwd, x, w, seg)
