"""The forward kernel short_conv_fwd: y = act(sum_j w[j] * x[t - (Kc-1) + j]), one pass.

Per program a [BT, BC] tile of y from Kc shifted [BT, BC] loads of x (the Kc - 1 halo rows come
through the cache: HBM reads x about once), fp32 accumulation in the reference's tap order, one
rounding to x.dtype on the store.
"""

from __future__ import annotations

from jax.experimental import pallas as pl

from .tiles import SegCache, Static, f32, launch, load_taps, load_x, pre_activation, sds, store_x


def _fwd_kernel(x_ref, w_ref, seg_ref, y_ref, *, st: Static):
    t0, c0, b = pl.program_id(0) * st.BT, pl.program_id(1) * st.BC, pl.program_id(2)
    segs = SegCache(st, seg_ref, b, t0)

    tap = lambda d, d_out: segs.keep(load_x(st, x_ref, b, t0, d, c0).astype(f32), d, d_out)
    acc, _ = pre_activation(st, tap, load_taps(st, w_ref, c0))
    store_x(st, y_ref, st.act(acc), b, t0, c0)


def forward(st: Static, x, w, seg):
    """y [B, T, C] in x.dtype."""
    return launch(_fwd_kernel, st, (st.NT, st.NC, st.B), sds(x.shape, x.dtype), "short_conv_fwd")(x, w, seg)
