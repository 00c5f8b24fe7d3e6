"""Conversion: naming variants, save_hf round trips through transformers, the 7B manifest, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
from flax import nnx  # noqa: E402

from hf_utils import (  # noqa: E402
    hf_config_dict,
    hf_from_pretrained,
    hf_logits,
    rel_l2,
    release_checkpoint,
    release_state_dict,
    write_checkpoint,
)
from olmo_hybrid_jax import OlmoHybridConfig, OlmoHybridForCausalLM  # noqa: E402
from olmo_hybrid_jax.convert import (  # noqa: E402
    CheckpointMismatchError,
    hf_tensor_shapes,
    load_hf,
    load_orbax,
    main,
    save_hf,
)

DATA = Path(__file__).parent / "data"
OVERRIDES = dict(linear_num_value_heads=4, num_key_value_heads=2)


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    hf, path = release_checkpoint(tmp_path_factory.mktemp("release"), seed=7, **OVERRIDES)
    ids = np.random.default_rng(0).integers(0, hf.config.vocab_size, (2, 29))
    return hf, path, ids, hf_logits(hf, ids)


def _logits(model, ids):
    return np.asarray(model(jnp.asarray(ids)))


# ----------------------------------------------------------------------------- naming variants
def _rename(sd, fn):
    return {fn(k): v for k, v in sd.items()}


def _fused_conv(sd, cfg):
    out = {}
    for k, v in sd.items():
        if k.endswith("q_conv1d.weight"):
            base = k[: -len("q_conv1d.weight")]
            out[base + "conv1d.weight"] = torch.cat(
                [sd[base + "q_conv1d.weight"], sd[base + "k_conv1d.weight"], sd[base + "v_conv1d.weight"]], 0)
        elif k.endswith(("k_conv1d.weight", "v_conv1d.weight")):
            continue
        else:
            out[k] = v
    return out


def _legacy_norms(sd, cfg):
    def fn(k):
        parts = k.split(".")
        if k.startswith("model.layers.") and cfg.layer_types[int(parts[2])] == "linear_attention":
            k = k.replace("input_layernorm", "attention_layer_norm").replace("post_attention_layernorm",
                                                                              "feedforward_layer_norm")
        return k
    return _rename(sd, fn)


def _olmo_core(sd, cfg):
    def fn(k):
        if k == "model.embed_tokens.weight":
            return "embeddings.weight"
        if k == "model.norm.weight":
            return "lm_head.norm.weight"
        if k == "lm_head.weight":
            return "lm_head.w_out.weight"
        _, _, i, rest = k.split(".", 3)
        lin = cfg.layer_types[int(i)] == "linear_attention"
        rest = (rest.replace("mlp.gate_proj", "feed_forward.w1").replace("mlp.up_proj", "feed_forward.w3")
                .replace("mlp.down_proj", "feed_forward.w2"))
        if lin:
            rest = rest.replace("input_layernorm", "attention_norm").replace("post_attention_layernorm",
                                                                             "feed_forward_norm")
            for p in "qkvabg":
                rest = rest.replace(f"linear_attn.{p}_proj", f"attention.w_{p}")
            rest = rest.replace("linear_attn.o_proj", "attention.w_out").replace("linear_attn.", "attention.")
        else:
            rest = (rest.replace("post_attention_layernorm", "attention_norm")
                    .replace("post_feedforward_layernorm", "feed_forward_norm"))
            for p in "qkv":
                rest = rest.replace(f"self_attn.{p}_proj", f"attention.w_{p}")
            rest = rest.replace("self_attn.o_proj", "attention.w_out").replace("self_attn.", "attention.")
        return f"blocks.{i}.{rest}"
    return _rename(sd, fn)


def _fla_era(sd, cfg):
    def fn(k):
        parts = k.split(".")
        if k.startswith("model.layers.") and cfg.layer_types[int(parts[2])] == "linear_attention":
            k = k.replace("linear_attn.", "fla.inner.").replace("input_layernorm", "fla_norm")
        return k
    return _rename(_olmo_core_main_names(sd, cfg), fn)


def _olmo_core_main_names(sd, cfg):
    return _rename(sd, lambda k: k.replace("linear_attn.o_proj", "linear_attn.out_proj")
                   .replace("linear_attn.o_norm", "linear_attn.norm"))


@pytest.mark.parametrize("variant", [_fused_conv, _legacy_norms, _olmo_core, _olmo_core_main_names])
def test_naming_variants_load_to_same_logits(release, tmp_path, variant):
    hf, _, ids, ref = release
    sd = variant(release_state_dict(hf), hf.config)
    assert set(sd) != set(release_state_dict(hf)) or variant is None
    path = write_checkpoint(tmp_path / "ckpt", hf_config_dict(hf), sd)
    assert rel_l2(_logits(load_hf(path, progress=False), ids), ref) < 1e-4


def test_fused_conv_split_at_channel_boundaries(release, tmp_path):
    """value_dim != key_dim here: equal thirds would be wrong, and the logits would show it."""
    hf, _, ids, ref = release
    cfg = hf.config
    assert cfg.linear_num_value_heads * cfg.linear_value_head_dim != cfg.linear_num_key_heads * cfg.linear_key_head_dim
    sd = _fused_conv(release_state_dict(hf), cfg)
    model = load_hf(write_checkpoint(tmp_path / "f", hf_config_dict(hf), sd), progress=False)
    w = sd["model.layers.0.linear_attn.conv1d.weight"].numpy()
    kd = cfg.linear_num_key_heads * cfg.linear_key_head_dim
    np.testing.assert_array_equal(np.asarray(model.model.layers[0].linear_attn.k_conv1d.kernel[...]),
                                  w[kd:2 * kd, 0, :].T)


# ----------------------------------------------------------------------------- save_hf round trips
@pytest.mark.parametrize("shard", ["5GB", "20KB"])
def test_save_hf_round_trip_through_transformers(release, tmp_path, shard):
    hf, path, ids, ref = release
    ours = load_hf(path, progress=False)
    out = save_hf(ours, tmp_path / "out", max_shard_size=shard, progress=False)
    if shard == "20KB":
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) > 1
        assert not (out / "model.safetensors").exists()
    else:
        assert (out / "model.safetensors").exists()
    assert not list(out.glob("*.tmp")) and not (out / ".tmp_save_hf").exists()
    hf2 = hf_from_pretrained(out)
    assert rel_l2(hf_logits(hf2, ids), ref) < 1e-5
    # and back into JAX
    assert rel_l2(_logits(load_hf(out, progress=False), ids), ref) < 1e-4


def test_save_hf_writes_release_names(release, tmp_path):
    hf, path, _, _ = release
    from safetensors import safe_open
    out = save_hf(load_hf(path, progress=False), tmp_path / "o", progress=False)
    with safe_open(str(out / "model.safetensors"), framework="np") as f:
        names = set(f.keys())
    assert names == set(release_state_dict(hf))
    assert any(n.endswith("linear_attn.v_conv1d.weight") for n in names)


def test_save_hf_bf16_and_fresh_model_loads_in_transformers(tmp_path):
    cfg = OlmoHybridConfig.preset("tiny")
    model = OlmoHybridForCausalLM(cfg, rngs=nnx.Rngs(3))
    out = save_hf(model, tmp_path / "bf", dtype=jnp.bfloat16, progress=False)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    hf = hf_from_pretrained(out)
    ids = np.arange(24).reshape(2, 12) % cfg.vocab_size
    back = load_hf(out, progress=False)
    assert back.model.embed_tokens.embedding[...].dtype == jnp.bfloat16
    back32 = load_hf(out, dtype=jnp.float32, progress=False)
    assert rel_l2(_logits(back32, ids), hf_logits(hf, ids)) < 1e-4


def test_save_hf_refuses_to_overwrite(release, tmp_path):
    _, path, _, _ = release
    model = load_hf(path, progress=False)
    out = save_hf(model, tmp_path / "o", progress=False)
    before = (out / "model.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="overwrite"):
        save_hf(model, out, progress=False)
    assert (out / "model.safetensors").read_bytes() == before


def test_orbax_round_trip_and_cli(release, tmp_path):
    hf, path, ids, ref = release
    assert main(["hf-to-orbax", str(path), str(tmp_path / "orbax")]) == 0
    assert rel_l2(_logits(load_orbax(tmp_path / "orbax"), ids), ref) < 1e-4
    assert main(["orbax-to-hf", str(tmp_path / "orbax"), str(tmp_path / "hf")]) == 0
    assert rel_l2(hf_logits(hf_from_pretrained(tmp_path / "hf"), ids), ref) < 1e-5
    assert main(["orbax-to-hf", str(tmp_path / "nothing"), str(tmp_path / "hf2")]) == 2


# ----------------------------------------------------------------------------- the 7B shape contract
def test_7b_manifest_names_and_shapes():
    manifest = json.loads((DATA / "olmo_hybrid_7b_safetensors_manifest.json").read_text())["tensors"]
    cfg = OlmoHybridConfig.preset("olmo_hybrid_7b")
    shapes = hf_tensor_shapes(cfg)
    assert len(manifest) == 523
    assert {k: tuple(v) for k, v in manifest.items()} == shapes


def test_7b_model_params_match_manifest_without_weights():
    cfg = OlmoHybridConfig.preset("olmo_hybrid_7b")
    abstract = nnx.eval_shape(lambda: OlmoHybridForCausalLM(cfg, rngs=nnx.Rngs(0), param_dtype=jnp.bfloat16))
    params = nnx.state(abstract, nnx.Param)
    leaves = jax.tree.leaves(params)
    assert sum(int(np.prod(x.shape)) for x in leaves) == 7_430_870_688
    from olmo_hybrid_jax.convert import _param_paths
    pure = nnx.to_pure_dict(params)
    for name, (ppath, kind, shape) in _param_paths(cfg).items():
        node = pure
        for k in ppath:
            node = node[k]
        expect = shape[::-1] if kind == "linear" else (shape[2], shape[0]) if kind == "conv" else shape
        assert tuple(node.shape) == expect, name
    assert len(_param_paths(cfg)) == len(leaves)  # every parameter is written by save_hf


def test_7b_forward_shape_contract():
    cfg = OlmoHybridConfig.preset("olmo_hybrid_7b")

    def fwd(ids):
        return OlmoHybridForCausalLM(cfg, rngs=nnx.Rngs(0), param_dtype=jnp.bfloat16)(ids)

    out = jax.eval_shape(fwd, jax.ShapeDtypeStruct((1, 100), jnp.int32))
    assert out.shape == (1, 100, 100352) and out.dtype == jnp.bfloat16


# ----------------------------------------------------------------------------- bad input
def _sd_and_cfg(release):
    hf = release[0]
    return release_state_dict(hf), hf_config_dict(hf)


def test_missing_tensor_is_named(release, tmp_path):
    sd, cfg = _sd_and_cfg(release)
    del sd["model.layers.1.linear_attn.dt_bias"]
    with pytest.raises(CheckpointMismatchError, match=r"missing.*model\.layers\.1\.linear_attn\.dt_bias"):
        load_hf(write_checkpoint(tmp_path / "c", cfg, sd), progress=False)


def test_unexpected_and_misshapen_tensors_are_named(release, tmp_path):
    sd, cfg = _sd_and_cfg(release)
    sd["model.layers.0.linear_attn.extra.weight"] = torch.zeros(3)
    sd["model.layers.3.self_attn.q_proj.weight"] = torch.zeros(5, 7)
    with pytest.raises(CheckpointMismatchError) as e:
        load_hf(write_checkpoint(tmp_path / "c", cfg, sd), progress=False)
    assert "model.layers.0.linear_attn.extra.weight" in str(e.value)
    assert "model.layers.3.self_attn.q_proj.weight is [5, 7], config gives [48, 48]" in str(e.value)
    assert "\n" not in str(e.value)


def test_config_that_does_not_match_checkpoint(release, tmp_path):
    sd, cfg = _sd_and_cfg(release)
    cfg = dict(cfg, num_hidden_layers=5, layer_types=cfg["layer_types"] + ["linear_attention"])
    with pytest.raises(CheckpointMismatchError, match=r"missing.*model\.layers\.4\."):
        load_hf(write_checkpoint(tmp_path / "c", cfg, sd), progress=False)
    sd2, cfg2 = _sd_and_cfg(release)
    cfg2 = dict(cfg2, linear_value_head_dim=cfg2["linear_value_head_dim"] + 4)
    with pytest.raises(CheckpointMismatchError, match="misshapen"):
        load_hf(write_checkpoint(tmp_path / "d", cfg2, sd2), progress=False)


def test_unreadable_files(release, tmp_path):
    _, path, _, _ = release
    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    (bad / "model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="cannot read safetensors"):
        load_hf(bad, progress=False)
    (bad / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_hf(bad, progress=False)
    with pytest.raises(FileNotFoundError, match="config"):
        load_hf(tmp_path / "missing", progress=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text((path / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_hf(empty, progress=False)


def test_wrong_model_type(tmp_path):
    with pytest.raises(ValueError, match="model_type"):
        OlmoHybridConfig.from_hf({"model_type": "llama"})


def test_nope_survives_the_trip_through_transformers(tmp_path):
    """The released config.json spells NoPE as rope_parameters: null; we keep it NoPE both ways."""
    from transformers import OlmoHybridConfig as HFConfig
    release_cfg = json.loads((Path(__file__).parents[1] / "configs/models/olmo_hybrid_7b.json").read_text())
    assert release_cfg["rope_parameters"] is None
    cfg = OlmoHybridConfig.from_hf(release_cfg)
    assert cfg.rope_theta is None
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf()))
    hf_cfg = HFConfig.from_pretrained(str(tmp_path))
    assert hf_cfg.rope_parameters.get("rope_theta") is None
    assert OlmoHybridConfig.from_hf(hf_cfg.to_dict()) == cfg
    rope = cfg.replace(rope_parameters={"rope_type": "default", "rope_theta": 5e5})
    assert OlmoHybridConfig.from_hf(rope.to_hf()).rope_theta == 5e5
