"""Fused, chunked linear cross-entropy with z-loss that never materialises the full [B, T, V] logits.

The sequence is cut into chunks of ``chunk`` positions (strided: chunk j holds positions j, j + n, ...
so that a sequence split over devices stays put) and ``lax.scan`` runs over them; each step
computes ``logits = h_chunk @ W`` ([B, chunk, V], fp32 accumulation), its log-sum-exp, the target logit
and lse^2. Peak extra memory is one chunk's fp32 logits and their gradient, e.g. 8 x 1024 x 100352 x 4 B
= 3.3 GB for a B=8 microbatch at chunk 1024 (vs 26 GB for T=8192 unchunked).

Under differentiation the loss is *fused with its gradient*: the forward pass, while a chunk's logits
are live, also forms d(loss)/d(logits) = (softmax * (1 + 2 z_loss lse) - onehot) * mask, and from it
d hidden (stored, [B, T, H] in hidden's dtype) and d W (summed over chunks in fp32); the backward pass
only scales them by the incoming cotangent. That is three vocabulary-sized matmuls a step (logits,
dh, dW; all with inputs in the compute dtype, fp32 accumulation) instead of four with a
recomputation (or fp32 matmuls for the backward, which is what differentiating an fp32-output matmul
gives), and no fp32 logits kept between the passes.

Loss = sum over valid targets of (lse - logit[target]) + z_loss * sum(lse^2) (OLMo's z-loss), divided
by the number of valid targets for the mean.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp


def chunked_cross_entropy(hidden: jax.Array, kernel: jax.Array, labels: jax.Array, mask: jax.Array, *,
                          z_loss: float = 0.0, chunk: int = 1024, compute_dtype=None,
                          logits_sharding=None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(total loss, mean CE, mean z term) over positions where ``mask`` is true.

    hidden [B, T, H] (final-normed), kernel [H, V], labels [B, T] int, mask [B, T] bool.
    ``compute_dtype`` is the matmul input dtype (None = hidden's). Returns scalars in fp32; only the
    total loss carries gradients (the CE and z means are metrics, see ``cross_entropy_sums``).
    """
    total, ce_sum, z_sum = cross_entropy_sums(hidden, kernel, labels, mask, z_loss=z_loss, chunk=chunk,
                                              compute_dtype=compute_dtype, logits_sharding=logits_sharding)
    count = token_count(mask)
    return total / count, ce_sum / count, z_sum / count


def token_count(mask: jax.Array) -> jax.Array:
    """The loss normaliser: number of valid targets (at least 1), fp32."""
    return jnp.maximum(jnp.sum(mask.astype(jnp.float32)), 1.0)


