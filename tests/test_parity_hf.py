"""Bottom-up parity with transformers' OlmoHybrid (fp32, CPU, eager attention, torch fallbacks).

Leaves (norms, conv, gates) are held to ~1e-6; layers and logits to 1e-4 relative L2 (the GDN chunked
form and the HF chunked form round differently).
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")  # the `test` extra installs it; CI always has it
import jax.numpy as jnp  # noqa: E402

from hf_utils import hf_from_pretrained, hf_logits, rel_l2, release_checkpoint  # noqa: E402
from olmo_hybrid_jax.convert import load_hf  # noqa: E402
from olmo_hybrid_jax.modules import gdn_gates  # noqa: E402

# Configurations: plain MHA/NoPE; GVA (nv = 2 nk) + GQA + RoPE; tied embeddings + attention bias +
# attention first + no negative eigenvalues + conv size 3 + gelu; one head, long key dim.
CONFIGS = {
    "base": dict(),
    "gva_gqa_rope": dict(linear_num_value_heads=4, num_key_value_heads=2,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    "tied_bias_attnfirst": dict(tie_word_embeddings=True, attention_bias=True, linear_allow_neg_eigval=False,
                                linear_conv_kernel_dim=3, hidden_act="gelu_pytorch_tanh", num_hidden_layers=3,
                                layer_types=["full_attention", "linear_attention", "linear_attention"]),
    "one_head": dict(num_attention_heads=2, num_key_value_heads=1, linear_num_key_heads=1,
                     linear_num_value_heads=3, linear_key_head_dim=32, linear_value_head_dim=8,
                     num_hidden_layers=5, rope_parameters={"rope_type": "default", "rope_theta": 500000.0}),
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory):
    hf, path = release_checkpoint(tmp_path_factory.mktemp(request.param), seed=len(request.param),
                                  **CONFIGS[request.param])
    ours = load_hf(path, progress=False, gdn_backend="chunked", attention_impl="xla")
    return request.param, hf, ours, path


def _x(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _causal_mask(T):
    return torch.triu(torch.full((T, T), float("-inf")), 1)[None, None]


def test_rmsnorm(pair):
    _, hf, ours, _ = pair
    x = _x((2, 7, hf.config.hidden_size)) * 3
    ref = hf.model.norm(torch.tensor(x)).detach().numpy()
    np.testing.assert_allclose(np.asarray(ours.model.norm(jnp.asarray(x))), ref, rtol=1e-6, atol=1e-6)


def _first(hf, ours, kind):
    i = hf.config.layer_types.index(kind)
    return hf.model.layers[i], ours.model.layers[i]


def test_short_conv(pair):
    _, hf, ours, _ = pair
    hl, ol = _first(hf, ours, "linear_attention")
    cfg = hf.config
    kd = cfg.linear_num_key_heads * cfg.linear_key_head_dim
    x = _x((2, 9, ol.linear_attn.v_conv1d.kernel.shape[1]))
    w = hl.linear_attn.conv1d.weight[2 * kd:]  # the v part of HF's fused conv
    ref = torch.nn.functional.conv1d(torch.tensor(x).transpose(1, 2), w, padding=w.shape[-1] - 1,
                                     groups=w.shape[0])[..., :9]
    from transformers.activations import ACT2FN
    ref = ACT2FN[cfg.hidden_act](ref).transpose(1, 2).detach().numpy()
    np.testing.assert_allclose(np.asarray(ol.linear_attn.v_conv1d(jnp.asarray(x))), ref, rtol=1e-5, atol=1e-6)


def test_gates(pair):
    _, hf, ours, _ = pair
    hl, ol = _first(hf, ours, "linear_attention")
    x = _x((2, 5, hf.config.hidden_size))
    ha = hl.linear_attn
    tx = torch.tensor(x)
    g_ref = (-ha.A_log.float().exp() * torch.nn.functional.softplus(ha.a_proj(tx).float() + ha.dt_bias)).detach()
    b_ref = ha.b_proj(tx).sigmoid().detach() * (2.0 if ha.allow_neg_eigval else 1.0)
    oa = ol.linear_attn
    g, beta = gdn_gates(oa.a_proj(jnp.asarray(x)), oa.b_proj(jnp.asarray(x)), oa.A_log[...], oa.dt_bias[...],
                        allow_neg_eigval=oa.allow_neg_eigval)
    np.testing.assert_allclose(np.asarray(g), g_ref.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(beta), b_ref.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("T", [1, 37, 70])
def test_gdn_mixer(pair, T):
    _, hf, ours, _ = pair
    hl, ol = _first(hf, ours, "linear_attention")
    x = _x((2, T, hf.config.hidden_size), seed=T)
    ref = hl.linear_attn(torch.tensor(x)).detach().numpy()
    out = np.asarray(ol.linear_attn(jnp.asarray(x)))
    assert rel_l2(out, ref) < 1e-5


@pytest.mark.parametrize("kind", ["linear_attention", "full_attention"])
def test_decoder_layer(pair, kind):
    _, hf, ours, _ = pair
    hl, ol = _first(hf, ours, kind)
    T = 37
    x = _x((2, T, hf.config.hidden_size), seed=3)
    pe = None
    if hf.model.rotary_emb is not None:
        pe = hf.model.rotary_emb(torch.tensor(x), torch.arange(T)[None].expand(2, T))
    mask = _causal_mask(T) if kind == "full_attention" else None
    ref = hl(torch.tensor(x), attention_mask=mask, position_embeddings=pe).detach().numpy()
    out = np.asarray(ol(jnp.asarray(x), positions=jnp.broadcast_to(jnp.arange(T), (2, T))))
    assert rel_l2(out, ref) < 1e-5


@pytest.mark.parametrize("B,T", [(1, 1), (2, 37), (3, 130)])
def test_logits(pair, B, T):
    _, hf, ours, _ = pair
    ids = np.random.default_rng(T).integers(0, hf.config.vocab_size, (B, T))
    ref = hf_logits(hf, ids)
    out = np.asarray(ours(jnp.asarray(ids)))
    assert out.shape == (B, T, hf.config.vocab_size)
    assert rel_l2(out, ref) < 1e-4


def test_logits_sequential_backend_and_jit(pair):
    _, hf, ours, path = pair
    ids = np.random.default_rng(5).integers(0, hf.config.vocab_size, (2, 45))
    ref = hf_logits(hf, ids)
    seq = load_hf(path, progress=False, gdn_backend="sequential", attention_impl="xla")
    from flax import nnx
    out = np.asarray(nnx.jit(lambda m, x: m(x))(seq, jnp.asarray(ids)))
    assert rel_l2(out, ref) < 1e-4


def test_left_padding_matches_hf(pair):
    """Batched left-padded input (HF attention_mask semantics): real positions match HF."""
    _, hf, ours, _ = pair
    B, T = 3, 20
    ids = np.random.default_rng(9).integers(2, hf.config.vocab_size, (B, T))
    mask = np.ones((B, T), np.int64)
    mask[1, :5] = 0
    mask[2, :12] = 0
    ids[mask == 0] = hf.config.pad_token_id
    ref = hf_logits(hf, ids, attention_mask=mask)
    out = np.asarray(ours(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    real = mask.astype(bool)
    assert rel_l2(out[real], ref[real]) < 1e-4


def test_packed_segments_equal_separate_documents(pair):
    """Documents packed in one row with segment_ids give the logits of each document run alone."""
    _, hf, ours, _ = pair
    lens = [23, 1, 70, 10]
    rng = np.random.default_rng(11)
    docs = [rng.integers(0, hf.config.vocab_size, (1, n)) for n in lens]
    packed = np.concatenate(docs, axis=1)
    seg = np.concatenate([np.full((1, n), i + 3) for i, n in enumerate(lens)], axis=1)
    out = np.asarray(ours(jnp.asarray(packed), segment_ids=jnp.asarray(seg), positions=jnp.asarray(
        np.concatenate([np.arange(n) for n in lens])[None])))
    start = 0
    for d in docs:
        alone = np.asarray(ours(jnp.asarray(d)))
        assert rel_l2(out[:, start:start + d.shape[1]], alone) < 1e-5
        start += d.shape[1]


def test_bf16_compute_close_to_fp32(pair):
    """bf16 compute strays from fp32 no more than transformers' own bf16 model does."""
    _, hf, ours, path = pair
    ids = np.random.default_rng(2).integers(0, hf.config.vocab_size, (2, 40))
    ref = hf_logits(hf, ids)
    with torch.no_grad():
        hf_bf16 = hf_from_pretrained(path).to(torch.bfloat16)(torch.tensor(ids)).logits.float().numpy()
    bf = load_hf(path, progress=False, compute_dtype=jnp.bfloat16)
    out = bf(jnp.asarray(ids))
    assert out.dtype == jnp.bfloat16
    assert bf.model.layers[0].mlp.up_proj.kernel[...].dtype == jnp.float32  # fp32 master weights
    assert rel_l2(np.asarray(out, np.float32), ref) < 1.5 * rel_l2(hf_bf16, ref) + 1e-3
