"""olmo_hybrid_jax.train.sharding: logical axes from parameter paths, specs and their fallbacks."""

import math
import types

import jax
import pytest
from flax import nnx

from olmo_hybrid_jax import OlmoHybridConfig, OlmoHybridForCausalLM
from olmo_hybrid_jax.train import sharding as shd


def _fake_mesh(**sizes):
    return types.SimpleNamespace(shape={"data": 1, "fsdp": 1, "tensor": 1, **sizes})


def test_logical_axes_from_paths():
    ax = shd.param_logical_axes
    assert ax("model/embed_tokens/embedding", 2) == ("vocab", "embed")
    assert ax("lm_head/kernel", 2) == ("embed", "vocab")
    assert ax("model/layers/3/self_attn/q_proj/kernel", 2) == ("embed", "heads")
    assert ax("model/blocks/layers/0/linear_attn/o_proj/kernel", 3) == ("layers", "heads", "embed")
    assert ax("model/layers/0/mlp/down_proj/kernel", 2) == ("mlp", "embed")
    assert ax("model/layers/0/linear_attn/a_proj/kernel", 2) == ("embed", "gate_heads")
    assert ax("model/layers/0/linear_attn/q_conv1d/kernel", 2) == ("conv_tap", "heads")
    assert ax("model/layers/0/linear_attn/o_norm/weight", 1) == ("norm",)
    with pytest.raises(ValueError, match="no logical-axis rule"):
        ax("model/new_thing/w", 2)


def test_specs_fall_back_to_replication_when_not_divisible():
    P = jax.sharding.PartitionSpec
    rules = shd.merged_rules()
    mesh = _fake_mesh(data=2, fsdp=4, tensor=4)
    spec = shd.logical_to_spec
    assert spec(("embed", "heads"), (3840, 2880), mesh, rules) == P("fsdp", "tensor")
    assert spec(("embed", "gate_heads"), (3840, 30), mesh, rules) == P("fsdp", None)
    assert spec(("vocab", "embed"), (100352, 3840), mesh, rules) == P("tensor", "fsdp")
    assert spec(("vocab", "embed"), (257, 6), mesh, rules) == P(None, None)          # neither divides
    assert spec(("batch", "seq"), (16, 128), mesh, rules) == P(("data", "fsdp"), None)
    assert spec(("batch", "seq"), (6, 128), mesh, rules) == P("data", None)          # prefix that divides
    hsdp_off = shd.merged_rules({"embed": ["data", "fsdp"]})                          # full FSDP over replicas too
    assert spec(("embed", "mlp"), (3840, 11008), mesh, hsdp_off) == P(("data", "fsdp"), "tensor")
    with pytest.raises(ValueError, match="not a mesh axis"):
        shd.merged_rules({"embed": "model"})


def test_every_7b_parameter_has_a_rule_and_big_ones_are_sharded():
    cfg = OlmoHybridConfig.preset("olmo_hybrid_7b")
    m = nnx.eval_shape(lambda: OlmoHybridForCausalLM(cfg, rngs=nnx.Rngs(0), scan_layers=True))
    rules, mesh = shd.merged_rules(), _fake_mesh(fsdp=4)
    leaves = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(m)))[0]
    assert len(leaves) == 3 + 3 * 18 + 11  # one stacked tensor per tensor of a block
    for path, x in leaves:
        p = shd.path_str(path)
        spec = shd.logical_to_spec(shd.param_logical_axes(p, x.ndim), x.shape, mesh, rules)
        if math.prod(x.shape) > 1e7:
            assert "fsdp" in tuple(spec), (p, spec)
        if "/blocks/" in p:
            assert x.shape[0] == 8 and spec[0] is None
