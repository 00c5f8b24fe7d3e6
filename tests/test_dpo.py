"""post.dpo: sequence log-probs, the DPO / IPO / hinge losses and the DPO gradient against transformers' log-probs
of the same converted checkpoint; the metrics; preference rows through a chat template; a few steps; the CLI."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")

from eval_helpers import EOS, PAD, eval_checkpoint  # noqa: E402

from hf_utils import rel_l2  # noqa: E402
from olmo_hybrid_jax.convert import _param_paths, load_hf, to_nnx_layout  # noqa: E402
from olmo_hybrid_jax.post import chat, dpo  # noqa: E402

TEMPLATE = ("{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] }}"
            "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\n' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """(transformers model, our model, checkpoint folder with tokenizer and chat_template.jinja)."""
    hf, path = eval_checkpoint(tmp_path_factory.mktemp("dpo_ckpt"), seed=5)
    (path / "chat_template.jinja").write_text(TEMPLATE)
    ours = load_hf(path, progress=False, gdn_backend="chunked", attention_impl="xla")
    return hf, ours, path


def _batch(P=3, T=16, seed=0):
    """ids, mask [P, 2, T]: random prompts and completions of varied lengths, right-padded with PAD."""
    rng = np.random.default_rng(seed)
    ids = np.full((P, 2, T), PAD, np.int32)
    mask = np.zeros((P, 2, T), bool)
    for i in range(P):
        p = int(rng.integers(2, 6))
        ids[i, :, :p] = rng.integers(0, 256, p)
        for j in range(2):
            c = int(rng.integers(2, T - p + 1 - (i + j) % 2))  # some rows padded, some full
            ids[i, j, p:p + c] = rng.integers(0, 256, c)
            mask[i, j, p - 1:p + c - 1] = True
    return ids, mask


def _torch_logps(hf, ids, mask):
    """[P, 2] torch log-probs: log_softmax of transformers' logits, gathered at the next token, masked sum."""
    P, _, T = ids.shape
    x = torch.tensor(ids.reshape(-1, T), dtype=torch.long)
    logp = torch.log_softmax(hf(x).logits.float(), -1)[:, :-1]
    tok = torch.gather(logp, -1, x[:, 1:, None])[..., 0]
    return (tok * torch.tensor(mask.reshape(-1, T)[:, :-1], dtype=torch.float32)).sum(-1).reshape(P, 2)


def _torch_loss(pi, ref, lengths, beta, loss_type):
    if loss_type == "ipo":
        pi, ref = pi / lengths, ref / lengths
    h = (pi[:, 0] - ref[:, 0]) - (pi[:, 1] - ref[:, 1])
    if loss_type == "sigmoid":
        return -torch.nn.functional.logsigmoid(beta * h).mean()
    if loss_type == "ipo":
        return ((h - 1 / (2 * beta)) ** 2).mean()
    return torch.relu(1 - beta * h).mean()


REF = np.array([[-60.0, -75.0], [-80.0, -70.0], [-95.0, -90.0]], np.float32)  # arbitrary reference log-probs


def test_sequence_logprobs_and_losses_match_transformers(ckpt):
    hf, ours, _ = ckpt
    ids, mask = _batch()
    with torch.no_grad():
        want = _torch_logps(hf, ids, mask)
    got = np.asarray(jax.jit(lambda i, m: dpo.model_logprobs(ours, i, m, chunk=8))(ids, mask))
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-5)
    lengths = mask.sum(-1)
    for loss_type in dpo.LOSS_TYPES:
        loss, _ = dpo.dpo_loss(jnp.asarray(got), jnp.asarray(REF), beta=0.1, loss_type=loss_type,
                               lengths=jnp.asarray(lengths))
        ref_loss = _torch_loss(want, torch.tensor(REF), torch.tensor(lengths, dtype=torch.float32), 0.1, loss_type)
        np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5, err_msg=loss_type)


GRAD_NAMES = ["lm_head.weight", "model.embed_tokens.weight", "model.norm.weight",
              "model.layers.0.linear_attn.q_proj.weight", "model.layers.1.linear_attn.A_log",
              "model.layers.2.mlp.down_proj.weight", "model.layers.3.self_attn.k_proj.weight",
              "model.layers.3.post_feedforward_layernorm.weight"]


