"""Config mirror of transformers' OlmoHybridConfig, model construction, dtypes and bad input."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from olmo_hybrid_jax import OlmoHybridConfig, OlmoHybridForCausalLM
from olmo_hybrid_jax.config import PRESET_DIR
from olmo_hybrid_jax.generate import generate


def test_fields_mirror_transformers_config():
    """Every model-defining field of transformers' OlmoHybridConfig exists here under the same name."""
    transformers = pytest.importorskip("transformers")
    hf_fields = set(transformers.OlmoHybridConfig.__dataclass_fields__)
    bookkeeping = {"architectures", "attribute_map", "base_config_key", "chunk_size_feed_forward", "dtype",
                   "extra_config_files", "extra_files", "id2label", "is_encoder_decoder", "label2id", "model_type",
                   "output_hidden_states", "problem_type", "return_dict", "sub_configs_defaults",
                   "transformers_version", "use_cache"}
    model_fields = {f for f in hf_fields - bookkeeping if not f.startswith(("_", "base_model_"))}
    assert len(model_fields) >= 29
    assert model_fields <= {f.name for f in dataclasses.fields(OlmoHybridConfig)}


@pytest.mark.parametrize("preset", ["olmo_hybrid_7b", "olmo_hybrid_1b", "tiny"])
def test_presets_round_trip_through_transformers(preset, tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = OlmoHybridConfig.preset(preset)
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf()))
    hf = transformers.OlmoHybridConfig.from_pretrained(str(tmp_path))
    assert OlmoHybridConfig.from_hf(hf.to_dict()) == cfg
    for name in ("linear_key_head_dim", "linear_value_head_dim", "num_key_value_heads", "linear_num_value_heads"):
        assert getattr(hf, name) == getattr(cfg, name)
    assert list(hf.layer_types) == list(cfg.layer_types)


def test_defaults_resolve_like_transformers():
    cfg = OlmoHybridConfig(hidden_size=3840, num_attention_heads=30, num_hidden_layers=6)
    assert cfg.linear_key_head_dim == 96 and cfg.linear_value_head_dim == 192
    assert cfg.layer_types == ("linear_attention",) * 3 + ("full_attention",) + ("linear_attention",) * 2
    assert OlmoHybridConfig(num_hidden_layers=3).layer_types[-1] == "full_attention"  # forced, as in HF
    assert cfg.num_key_value_heads == 30 and cfg.rope_theta is None


def test_preset_values():
    c7 = OlmoHybridConfig.preset("olmo_hybrid_7b")
    assert (c7.hidden_size, c7.num_linear_layers, c7.num_full_layers, c7.linear_key_dim) == (3840, 24, 8, 2880)
    c1 = OlmoHybridConfig.preset("olmo_hybrid_1b")
    assert (c1.hidden_size, c1.num_hidden_layers) == (2048, 16)
    assert {p.stem for p in PRESET_DIR.glob("*.json")} >= {"olmo_hybrid_7b", "olmo_hybrid_1b", "tiny"}
    with pytest.raises(ValueError, match="unknown preset"):
        OlmoHybridConfig.preset("nope")


@pytest.mark.parametrize("bad,match", [
    (dict(num_hidden_layers=2, layer_types=["linear_attention"]), "layer_types has 1 entries"),
    (dict(num_hidden_layers=2, layer_types=["linear_attention"] * 2), "full_attention"),
    (dict(num_hidden_layers=2, layer_types=["full_attention"] * 2), "linear_attention"),
    (dict(num_hidden_layers=2, layer_types=["linear_attention", "mamba"]), "unknown layer_types"),
    (dict(num_attention_heads=7), "not divisible"),
    (dict(num_key_value_heads=7), "not a multiple"),
    (dict(linear_num_key_heads=4, linear_num_value_heads=6), "not a multiple"),
    (dict(hidden_act="tanh"), "hidden_act"),
    (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4}), "rope_type"),
    (dict(hidden_size=0), "positive"),
])
def test_bad_configs_are_named(bad, match):
    with pytest.raises(ValueError, match=match):
        OlmoHybridConfig(**bad)


def test_from_hf_rejects_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        OlmoHybridConfig.from_hf(tmp_path / "nothing.json")
    (tmp_path / "config.json").write_text("[1, 2")
    with pytest.raises(ValueError, match="not valid JSON"):
        OlmoHybridConfig.from_hf(tmp_path)
    with pytest.raises(ValueError, match="linear_use_gate"):
        OlmoHybridConfig.from_hf({"model_type": "olmo3_5_hybrid", "linear_use_gate": False})


