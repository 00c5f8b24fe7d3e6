"""Inference caches of OLMo Hybrid: one pytree that ``jax.jit`` and ``lax.while_loop`` carry.

Per attention layer (:class:`KVCache`): a preallocated key and value buffer ``[B, nkv, max_len, hd]``
(K stored after k_norm and RoPE, in the compute dtype). The layout is heads-major, HF's
``DynamicCache`` layout: for every (row, head) the [max_len, hd] slab is contiguous, so the decode
step's ``q K^T`` and ``P V`` are plain batched matmuls over (row, head) and XLA never has to relayout
(copy) the cache to feed them; a token-major ``[B, max_len, nkv, hd]`` buffer would force a
transpose of the whole cache per step or a strided batch that cuBLAS cannot take.

Per GDN layer (:class:`GDNCache`): the short-conv windows (the last ``Kc - 1`` PRE-conv inputs of the
q, k and v streams, oldest first, ``[B, Kc - 1, C]``) and the fp32 recurrent state ``[B, nv, dk, dv]``
(HF layout, ``o = S^T q``). Neither depends on the context length: this is the point of the hybrid.

Shared (:class:`Cache`): ``key_mask [B, max_len]`` (True where a real token sits; left padding and
unwritten slots are False), ``length`` (slots filled, the same for every row since prompts are
left-padded to one length) and ``positions [B]`` (real tokens seen per row = the RoPE position of the
next token, HF generate's ``cumsum(attention_mask) - 1`` convention).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from olmo_hybrid_jax.config import LINEAR, OlmoHybridConfig

Array = jax.Array


def _pytree_dataclass(cls):
    cls = dataclasses.dataclass(cls)
    fields = [f.name for f in dataclasses.fields(cls)]
    return jax.tree_util.register_dataclass(cls, data_fields=fields, meta_fields=[])


@_pytree_dataclass
class KVCache:
    """Keys and values of one attention layer, ``[B, nkv, max_len, hd]`` each."""

    k: Array
    v: Array


@_pytree_dataclass
class GDNCache:
    """Short-conv windows ``[B, Kc - 1, C]`` (pre-conv inputs, oldest first) and fp32 state ``[B, nv, dk, dv]``."""

    conv_q: Array
    conv_k: Array
    conv_v: Array
    state: Array


@_pytree_dataclass
class Cache:
    """Everything a continued forward needs: per-layer caches plus the shared slot bookkeeping."""

    layers: tuple
    key_mask: Array  # [B, max_len] bool
    length: Array  # [] int32, slots filled
    positions: Array  # [B] int32, real tokens seen per row

    @property
    def batch_size(self) -> int:
        return self.key_mask.shape[0]

    @property
    def max_len(self) -> int:
        return self.key_mask.shape[1]

    @property
    def nbytes(self) -> int:
        return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(self))


def init_cache(cfg: OlmoHybridConfig, batch_size: int, max_len: int, dtype=jnp.bfloat16) -> Cache:
    """An empty cache for ``batch_size`` rows of up to ``max_len`` tokens.

    ``dtype`` is the storage dtype of keys, values and conv windows (use the model's compute dtype);
    the GDN state is always float32.
    """
    if batch_size < 1 or max_len < 1:
        raise ValueError(f"init_cache needs batch_size >= 1 and max_len >= 1, got {batch_size}, {max_len}")
    B, L = int(batch_size), int(max_len)
    Kc = cfg.linear_conv_kernel_dim
    layers = []
    for t in cfg.layer_types:
        if t == LINEAR:
            layers.append(GDNCache(
                conv_q=jnp.zeros((B, Kc - 1, cfg.linear_key_dim), dtype),
                conv_k=jnp.zeros((B, Kc - 1, cfg.linear_key_dim), dtype),
                conv_v=jnp.zeros((B, Kc - 1, cfg.linear_value_dim), dtype),
                state=jnp.zeros((B, cfg.linear_num_value_heads, cfg.linear_key_head_dim,
                                 cfg.linear_value_head_dim), jnp.float32)))
        else:
            shape = (B, cfg.num_key_value_heads, L, cfg.head_dim)
            layers.append(KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype)))
    return Cache(layers=tuple(layers), key_mask=jnp.zeros((B, L), bool), length=jnp.zeros((), jnp.int32),
                 positions=jnp.zeros((B,), jnp.int32))


def cache_shapes(cfg: OlmoHybridConfig, batch_size: int, max_len: int, dtype=jnp.bfloat16) -> Cache:
    """The cache's leaves as ``jax.ShapeDtypeStruct`` (nothing allocated): for sizing batches."""
    return jax.eval_shape(lambda: init_cache(cfg, batch_size, max_len, dtype))


def cache_nbytes(cfg: OlmoHybridConfig, batch_size: int, max_len: int, dtype=jnp.bfloat16) -> int:
    shapes = cache_shapes(cfg, batch_size, max_len, dtype)
    return sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(shapes))


def set_rows(cache: Cache, rows: Cache, start) -> Cache:
    """Write the caches of ``rows`` (a cache of b rows, same max_len) into rows ``start:start+b`` of ``cache``.

    Used to prefill a large batch a few rows at a time. ``length`` is taken from ``rows`` (every row
    of a left-padded batch fills the same number of slots).
    """
    if rows.max_len != cache.max_len:
        raise ValueError(f"set_rows: max_len {rows.max_len} != {cache.max_len}")

    def put(big, small):
        if big.ndim == 0:
            return small
        return jax.lax.dynamic_update_slice_in_dim(big, small.astype(big.dtype), start, axis=0)

    return jax.tree.map(put, cache, rows)
