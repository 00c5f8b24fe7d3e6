"""Chunked gated delta rule as Pallas kernels on the Triton (GPU) backend, forward and backward.

Math (per batch row b, head h; chunk C = 64 tokens; rows i, j of a chunk; masks in ``tiles.Chunk``)
----------------------------------------------------------------------------------------------
    D_ij = exp(gamma_i - gamma_j) (i >= j, same segment),  A = strict_lower(diag(beta) (K K^T) * D)
    Tm   = (I + A)^{-1},  W = Tm diag(beta gq) K,  U = Tm diag(beta) V,  Vn = U - W S
    O    = scale (diag(gq) Q S + (Q K^T * D) Vn),   S' = d S + (diag(e) K)^T Vn

(derivation in ``xla_chunked.py``). The columns of S never mix, so V is cut into blocks that run as
independent programs.

Stages (one module each)
------------------------
``tiles.py``     the static specialisation, tile loads/stores, gates on loaded tiles, chunk masks,
                 the launch helper: what every kernel shares.
``forward.py``   gdn_prep (gamma, Tm), gdn_wu (W, P = Q K^T * D), gdn_fwd_walk_out (sequential
                 over chunks, the fp32 state in registers, the output fused in). Three launches; a
                 plain forward writes O and the final state only, the custom_vjp forward also the
                 residuals h[n] = S and Vn (nothing is recomputed in the backward).
``backward.py``  gdn_bwd_walk (reverse, dS in registers) and gdn_bwd_grads (parallel over chunks,
                 every input gradient written once).
``ops.py``       the custom_vjp that chains them, the chain rule through the input transforms, and
                 the entry ``pallas_gated_delta_rule``.
Launch parameters: ``PallasConfig`` and the tuned table in ``../config.py``.

Shapes: K and V need not be powers of two. K is padded in registers to KP = next_pow2(max(K, 16))
by masked loads (the padding reads no HBM bytes); V is cut into power-of-two blocks (<= next_pow2(V)),
the last one masked. Any T: the last chunk is masked (pad tokens load as q = k = v = beta = g = 0,
which neither write nor decay the state). Segment restarts come in as the per-chunk segment index of
each token (an int32 [B, N*C] built once outside). Memory stays linear in T: the backward keeps one
state per chunk (h), never one per token.

Input transforms (``gates.py``) run on loaded tiles; their backward to the raw inputs (a, A_log,
dt_bias, b) is an XLA elementwise epilogue on dg, dbeta. With the in-kernel q/k l2norm the forward
kernels normalise their tiles; the backward kernels take q, k normalised by one XLA pass and the
l2norm's backward is chained in XLA on their fp32 dq, dk (normalising every tile in the reverse
walk cost it twice the registers).

Rounding: the state, every accumulator, gamma, the masks and Tm's computation are fp32. Dot operands
are the compute dtype cd = bf16/fp16 when q, k, v are all 16-bit (tensor cores, fp32 accumulation),
else fp32 with IEEE dots (16-bit calls merge Tm's 16x16 blocks with tf32 dots). The intermediates Tm,
W, P, h, Vn, dh, dVn are stored in cd (a bf16 call rounds them to bf16, as FLA does); gamma stays
fp32. O, dq, dk, dv are rounded once, to their input dtypes; dg, dbeta, the final state and
d initial_state stay fp32.
"""

from .ops import chunk_segment_index, make_static, pallas_gated_delta_rule, supports

__all__ = ["chunk_segment_index", "make_static", "pallas_gated_delta_rule", "supports"]
