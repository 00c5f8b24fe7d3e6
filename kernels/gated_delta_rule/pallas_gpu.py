"""Chunked gated delta rule as Pallas kernels on the Triton (GPU) backend, forward and backward.

Math (per batch row b, head h; chunk C = 64 tokens; rows i, j of a chunk)
------------------------------------------------------------------------
gamma_i = sum_{s<=i} g_s (in-chunk cumulative log decay); with a segment start
inside the chunk, "same_ij" (no start in (j, i]), "sees_i" (no start in
[chunk start, i]) and "last_j" (j is in the chunk's last segment) cut the masks:

    D_ij   = exp(gamma_i - gamma_j)   if i >= j and same_ij, else 0
    A      = strict_lower(diag(beta) (K K^T) * D),   Tm = (I + A)^{-1}
    gq_i   = exp(gamma_i) sees_i,   e_j = exp(gamma_{C-1} - gamma_j) last_j,   d = gq_{C-1}
    W      = Tm diag(beta gq) K        [C, K]        U = Tm diag(beta) V   [C, V]
    Vn     = U - W S                   (S = state entering the chunk, [K, V], fp32)
    O      = scale (diag(gq) Q S + (Q K^T * D) Vn)
    S'     = d S + (diag(e) K)^T Vn

(Derivation in ``xla_chunked.py``.) The columns of S never mix, so V is cut
into blocks (``PallasConfig.block_v_walk`` / ``block_v``) that run as independent programs.

Kernels (each a ``pl.pallas_call`` with a ``name``)
---------------------------------------------------
gdn_prep       grid (N, B*H), parallel over chunks, one warp by default. gamma (stored fp32
               [B, H, N*C]); Tm: the four 16x16 diagonal blocks of (I + A)^{-1} by forward
               substitution (fp32, CUDA cores, the four blocks advancing together), the six
               off-diagonal blocks by block forward substitution with 16x16x16 dots (IEEE fp32 for
               fp32 calls, tf32 for 16-bit calls, whose Tm is stored in 16 bits anyway).
               HBM: reads k, g, beta; writes gamma, Tm.
gdn_wu         grid (N, B*H), parallel: W = Tm diag(beta gq) K and either P = Q K^T * D (fused
               output, the default) or U = Tm diag(beta) V (separate output kernel).
gdn_fwd_walk_out  (``PallasConfig.fused_output``, the default) grid (V-blocks of block_v_fused,
               B*H), sequential over chunks, the fp32 state in registers. Per chunk:
               U = Tm diag(beta) V, Vn = U - W S, O = scale (P Vn + diag(gq) (Q S)),
               S = d S + K^T (diag(e) Vn); only W S and the update are on the sequential path.
               q and k feed the dots as loaded and their row factors (decays; with the in-kernel
               l2norm also 1/|q|, 1/|k|) scale the dots' results (``scale_after_dot``): Triton's
               pipeliner prefetches only loads that feed a dot. gamma, beta and the V tile of
               chunk n + 1 are loaded during chunk n and carried (``prefetch_fused``).
               A plain forward writes O and the final state only; the custom_vjp forward also
               writes h[n] = S and Vn for the backward.
gdn_fwd_walk   (unfused) grid (V-blocks of block_v_walk, B*H), sequential: h[n] = S (stored),
               Vn = U - W S (stored), S = d S + (diag(e) K)^T Vn; the next chunk's tiles are
               loaded one step ahead.
gdn_fwd_out    (unfused) grid (V-blocks, N, B*H), parallel: O = scale (diag(gq) Q h[n] + (Q K^T * D) Vn).
gdn_bwd_walk   grid (V-blocks, B*H), reverse walk with dS (fp32) in registers, needing no
               forward state: dVn = scale (Q K^T * D)^T dO + diag(e) K dS' (stored),
               dS = d dS' + scale (diag(gq) Q)^T dO - W^T dVn; stores dh[n] = dS' and
               d initial_state. HBM: reads q, k, gamma, W, dO; writes dh, dVn.
gdn_bwd_grads  grid (N, B*H), parallel over chunks: from h, dh, Vn, dVn it accumulates every
               reduction over V in registers (dP = dO Vn^T, dO h^T, Vn dh^T, -dVn h^T,
               dVn (beta V)^T, <h, dh>; dv = beta Tm^T dVn is written per V-block), then runs the
               backward of the WY form (dA = -Tm^T dTm Tm^T), of the decay masks and of the
               in-chunk cumsum (dg = reverse cumsum of dgamma) in-kernel. Writes dq, dk, dv, dg,
               dbeta once. HBM: reads the inputs, dO, gamma, Tm, h, dh, Vn, dVn once.

Forward: prep + W/P + fused walk (three launches); the custom_vjp forward keeps gamma, Tm, W, h
and Vn as residuals (no recomputation in the backward). Backward: backward walk + gradient kernel.

K in the forward kernels: one tile padded to KP = next_pow2(K) (fewer, larger dots; measured
faster on H200 at K = 96 and 128), or with ``PallasConfig.split_k`` power-of-two tiles of at most
64 (96 = 64 + 32) that skip the padding's FLOPs.

Memory stays linear in T: the backward keeps one state per chunk (h), never
one per token. The gate / beta transforms (``gates.py``) run on loaded tiles;
their backward to the raw inputs (a, A_log, dt_bias, b) is an XLA elementwise
epilogue on dg, dbeta ([B, T, H], ~1% of the bytes). With the in-kernel q/k l2norm the forward
kernels normalise their tiles; the backward kernels take q, k normalised by one XLA pass and the
l2norm's backward is chained in XLA on their fp32 dq, dk (normalising every tile in the reverse
walk cost it twice the registers).

Shapes: K and V need not be powers of two. K is padded in registers to
KP = next_pow2(max(K, 16)) by masked loads (the padding reads no HBM bytes);
V is cut into power-of-two blocks (<= next_pow2(V)), the last one masked. Any T:
the last chunk is masked (pad tokens load as q = k = v = beta = g = 0, which
neither write nor decay the state). Segment restarts come in as the per-chunk
segment index of each token (an int32 [B, N*C] built once outside).

Rounding: the state, every accumulator, gamma, the masks and Tm's computation
are fp32. Dot operands are the compute dtype cd = bf16/fp16 when q, k, v are
all 16-bit (tensor cores, fp32 accumulation), else fp32 with IEEE dots (16-bit
calls merge Tm's 16x16 blocks with tf32 dots). The intermediates Tm, W, U, P,
h, Vn, dh, dVn are stored in cd (so a bf16 call rounds
them to bf16, as FLA does); gamma stays fp32. O, dq, dk, dv are rounded once, to
their input dtypes; dg, dbeta, the final state and d initial_state stay fp32.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from jax.experimental.pallas import triton as plt  # masked load/store, CompilerParams (jax 0.10 and 0.11)

_load, _store = plt.load, plt.store
_CompilerParams = plt.CompilerParams

from .common import segment_starts
from .config import DEFAULT_PALLAS_CONFIG, PallasConfig
from .gates import (
    L2NORM_EPS,
    NO_TRANSFORMS,
    InputTransforms,
    decay_gate,
    l2_normalize,
    write_strength,
)

C = 64  # chunk size (the inverse is built from four 16x16 blocks)
SUB = 16
f32 = jnp.float32
_HI = jax.lax.Precision.HIGHEST


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _k_pieces(K: int):
    """((start, width), ...) covering K rounded up to 16, widths 64, then 32 and 16."""
    kr = -(-K // SUB) * SUB
    out, c0 = [], 0
    for w in (64, 32, 16):
        while kr - c0 >= w and (w == 64 or kr - c0 < 2 * w):
            out.append((c0, w))
            c0 += w
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class _Static:
    """Everything the kernels specialise on (hashable)."""

    B: int
    T: int
    H: int
    K: int
    V: int
    KP: int
    BVw: int  # V columns per program of the two walks
    NVw: int
    BVp: int  # V columns per step of the parallel kernels
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
    def kpieces(self):
        """K as power-of-two column tiles of at most 64 (96 -> 64 + 32: no padding to KP), or
        one tile of KP columns when ``config.split_k`` is off (fewer, larger dots)."""
        return _k_pieces(self.K) if self.config.split_k else ((0, self.KP),)

    @property
    def cdt(self):
        return jnp.dtype(self.cd)


# ----------------------------------------------------------------------------- in-kernel helpers


def _mm(a, b, cd, *, ta=False, tb=False):
    """a @ b (a^T if ta, b^T if tb) with cd operands and fp32 accumulation (cd None: fp32
    operands at default precision)."""
    if cd is None:  # fp32 operands at the backend's default precision (tf32 on GPU)
        cd, prec = f32, None
    else:
        prec = _HI if jnp.dtype(cd) == jnp.float32 else None
    a, b = a.astype(cd), b.astype(cd)
    dims = (((0 if ta else 1,), (1 if tb else 0,)), ((), ()))
    return jax.lax.dot_general(a, b, dims, precision=prec, preferred_element_type=f32)


def _dyn(c0, b):
    """A column start the indexer cannot see as a static int (b: any traced int in scope):
    slices may run past K / V (the masks cover that), and jax bounds-checks static starts only."""
    return b * 0 + c0 if isinstance(c0, int) else c0


def _tok_mask(t0, n, T):
    return (t0 + jnp.arange(n)) < T


def _load_rows(ref, b, h, t0, n, c0, w, T, width):
    """[B, T, H, width] -> tile [n, w] at tokens t0.., columns c0.. (masked, zeros outside)."""
    m = _tok_mask(t0, n, T)[:, None] & ((c0 + jnp.arange(w)) < width)[None, :]
    return _load(ref.at[b, pl.ds(t0, n), h, pl.ds(_dyn(c0, b), w)], mask=m, other=0)


def _store_rows(ref, val, b, h, t0, n, c0, w, T, width):
    m = _tok_mask(t0, n, T)[:, None] & ((c0 + jnp.arange(w)) < width)[None, :]
    _store(ref.at[b, pl.ds(t0, n), h, pl.ds(_dyn(c0, b), w)], val.astype(ref.dtype), mask=m)


def _load_vec(ref, b, h, t0, n, T):
    """[B, T, H] -> [n] fp32 (zeros outside T)."""
    return _load(ref.at[b, pl.ds(t0, n), h], mask=_tok_mask(t0, n, T), other=0).astype(f32)


def _store_vec(ref, val, b, h, t0, n, T):
    _store(ref.at[b, pl.ds(t0, n), h], val.astype(ref.dtype), mask=_tok_mask(t0, n, T))


def _head_params(st, alog_ref, dtb_ref, h):
    if not st.tr.gate:
        return None, None
    return _load(alog_ref.at[pl.ds(h, 1)]).astype(f32), _load(dtb_ref.at[pl.ds(h, 1)]).astype(f32)


def _qk(st, x):
    """A loaded q/k tile in the form the dots take (l2-normalised in fp32 when asked)."""
    return l2_normalize(x) if st.tr.qk_l2norm else x


def _gates(st, g_ref, beta_ref, b, h, t0, n, hp):
    """Effective (g, beta) [n] fp32 for tokens t0..t0+n; pad tokens get exactly 0."""
    graw = _load_vec(g_ref, b, h, t0, n, st.T)
    g = decay_gate(graw, hp[0], hp[1]) if st.tr.gate else graw
    return jnp.where(_tok_mask(t0, n, st.T), g, 0.0), _beta(st, beta_ref, b, h, t0, n)


def _beta(st, beta_ref, b, h, t0, n):
    """Effective beta [n] fp32 (0 on pad tokens)."""
    braw = _load_vec(beta_ref, b, h, t0, n, st.T)
    beta = write_strength(braw, sigmoid=st.tr.beta_sigmoid, scale=st.tr.beta_scale)
    return jnp.where(_tok_mask(t0, n, st.T), beta, 0.0)


class _Chunk:
    """Per-chunk decay quantities (all fp32), computed from loaded g / segment index."""

    def __init__(self, st, g, cnt, gamma=None, need_d=True):
        idx = jnp.arange(C)
        if gamma is None:
            gamma = jnp.cumsum(g)
        # gamma_{C-1} by a reduction over the loaded tile (loading it as a [1] scalar in the walks
        # measured 0.610 vs 0.531 ms forward at 1x8192x30, H200s of two commands, 2026-11-26: reverted)
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


def _load_cnt(st, cnt_ref, b, t0, n):
    if not st.has_seg:
        return None
    return _load(cnt_ref.at[b, pl.ds(t0, n)])


# ----------------------------------------------------------------------------- kernels


def _load_tile(ref, b, h, r0, n, c0, w, width):
    """Head-major padded intermediate [B, H, Tp, width] -> tile [n, w] (columns >= width read as 0)."""
    m = ((c0 + jnp.arange(w)) < width)[None, :] & (jnp.arange(n) >= 0)[:, None]
    return _load(ref.at[b, h, pl.ds(r0, n), pl.ds(_dyn(c0, b), w)], mask=m, other=0)


def _store_tile(ref, val, b, h, r0, n, c0, w, width):
    m = ((c0 + jnp.arange(w)) < width)[None, :] & (jnp.arange(n) >= 0)[:, None]
    _store(ref.at[b, h, pl.ds(r0, n), pl.ds(_dyn(c0, b), w)], val.astype(ref.dtype), mask=m)


def _load_qk_raw(st, ref, b, h, t0, n, pieces):
    """(tiles as loaded, one per K piece; the rows' l2-normalising factors [n] fp32, or None
    when the kernels do not normalise): normalised rows are diag(r) x."""
    xs = [_load_rows(ref, b, h, t0, n, c0, w, st.T, st.K) for c0, w in pieces]
    if not st.tr.qk_l2norm:
        return xs, None
    r = jax.lax.rsqrt(sum(jnp.sum(jnp.square(x.astype(f32)), axis=1) for x in xs) + L2NORM_EPS)
    return xs, r


def _load_qk(st, ref, b, h, t0, n, pieces):
    """q or k rows t0..t0+n as column tiles (one per K piece), l2-normalised over all of K
    (fp32) when asked."""
    xs, r = _load_qk_raw(st, ref, b, h, t0, n, pieces)
    return xs if r is None else [x.astype(f32) * r[:, None] for x in xs]


def _mm_pieces(xs, ys, cd, **kw):
    """sum_i xs[i] @ ys[i] (the K pieces of one contraction)."""
    acc = _mm(xs[0], ys[0], cd, **kw)
    for x, y in zip(xs[1:], ys[1:]):
        acc = acc + _mm(x, y, cd, **kw)
    return acc


def _prep_kernel(k_ref, g_ref, beta_ref, cnt_ref, alog_ref, dtb_ref, gam_ref, tm_ref, *, st: _Static):
    """Per chunk: gamma (in-chunk cumulative log decay) and Tm = (I + A)^{-1}."""
    n = pl.program_id(0)
    bh = pl.program_id(1)
    b, h = bh // st.H, bh % st.H
    hp = _head_params(st, alog_ref, dtb_ref, h)
    nb = C // SUB
    cd = st.cdt
    pieces = st.kpieces
    # 16-bit calls round Tm to cd anyway: the 16x16 block merges may take tf32 dots (as FLA's).
    merge_cd = f32 if st.cd == "float32" else None
    ks, gams, betas, cnts = [], [], [], []
    off = jnp.zeros((), f32)
    for r in range(nb):
        t0 = n * C + r * SUB
        ks.append(_load_qk(st, k_ref, b, h, t0, SUB, pieces))
        g, beta = _gates(st, g_ref, beta_ref, b, h, t0, SUB, hp)
        gam = off + jnp.cumsum(g)
        off = off + jnp.sum(g)
        _store(gam_ref.at[b, h, pl.ds(t0, SUB)], gam)
        gams.append(gam)
        betas.append(beta)
        cnts.append(_load_cnt(st, cnt_ref, b, t0, SUB))
    idx = jnp.arange(SUB)
    A = {}
    for r in range(nb):
        for c in range(r + 1):
            m = (idx[:, None] > idx[None, :]) if r == c else jnp.ones((SUB, SUB), bool)
            if st.has_seg:
                m = m & (cnts[r][:, None] == cnts[c][None, :])
            kk = _mm_pieces(ks[r], ks[c], cd, tb=True)
            dec = jnp.exp(jnp.where(m, gams[r][:, None] - gams[c][None, :], 0.0))
            A[r, c] = jnp.where(m, betas[r][:, None] * kk * dec, 0.0)
    diag = _inv_unit_lower_multi([A[r, r] for r in range(nb)], SUB)
    X = {(r, r): diag[r] for r in range(nb)}
    for d in range(1, nb):  # block forward substitution, one sub-diagonal at a time
        for r in range(d, nb):
            c = r - d
            acc = _mm(A[r, c], X[c, c], merge_cd)
            for m_ in range(c + 1, r):
                acc = acc + _mm(A[r, m_], X[m_, c], merge_cd)
            X[r, c] = -_mm(X[r, r], acc, merge_cd)
    zero = jnp.zeros((SUB, SUB), f32)
    for r in range(nb):
        for c in range(nb):
            blk = X[r, c] if c <= r else zero
            _store(tm_ref.at[b, h, n, pl.ds(r * SUB, SUB), pl.ds(c * SUB, SUB)], blk.astype(tm_ref.dtype))


def _wu_kernel(q_ref, k_ref, v_ref, g_ref, beta_ref, cnt_ref, alog_ref, dtb_ref, gam_ref, tm_ref,
               w_ref, up_ref, *qk_refs, st: _Static):
    """Per chunk, from Tm: W = Tm diag(beta gq) K, and U = Tm diag(beta) V for the unfused walk
    or P = Q K^T * D (the state-independent part of the output) for the fused one, which
    makes U itself. Dot-heavy [C, C] tiles: its own launch so it can take more warps than
    the 16x16 work of gdn_prep. With ``config.precompute_qk`` (fused walk) it also writes
    QG = diag(gq) Q and KE = diag(e) K (q, k normalised first when asked), the walk's two
    state-dot operands, so the sequential walk loads them as they are. With
    ``config.output_off_chain`` it writes P' = P Tm in P's place and Q' = diag(gq) Q - P W in
    QG's: since Vn = Tm diag(beta) V - W S, the output P Vn + diag(gq) Q S equals
    P' diag(beta) V + Q' S, whose dots do not wait for Vn."""
    n = pl.program_id(0)
    bh = pl.program_id(1)
    b, h = bh // st.H, bh % st.H
    cd = st.cdt
    pieces = st.kpieces
    tm = _load(tm_ref.at[b, h, n])
    t0 = n * C
    gamma = _load(gam_ref.at[b, h, pl.ds(t0, C)])
    fused = st.config.fused_output
    ch = _Chunk(st, None, _load_cnt(st, cnt_ref, b, t0, C), gamma=gamma, need_d=fused)
    k = _load_qk(st, k_ref, b, h, t0, C, pieces)
    beta = _beta(st, beta_ref, b, h, t0, C)
    ws = [_mm(tm, (beta * ch.gq)[:, None] * ki, cd) for ki in k]
    for (c0, w), wi in zip(pieces, ws):
        _store_tile(w_ref, wi, b, h, t0, C, c0, w, st.K)
    if fused:
        cfg = st.config
        q = _load_qk(st, q_ref, b, h, t0, C, pieces)
        pm = _mm_pieces(q, k, cd, tb=True) * ch.D
        qgs = [ch.gq[:, None] * qi for qi in q]
        if cfg.output_off_chain:
            qgs = [qg - _mm(pm, wi, cd) for qg, wi in zip(qgs, ws)]
            pm = _mm(pm, tm, cd)
        _store(up_ref.at[b, h, n], pm.astype(up_ref.dtype))
        refs = list(qk_refs)
        if cfg.output_off_chain or cfg.precompute_qk:
            qg_ref = refs.pop(0)
            for (c0, w), qg in zip(pieces, qgs):
                _store_tile(qg_ref, qg, b, h, t0, C, c0, w, st.K)
        if cfg.precompute_qk:
            for (c0, w), ki in zip(pieces, k):
                _store_tile(refs[0], ch.to_end[:, None] * ki, b, h, t0, C, c0, w, st.K)
        return
    for vb in range(st.NVp):
        v0 = vb * st.BVp
        v = _load_rows(v_ref, b, h, t0, C, v0, st.BVp, st.T, st.V).astype(f32)
        _store_tile(up_ref, _mm(tm, beta[:, None] * v, cd), b, h, t0, C, v0, st.BVp, st.V)


def _inv_unit_lower_multi(As, n):
    """[(I + A)^{-1} for A in As] (strictly lower [n, n] each), forward substitution, fp32.

    With Y = (I + A)^{-1} - I: Y_i = -A_i - sum_{j<i} A_ij Y_j. Y starts as -A (rows 0 and 1
    are then final), and row i still holds -A_i when its turn comes, so each step extracts
    one row and does one vector-matrix product. The blocks advance together (independent
    work in every step).
    """
    rows = jnp.arange(n)[:, None]
    cols = jnp.arange(n)[None, :]
    eye = jnp.where(rows == cols, 1.0, 0.0).astype(f32)

    def body(i, Ys):
        out = []
        for Y in Ys:
            a = jnp.sum(jnp.where(rows == i, Y, 0.0), axis=0)  # -A_i, zero for j >= i
            upd = jnp.sum(a[:, None] * Y, axis=0)  # only rows j < i (final) contribute
            out.append(jnp.where(rows == i, (a + upd)[None, :], Y))
        return tuple(out)

    Ys = jax.lax.fori_loop(2, n, body, tuple(-A for A in As))
    return [Y + eye for Y in Ys]


def _walk_kernel(k_ref, gam_ref, cnt_ref, w_ref, u_ref, s0_ref, h_ref, vn_ref, st_ref, *, st: _Static):
    """Sequential over chunks; the fp32 state [KP, BVw] stays in registers.

    Per chunk: h[n] = S; Vn = U - W S; S = d S + (diag(e) K)^T Vn. Only the two dots on S are
    on the sequential path. The loads of chunk n + 1 (k, gamma, W, U) are issued at the top of
    step n and carried in registers (manual software pipelining: Triton's pipeliner only
    prefetches loads that feed a dot directly), so their latency hides behind step n's dots.
    """
    vb = pl.program_id(0)
    bh = pl.program_id(1)
    b, h = bh // st.H, bh % st.H
    BV = st.BVw
    v0 = vb * BV
    cd = st.cdt
    smask = (jnp.arange(st.KP) < st.K)[:, None] & ((v0 + jnp.arange(BV)) < st.V)[None, :]
    S0 = _load(s0_ref.at[b, h, pl.ds(_dyn(0, b), st.KP), pl.ds(_dyn(v0, b), BV)], mask=smask, other=0).astype(f32)

    def load(n):
        t0 = _dyn(n, b) * C  # never a static start: the last chunk may run past T
        return (
            _load_rows(k_ref, b, h, t0, C, 0, st.KP, st.T, st.K),
            _load(gam_ref.at[b, h, pl.ds(t0, C)]),
            _load_cnt(st, cnt_ref, b, t0, C) if st.has_seg else jnp.zeros((C,), jnp.int32),
            _load_tile(w_ref, b, h, t0, C, 0, st.KP, st.K),
            _load_tile(u_ref, b, h, t0, C, v0, BV, st.V),
        )

    def body(n, carry):
        S, cur = carry
        nxt = load(jnp.minimum(n + 1, st.N - 1))
        kraw, gamma, cnt, W, U = cur
        k = _qk(st, kraw)
        ch = _Chunk(st, None, cnt if st.has_seg else None, gamma=gamma, need_d=False)
        Vn = U.astype(f32) - _mm(W, S, cd)
        _store(h_ref.at[b, h, n, pl.ds(_dyn(0, b), st.KP), pl.ds(_dyn(v0, b), BV)], S.astype(h_ref.dtype), mask=smask)
        _store_tile(vn_ref, Vn, b, h, n * C, C, v0, BV, st.V)
        return ch.decay * S + _mm(ch.to_end[:, None] * k, Vn, cd, ta=True), nxt

    S, _ = jax.lax.fori_loop(0, st.N, body, (S0, load(0)))
    _store(st_ref.at[b, h, pl.ds(_dyn(0, b), st.KP), pl.ds(_dyn(v0, b), BV)], S, mask=smask)


def _out_kernel(q_ref, k_ref, gam_ref, cnt_ref, h_ref, vn_ref, o_ref, *, st: _Static):
    """Parallel over (V-block, chunk, head): O = scale (diag(gq) Q h[n] + (Q K^T * D) Vn)."""
    vb = pl.program_id(0)
    n = pl.program_id(1)
    bh = pl.program_id(2)
    b, h = bh // st.H, bh % st.H
    BV = st.BVp
    v0 = vb * BV
    cd = st.cdt
    t0 = n * C
    q = _qk(st, _load_rows(q_ref, b, h, t0, C, 0, st.KP, st.T, st.K))
    k = _qk(st, _load_rows(k_ref, b, h, t0, C, 0, st.KP, st.T, st.K))
    gamma = _load(gam_ref.at[b, h, pl.ds(t0, C)])
    ch = _Chunk(st, None, _load_cnt(st, cnt_ref, b, t0, C), gamma=gamma)
    smask = (jnp.arange(st.KP) < st.K)[:, None] & ((v0 + jnp.arange(BV)) < st.V)[None, :]
    S = _load(h_ref.at[b, h, n, pl.ds(_dyn(0, b), st.KP), pl.ds(_dyn(v0, b), BV)], mask=smask, other=0)
    Vn = _load_tile(vn_ref, b, h, t0, C, v0, BV, st.V)
    P = _mm(q, k, cd, tb=True) * ch.D
    o = st.scale * (_mm(ch.gq[:, None] * q, S, cd) + _mm(P, Vn, cd))
    _store_rows(o_ref, o, b, h, t0, C, v0, BV, st.T, st.V)


def _fused_walk_kernel(q_ref, k_ref, v_ref, beta_ref, gam_ref, cnt_ref, tm_ref, w_ref, p_ref, s0_ref,
                       o_ref, st_ref, *res_refs, st: _Static):
    """Forward walk with the output fused in; the state lives as K pieces (64 + 32 for K = 96).

    Per chunk (S = state entering it, as tiles S_i [w_i, BVw] fp32; Tm, W, P from prep):
        Vn  = Tm diag(beta) V - sum_i W_i S_i
        O   = scale (P Vn + sum_i diag(gq) Q_i S_i)
            = scale (P' diag(beta) V + sum_i Q'_i S_i)    (config.output_off_chain)
        S_i = d S_i + (diag(e) K_i)^T Vn
    U = Tm diag(beta) V is made here (it does not depend on the state, and making it costs
    less than a round trip of U through HBM); only W S and the state update are on the
    sequential path. With ``st.residuals`` (the custom_vjp forward) it also stores h[n] = S
    and Vn for the backward; a plain forward writes O and the final state only.
    """
    vb = pl.program_id(0)
    bh = pl.program_id(1)
    b, h = bh // st.H, bh % st.H
    BV = st.BVf
    v0 = vb * BV
    cd = st.cdt
    pieces = st.kpieces
    pre = st.config.precompute_qk
    off = st.config.output_off_chain
    raw = st.config.scale_after_dot
    # fp16 operands: diag(e r) Vn with r = 1 / |k| could overflow fp16 for small-norm keys, so the
    # normalised k is formed first there (bf16 and fp32 have fp32's exponent range)
    raw_k = raw and not (st.tr.qk_l2norm and st.cd == "float16")
    prefetch = st.config.prefetch_fused
    vmask = ((v0 + jnp.arange(BV)) < st.V)[None, :]

    def smask(c0, w):
        return ((c0 + jnp.arange(w)) < st.K)[:, None] & vmask

    def state_ref(ref, *lead, c0, w):
        return ref.at[lead + (pl.ds(_dyn(c0, b), w), pl.ds(_dyn(v0, b), BV))]

    S0 = tuple(_load(state_ref(s0_ref, b, h, c0=c0, w=w), mask=smask(c0, w), other=0).astype(f32)
               for c0, w in pieces)

    def small(n):  # the chunk's vector loads and its V tile
        t0 = _dyn(n, b) * C  # never a static start: the last chunk may run past T
        return (_load(gam_ref.at[b, h, pl.ds(t0, C)]),
                _load_cnt(st, cnt_ref, b, t0, C) if st.has_seg else jnp.zeros((C,), jnp.int32),
                _beta(st, beta_ref, b, h, t0, C),
                _load_rows(v_ref, b, h, t0, C, v0, BV, st.T, st.V))

    def body(n, carry):
        if prefetch:  # issue chunk n + 1's loads now; their latency hides behind chunk n's dots
            S, cur = carry
            nxt = small(jnp.minimum(n + 1, st.N - 1))
        else:
            S, cur, nxt = carry, small(n), None
        t0 = _dyn(n, b) * C
        gamma, cnt, beta, v = cur
        ch = _Chunk(st, None, cnt if st.has_seg else None, gamma=gamma, need_d=False)
        bv = beta[:, None] * v.astype(f32)
        Vn = _mm(_load(tm_ref.at[b, h, n]), bv, cd)  # U
        Vn = Vn - _mm_pieces([_load_tile(w_ref, b, h, t0, C, c0, w, st.K) for c0, w in pieces], S, cd)
        pv = _mm(_load(p_ref.at[b, h, n]), bv if off else Vn, cd)
        if pre or off:  # q_ref holds QG = diag(gq) Q, or Q' (off chain), [B, H, N*C, K] from gdn_wu
            o = pv + _mm_pieces([_load_tile(q_ref, b, h, t0, C, c0, w, st.K) for c0, w in pieces], S, cd)
        elif raw:  # diag(gq r) (Q S): q feeds the dot as loaded
            qs, rq = _load_qk_raw(st, q_ref, b, h, t0, C, pieces)
            gq = ch.gq if rq is None else ch.gq * rq
            o = pv + gq[:, None] * _mm_pieces(qs, S, cd)
        else:
            o = pv + _mm_pieces([ch.gq[:, None] * qi for qi in _load_qk(st, q_ref, b, h, t0, C, pieces)], S, cd)
        _store_rows(o_ref, st.scale * o, b, h, t0, C, v0, BV, st.T, st.V)
        if st.residuals:
            h_ref, vn_ref = res_refs
            for (c0, w), Si in zip(pieces, S):
                _store(state_ref(h_ref, b, h, n, c0=c0, w=w), Si.astype(h_ref.dtype), mask=smask(c0, w))
            _store_tile(vn_ref, Vn, b, h, t0, C, v0, BV, st.V)
        if pre:  # k_ref holds KE = diag(e) K
            upd = [_mm(ke, Vn, cd, ta=True) for ke in
                   [_load_tile(k_ref, b, h, t0, C, c0, w, st.K) for c0, w in pieces]]
        elif raw_k:  # K^T diag(e r) Vn: k feeds the dot as loaded
            ks, rk = _load_qk_raw(st, k_ref, b, h, t0, C, pieces)
            te = ch.to_end if rk is None else ch.to_end * rk
            upd = [_mm(ki, te[:, None] * Vn, cd, ta=True) for ki in ks]
        else:
            upd = [_mm(ch.to_end[:, None] * ki, Vn, cd, ta=True) for ki in _load_qk(st, k_ref, b, h, t0, C, pieces)]
        S = tuple(ch.decay * Si + u for u, Si in zip(upd, S))
        return (S, nxt) if prefetch else S

    S = jax.lax.fori_loop(0, st.N, body, (S0, small(0)) if prefetch else S0)
    S = S[0] if prefetch else S
    for (c0, w), Si in zip(pieces, S):
        _store(state_ref(st_ref, b, h, c0=c0, w=w), Si, mask=smask(c0, w))


def _bwd_walk_kernel(q_ref, k_ref, gam_ref, cnt_ref, w_ref, do_ref, dst_ref, dh_ref, dvn_ref, ds0_ref,
                     *, st: _Static):
    """Reverse walk with dS (fp32) in registers; stores dh[n] = dS' and dVn per chunk.

    dVn = scale (Q K^T * D)^T dO + diag(e) K dS';  dS = d dS' + scale (diag(gq) Q)^T dO - W^T dVn.
    No manual prefetch here: carrying the next chunk's q, k, W, dO tiles spilled registers
    (255 registers, 7 GB of local-memory traffic, 2.5x slower on H200, 2026-11-26).
    """
    vb = pl.program_id(0)
    bh = pl.program_id(1)
    b, h = bh // st.H, bh % st.H
    BV = st.BVw
    v0 = vb * BV
    cd = st.cdt
    smask = (jnp.arange(st.KP) < st.K)[:, None] & ((v0 + jnp.arange(BV)) < st.V)[None, :]
    dS0 = _load(dst_ref.at[b, h, pl.ds(_dyn(0, b), st.KP), pl.ds(_dyn(v0, b), BV)], mask=smask, other=0).astype(f32)

    def body(i, dS):
        n = st.N - 1 - i
        t0 = n * C
        q = _load_rows(q_ref, b, h, t0, C, 0, st.KP, st.T, st.K)  # l2-normalised already (see _gdr_bwd)
        k = _load_rows(k_ref, b, h, t0, C, 0, st.KP, st.T, st.K)
        gamma = _load(gam_ref.at[b, h, pl.ds(t0, C)])
        ch = _Chunk(st, None, _load_cnt(st, cnt_ref, b, t0, C), gamma=gamma)
        W = _load_tile(w_ref, b, h, t0, C, 0, st.KP, st.K)
        do = _load_rows(do_ref, b, h, t0, C, v0, BV, st.T, st.V)
        _store(dh_ref.at[b, h, n, pl.ds(_dyn(0, b), st.KP), pl.ds(_dyn(v0, b), BV)], dS.astype(dh_ref.dtype), mask=smask)
        P = st.scale * _mm(q, k, cd, tb=True) * ch.D
        dVn = _mm(P, do, cd, ta=True) + _mm(ch.to_end[:, None] * k, dS, cd)
        _store_tile(dvn_ref, dVn, b, h, t0, C, v0, BV, st.V)
        return ch.decay * dS + _mm((st.scale * ch.gq)[:, None] * q, do, cd, ta=True) - _mm(W, dVn, cd, ta=True)

    dS = jax.lax.fori_loop(0, st.N, body, dS0)
    _store(ds0_ref.at[b, h, pl.ds(_dyn(0, b), st.KP), pl.ds(_dyn(v0, b), BV)], dS, mask=smask)


def _bwd_grads_kernel(q_ref, k_ref, v_ref, g_ref, beta_ref, cnt_ref, alog_ref, dtb_ref, gam_ref, tm_ref, do_ref,
                      h_ref, dh_ref, vn_ref, dvn_ref, dq_ref, dk_ref, dv_ref, dg_ref, dbeta_ref, *, st: _Static):
    """Parallel over chunks: every input gradient of one chunk, reductions over V in registers."""
    n = pl.program_id(0)
    bh = pl.program_id(1)
    b, h = bh // st.H, bh % st.H
    hp = _head_params(st, alog_ref, dtb_ref, h)
    cd = st.cdt
    t0 = n * C
    # q, k arrive l2-normalised (the backward normalises them in XLA and chains through it there)
    q = _load_rows(q_ref, b, h, t0, C, 0, st.KP, st.T, st.K)
    k = _load_rows(k_ref, b, h, t0, C, 0, st.KP, st.T, st.K)
    _, beta = _gates(st, g_ref, beta_ref, b, h, t0, C, hp)
    gamma = _load(gam_ref.at[b, h, pl.ds(t0, C)])
    ch = _Chunk(st, None, _load_cnt(st, cnt_ref, b, t0, C), gamma=gamma)
    tm = _load(tm_ref.at[b, h, n])  # cd: only ever a dot operand
    kw = ((beta * ch.gq)[:, None] * k).astype(cd)  # the right-hand side that makes W
    BV = st.BVp

    def vblock(vb, acc):
        dP, dqS, dkE, dW, dTm, dbeta, ddecay = acc
        v0 = vb * BV
        smask = (jnp.arange(st.KP) < st.K)[:, None] & ((v0 + jnp.arange(BV)) < st.V)[None, :]
        v = _load_rows(v_ref, b, h, t0, C, v0, BV, st.T, st.V).astype(f32)
        do = _load_rows(do_ref, b, h, t0, C, v0, BV, st.T, st.V)
        S = _load(h_ref.at[b, h, n, pl.ds(_dyn(0, b), st.KP), pl.ds(_dyn(v0, b), BV)], mask=smask, other=0)
        dS = _load(dh_ref.at[b, h, n, pl.ds(_dyn(0, b), st.KP), pl.ds(_dyn(v0, b), BV)], mask=smask, other=0)
        Vn = _load_tile(vn_ref, b, h, t0, C, v0, BV, st.V)
        dVn = _load_tile(dvn_ref, b, h, t0, C, v0, BV, st.V)
        bv = beta[:, None] * v
        dP = dP + _mm(do, Vn, cd, tb=True)
        dqS = dqS + _mm(do, S, cd, tb=True)
        dkE = dkE + _mm(Vn, dS, cd, tb=True)
        dW = dW - _mm(dVn, S, cd, tb=True)
        dTm = dTm + _mm(dVn, bv, cd, tb=True)
        dbv = _mm(tm, dVn, cd, ta=True)  # d(beta V) = Tm^T dU, dU = dVn
        _store_rows(dv_ref, beta[:, None] * dbv, b, h, t0, C, v0, BV, st.T, st.V)
        dbeta = dbeta + jnp.sum(dbv * v, axis=1)
        ddecay = ddecay + jnp.sum(S.astype(f32) * dS.astype(f32))
        return dP, dqS, dkE, dW, dTm, dbeta, ddecay

    zk = jnp.zeros((C, st.KP), f32)
    zc = jnp.zeros((C, C), f32)
    acc = (zc, zk, zk, zk, zc, jnp.zeros((C,), f32), jnp.zeros((), f32))
    # A loop, not unrolled: unrolling the three V blocks doubled the time on H200 (register spills).
    acc = jax.lax.fori_loop(0, st.NVp, vblock, acc)
    dP, dqS, dkE, dW, dTm, dbeta, ddecay = acc

    # W = Tm diag(beta gq) K
    dTm = dTm + _mm(dW, kw, cd, tb=True)
    dkw = _mm(tm, dW, cd, ta=True)
    dk = (beta * ch.gq)[:, None] * dkw
    kdkw = jnp.sum(dkw * k, axis=1)
    dbeta = dbeta + ch.gq * kdkw
    dgq = beta * kdkw
    # Tm = (I + A)^{-1}:  dA = -Tm^T dTm Tm^T on the strictly lower support
    dA = -_mm(_mm(tm, dTm, cd, ta=True), tm, cd, tb=True)
    dA = jnp.where(ch.strict, dA, 0.0)
    kk = _mm(k, k, cd, tb=True)
    dkk = dA * beta[:, None] * ch.D
    dk = dk + _mm(dkk, k, cd) + _mm(dkk, k, cd, ta=True)
    dbeta = dbeta + jnp.sum(dA * kk * ch.D, axis=1)
    # P = scale (Q K^T) * D (diagonal kept)
    qk = _mm(q, k, cd, tb=True)
    dqk = st.scale * dP * ch.D
    dq = _mm(dqk, k, cd)
    dk = dk + _mm(dqk, q, cd, ta=True)
    dDD = (dA * beta[:, None] * kk + st.scale * dP * qk) * ch.D  # dD * D
    # O += scale diag(gq) Q S
    dq = dq + (st.scale * ch.gq)[:, None] * dqS
    dgq = dgq + st.scale * jnp.sum(q * dqS, axis=1)
    # S' += (diag(e) K)^T Vn
    dk = dk + ch.to_end[:, None] * dkE
    dte = jnp.sum(k * dkE, axis=1) * ch.to_end
    # dgamma; gamma_last enters through e and d
    dgam = jnp.sum(dDD, axis=1) - jnp.sum(dDD, axis=0) + dgq * ch.gq - dte
    dlast = jnp.sum(dte) + ddecay * ch.decay
    dgam = dgam + jnp.where(jnp.arange(C) == C - 1, dlast, 0.0)
    dg = jnp.sum(dgam) - jnp.cumsum(dgam) + dgam  # gamma_i = sum_{s<=i} g_s
    _store_rows(dq_ref, dq, b, h, t0, C, 0, st.KP, st.T, st.K)
    _store_rows(dk_ref, dk, b, h, t0, C, 0, st.KP, st.T, st.K)
    _store_vec(dg_ref, dg, b, h, t0, C, st.T)
    _store_vec(dbeta_ref, dbeta, b, h, t0, C, st.T)


# ----------------------------------------------------------------------------- pallas_call wrappers


def _params(st, num_warps, num_stages):
    if st.interpret:
        return None
    if st.cd == "float32":
        # fp32 operand tiles are twice the bytes: pipelined copies of [64, 128] fp32 q/k tiles
        # overflowed the 227 KB of shared memory on H200 (seen 2026-11-26), so no load pipelining.
        num_stages = 1
    return _CompilerParams(num_warps=num_warps, num_stages=num_stages)


def _call(kernel, st, grid, out_shape, name, num_warps, num_stages):
    return pl.pallas_call(
        functools.partial(kernel, st=st),
        out_shape=out_shape,
        grid=grid,
        interpret=st.interpret,
        name=name,
        compiler_params=_params(st, num_warps, num_stages),
    )


def _sds(shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype)


def _prep_tm(st, k, g, beta, cnt, alog, dtb):
    """(gamma, Tm): gdn_prep."""
    return _call(_prep_kernel, st, (st.N, st.B * st.H), (
        _sds((st.B, st.H, st.N * C), f32),  # gamma
        _sds((st.B, st.H, st.N, C, C), st.cdt),  # Tm
    ), "gdn_prep", st.config.num_warps_prep, 1)(k, g, beta, cnt, alog, dtb)


def _prep_wu(st, q, k, v, g, beta, cnt, alog, dtb, gam, tm):
    """(W, U), or (W, P) with the fused output: gdn_wu."""
    cfg = st.config
    outs = (
        _sds((st.B, st.H, st.N * C, st.K), st.cdt),  # W
        _sds((st.B, st.H, st.N, C, C), st.cdt) if cfg.fused_output  # P = Q K^T * D
        else _sds((st.B, st.H, st.N * C, st.V), st.cdt),  # U
    )
    if cfg.fused_output and (cfg.precompute_qk or cfg.output_off_chain):
        outs += (_sds((st.B, st.H, st.N * C, st.K), st.cdt),)  # QG = diag(gq) Q, or Q' = QG - P W
    if cfg.fused_output and cfg.precompute_qk:
        outs += (_sds((st.B, st.H, st.N * C, st.K), st.cdt),)  # KE = diag(e) K
    return tuple(_call(_wu_kernel, st, (st.N, st.B * st.H), outs, "gdn_wu", cfg.num_warps_wu, cfg.num_stages_wu)(
        q, k, v, g, beta, cnt, alog, dtb, gam, tm))


def _prep(st, q, k, v, g, beta, cnt, alog, dtb):
    """(gamma, Tm, W, U), or (gamma, Tm, W, P or P'[, QG or Q'][, KE]) with the fused output."""
    gam, tm = _prep_tm(st, k, g, beta, cnt, alog, dtb)
    return (gam, tm) + _prep_wu(st, q, k, v, g, beta, cnt, alog, dtb, gam, tm)


def _walk(st, k, gam, cnt, w, u, s0):
    outs = (
        _sds((st.B, st.H, st.N, st.K, st.V), st.cdt),  # h: chunk-entry states
        _sds((st.B, st.H, st.N * C, st.V), st.cdt),  # Vn
        _sds((st.B, st.H, st.K, st.V), f32),  # final state
    )
    cfg = st.config
    return _call(_walk_kernel, st, (st.NVw, st.B * st.H), outs, "gdn_fwd_walk", cfg.num_warps_walk,
                 cfg.num_stages_walk)(k, gam, cnt, w, u, s0)


def _fused_walk(st, q, k, v, beta, gam, cnt, tm, w, pm, s0, o_dtype):
    outs = (
        _sds((st.B, st.T, st.H, st.V), o_dtype),  # O
        _sds((st.B, st.H, st.K, st.V), f32),  # final state
    )
    if st.residuals:
        outs += (
            _sds((st.B, st.H, st.N, st.K, st.V), st.cdt),  # h: chunk-entry states
            _sds((st.B, st.H, st.N * C, st.V), st.cdt),  # Vn
        )
    cfg = st.config
    return _call(_fused_walk_kernel, st, (st.NVf, st.B * st.H), outs, "gdn_fwd_walk_out", cfg.num_warps_walk,
                 cfg.num_stages_fused)(q, k, v, beta, gam, cnt, tm, w, pm, s0)


def _out(st, q, k, gam, cnt, hs, vn, o_dtype):
    out = _sds((st.B, st.T, st.H, st.V), o_dtype)
    cfg = st.config
    return _call(_out_kernel, st, (st.NVp, st.N, st.B * st.H), out, "gdn_fwd_out", cfg.num_warps_out,
                 cfg.num_stages_out)(q, k, gam, cnt, hs, vn)


def _bwd_walk(st, q, k, gam, cnt, w, do, dsT):
    outs = (
        _sds((st.B, st.H, st.N, st.K, st.V), st.cdt),  # dh
        _sds((st.B, st.H, st.N * C, st.V), st.cdt),  # dVn
        _sds((st.B, st.H, st.K, st.V), f32),  # d initial_state
    )
    cfg = st.config
    return _call(_bwd_walk_kernel, st, (st.NVw, st.B * st.H), outs, "gdn_bwd_walk", cfg.num_warps_bwd_walk,
                 cfg.num_stages_walk)(q, k, gam, cnt, w, do, dsT)


def _bwd_grads(st, q, k, v, g, beta, cnt, alog, dtb, gam, tm, do, hs, dh, vn, dvn, dqk_dtype):
    outs = (
        _sds(q.shape, dqk_dtype),
        _sds(k.shape, dqk_dtype),
        _sds(v.shape, v.dtype),
        _sds((st.B, st.T, st.H), f32),
        _sds((st.B, st.T, st.H), f32),
    )
    cfg = st.config
    return _call(_bwd_grads_kernel, st, (st.N, st.B * st.H), outs, "gdn_bwd_grads", cfg.num_warps_grad,
                 cfg.num_stages_grad)(q, k, v, g, beta, cnt, alog, dtb, gam, tm, do, hs, dh, vn, dvn)


def _forward(st, q, k, v, g, beta, s0, alog, dtb, cnt):
    """(O, final state, residuals or None). Residuals (gamma, Tm, W, h, Vn) when st.residuals."""
    if st.config.fused_output:
        gam, tm, w, pm, *qk = _prep(st, q, k, v, g, beta, cnt, alog, dtb)
        qw = qk.pop(0) if (st.config.precompute_qk or st.config.output_off_chain) else q  # QG or Q'
        kw = qk.pop(0) if st.config.precompute_qk else k  # KE
        outs = _fused_walk(st, qw, kw, v, beta, gam, cnt, tm, w, pm, s0, v.dtype)
        o, sT = outs[:2]
        return o, sT, ((gam, tm, w) + tuple(outs[2:]) if st.residuals else None)
    gam, tm, w, u = _prep(st, q, k, v, g, beta, cnt, alog, dtb)
    hs, vn, sT = _walk(st, k, gam, cnt, w, u, s0)
    o = _out(st, q, k, gam, cnt, hs, vn, v.dtype)
    return o, sT, (gam, tm, w, hs, vn)


# ----------------------------------------------------------------------------- custom_vjp


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _gdr(st, q, k, v, g, beta, s0, alog, dtb, cnt):
    # A plain forward (no differentiation) writes no residuals.
    o, sT, _ = _forward(dataclasses.replace(st, residuals=False), q, k, v, g, beta, s0, alog, dtb, cnt)
    return o, sT


def _gdr_fwd(st, q, k, v, g, beta, s0, alog, dtb, cnt):
    o, sT, inter = _forward(st, q, k, v, g, beta, s0, alog, dtb, cnt)
    return (o, sT), (q, k, v, g, beta, alog, dtb, cnt) + inter


def _gdr_bwd(st, res, cts):
    q, k, v, g, beta, alog, dtb, cnt, gam, tm, w, hs, vn = res
    do, dsT = cts
    do = do.astype(v.dtype)
    qk_pull = None
    if st.tr.qk_l2norm:
        # The backward kernels take q, k normalised (one parallel XLA pass) instead of normalising
        # every tile in fp32 themselves: that doubled the registers of the latency-bound reverse walk
        # (2.7x slower in training on H200, 2026-11-26). Their dq, dk come back in fp32 and the l2norm
        # is chained through here, like the gates below.
        (qn, kn), qk_pull = jax.vjp(lambda a, b: (l2_normalize(a), l2_normalize(b)), q, k)
        q, k = qn.astype(q.dtype), kn.astype(k.dtype)
        st = dataclasses.replace(st, tr=dataclasses.replace(st.tr, qk_l2norm=False))
    dh, dvn, ds0 = _bwd_walk(st, q, k, gam, cnt, w, do, dsT.astype(f32))
    dq, dk, dv, dg_eff, dbeta_eff = _bwd_grads(st, q, k, v, g, beta, cnt, alog, dtb, gam, tm, do, hs, dh, vn, dvn,
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


# ----------------------------------------------------------------------------- public entry


def chunk_segment_index(segment_ids, T: int, N: int):
    """int32 [B, N*C]: for each token, how many segment starts precede it inside its chunk (itself included).

    Pad tokens (t >= T) get no start, so they carry the last index of their chunk.
    """
    starts = segment_starts(segment_ids).astype(jnp.int32)
    B = starts.shape[0]
    starts = jnp.pad(starts, ((0, 0), (0, N * C - T)))
    return jnp.cumsum(starts.reshape(B, N, C), axis=-1).reshape(B, N * C)


def make_static(B, T, H, K, V, *, scale, cd, transforms=NO_TRANSFORMS, has_seg=False, interpret=False,
                config: PallasConfig = DEFAULT_PALLAS_CONFIG) -> _Static:
    """What the kernels specialise on, for these sizes (block widths clamped to V)."""
    vb = lambda w: min(w, max(SUB, _next_pow2(V)))  # noqa: E731
    BVw, BVp, BVf = vb(config.block_v_walk), vb(config.block_v), vb(config.block_v_fused)
    return _Static(
        B=B, T=T, H=H, K=K, V=V, KP=max(SUB, _next_pow2(K)), BVw=BVw, NVw=-(-V // BVw), BVp=BVp,
        NVp=-(-V // BVp), BVf=BVf, NVf=-(-V // BVf), N=max(1, -(-T // C)), scale=float(scale), cd=cd,
        tr=transforms, has_seg=has_seg, interpret=bool(interpret), config=config,
    )


def supports(q, k, v, platform) -> Optional[str]:
    """Why the Pallas backend cannot take these inputs, or None."""
    if platform not in ("gpu", "cuda", "rocm", "cpu"):
        return f"the pallas backend targets Triton GPUs (interpret mode on CPU); platform is {platform!r}"
    K, V = q.shape[-1], v.shape[-1]
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
    config: PallasConfig = DEFAULT_PALLAS_CONFIG,
    interpret: Optional[bool] = None,
):
    """Pallas (Triton) chunked gated delta rule; see the module docstring.

    Shapes: q, k [B, T, H, K]; v [B, T, H, V]; g, beta [B, T, H] (raw a / b when the
    transforms say so); initial_state [B, H, K, V] or None; segment_ids int [B, T]
    or None; A_log, dt_bias [H] (with transforms.gate). Inputs keep their dtypes.
    Returns o [B, T, H, V] in v.dtype and the final state float32 [B, H, K, V].
    Differentiable (custom_vjp) w.r.t. q, k, v, g, beta, initial_state, A_log, dt_bias.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    st = make_static(B, T, H, K, V, scale=scale, cd=_compute_dtype(q, k, v), transforms=transforms,
                     has_seg=segment_ids is not None, interpret=interpret, config=config)
    N = st.N
    if initial_state is None:
        initial_state = jnp.zeros((B, H, K, V), f32)
    if segment_ids is None:
        cnt = jnp.zeros((1, C), jnp.int32)  # unused placeholder
    else:
        cnt = chunk_segment_index(segment_ids, T, N)
    if transforms.gate:
        alog = jnp.asarray(A_log, f32)
        dtb = jnp.zeros((H,), f32) if dt_bias is None else jnp.asarray(dt_bias, f32)
    else:
        alog = dtb = jnp.zeros((H,), f32)  # unused placeholders
    o, sT = _gdr(st, q, k, v, g, beta, initial_state.astype(f32), alog, dtb, cnt)
    return o, sT
