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

    block_v: state columns per program of the two chunk walks (a power of two >= 16;
        smaller blocks give more programs when B*H is small, at the cost of re-reading
        q, k and Tm once more per block).
    num_warps_* / num_stages_*: Triton's knobs per kernel (inverse, the two walks,
        the parallel gradient kernel).
    """

    block_v: int = 64
    num_warps_inverse: int = 4
    num_warps_walk: int = 4
    num_stages_walk: int = 2
    num_warps_grad: int = 8
    num_stages_grad: int = 1

    def __post_init__(self):
        bv = self.block_v
        if not isinstance(bv, int) or bv < 16 or bv & (bv - 1):
            raise ValueError(f"block_v must be a power of two >= 16, got {bv!r}")


DEFAULT_PALLAS_CONFIG = PallasConfig()