def cross_entropy_sums(hidden: jax.Array, kernel: jax.Array, labels: jax.Array, mask: jax.Array, *,
                       z_loss: float = 0.0, chunk: int = 1024, compute_dtype=None,
                       logits_sharding=None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(sum of CE + z_loss * sum of lse^2, sum of CE, sum of lse^2) over positions where ``mask`` is true.

    Sums, not means, so that microbatches of one step (gradient accumulation) can be normalised by the
    token count of the whole step. The first (the loss) is differentiable in ``hidden`` and ``kernel``
    (fused forward/backward, see the module doc); the CE and z sums are returned under
    ``stop_gradient`` (metrics: their own gradients would need their own matmuls).
    """
    if hidden.ndim != 3 or kernel.ndim != 2 or kernel.shape[0] != hidden.shape[-1]:
        raise ValueError(f"cross_entropy_sums: hidden [B, T, H] and kernel [H, V] expected, got "
                         f"{hidden.shape} and {kernel.shape}")
    if labels.shape != hidden.shape[:2] or mask.shape != hidden.shape[:2]:
        raise ValueError(f"cross_entropy_sums: labels {labels.shape} and mask {mask.shape} must be "
                         f"hidden's [B, T] = {hidden.shape[:2]}")
    B, T, H = hidden.shape
    c = min(chunk, T)
    n = -(-T // c)
    pad = n * c - T
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        labels = jnp.pad(labels, ((0, 0), (0, pad)))
        mask = jnp.pad(mask, ((0, 0), (0, pad)))
    # [n, B, c, ...]: scan over n strided chunks (chunk j = positions j, j + n, j + 2n, ...; the sums do
    # not depend on order), so the batch and a sequence split over devices (context parallelism) both
    # stay on their devices: every chunk holds an equal slice of each device's positions
    hs = jnp.moveaxis(hidden.reshape(B, c, n, H), 2, 0)
    ls = jnp.moveaxis(labels.reshape(B, c, n), 2, 0).astype(jnp.int32)
    ms = jnp.moveaxis(mask.reshape(B, c, n), 2, 0).astype(jnp.float32)
    statics = (float(z_loss), jnp.dtype(compute_dtype or hidden.dtype), logits_sharding, jnp.dtype(kernel.dtype))
    total, ce_sum, z_sum = _fused_sums(statics, hs, kernel, ls, ms)
    return total, jax.lax.stop_gradient(ce_sum), jax.lax.stop_gradient(z_sum)


def _chunk_logits(h, w, dtype, logits_sharding):
    logits = jnp.einsum("bch,hv->bcv", h.astype(dtype), w, preferred_element_type=jnp.float32)
    if logits_sharding is not None:
        logits = jax.lax.with_sharding_constraint(logits, logits_sharding)
    return logits


def _chunk_stats(logits, lab, m):
    lse = jax.nn.logsumexp(logits, axis=-1)
    tgt = jnp.take_along_axis(logits, lab[..., None], axis=-1)[..., 0]
    return lse, jnp.sum((lse - tgt) * m), jnp.sum(lse * lse * m)


def _scan(statics, hs, kernel, ls, ms, with_grads: bool):
    z_loss, dtype, logits_sharding, _ = statics
    w = kernel.astype(dtype)
    zero = jnp.zeros((), jnp.float32)

    @jax.named_scope("lm_head_ce")
    def body(carry, xs):
        h, lab, m = xs
        logits = _chunk_logits(h, w, dtype, logits_sharding)
        lse, ce, zz = _chunk_stats(logits, lab, m)
        carry = (carry[0] + ce, carry[1] + zz) + carry[2:]
        if not with_grads:
            return carry, None
        # d(ce + z_loss * z)/d logits, in fp32, then the two matmuls in the compute dtype
        p = jnp.exp(logits - lse[..., None])
        onehot = jax.nn.one_hot(lab, logits.shape[-1], dtype=jnp.float32)
        g = ((p * (1.0 + 2.0 * z_loss * lse)[..., None] - onehot) * m[..., None]).astype(dtype)
        dh = jnp.einsum("bcv,hv->bch", g, w, preferred_element_type=jnp.float32).astype(h.dtype)
        dw = carry[2] + jnp.einsum("bch,bcv->hv", h.astype(dtype), g, preferred_element_type=jnp.float32)
        return (carry[0], carry[1], dw), dh

    init = (zero, zero) + ((jnp.zeros(w.shape, jnp.float32),) if with_grads else ())
    carry, dhs = jax.lax.scan(body, init, (hs, ls, ms))
    return carry, dhs


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fused_sums(statics, hs, kernel, ls, ms):
    (ce, zz), _ = _scan(statics, hs, kernel, ls, ms, with_grads=False)
    return ce + statics[0] * zz, ce, zz


def _fused_sums_fwd(statics, hs, kernel, ls, ms):
    (ce, zz, dw), dhs = _scan(statics, hs, kernel, ls, ms, with_grads=True)
    return (ce + statics[0] * zz, ce, zz), (dhs, dw)


def _fused_sums_bwd(statics, res, cts):
    dhs, dw = res
    ct = cts[0]  # the CE and z sums leave cross_entropy_sums under stop_gradient: their cotangents are 0
    return (dhs * ct.astype(dhs.dtype), (dw * ct).astype(statics[3]), None, None)


_fused_sums.defvjp(_fused_sums_fwd, _fused_sums_bwd)


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
