"""SFT through the trainer (data.format: chat): the first step's loss is transformers' masked cross-entropy
(labels -100 outside the assistant mask, mean over the kept tokens of the batch) of the converted model, and a
short run's exported HF folder answers its conversations with greedy generation."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from eval_helpers import EOS, eval_checkpoint  # noqa: E402

from hf_utils import hf_from_pretrained  # noqa: E402
from olmo_hybrid_jax.post import chat  # noqa: E402
from olmo_hybrid_jax.train.config import CONFIG_DIR, load_config  # noqa: E402
from olmo_hybrid_jax.train.data import ChatRows  # noqa: E402

TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}"
    "{{ '\n' }}{% else %}{{ message['content'] + '\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
CONVS = [
    [{"role": "user", "content": "What is the sea?"}, {"role": "assistant", "content": "salt water"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Sky?"},
     {"role": "assistant", "content": "blue"}, {"role": "user", "content": "And the grass?"},
     {"role": "assistant", "content": "green"}],
    [{"role": "user", "content": "Name a bird."}, {"role": "assistant", "content": "the robin"}],
    [{"role": "user", "content": "Where is the cat?"}, {"role": "assistant", "content": "on the mat"}],
    [{"role": "user", "content": "Sun?"}, {"role": "assistant", "content": "hot"}],
]
SEQ = 128


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory):
    """(transformers model, HF checkpoint folder with a chat template, prepared chat folder)."""
    root = tmp_path_factory.mktemp("sft")
    hf, ckpt = eval_checkpoint(root / "ckpt")
    tc = ckpt / "tokenizer_config.json"
    tc.write_text(json.dumps({**json.loads(tc.read_text()), "chat_template": TEMPLATE}))
    tok = chat.load_tokenizer(ckpt)
    meta = chat.prepare(enumerate(CONVS), chat.load_chat_template(ckpt), tok, root / "data", SEQ)
    assert meta["truncated"] == 0
    return hf, ckpt, root / "data"


def sft_config(ckpt, data, *extra):
    return load_config(CONFIG_DIR / "sft_tiny.yaml", [
        f"model.init_from=hf:{ckpt}", f"data.paths=[{data}]", f"data.seq_len={SEQ}", f"train.loss_chunk={SEQ}",
        "train.progress=false", *extra])


def test_first_step_loss_is_transformers_masked_cross_entropy(sft_data):
    from olmo_hybrid_jax.train.trainer import Trainer

    hf, ckpt, data = sft_data
    rows = ChatRows([str(data)], SEQ)
    cfg = sft_config(ckpt, data, f"data.global_batch_size={len(rows)}", "optim.z_loss=0")
    assert cfg.data.format == "chat" and cfg.data.document_aware and cfg.model.compute_dtype == "float32"
    tr = Trainer(cfg)
    host = {k: np.stack([rows[i][k] for i in range(len(rows))]) for k in rows[0]}
    assert (host["segment_ids"].max(axis=1) > 0).any()  # some row packs two conversations (plus padding)
    state, m = tr.step_fn(tr.init_state(), tr.device_batch(host))

    tok = chat.load_tokenizer(ckpt)
    ce_sum, kept = 0.0, 0
    with torch.no_grad():
        for conv in CONVS:
            ids, mask = chat.tokenize_conversation(conv, TEMPLATE, tok)
            labels = torch.tensor(np.where(mask, ids, -100)[None], dtype=torch.long)
            out = hf(torch.tensor(ids[None], dtype=torch.long), labels=labels)
            n = int((labels[0, 1:] != -100).sum())
            ce_sum, kept = ce_sum + float(out.loss) * n, kept + n
    assert int(m["target_tokens"]) == kept
    np.testing.assert_allclose(float(m["loss"]), ce_sum / kept, rtol=1e-5)


@pytest.mark.slow
def test_short_sft_run_exports_a_model_that_answers(sft_data, tmp_path):
    from transformers import AutoTokenizer

    from olmo_hybrid_jax.train.trainer import run

    _, ckpt, data = sft_data
    cfg = sft_config(ckpt, data, "data.global_batch_size=4", "train.steps=40", "optim.decay_steps=40",
                     "optim.lr=1e-2", "checkpoint.async_save=false")
    summary = run(cfg, tmp_path / "run")
    hf_dir = tmp_path / "run" / "hf"
    assert summary["exported"] == hf_dir and summary["last"]["loss"] < 0.1, summary["last"]
    tok = AutoTokenizer.from_pretrained(str(hf_dir))
    assert tok.chat_template == TEMPLATE
    model = hf_from_pretrained(hf_dir)
    for conv in CONVS:
        for i in [i for i, m in enumerate(conv) if m["role"] == "assistant"]:
            enc = tok.apply_chat_template(conv[:i], add_generation_prompt=True, return_tensors="pt", return_dict=True)
            want = tok(conv[i]["content"], add_special_tokens=False)["input_ids"] + [EOS]
            with torch.no_grad():
                got = model.generate(enc["input_ids"], max_new_tokens=len(want) + 2, do_sample=False,
                                     eos_token_id=EOS, pad_token_id=EOS)
            assert got[0, enc["input_ids"].shape[1]:].tolist() == want, (conv[i], tok.decode(got[0]))
