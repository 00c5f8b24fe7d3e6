"""OLMo Hybrid decoder: Gated DeltaNet (pre-norm) and attention (OLMo 2/3 reordered post-norm) layers.

``OlmoHybridForCausalLM(config, rngs=...)(input_ids) -> logits [B, T, vocab]``. The module tree mirrors
HF's (``model.embed_tokens``, ``model.layers[i].linear_attn`` / ``.self_attn``, ``model.norm``,
``lm_head``), which keeps checkpoint conversion a rename-and-transpose.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from olmo_hybrid_jax.cache import Cache
from olmo_hybrid_jax.config import FULL, LINEAR, OlmoHybridConfig
from olmo_hybrid_jax.modules import MLP, Attention, GatedDeltaNet, RMSNorm

Array = jax.Array


class LinearAttentionDecoderLayer(nnx.Module):
    """GDN layer, pre-norm: ``h = x + GDN(input_layernorm(x)); h + MLP(post_attention_layernorm(h))``."""

    layer_type = LINEAR

    def __init__(self, cfg: OlmoHybridConfig, *, dtype, param_dtype, gdn_backend: str, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=param_dtype)
        self.linear_attn = GatedDeltaNet(cfg, dtype=dtype, param_dtype=param_dtype, backend=gdn_backend, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=param_dtype)
        self.mlp = MLP(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, h: Array, *, positions, segment_ids=None, padding_mask=None, cache=None, cache_index=None,
                 cache_key_mask=None):
        """h [B, T, H] -> [B, T, H]; with ``cache`` (a GDNCache) -> (h, updated cache).

        ``cache_index`` and ``cache_key_mask`` are accepted (and unused) so that both layer kinds take
        the same keywords.
        """
        if cache is None:
            h = h + self.linear_attn(self.input_layernorm(h), segment_ids=segment_ids, padding_mask=padding_mask)
            return h + self.mlp(self.post_attention_layernorm(h))
        y, cache = self.linear_attn(self.input_layernorm(h), padding_mask=padding_mask, cache=cache)
        h = h + y
        return h + self.mlp(self.post_attention_layernorm(h)), cache


class AttentionDecoderLayer(nnx.Module):
    """Attention layer, reordered post-norm: ``h = x + norm(Attn(x)); h + norm(MLP(h))``."""

    layer_type = FULL

    def __init__(self, cfg: OlmoHybridConfig, *, dtype, param_dtype, attention_impl: str, rngs: nnx.Rngs):
        self.self_attn = Attention(cfg, dtype=dtype, param_dtype=param_dtype, implementation=attention_impl,
                                   rngs=rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=param_dtype)
        self.mlp = MLP(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.post_feedforward_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=param_dtype)

    def __call__(self, h: Array, *, positions, segment_ids=None, padding_mask=None, cache=None, cache_index=None,
                 cache_key_mask=None):
        """h [B, T, H] -> [B, T, H]; with ``cache`` (a KVCache) -> (h, updated cache); see ``Attention``."""
        if cache is None:
            h = h + self.post_attention_layernorm(
                self.self_attn(h, positions=positions, segment_ids=segment_ids, key_mask=padding_mask))
            return h + self.post_feedforward_layernorm(self.mlp(h))
        y, cache = self.self_attn(h, positions=positions, key_mask=padding_mask, cache=cache,
                                  cache_index=cache_index, cache_key_mask=cache_key_mask)
        h = h + self.post_attention_layernorm(y)
        return h + self.post_feedforward_layernorm(self.mlp(h)), cache


class OlmoHybridModel(nnx.Module):
    """Embedding, the decoder stack and the final norm (HF ``OlmoHybridModel``)."""

    def __init__(self, cfg: OlmoHybridConfig, *, dtype, param_dtype, gdn_backend: str, attention_impl: str,
                 rngs: nnx.Rngs):
        self.embed_tokens = nnx.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=param_dtype,
                                      embedding_init=nnx.initializers.normal(cfg.initializer_range), rngs=rngs)
        layers = []
        for t in cfg.layer_types:
            if t == LINEAR:
                layers.append(LinearAttentionDecoderLayer(cfg, dtype=dtype, param_dtype=param_dtype,
                                                          gdn_backend=gdn_backend, rngs=rngs))
            else:
                layers.append(AttentionDecoderLayer(cfg, dtype=dtype, param_dtype=param_dtype,
                                                    attention_impl=attention_impl, rngs=rngs))
        self.layers = nnx.List(layers)
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=param_dtype)

    def __call__(self, input_ids: Array, *, positions=None, segment_ids=None, padding_mask=None,
                 cache: tuple | None = None, cache_index=None, cache_key_mask=None):
        """Final-normed hidden states [B, T, H]; with ``cache`` (one layer cache per layer) -> (h, caches)."""
        h = self.embed_tokens(input_ids)
        if cache is None:
            for layer in self.layers:
                h = layer(h, positions=positions, segment_ids=segment_ids, padding_mask=padding_mask)
            return self.norm(h)
        if len(cache) != len(self.layers):
            raise ValueError(f"cache has {len(cache)} layer caches for {len(self.layers)} layers")
        new = []
        for layer, c in zip(self.layers, cache):
            h, c = layer(h, positions=positions, padding_mask=padding_mask, cache=c, cache_index=cache_index,
                         cache_key_mask=cache_key_mask)
            new.append(c)
        return self.norm(h), tuple(new)


class OlmoHybridForCausalLM(nnx.Module):
    """The causal LM: ``model(input_ids) -> logits [B, T, vocab]``.

    Args:
      config: the architecture.
      rngs: parameter initialisation keys (``nnx.Rngs(0)``).
      param_dtype: storage dtype of the parameters (fp32 master weights by default).
      dtype: compute dtype of matmuls and activations (None = param_dtype; bf16 for training).
      gdn_backend: backend of ``kernels.gated_delta_rule`` ("auto", "chunked", "sequential", ...).
      attention_impl: "auto" (cuDNN on GPU, XLA elsewhere), "xla" or "cudnn".
    """

    def __init__(self, config: OlmoHybridConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32, dtype=None,
                 gdn_backend: str = "auto", attention_impl: str = "auto"):
        self.config = config
        self.model = OlmoHybridModel(config, dtype=dtype, param_dtype=param_dtype, gdn_backend=gdn_backend,
                                     attention_impl=attention_impl, rngs=rngs)
        if not config.tie_word_embeddings:
            self.lm_head = nnx.Linear(config.hidden_size, config.vocab_size, use_bias=False, dtype=dtype,
                                      param_dtype=param_dtype,
                                      kernel_init=nnx.initializers.normal(config.initializer_range), rngs=rngs)

    def __call__(self, input_ids: Array, *, positions: Array | None = None, segment_ids: Array | None = None,
                 attention_mask: Array | None = None, cache: Cache | None = None, fresh_cache: bool = False,
                 logits_to_keep: int | None = None):
        """Logits for ``input_ids`` [B, T]; with ``cache``, ``(logits, updated cache)``.

        positions: [B, T] RoPE positions (default 0..T-1, or with a cache the row's count of real tokens
          so far plus ``cumsum(attention_mask) - 1``, HF generate's convention; unused by NoPE models).
        segment_ids: [B, T] int ids of packed documents; nothing crosses a change of id (GDN state,
          short conv and attention all restart). Not with a cache.
        attention_mask: [B, T] 1 for real tokens, 0 for left padding (HF semantics).
        cache: a :class:`olmo_hybrid_jax.cache.Cache`; the tokens are appended at slot ``cache.length``
          (attention sees every real cached token, GDN layers continue from the cached conv windows and
          state). Use ``olmo_hybrid_jax.generate`` rather than driving this by hand.
        fresh_cache: promise (static) that ``cache`` is empty, so attention runs over the new tokens only
          through the fused causal kernel: the prefill path.
        logits_to_keep: compute logits for the last this many positions only (1 for generation; at long
          prompts the full [B, T, vocab] logits would not fit).
        """
        input_ids = jnp.asarray(input_ids)
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {input_ids.shape}")
        if not jnp.issubdtype(input_ids.dtype, jnp.integer):
            raise ValueError(f"input_ids must be integer token ids, got dtype {input_ids.dtype}")
        B, T = input_ids.shape
        for name, a in (("positions", positions), ("segment_ids", segment_ids), ("attention_mask", attention_mask)):
            if a is not None and tuple(a.shape) != (B, T):
                raise ValueError(f"{name} must have shape {(B, T)} like input_ids, got {tuple(a.shape)}")
        if segment_ids is not None and attention_mask is not None:
            raise ValueError("pass either segment_ids (packed documents) or attention_mask (left padding), not both")
        if cache is None:
            if positions is None:
                positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
            h = self.model(input_ids, positions=positions, segment_ids=segment_ids, padding_mask=attention_mask)
            return self._logits(h, logits_to_keep)
        if segment_ids is not None:
            raise ValueError("segment_ids cannot be combined with a cache (one sequence per row)")
        if cache.batch_size != B:
            raise ValueError(f"cache holds {cache.batch_size} rows but input_ids has {B}")
        if T > cache.max_len:
            raise ValueError(f"{T} tokens do not fit a cache of max_len {cache.max_len}")
        real = jnp.ones((B, T), bool) if attention_mask is None else attention_mask.astype(bool)
        index = 0 if fresh_cache else cache.length
        key_mask = jax.lax.dynamic_update_slice_in_dim(cache.key_mask, real, index, axis=1)
        if positions is None:
            positions = cache.positions[:, None] + jnp.cumsum(real, axis=1, dtype=jnp.int32) - 1
            positions = jnp.where(real, positions, 0)
        h, layers = self.model(input_ids, positions=positions, padding_mask=attention_mask, cache=cache.layers,
                               cache_index=index, cache_key_mask=key_mask)
        new = Cache(layers=layers, key_mask=key_mask, length=(index + T) * jnp.ones((), jnp.int32),
                    positions=cache.positions + jnp.sum(real, axis=1, dtype=jnp.int32))
        return self._logits(h, logits_to_keep), new

    def _logits(self, h: Array, logits_to_keep: int | None) -> Array:
        if logits_to_keep is not None:
            if not isinstance(logits_to_keep, int) or logits_to_keep < 1:
                raise ValueError(f"logits_to_keep must be a positive int or None, got {logits_to_keep!r}")
            h = h[:, -logits_to_keep:]
        if self.config.tie_word_embeddings:
            return self.model.embed_tokens.attend(h)
        return self.lm_head(h)
