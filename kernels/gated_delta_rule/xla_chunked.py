"""Chunked (WY / UT transform) gated delta rule in plain XLA.

Algorithm (per batch row b and head h; C = chunk size, all float32)
-------------------------------------------------------------------
T is padded at the end to N * C tokens with q = k = v = g = beta = 0 (a pad
token neither writes the state, since beta = k = 0, nor decays it, since
g = 0) and no segment starts. For each chunk, with rows i, j in [0, C),
gamma_i = sum_{s<=i} g_s and L_ij = sum_{j<s<=i} g_s (the "segsum", formed as a
masked cumulative sum rather than gamma_i - gamma_j, which cancels badly once
gamma reaches -300):

    same_ij = no segment start in (j, i]             (restart = infinite decay)
    D    [C, C] = exp(L_ij) if i >= j and same_ij else 0
    A    [C, C] = strict_lower(diag(beta) (K K^T) * D)
    Tm   [C, C] = (I + A)^{-1}                       (unit lower triangular, recursive 2x2 blocks)
    U    [C, V] = Tm diag(beta) V
    W    [C, K] = Tm diag(beta * exp(gamma) * sees) K
                                 sees_i = no segment start in [chunk start, i]
    -- sequential over chunks, S_in [K, V] = state entering the chunk --
    Vnew [C, V] = U - W S_in                         (the delta-rule "new values")
    S_out       = exp(gamma_{C-1}) sees_{C-1} S_in + (K * exp(L_{C-1, j}) * same_{C-1, j})^T Vnew
    -- parallel over chunks again --
    O    [C, V] = scale (Q * exp(gamma) * sees) S_in + scale ((Q K^T) * D) Vnew

Derivation: writing n_j for the value that token j adds (S_t = a_t S_{t-1} +
k_t n_t^T), n_j = beta_j (v_j - (decayed state before j)^T k_j) and the decayed
state before j is a sum over S_in and earlier n_s, which gives (I + A) N =
diag(beta) V - diag(beta exp(gamma) sees) K S_in, i.e. N = U - W S_in.

Only D, A, Tm, U, W and the output/state weights depend on a single chunk, so
they are computed for all chunks at once; the ``lax.scan`` over chunks does
two [C,K]x[K,V]-sized matmuls per step and emits (S_in, Vnew) so that O is
again one batched matmul outside the scan.

Every exponent is masked with ``jnp.where`` before ``exp`` so no exp of a
positive (masked-out) argument is ever formed: inf * 0 would be NaN in the
values or in the gradients.

HBM passes (as XLA schedules it, roughly): one pass to upcast/pad/transpose
the inputs to the chunk-major layout; one pass writing the intra-chunk
products (D, A, Tm, U, W, [N, B, H, C, C|K|V]); the scan reads U, W and the
state weights once and writes S_in per chunk ([N, B, H, K, V]) and Vnew; one
pass for O; one to un-transpose and cast O. Autodiff through the scan keeps
the per-chunk states (which are emitted anyway) as residuals.

Rounding: inputs are upcast to float32 once; all products, the triangular
inverse and the state run in float32 with HIGHEST matmul precision (no TF32 /
bf16 passes on GPU or TPU). The only rounding to a narrow type is the caller
casting O to v.dtype. The final state stays float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .common import segment_starts
from .config import DEFAULT_CHUNK_CONFIG, ChunkConfig

_HI = jax.lax.Precision.HIGHEST  # fp32 dots stay fp32 on accelerators


def _einsum(spec, *ops):
    return jnp.einsum(spec, *ops, precision=_HI)


def _to_chunks(x, n_chunks, chunk):
    """[B, Tp, H, *rest] -> [N, B, H, C, *rest] (chunk-major so scan runs over axis 0)."""
    B, _, H = x.shape[:3]
    rest = x.shape[3:]
    x = x.reshape((B, n_chunks, chunk, H) + rest)
    perm = (1, 0, 3, 2) + tuple(range(4, 4 + len(rest)))
    return x.transpose(perm)


def unit_lower_inverse(A):
    """(I + A)^{-1} for strictly lower triangular A [..., n, n] (exact zeros on and above the diagonal, which
    the blocks below reuse), by recursive 2 x 2 blocking,

        [[X, 0], [Y, Z]]^{-1} = [[X^-1, 0], [-Z^-1 Y X^-1, Z^-1]],

    with both diagonal halves inverted together (stacked) at each level: log2(n) levels of
    batched matmuls, no LAPACK call (XLA:CPU's triangular-solve custom call deadlocked the
    collectives of multi-device CPU programs) and the same algebra as block forward substitution.
    """
    n = A.shape[-1]
    if n == 1:
        # 1 - A == 1 (a 1 x 1 diagonal block of a strictly lower A is 0): unlike ones_like it keeps A's
        # sharding type on explicit mesh axes (jax 0.11's ones_like drops it and the next batched dot refuses)
        return 1.0 - A
    h = n // 2
    if n % 2 == 0:
        Xi, Zi = unit_lower_inverse(jnp.stack([A[..., :h, :h], A[..., h:, h:]]))
    else:
        Xi, Zi = unit_lower_inverse(A[..., :h, :h]), unit_lower_inverse(A[..., h:, h:])
    Yi = -_einsum("...ij,...jk->...ik", Zi, _einsum("...ij,...jk->...ik", A[..., h:, :h], Xi))
    # A's upper-right block is the zero block (A is strictly lower), with A's sharding type, as above
    top = jnp.concatenate([Xi, A[..., :h, h:]], axis=-1)
    return jnp.concatenate([top, jnp.concatenate([Yi, Zi], axis=-1)], axis=-2)


def chunk_pieces(q, k, v, g, beta, *, scale, starts=None, chunk_size: int = 64):
    """Everything of the chunked form that depends on one chunk only (module docstring).

    q, k [B, T, H, K]; v [B, T, H, V]; g, beta [B, T, H] (any float; used as fp32);
    starts: int/bool [B, T] (1 where the state restarts before token t) or None.
    Returns a dict of chunk-major arrays (N = ceil(T / C)):
        U [N,B,H,C,V], W [N,B,H,C,K], k_end [N,B,H,C,K], state_decay [N,B,H],
        q_state [N,B,H,C,K] (scale folded in), P [N,B,H,C,C] (scale folded in),
    so that, with S_in the state entering chunk n,
        Vnew = U - W S_in;  S_out = state_decay S_in + k_end^T Vnew;  O = q_state S_in + P Vnew.
    """
    f32 = jnp.float32
    q, k, v, g, beta = (x.astype(f32) for x in (q, k, v, g, beta))
    B, T, H, K = q.shape
    C = chunk_size
    N = max(1, -(-T // C))
    pad = N * C - T
    starts = jnp.zeros((B, T), jnp.int32) if starts is None else starts.astype(jnp.int32)

    if pad:
        # Zero pads are inert: beta = k = 0 writes nothing, g = 0 decays nothing.
        padt = lambda x: jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        q, k, v, g, beta, starts = (padt(x) for x in (q, k, v, g, beta, starts))

    qc, kc, vc = (_to_chunks(x, N, C) for x in (q, k, v))  # [N,B,H,C,K|V]
    gc, bc = (_to_chunks(x, N, C) for x in (g, beta))  # [N,B,H,C]
    # Segment index within the chunk, counting a start at the chunk's first token.
    cnt = jnp.cumsum(starts.reshape(B, N, C), axis=-1).transpose(1, 0, 2)[:, :, None, :]  # [N,B,1,C]

    idx = jnp.arange(C)
    causal = idx[:, None] >= idx[None, :]  # i >= j
    strict = idx[:, None] > idx[None, :]  # i > j

    # gamma_i = sum_{s<=i} g_s; L_ij = sum_{j<s<=i} g_s summed directly (no cancellation).
    gamma = jnp.cumsum(gc, axis=-1)  # [N,B,H,C]
    segsum = jnp.cumsum(jnp.where(strict, gc[..., :, None], 0.0), axis=-2)  # [N,B,H,C,C]

    same = cnt[..., :, None] == cnt[..., None, :]  # [N,B,1,C,C]
    dmask = causal & same
    D = jnp.where(dmask, jnp.exp(jnp.where(dmask, segsum, 0.0)), 0.0)  # mask before exp

    sees = cnt == 0  # [N,B,1,C]: token has not crossed a segment start in this chunk
    gexp = jnp.where(sees, jnp.exp(jnp.where(sees, gamma, 0.0)), 0.0)  # [N,B,H,C]

    kk = _einsum("nbhik,nbhjk->nbhij", kc, kc)
    A = jnp.where(strict, bc[..., :, None] * kk * D, 0.0)
    Tm = unit_lower_inverse(A)  # (I + A)^{-1}
    U = _einsum("nbhij,nbhjv->nbhiv", Tm, bc[..., None] * vc)  # [N,B,H,C,V]
    W = _einsum("nbhij,nbhjk->nbhik", Tm, (bc * gexp)[..., None] * kc)  # [N,B,H,C,K]

    # Weights carrying chunk tokens / S_in to the chunk's end.
    last_same = same[..., -1, :]  # [N,B,1,C]: token is in the chunk's last segment
    to_end = jnp.where(last_same, jnp.exp(jnp.where(last_same, segsum[..., -1, :], 0.0)), 0.0)
    k_end = kc * to_end[..., None]  # [N,B,H,C,K]
    state_decay = gexp[..., -1]  # [N,B,H]: exp(gamma_{C-1}) if S_in survives the chunk

    q_state = (scale * gexp)[..., None] * qc  # [N,B,H,C,K]
    P = scale * _einsum("nbhik,nbhjk->nbhij", qc, kc) * D  # [N,B,H,C,C], diagonal kept
    return dict(U=U, W=W, k_end=k_end, state_decay=state_decay, q_state=q_state, P=P)


def chunk_outputs(pieces, S_in, v_new, T):
    """O [B, T, H, V] from the pieces, the chunk-entry states S_in and Vnew (both chunk-major)."""
    o = _einsum("nbhck,nbhkv->nbhcv", pieces["q_state"], S_in) + _einsum("nbhij,nbhjv->nbhiv", pieces["P"], v_new)
    N, B, H, C, V = o.shape
    return o.transpose(1, 0, 3, 2, 4).reshape(B, N * C, H, V)[:, :T]


def chunked_gated_delta_rule(
    q,
    k,
    v,
    g,
    beta,
    *,
    scale,
    initial_state=None,
    segment_ids=None,
    config: ChunkConfig = DEFAULT_CHUNK_CONFIG,
):
    """Chunked gated delta rule (see module docstring for the algorithm).

    Shapes: q, k [B, T, H, K]; v [B, T, H, V]; g, beta [B, T, H];
    initial_state [B, H, K, V] or None (zeros); segment_ids int [B, T] or None.
    Returns o float32 [B, T, H, V] and the final state float32 [B, H, K, V].
    """
    f32 = jnp.float32
    B, T, H, K = q.shape
    V = v.shape[-1]
    state0 = jnp.zeros((B, H, K, V), f32) if initial_state is None else initial_state.astype(f32)
    starts = None if segment_ids is None else segment_starts(segment_ids)
    pc = chunk_pieces(q, k, v, g, beta, scale=scale, starts=starts, chunk_size=config.chunk_size)

    def step(S, xs):
        U_n, W_n, k_end_n, decay_n = xs
        v_new = U_n - _einsum("bhck,bhkv->bhcv", W_n, S)
        S_next = decay_n[..., None, None] * S + _einsum("bhck,bhcv->bhkv", k_end_n, v_new)
        return S_next, (S, v_new)

    final_state, (S_in, v_new) = jax.lax.scan(step, state0, (pc["U"], pc["W"], pc["k_end"], pc["state_decay"]))
    return chunk_outputs(pc, S_in, v_new, T), final_state
