"""Launch parameters of the Pallas short conv (a frozen dataclass: hashable, static under jit)."""

from __future__ import annotations

import dataclasses


def _pow2(n) -> bool:
    return isinstance(n, int) and n > 0 and n & (n - 1) == 0


@dataclasses.dataclass(frozen=True)
class ShortConvConfig:
    """Tiles [block_t tokens, block_c channels] (powers of two); a backward program walks
    ``t_blocks_per_program`` consecutive T-blocks, so it writes one dw partial per walk."""

    block_t: int = 32
    block_c: int = 128
    num_warps: int = 4
    num_stages: int = 1
    block_t_bwd: int = 32
    block_c_bwd: int = 128
    num_warps_bwd: int = 8  # 2 Kc - 1 x tiles stay live: 16 elements of each per thread
    t_blocks_per_program: int = 4

    def __post_init__(self):
        for name in ("block_t", "block_c", "block_t_bwd", "block_c_bwd", "num_warps"):
            if not _pow2(getattr(self, name)):
                raise ValueError(f"ShortConvConfig.{name} must be a power of two, got {getattr(self, name)!r}")
        for name in ("num_stages", "num_warps_bwd", "t_blocks_per_program"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"ShortConvConfig.{name} must be a positive int, got {v!r}")


DEFAULT_CONFIG = ShortConvConfig()
