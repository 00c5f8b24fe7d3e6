"""LoRA (post.lora): exact base at init, merge == unmerged (and through transformers), targets, frozen-base training."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from hf_utils import rel_l2
from olmo_hybrid_jax import OlmoHybridConfig, OlmoHybridForCausalLM
from olmo_hybrid_jax.model import from_list_params
from olmo_hybrid_jax.modules import ShortConv
from olmo_hybrid_jax.post.lora import (
    LoraConfig,
    LoraLinear,
    LoraParam,
    LoraShortConv,
    adapter_params,
    apply_lora,
    has_lora,
    load_adapter_params,
    lora_modules,
    merge_lora,
    split_adapters,
)

L, F = "linear_attention", "full_attention"
CFG = OlmoHybridConfig.preset("tiny").replace(num_hidden_layers=4, layer_types=(L, F, L, F))  # 2 scanned blocks
IDS = jnp.asarray(np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 12)))
EVERYTHING = ("all", "conv", "lm_head")
GDN = ["a_proj", "b_proj", "g_proj", "k_proj", "o_proj", "q_proj", "v_proj"]
LAYOUTS = pytest.mark.parametrize("scan", [False, True], ids=["list", "scanned"])


def _random_params() -> dict:
    """List-layout params filled from numpy (eager jax init costs seconds on CPU), every one away from its
    init like hf_utils' (norm weights != 1, sensible GDN decays), so a dropped tensor changes the logits."""
    abstract = nnx.eval_shape(lambda: OlmoHybridForCausalLM(CFG, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(0)

    def one(path, x):
        name = jax.tree_util.keystr(path)
        if "norm" in name:
            v = 1.0 + 0.2 * rng.standard_normal(x.shape)
        elif "A_log" in name:
            v = np.log(rng.uniform(0.5, 8.0, x.shape))
        elif "dt_bias" in name:
            v = 0.5 * rng.standard_normal(x.shape) - 2.0
        else:
            v = (0.5 if "conv1d" in name else 0.08) * rng.standard_normal(x.shape)
        return np.asarray(v, np.float32)

    return jax.tree_util.tree_map_with_path(one, nnx.to_pure_dict(nnx.state(abstract, nnx.Param)))


@functools.cache
def _base(scan: bool, param_dtype=jnp.float32, backend: str = "chunked") -> OlmoHybridForCausalLM:
    """One tiny model per layout, dtype and GDN backend (the same weights), built once."""
    params = jax.tree.map(lambda x: jnp.asarray(x, param_dtype), _random_params())
    return from_list_params(CFG, params, scan_layers=scan, gdn_backend=backend, attention_impl="xla")


@functools.cache
def _base_logits(scan: bool) -> np.ndarray:
    return np.asarray(_base(scan)(IDS))


def _model(scan=False, param_dtype=jnp.float32, backend="chunked") -> OlmoHybridForCausalLM:
    """A fresh copy of the base model (apply_lora and merge_lora work in place)."""
    m = nnx.clone(_base(scan, param_dtype, backend))
    assert m.scan_layers == scan
    return m


def _perturb(model, seed=1, std=0.05):
    """Random B (and A) in place, so the adapters change the function (numpy: no per-shape jax compiles)."""
    rng = np.random.default_rng(seed)
    _, adapters, _ = split_adapters(model)
    nnx.update(model, jax.tree.map(lambda x: x + (std * rng.standard_normal(x.shape)).astype(x.dtype), adapters))


@LAYOUTS
def test_zero_b_gives_the_base_logits_exactly(scan):
    model = _model(scan)
    ref = _base_logits(scan)
    names = apply_lora(model, LoraConfig(rank=4, alpha=8.0, targets=EVERYTHING), rngs=nnx.Rngs(1))
    assert len(names) == 2 * 13 + 2 * 7 + 1 and has_lora(model)  # GDN 7 + 3 convs + MLP 3; attn 4 + MLP 3; head
    n = len(jax.tree.leaves(nnx.state(model, LoraParam)))
    assert n == len(jax.tree.leaves(nnx.state(model, nnx.LoRAParam))) == 2 * (21 if scan else 41)  # NNX's filter too
    np.testing.assert_array_equal(np.asarray(model(IDS)), ref)
    _, adapters, _ = split_adapters(model)
    b_leaves = [x for p, x in jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(adapters))[0]
                if jax.tree_util.keystr(p).endswith("['lora_b']")]
    assert b_leaves and all(not np.any(np.asarray(b)) for b in b_leaves)
    if scan:  # one independent adapter per stacked layer
        a = model.model.blocks.layers[0].linear_attn.b_proj.lora_a[...]
        assert a.shape == (2, CFG.hidden_size, 4) and not np.allclose(a[0], a[1])


def test_bf16_base_with_fp32_adapters():
    model = _model(param_dtype=jnp.bfloat16)
    assert model.model.layers[0].linear_attn.b_proj.kernel.dtype == jnp.bfloat16
    ref = np.asarray(model(IDS).astype(jnp.float32))
    apply_lora(model, LoraConfig(rank=2, alpha=4.0, targets=EVERYTHING), rngs=nnx.Rngs(1))
    _, adapters, base = split_adapters(model)
    assert {x.dtype for x in jax.tree.leaves(adapters)} == {jnp.dtype(jnp.float32)}
    assert {x.dtype for x in jax.tree.leaves(nnx.state(model, nnx.Not(LoraParam)))} == {jnp.dtype(jnp.bfloat16)}
    out = model(IDS)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(out.astype(jnp.float32)), ref)


