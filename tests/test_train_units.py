"""Training pieces on one CPU device: config loading, FLOP counts, sharding rules, chunked loss,
skip-step AdamW, weight-decay mask, data pipeline, scanned layout, checkpoint metrics bookkeeping."""

from __future__ import annotations

import json
import math
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from olmo_hybrid_jax import OlmoHybridConfig, OlmoHybridForCausalLM
from olmo_hybrid_jax.train import flops, sharding as shd
from olmo_hybrid_jax.train.config import CONFIG_DIR, ConfigError, load_config
from olmo_hybrid_jax.train.data import (DataError, PackedRows, make_dataset, make_iterator, open_token_file, pack_row,
                                        tokenize_files, write_token_file)
from olmo_hybrid_jax.train.loss import chunked_cross_entropy, reference_cross_entropy
from olmo_hybrid_jax.train.metrics import truncate_metrics
from olmo_hybrid_jax.train.optim import decay_mask, lr_schedule, skip_guard_decision, skip_step_adamw
from olmo_hybrid_jax.train.stack import (ScannedOlmoHybridForCausalLM, build_model, from_list_model, layer_period,
                                         list_to_stacked, stacked_to_list, to_list_model)

TINY8 = dict(num_hidden_layers=8, layer_types=None)
TINY_P2 = dict(num_hidden_layers=4, layer_types=("linear_attention", "full_attention") * 2)  # 2 blocks, quick


# ------------------------------------------------------------------------------------------ config
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
                                                 "model.overrides.num_hidden_layers=8", "mesh.rules={embed: [data, fsdp]}"])
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
    assert cfg.layer_types == ("linear_attention",) * 3 + ("full_attention",) + ("linear_attention",) * 3 + ("full_attention",)


# ------------------------------------------------------------------------------------------ flops
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
    assert flops.gdn_flops_per_token(cfg) == pytest.approx(3 * 4 * 2 * (3 * C * 16 + 2 * C * 24 + 3 * 16 * 24 + C * C / 3))
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


# ------------------------------------------------------------------------------------------ sharding
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
    m = nnx.eval_shape(lambda: ScannedOlmoHybridForCausalLM(cfg, rngs=nnx.Rngs(0)))
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


# ------------------------------------------------------------------------------------------ loss
@pytest.mark.parametrize("T,chunk", [(12, 4), (13, 5), (8, 64)])
def test_chunked_cross_entropy_matches_full_logits(T, chunk):
    k = jax.random.split(jax.random.key(0), 4)
    B, H, V = 3, 16, 50
    h = jax.random.normal(k[0], (B, T, H))
    w = jax.random.normal(k[1], (H, V)) * 0.3
    labels = jax.random.randint(k[2], (B, T), 0, V)
    mask = jax.random.uniform(k[3], (B, T)) > 0.2

    def chunked(h, w):
        return chunked_cross_entropy(h, w, labels, mask, z_loss=1e-2, chunk=chunk)[0]

    def full(h, w):
        return reference_cross_entropy(jnp.einsum("bth,hv->btv", h, w), labels, mask, z_loss=1e-2)[0]

    np.testing.assert_allclose(chunked(h, w), full(h, w), rtol=1e-6)
    gc, gf = jax.grad(chunked, argnums=(0, 1))(h, w), jax.grad(full, argnums=(0, 1))(h, w)
    for a, b in zip(gc, gf):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("z_loss", [0.0, 1e-4])
def test_fused_cross_entropy_bf16_and_metrics(z_loss):
    """bf16 compute: loss and gradients close to the fp32 full-logits reference; the CE/z sums are exact
    metrics without gradients; forward-only (no differentiation) gives the same values."""
    k = jax.random.split(jax.random.key(1), 4)
    B, T, H, V = 2, 40, 32, 300
    h = jax.random.normal(k[0], (B, T, H))
    w = jax.random.normal(k[1], (H, V)) * 0.2
    labels = jax.random.randint(k[2], (B, T), 0, V)
    mask = jax.random.uniform(k[3], (B, T)) > 0.3

    def fused(h, w):
        return chunked_cross_entropy(h.astype(jnp.bfloat16), w, labels, mask, z_loss=z_loss, chunk=16,
                                     compute_dtype=jnp.bfloat16)

    def full(h, w):
        hb, wb = h.astype(jnp.bfloat16).astype(jnp.float32), w.astype(jnp.bfloat16).astype(jnp.float32)
        return reference_cross_entropy(jnp.einsum("bth,hv->btv", hb, wb), labels, mask, z_loss=z_loss)

    (loss, ce, z), (rl, rce, rz) = jax.jit(fused)(h, w), full(h, w)
    np.testing.assert_allclose([loss, ce, z], [rl, rce, rz], rtol=2e-3)
    gf = jax.grad(lambda h, w: fused(h, w)[0], argnums=(0, 1))(h, w)
    gr = jax.grad(lambda h, w: full(h, w)[0], argnums=(0, 1))(h, w)
    for a, b in zip(gf, gr):
        assert a.dtype == b.dtype == jnp.float32
        assert float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b)) < 2e-2
    g_ce = jax.grad(lambda h: fused(h, w)[1])(h)  # a metric: stop_gradient, not a wrong gradient
    assert float(jnp.abs(g_ce).max()) == 0.0
    # the differentiated forward's loss equals the plain forward's
    val, _ = jax.value_and_grad(lambda h: fused(h, w)[0])(h)
    np.testing.assert_allclose(val, loss, rtol=1e-6)


