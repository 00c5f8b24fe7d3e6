"""What every Pallas GDN kernel shares: the static specialisation, tile loads and stores, the gates
on loaded tiles, the per-chunk decay masks, and the launch helper.

Nothing here launches work on its own; the kernels in ``forward.py`` and ``backward.py`` are built
from these pieces. Layouts: inputs [B, T, H, X] and [B, T, H] as the caller passes them; the kernels'
intermediates head-major [B, H, N*C, X] (or [B, H, N, C, C] / [B, H, N, K, V]) so a chunk is one
contiguous tile.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt  # masked load/store, CompilerParams (jax 0.10 and 0.11)

from ..config import PallasConfig
from ..gates import L2NORM_EPS, InputTransforms, decay_gate, write_strength

load, store = plt.load, plt.store

C = 64  # chunk size (the inverse is built from four 16x16 blocks)
SUB = 16
f32 = jnp.float32
_HI = jax.lax.Precision.HIGHEST


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


@dataclasses.dataclass(frozen=True)
class Static:
    """Everything the kernels specialise on (hashable)."""

    B: int
    T: int
    H: int
    K: int
    V: int
    KP: int  # K padded to a power of two in registers (masked loads read no padding bytes)
    BVw: int  # V columns per program of the backward walk
    NVw: int
    BVp: int  # V columns per step of the gradient kernel
    NVp: int
    BVf: int  # V columns per program of the fused forward walk
    NVf: int
    N: int
    scale: float
    cd: str  # dot operand dtype name
    tr: InputTransforms
    has_seg: bool
    interpret: bool
    config: PallasConfig
    residuals: bool = True  # the fused walk also writes h and Vn (the custom_vjp forward)

    @property
    def cdt(self):
        return jnp.dtype(self.cd)


# ----------------------------------------------------------------------------- preambles


def program_bh(st: Static, axis: int):
    """(b, h) of the program's flattened B*H grid axis."""
    bh = pl.program_id(axis)
    return bh // st.H, bh % st.H


def mm(a, b, cd, *, ta=False, tb=False):
    """a @ b (a^T if ta, b^T if tb) with cd operands and fp32 accumulation (cd None: fp32
    operands at default precision)."""
    if cd is None:  # fp32 operands at the backend's default precision (tf32 on GPU)
        cd, prec = f32, None
    else:
        prec = _HI if jnp.dtype(cd) == jnp.float32 else None
    a, b = a.astype(cd), b.astype(cd)
    dims = (((0 if ta else 1,), (1 if tb else 0,)), ((), ()))
    return jax.lax.dot_general(a, b, dims, precision=prec, preferred_element_type=f32)


def dyn(c0, b):
    """A column start the indexer cannot see as a static int (b: any traced int in scope):
    slices may run past K / V (the masks cover that), and jax bounds-checks static starts only."""
    return b * 0 + c0 if isinstance(c0, int) else c0


def tok_mask(t0, n, T):
    return (t0 + jnp.arange(n)) < T


def load_rows(ref, b, h, t0, n, c0, w, T, width):
    """[B, T, H, width] -> tile [n, w] at tokens t0.., columns c0.. (masked, zeros outside)."""
    m = tok_mask(t0, n, T)[:, None] & ((c0 + jnp.arange(w)) < width)[None, :]
    return load(ref.at[b, pl.ds(t0, n), h, pl.ds(dyn(c0, b), w)], mask=m, other=0)


def store_rows(ref, val, b, h, t0, n, c0, w, T, width):
    m = tok_mask(t0, n, T)[:, None] & ((c0 + jnp.arange(w)) < width)[None, :]
    store(ref.at[b, pl.ds(t0, n), h, pl.ds(dyn(c0, b), w)], val.astype(ref.dtype), mask=m)


def load_vec(ref, b, h, t0, n, T):
    """[B, T, H] -> [n] fp32 (zeros outside T)."""
    return load(ref.at[b, pl.ds(t0, n), h], mask=tok_mask(t0, n, T), other=0).astype(f32)


def store_vec(ref, val, b, h, t0, n, T):
    store(ref.at[b, pl.ds(t0, n), h], val.astype(ref.dtype), mask=tok_mask(t0, n, T))


def load_tile(ref, b, h, r0, n, c0, w, width):
    """Head-major padded intermediate [B, H, Tp, width] -> tile [n, w] (columns >= width read as 0)."""
    m = ((c0 + jnp.arange(w)) < width)[None, :] & (jnp.arange(n) >= 0)[:, None]
    return load(ref.at[b, h, pl.ds(r0, n), pl.ds(dyn(c0, b), w)], mask=m, other=0)


def store_tile(ref, val, b, h, r0, n, c0, w, width):
    m = ((c0 + jnp.arange(w)) < width)[None, :] & (jnp.arange(n) >= 0)[:, None]
    store(ref.at[b, h, pl.ds(r0, n), pl.ds(dyn(c0, b), w)], val.astype(ref.dtype), mask=m)


def state_mask(st: Static, v0, BV):
    """[KP, BV]: the real (K, V) entries of a state tile starting at column v0."""
    return (jnp.arange(st.KP) < st.K)[:, None] & ((v0 + jnp.arange(BV)) < st.V)[None, :]


def _state_at(st, ref, b, lead, v0, BV):
    return ref.at[tuple(lead) + (pl.ds(dyn(0, b), st.KP), pl.ds(dyn(v0, b), BV))]


