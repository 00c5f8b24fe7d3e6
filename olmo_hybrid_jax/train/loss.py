"""Chunked cross-entropy with z-loss that never materialises the full [B, T, V] logits.

The sequence is cut into chunks of ``chunk`` positions; ``lax.scan`` runs over the chunks and each
step computes ``logits = h_chunk @ W`` ([B, chunk, V], fp32 accumulation), its log-sum-exp, the
target logit and lse^2. The step is wrapped in ``jax.checkpoint`` (save nothing), so the backward
pass recomputes one chunk's logits at a time instead of storing them: peak extra memory is one
chunk's fp32 logits plus their gradient, e.g. 8 x 1024 x 100352 x 4 B = 3.3 GB for a B=8 microbatch
at chunk 1024 (vs 26 GB for T=8192 unchunked).

Loss = mean over valid targets of (lse - logit[target]) + z_loss * mean(lse^2) (OLMo's z-loss).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def chunked_cross_entropy(hidden: jax.Array, kernel: jax.Array, labels: jax.Array, mask: jax.Array, *,
                          z_loss: float = 0.0, chunk: int = 1024, compute_dtype=None,
                          logits_sharding=None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(total loss, mean CE, mean z term) over positions where ``mask`` is true.

    hidden [B, T, H] (final-normed), kernel [H, V], labels [B, T] int, mask [B, T] bool.
    ``compute_dtype`` is the matmul input dtype (None = hidden's). Returns scalars in fp32.
    """
    ce_sum, z_sum = cross_entropy_sums(hidden, kernel, labels, mask, chunk=chunk, compute_dtype=compute_dtype,
                                       logits_sharding=logits_sharding)
    count = token_count(mask)
    ce, z = ce_sum / count, z_sum / count
    return ce + z_loss * z, ce, z


def token_count(mask: jax.Array) -> jax.Array:
    """The loss normaliser: number of valid targets (at least 1), fp32."""
    return jnp.maximum(jnp.sum(mask.astype(jnp.float32)), 1.0)


def cross_entropy_sums(hidden: jax.Array, kernel: jax.Array, labels: jax.Array, mask: jax.Array, *,
                       chunk: int = 1024, compute_dtype=None, logits_sharding=None) -> tuple[jax.Array, jax.Array]:
    """(sum of CE, sum of lse^2) over positions where ``mask`` is true, chunked as above (fp32 scalars).

    Sums, not means, so that microbatches of one step (gradient accumulation) can be normalised by the
    token count of the whole step.
    """
    B, T, H = hidden.shape
    dtype = compute_dtype or hidden.dtype
    c = min(chunk, T)
    n = -(-T // c)
    pad = n * c - T
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        labels = jnp.pad(labels, ((0, 0), (0, pad)))
        mask = jnp.pad(mask, ((0, 0), (0, pad)))
    # [n, B, c, ...]: scan over sequence chunks, the batch (and its sharding) stays put
    hs = hidden.reshape(B, n, c, H).swapaxes(0, 1)
    ls = labels.reshape(B, n, c).swapaxes(0, 1)
    ms = mask.reshape(B, n, c).swapaxes(0, 1)
    w = kernel.astype(dtype)

    @jax.checkpoint  # recompute a chunk's logits in the backward pass; store nothing per chunk
    @jax.named_scope("lm_head_ce")
    def chunk_terms(w, h, lab, m):
        logits = jnp.einsum("bch,hv->bcv", h.astype(dtype), w, preferred_element_type=jnp.float32)
        if logits_sharding is not None:
            logits = jax.lax.with_sharding_constraint(logits, logits_sharding)
        lse = jax.nn.logsumexp(logits, axis=-1)
        tgt = jnp.take_along_axis(logits, lab[..., None].astype(jnp.int32), axis=-1)[..., 0]
        mf = m.astype(jnp.float32)
        return jnp.sum((lse - tgt) * mf), jnp.sum(lse * lse * mf)

    def body(acc, xs):
        ce, zz = chunk_terms(w, *xs)
        return (acc[0] + ce, acc[1] + zz), None

    (ce_sum, z_sum), _ = jax.lax.scan(body, (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32)), (hs, ls, ms))
    return ce_sum, z_sum


def reference_cross_entropy(logits: jax.Array, labels: jax.Array, mask: jax.Array, *, z_loss: float = 0.0):
    """The same quantities from full logits [B, T, V] (tests)."""
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    tgt = jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
    mf = mask.astype(jnp.float32)
    count = jnp.maximum(mf.sum(), 1.0)
    ce = jnp.sum((lse - tgt) * mf) / count
    z = jnp.sum(lse * lse * mf) / count
    return ce + z_loss * z, ce, z
