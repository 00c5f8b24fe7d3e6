"""Gated delta rule (the linear-attention recurrence of Gated DeltaNet).

Public entries: :func:`gated_delta_rule` (a whole sequence; see ``api.py`` for
the contract), :func:`gated_delta_rule_step` (one token against a cached
state, for generation) and :func:`context_parallel_gated_delta_rule` (one
sequence split across a mesh axis).
"""

from .api import BACKENDS, gated_delta_rule, shapes_supported
from .associative_scan import context_parallel_gated_delta_rule
from .common import segment_starts
from .config import PALLAS_VARIANTS, ChunkConfig, PallasConfig, tuned_pallas_config
from .decode import gated_delta_rule_step
from .gates import decay_gate, l2_normalize, write_strength
from .sharding import ShardAxes

__all__ = [
    "BACKENDS",
    "ChunkConfig",
    "PALLAS_VARIANTS",
    "PallasConfig",
    "ShardAxes",
    "context_parallel_gated_delta_rule",
    "decay_gate",
    "gated_delta_rule",
    "gated_delta_rule_step",
    "l2_normalize",
    "segment_starts",
    "shapes_supported",
    "tuned_pallas_config",
    "write_strength",
]