def test_dpo_loss_and_gradient_match_transformers(ckpt):
    hf, ours, _ = ckpt
    ids, mask = _batch(seed=1)
    beta = 0.5  # large enough that the loss is well away from log 2
    hf.zero_grad()
    loss_t = _torch_loss(_torch_logps(hf, ids, mask), torch.tensor(REF), None, beta, "sigmoid")
    loss_t.backward()
    grads_t = dict(hf.named_parameters())
    tr = dpo.DPOTrainer(ours, dpo.DPOConfig(beta=beta))
    batch = {"ids": jnp.asarray(ids), "mask": jnp.asarray(mask), "ref": jnp.asarray(REF)}
    (loss, _), grads = jax.jit(jax.value_and_grad(tr.loss, has_aux=True))(tr.trainable, tr.frozen, batch)
    np.testing.assert_allclose(float(loss), loss_t.item(), rtol=1e-5)
    pure = nnx.to_pure_dict(grads)
    paths = _param_paths(ours.config)
    for name in GRAD_NAMES:
        ppath, kind, _ = paths[name]
        g = pure
        for k in ppath:
            g = g[k]
        want = to_nnx_layout(kind, grads_t[name].grad.numpy())
        assert rel_l2(np.asarray(g), want) < 1e-4, name


def test_metrics_on_a_hand_made_batch():
    policy = jnp.array([[-10.0, -20.0], [-15.0, -12.0], [-30.0, -31.0], [-5.0, -5.0]])
    ref = jnp.array([[-12.0, -18.0], [-15.0, -15.0], [-30.0, -30.0], [-6.0, -4.0]])
    loss, m = dpo.dpo_loss(policy, ref, beta=0.5)
    # beta * (pi - ref): chosen 1, 0, 0, 0.5; rejected -1, 1.5, -0.5, -0.5
    np.testing.assert_allclose(float(m["rewards/chosen"]), 1.5 / 4, rtol=1e-6)
    np.testing.assert_allclose(float(m["rewards/rejected"]), -0.5 / 4, rtol=1e-6)
    np.testing.assert_allclose(float(m["rewards/margins"]), (2 - 1.5 + 0.5 + 1) / 4, rtol=1e-6)
    assert float(m["rewards/accuracies"]) == 0.75
    np.testing.assert_allclose(float(m["logps/chosen"]), -60 / 4, rtol=1e-6)
    np.testing.assert_allclose(float(m["logps/rejected"]), -68 / 4, rtol=1e-6)
    margins = np.array([2.0, -1.5, 0.5, 1.0])
    np.testing.assert_allclose(float(loss), np.mean(np.log1p(np.exp(-margins))), rtol=1e-6)
    smooth, _ = dpo.dpo_loss(policy, ref, beta=0.5, label_smoothing=0.1)
    want = np.mean(0.9 * np.log1p(np.exp(-margins)) + 0.1 * np.log1p(np.exp(margins)))
    np.testing.assert_allclose(float(smooth), want, rtol=1e-6)
    hinge, _ = dpo.dpo_loss(policy, ref, beta=0.5, loss_type="hinge")
    np.testing.assert_allclose(float(hinge), np.mean(np.maximum(0, 1 - margins)), rtol=1e-6)
    with pytest.raises(ValueError, match="sigmoid loss only"):
        dpo.dpo_loss(policy, ref, loss_type="hinge", label_smoothing=0.1)
    with pytest.raises(ValueError, match="lengths"):
        dpo.dpo_loss(policy, ref, loss_type="ipo")


def test_a_few_steps_increase_the_margin(ckpt):
    _, ours, _ = ckpt
    ids, mask = _batch(P=2, seed=2)
    graphdef, state = nnx.split(ours)
    model = nnx.merge(graphdef, jax.tree.map(jnp.copy, state))  # a copy: the trainer donates its parameters
    tr = dpo.DPOTrainer(model, dpo.DPOConfig(beta=0.1, lr=3e-3, reference="on-the-fly"))
    batch = {"ids": jnp.asarray(ids), "mask": jnp.asarray(mask)}
    rows = [tr.step(batch) for _ in range(5)]
    margins = [r["rewards/margins"] for r in rows]
    assert abs(margins[0]) < 1e-5  # policy = reference before the first update
    assert margins[-1] > margins[1] > 0, margins
    assert rows[-1]["loss"] < rows[0]["loss"] and rows[-1]["rewards/accuracies"] == 1.0


