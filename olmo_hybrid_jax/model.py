"""OLMo Hybrid decoder: Gated DeltaNet (pre-norm) and attention (OLMo 2/3 reordered post-norm) layers.

``OlmoHybridForCausalLM(config, rngs=...)(input_ids) -> logits [B, T, vocab]``. The module tree mirrors
HF's (``model.embed_tokens``, ``model.layers[i].linear_attn`` / ``.self_attn``, ``model.norm``,
``lm_head``), which keeps checkpoint conversion a rename-and-transpose.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

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

    def __call__(self, h: Array, *, positions, segment_ids=None, padding_mask=None) -> Array:
        h = h + self.linear_attn(self.input_layernorm(h), segment_ids=segment_ids, padding_mask=padding_mask)
        return h + self.mlp(self.post_attention_layernorm(h))


class AttentionDecoderLayer(nnx.Module):
    """Attention layer, reordered post-norm: ``h = x + norm(Attn(x)); h + norm(MLP(h))``."""

    layer_type = FULL

    def __init__(self, cfg: OlmoHybridConfig, *, dtype, param_dtype, attention_impl: str, rngs: nnx.Rngs):
        self.self_attn = Attention(cfg, dtype=dtype, param_dtype=param_dtype, implementation=attention_impl,
                                   rngs=rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=param_dtype)
        self.mlp = MLP(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.post_feedforward_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=param_dtype)

    def __call__(self, h: Array, *, positions, segment_ids=None, padding_mask=None) -> Array:
        h = h + self.post_attention_layernorm(
            self.self_attn(h, positions=positions, segment_ids=segment_ids, key_mask=padding_mask))
        return h + self.post_feedforward_layernorm(self.mlp(h))


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

    def __call__(self, input_ids: Array, *, positions=None, segment_ids=None, padding_mask=None) -> Array:
        h = self.embed_tokens(input_ids)
        for layer in self.layers:
            h = layer(h, positions=positions, segment_ids=segment_ids, padding_mask=padding_mask)
        return self.norm(h)


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
                 attention_mask: Array | None = None) -> Array:
        """Logits for ``input_ids`` [B, T].

        positions: [B, T] RoPE positions (default 0..T-1; unused by NoPE models).
        segment_ids: [B, T] int ids of packed documents; nothing crosses a change of id (GDN state,
          short conv and attention all restart).
        attention_mask: [B, T] 1 for real tokens, 0 for left padding (HF semantics).
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
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        h = self.model(input_ids, positions=positions, segment_ids=segment_ids, padding_mask=attention_mask)
        if self.config.tie_word_embeddings:
            return self.model.embed_tokens.attend(h)
        return self.lm_head(h)