@LAYOUTS
def test_merged_equals_unmerged_and_loads_in_transformers(scan, tmp_path):
    model = _model(scan)
    base_paths = set(nnx.to_flat_state(nnx.state(model)).paths)
    apply_lora(model, LoraConfig(rank=3, alpha=6.0, targets=EVERYTHING), rngs=nnx.Rngs(1))
    _perturb(model)
    unmerged = np.asarray(model(IDS))
    assert rel_l2(unmerged, _base_logits(scan)) > 1e-2  # the adapters do change the function
    from olmo_hybrid_jax.convert import save_hf

    with pytest.raises(ValueError, match="holds .* LoRA adapter arrays; fold them into the weights first"):
        save_hf(model, tmp_path / "unmerged", progress=False)  # would drop the fine-tune
    assert not (tmp_path / "unmerged").exists()
    assert merge_lora(model) is model and not has_lora(model) and not lora_modules(model)
    assert set(nnx.to_flat_state(nnx.state(model)).paths) == base_paths  # the base model's tree again
    layer = model.model.decoder_layers()[0].linear_attn
    assert type(layer.b_proj) is nnx.Linear and type(layer.q_conv1d) is ShortConv
    np.testing.assert_allclose(np.asarray(model(IDS)), unmerged, rtol=1e-5, atol=1e-5)
    if not scan:
        return  # one export suffices (save_hf writes the list layout either way): the scanned one, the harder
    from hf_utils import hf_from_pretrained, hf_logits

    hf = hf_from_pretrained(save_hf(model, tmp_path / "merged", progress=False))
    assert rel_l2(hf_logits(hf, np.asarray(IDS)), unmerged) < 1e-4


def test_all_adapts_every_gdn_projection_and_presets_are_exact():
    model = _model()
    names = apply_lora(model, LoraConfig(rank=2, alpha=2.0, targets="all"), rngs=nnx.Rngs(1))
    for i, kind in enumerate(CFG.layer_types):
        mine = sorted(n.split(".", 2)[2] for n in names if n.startswith(f"layers.{i}."))
        mixer = [f"linear_attn.{p}" for p in GDN] if kind == L else [f"self_attn.{p}_proj" for p in "koqv"]
        assert mine == sorted(mixer + [f"mlp.{p}_proj" for p in ("down", "gate", "up")]), (i, mine)
    assert "lm_head" not in names and not any("conv1d" in n for n in names)  # convs and the head are opt-in
    gdn = model.model.layers[0].linear_attn
    assert all(isinstance(getattr(gdn, p), LoraLinear) for p in GDN)
    assert all(type(getattr(gdn, f"{c}_conv1d")) is ShortConv for c in "qkv")
    assert apply_lora(model, LoraConfig(rank=2, alpha=2.0, targets="conv"), rngs=nnx.Rngs(2)) == [
        f"layers.{i}.linear_attn.{c}_conv1d" for i in (0, 2) for c in "kqv"]
    assert isinstance(gdn.v_conv1d, LoraShortConv)
    scanned = _model(scan=True)  # the scanned layout reports the same list-layout names
    assert apply_lora(scanned, LoraConfig(rank=2, alpha=2.0, targets=("gdn", "mlp")), rngs=nnx.Rngs(1)) == [
        n for n in names if ".self_attn." not in n]
    # a bare leaf name and a dotted pattern select what they say, in both layouts
    for scan in (False, True):
        m = _model(scan)
        assert apply_lora(m, LoraConfig(rank=2, alpha=2.0, targets=("b_proj", "layers.*.self_attn.o_proj")),
                          rngs=nnx.Rngs(1)) == ["layers.0.linear_attn.b_proj", "layers.1.self_attn.o_proj",
                                                "layers.2.linear_attn.b_proj", "layers.3.self_attn.o_proj"]


