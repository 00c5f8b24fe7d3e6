"""Block sizes and launch parameters of the gated delta rule backends, and the tuned table.

``ChunkConfig`` tiles the plain-JAX chunked backends. ``PallasConfig`` holds the Pallas (Triton)
kernels' launch parameters; ``tuned_pallas_config(device_kind, K, V)`` picks one from
``TUNED_PALLAS_CONFIGS`` (Levanter's tuned_block_sizes pattern: a data table, not flags), and
``gated_delta_rule(..., config=PallasConfig(...))`` overrides it for one call. ``PALLAS_VARIANTS``
names the alternative launches that ``benchmarks/gdn_bench.py --variants`` times and the tests check
against the oracle. Measurements behind every entry: benchmarks/RESULTS.md.
"""

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
    """Launch parameters of the Pallas (Triton) kernels, per kernel; the chunk size is fixed at 64.

    gdn_prep:          num_warps_prep (16x16 work: one warp).
    gdn_wu:            num_warps_wu, num_stages_wu.
    gdn_fwd_walk_out:  block_v_fused state columns per program (a power of two >= 16),
                       num_warps_walk, num_stages_fused (the loads its pipeliner prefetches).
    gdn_bwd_walk:      block_v_walk state columns per program (latency-bound, one program per
                       (head, V-block): narrower blocks put more programs on the GPU when B*H is
                       small), num_warps_bwd_walk, num_stages_walk.
    gdn_bwd_grads:     block_v V columns per step of its loop over V, num_warps_grad, num_stages_grad.
    """

    block_v_walk: int = 32
    block_v: int = 64
    block_v_fused: int = 64
    num_warps_prep: int = 1
    num_warps_wu: int = 4
    num_stages_wu: int = 1
    num_warps_walk: int = 4
    num_stages_fused: int = 3
    num_warps_bwd_walk: int = 4
    num_stages_walk: int = 2
    num_warps_grad: int = 8
    num_stages_grad: int = 3  # fwd+bwd 1.98 / 2.01 / 2.28 ms with 3 / 2 / 1 at 1x8192x30x96x192 (RESULTS.md, issue 17)

    def __post_init__(self):
        for f in dataclasses.fields(self):
            x = getattr(self, f.name)
            if not isinstance(x, int) or isinstance(x, bool) or x < 1:
                raise ValueError(f"PallasConfig.{f.name} must be a positive int, got {x!r}")
        for name in ("block_v_walk", "block_v", "block_v_fused"):
            bv = getattr(self, name)
            if bv < 16 or bv & (bv - 1):
                raise ValueError(f"PallasConfig.{name} must be a power of two >= 16, got {bv!r}")


DEFAULT_PALLAS_CONFIG = PallasConfig()

#: (device kind, K, V) -> launch parameters; K or V None matches any size. The most specific
#: matching row wins, then the "*" (any device) rows. H100 and H200: the defaults, timed at
#: (K, V) = (96, 192) and (128, 256) (benchmarks/RESULTS.md, run 4).
TUNED_PALLAS_CONFIGS: dict[tuple[str, int | None, int | None], PallasConfig] = {
    ("NVIDIA H200", None, None): DEFAULT_PALLAS_CONFIG,
    ("NVIDIA H100 80GB HBM3", None, None): DEFAULT_PALLAS_CONFIG,
    ("*", None, None): DEFAULT_PALLAS_CONFIG,
}


def tuned_pallas_config(device_kind: str, K: int, V: int) -> PallasConfig:
    """The table's launch parameters for this device and head dims."""
    for kind in (device_kind, "*"):
        for key in ((kind, K, V), (kind, K, None), (kind, None, V), (kind, None, None)):
            if key in TUNED_PALLAS_CONFIGS:
                return TUNED_PALLAS_CONFIGS[key]
    return DEFAULT_PALLAS_CONFIG


#: Named launch variants: timed by ``gdn_bench.py --variants`` and checked against the oracle by
#: the tests (same kernels, other block widths and pipelining; the last V block partly masked).
PALLAS_VARIANTS: dict[str, PallasConfig] = {
    "default": DEFAULT_PALLAS_CONFIG,
    "narrow_v": PallasConfig(block_v_walk=16, block_v=32, block_v_fused=16),
    "wide_v": PallasConfig(block_v_walk=64, block_v=16, block_v_fused=32),
    "fused_2_stages": PallasConfig(num_stages_fused=2),
    "walk_8_warps": PallasConfig(num_warps_walk=8, num_warps_bwd_walk=8),
    # gdn_bwd_grads' load pipelining against the default 3 (what lost, e.g. 4 / 16 warps, 3 stages in
    # the reverse walk: RESULTS.md, issue 17).
    "grads_1_stage": PallasConfig(num_stages_grad=1),
    "grads_2_stages": PallasConfig(num_stages_grad=2),
}