def test_fused_cross_entropy_backward_has_no_fp32_vocab_matmul():
    """With bf16 compute, every [*, V] matmul of the loss's gradient takes bf16 inputs (fp32 inputs
    would run as slow tf32/fp32 GEMMs on GPU), and the logits are not recomputed (3 vocab matmuls)."""
    B, T, H, V = 2, 64, 16, 1000
    h, w = jnp.ones((B, T, H), jnp.bfloat16), jnp.ones((H, V), jnp.float32)
    lab, mask = jnp.zeros((B, T), jnp.int32), jnp.ones((B, T), bool)
    f = jax.jit(jax.grad(lambda h, w: chunked_cross_entropy(h, w, lab, mask, chunk=16,
                                                            compute_dtype=jnp.bfloat16)[0], argnums=(0, 1)))
    hlo = f.lower(h, w).as_text()
    dots = [ln for ln in hlo.splitlines() if "dot_general" in ln and "1000" in ln]
    assert len(dots) == 3, dots
    for ln in dots:
        operand_types = ln.rsplit(" : (", 1)[1].split(") ->")[0]  # "tensor<..xbf16>, tensor<..xbf16>"
        assert operand_types.count("xbf16>") == 2, ln


def test_cross_entropy_rejects_mismatched_shapes():
    h, w = jnp.ones((2, 8, 4)), jnp.ones((4, 10))
    with pytest.raises(ValueError, match="kernel"):
        chunked_cross_entropy(h, jnp.ones((5, 10)), jnp.zeros((2, 8), int), jnp.ones((2, 8), bool))
    with pytest.raises(ValueError, match="labels"):
        chunked_cross_entropy(h, w, jnp.zeros((2, 7), int), jnp.ones((2, 8), bool))


def test_chunked_cross_entropy_keeps_logits_chunk_sized():
    B, T, H, V, c = 2, 256, 8, 1000, 32
    h, w = jnp.ones((B, T, H)), jnp.ones((H, V))
    lab, mask = jnp.zeros((B, T), jnp.int32), jnp.ones((B, T), bool)
    f = jax.jit(jax.grad(lambda h, w: chunked_cross_entropy(h, w, lab, mask, chunk=c)[0], argnums=(0, 1)))
    hlo = f.lower(h, w).as_text()
    assert f"{B}x{T}x{V}" not in hlo and f"tensor<{B}x{T}x{V}" not in hlo
    assert f"{B}x{c}x{V}" in hlo


# ------------------------------------------------------------------------------------------ optimizer
def test_schedule_warmup_and_cosine_floor():
    s = lr_schedule(1.0, 10, 110, 0.1)
    assert float(s(0)) == 0.0 and float(s(5)) == pytest.approx(0.5) and float(s(10)) == pytest.approx(1.0)
    assert float(s(60)) == pytest.approx(0.55, rel=1e-5) and float(s(110)) == pytest.approx(0.1)
    assert float(s(500)) == pytest.approx(0.1)


def test_weight_decay_mask():
    m = nnx.eval_shape(lambda: OlmoHybridForCausalLM(OlmoHybridConfig.preset("tiny"), rngs=nnx.Rngs(0)))
    params = nnx.to_pure_dict(nnx.state(m))
    mask = decay_mask(params)
    assert mask["model"]["embed_tokens"]["embedding"] is False
    assert mask["lm_head"]["kernel"] is True and mask["model"]["norm"]["weight"] is True
    assert mask["model"]["layers"][0]["linear_attn"]["A_log"] is True
    mask = decay_mask(params, ("embeddings", "norms", "gdn_gates"))
    assert mask["model"]["norm"]["weight"] is False and mask["model"]["layers"][0]["linear_attn"]["dt_bias"] is False
    assert mask["model"]["layers"][0]["linear_attn"]["o_norm"]["weight"] is False
    assert mask["model"]["layers"][0]["mlp"]["up_proj"]["kernel"] is True


