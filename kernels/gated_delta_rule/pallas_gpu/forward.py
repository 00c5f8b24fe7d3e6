"""The forward kernels: gdn_prep (gamma, Tm), gdn_wu (W, P) and the fused walk gdn_fwd_walk_out.

Per chunk of C = 64 tokens (rows i, j; masks from ``tiles.Chunk``):

    A  = strict_lower(diag(beta) (K K^T) * D),   Tm = (I + A)^{-1}
    W  = Tm diag(beta gq) K   [C, K]          P = Q K^T * D   [C, C]
    Vn = Tm diag(beta) V - W S                (S = state entering the chunk, [K, V], fp32)
    O  = scale (P Vn + diag(gq) Q S)
    S' = d S + (diag(e) K)^T Vn

HBM passes: gdn_prep reads k, g, beta and writes gamma, Tm; gdn_wu reads q, k, beta, gamma, Tm and
writes W, P; the walk reads q, k, v, beta, gamma, Tm, W, P once and writes O and the final state
(plus h[n] = S and Vn when the backward needs them). Rounding: see the package docstring.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from .tiles import (
    SUB,
    C,
    Chunk,
    dyn,
    f32,
    gates,
    head_params,
    launch,
    load,
    load_cnt,
    load_qk,
    load_qk_raw,
    load_rows,
    load_state,
    load_tile,
    mm,
    program_bh,
    sds,
    store,
    store_rows,
    store_state,
    store_tile,
    write_beta,
)


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


def _prep_kernel(k_ref, g_ref, beta_ref, cnt_ref, alog_ref, dtb_ref, gam_ref, tm_ref, *, st):
    """Per chunk: gamma (in-chunk cumulative log decay) and Tm = (I + A)^{-1}.

    The four 16x16 diagonal blocks of Tm by forward substitution (fp32, CUDA cores, advancing
    together), the six off-diagonal blocks by block forward substitution with 16x16x16 dots.
    """
    n = pl.program_id(0)
    b, h = program_bh(st, 1)
    hp = head_params(st, alog_ref, dtb_ref, h)
    nb = C // SUB
    cd = st.cdt
    # 16-bit calls round Tm to cd anyway: the 16x16 block merges may take tf32 dots (as FLA's).
    merge_cd = f32 if st.cd == "float32" else None
    ks, gams, betas, cnts = [], [], [], []
    off = jnp.zeros((), f32)
    for r in range(nb):
        t0 = n * C + r * SUB
        ks.append(load_qk(st, k_ref, b, h, t0, SUB))
        g, beta = gates(st, g_ref, beta_ref, b, h, t0, SUB, hp)
        gam = off + jnp.cumsum(g)
        off = off + jnp.sum(g)
        store(gam_ref.at[b, h, pl.ds(t0, SUB)], gam)
        gams.append(gam)
        betas.append(beta)
        cnts.append(load_cnt(st, cnt_ref, b, t0, SUB))
    idx = jnp.arange(SUB)
    A = {}
    for r in range(nb):
        for c in range(r + 1):
            m = (idx[:, None] > idx[None, :]) if r == c else jnp.ones((SUB, SUB), bool)
            if st.has_seg:
                m = m & (cnts[r][:, None] == cnts[c][None, :])
            kk = mm(ks[r], ks[c], cd, tb=True)
            dec = jnp.exp(jnp.where(m, gams[r][:, None] - gams[c][None, :], 0.0))
            A[r, c] = jnp.where(m, betas[r][:, None] * kk * dec, 0.0)
    diag = _inv_unit_lower_multi([A[r, r] for r in range(nb)], SUB)
    X = {(r, r): diag[r] for r in range(nb)}
    for d in range(1, nb):  # block forward substitution, one sub-diagonal at a time
        for r in range(d, nb):
            c = r - d
            acc = mm(A[r, c], X[c, c], merge_cd)
            for m_ in range(c + 1, r):
                acc = acc + mm(A[r, m_], X[m_, c], merge_cd)
            X[r, c] = -mm(X[r, r], acc, merge_cd)
    zero = jnp.zeros((SUB, SUB), f32)
    for r in range(nb):
        for c in range(nb):
            blk = X[r, c] if c <= r else zero
            store(tm_ref.at[b, h, n, pl.ds(r * SUB, SUB), pl.ds(c * SUB, SUB)], blk.astype(tm_ref.dtype))


def _wu_kernel(q_ref, k_ref, beta_ref, cnt_ref, gam_ref, tm_ref, w_ref, p_ref, *, st):
    """Per chunk, from Tm: W = Tm diag(beta gq) K and P = Q K^T * D (the state-independent part of
    the output). Dot-heavy [C, C] tiles: its own launch so it can take more warps than gdn_prep."""
    n = pl.program_id(0)
    b, h = program_bh(st, 1)
    cd = st.cdt
    tm = load(tm_ref.at[b, h, n])
    t0 = n * C
    gamma = load(gam_ref.at[b, h, pl.ds(t0, C)])
    ch = Chunk(st, load_cnt(st, cnt_ref, b, t0, C), gamma)
    k = load_qk(st, k_ref, b, h, t0, C)
    beta = write_beta(st, beta_ref, b, h, t0, C)
    store_tile(w_ref, mm(tm, (beta * ch.gq)[:, None] * k, cd), b, h, t0, C, 0, st.KP, st.K)
    q = load_qk(st, q_ref, b, h, t0, C)
    store(p_ref.at[b, h, n], (mm(q, k, cd, tb=True) * ch.D).astype(p_ref.dtype))


def _fused_walk_kernel(q_ref, k_ref, v_ref, beta_ref, gam_ref, cnt_ref, tm_ref, w_ref, p_ref, s0_ref,
                       o_ref, st_ref, *res_refs, st):
    """Sequential over chunks with the output fused in; the fp32 state [KP, BVf] stays in registers.

    Per chunk: U = Tm diag(beta) V is made here (cheaper than a round trip of U through HBM),
    Vn = U - W S, O = scale (P Vn + diag(gq) (Q S)), S = d S + K^T (diag(e) Vn); only W S and the
    update are on the sequential path. q and k feed the state dots as loaded and their row factors
    (decays; with the in-kernel l2norm also 1/|q|, 1/|k|) scale the dots' results: Triton's pipeliner
    prefetches only loads that feed a dot. Chunk n + 1's gamma, beta and V tile are loaded during
    chunk n and carried (their first uses are elementwise, so the pipeliner would not prefetch them).
    With ``st.residuals`` (the custom_vjp forward) it also stores h[n] = S and Vn for the backward.
    """
    vb = pl.program_id(0)
    b, h = program_bh(st, 1)
    BV = st.BVf
    v0 = vb * BV
    cd = st.cdt
    # fp16 operands: diag(e r) Vn with r = 1 / |k| could overflow fp16 for small-norm keys, so the
    # normalised k is formed first there (bf16 and fp32 have fp32's exponent range)
    k_first = st.tr.qk_l2norm and st.cd == "float16"
    S0 = load_state(st, s0_ref, b, (b, h), v0, BV).astype(f32)

    def small(n):  # the chunk's vector loads and its V tile
        t0 = dyn(n, b) * C  # never a static start: the last chunk may run past T
        return (load(gam_ref.at[b, h, pl.ds(t0, C)]),
                load_cnt(st, cnt_ref, b, t0, C) if st.has_seg else jnp.zeros((C,), jnp.int32),
                write_beta(st, beta_ref, b, h, t0, C),
                load_rows(v_ref, b, h, t0, C, v0, BV, st.T, st.V))

    def body(n, carry):
        S, cur = carry
        nxt = small(jnp.minimum(n + 1, st.N - 1))  # issued now: its latency hides behind chunk n's dots
        t0 = dyn(n, b) * C
        gamma, cnt, beta, v = cur
        ch = Chunk(st, cnt, gamma, need_d=False)
        bv = beta[:, None] * v.astype(f32)
        Vn = mm(load(tm_ref.at[b, h, n]), bv, cd)  # U
        Vn = Vn - mm(load_tile(w_ref, b, h, t0, C, 0, st.KP, st.K), S, cd)
        pv = mm(load(p_ref.at[b, h, n]), Vn, cd)
        qs, rq = load_qk_raw(st, q_ref, b, h, t0, C)
        gq = ch.gq if rq is None else ch.gq * rq
        o = pv + gq[:, None] * mm(qs, S, cd)
        store_rows(o_ref, st.scale * o, b, h, t0, C, v0, BV, st.T, st.V)
        if st.residuals:
            h_ref, vn_ref = res_refs
            store_state(st, h_ref, S, b, (b, h, n), v0, BV)
            store_tile(vn_ref, Vn, b, h, t0, C, v0, BV, st.V)
        if k_first:
            upd = mm(ch.to_end[:, None] * load_qk(st, k_ref, b, h, t0, C), Vn, cd, ta=True)
        else:  # K^T diag(e r) Vn: k feeds the dot as loaded
            ks, rk = load_qk_raw(st, k_ref, b, h, t0, C)
            te = ch.to_end if rk is None else ch.to_end * rk
            upd = mm(ks, te[:, None] * Vn, cd, ta=True)
        return ch.decay * S + upd, nxt

    S, _ = jax.lax.fori_loop(0, st.N, body, (S0, small(0)))
    store_state(st, st_ref, S, b, (b, h), v0, BV)


# ----------------------------------------------------------------------------- launches


def prep(st, k, g, beta, cnt, alog, dtb):
    """(gamma fp32 [B, H, N*C], Tm [B, H, N, C, C]): gdn_prep, grid (N, B*H), parallel over chunks."""
    return launch(_prep_kernel, st, (st.N, st.B * st.H), (
        sds((st.B, st.H, st.N * C), f32),
        sds((st.B, st.H, st.N, C, C), st.cdt),
    ), "gdn_prep", st.config.num_warps_prep, 1)(k, g, beta, cnt, alog, dtb)


def wu(st, q, k, beta, cnt, gam, tm):
    """(W [B, H, N*C, K], P [B, H, N, C, C]): gdn_wu, grid (N, B*H), parallel over chunks."""
    cfg = st.config
    return launch(_wu_kernel, st, (st.N, st.B * st.H), (
        sds((st.B, st.H, st.N * C, st.K), st.cdt),
        sds((st.B, st.H, st.N, C, C), st.cdt),
    ), "gdn_wu", cfg.num_warps_wu, cfg.num_stages_wu)(q, k, beta, cnt, gam, tm)


def fused_walk(st, q, k, v, beta, gam, cnt, tm, w, pm, s0, o_dtype):
    """(O, final state[, h, Vn]): gdn_fwd_walk_out, grid (V-blocks of block_v_fused, B*H)."""
    outs = (
        sds((st.B, st.T, st.H, st.V), o_dtype),
        sds((st.B, st.H, st.K, st.V), f32),
    )
    if st.residuals:
        outs += (
            sds((st.B, st.H, st.N, st.K, st.V), st.cdt),  # h: chunk-entry states
            sds((st.B, st.H, st.N * C, st.V), st.cdt),  # Vn
        )
    cfg = st.config
    return launch(_fused_walk_kernel, st, (st.NVf, st.B * st.H), outs, "gdn_fwd_walk_out", cfg.num_warps_walk,
                  cfg.num_stages_fused)(q, k, v, beta, gam, cnt, tm, w, pm, s0)


def forward(st, q, k, v, g, beta, s0, alog, dtb, cnt):
    """(O, final state, residuals (gamma, Tm, W, h, Vn) or None): three launches."""
    gam, tm = prep(st, k, g, beta, cnt, alog, dtb)
    w, pm = wu(st, q, k, beta, cnt, gam, tm)
    outs = fused_walk(st, q, k, v, beta, gam, cnt, tm, w, pm, s0, v.dtype)
    return outs[0], outs[1], ((gam, tm, w) + tuple(outs[2:]) if st.residuals else None)
