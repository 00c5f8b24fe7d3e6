"""Look inside a forward pass: GDN gates and state norms, attention maps, per-layer residual updates.

``trace(model, input_ids)`` runs the model layer by layer (eagerly, for exploration and notebooks, not
for speed) and returns what each layer did. It calls the model's own submodules, so what it shows is
what the forward pass computes (a test checks that its final hidden state equals the model's).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np

from olmo_hybrid_jax.kernels import gated_delta_rule_step
from olmo_hybrid_jax.config import LINEAR
from olmo_hybrid_jax.modules import apply_rope, gdn_gates, l2_normalize, rope_cos_sin


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
        return 1.0 / np.maximum(1.0 - np.exp(self.g), 1e-6)


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


def _state_norms(k, v, g, beta, segment_ids, scale):
    """Frobenius norm of the state after every token: [B, T, H] (one decode step per token)."""
    B, T, H, K = k.shape
    V = v.shape[-1]
    if segment_ids is None:
        starts = jnp.zeros((B, T), bool)
    else:
        starts = jnp.concatenate([jnp.zeros((B, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)

    def step(S, xs):
        kt, vt, gt, bt, st = xs
        S = jnp.where(st[:, None, None, None], 0.0, S)  # a new document starts from an empty state
        _, S = gated_delta_rule_step(kt, kt, vt, gt, bt, S, scale=scale)  # q is irrelevant to the state
        return S, jnp.sqrt(jnp.sum(S * S, axis=(-2, -1)))

    xs = (jnp.moveaxis(k, 1, 0), jnp.moveaxis(v, 1, 0), jnp.moveaxis(g, 1, 0), jnp.moveaxis(beta, 1, 0),
          jnp.moveaxis(starts, 1, 0))
    _, norms = jax.lax.scan(step, jnp.zeros((B, H, K, V), jnp.float32), xs)
    return jnp.moveaxis(norms, 0, 1)


def _gdn_trace(attn, x, segment_ids) -> GDNTrace:
    B, T, _ = x.shape
    k = attn.k_conv1d(attn.k_proj(x), segment_ids=segment_ids)
    v = attn.v_conv1d(attn.v_proj(x), segment_ids=segment_ids)
    k = l2_normalize(k.reshape(B, T, attn.nk, attn.dk))
    v = v.reshape(B, T, attn.nv, attn.dv).astype(jnp.float32)
    if attn.nv != attn.nk:
        k = jnp.repeat(k, attn.nv // attn.nk, axis=2)
    g, beta = gdn_gates(attn.a_proj(x), attn.b_proj(x), attn.A_log[...], attn.dt_bias[...],
                        allow_neg_eigval=attn.allow_neg_eigval)
    norms = _state_norms(k, v, g, beta, segment_ids, attn.dk ** -0.5)
    return GDNTrace(g=np.asarray(g), beta=np.asarray(beta), state_norm=np.asarray(norms))


def _attention_probs(attn, x, positions, segment_ids) -> np.ndarray:
    B, T, _ = x.shape
    q = attn.q_norm(attn.q_proj(x)).reshape(B, T, attn.num_heads, attn.head_dim)
    k = attn.k_norm(attn.k_proj(x)).reshape(B, T, attn.num_kv_heads, attn.head_dim)
    if attn.rope_theta is not None:
        cos, sin = rope_cos_sin(positions, attn.head_dim, attn.rope_theta)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    k = jnp.repeat(k, attn.num_heads // attn.num_kv_heads, axis=2)
    logits = jnp.einsum("bthd,bshd->bhts", q.astype(jnp.float32), k.astype(jnp.float32)) * attn.head_dim ** -0.5
    mask = jnp.tril(jnp.ones((T, T), bool))[None]
    if segment_ids is not None:
        mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
    logits = jnp.where(mask[:, None], logits, -jnp.inf)
    return np.asarray(jax.nn.softmax(logits, axis=-1))


def trace(model, input_ids, *, segment_ids=None, positions=None) -> Trace:
    """Run ``model`` (an ``OlmoHybridForCausalLM``) on ``input_ids`` [B, T] and record every layer."""
    input_ids = jnp.asarray(input_ids)
    B, T = input_ids.shape
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(T), (B, T))
    seg = None if segment_ids is None else jnp.asarray(segment_ids)
    cfg = model.config
    tr = Trace(layer_types=tuple(cfg.layer_types))
    h = model.model.embed_tokens(input_ids)
    for i, layer in enumerate(model.model.layers):
        tr.hidden.append(np.asarray(h, np.float32))
        if cfg.layer_types[i] == LINEAR:
            tr.gdn[i] = _gdn_trace(layer.linear_attn, layer.input_layernorm(h), seg)
        else:
            tr.attention[i] = _attention_probs(layer.self_attn, h, positions, seg)
        h = layer(h, positions=positions, segment_ids=seg)
    tr.hidden.append(np.asarray(h, np.float32))
    tr.final_hidden = np.asarray(model.model.norm(h), np.float32)
    return tr