def test_adamw_matches_optax_adamw_when_nothing_is_skipped():
    params = {"w": jnp.arange(6.0).reshape(2, 3), "embed_tokens": {"embedding": jnp.ones((4, 2))}}
    mask = {"w": True, "embed_tokens": {"embedding": False}}
    sched = lr_schedule(1e-2, 3, 50, 0.1)
    ours = skip_step_adamw(sched, weight_decay=0.1, mask=mask, max_grad_norm=1.0, window=8)
    ref = optax.chain(optax.clip_by_global_norm(1.0),
                      optax.adamw(lambda c: sched(c + 1), b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, mask=mask))
    so, sr = ours.init(params), ref.init(params)
    po, pr = params, params
    for i in range(6):
        g = jax.tree.map(lambda x: jnp.sin(x * (i + 1)), po)
        uo, so = ours.update(g, so, po, loss=1.0)
        ur, sr = ref.update(g, sr, pr)
        po, pr = optax.apply_updates(po, uo), optax.apply_updates(pr, ur)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), po, pr)
    assert int(so.skipped) == 0 and int(so.step) == 6


def test_skip_guard_skips_spikes_and_freezes_state():
    W = 16
    tx = skip_step_adamw(lambda c: 0.1, weight_decay=0.0, window=W, sigma=6.0)
    params = {"w": jnp.ones(3)}
    state = tx.init(params)
    rng = np.random.default_rng(0)
    for i in range(W):  # a noisy but steady history
        g = {"w": jnp.full(3, 1.0 + 0.01 * rng.standard_normal())}
        u, state = tx.update(g, state, params, loss=2.0 + 0.01 * rng.standard_normal())
        assert not bool(state.last_skipped)
    before = state
    u, state = tx.update({"w": jnp.full(3, 1.0)}, state, params, loss=5.0)  # loss spike
    assert bool(state.last_skipped) and int(state.skipped) == 1
    assert all(float(jnp.abs(x).max()) == 0 for x in jax.tree.leaves(u))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), before.inner, state.inner)
    assert int(state.step) == int(before.step) + 1
    u, state = tx.update({"w": jnp.full(3, 100.0)}, state, params, loss=2.0)  # grad-norm spike
    assert bool(state.last_skipped)
    u, state = tx.update({"w": jnp.full(3, jnp.nan)}, state, params, loss=2.0)  # non-finite: always
    assert bool(state.last_skipped) and int(state.skipped) == 3
    u, state = tx.update({"w": jnp.full(3, 1.0)}, state, params, loss=2.0)
    assert not bool(state.last_skipped)


def test_skip_guard_waits_for_half_a_window():
    buf = jnp.zeros(128)
    assert not bool(skip_guard_decision(buf.at[:63].set(1.0), buf.at[:63].set(1.0), jnp.int32(63), 1e6, 1.0,
                                        sigma=6.0, window=128))
    assert bool(skip_guard_decision(buf.at[:64].set(1.0), buf.at[:64].set(1.0), jnp.int32(64), 1e6, 1.0,
                                    sigma=6.0, window=128))


# ------------------------------------------------------------------------------------------ data
def test_pack_row_segments_and_positions():
    r = pack_row(np.array([5, 6, 1, 7, 1, 1, 8, 9]), eos_id=1)
    np.testing.assert_array_equal(r["segment_ids"], [0, 0, 0, 1, 1, 2, 3, 3])
    np.testing.assert_array_equal(r["positions"], [0, 1, 2, 0, 1, 0, 0, 1])


