"""Look inside a forward pass: GDN gates and state norms, attention maps, per-layer residual updates.

``trace(model, input_ids)`` runs the model layer by layer (eagerly, for exploration and notebooks, not
for speed) and returns what each layer did. It reads the layers' own intermediates
(``GatedDeltaNet.intermediates``, ``Attention.intermediates``: the very projections, convs and gates the
forward computes), so what it shows is what the forward pass computes; a test checks every traced
quantity against an independent computation from the raw weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np

from olmo_hybrid_jax.config import LINEAR
from olmo_hybrid_jax.kernels import gated_delta_rule_step, segment_starts


@dataclass
class GDNTrace:
    """One GDN layer over the sequence, per value head: arrays [B, T, H]."""

    g: np.ndarray  # log-decay (<= 0); the state is multiplied by a_t = exp(g_t)
    beta: np.ndarray  # write strength in (0, 2) (or (0, 1) without negative eigenvalues)
    state_norm: np.ndarray  # Frobenius norm of the fp32 state S_t after token t

    @property
    def decay(self) -> np.ndarray:
        return np.exp(self.g)

    @property
    def memory_length(self) -> np.ndarray:
        """Effective memory length 1 / (1 - a_t) in tokens: how far back the decay reaches."""
        return 1.0 / np.maximum(-np.expm1(self.g), 1e-6)  # expm1: 1 - exp(g) cancels in fp32 for g near 0


@dataclass
class Trace:
    layer_types: tuple[str, ...]
    hidden: list[np.ndarray] = field(default_factory=list)  # residual stream before each layer, then after the last
    gdn: dict[int, GDNTrace] = field(default_factory=dict)
    attention: dict[int, np.ndarray] = field(default_factory=dict)  # layer -> probabilities [B, H, T, T]
    final_hidden: np.ndarray | None = None  # after the final norm

    def residual_update(self) -> np.ndarray:
        """[L, B, T]: ||h_out - h_in|| / ||h_in|| per token, how much each layer changes the stream."""
        out = []
        for h_in, h_out in zip(self.hidden[:-1], self.hidden[1:]):
            num = np.linalg.norm(h_out - h_in, axis=-1)
            out.append(num / np.maximum(np.linalg.norm(h_in, axis=-1), 1e-12))
        return np.stack(out)


def _state_norms(k, v, g, beta, segment_ids):
    """Frobenius norm of the state after every token: [B, T, H] (one decode step per token)."""
    B, T, H, K = k.shape
    V = v.shape[-1]
    starts = jnp.zeros((B, T), bool) if segment_ids is None else segment_starts(segment_ids)

    def step(S, xs):
        kt, vt, gt, bt, st = xs
        S = jnp.where(st[:, None, None, None], 0.0, S)  # a new document starts from an empty state
        _, S = gated_delta_rule_step(kt, kt, vt, gt, bt, S)  # q is irrelevant to the state
        return S, jnp.sqrt(jnp.sum(S * S, axis=(-2, -1)))

    xs = tuple(jnp.moveaxis(x, 1, 0) for x in (k, v, g, beta, starts))
    _, norms = jax.lax.scan(step, jnp.zeros((B, H, K, V), jnp.float32), xs)
    return jnp.moveaxis(norms, 0, 1)


def trace(model, input_ids, *, segment_ids=None, positions=None) -> Trace:
    """Run ``model`` (an ``OlmoHybridForCausalLM``, either layout) on ``input_ids`` [B, T] and record every layer."""
    input_ids = jnp.asarray(input_ids)
    B, T = input_ids.shape
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(T), (B, T))
    seg = None if segment_ids is None else jnp.asarray(segment_ids)
    cfg = model.config
    tr = Trace(layer_types=tuple(cfg.layer_types))
    h = model.model.embed_tokens(input_ids)
    for i, layer in enumerate(model.model.decoder_layers()):
        tr.hidden.append(np.asarray(h, np.float32))
        if cfg.layer_types[i] == LINEAR:
            x = layer.linear_attn.intermediates(layer.input_layernorm(h), segment_ids=seg)
            norms = _state_norms(x["k"], x["v"].astype(jnp.float32), x["g"], x["beta"], seg)
            tr.gdn[i] = GDNTrace(g=np.asarray(x["g"]), beta=np.asarray(x["beta"]), state_norm=np.asarray(norms))
        else:
            x = layer.self_attn.intermediates(h, positions=positions, segment_ids=seg)
            tr.attention[i] = np.asarray(x["probs"])
        h = layer(h, positions=positions, segment_ids=seg)
    tr.hidden.append(np.asarray(h, np.float32))
    tr.final_hidden = np.asarray(model.model.norm(h), np.float32)
    return tr
