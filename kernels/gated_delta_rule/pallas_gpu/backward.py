"""The backward kernels: the reverse walk gdn_bwd_walk and the per-chunk gradients gdn_bwd_grads.

From the forward's residuals (gamma, Tm, W, h[n] = chunk-entry states, Vn) and dO, dS_T:

    walk (reverse, dS fp32 in registers, no forward state needed):
        dVn = scale (Q K^T * D)^T dO + diag(e) K dS'
        dS  = d dS' + scale (diag(gq) Q)^T dO - W^T dVn          (stores dh[n] = dS', dVn)
    grads (parallel over chunks): every reduction over V accumulated in registers
        (dP = dO Vn^T, dO h^T, Vn dh^T, -dVn h^T, dVn (beta V)^T, <h, dh>; dv = beta Tm^T dVn per
        V-block), then the backward of the WY form (dA = -Tm^T dTm Tm^T), of the decay masks and of
        the in-chunk cumsum (dg = reverse cumsum of dgamma).

HBM passes: the walk reads q, k, gamma, W, dO and writes dh, dVn; the gradient kernel reads the
inputs, dO, gamma, Tm, h, dh, Vn, dVn once and writes dq, dk, dv, dg, dbeta once. Both take q, k
already l2-normalised (``ops.py`` chains the l2norm's backward in XLA).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from .tiles import (
    C,
    Chunk,
    f32,
    gates,
    head_params,
    launch,
    load,
    load_cnt,
    load_rows,
    load_state,
    load_tile,
    mm,
    program_bh,
    sds,
    store_rows,
    store_state,
    store_tile,
    store_vec,
)


def _bwd_walk_kernel(q_ref, k_ref, gam_ref, cnt_ref, w_ref, do_ref, dst_ref, dh_ref, dvn_ref, ds0_ref, *, st):
    """Reverse walk with dS (fp32) in registers; stores dh[n] = dS' and dVn per chunk.

    No manual prefetch here: carrying the next chunk's q, k, W, dO tiles spilled registers
    (benchmarks/RESULTS.md).
    """
    vb = pl.program_id(0)
    b, h = program_bh(st, 1)
    BV = st.BVw
    v0 = vb * BV
    cd = st.cdt
    dS0 = load_state(st, dst_ref, b, (b, h), v0, BV).astype(f32)

    def body(i, dS):
        n = st.N - 1 - i
        t0 = n * C
        q = load_rows(q_ref, b, h, t0, C, 0, st.KP, st.T, st.K)
        k = load_rows(k_ref, b, h, t0, C, 0, st.KP, st.T, st.K)
        gamma = load(gam_ref.at[b, h, pl.ds(t0, C)])
        ch = Chunk(st, load_cnt(st, cnt_ref, b, t0, C), gamma)
        W = load_tile(w_ref, b, h, t0, C, 0, st.KP, st.K)
        do = load_rows(do_ref, b, h, t0, C, v0, BV, st.T, st.V)
        store_state(st, dh_ref, dS, b, (b, h, n), v0, BV)
        P = st.scale * mm(q, k, cd, tb=True) * ch.D
        dVn = mm(P, do, cd, ta=True) + mm(ch.to_end[:, None] * k, dS, cd)
        store_tile(dvn_ref, dVn, b, h, t0, C, v0, BV, st.V)
        return ch.decay * dS + mm((st.scale * ch.gq)[:, None] * q, do, cd, ta=True) - mm(W, dVn, cd, ta=True)

    dS = jax.lax.fori_loop(0, st.N, body, dS0)
    store_state(st, ds0_ref, dS, b, (b, h), v0, BV)


def _bwd_grads_kernel(q_ref, k_ref, v_ref, g_ref, beta_ref, cnt_ref, alog_ref, dtb_ref, gam_ref, tm_ref, do_ref,
                      h_ref, dh_ref, vn_ref, dvn_ref, dq_ref, dk_ref, dv_ref, dg_ref, dbeta_ref, *, st):
    """Parallel over chunks: every input gradient of one chunk, reductions over V in registers."""
    n = pl.program_id(0)
    b, h = program_bh(st, 1)
    hp = head_params(st, alog_ref, dtb_ref, h)
    cd = st.cdt
    t0 = n * C
    q = load_rows(q_ref, b, h, t0, C, 0, st.KP, st.T, st.K)
    k = load_rows(k_ref, b, h, t0, C, 0, st.KP, st.T, st.K)
    _, beta = gates(st, g_ref, beta_ref, b, h, t0, C, hp)
    gamma = load(gam_ref.at[b, h, pl.ds(t0, C)])
    ch = Chunk(st, load_cnt(st, cnt_ref, b, t0, C), gamma)
    tm = load(tm_ref.at[b, h, n])  # cd: only ever a dot operand
    kw = ((beta * ch.gq)[:, None] * k).astype(cd)  # the right-hand side that makes W
    BV = st.BVp

    def vblock(vb, acc):
        dP, dqS, dkE, dW, dTm, dbeta, ddecay = acc
        v0 = vb * BV
        v = load_rows(v_ref, b, h, t0, C, v0, BV, st.T, st.V).astype(f32)
        do = load_rows(do_ref, b, h, t0, C, v0, BV, st.T, st.V)
        S = load_state(st, h_ref, b, (b, h, n), v0, BV)
        dS = load_state(st, dh_ref, b, (b, h, n), v0, BV)
        Vn = load_tile(vn_ref, b, h, t0, C, v0, BV, st.V)
        dVn = load_tile(dvn_ref, b, h, t0, C, v0, BV, st.V)
        bv = beta[:, None] * v
        dP = dP + mm(do, Vn, cd, tb=True)
        dqS = dqS + mm(do, S, cd, tb=True)
        dkE = dkE + mm(Vn, dS, cd, tb=True)
        dW = dW - mm(dVn, S, cd, tb=True)
        dTm = dTm + mm(dVn, bv, cd, tb=True)
        dbv = mm(tm, dVn, cd, ta=True)  # d(beta V) = Tm^T dU, dU = dVn
        store_rows(dv_ref, beta[:, None] * dbv, b, h, t0, C, v0, BV, st.T, st.V)
        dbeta = dbeta + jnp.sum(dbv * v, axis=1)
        ddecay = ddecay + jnp.sum(S.astype(f32) * dS.astype(f32))
        return dP, dqS, dkE, dW, dTm, dbeta, ddecay

    zk = jnp.zeros((C, st.KP), f32)
    zc = jnp.zeros((C, C), f32)
    acc = (zc, zk, zk, zk, zc, jnp.zeros((C,), f32), jnp.zeros((), f32))
    # A loop, not unrolled: unrolling the V blocks spilled registers (benchmarks/RESULTS.md).
    acc = jax.lax.fori_loop(0, st.NVp, vblock, acc)
    dP, dqS, dkE, dW, dTm, dbeta, ddecay = acc

    # W = Tm diag(beta gq) K
    dTm = dTm + mm(dW, kw, cd, tb=True)
    dkw = mm(tm, dW, cd, ta=True)
    dk = (beta * ch.gq)[:, None] * dkw
    kdkw = jnp.sum(dkw * k, axis=1)
    dbeta = dbeta + ch.gq * kdkw
    dgq = beta * kdkw
    # Tm = (I + A)^{-1}:  dA = -Tm^T dTm Tm^T on the strictly lower support
    dA = -mm(mm(tm, dTm, cd, ta=True), tm, cd, tb=True)
    dA = jnp.where(ch.strict, dA, 0.0)
    kk = mm(k, k, cd, tb=True)
    dkk = dA * beta[:, None] * ch.D
    dk = dk + mm(dkk, k, cd) + mm(dkk, k, cd, ta=True)
    dbeta = dbeta + jnp.sum(dA * kk * ch.D, axis=1)
    # P = scale (Q K^T) * D (diagonal kept)
    qk = mm(q, k, cd, tb=True)
    dqk = st.scale * dP * ch.D
    dq = mm(dqk, k, cd)
    dk = dk + mm(dqk, q, cd, ta=True)
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
    store_rows(dq_ref, dq, b, h, t0, C, 0, st.KP, st.T, st.K)
    store_rows(dk_ref, dk, b, h, t0, C, 0, st.KP, st.T, st.K)
    store_vec(dg_ref, dg, b, h, t0, C, st.T)
    store_vec(dbeta_ref, dbeta, b, h, t0, C, st.T)


# ----------------------------------------------------------------------------- launches


def bwd_walk(st, q, k, gam, cnt, w, do, dsT):
    """(dh, dVn, d initial_state): gdn_bwd_walk, grid (V-blocks of block_v_walk, B*H)."""
    outs = (
        sds((st.B, st.H, st.N, st.K, st.V), st.cdt),
        sds((st.B, st.H, st.N * C, st.V), st.cdt),
        sds((st.B, st.H, st.K, st.V), f32),
    )
    cfg = st.config
    return launch(_bwd_walk_kernel, st, (st.NVw, st.B * st.H), outs, "gdn_bwd_walk", cfg.num_warps_bwd_walk,
                  cfg.num_stages_walk)(q, k, gam, cnt, w, do, dsT)


def bwd_grads(st, q, k, v, g, beta, cnt, alog, dtb, gam, tm, do, hs, dh, vn, dvn, dqk_dtype):
    """(dq, dk, dv, dg, dbeta) of the effective inputs: gdn_bwd_grads, grid (N, B*H)."""
    outs = (
        sds(q.shape, dqk_dtype),
        sds(k.shape, dqk_dtype),
        sds(v.shape, v.dtype),
        sds((st.B, st.T, st.H), f32),
        sds((st.B, st.T, st.H), f32),
    )
    cfg = st.config
    return launch(_bwd_grads_kernel, st, (st.N, st.B * st.H), outs, "gdn_bwd_grads", cfg.num_warps_grad,
                  cfg.num_stages_grad)(q, k, v, g, beta, cnt, alog, dtb, gam, tm, do, hs, dh, vn, dvn)
