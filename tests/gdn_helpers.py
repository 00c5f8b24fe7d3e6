"""Helpers shared by the gated delta rule tests: the independent float64 recurrence, input draws,
segment layouts and the error measure."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def np_gated_delta_rule(q, k, v, g, beta, scale, initial_state=None, segment_ids=None):
    """Independent float64 token-by-token recurrence (the spec, literally)."""
    q, k, v, g, beta = (np.asarray(x, np.float64) for x in (q, k, v, g, beta))
    B, T, H, K = q.shape
    V = v.shape[-1]
    o = np.zeros((B, T, H, V))
    final = np.zeros((B, H, K, V))
    for b in range(B):
        for h in range(H):
            S = np.zeros((K, V)) if initial_state is None else np.asarray(initial_state[b, h], np.float64).copy()
            for t in range(T):
                if segment_ids is not None and t >= 1 and segment_ids[b, t] != segment_ids[b, t - 1]:
                    S = np.zeros((K, V))
                S = np.exp(g[b, t, h]) * S
                kt = k[b, t, h]
                S = S + np.outer(kt, beta[b, t, h] * (v[b, t, h] - S.T @ kt))
                o[b, t, h] = S.T @ (scale * q[b, t, h])
            final[b, h] = S
    return o, final


def l2norm(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def make_inputs(seed, B, T, H, K, V, g_range=(0.005, 5.0), init=True, dtype=jnp.float32):
    """l2-normalised q, k (as the model passes them), |g| log-uniform in g_range, beta in (0, 2)."""
    rng = np.random.default_rng(seed)  # numpy RNG: no per-shape compiles
    q = l2norm(rng.standard_normal((B, T, H, K)))
    k = l2norm(rng.standard_normal((B, T, H, K)))
    v = rng.standard_normal((B, T, H, V))
    g = -np.exp(rng.uniform(np.log(g_range[0]), np.log(g_range[1]), (B, T, H)))
    beta = rng.uniform(0.01, 1.99, (B, T, H))
    s0 = rng.standard_normal((B, H, K, V)) if init else None
    cast = lambda x: None if x is None else jnp.asarray(x, jnp.float32).astype(dtype)
    return tuple(cast(x) for x in (q, k, v, g, beta)) + (cast(s0),)


def make_segments(kind, B, T, seed=0):
    """int32 [B, T] segment ids with restarts of the requested kind (or None)."""
    if kind is None:
        return None
    rng = np.random.default_rng(seed)
    rows = []
    for b in range(B):
        starts = set()
        if kind == "chunk_boundary":
            starts |= {t for t in (64, 128) if t < T}
        elif kind == "inside":
            starts |= {t for t in (37, 100) if t < T}
        elif kind == "t1":
            starts |= {1} if T > 1 else set()
        elif kind == "short":
            t = 0
            while t < T:
                t += int(rng.integers(1, 6))
                starts.add(t)
        elif kind == "mixed":
            starts |= {t for t in (1, 5, 6, 64, 70, 127) if t < T}  # 127: one-token segment carried into chunk 2
        else:
            raise AssertionError(kind)
        if b == 1:  # rows differ: second row also restarts inside the first chunk
            starts |= {t for t in (20,) if t < T}
        ids = np.cumsum([1 if t in starts else 0 for t in range(T)])
        rows.append(ids)
    return jnp.asarray(np.stack(rows), jnp.int32)


def rel_err(x, ref):
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    denom = max(np.abs(ref).max(), 1e-30)
    return np.abs(x - ref).max() / denom
