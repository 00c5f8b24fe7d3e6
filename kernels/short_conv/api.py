"""Public entry point and backend dispatch for the short conv.

Contract (arrays in, arrays out; no model knowledge):

    short_conv(x, w, *, activation, segment_ids=None, history=None, backend="auto",
               config=None, interpret=None) -> y

    x            [B, T, C]       floating
    w            [Kc, C]         floating, tap Kc-1 on the current token (PyTorch Conv1d's
                                 weight [C, 1, Kc] is w.T[:, None, :]: cross-correlation)
    segment_ids  [B, T]          integer or None; a tap counts only when its token has the
                                 current token's id (packed documents)
    history      [B, Kc - 1, C]  or None; the inputs before t = 0, oldest first (a cache), else zeros
    y            [B, T, C]       in x.dtype

    y[t] = act(sum_j w[j] x[t - (Kc-1) + j])   (fp32 accumulation, one rounding)

activation: a name in ``ACTIVATIONS`` ("silu", "gelu_pytorch_tanh", ...). Differentiable w.r.t. x, w
(and history on the reference backend); dx in x.dtype, dw in w.dtype.

Backends: "reference" (plain JAX shifted sum; XLA partitions it, halo included, on a sharded
sequence), "pallas" (Triton kernels, ``pallas_gpu/``; interpret mode on CPU). "auto" is pallas on GPU
when ``shapes_supported`` says it can, the reference elsewhere.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .activations import ACTIVATIONS, PALLAS_ACTIVATIONS
from .config import ShortConvConfig
from .pallas_gpu import pallas_short_conv
from .reference import short_conv_reference

BACKENDS = ("reference", "pallas")
_PALLAS_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def _check(x, w, activation, segment_ids, history) -> str | None:
    """Shared validation: a message naming the problem, or None."""
    for name, a in (("x", x), ("w", w)):
        if not hasattr(a, "shape") or not hasattr(a, "dtype"):
            return f"{name} must be an array, got {type(a).__name__}"
        if not jnp.issubdtype(a.dtype, jnp.floating):
            return f"{name} must be a floating dtype, got {a.dtype}"
    if x.ndim != 3:
        return f"x must have rank 3 [B, T, C], got shape {tuple(x.shape)}"
    B, T, C = x.shape
    if w.ndim != 2 or w.shape[1] != C or w.shape[0] < 1:
        return f"w must have shape [Kc, C] with C = {C} (x {tuple(x.shape)}), got {tuple(w.shape)}"
    if activation not in ACTIVATIONS:
        return f"unknown activation {activation!r}; valid: {', '.join(map(repr, ACTIVATIONS))}"
    if segment_ids is not None:
        if not hasattr(segment_ids, "shape") or tuple(segment_ids.shape) != (B, T):
            return f"segment_ids must have shape [B, T] = {[B, T]}, got {tuple(getattr(segment_ids, 'shape', ()))}"
        if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
            return f"segment_ids must have an integer dtype, got {segment_ids.dtype}"
    if history is not None:
        if segment_ids is not None:
            return "segment_ids and history cannot be combined"
        if not hasattr(history, "shape") or tuple(history.shape) != (B, w.shape[0] - 1, C):
            return (f"history must have shape [B, Kc - 1, C] = {[B, w.shape[0] - 1, C]}, "
                    f"got {tuple(getattr(history, 'shape', ()))}")
    return None


def _pallas_problem(x, w, activation, history) -> str | None:
    if history is not None:
        return "the pallas kernels take no history (a cache); the reference does"
    if activation not in PALLAS_ACTIVATIONS:
        return f"activation {activation!r} has no Triton lowering (erfc); the reference takes it"
    for name, a in (("x", x), ("w", w)):
        if jnp.dtype(a.dtype) not in _PALLAS_DTYPES:
            return f"{name} has dtype {a.dtype}; the pallas kernels take float32, bfloat16 or float16"
    if 0 in x.shape:
        return f"x has an empty dim {tuple(x.shape)}"
    return None


def _resolve(backend, x, w, activation, history) -> str:
    if backend == "auto":
        on_gpu = jax.default_backend() == "gpu"
        return "pallas" if on_gpu and _pallas_problem(x, w, activation, history) is None else "reference"
    return backend


def shapes_supported(backend, x, w, *, activation="silu", segment_ids=None, history=None) -> str | None:
    """Why ``backend`` cannot take these inputs (a message), or None. Arrays or jax.ShapeDtypeStruct."""
    if backend != "auto" and backend not in BACKENDS:
        return f"unknown short_conv backend {backend!r}; valid: 'auto', {', '.join(map(repr, BACKENDS))}"
    problem = _check(x, w, activation, segment_ids, history)
    if problem is None and _resolve(backend, x, w, activation, history) == "pallas":
        problem = _pallas_problem(x, w, activation, history)
    return problem


def short_conv(x, w, *, activation: str, segment_ids=None, history=None, backend: str = "auto",
               config: ShortConvConfig | None = None, interpret: bool | None = None):
    """Causal depthwise short conv + activation; see the module docstring. Raises ValueError naming
    the problem for bad shapes/dtypes, an unknown backend or activation, or a backend that cannot take
    the input."""
    problem = shapes_supported(backend, x, w, activation=activation, segment_ids=segment_ids, history=history)
    if problem is not None:
        raise ValueError(f"short_conv: {problem}")
    if _resolve(backend, x, w, activation, history) == "pallas":
        return pallas_short_conv(x, w, activation=activation, segment_ids=segment_ids, config=config,
                                 interpret=interpret)
    return short_conv_reference(x, w, activation=activation, segment_ids=segment_ids, history=history)
