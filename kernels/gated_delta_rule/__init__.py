"""Gated delta rule (the linear-attention recurrence of Gated DeltaNet).

Public entry: :func:`gated_delta_rule`; see ``api.py`` for the contract.
"""

from kernels.gated_delta_rule.api import BACKENDS, gated_delta_rule, shapes_supported
from kernels.gated_delta_rule.config import ChunkConfig

__all__ = ["BACKENDS", "ChunkConfig", "gated_delta_rule", "shapes_supported"]
