"""Numerical kernels for olmo_hybrid_jax: one folder per op, arrays in, arrays out.

Nothing here knows about the model; each op validates its own inputs and
dispatches between a simple reference backend and faster ones.
"""

from kernels.gated_delta_rule import BACKENDS, ChunkConfig, gated_delta_rule, shapes_supported

__all__ = ["BACKENDS", "ChunkConfig", "gated_delta_rule", "shapes_supported"]