def test_token_files_rows_and_errors(tmp_path):
    a, _ = write_token_file([[2, 3, 4], [5, 6]], tmp_path / "a.u16", eos_id=1)
    b, _ = write_token_file([np.arange(10, 20)], tmp_path / "b.npy", eos_id=1, dtype="uint32")
    np.testing.assert_array_equal(open_token_file(a), [2, 3, 4, 1, 5, 6, 1])
    assert open_token_file(b).dtype == np.uint32
    rows = PackedRows([str(a), str(b)], seq_len=3, eos_id=1)
    assert len(rows) == 2 + 3
    np.testing.assert_array_equal(rows[1]["tokens"], [1, 5, 6])
    np.testing.assert_array_equal(rows[2]["tokens"], [10, 11, 12])
    with pytest.raises(DataError, match=r"data file not found: .*nope\.u16"):
        open_token_file(tmp_path / "nope.u16")
    (tmp_path / "raw.bin").write_bytes(b"\x00\x01\x02")
    with pytest.raises(DataError, match=r"raw\.bin: raw token file of unknown dtype"):
        open_token_file(tmp_path / "raw.bin")
    with pytest.raises(DataError, match=r"raw\.bin: size 3 B is not a multiple"):
        open_token_file(tmp_path / "raw.bin", "uint16")
    (tmp_path / "empty.u8").write_bytes(b"")
    with pytest.raises(DataError, match=r"empty\.u8"):
        open_token_file(tmp_path / "empty.u8")
    (tmp_path / "dir.u8").mkdir()
    with pytest.raises(DataError, match=r"not a file: .*dir\.u8"):
        open_token_file(tmp_path / "dir.u8")
    with pytest.raises(DataError, match=r"a\.u16: 7 tokens is shorter than one row"):
        PackedRows([str(a)], seq_len=100, eos_id=1)


def test_grain_iterator_state_resumes_exactly():
    cfg = load_config(CONFIG_DIR / "tiny.yaml", ["data.global_batch_size=4", "data.seq_len=32"])
    ds, rows = make_dataset(cfg.data, eos_id=1)
    it = make_iterator(ds, cfg.data)
    first = [next(it)["tokens"] for _ in range(3)]
    state = it.get_state()
    want = next(it)["tokens"]
    it2 = make_iterator(ds, cfg.data)
    it2.set_state(json.loads(json.dumps(state)))
    np.testing.assert_array_equal(next(it2)["tokens"], want)
    np.testing.assert_array_equal(ds[0]["tokens"], first[0])  # batch index = step: deterministic
    # two hosts read disjoint halves of the same global batch
    h0, _ = make_dataset(cfg.data, 1, process_index=0, process_count=2)
    h1, _ = make_dataset(cfg.data, 1, process_index=1, process_count=2)
    np.testing.assert_array_equal(np.concatenate([h0[1]["tokens"], h1[1]["tokens"]]), ds[1]["tokens"])


def test_tokenize_cli_with_a_tokenizer_json(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<|endoftext|>": 0, "hello": 1, "world": 2, "[UNK]": 3}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "a.txt").write_text("hello world hello")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "world foo"}) + "\n")
    from olmo_hybrid_jax.train.data import main

    assert main(["tokenize", "--tokenizer", str(tmp_path / "tokenizer.json"), "--out", str(tmp_path / "c.u16"),
                 str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl")]) == 0
    np.testing.assert_array_equal(open_token_file(tmp_path / "c.u16"), [1, 2, 1, 0, 2, 3, 0])
    with pytest.raises(DataError, match="tokenizer file not found"):
        tokenize_files(str(tmp_path / "none.json"), [str(tmp_path / "a.txt")], str(tmp_path / "d.u16"))
    assert main(["tokenize", "--tokenizer", str(tmp_path / "tokenizer.json"), "--out", str(tmp_path / "d.u16"),
                 str(tmp_path / "missing.txt")]) == 2


def test_embedded_corpus_is_byte_level():
    arr = open_token_file("data/pydoc_topics.u8")
    assert arr.dtype == np.uint8 and len(arr) > 400_000
    assert int((arr == 1).sum()) == 79  # one EOS per pydoc topic
    assert b"print" in arr[:200_000].tobytes()


# ------------------------------------------------------------------------------------------ scanned layout
def test_layer_period():
    L, F = "linear_attention", "full_attention"
    assert layer_period((L, L, L, F) * 8) == 4
    assert layer_period((L, F) * 3) == 2
    assert layer_period((L, L, L, F, L, L)) == 6
    cfg = OlmoHybridConfig.preset("tiny").replace(num_hidden_layers=6, layer_types=(L, L, L, F, L, L))
    assert isinstance(nnx.eval_shape(lambda: build_model(cfg, rngs=nnx.Rngs(0))),
                      OlmoHybridForCausalLM)  # aperiodic: list layout
    cfg8 = OlmoHybridConfig.preset("tiny").replace(**TINY8)
    assert isinstance(nnx.eval_shape(lambda: build_model(cfg8, rngs=nnx.Rngs(0))), ScannedOlmoHybridForCausalLM)
    assert isinstance(nnx.eval_shape(lambda: build_model(cfg8, scan_layers=False, rngs=nnx.Rngs(0))),
                      OlmoHybridForCausalLM)


def test_scanned_model_equals_list_model_and_round_trips(tmp_path):
    cfg = OlmoHybridConfig.preset("tiny").replace(**TINY_P2)
    lm = OlmoHybridForCausalLM(cfg, rngs=nnx.Rngs(3))
    sm = from_list_model(lm)
    ids = jax.random.randint(jax.random.key(1), (2, 24), 0, 256)
    seg = jnp.array([[0] * 10 + [1] * 14, [0] * 24])
    ref = lm(ids, segment_ids=seg)
    for remat in ("none", "full", "dots"):
        np.testing.assert_allclose(sm(ids, segment_ids=seg, remat=remat), ref, rtol=1e-5, atol=1e-5)
    pure = nnx.to_pure_dict(nnx.state(lm))
    back = stacked_to_list(list_to_stacked(pure, cfg), cfg)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), back, pure)
    assert jax.tree.structure(back) == jax.tree.structure(pure)
    # export to HF through the list layout and back into the scanned layout
    from olmo_hybrid_jax.convert import load_hf, save_hf

    save_hf(to_list_model(sm), tmp_path / "hf", progress=False)
    sm2 = from_list_model(load_hf(tmp_path / "hf", progress=False))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), nnx.to_pure_dict(nnx.state(sm2)),
                 nnx.to_pure_dict(nnx.state(sm)))


