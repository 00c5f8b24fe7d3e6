"""Causal depthwise short conv + activation (the q, k, v convs of Gated DeltaNet).

Public entry: :func:`short_conv` (see ``api.py`` for the contract); ``short_conv_reference`` is the
plain-JAX oracle, ``ACTIVATIONS`` the activation table it and the kernels share.
"""

from .activations import ACTIVATIONS
from .api import BACKENDS as SHORT_CONV_BACKENDS
from .api import shapes_supported as short_conv_shapes_supported
from .api import short_conv
from .config import ShortConvConfig
from .reference import short_conv_reference

__all__ = [
    "ACTIVATIONS",
    "SHORT_CONV_BACKENDS",
    "ShortConvConfig",
    "short_conv",
    "short_conv_reference",
    "short_conv_shapes_supported",
]