@pytest.mark.parametrize("targets, match", [
    (("all", "x_proj"), r"LoRA target 'x_proj' matches no projection"),
    (("layers.*.linear_attn.in_proj_ba",), r"'layers\.\*\.linear_attn\.in_proj_ba' matches no projection"),
    (("layers.*.input_layernorm",), r"'layers\.\*\.input_layernorm' matches no projection"),
    (("layers.0.linear_attn.q_proj",), None),  # list layout: fine
])
def test_unknown_target_is_a_one_line_error(targets, match):
    model = _model()
    cfg = LoraConfig(rank=2, alpha=2.0, targets=targets)
    if match is None:
        assert apply_lora(model, cfg, rngs=nnx.Rngs(1)) == ["layers.0.linear_attn.q_proj"]
        with pytest.raises(ValueError, match=r"layers\.0\.linear_attn\.q_proj already has adapters"):
            apply_lora(model, cfg, rngs=nnx.Rngs(1))
        with pytest.raises(ValueError, match=r"selects 1 of the 2 layers stacked in model\.blocks\.layers\.0"):
            apply_lora(_model(scan=True), cfg, rngs=nnx.Rngs(1))  # one slice of a stacked module
        return
    with pytest.raises(ValueError, match=match) as err:
        apply_lora(model, cfg, rngs=nnx.Rngs(1))
    assert "\n" not in str(err.value) and "b_proj" in str(err.value)  # names what can be adapted
    assert not has_lora(model)  # nothing half-applied


def test_bad_configs_are_named():
    with pytest.raises(ValueError, match="rank must be a positive int"):
        LoraConfig(rank=0, alpha=1.0)
    with pytest.raises(ValueError, match="dropout=0.1"):
        LoraConfig(rank=2, alpha=1.0, dropout=0.1)
    with pytest.raises(ValueError, match="targets must be non-empty"):
        LoraConfig(rank=2, alpha=1.0, targets=())
    assert LoraConfig(rank=2, alpha=1.0, targets=["gdn"]).targets == ("gdn",)


def _loss(model, ids):
    logits = model(ids[:, :-1]).astype(jnp.float32)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), ids[:, 1:, None], -1))


