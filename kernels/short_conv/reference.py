"""The short conv in plain JAX: an unrolled sum of Kc shifted products (the oracle, and the CPU path)."""

from __future__ import annotations

import jax.numpy as jnp

from .activations import ACTIVATIONS


def short_conv_reference(x, w, *, activation: str, segment_ids=None, history=None):
    """``act(sum_j w[j] * x[t - (Kc - 1) + j])`` [B, T, C] in x.dtype, fp32 accumulation.

    Taps before t = 0 read ``history`` [B, Kc - 1, C] (the previous inputs, oldest first), else zeros;
    with ``segment_ids`` [B, T] a tap counts only when its token has the current token's id.
    """
    B, T, C = x.shape
    Kc = w.shape[0]
    # jnp.pad, not a concatenate with zeros: on a sequence split over devices (context parallelism)
    # XLA's partitioner pads with a (Kc-1)-token halo from the previous shard; a concatenate reshards x
    xp = jnp.pad(x, ((0, 0), (Kc - 1, 0), (0, 0))) if history is None else jnp.concatenate(
        [history.astype(x.dtype), x], axis=1)  # [B, T + Kc - 1, C]
    if segment_ids is not None:
        sp = jnp.pad(segment_ids, ((0, 0), (Kc - 1, 0)), constant_values=-1)
    acc = jnp.zeros((B, T, C), jnp.float32)
    for j in range(Kc):  # Kc is tiny (4): an unrolled sum of shifted products beats a conv op
        tap = xp[:, j:j + T, :]
        if segment_ids is not None:
            tap = jnp.where((sp[:, j:j + T] == segment_ids)[..., None], tap, 0)
        acc = acc + tap.astype(jnp.float32) * w[j].astype(jnp.float32)
    return ACTIVATIONS[activation](acc).astype(x.dtype)