# -------------------------------------------------------------------------------------------- data
def _ids(tok, text):
    return [int(i) for i in tok.encode(text)[0]]


def test_preference_rows_through_the_chat_template(ckpt):
    _, _, path = ckpt
    tok = chat.load_tokenizer(path)
    prompt = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the cat?"}]
    good, bad = {"role": "assistant", "content": "a mat"}, {"role": "assistant", "content": "the road, the sea"}
    shapes = [{"prompt": prompt, "chosen": [good], "rejected": [bad]},  # explicit prompt
              {"chosen": prompt + [good], "rejected": prompt + [bad]},  # implicit prompt (shared prefix)
              {"prompt": prompt, "chosen": prompt + [good], "rejected": prompt + [bad]}]  # full conversations
    data = dpo.encode_pairs(shapes, TEMPLATE, tok, max_len=96, pad_id=PAD)
    assert data.stats == dict(rows=3, pairs=3, truncated=0, dropped=0, max_len=96, truncation="left")
    for i in (1, 2):
        np.testing.assert_array_equal(data.ids[i], data.ids[0])
        np.testing.assert_array_equal(data.mask[i], data.mask[0])
    p = _ids(tok, chat.render(prompt, TEMPLATE, tokenizer=tok, add_generation_prompt=True))
    for j, comp in enumerate((good, bad)):
        c = _ids(tok, comp["content"] + "<|endoftext|>\n")
        seq = p + c
        assert data.ids[0, j, :len(seq)].tolist() == seq and set(data.ids[0, j, len(seq):].tolist()) <= {PAD}
        targets = np.nonzero(data.mask[0, j])[0]
        assert targets.tolist() == list(range(len(p) - 1, len(seq) - 1))  # exactly the completion's tokens
        assert EOS in data.ids[0, j, targets + 1].tolist()
    # strings: a user prompt and assistant completions
    s = dpo.encode_pairs([{"prompt": "the cat?", "chosen": "a mat", "rejected": "the road, the sea"}], TEMPLATE, tok,
                         max_len=96, pad_id=PAD)
    m = dpo.encode_pairs([{"prompt": prompt[1:], "chosen": [good], "rejected": [bad]}], TEMPLATE, tok, max_len=96,
                         pad_id=PAD)
    np.testing.assert_array_equal(s.ids, m.ids)
    # too long: the prompt is cut from the left, or the pair dropped; both counted
    longest = len(p) + len(_ids(tok, bad["content"] + "<|endoftext|>\n"))
    cut = dpo.encode_pairs(shapes[:1] * 2, TEMPLATE, tok, max_len=longest - 3, pad_id=PAD)
    assert cut.stats["truncated"] == 2 and cut.stats["dropped"] == 0
    assert cut.ids[0, 1].tolist() == (p + _ids(tok, bad["content"] + "<|endoftext|>\n"))[3:]
    np.testing.assert_array_equal(cut.mask[0, 1], data.mask[0, 1, 3:longest])
    with pytest.raises(dpo.PreferenceDataError, match="all dropped"):
        dpo.encode_pairs(shapes[:1], TEMPLATE, tok, max_len=longest - 3, pad_id=PAD, truncation="drop")
    both = dpo.encode_pairs([shapes[0], {"prompt": "hi", "chosen": "a", "rejected": "b"}], TEMPLATE, tok,
                            max_len=longest - 3, pad_id=PAD, truncation="drop")
    assert both.stats["dropped"] == 1 and both.rows.tolist() == [1]