def load_state(st: Static, ref, b, lead, v0, BV):
    """ref[*lead, :KP, v0:v0+BV] of a [..., K, V] state array (zeros outside K, V), as stored."""
    return load(_state_at(st, ref, b, lead, v0, BV), mask=state_mask(st, v0, BV), other=0)


def store_state(st: Static, ref, val, b, lead, v0, BV):
    store(_state_at(st, ref, b, lead, v0, BV), val.astype(ref.dtype), mask=state_mask(st, v0, BV))


# ----------------------------------------------------------------------------- gates and q/k rows


def head_params(st, alog_ref, dtb_ref, h):
    if not st.tr.gate:
        return None, None
    return load(alog_ref.at[pl.ds(h, 1)]).astype(f32), load(dtb_ref.at[pl.ds(h, 1)]).astype(f32)


def gates(st, g_ref, beta_ref, b, h, t0, n, hp):
    """Effective (g, beta) [n] fp32 for tokens t0..t0+n; pad tokens get exactly 0."""
    graw = load_vec(g_ref, b, h, t0, n, st.T)
    g = decay_gate(graw, hp[0], hp[1]) if st.tr.gate else graw
    return jnp.where(tok_mask(t0, n, st.T), g, 0.0), write_beta(st, beta_ref, b, h, t0, n)


def write_beta(st, beta_ref, b, h, t0, n):
    """Effective beta [n] fp32 (0 on pad tokens)."""
    braw = load_vec(beta_ref, b, h, t0, n, st.T)
    beta = write_strength(braw, sigmoid=st.tr.beta_sigmoid, scale=st.tr.beta_scale)
    return jnp.where(tok_mask(t0, n, st.T), beta, 0.0)


def load_qk_raw(st, ref, b, h, t0, n):
    """(q or k rows t0..t0+n as loaded [n, KP]; their l2-normalising factors [n] fp32, or None
    when the kernels do not normalise): normalised rows are diag(r) x."""
    x = load_rows(ref, b, h, t0, n, 0, st.KP, st.T, st.K)
    if not st.tr.qk_l2norm:
        return x, None
    return x, jax.lax.rsqrt(jnp.sum(jnp.square(x.astype(f32)), axis=1) + L2NORM_EPS)


def load_qk(st, ref, b, h, t0, n):
    """q or k rows t0..t0+n [n, KP], l2-normalised (fp32) when asked."""
    x, r = load_qk_raw(st, ref, b, h, t0, n)
    return x if r is None else x.astype(f32) * r[:, None]


def load_cnt(st, cnt_ref, b, t0, n):
    if not st.has_seg:
        return None
    return load(cnt_ref.at[b, pl.ds(t0, n)])


class Chunk:
    """Per-chunk decay quantities (all fp32), computed from the loaded gamma / segment index.

    gamma_i = sum_{s<=i} g_s; with a segment start inside the chunk, "same_ij" (no start in (j, i]),
    "sees_i" (no start in [chunk start, i]) and "last_j" (j in the chunk's last segment) cut the masks:
    D_ij = exp(gamma_i - gamma_j) (i >= j, same_ij), gq_i = exp(gamma_i) sees_i,
    to_end_j = exp(gamma_{C-1} - gamma_j) last_j, decay = gq_{C-1}.
    """

    def __init__(self, st, cnt, gamma, need_d=True):
        idx = jnp.arange(C)
        # gamma_{C-1} by a reduction over the loaded tile: a [1] scalar load measured slower (RESULTS.md)
        glast = jnp.sum(jnp.where(idx == C - 1, gamma, 0.0))
        causal = idx[:, None] >= idx[None, :]
        if st.has_seg:
            same = cnt[:, None] == cnt[None, :]
            sees = cnt == 0
            last = cnt == jnp.max(cnt)
            sees_last = jnp.max(cnt) == 0  # no start anywhere in the chunk
            dmask = causal & same
        else:
            sees = last = None
            sees_last = True
            dmask = causal
        if need_d:
            # mask the exponent before exp: masked-out entries may be positive and overflow
            self.D = jnp.where(dmask, jnp.exp(jnp.where(dmask, gamma[:, None] - gamma[None, :], 0.0)), 0.0)
            self.strict = (idx[:, None] > idx[None, :]) & dmask
        gq = jnp.exp(gamma)
        te = jnp.exp(glast - gamma)
        if st.has_seg:
            gq = jnp.where(sees, gq, 0.0)
            te = jnp.where(last, te, 0.0)
        self.gq, self.to_end = gq, te
        self.decay = jnp.where(sees_last, jnp.exp(glast), 0.0)
        self.gamma = gamma


# ----------------------------------------------------------------------------- launches


def _compiler_params(st, num_warps, num_stages):
    if st.interpret:
        return None
    if st.cd == "float32":
        # fp32 operand tiles are twice the bytes: pipelined copies of [64, 128] fp32 q/k tiles
        # overflow the H200's shared memory, so no load pipelining for fp32 calls.
        num_stages = 1
    return plt.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def launch(kernel, st, grid, out_shape, name, num_warps, num_stages):
    """``pl.pallas_call`` of ``kernel(*refs, st=st)`` named ``name`` (the name shows in profiles)."""
    return pl.pallas_call(
        functools.partial(kernel, st=st),
        out_shape=out_shape,
        grid=grid,
        interpret=st.interpret,
        name=name,
        compiler_params=_compiler_params(st, num_warps, num_stages),
    )


def sds(shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype)
