"""Exporting a trained run: checkpoint -> list-layout model -> HF checkpoint, for either layer layout."""

import jax.numpy as jnp
import numpy as np
import pytest

from olmo_hybrid_jax.convert import load_hf
from olmo_hybrid_jax.model import with_layout
from olmo_hybrid_jax.train.config import load_config
from olmo_hybrid_jax.train.export import load_run_model, main
from olmo_hybrid_jax.train.trainer import run


@pytest.mark.parametrize("scan", ["true", "false"])
def test_export_run(tmp_path, scan):
    # 8 layers = two 3:1 groups, so the scanned layout is really used when asked for
    cfg = load_config("configs/tiny.yaml", [f"model.scan_layers={scan}", "model.overrides.num_hidden_layers=8",
                                            "train.steps=2", "checkpoint.every=1",
                                            "train.progress=false", "data.global_batch_size=4", "data.seq_len=32"])
    run(cfg, tmp_path / "run")
    model = load_run_model(tmp_path / "run")
    model1 = load_run_model(tmp_path / "run", step=1)
    ids = jnp.asarray(np.arange(40).reshape(2, 20))
    logits = np.asarray(model(ids))
    assert np.isfinite(logits).all()
    assert not np.allclose(logits, np.asarray(model1(ids)))  # step 2 differs from step 1
    # the scanned twin computes the same function
    np.testing.assert_allclose(np.asarray(with_layout(model, scan_layers=True)(ids)), logits, rtol=1e-5, atol=1e-5)
    assert main([str(tmp_path / "run"), str(tmp_path / "hf")]) == 0
    np.testing.assert_allclose(np.asarray(load_hf(tmp_path / "hf", progress=False)(ids)), logits, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="no checkpoint for step 7"):
        load_run_model(tmp_path / "run", step=7)
    with pytest.raises(FileNotFoundError, match="not a training run"):
        load_run_model(tmp_path)