@pytest.mark.parametrize("row, match", [
    ({"prompt": "hi", "rejected": "b"}, "row 1: no 'chosen'"),
    ({"prompt": "hi", "chosen": "", "rejected": "b"}, "row 1: empty chosen completion"),
    ({"prompt": "hi", "chosen": "a", "rejected": [{"role": "assistant", "content": " "}]},
     "row 1: empty rejected completion"),
    ({"chosen": [{"role": "user", "content": "x"}], "rejected": [{"role": "user", "content": "y"}]},
     "share no leading messages"),
    ({"prompt": 3, "chosen": "a", "rejected": "b"}, "'prompt' must be a string or a list"),
    ({"prompt": [{"role": "tool", "content": "x"}], "chosen": "a", "rejected": "b"}, "row 1: .*"),
])
def test_bad_rows_are_one_line_errors(ckpt, row, match):
    tok = chat.load_tokenizer(ckpt[2])
    template = chat.BYTE_TEMPLATE  # refuses unknown roles
    with pytest.raises(dpo.PreferenceDataError, match=match) as e:
        dpo.encode_pairs([row], template, tok, max_len=64)
    assert "\n" not in str(e.value)


# --------------------------------------------------------------------------------------------- CLI
def _write_prefs(path, n=6):
    rng = np.random.default_rng(0)
    words = ["cat", "dog", "sea", "road", "mat", "sun"]
    with open(path, "w") as f:
        for i in range(n):
            a, b = rng.choice(words, 2, replace=False)
            f.write(json.dumps({"prompt": [{"role": "user", "content": f"where is the {words[i]}?"}],
                                "chosen": [{"role": "assistant", "content": f"on the {a}"}],
                                "rejected": [{"role": "assistant", "content": f"the {b} {b}"}]}) + "\n")
    return path


@pytest.mark.slow
def test_cli_trains_caches_the_reference_and_exports(ckpt, tmp_path, capsys):
    from hf_utils import hf_from_pretrained

    _, ours, path = ckpt
    prefs = _write_prefs(tmp_path / "prefs.jsonl")
    args = ["--init-from", f"hf:{path}", "--data", str(prefs), "--steps", "3", "--batch-pairs", "2",
            "--max-len", "40", "--beta", "0.1", "--lr", "1e-3", "--loss-chunk", "16"]
    assert dpo.main(args + ["--out", str(tmp_path / "run"), "--export-hf", str(tmp_path / "hf")]) == 0
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert {"loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
            "logps/chosen", "logps/rejected", "grad_norm"} <= set(rows[0])
    assert abs(rows[0]["rewards/margins"]) < 1e-5  # the cached reference is the starting model
    caches = list(tmp_path.glob("prefs.jsonl.ref-*.npy"))
    assert len(caches) == 1 and np.load(caches[0]).shape == (6, 2)
    meta = json.loads((tmp_path / "run" / "dpo.json").read_text())
    assert meta["data"]["pairs"] == 6 and meta["data"]["dropped"] == 0
    exported = hf_from_pretrained(tmp_path / "hf")  # transformers loads the export
    assert (tmp_path / "hf" / "tokenizer.json").is_file()
    trained = load_hf(tmp_path / "hf", progress=False)
    assert not np.allclose(np.asarray(trained.lm_head.kernel[...]), np.asarray(ours.lm_head.kernel[...]))
    assert exported.config.vocab_size == ours.config.vocab_size
    capsys.readouterr()  # a LoRA run: the same reference (the base), read from the cache; merged on export
    assert dpo.main(args + ["--out", str(tmp_path / "run2"), "--lora", "--lora-rank", "4",
                            "--export-hf", str(tmp_path / "hf2")]) == 0
    err = capsys.readouterr().err
    assert "reference log-probs from" in err and "LoRA rank 4 on" in err
    b = [json.loads(x) for x in (tmp_path / "run2" / "metrics.jsonl").read_text().splitlines()]
    assert b[0]["loss"] == pytest.approx(np.log(2), rel=1e-5) and b[-1]["rewards/margins"] > 0
    merged = load_hf(tmp_path / "hf2", progress=False)
    np.testing.assert_array_equal(np.asarray(merged.lm_head.kernel[...]), np.asarray(ours.lm_head.kernel[...]))
    q = lambda m: np.asarray(m.model.layers[0].linear_attn.q_proj.kernel[...])  # noqa: E731
    assert not np.allclose(q(merged), q(ours))


