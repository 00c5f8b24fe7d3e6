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
    block_v: V columns per step of the parallel kernels (prep, output, gradients).
    num_warps_* / num_stages_*: Triton's knobs per kernel.
    """

    block_v_walk: int = 32
    block_v: int = 64
    num_warps_prep: int = 2
    num_warps_walk: int = 4
    num_warps_bwd_walk: int = 4
    num_stages_walk: int = 2
    num_warps_out: int = 4
    num_stages_out: int = 1
    num_warps_grad: int = 8
    num_stages_grad: int = 1

    def __post_init__(self):
        for name in ("block_v_walk", "block_v"):
            bv = getattr(self, name)
            if not isinstance(bv, int) or bv < 16 or bv & (bv - 1):
                raise ValueError(f"{name} must be a power of two >= 16, got {bv!r}")


DEFAULT_PALLAS_CONFIG = PallasConfig()