@pytest.fixture(scope="module")
def tiny():
    return OlmoHybridForCausalLM(OlmoHybridConfig.preset("tiny"), rngs=nnx.Rngs(0))


def test_model_bad_input(tiny):
    with pytest.raises(ValueError, match=r"\[batch, seq\]"):
        tiny(jnp.zeros((5,), jnp.int32))
    with pytest.raises(ValueError, match="integer"):
        tiny(jnp.zeros((1, 5), jnp.float32))
    with pytest.raises(ValueError, match="segment_ids must have shape"):
        tiny(jnp.zeros((1, 5), jnp.int32), segment_ids=jnp.zeros((1, 4), jnp.int32))
    V = tiny.config.vocab_size
    with pytest.raises(ValueError, match=rf"token id {V}, outside the vocabulary \[0, {V}\)"):
        tiny(jnp.array([[1, V]], jnp.int32))
    with pytest.raises(ValueError, match="token id -1"):
        tiny(jnp.array([[-1, 2]], jnp.int32))
    assert tiny(jnp.array([[0, V - 1]], jnp.int32)).shape == (1, 2, V)  # the edges are in


def test_param_and_compute_dtypes():
    cfg = OlmoHybridConfig.preset("tiny")
    m = OlmoHybridForCausalLM(cfg, rngs=nnx.Rngs(0), param_dtype=jnp.float32, dtype=jnp.bfloat16)
    assert {x.dtype for x in jax.tree.leaves(nnx.state(m, nnx.Param))} == {jnp.dtype(jnp.float32)}
    out = m(jnp.ones((1, 8), jnp.int32))
    assert out.dtype == jnp.bfloat16 and bool(jnp.isfinite(out.astype(jnp.float32)).all())


def test_causality_and_grad(tiny):
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 40)))
    a = tiny(ids)
    b = tiny(ids.at[:, 30:].set(7))
    np.testing.assert_allclose(np.asarray(a[:, :30]), np.asarray(b[:, :30]), rtol=1e-5, atol=1e-5)
    assert not np.allclose(np.asarray(a[:, 31:]), np.asarray(b[:, 31:]))

    def loss(m):
        return jnp.mean(jax.nn.logsumexp(m(ids), -1))

    grads = nnx.grad(loss)(tiny)
    leaves = jax.tree.leaves(grads)
    assert all(bool(jnp.isfinite(g).all()) for g in leaves)
    assert sum(float(jnp.abs(g).sum() > 0) for g in leaves) == len(leaves)  # every parameter gets a gradient


def test_greedy_generate_matches_argmax_loop(tiny):
    ids = np.array([[5, 9, 200, 17]], np.int32)
    out = generate(tiny, ids, 5, eos_token_id=())  # cached prefill + decode vs re-running the full forward
    seq = ids
    for _ in range(5):
        nxt = np.asarray(tiny(jnp.asarray(seq)))[:, -1].argmax(-1)
        seq = np.concatenate([seq, nxt[:, None].astype(np.int32)], axis=1)
    np.testing.assert_array_equal(out, seq)


def test_package_level_generate_is_callable(tiny):
    import olmo_hybrid_jax
    from olmo_hybrid_jax.generate import generate

    ids = np.array([[5, 9, 200, 17]], np.int32)
    np.testing.assert_array_equal(olmo_hybrid_jax.generate(tiny, ids, 3), generate(tiny, ids, 3))


def test_gdn_kernel_options_reach_the_op(tiny):
    """gdn_kernel / gdn_shard_axes / gdn_mesh go to kernels.gated_delta_rule as config / shard_axes / mesh."""
    from olmo_hybrid_jax.kernels import ChunkConfig, PallasConfig, ShardAxes

    cfg = OlmoHybridConfig.preset("tiny")
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 40)))
    ref = OlmoHybridForCausalLM(cfg, rngs=nnx.Rngs(0), gdn_backend="chunked")
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("data",))
    sharded = OlmoHybridForCausalLM(cfg, rngs=nnx.Rngs(0), gdn_backend="chunked", gdn_kernel=ChunkConfig(16),
                                    gdn_shard_axes=ShardAxes(batch=("data",)), gdn_mesh=mesh)
    np.testing.assert_allclose(sharded(ids), ref(ids), rtol=1e-5, atol=1e-5)
    gd, st = nnx.split(sharded)
    assert "shard_map" in str(jax.make_jaxpr(lambda s: nnx.merge(gd, s)(ids))(st))
    with pytest.raises(ValueError, match="takes a ChunkConfig or None"):  # the op checks the config
        OlmoHybridForCausalLM(cfg, rngs=nnx.Rngs(0), gdn_backend="chunked", gdn_kernel=PallasConfig())(ids)
