"""The backward kernel short_conv_bwd: dx and per-walk dw partials in one pass over x and dy.

With acc the pre-activation and dacc = dy * act'(acc) (fp32):
    dx[t]  = sum_m w[Kc-1-m] * dacc[t + m]            (m = 0..Kc-1; t + m in t's document, < T)
    dw[j] += sum_t dacc[t] * x[t - (Kc-1) + j]          (the forward's masked taps)
dacc[t + m] needs acc at rows t + m, so the kernel recomputes the pre-activation at the Kc offsets
m from shifted loads of x at offsets -(Kc-1) .. Kc-1 (each loaded once per T-block, cache-served
halo) and of dy at 0 .. Kc-1: nothing of the forward is stored. A program walks ``steps``
consecutive T-blocks of one (batch row, C-block), summing its dw in registers, and writes one fp32
partial [Kc, BC]; XLA sums the partials.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from .tiles import SegCache, Static, cols_at, dyn, f32, launch, load_taps, load_x, pre_activation, sds, store, store_x


def _bwd_kernel(x_ref, w_ref, seg_ref, dy_ref, dx_ref, dwp_ref, *, st: Static):
    p, c0, b = pl.program_id(0), pl.program_id(1) * st.BC, pl.program_id(2)
    taps = load_taps(st, w_ref, c0)
    K1 = st.Kc - 1

    def block(s, dw):
        t0 = (p * st.steps + s) * st.BT
        segs = SegCache(st, seg_ref, b, t0)
        xs = {d: load_x(st, x_ref, b, t0, d, c0) for d in range(-K1, st.Kc)}

        tap = lambda d, d_out: segs.keep(xs[d].astype(f32), d, d_out)

        dx = jnp.zeros((st.BT, st.BC), f32)
        for m in range(st.Kc):
            acc, taps_m = pre_activation(st, tap, taps, m)  # the forward's fp32 pre-activation, at t + m
            _, slope = jax.jvp(st.act, (acc,), (jnp.ones_like(acc),))
            dacc = load_x(st, dy_ref, b, t0, m, c0).astype(f32) * slope  # zero at rows >= T (dy loads as 0)
            if m == 0:
                dw = tuple(dw[j] + jnp.sum(dacc * taps_m[j], axis=0) for j in range(st.Kc))
            dx = dx + segs.keep(dacc * taps[K1 - m][None, :], m, 0)  # row t + m reads x[t] only in t's document
        store_x(st, dx_ref, dx, b, t0, c0)
        return dw

    dw = jax.lax.fori_loop(0, st.steps, block, tuple(jnp.zeros((st.BC,), f32) for _ in range(st.Kc)))
    cm = cols_at(st, c0)[1]
    for j in range(st.Kc):
        store(dwp_ref.at[b, p, dyn(j, p), pl.ds(c0, st.BC)], dw[j], mask=cm)


def backward(st: Static, x, w, seg, dy):
    """(dx [B, T, C] in x.dtype, dw partials fp32 [B, NP, Kc, C]: sum over axes 0, 1 for dw)."""
    NP = -(-st.NT // st.steps)
    out = (sds(x.shape, x.dtype), sds((st.B, NP, st.Kc, st.C), f32))
    return launch(_bwd_kernel, st, (NP, st.NC, st.B), out, "short_conv_bwd")(x, w, seg, dy)
