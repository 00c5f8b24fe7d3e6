"""The activations that follow the short conv (and the model's MLP), by their Hugging Face names.

One table for the plain-JAX path, the Pallas kernels (which trace the same functions on loaded tiles,
and their derivatives with ``jax.jvp``) and the model.
"""

from __future__ import annotations

from collections.abc import Callable

import jax

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}

# Triton has no erfc lowering: the exact gelu runs on the plain-JAX path only.
PALLAS_ACTIVATIONS = frozenset(ACTIVATIONS) - {"gelu"}
