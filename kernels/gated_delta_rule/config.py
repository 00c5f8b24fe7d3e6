"""Block-size configuration for the chunked gated delta rule."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class ChunkConfig:
    """Static tiling parameters (hashable, so usable as a jit static argument).

    chunk_size: tokens per chunk C. The intra-chunk work is O(C^2) per token
        block and the sequential scan has ceil(T / C) steps; 64 balances the two
        and matches the usual GPU tile.
    """

    chunk_size: int = 64

    def __post_init__(self):
        if not isinstance(self.chunk_size, int) or self.chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive int, got {self.chunk_size!r}")


DEFAULT_CHUNK_CONFIG = ChunkConfig()


@dataclasses.dataclass(frozen=True)
class PallasConfig:
    """Launch parameters of the Pallas (Triton) kernels; the chunk size is fixed at 64.

    block_v_walk: state columns per program of the two sequential chunk walks (a power of
        two >= 16). The walks are latency-bound with one program per (head, V-block), so
        narrower blocks put more programs on the GPU when B*H is small.
    block_v: V columns per step of the parallel kernels (W/U, output, gradients).
    block_v_fused: state columns per program of the fused forward walk (walk + output).
    split_k: in the forward kernels, cut K into power-of-two tiles of at most 64 (K = 96 as
        64 + 32) instead of padding it to the next power of two (one tile of 128).
    num_warps_* / num_stages_*: Triton's knobs per kernel.
    precompute_qk: with the fused output, gdn_wu writes diag(gq) Q and diag(e) K (q, k
        normalised when asked) and the sequential walk feeds them to its state dots as loaded,
        instead of normalising and scaling its q, k tiles itself on every chunk. Off by default:
        with 3 pipeline stages the walk then asked for 238,080 B of shared memory (H200 has
        232,448; 2026-11-26); with 2 stages it fits (see benchmarks/RESULTS.md).
    output_off_chain: with the fused output, gdn_wu writes P' = P Tm and Q' = diag(gq) Q - P W
        so the walk's output is P' diag(beta) V + Q' S: its dots need only the chunk's inputs and
        the entering state, not Vn (the sequential chain is W S -> Vn -> K^T Vn -> S).
    scale_after_dot: in the fused walk, q and k feed the state dots as loaded and their row
        factors (decays, and the l2 norms when the kernels normalise) scale the dots' results:
        diag(gq) (Q S) and K^T diag(e) Vn, instead of diag(gq) Q and diag(e) K first. A load that
        feeds a dot directly is one Triton's pipeliner prefetches. (fp16 operands with the
        in-kernel l2norm keep normalising k first: 1 / |k| times Vn could overflow fp16.)
    prefetch_fused: the fused walk loads chunk n + 1's gamma, beta and V tile at the top of
        chunk n and carries them in registers (their first uses are elementwise, so the
        pipeliner does not prefetch them). The two together: forward 1.707 vs 1.916 ms at
        1 x 32768 x 30 x 96 x 192 (H200, one command, 2026-11-27; benchmarks/RESULTS.md);
        scale_after_dot alone asks for 239,104 B of shared memory at 3 stages (over the card's).
    fused_output: compute the output inside the forward walk (one kernel, no round trip of the
        chunk states h and Vn through HBM; a plain forward then writes no residuals at all)
        instead of the walk + a parallel output kernel.
    """

    block_v_walk: int = 32
    block_v: int = 64
    num_warps_prep: int = 1
    num_warps_walk: int = 4
    num_warps_bwd_walk: int = 4
    num_stages_walk: int = 2
    num_warps_out: int = 4
    num_stages_out: int = 1
    num_warps_grad: int = 8
    num_stages_grad: int = 1
    fused_output: bool = True
    split_k: bool = False
    block_v_fused: int = 64
    num_stages_fused: int = 3
    num_warps_wu: int = 4
    num_stages_wu: int = 1
    precompute_qk: bool = False
    output_off_chain: bool = False
    scale_after_dot: bool = True
    prefetch_fused: bool = True

    def __post_init__(self):
        for name in ("block_v_walk", "block_v", "block_v_fused"):
            bv = getattr(self, name)
            if not isinstance(bv, int) or bv < 16 or bv & (bv - 1):
                raise ValueError(f"{name} must be a power of two >= 16, got {bv!r}")


DEFAULT_PALLAS_CONFIG = PallasConfig()
