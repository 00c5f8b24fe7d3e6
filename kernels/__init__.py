"""Numerical kernels for olmo_hybrid_jax: one folder per op, arrays in, arrays out.

Nothing here knows about the model; each op validates its own inputs and
dispatches between a simple reference backend and faster ones.
"""

from .gated_delta_rule import (
    BACKENDS,
    ChunkConfig,
    PallasConfig,
    context_parallel_gated_delta_rule,
    decay_gate,
    gated_delta_rule,
    gated_delta_rule_step,
    l2_normalize,
    shapes_supported,
    write_strength,
)

__all__ = [
    "BACKENDS",
    "ChunkConfig",
    "PallasConfig",
    "context_parallel_gated_delta_rule",
    "decay_gate",
    "gated_delta_rule",
    "gated_delta_rule_step",
    "l2_normalize",
    "shapes_supported",
    "write_strength",
]
