"""LoRA as an option of a training run (model.lora): the first step is the base model's, only the adapters train
and are checkpointed, the frozen base stays bit-identical, resume matches an uninterrupted run (and refuses
another base), and the HF export is the merged model."""

from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
import pytest
from flax import nnx

from olmo_hybrid_jax import OlmoHybridConfig, OlmoHybridForCausalLM
from olmo_hybrid_jax.post import chat
from olmo_hybrid_jax.train.config import CONFIG_DIR, ConfigError, load_config

CONVS = [
    [{"role": "user", "content": "What is the sea?"}, {"role": "assistant", "content": "salt water"}],
    [{"role": "user", "content": "Sky?"}, {"role": "assistant", "content": "blue"},
     {"role": "user", "content": "And the grass?"}, {"role": "assistant", "content": "green"}],
    [{"role": "user", "content": "Name a bird."}, {"role": "assistant", "content": "the robin"}],
    [{"role": "user", "content": "Where is the cat?"}, {"role": "assistant", "content": "on the mat"}],
]
SEQ = 64


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """(HF folder of the tiny byte-level base, HF folder of another base of the same shape, chat data folder)."""
    from olmo_hybrid_jax.convert import save_hf

    root = tmp_path_factory.mktemp("lora")
    mcfg = OlmoHybridConfig.preset("tiny").replace(num_hidden_layers=8, layer_types=None)  # 2 blocks: scannable
    for name, seed in (("base", 7), ("other", 8)):
        save_hf(OlmoHybridForCausalLM(mcfg, rngs=nnx.Rngs(seed)), root / name, progress=False)
    chat.prepare(enumerate(CONVS), chat.load_chat_template("bytes"), chat.load_tokenizer("bytes"), root / "data", SEQ)
    return root / "base", root / "other", root / "data"


def lora_overrides(base, data, *extra):
    return [f"model.init_from=hf:{base}", f"data.paths=[{data}]", f"data.seq_len={SEQ}", f"train.loss_chunk={SEQ}",
            "data.global_batch_size=2", "train.grad_accum_steps=2", "train.progress=false",
            "checkpoint.async_save=false", "optim.lr=1e-2", "model.lora.rank=4", *extra]


def lora_config(base, data, *extra):
    return load_config(CONFIG_DIR / "sft_lora_tiny.yaml", lora_overrides(base, data, *extra))


def first_batch(tr):
    from olmo_hybrid_jax.train.data import ChatRows

    rows = ChatRows([str(tr.cfg.data.paths[0])], SEQ)
    return tr.device_batch({k: np.stack([rows[i][k] for i in range(2)]) for k in rows[0]})


def test_config_validation():
    base = [f"data.paths=[{CONFIG_DIR}]"]
    with pytest.raises(ConfigError, match="model.lora needs model.init_from"):
        load_config(CONFIG_DIR / "sft_lora_tiny.yaml", base)
    with pytest.raises(ConfigError, match="model.lora needs alpha"):
        load_config(CONFIG_DIR / "tiny.yaml", ["model.init_from=hf:/x", "model.lora={rank: 4}"])
    for bad, msg in (("model.lora.alpha=-1", "alpha must be"), ("model.lora.rnk=4", "did you mean rank"),
                     ("model.lora.rank=0", "positive int"), ("model.lora.adapter_dtype=int8", "adapter_dtype")):
        with pytest.raises(ConfigError, match=msg) as e:
            load_config(CONFIG_DIR / "sft_lora_tiny.yaml", [*base, "model.init_from=hf:/x", bad])
        assert "\n" not in str(e.value)
    assert load_config(CONFIG_DIR / "sft_lora_tiny.yaml", [*base, "model.lora=null"]).model.lora is None


