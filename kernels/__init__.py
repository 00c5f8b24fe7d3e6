"""Numerical kernels for olmo_hybrid_jax: one folder per op, arrays in, arrays out.

Nothing here knows about the model; each op validates its own inputs and
dispatches between a simple reference backend and faster ones. Installed as
``olmo_hybrid_jax.kernels`` (the folder stays at the repository's top level).
"""

from . import gated_delta_rule as _gdr
from . import short_conv as _short_conv
from .gated_delta_rule import *  # noqa: F403  (each op's public names, listed in its __all__)
from .short_conv import *  # noqa: F403

__all__ = [*_gdr.__all__, *_short_conv.__all__]
