"""model.init_from: a training run starts from an HF or orbax checkpoint, in the scanned layout."""

import jax
import numpy as np
import pytest
from flax import nnx

from olmo_hybrid_jax import OlmoHybridConfig, OlmoHybridForCausalLM
from olmo_hybrid_jax.model import list_to_stacked
from olmo_hybrid_jax.train.config import CONFIG_DIR, ConfigError, load_config

TINY8 = dict(num_hidden_layers=8, layer_types=None)


@pytest.mark.parametrize("kind", ["hf", "orbax"])
def test_init_from_converted_checkpoint(tmp_path, kind):
    from olmo_hybrid_jax.convert import save_hf, save_orbax
    from olmo_hybrid_jax.train.trainer import Trainer

    cfg8 = OlmoHybridConfig.preset("tiny").replace(**TINY8)
    lm = OlmoHybridForCausalLM(cfg8, rngs=nnx.Rngs(7))
    if kind == "hf":
        save_hf(lm, tmp_path / "ckpt", progress=False)
    else:
        save_orbax(lm, tmp_path / "ckpt")
    cfg = load_config(CONFIG_DIR / "tiny.yaml", [f"model.init_from={kind}:{tmp_path / 'ckpt'}"])
    tr = Trainer(cfg)
    assert tr.scanned and tr.mcfg == cfg8  # the architecture comes from the checkpoint
    state = tr.init_state()
    want = list_to_stacked(nnx.to_pure_dict(nnx.state(lm)), cfg8)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), state["params"], want)
    with pytest.raises(ConfigError, match="no config.json"):
        Trainer(load_config(CONFIG_DIR / "tiny.yaml", [f"model.init_from=hf:{tmp_path / 'nothing'}"]))