@pytest.mark.slow
@pytest.mark.parametrize("scan", [True, False])
def test_first_step_is_the_base_model_and_only_adapters_train(bases, scan):
    from olmo_hybrid_jax.train.trainer import Trainer, load_init_params

    base, _, data = bases
    cfg = lora_config(base, data, f"model.scan_layers={str(scan).lower()}", "optim.warmup_steps=0")
    tr = Trainer(cfg)
    assert tr.scanned == scan
    batch = first_batch(tr)
    state = tr.init_state()
    want = load_init_params(cfg, tr.mcfg, tr.scanned)
    full = Trainer(cfg.replace(model=dataclasses.replace(cfg.model, lora=None)))
    base_loss = float(jax.jit(lambda p, b: full.loss_fn(p, b)[1][0])(want, batch))
    assert set(jax.tree.leaves(jax.tree_util.tree_map_with_path(
        lambda p, _: str(p[-1].key), state["params"]))) == {"lora_a", "lora_b"}
    losses = []
    for _ in range(4):
        state, m = tr.step_fn(state, batch)
        losses.append(float(m["loss"]))
    np.testing.assert_allclose(losses[0], base_loss, rtol=1e-5)  # B = 0: the base model's loss
    assert losses[-1] < losses[0] - 0.05, losses
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), tr.base, want)


@pytest.fixture(scope="module")
def lora_run(bases, tmp_path_factory):
    """An uninterrupted 6-step LoRA run (checkpoints and in-loop eval every 3, HF export at the end)."""
    from olmo_hybrid_jax.train.trainer import run

    base, _, data = bases
    out = tmp_path_factory.mktemp("lora_run") / "run"
    run(lora_config(base, data, "train.steps=6", "checkpoint.every=3", "checkpoint.keep=2", "eval.every=3",
                    f"eval.paths=[{data}]", "eval.batches=1"), out)
    return out


def _losses(out):
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_checkpoint_holds_only_adapters(lora_run):
    from olmo_hybrid_jax.train.checkpoint import Checkpointer

    ck = Checkpointer(lora_run / "checkpoints", every=3, keep=2, async_save=False)
    try:
        assert ck.all_steps() == [3, 6]
        shapes = ck.state_shapes(6)
        meta = ck.read_meta(6)
    finally:
        ck.close()
    arrays = [k for k, s in shapes.items() if len(s) >= 2]
    assert any("blocks" in k for k in arrays)  # the scanned layout: stacked adapters [G, ...]
    assert arrays and all(k.rsplit("/", 1)[-1] in ("lora_a", "lora_b") for k in arrays), arrays
    assert {k.split("/")[0] for k in shapes} == {"step", "params", "opt_state", "rng"}
    assert not any("kernel" in k or "embedding" in k or "weight" in k for k in shapes)
    assert meta["lora_base"]["init_from"].startswith("hf:") and len(meta["lora_base"]["checksum"]) == 3
    rows = [json.loads(line) for line in (lora_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval/loss" in r] == [3, 6]


@pytest.mark.slow
def test_resume_matches_and_refuses_another_base(bases, lora_run, tmp_path, capsys):
    from olmo_hybrid_jax.train.__main__ import main
    from olmo_hybrid_jax.train.trainer import run

    base, other, data = bases
    out = tmp_path / "run"
    run(lora_config(base, data, "train.steps=3", "checkpoint.every=3", "train.export_hf=false"), out)
    capsys.readouterr()
    code = main(["--config", str(CONFIG_DIR / "sft_lora_tiny.yaml"), "--out", str(out), "--resume",
                 *lora_overrides(other, data, "train.steps=6", "checkpoint.every=3")])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and last.startswith("error: checkpoint step 3") and "LoRA adapters trained on the base" in last
    assert last.endswith("set model.init_from to that base"), last  # the whole error on one line
    summary = run(lora_config(base, data, "train.steps=6", "checkpoint.every=3", "train.export_hf=false"), out,
                  resume=True)
    assert summary["start_step"] == 3
    assert _losses(out) == _losses(lora_run)  # bit-identical


@pytest.mark.slow
def test_hf_export_is_the_merged_model(lora_run, tmp_path):
    torch = pytest.importorskip("torch")
    from hf_utils import hf_from_pretrained
    from olmo_hybrid_jax.post.lora import has_lora
    from olmo_hybrid_jax.train.export import load_run_model, main

    merged = load_run_model(lora_run)
    assert not has_lora(merged)
    tokens = np.random.default_rng(0).integers(2, 256, (2, 24))
    want = np.asarray(merged(tokens), np.float32)
    assert main([str(lora_run), str(tmp_path / "hf")]) == 0
    for hf_dir in (lora_run / "hf", tmp_path / "hf"):  # train.export_hf and the CLI
        hf = hf_from_pretrained(hf_dir)
        with torch.no_grad():
            got = hf(torch.tensor(tokens)).logits.numpy()
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