def test_scanned_gradients_equal_list_gradients_under_remat():
    from olmo_hybrid_jax.train.stack import hidden_states

    cfg = OlmoHybridConfig.preset("tiny").replace(**TINY_P2)
    # chunked GDN under remat inside a scan (XLA:CPU deadlocked here while the form used LAPACK's trsm)
    lm = OlmoHybridForCausalLM(cfg, rngs=nnx.Rngs(0), gdn_backend="chunked")
    sm = from_list_model(lm, gdn_backend="chunked")
    ids = jax.random.randint(jax.random.key(2), (2, 16), 0, 256)
    r = jax.random.normal(jax.random.key(5), (2, 16, cfg.hidden_size))  # (sum h^2 of normed h is ~constant)

    def loss(params, gd, remat):
        return jnp.sum(hidden_states(nnx.merge(gd, params), ids, remat=remat) * r)

    gl, pl = nnx.split(lm)
    gs, ps = nnx.split(sm)
    g_list = jax.grad(loss)(nnx.to_pure_dict(pl), gl, "none")
    g_scan = jax.grad(loss)(nnx.to_pure_dict(ps), gs, "full")
    def close(a, b):
        assert float(jnp.abs(a - b).max()) <= 1e-5 * float(jnp.abs(a).max())

    jax.tree.map(close, list_to_stacked(g_list, cfg), g_scan)


def test_scanned_compile_does_not_grow_with_depth():
    """The jaxpr of the scanned model has the same size for 8 and 32 layers (one scanned block)."""
    sizes = []
    for n in (8, 32):
        cfg = OlmoHybridConfig.preset("tiny").replace(num_hidden_layers=n, layer_types=None)
        m = nnx.eval_shape(lambda: ScannedOlmoHybridForCausalLM(cfg, rngs=nnx.Rngs(0)))
        gd, st = nnx.split(m)
        jaxpr = jax.make_jaxpr(lambda s: nnx.merge(gd, s)(jnp.zeros((1, 8), jnp.int32)))(st)
        sizes.append(len(str(jaxpr)))
    assert abs(sizes[0] - sizes[1]) < 0.02 * sizes[0]


# ------------------------------------------------------------------------------------------ metrics
def test_truncate_metrics_keeps_one_row_per_step(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 31)) + '{"step": 31, "lo')
    assert truncate_metrics(p, 25) == 25
    assert [json.loads(line)["step"] for line in p.read_text().splitlines()] == list(range(1, 26))


# ------------------------------------------------------------------------------------------ init_from, plot
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


def test_plot_loss_curve(tmp_path):
    pytest.importorskip("matplotlib")
    from olmo_hybrid_jax.train.plot import main

    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 5.0 / s}) + "\n" for s in range(1, 20)))
    assert main([str(tmp_path), "--out", str(tmp_path / "loss.png")]) == 0
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main([str(tmp_path / "nope")]) == 2