def test_gradients_reach_adapters_only_and_optax_steps_keep_the_base_bit_identical():
    model = _model(scan=True, backend="sequential")  # its backward compiles in about half the chunked one's time
    apply_lora(model, LoraConfig(rank=4, alpha=8.0, targets=EVERYTHING), rngs=nnx.Rngs(1))
    graphdef, adapters, base = split_adapters(model)
    adapter_keys, base_keys = set(nnx.to_flat_state(adapters).paths), set(nnx.to_flat_state(base).paths)
    assert adapter_keys and all(k[-1] in ("lora_a", "lora_b") for k in adapter_keys) and not adapter_keys & base_keys
    base0 = jax.tree.map(np.array, base)  # host copies: nothing may write into them
    tx = optax.adam(1e-2)

    def loss(adapters, base, ids):
        return _loss(nnx.merge(graphdef, adapters, base), ids)

    @jax.jit
    def step(adapters, opt, base, ids):  # the gradient is over the adapter state only: base is a constant input
        value, g = jax.value_and_grad(loss)(adapters, base, ids)
        updates, opt = tx.update(g, opt, adapters)
        return optax.apply_updates(adapters, updates), opt, value, g

    opt = tx.init(adapters)
    losses = []
    for i in range(4):
        new, opt, value, grads = step(adapters, opt, base, IDS)
        if i == 0:
            assert jax.tree.structure(grads) == jax.tree.structure(adapters)
            flat = {jax.tree_util.keystr(p): g
                    for p, g in jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(grads))[0]}
            assert all(bool(jnp.isfinite(g).all()) for g in flat.values())
            assert all(float(jnp.abs(g).max()) > 0 for k, g in flat.items() if k.endswith("['lora_b']"))  # all learn
        adapters = new
        losses.append(float(value))
    assert losses[-1] < losses[0] - 1e-3, losses
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, base), base0)
    trained = nnx.merge(graphdef, adapters, base)
    assert has_lora(trained)
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, nnx.state(trained, nnx.Not(LoraParam))),
                 base0)


def test_nnx_optimizer_wrt_lora_param_trains_adapters_only():
    model = _model(scan=False, backend="sequential")  # the list layout (the split test above is the scanned one)
    apply_lora(model, LoraConfig(rank=2, alpha=4.0, targets="gdn"), rngs=nnx.Rngs(1))
    base0 = jax.tree.map(np.array, nnx.state(model, nnx.Not(LoraParam)))
    opt = nnx.Optimizer(model, optax.sgd(0.5), wrt=LoraParam)

    @nnx.jit
    def train_step(model, opt, ids):
        value, grads = nnx.value_and_grad(_loss, argnums=nnx.DiffState(0, LoraParam))(model, ids)
        opt.update(model, grads)
        return value

    losses = [float(train_step(model, opt, IDS)) for _ in range(2)]
    assert losses[1] < losses[0]
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, nnx.state(model, nnx.Not(LoraParam))), base0)


def test_adapter_checkpoint_round_trips_across_layouts():
    scanned, flat = _model(scan=True), _model(scan=False)
    cfg = LoraConfig(rank=2, alpha=4.0, targets=EVERYTHING)
    apply_lora(scanned, cfg, rngs=nnx.Rngs(1))
    _perturb(scanned)
    saved = adapter_params(scanned)
    assert "layers" in saved["model"] and "blocks" not in saved["model"]  # the list layout on disk
    apply_lora(flat, cfg, rngs=nnx.Rngs(7))
    load_adapter_params(flat, jax.tree.map(np.asarray, saved))
    for i in range(CFG.num_hidden_layers):  # layer i of the list layout is slice i // 2 of stacked slot i % 2
        for name in ("lora_a", "lora_b"):
            stacked = getattr(scanned.model.blocks.layers[i % 2].mlp.up_proj, name)[...][i // 2]
            np.testing.assert_array_equal(getattr(flat.model.layers[i].mlp.up_proj, name)[...], stacked)
    back = _model(scan=True)
    apply_lora(back, cfg, rngs=nnx.Rngs(9))
    load_adapter_params(back, adapter_params(flat))
    jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(nnx.state(back, LoraParam)),
                 nnx.to_pure_dict(nnx.state(scanned, LoraParam)))
    # a target set that leaves a stacked slot without adapters (slot 0 holds the GDN layers) round-trips too
    attn = LoraConfig(rank=2, alpha=4.0, targets="attention")
    one, two = _model(scan=True), _model(scan=True)
    apply_lora(one, attn, rngs=nnx.Rngs(1))
    _perturb(one)
    apply_lora(two, attn, rngs=nnx.Rngs(2))
    assert sorted(adapter_params(one)["model"]["layers"]) == [1, 3]
    load_adapter_params(two, adapter_params(one))
    jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(nnx.state(two, LoraParam)),
                 nnx.to_pure_dict(nnx.state(one, LoraParam)))
    other = _model()
    apply_lora(other, LoraConfig(rank=2, alpha=4.0, targets="mlp"), rngs=nnx.Rngs(1))
    with pytest.raises(ValueError, match="adapter params do not fit"):
        load_adapter_params(other, saved)
