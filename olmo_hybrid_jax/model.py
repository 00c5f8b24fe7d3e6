"""OLMo Hybrid decoder: Gated DeltaNet (pre-norm) and attention (OLMo 2/3 reordered post-norm) layers.

``OlmoHybridForCausalLM(config, rngs=...)(input_ids) -> logits [B, T, vocab]``: one model class with two
parameter layouts, chosen at construction (MaxText's ``scan_layers``):

- list (``scan_layers=False``, the default): one module per layer, the HF tree (``model.embed_tokens``,
  ``model.layers[i].linear_attn`` / ``.self_attn``, ``model.norm``, ``lm_head``), which keeps checkpoint
  conversion a rename-and-transpose. Parameter paths ``model/layers/{g*p+j}/...``.
- scanned (``scan_layers=True``): the layers grouped into blocks of one period p of ``layer_types`` (the
  released 3 GDN + 1 attention), each block's parameters stacked along a leading [G = L / p] axis
  (``nnx.split_rngs`` + ``nnx.vmap`` build them), so the forward is one ``lax.scan`` over G blocks and
  compile time stays flat with depth. Paths ``model/blocks/layers/{j}/...`` with the leading [G] axis.
  A ``layer_types`` without a period shorter than the stack has nothing to scan over: the model then
  falls back to the list layout (``model.scan_layers`` says which layout was built), so a training
  config may ask for scanning whatever the architecture.

Both layouts share the layer factory (``decoder_layer``), the forward (``OlmoHybridModel.__call__``,
with per-layer rematerialisation, ``REMAT_POLICIES``) and the LM head. The cached (generation) forward
runs layer by layer in both layouts (``OlmoHybridModel.decoder_layers``; a scanned model's layers are
slices of its stacked blocks, which XLA may copy per step: for the fastest decoding convert once with
``with_layout(model, scan_layers=False)``), so ``generate``, ``probe`` and ``extend`` take either. Parameters convert
between the layouts in one place: ``list_to_stacked`` / ``stacked_to_list`` on pure dicts (a stack / an
index, no arithmetic), and ``with_layout`` / ``from_list_params`` / ``list_params`` on models.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from olmo_hybrid_jax.cache import Cache
from olmo_hybrid_jax.config import FULL, LINEAR, OlmoHybridConfig
from olmo_hybrid_jax.modules import MLP, Attention, GatedDeltaNet, RMSNorm

Array = jax.Array

#: jax.checkpoint policy per name, applied to every decoder layer: "none" keeps all activations, "full"
#: keeps only each layer's input, "dots" keeps matmul outputs, "dots_no_batch" keeps only matmul outputs
#: without batch dims (weights-like).
REMAT_POLICIES: dict[str, Callable | None] = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@dataclasses.dataclass(frozen=True)
class ModelOptions:
    """How a model is built and run, apart from its architecture (hashable: static in the graph).

    See ``OlmoHybridForCausalLM`` for each field; ``with_layout`` rebuilds a model from these.
    """

    param_dtype: Any = jnp.float32
    dtype: Any = None
    gdn_backend: str = "auto"
    attention_impl: str = "auto"
    scan_layers: bool = False
    remat: str = "none"
    gdn_kernel: Any = None  # kernels.PallasConfig or None
    gdn_shard_axes: Any = None  # kernels.ShardAxes or None
    gdn_mesh: Any = None  # jax.sharding.Mesh or None (the context mesh)
    attn_shardings: Any = None  # modules.AttentionShardings or None

    def __post_init__(self):
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat={self.remat!r}; choose from {sorted(REMAT_POLICIES)}")


class LinearAttentionDecoderLayer(nnx.Module):
    """GDN layer, pre-norm: ``h = x + GDN(input_layernorm(x)); h + MLP(post_attention_layernorm(h))``."""

    layer_type = LINEAR

    def __init__(self, cfg: OlmoHybridConfig, opts: ModelOptions, *, rngs: nnx.Rngs):
        dt, pdt = opts.dtype, opts.param_dtype
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=pdt)
        self.linear_attn = GatedDeltaNet(cfg, dtype=dt, param_dtype=pdt, backend=opts.gdn_backend,
                                         kernel_config=opts.gdn_kernel, shard_axes=opts.gdn_shard_axes,
                                         mesh=opts.gdn_mesh, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=pdt)
        self.mlp = MLP(cfg, dtype=dt, param_dtype=pdt, rngs=rngs)

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

    def __init__(self, cfg: OlmoHybridConfig, opts: ModelOptions, *, rngs: nnx.Rngs):
        dt, pdt = opts.dtype, opts.param_dtype
        self.self_attn = Attention(cfg, dtype=dt, param_dtype=pdt, implementation=opts.attention_impl,
                                   shardings=opts.attn_shardings, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=pdt)
        self.mlp = MLP(cfg, dtype=dt, param_dtype=pdt, rngs=rngs)
        self.post_feedforward_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=pdt)

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


def decoder_layer(cfg: OlmoHybridConfig, layer_type: str, opts: ModelOptions, *, rngs: nnx.Rngs) -> nnx.Module:
    """The one layer factory of both layouts."""
    cls = LinearAttentionDecoderLayer if layer_type == LINEAR else AttentionDecoderLayer
    return cls(cfg, opts, rngs=rngs)


def layer_period(layer_types) -> int:
    """Smallest p dividing n with layer_types[i] == layer_types[i % p] for all i (n when aperiodic)."""
    n = len(layer_types)
    for p in range(1, n + 1):
        if n % p == 0 and all(layer_types[i] == layer_types[i % p] for i in range(n)):
            return p
    return n


def is_scannable(cfg: OlmoHybridConfig) -> bool:
    """True when the layers repeat with a period shorter than the stack (at least 2 blocks)."""
    return layer_period(cfg.layer_types) < cfg.num_hidden_layers


class HybridBlock(nnx.Module):
    """One period of layers (e.g. GDN, GDN, GDN, attention), the unit of the scan."""

    def __init__(self, cfg: OlmoHybridConfig, types, opts: ModelOptions, *, rngs: nnx.Rngs):
        self.layers = nnx.List([decoder_layer(cfg, t, opts, rngs=rngs) for t in types])


def _run_layer(layer: nnx.Module, remat: str, h: Array, **inputs) -> Array:
    """``layer(h, **inputs)`` (the no-cache forward) under the remat policy."""
    policy = REMAT_POLICIES[remat]
    if policy is None:
        return layer(h, **inputs)
    graphdef, state = nnx.split(layer)

    def run(st, h, inputs):
        return nnx.merge(graphdef, st)(h, **inputs)

    return jax.checkpoint(run, policy=policy, prevent_cse=False)(state, h, inputs)


class OlmoHybridModel(nnx.Module):
    """Embedding, the decoder stack (``layers`` or stacked ``blocks``) and the final norm (HF ``OlmoHybridModel``)."""

    def __init__(self, cfg: OlmoHybridConfig, opts: ModelOptions, *, rngs: nnx.Rngs):
        self.remat = opts.remat
        self.embed_tokens = nnx.Embed(cfg.vocab_size, cfg.hidden_size, dtype=opts.dtype, param_dtype=opts.param_dtype,
                                      embedding_init=nnx.initializers.normal(cfg.initializer_range), rngs=rngs)
        self.scan_layers = opts.scan_layers and is_scannable(cfg)
        if self.scan_layers:
            p = layer_period(cfg.layer_types)
            self.period, self.num_blocks = p, cfg.num_hidden_layers // p

            @nnx.split_rngs(splits=self.num_blocks)
            @nnx.vmap(in_axes=(0,), out_axes=0)
            def make_blocks(r):
                return HybridBlock(cfg, cfg.layer_types[:p], opts, rngs=r)

            self.blocks = make_blocks(rngs)
        else:
            self.layers = nnx.List([decoder_layer(cfg, t, opts, rngs=rngs) for t in cfg.layer_types])
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=opts.param_dtype)

    def decoder_layers(self) -> list[nnx.Module]:
        """The decoder layers in order; a scanned model's are modules built on slices of its stacked params
        (read-only: writing to them does not reach the stack)."""
        if not self.scan_layers:
            return list(self.layers)
        graphdef, stacked = nnx.split(self.blocks)
        out = []
        for g in range(self.num_blocks):
            out.extend(nnx.merge(graphdef, jax.tree.map(lambda x, g=g: x[g], stacked)).layers)
        return out

    def __call__(self, input_ids: Array, *, positions=None, segment_ids=None, padding_mask=None,
                 cache: tuple | None = None, cache_index=None, cache_key_mask=None, act_sharding=None):
        """Final-normed hidden states [B, T, H]; with ``cache`` (one layer cache per layer) -> (h, caches).

        positions default to 0..T-1 without a cache. ``act_sharding`` (a Sharding for [B, T, H]) constrains
        the residual stream between layers (training).
        """
        h = self.embed_tokens(input_ids)
        if cache is not None:
            layers = self.decoder_layers()
            if len(cache) != len(layers):
                raise ValueError(f"cache has {len(cache)} layer caches for {len(layers)} layers")
            new = []
            for layer, c in zip(layers, cache):
                h, c = layer(h, positions=positions, padding_mask=padding_mask, cache=c, cache_index=cache_index,
                             cache_key_mask=cache_key_mask)
                new.append(c)
            return self.norm(h), tuple(new)
        if positions is None:
            B, T = input_ids.shape
            positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))

        def constrain(h):
            return h if act_sharding is None else jax.lax.with_sharding_constraint(h, act_sharding)

        inputs = dict(positions=positions, segment_ids=segment_ids, padding_mask=padding_mask)
        h = constrain(h)
        if self.scan_layers:
            graphdef, stacked = nnx.split(self.blocks)

            def body(h, block_state):
                for layer in nnx.merge(graphdef, block_state).layers:
                    h = constrain(_run_layer(layer, self.remat, h, **inputs))
                return h, None

            h, _ = jax.lax.scan(body, h, stacked)
        else:
            for layer in self.layers:
                h = constrain(_run_layer(layer, self.remat, h, **inputs))
        return self.norm(h)


class OlmoHybridForCausalLM(nnx.Module):
    """The causal LM: ``model(input_ids) -> logits [B, T, vocab]``.

    Args:
      config: the architecture.
      rngs: parameter initialisation keys (``nnx.Rngs(0)``).
      param_dtype: storage dtype of the parameters (fp32 master weights by default).
      dtype: compute dtype of matmuls and activations (None = param_dtype; bf16 for training).
      gdn_backend: backend of ``kernels.gated_delta_rule`` ("auto", "chunked", "sequential", "pallas", ...).
      attention_impl: "auto" (cuDNN on GPU, XLA elsewhere), "xla" or "cudnn".
      scan_layers: the scanned layout (see the module docstring); falls back to the list layout when
        ``layer_types`` does not repeat (``self.scan_layers`` is the layout built).
      remat: per-layer rematerialisation of the no-cache forward, a key of ``REMAT_POLICIES``.
      gdn_kernel: a ``kernels.PallasConfig`` of launch parameters for the Pallas GDN kernel (None: the
        kernels' tuned table).
      gdn_shard_axes: a ``kernels.ShardAxes`` (mesh axes of the batch and the heads): the GDN op then runs
        itself per shard under ``shard_map`` (XLA cannot partition the kernel's custom call).
      gdn_mesh: the mesh of ``gdn_shard_axes`` (None: the context mesh).
      attn_shardings: a ``modules.AttentionShardings``: where attention's q, k, v live while it runs
        (context parallelism: Ulysses, heads instead of the sequence split over the context axis).
    """

    def __init__(self, config: OlmoHybridConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32, dtype=None,
                 gdn_backend: str = "auto", attention_impl: str = "auto", scan_layers: bool = False,
                 remat: str = "none", gdn_kernel=None, gdn_shard_axes=None, gdn_mesh=None, attn_shardings=None):
        opts = ModelOptions(param_dtype=param_dtype, dtype=dtype, gdn_backend=gdn_backend,
                            attention_impl=attention_impl, scan_layers=scan_layers, remat=remat,
                            gdn_kernel=gdn_kernel, gdn_shard_axes=gdn_shard_axes, gdn_mesh=gdn_mesh,
                            attn_shardings=attn_shardings)
        self.config = config
        self.model = OlmoHybridModel(config, opts, rngs=rngs)
        self.options = dataclasses.replace(opts, scan_layers=self.model.scan_layers)
        if not config.tie_word_embeddings:
            self.lm_head = nnx.Linear(config.hidden_size, config.vocab_size, use_bias=False, dtype=dtype,
                                      param_dtype=param_dtype,
                                      kernel_init=nnx.initializers.normal(config.initializer_range), rngs=rngs)

    @property
    def scan_layers(self) -> bool:
        """Whether this model has the scanned layout."""
        return self.model.scan_layers

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
        if not isinstance(input_ids, jax.core.Tracer) and input_ids.size:
            # concrete ids (eager calls) are checked here; under jit the data boundary checks them
            # (training: train.data refuses files with ids >= vocab_size), a host sync would cost a step
            ids = np.asarray(input_ids)  # numpy: a concrete constant inside a trace stays concrete
            lo, hi = int(ids.min()), int(ids.max())
            V = self.config.vocab_size
            if lo < 0 or hi >= V:
                raise ValueError(f"input_ids holds token id {lo if lo < 0 else hi}, outside the vocabulary [0, {V})")
        B, T = input_ids.shape
        for name, a in (("positions", positions), ("segment_ids", segment_ids), ("attention_mask", attention_mask)):
            if a is not None and tuple(a.shape) != (B, T):
                raise ValueError(f"{name} must have shape {(B, T)} like input_ids, got {tuple(a.shape)}")
        if segment_ids is not None and attention_mask is not None:
            raise ValueError("pass either segment_ids (packed documents) or attention_mask (left padding), not both")
        if cache is None:
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

    def lm_head_kernel(self) -> Array:
        """The [H, V] output projection (the embedding transposed when tied), for a fused loss."""
        if self.config.tie_word_embeddings:
            return self.model.embed_tokens.embedding[...].T
        return self.lm_head.kernel[...]

    def _logits(self, h: Array, logits_to_keep: int | None) -> Array:
        if logits_to_keep is not None:
            if not isinstance(logits_to_keep, int) or logits_to_keep < 1:
                raise ValueError(f"logits_to_keep must be a positive int or None, got {logits_to_keep!r}")
            h = h[:, -logits_to_keep:]
        if self.config.tie_word_embeddings:
            return self.model.embed_tokens.attend(h)
        return self.lm_head(h)


# ------------------------------------------------------------------------------------ layout conversion
def list_to_stacked(params: dict, cfg: OlmoHybridConfig) -> dict:
    """Pure-dict params of the list layout -> those of the scanned layout (``model/layers/{g*p+j}`` ->
    ``model/blocks/layers/{j}`` with a leading [G] axis)."""
    p = layer_period(cfg.layer_types)
    G = cfg.num_hidden_layers // p
    model = dict(params["model"])
    layers = model.pop("layers")
    model["blocks"] = {"layers": {j: jax.tree.map(lambda *xs: jnp.stack(xs), *[layers[g * p + j] for g in range(G)])
                                  for j in range(p)}}
    return {**params, "model": model}


def stacked_to_list(params: dict, cfg: OlmoHybridConfig) -> dict:
    """Pure-dict params of the scanned layout -> those of the list layout (the inverse of ``list_to_stacked``)."""
    p = layer_period(cfg.layer_types)
    G = cfg.num_hidden_layers // p
    model = dict(params["model"])
    blocks = model.pop("blocks")
    model["layers"] = {g * p + j: jax.tree.map(lambda x, g=g: x[g], blocks["layers"][j])
                       for g in range(G) for j in range(p)}
    model["layers"] = dict(sorted(model["layers"].items()))
    return {**params, "model": model}


def list_params(model: OlmoHybridForCausalLM) -> dict:
    """``model``'s parameters as a pure dict in the list layout (the HF-shaped tree), whatever its layout."""
    pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return stacked_to_list(pure, model.config) if model.scan_layers else pure


def from_list_params(config: OlmoHybridConfig, params: dict, **options) -> OlmoHybridForCausalLM:
    """A model built with ``options`` (``OlmoHybridForCausalLM``'s keywords; param_dtype defaults to the
    params' dtype) holding ``params``, a pure dict in the list layout; nothing is initialised."""
    options.setdefault("param_dtype", jax.tree.leaves(params)[0].dtype)
    abstract = nnx.eval_shape(lambda: OlmoHybridForCausalLM(config, rngs=nnx.Rngs(0), **options))
    if abstract.scan_layers:
        params = list_to_stacked(params, config)
    graphdef, state = nnx.split(abstract)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


def with_layout(model: OlmoHybridForCausalLM, *, scan_layers: bool, **options) -> OlmoHybridForCausalLM:
    """``model``'s weights in the list (``scan_layers=False``, e.g. for ``convert.save_hf``) or scanned
    layout; the other construction options are ``model``'s unless given. Returns ``model`` itself when
    that changes nothing."""
    opts = dataclasses.replace(model.options, **options, scan_layers=scan_layers and is_scannable(model.config))
    if opts == model.options:
        return model
    return from_list_params(model.config, list_params(model), **_fields(opts))


def _fields(opts: ModelOptions) -> dict:
    return {f.name: getattr(opts, f.name) for f in dataclasses.fields(opts)}  # asdict would deep-copy a Mesh
