"""olmo_hybrid_jax.train.flops: FLOP counts by hand and from the model's own parameters, the peak table."""

import math

import jax
import pytest
from flax import nnx

from olmo_hybrid_jax import OlmoHybridConfig, OlmoHybridForCausalLM
from olmo_hybrid_jax.train import flops
from olmo_hybrid_jax.train import sharding as shd


def test_flops_match_hand_counts_on_tiny():
    cfg = OlmoHybridConfig.preset("tiny")  # H64 I128 V256, 3 GDN (nk2 nv4 dk16 dv24) + 1 attn (nh4 nkv2 hd16)
    gdn_layer = 64 * (32 + 32 + 96) + 2 * 64 * 4 + 64 * 96 + 96 * 64 + 4 * (32 + 32 + 96)  # qkv, a/b, g, o, convs
    attn_layer = 64 * 64 + 2 * 64 * 32 + 64 * 64
    mlp = 3 * 64 * 128
    assert flops.matmul_params(cfg) == 256 * 64 + 3 * (gdn_layer + mlp) + (attn_layer + mlp)
    # the same count from the model's own parameters: everything but the embedding, norms and gates
    m = nnx.eval_shape(lambda: OlmoHybridForCausalLM(cfg, rngs=nnx.Rngs(0)))
    counted = 0
    for path, x in jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(m)))[0]:
        p = shd.path_str(path)
        if not any(s in p for s in ("embed_tokens", "norm", "A_log", "dt_bias")):
            counted += math.prod(x.shape)
    assert counted == flops.matmul_params(cfg)
    T = 128
    assert flops.attention_flops_per_token(cfg, T) == 1 * 4 * 4 * 16 * (T + 1) / 2 == 16512
    C = 64  # per GDN layer and head: 3 C dk + 2 C dv + 3 dk dv + C^2/3 MACs
    per_head = 3 * C * 16 + 2 * C * 24 + 3 * 16 * 24 + C * C / 3
    assert flops.gdn_flops_per_token(cfg) == pytest.approx(3 * 4 * 2 * per_head)
    assert flops.train_flops_per_token(cfg, T) == pytest.approx(
        3 * (2 * flops.matmul_params(cfg) + 16512 + flops.gdn_flops_per_token(cfg)))


def test_flops_7b_matches_performance_doc():
    cfg = OlmoHybridConfig.preset("olmo_hybrid_7b")
    # 7,430,870,688 params minus the 100352 x 3840 embedding, norms, A_log and dt_bias
    norms = 24 * (2 * 3840 + 192 + 2 * 30) + 8 * (4 * 3840) + 3840
    assert flops.matmul_params(cfg) == 7_430_870_688 - 100352 * 3840 - norms
    assert flops.train_flops_per_token(cfg, 8192) == pytest.approx(4.43e10, rel=0.01)


def test_peak_flops_table():
    assert flops.peak_flops_per_device("NVIDIA H100 80GB HBM3") == 989e12
    assert flops.peak_flops_per_device("NVIDIA H200") == 989e12
    assert flops.peak_flops_per_device("cpu") is None
    assert flops.peak_flops_per_device("cpu", 1e12) == 1e12