def test_cli_bad_input_is_one_line(ckpt, tmp_path, capsys):
    _, _, path = ckpt
    prefs = _write_prefs(tmp_path / "prefs.jsonl", n=2)
    base = ["--data", str(prefs), "--out", str(tmp_path / "run"), "--steps", "1"]

    def fails(args, match):
        assert dpo.main(args) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and match in err, err

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "hi", "rejected": "b"}) + "\n")
    fails(["--init-from", f"hf:{path}", "--data", str(bad), "--out", str(tmp_path / "r"), "--steps", "1"],
          "row 1: no 'chosen'")
    bad.write_text(json.dumps({"prompt": "hi", "chosen": "", "rejected": "b"}) + "\n")
    fails(["--init-from", f"hf:{path}", "--data", str(bad), "--out", str(tmp_path / "r"), "--steps", "1"],
          "empty chosen completion")
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    cfg = json.loads((path / "config.json").read_text())
    (wrong / "config.json").write_text(json.dumps({**cfg, "hidden_size": 64}))
    (wrong / "model.safetensors").symlink_to(path / "model.safetensors")
    fails(["--init-from", f"hf:{wrong}"] + base, "hidden_size")
    fails(["--init-from", f"hf:{tmp_path / 'none'}"] + base, "no config.json")
    fails(["--init-from", f"{path}"] + base, "hf:DIR or orbax:DIR")
    fails(["--init-from", f"hf:{path}", "--beta", "0"] + base, "beta=0.0 must be positive")
    fails(["--init-from", f"hf:{path}", "--loss-type", "ipo", "--label-smoothing", "0.1"] + base, "sigmoid loss only")
    assert not (tmp_path / "run").exists()


def test_reference_cache_key_and_read_back(tmp_path):
    prefs = _write_prefs(tmp_path / "prefs.jsonl", n=2)
    data = dpo.encode_pairs(dpo.read_preferences(prefs), chat.BYTE_TEMPLATE, chat.load_tokenizer("bytes"), max_len=64)
    key = dpo.reference_cache_path(prefs, data, "model-a")
    assert key.parent == tmp_path and key.name.startswith("prefs.jsonl.ref-") and key.suffix == ".npy"
    assert dpo.reference_cache_path(prefs, data, "model-b") != key  # another reference checkpoint
    other = dpo.encode_pairs(dpo.read_preferences(prefs), chat.BYTE_TEMPLATE, chat.load_tokenizer("bytes"),
                             max_len=80)
    assert dpo.reference_cache_path(prefs, other, "model-a") != key  # another encoding
    _write_prefs(prefs, n=3)
    assert dpo.reference_cache_path(prefs, data, "model-a") != key  # other data
    want = np.array([[-1.0, -2.0], [-3.0, -4.0]], np.float32)
    np.save(key, want)
    np.testing.assert_array_equal(dpo.cached_reference_logprobs(None, data, key), want)  # no model needed


def test_lora_dpo_trains_the_adapters_against_the_base(ckpt):
    from olmo_hybrid_jax.post import lora
    _, ours, _ = ckpt
    ids, mask = _batch(P=2, seed=3)
    graphdef, state = nnx.split(ours)
    model = nnx.merge(graphdef, jax.tree.map(jnp.copy, state))
    lm_head = np.asarray(model.lm_head.kernel[...])
    filt, names = dpo.add_lora(model, lora.LoraConfig(rank=4, alpha=8.0, targets=("attention", "gdn")))
    assert "layers.0.linear_attn.q_proj" in names and "layers.3.self_attn.o_proj" in names
    beta = 0.1
    tr = dpo.DPOTrainer(model, dpo.DPOConfig(beta=beta, lr=1e-2, reference="on-the-fly"), trainable_filter=filt,
                        reference_state=dpo.adapters_off)
    assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(tr.ref_state))
    rows = [tr.step({"ids": jnp.asarray(ids), "mask": jnp.asarray(mask)}) for _ in range(4)]
    margins = [r["rewards/margins"] for r in rows]
    assert abs(margins[0]) < 1e-5 and margins[-1] > margins[1] > 0, margins
    # the reference (policy log-prob - reward / beta) stays the base model's while the adapters move
    ref_c = [r["logps/chosen"] - r["rewards/chosen"] / beta for r in rows]
    np.testing.assert_allclose(ref_c, ref_c[0], rtol=1e-5)
    trained = tr.model()
    np.testing.assert_array_equal(np.asarray(trained.lm_head.kernel[...]), lm_head)  # the base is frozen
    merged = lora.merge_lora(trained)
    assert not lora.has_lora(merged)
