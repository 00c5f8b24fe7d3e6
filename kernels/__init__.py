"""Numerical kernels for olmo_hybrid_jax: one folder per op, arrays in, arrays out.

Nothing here knows about the model; each op validates its own inputs and
dispatches between a simple reference backend and faster ones. Installed as
``olmo_hybrid_jax.kernels`` (the folder stays at the repository's top level).
"""

from .gated_delta_rule import *  # noqa: F403  (the op's public names, listed in its __all__)
from .gated_delta_rule import __all__  # noqa: F401
