"""olmo_hybrid_jax.train.config: YAML loading, overlays, overrides, typed validation and its errors."""

import pytest

from olmo_hybrid_jax.train.config import CONFIG_DIR, ConfigError, load_config


def test_every_config_loads_and_overlays_name_their_base():
    base = load_config(CONFIG_DIR / "base.yaml")
    for name in ("tiny", "1b", "7b"):
        text = (CONFIG_DIR / f"{name}.yaml").read_text()
        assert "base: base.yaml" in text
        cfg = load_config(CONFIG_DIR / f"{name}.yaml")
        assert cfg.optim.b2 == base.optim.b2 == 0.95
    assert load_config(CONFIG_DIR / "7b.yaml").model.preset == "olmo_hybrid_7b"


def test_overrides_and_types():
    cfg = load_config(CONFIG_DIR / "tiny.yaml", ["optim.lr=1e-3", "data.paths=[a.u8,b.u8]", "train.steps=7",
                                                 "model.overrides.num_hidden_layers=8",
                                                 "mesh.rules={embed: [data, fsdp]}"])
    assert cfg.optim.lr == 1e-3 and cfg.data.paths == ("a.u8", "b.u8") and cfg.train.steps == 7
    assert cfg.model.overrides == {"num_hidden_layers": 8}
    assert cfg.mesh.rules == {"embed": ["data", "fsdp"]}
    with pytest.raises(dataclass_frozen_error()):
        cfg.optim.lr = 2.0


def dataclass_frozen_error():
    import dataclasses

    return dataclasses.FrozenInstanceError


@pytest.mark.parametrize("override,needle", [
    ("optim.lrr=1", "unknown config key 'optim.lrr' (did you mean lr"),
    ("optimizer.lr=1", "unknown config key 'optimizer'"),
    ("optim.lr=abc", "optim.lr must be a number"),
    ("train.steps=1.5", "train.steps must be an integer"),
    ("model.remat=sometimes", "model.remat='sometimes'"),
    ("optim.no_decay=[embeddings,bogus]", "unknown groups ['bogus']"),
    ("optim", "is not key=value"),
    ("model=3", "model is a section"),
    # values of the right type but outside their range
    ("optim.lr=-1", "optim.lr must be a finite number > 0, got -1.0"),
    ("optim.lr=.nan", "optim.lr must be a finite number > 0, got nan"),
    ("optim.b1=1.0", "optim.b1 must be in [0, 1), got 1.0"),
    ("optim.b2=-0.1", "optim.b2 must be in [0, 1), got -0.1"),
    ("optim.eps=0", "optim.eps must be > 0"),
    ("optim.weight_decay=-0.1", "optim.weight_decay must be >= 0"),
    ("optim.max_grad_norm=-1", "optim.max_grad_norm must be >= 0"),
    ("optim.alpha_f=1.5", "optim.alpha_f must be in [0, 1]"),
    ("optim.z_loss=-1e-5", "optim.z_loss must be >= 0"),
    ("optim.skip_sigma=0", "optim.skip_sigma must be > 0"),
    ("data.eos_token_id=-1", "data.eos_token_id must be >= 0"),
    ("data.seed=-1", "data.seed must be >= 0"),
    ("data.prefetch=-1", "data.prefetch must be >= 0"),
    ("train.peak_flops_per_device=0", "train.peak_flops_per_device must be > 0"),
])
def test_bad_overrides_say_what_is_wrong(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config(CONFIG_DIR / "tiny.yaml", [override])
    assert needle in str(e.value)


def test_bad_yaml_key_names_the_file(tmp_path):
    (tmp_path / "base.yaml").write_text((CONFIG_DIR / "base.yaml").read_text())
    (tmp_path / "x.yaml").write_text("base: base.yaml\ndata:\n  seq_length: 64\n")
    with pytest.raises(ConfigError, match=r"x\.yaml: unknown config key 'data.seq_length' \(did you mean seq_len"):
        load_config(tmp_path / "x.yaml")
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_bad_model_override_is_a_config_error():
    from olmo_hybrid_jax.train.trainer import model_config

    with pytest.raises(ConfigError, match="unknown OlmoHybridConfig fields"):
        model_config(load_config(CONFIG_DIR / "tiny.yaml", ["model.overrides.hidden=3"]))
    cfg = model_config(load_config(CONFIG_DIR / "tiny.yaml", ["model.overrides.num_hidden_layers=8"]))
    assert cfg.layer_types == (("linear_attention",) * 3 + ("full_attention",)) * 2


def test_gdn_kernel_reaches_the_pallas_config():
    from olmo_hybrid_jax.kernels import PallasConfig
    from olmo_hybrid_jax.train.config import gdn_kernel_config
    from olmo_hybrid_jax.train.trainer import model_kwargs

    assert load_config(CONFIG_DIR / "base.yaml").model.gdn_kernel == {}
    assert model_kwargs(load_config(CONFIG_DIR / "tiny.yaml"))["gdn_kernel"] is None  # the tuned table
    cfg = load_config(CONFIG_DIR / "tiny.yaml", ["model.gdn_kernel.block_v_fused=32", "model.gdn_kernel={block_v: 16}"])
    assert gdn_kernel_config(cfg.model) == PallasConfig(block_v_fused=32, block_v=16)
    assert model_kwargs(cfg)["gdn_kernel"] == PallasConfig(block_v_fused=32, block_v=16)


@pytest.mark.parametrize("override,needle", [
    ("model.gdn_kernel.block_v_fusd=32", "unknown PallasConfig field 'block_v_fusd' (did you mean block_v_fused"),
    ("model.gdn_kernel.block_v=abc", "model.gdn_kernel.block_v must be an integer"),
    ("model.gdn_kernel.block_v=24", "model.gdn_kernel: PallasConfig.block_v must be a power of two"),
    ("model.gdn_kernel=3", "model.gdn_kernel must be a mapping"),
])
def test_bad_gdn_kernel_says_what_is_wrong(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config(CONFIG_DIR / "tiny.yaml", [override])
    assert needle in str(e.value)
