"""olmo_hybrid_jax.probe: what it reports is what the forward pass computes.

Every traced quantity (GDN gates g and beta, decays, memory lengths, state norms; attention maps) is
checked against a float64 NumPy computation from the raw weights, written from the definitions (HF's
OlmoHybridGatedDeltaNet / attention), not from the model's code.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from olmo_hybrid_jax import OlmoHybridConfig, OlmoHybridForCausalLM
from olmo_hybrid_jax.kernels import gated_delta_rule
from olmo_hybrid_jax.model import with_layout
from olmo_hybrid_jax.modules import gdn_gates, l2_normalize
from olmo_hybrid_jax.probe import trace

B, T, CUT = 2, 30, 12  # two packed documents: tokens [0, CUT) and [CUT, T)


def _model(rope: bool):
    cfg = OlmoHybridConfig.preset("tiny")
    if rope:
        cfg = cfg.replace(rope_parameters={"rope_type": "default", "rope_theta": 500.0})
    model = OlmoHybridForCausalLM(cfg, rngs=nnx.Rngs(1))
    # every parameter off its init (norm weights != 1), so a skipped weight shows
    params = nnx.state(model, nnx.Param)
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(7), len(leaves))
    nnx.update(model, jax.tree.unflatten(tree, [x * (1 + 0.3 * jax.random.normal(k, x.shape))
                                                for x, k in zip(leaves, keys)]))
    return model


def _np(p):
    return {k: _np(v) for k, v in p.items()} if isinstance(p, dict) else np.asarray(p, np.float64)


def _rmsnorm(x, w, eps):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * w


def _silu(x):
    return x / (1 + np.exp(-x))


def _short_conv(x, kernel, seg):
    """Causal depthwise conv of x [B, T, C] with kernel [Kc, C] (tap Kc-1 on the current token) within each document."""
    Kc = kernel.shape[0]
    out = np.zeros_like(x)
    for t in range(x.shape[1]):
        for j in range(Kc):
            s = t - (Kc - 1) + j
            if s >= 0:
                out[:, t] += (seg[:, s] == seg[:, t])[:, None] * x[:, s] * kernel[j]
    return _silu(out)


def _gdn_reference(p, ln, h, seg, cfg):
    """(g, beta, state norm after every token) [B, T, nv] of one GDN layer on its input h."""
    nk, nv, dk, dv = (cfg.linear_num_key_heads, cfg.linear_num_value_heads, cfg.linear_key_head_dim,
                      cfg.linear_value_head_dim)
    x = _rmsnorm(h, ln, cfg.rms_norm_eps)
    k = _short_conv(x @ p["k_proj"]["kernel"], p["k_conv1d"]["kernel"], seg).reshape(B, T, nk, dk)
    k = np.repeat(k / np.sqrt(np.sum(k * k, -1, keepdims=True) + 1e-6), nv // nk, axis=2)
    v = _short_conv(x @ p["v_proj"]["kernel"], p["v_conv1d"]["kernel"], seg).reshape(B, T, nv, dv)
    g = -np.exp(p["A_log"]) * np.logaddexp(0.0, x @ p["a_proj"]["kernel"] + p["dt_bias"])
    beta = 2.0 / (1.0 + np.exp(-(x @ p["b_proj"]["kernel"])))  # allow_neg_eigval: beta in (0, 2)
    S = np.zeros((B, nv, dk, dv))
    norms = np.zeros((B, T, nv))
    for t in range(T):
        if t > 0:
            S[seg[:, t] != seg[:, t - 1]] = 0.0
        S = np.exp(g[:, t])[..., None, None] * S
        err = v[:, t] - np.einsum("bhk,bhkv->bhv", k[:, t], S)
        S = S + k[:, t, :, :, None] * (beta[:, t, :, None] * err)[:, :, None, :]
        norms[:, t] = np.sqrt(np.sum(S * S, axis=(-2, -1)))
    return g, beta, norms


def _rope(x, theta):
    d = x.shape[-1]
    ang = np.arange(T)[:, None] * (1.0 / theta ** (np.arange(0, d, 2) / d))[None]
    cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))
    rot = np.concatenate([-x[..., d // 2:], x[..., :d // 2]], -1)
    return x * cos[None, :, None] + rot * sin[None, :, None]


def _attention_reference(p, h, seg, cfg):
    """Attention probabilities [B, nh, T, T] of one attention layer on its input h."""
    nh, nkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    q = _rmsnorm(h @ p["q_proj"]["kernel"], p["q_norm"]["weight"], cfg.rms_norm_eps).reshape(B, T, nh, hd)
    k = _rmsnorm(h @ p["k_proj"]["kernel"], p["k_norm"]["weight"], cfg.rms_norm_eps).reshape(B, T, nkv, hd)
    if cfg.rope_theta is not None:
        q, k = _rope(q, cfg.rope_theta), _rope(k, cfg.rope_theta)
    k = np.repeat(k, nh // nkv, axis=2)
    logits = np.einsum("bthd,bshd->bhts", q, k) * hd ** -0.5
    mask = np.tril(np.ones((T, T), bool))[None] & (seg[:, :, None] == seg[:, None, :])
    logits = np.where(mask[:, None], logits, -np.inf)
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("rope", [False, True])
def test_trace_matches_an_independent_computation(rope):
    model = _model(rope)
    cfg = model.config
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 256, (B, T)))
    seg_np = np.repeat([[0] * CUT + [1] * (T - CUT)], B, axis=0)
    seg = jnp.asarray(seg_np)
    tr = trace(model, ids, segment_ids=seg)
    np.testing.assert_allclose(tr.final_hidden, np.asarray(model.model(ids, segment_ids=seg)), rtol=1e-5, atol=1e-5)
    assert sorted(tr.gdn) == [0, 1, 2] and sorted(tr.attention) == [3]
    assert tr.residual_update().shape == (4, B, T)
    layers = _np(nnx.to_pure_dict(nnx.state(model, nnx.Param)))["model"]["layers"]
    for i in tr.gdn:
        h = np.asarray(tr.hidden[i], np.float64)
        ln = layers[i]["input_layernorm"]["weight"]
        g, beta, norms = _gdn_reference(layers[i]["linear_attn"], ln, h, seg_np, cfg)
        t = tr.gdn[i]
        np.testing.assert_allclose(t.g, g, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(t.beta, beta, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(t.decay, np.exp(g), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(t.memory_length, 1 / np.maximum(1 - np.exp(g), 1e-6), rtol=1e-4)
        np.testing.assert_allclose(t.state_norm, norms, rtol=1e-4, atol=1e-6)
        assert (t.decay <= 1).all() and (t.memory_length >= 1).all()
    for i in tr.attention:
        want = _attention_reference(layers[i]["self_attn"], np.asarray(tr.hidden[i], np.float64), seg_np, cfg)
        np.testing.assert_allclose(tr.attention[i], want, rtol=1e-4, atol=1e-6)
    P = tr.attention[3]  # rows are distributions, causal, and blind across the document boundary
    np.testing.assert_allclose(P.sum(-1), 1.0, rtol=1e-5)
    assert np.abs(np.triu(P, 1)).max() == 0
    assert np.abs(P[:, :, CUT:, :CUT]).max() == 0


def test_trace_state_norm_ends_at_the_kernels_final_state_and_scanned_traces_the_same():
    model = _model(False)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 256, (B, T)))
    seg = jnp.asarray(np.repeat([[0] * CUT + [1] * (T - CUT)], B, axis=0))
    tr = trace(model, ids, segment_ids=seg)
    layer = model.model.layers[0]
    a = layer.linear_attn
    x = layer.input_layernorm(model.model.embed_tokens(ids))
    k = jnp.repeat(l2_normalize(a.k_conv1d(a.k_proj(x), segment_ids=seg).reshape(B, T, a.nk, a.dk)), 2, axis=2)
    v = a.v_conv1d(a.v_proj(x), segment_ids=seg).reshape(B, T, a.nv, a.dv)
    g, beta = gdn_gates(a.a_proj(x), a.b_proj(x), a.A_log[...], a.dt_bias[...], allow_neg_eigval=True)
    _, S = gated_delta_rule(k, k, v, g, beta, segment_ids=seg, output_final_state=True, backend="sequential")
    np.testing.assert_allclose(tr.gdn[0].state_norm[:, -1], np.sqrt((np.asarray(S) ** 2).sum((-2, -1))), rtol=1e-4)
    np.testing.assert_allclose(tr.gdn[0].g, np.asarray(g), rtol=1e-6)
    # the scanned layout is traced through the same layers
    cfg8 = model.config.replace(num_hidden_layers=8, layer_types=None)
    lm = OlmoHybridForCausalLM(cfg8, rngs=nnx.Rngs(2))
    t_list, t_scan = trace(lm, ids, segment_ids=seg), trace(with_layout(lm, scan_layers=True), ids, segment_ids=seg)
    np.testing.assert_allclose(t_scan.final_hidden, t_list.final_hidden, rtol=1e-6, atol=1e-6)
    for i in t_list.gdn:
        np.testing.assert_array_equal(t_scan.gdn[i].g, t_list.gdn[i].g)
        np.testing.assert_allclose(t_scan.gdn[i].state_norm, t_list.gdn[i].state_norm, rtol=1e-6)
    for i in t_list.attention:
        np.testing.assert_allclose(t_scan.attention[i], t_list.attention[i], rtol=1e-6, atol=1e-7)
