"""Scanned (stacked) layout of the OLMo Hybrid decoder for training, and exact conversion to/from the list layout.

``OlmoHybridForCausalLM`` keeps one module per layer (``model.layers[i]``), the HF-shaped tree that
``convert.load_hf`` / ``save_hf`` read and write. Compiling that for 32 layers traces 32 layers. Here
the layers are grouped into blocks of one period of ``layer_types`` (the released 3 GDN + 1 attention)
and each block's parameters are stacked along a leading axis of size G = num_layers / period
(``nnx.split_rngs`` + ``nnx.vmap`` build them), so the forward is one ``lax.scan`` over G blocks and
compile time stays flat with depth. The blocks are made of the very ``LinearAttentionDecoderLayer`` /
``AttentionDecoderLayer`` classes of ``olmo_hybrid_jax.model``.

Parameter paths: list layout ``model/layers/{g*p+j}/...``; stacked ``model/blocks/layers/{j}/...`` with
a leading [G] axis. ``list_to_stacked`` / ``stacked_to_list`` convert pure-dict states exactly both
ways (a stack / an index, no arithmetic). When ``layer_types`` has no period shorter than the whole
stack there is nothing to scan over, and training uses the list layout unchanged (``build_model``).

Rematerialisation (``REMAT_POLICIES``) wraps every decoder layer in ``jax.checkpoint``: "none" keeps
all activations, "full" keeps only each layer's input, "dots" keeps matmul outputs, "dots_no_batch"
keeps only matmul outputs without batch dims (weights-like).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from olmo_hybrid_jax.config import LINEAR, OlmoHybridConfig
from olmo_hybrid_jax.model import AttentionDecoderLayer, LinearAttentionDecoderLayer, OlmoHybridForCausalLM
from olmo_hybrid_jax.modules import RMSNorm

Array = jax.Array

REMAT_POLICIES: dict[str, Callable | None | str] = {
    "none": "none",
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


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


def _make_layer(cfg, t, *, dtype, param_dtype, gdn_backend, attention_impl, rngs):
    if t == LINEAR:
        return LinearAttentionDecoderLayer(cfg, dtype=dtype, param_dtype=param_dtype, gdn_backend=gdn_backend,
                                           rngs=rngs)
    return AttentionDecoderLayer(cfg, dtype=dtype, param_dtype=param_dtype, attention_impl=attention_impl,
                                 rngs=rngs)


class HybridBlock(nnx.Module):
    """One period of layers (e.g. GDN, GDN, GDN, attention), the unit of the scan."""

    def __init__(self, cfg: OlmoHybridConfig, types, *, dtype, param_dtype, gdn_backend, attention_impl,
                 rngs: nnx.Rngs):
        self.layers = nnx.List([_make_layer(cfg, t, dtype=dtype, param_dtype=param_dtype, gdn_backend=gdn_backend,
                                            attention_impl=attention_impl, rngs=rngs) for t in types])


class ScannedOlmoHybridModel(nnx.Module):
    """Embedding, G stacked blocks and the final norm; ``blocks`` params have a leading [G] axis."""

    def __init__(self, cfg: OlmoHybridConfig, *, dtype, param_dtype, gdn_backend, attention_impl, rngs: nnx.Rngs):
        p = layer_period(cfg.layer_types)
        if p == cfg.num_hidden_layers:
            raise ValueError(f"layer_types {cfg.layer_types} has no period shorter than the stack; "
                             "use the list layout (OlmoHybridForCausalLM)")
        self.period, self.num_blocks = p, cfg.num_hidden_layers // p
        self.embed_tokens = nnx.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=param_dtype,
                                      embedding_init=nnx.initializers.normal(cfg.initializer_range), rngs=rngs)
        types = cfg.layer_types[:p]

        @nnx.split_rngs(splits=self.num_blocks)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make_blocks(r):
            return HybridBlock(cfg, types, dtype=dtype, param_dtype=param_dtype, gdn_backend=gdn_backend,
                               attention_impl=attention_impl, rngs=r)

        self.blocks = make_blocks(rngs)
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=param_dtype)


class ScannedOlmoHybridForCausalLM(nnx.Module):
    """``OlmoHybridForCausalLM`` with the decoder scanned over stacked blocks (same args, same logits)."""

    def __init__(self, config: OlmoHybridConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32, dtype=None,
                 gdn_backend: str = "auto", attention_impl: str = "auto"):
        self.config = config
        self.model = ScannedOlmoHybridModel(config, dtype=dtype, param_dtype=param_dtype, gdn_backend=gdn_backend,
                                            attention_impl=attention_impl, rngs=rngs)
        if not config.tie_word_embeddings:
            self.lm_head = nnx.Linear(config.hidden_size, config.vocab_size, use_bias=False, dtype=dtype,
                                      param_dtype=param_dtype,
                                      kernel_init=nnx.initializers.normal(config.initializer_range), rngs=rngs)

    def __call__(self, input_ids: Array, *, positions=None, segment_ids=None, remat: str = "none") -> Array:
        h = hidden_states(self, input_ids, positions=positions, segment_ids=segment_ids, remat=remat)
        if self.config.tie_word_embeddings:
            return self.model.embed_tokens.attend(h)
        return self.lm_head(h)


def _checkpointed_layer(layer: nnx.Module, remat: str):
    """A function (h, positions, segment_ids) -> h running ``layer`` under the remat policy."""
    graphdef, state = nnx.split(layer)

    def run(st, h, positions, segment_ids):
        return nnx.merge(graphdef, st)(h, positions=positions, segment_ids=segment_ids)

    policy = REMAT_POLICIES[remat]
    if policy != "none":
        run = jax.checkpoint(run, policy=policy, prevent_cse=False)
    return lambda h, positions, segment_ids: run(state, h, positions, segment_ids)


def hidden_states(model, input_ids: Array, *, positions=None, segment_ids=None, remat: str = "none",
                  act_sharding=None) -> Array:
    """Final-normed hidden states [B, T, H] of a list-layout or scanned model, with per-layer remat.

    ``act_sharding`` (a Sharding for [B, T, H]) constrains the residual stream between layers.
    """
    input_ids = jnp.asarray(input_ids)
    B, T = input_ids.shape
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    constrain = (lambda h: jax.lax.with_sharding_constraint(h, act_sharding)) if act_sharding is not None else (lambda h: h)
    m = model.model
    h = constrain(m.embed_tokens(input_ids))
    if isinstance(m, ScannedOlmoHybridModel):
        gd, stacked = nnx.split(m.blocks)

        def body(h, block_state):
            block = nnx.merge(gd, block_state)
            for layer in block.layers:
                h = constrain(_checkpointed_layer(layer, remat)(h, positions, segment_ids))
            return h, None

        h, _ = jax.lax.scan(body, h, stacked)
    else:
        for layer in m.layers:
            h = constrain(_checkpointed_layer(layer, remat)(h, positions, segment_ids))
    return m.norm(h)


def lm_head_kernel(model) -> Array:
    """The [H, V] output projection (the embedding transposed when tied)."""
    if model.config.tie_word_embeddings:
        return model.model.embed_tokens.embedding[...].T
    return model.lm_head.kernel[...]


def build_model(cfg: OlmoHybridConfig, *, scan_layers: bool = True, rngs: nnx.Rngs, **kwargs):
    """The scanned model when ``scan_layers`` and the layer pattern repeats, else the list-layout model."""
    if scan_layers and is_scannable(cfg):
        return ScannedOlmoHybridForCausalLM(cfg, rngs=rngs, **kwargs)
    return OlmoHybridForCausalLM(cfg, rngs=rngs, **kwargs)


# ------------------------------------------------------------------------------------ layout conversion
def list_to_stacked(params: dict, cfg: OlmoHybridConfig) -> dict:
    """Pure-dict state of ``OlmoHybridForCausalLM`` -> that of ``ScannedOlmoHybridForCausalLM``."""
    p = layer_period(cfg.layer_types)
    G = cfg.num_hidden_layers // p
    model = dict(params["model"])
    layers = model.pop("layers")
    blocks = {"layers": {j: jax.tree.map(lambda *xs: jnp.stack(xs), *[layers[g * p + j] for g in range(G)])
                         for j in range(p)}}
    model["blocks"] = blocks
    return {**params, "model": model}


def stacked_to_list(params: dict, cfg: OlmoHybridConfig) -> dict:
    """Pure-dict state of ``ScannedOlmoHybridForCausalLM`` -> that of ``OlmoHybridForCausalLM``."""
    p = layer_period(cfg.layer_types)
    G = cfg.num_hidden_layers // p
    model = dict(params["model"])
    blocks = model.pop("blocks")
    model["layers"] = {g * p + j: jax.tree.map(lambda x: x[g], blocks["layers"][j]) for g in range(G) for j in range(p)}
    model["layers"] = dict(sorted(model["layers"].items()))
    return {**params, "model": model}


def to_list_model(model, **model_kwargs) -> OlmoHybridForCausalLM:
    """An ``OlmoHybridForCausalLM`` (HF-convertible: ``convert.save_hf``) with ``model``'s weights."""
    if isinstance(model, OlmoHybridForCausalLM):
        return model
    cfg = model.config
    pure = stacked_to_list(nnx.to_pure_dict(nnx.state(model, nnx.Param)), cfg)
    leaf = jax.tree.leaves(pure)[0]
    abstract = nnx.eval_shape(lambda: OlmoHybridForCausalLM(cfg, rngs=nnx.Rngs(0), param_dtype=leaf.dtype,
                                                            **model_kwargs))
    gd, state = nnx.split(abstract)
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(gd, state)


def from_list_model(model: OlmoHybridForCausalLM, **model_kwargs) -> ScannedOlmoHybridForCausalLM:
    """The scanned twin of a list-layout model (e.g. ``convert.load_hf`` output)."""
    cfg = model.config
    pure = list_to_stacked(nnx.to_pure_dict(nnx.state(model, nnx.Param)), cfg)
    leaf = jax.tree.leaves(pure)[0]
    abstract = nnx.eval_shape(lambda: ScannedOlmoHybridForCausalLM(cfg, rngs=nnx.Rngs(0), param_dtype=leaf.dtype,
                                                                   **model_kwargs))
    gd, state = nnx.split(abstract)
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(gd, state)
