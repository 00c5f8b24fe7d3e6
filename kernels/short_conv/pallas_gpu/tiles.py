"""What the short-conv kernels share: the static specialisation, shifted tile loads, the tap masks,
and the launch helper.

Shifted tiles are gathers (row and column index arrays), not ``pl.ds`` slices: the first T-block's
halo starts before row 0, and interpret mode clamps a negative slice start (its dynamic_slice) where
Triton would just mask; clipped indices plus the mask read the same on both. Columns stay contiguous
(stride 1), so the GPU loads are still vectorised along C.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt  # masked load/store, CompilerParams (jax 0.10 and 0.11)

from ..activations import ACTIVATIONS

load, store = plt.load, plt.store
f32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class Static:
    """Everything the kernels specialise on (hashable)."""

    B: int
    T: int
    C: int
    Kc: int
    BT: int
    BC: int
    activation: str
    has_seg: bool
    interpret: bool
    num_warps: int
    num_stages: int
    steps: int = 1  # consecutive T-blocks per program (the backward's walk)

    @property
    def NT(self) -> int:
        return -(-self.T // self.BT)

    @property
    def NC(self) -> int:
        return -(-self.C // self.BC)

    def act(self, acc):
        return ACTIVATIONS[self.activation](acc)


def rows_at(st: Static, t0, d):
    """(clipped row indices [BT], in-range mask [BT]) of rows t0 + d .. t0 + d + BT."""
    r = t0 + d + jnp.arange(st.BT)
    return jnp.clip(r, 0, st.T - 1), (r >= 0) & (r < st.T)


def cols_at(st: Static, c0):
    c = c0 + jnp.arange(st.BC)
    return jnp.minimum(c, st.C - 1), c < st.C


def load_x(st: Static, ref, b, t0, d, c0):
    """x rows t0 + d .. (zeros outside [0, T) and past C) as [BT, BC], in x's dtype (a 16-bit tile
    held for reuse takes half the registers; callers widen it at use)."""
    r, rm = rows_at(st, t0, d)
    c, cm = cols_at(st, c0)
    shape = (st.BT, st.BC)
    idx = (b, jnp.broadcast_to(r[:, None], shape), jnp.broadcast_to(c[None, :], shape))
    return load(ref.at[idx], mask=rm[:, None] & cm[None, :], other=0)


def store_x(st: Static, ref, val, b, t0, c0):
    """val -> rows t0 .. t0 + BT of ref [B, T, C] (masked at T and C). A slice, not a gather: its start
    is never negative, and interpret mode's scatter would let a clipped duplicate index write last."""
    m = ((t0 + jnp.arange(st.BT)) < st.T)[:, None] & cols_at(st, c0)[1][None, :]
    store(ref.at[b, pl.ds(t0, st.BT), pl.ds(c0, st.BC)], val.astype(ref.dtype), mask=m)


def load_taps(st: Static, w_ref, c0):
    """The kernel's Kc rows [BC] fp32 (zeros past C)."""
    cm = cols_at(st, c0)[1]
    return [load(w_ref.at[dyn(j, c0), pl.ds(c0, st.BC)], mask=cm, other=0).astype(f32) for j in range(st.Kc)]


def dyn(i: int, traced):
    """A static index as a traced scalar: interpret mode's discharge takes no Python int next to a slice."""
    return traced * 0 + i


def load_seg(st: Static, seg_ref, b, t0, d):
    """Segment ids of rows t0 + d .. [BT] (rows outside [0, T) read -1: never a real token's match
    that matters, since their x loads as zero and their dy is masked)."""
    r, rm = rows_at(st, t0, d)
    return load(seg_ref.at[b, r], mask=rm, other=-1)


class SegCache:
    """Segment ids [BT] of rows t0 + d, loaded once per offset d (or nothing without segments)."""

    def __init__(self, st: Static, seg_ref, b, t0):
        self.st, self.ref, self.b, self.t0, self.ids = st, seg_ref, b, t0, {}

    def same(self, d_tap, d_out):
        """[BT, 1] bool: row t + d_tap is in row t + d_out's document; None without segments."""
        if not self.st.has_seg:
            return None
        for d in (d_tap, d_out):
            if d not in self.ids:
                self.ids[d] = load_seg(self.st, self.ref, self.b, self.t0, d)
        return (self.ids[d_tap] == self.ids[d_out])[:, None]

    def keep(self, x, d_tap, d_out):
        """x (a tile of rows t + d_tap) with the rows outside row t + d_out's document zeroed."""
        same = self.same(d_tap, d_out)
        return x if same is None else jnp.where(same, x, 0.0)


def pre_activation(st: Static, tap, w, d_out=0):
    """(fp32 acc [BT, BC] of rows t + d_out, its Kc masked taps): ``tap(d, d_out)`` is x at row t + d as
    row t + d_out sees it. Summed from zero in tap order j = 0..Kc-1, as the reference does."""
    xs = [tap(d_out - (st.Kc - 1) + j, d_out) for j in range(st.Kc)]
    acc = jnp.zeros((st.BT, st.BC), f32)
    for j in range(st.Kc):
        acc = acc + xs[j] * w[j][None, :]
    return acc, xs


def launch(kernel, st: Static, grid, out_shape, name):
    """``pl.pallas_call`` of ``kernel(*refs, st=st)`` named ``name`` (the name shows in profiles)."""
    params = None if st.interpret else plt.CompilerParams(num_warps=st.num_warps, num_stages=st.num_stages)
    return pl.pallas_call(functools.partial(kernel, st=st), out_shape=out_shape, grid=grid,
                          interpret=st.interpret, name=name, compiler_params=params)


def sds(shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype)
