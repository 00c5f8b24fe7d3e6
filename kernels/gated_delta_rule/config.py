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
