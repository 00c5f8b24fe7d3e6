"""Small helpers shared by the gated delta rule backends."""

from __future__ import annotations

import jax.numpy as jnp


def segment_starts(segment_ids: jnp.ndarray) -> jnp.ndarray:
    """bool [B, T]: True where the state restarts from zero before token t.

    A restart is any change of id between t-1 and t (t >= 1); comparing
    neighbours rather than ids lets a row reuse an id for a later segment.
    Token 0 never restarts: it continues from ``initial_state``.
    """
    changed = segment_ids[:, 1:] != segment_ids[:, :-1]
    return jnp.concatenate([jnp.zeros_like(changed[:, :1]), changed], axis=1)
