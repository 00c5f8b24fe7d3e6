"""Low-rank adapters (LoRA) on any projection of OLMo Hybrid, GDN included; merge for export.

``apply_lora(model, LoraConfig(rank=16, alpha=32, targets=("all",)), rngs=nnx.Rngs(0))`` replaces each
targeted ``nnx.Linear`` with a :class:`LoraLinear` (an ``nnx.Linear`` subclass holding the same ``kernel`` /
``bias`` Variables, so base parameter paths do not change) and each targeted ``modules.ShortConv`` with a
:class:`LoraShortConv`, adding two :class:`LoraParam` leaves next to the kernel:

- Linear, kernel [in, out]: ``y = x @ W (+ b) + (alpha / rank) * (x @ lora_a) @ lora_b`` with lora_a [in, r]
  (uniform +-1/sqrt(in), PEFT's kaiming-uniform default) and lora_b [r, out] zeros, so at init the adapted
  model computes exactly the base model's function.
- ShortConv, depthwise kernel [Kc, C]: the conv runs with ``W + (alpha / rank) * lora_a @ lora_b``, lora_a
  [Kc, r], lora_b [r, C] zeros (the kernel is tiny, so the effective kernel is built each call).
- Scanned layout (``scan_layers=True``): the stacked kernel [G, in, out] gets stacked adapters [G, in, r],
  [G, r, out], one independent adapter per layer; the scan slices them like every other block leaf.

Targets are matched against the list-layout module names of every layout (``layers.5.linear_attn.b_proj``,
``layers.3.self_attn.q_proj``, ``layers.0.mlp.down_proj``, ``lm_head``; a leading ``model.`` is accepted):
an entry with a dot is an ``fnmatch`` pattern over the whole name, a bare entry (``b_proj``, ``*_conv1d``)
matches the last component (PEFT's ``target_modules`` style), and a preset (``PRESETS``) expands to the
patterns it names. Every entry must adapt something (each pattern of a preset too, for the layer kinds the
model has) or ``apply_lora`` raises a one-line ValueError naming it: nothing is skipped silently (PyTorch
LoRA stacks commonly skip the GDN's fused ``in_proj_ba`` and its convs). ``all`` is every linear projection
of the decoder (GDN q/k/v/a/b/g/o, attention q/k/v/o, MLP gate/up/down); the short convs are opt-in
(preset ``conv``): they are depthwise 4-tap filters with few parameters, and rank-r factors of a [4, C]
kernel are a different kind of adapter than a projection's. In the scanned layout one module holds every
p-th layer (p = the period of ``layer_types``), so a pattern must select all or none of the layers of a
stacked module (else ValueError).

Training (frozen base): ``graphdef, adapters, base = split_adapters(model)``; differentiate and optimise
``adapters`` only (``jax.grad`` of ``lambda a: loss(nnx.merge(graphdef, a, base))``, optimizer state
``tx.init(adapters)``), or in NNX style ``nnx.Optimizer(model, tx, wrt=LoraParam)`` with
``nnx.DiffState(0, LoraParam)``. Checkpoint only ``adapter_params(model)`` (a pure dict in the list layout,
layout-independent) and restore with ``load_adapter_params``. Export: ``merge_lora(model)`` folds
``(alpha / rank) * lora_a @ lora_b`` into the kernels and puts plain ``nnx.Linear`` / ``ShortConv`` back,
after which ``convert.save_hf`` writes an ordinary checkpoint. ``convert.save_hf`` on an unmerged model
would write the base weights only: check ``has_lora(model)`` first.

QLoRA-style frozen low-precision base: the base may be bf16 / fp16 (``param_dtype``) while adapters are
stored in ``LoraConfig.adapter_dtype`` (fp32 by default); the adapter matmuls run in the layer's compute
dtype (``dtype``, else promoted), and the adapter output is cast to the base output's dtype. Integer /
4-bit (NF4) base weights are not supported: the model's layers have no dequantising matmul.

Why not qwix (the JAX ecosystem's LoRA / QLoRA, tunix's): tried 0.1.8 with flax 0.12.8 / jax 0.10.2. It
intercepts ``dot_general`` while tracing a sample forward and creates ``kernel_lora_a/b`` on the fly. On the
list layout that works (all GDN projections included), but (1) on the scanned layout ``apply_lora_to_model``
fails inside the model's ``lax.scan`` over the stacked blocks (IndexError in ``_infer_scan_length``: qwix puts
an unstacked leaf into the blocks' state), and params made while tracing the scan body would land on a
merged copy of the blocks, not on the model;
(2) the short convs are elementwise products, not a dot/conv op, so qwix cannot adapt them, and a rule
whose regex matches nothing is silently a no-op; (3) adapters take the base kernel's dtype (no fp32 adapters
on a bf16 base unless quantised); (4) there is no merge. Dropout is not offered here yet (``dropout`` must
be 0): the scanned forward discards state updates made inside its scan body, so a per-module RNG would
repeat its mask every step; it needs the model to take a dropout key.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from olmo_hybrid_jax.model import OlmoHybridForCausalLM, layer_period
from olmo_hybrid_jax.modules import ShortConv

Array = jax.Array

_GDN = ("q_proj", "k_proj", "v_proj", "a_proj", "b_proj", "g_proj", "o_proj")
#: Preset target names -> the patterns they expand to (over list-layout module names).
PRESETS: dict[str, tuple[str, ...]] = {
    "gdn": tuple(f"layers.*.linear_attn.{p}" for p in _GDN),
    "conv": tuple(f"layers.*.linear_attn.{c}_conv1d" for c in "qkv"),
    "attention": tuple(f"layers.*.self_attn.{p}_proj" for p in "qkvo"),
    "mlp": tuple(f"layers.*.mlp.{p}_proj" for p in ("gate", "up", "down")),
}
PRESETS["all"] = PRESETS["gdn"] + PRESETS["attention"] + PRESETS["mlp"]


class LoraParam(nnx.LoRAParam):
    """An adapter factor; a ``nnx.LoRAParam`` (so NNX / tunix ``LoRAParam`` filters select it too)."""


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """LoRA hyper-parameters. ``targets``: preset names, bare leaf names or dotted fnmatch patterns (see the
    module docstring); a single string is one target. ``adapter_dtype``: storage dtype of lora_a / lora_b."""

    rank: int
    alpha: float
    dropout: float = 0.0
    targets: tuple[str, ...] = ("all",)
    adapter_dtype: Any = jnp.float32

    def __post_init__(self):
        targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
        object.__setattr__(self, "targets", targets)  # frozen: normalise a list / str to a tuple once
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"LoraConfig.rank must be a positive int, got {self.rank!r}")
        if self.dropout != 0:
            raise ValueError(f"LoraConfig.dropout={self.dropout}: only 0 is supported (the scanned forward "
                             "cannot advance a per-layer RNG)")
        if not targets or not all(isinstance(t, str) and t for t in targets):
            raise ValueError(f"LoraConfig.targets must be non-empty strings, got {self.targets!r}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def _a_init(key, shape, fan_in: int, dtype):
    bound = 1.0 / math.sqrt(fan_in)  # PEFT: kaiming_uniform(a=sqrt(5)) on [r, in] = U(-1/sqrt(in), 1/sqrt(in))
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)


class LoraLinear(nnx.Linear):
    """``nnx.Linear`` plus a low-rank update: ``y = base(x) + scale * (x @ lora_a) @ lora_b``.

    Built from an existing Linear (its ``kernel`` / ``bias`` Variables and options are taken over, nothing
    is re-initialised). kernel [.., in, out] (a leading [G] when stacked), lora_a [.., in, r], lora_b
    [.., r, out].
    """

    def __init__(self, base: nnx.Linear, *, rank: int, scale: float, dtype, rngs: nnx.Rngs):
        for name in ("in_features", "out_features", "use_bias", "dtype", "param_dtype", "precision",
                     "dot_general", "promote_dtype", "preferred_element_type"):
            setattr(self, name, getattr(base, name))
        self.kernel = base.kernel
        self.bias = base.bias if base.bias is not None else nnx.data(None)
        self.scale = scale
        lead = base.kernel.shape[:-2]
        self.lora_a = LoraParam(_a_init(rngs.params(), (*lead, self.in_features, rank), self.in_features, dtype))
        self.lora_b = LoraParam(jnp.zeros((*lead, rank, self.out_features), dtype))

    def __call__(self, inputs: Array, out_sharding=None) -> Array:
        y = super().__call__(inputs, out_sharding=out_sharding)
        x, a, b = self.promote_dtype((inputs, self.lora_a[...], self.lora_b[...]), dtype=self.dtype)
        return y + (self.scale * ((x @ a) @ b)).astype(y.dtype)

    def delta(self) -> Array:
        """The fp32 kernel update ``scale * lora_a @ lora_b`` [.., in, out]."""
        return self.scale * jnp.matmul(self.lora_a[...].astype(jnp.float32), self.lora_b[...].astype(jnp.float32))


@dataclasses.dataclass(frozen=True)
class _ConvView:
    """What ``ShortConv.__call__`` reads from its module, with the kernel replaced by the adapted one."""

    kernel: Array
    kernel_size: int
    activation: str
    dtype: Any


class LoraShortConv(ShortConv):
    """``ShortConv`` whose depthwise kernel [.., Kc, C] runs as ``kernel + scale * lora_a @ lora_b``
    (lora_a [.., Kc, r], lora_b [.., r, C]); built from an existing ShortConv, nothing re-initialised."""

    def __init__(self, base: ShortConv, *, rank: int, scale: float, dtype, rngs: nnx.Rngs):
        self.kernel_size, self.activation, self.dtype = base.kernel_size, base.activation, base.dtype
        self.kernel = base.kernel
        self.scale = scale
        *lead, kc, c = base.kernel.shape
        self.lora_a = LoraParam(_a_init(rngs.params(), (*lead, kc, rank), kc, dtype))
        self.lora_b = LoraParam(jnp.zeros((*lead, rank, c), dtype))

    def delta(self) -> Array:
        """The fp32 kernel update ``scale * lora_a @ lora_b`` [.., Kc, C]."""
        return self.scale * jnp.matmul(self.lora_a[...].astype(jnp.float32), self.lora_b[...].astype(jnp.float32))

    def __call__(self, x: Array, **kwargs):
        w = self.kernel[...]
        # the sum in the wider dtype: a bf16 base with fp32 adapters keeps the adapters' precision
        w = w.astype(jnp.result_type(w.dtype, self.lora_a.dtype)) + self.delta().astype(
            jnp.result_type(w.dtype, self.lora_a.dtype))
        view = _ConvView(kernel=w, kernel_size=self.kernel_size, activation=self.activation, dtype=self.dtype)
        return ShortConv.__call__(view, x, **kwargs)


# --------------------------------------------------------------------------------------------- targets
def _adaptable(model: OlmoHybridForCausalLM) -> list[tuple[tuple, nnx.Module, list[str]]]:
    """(graph path, module, list-layout names it stands for) of every nnx.Linear / ShortConv of ``model``
    except the embedding; a stacked module of the scanned layout stands for its G layers."""
    scanned = model.scan_layers
    p = layer_period(model.config.layer_types) if scanned else 1
    G = model.config.num_hidden_layers // p
    out = []
    for path, node in nnx.iter_graph(model):
        if not isinstance(node, (nnx.Linear, ShortConv)):
            continue
        keys = [str(k) for k in path]
        if keys[:3] == ["model", "blocks", "layers"]:
            j, rest = int(keys[3]), ".".join(keys[4:])
            names = [f"layers.{g * p + j}.{rest}" for g in range(G)]
        else:
            names = [".".join(keys[1:] if keys[0] == "model" else keys)]
        out.append((tuple(path), node, names))
    return out


def _patterns(target: str) -> tuple[tuple[str, ...], bool]:
    """(fnmatch patterns over names, whether each pattern must match on its own: presets)."""
    if target in PRESETS:
        return PRESETS[target], True
    return (target,), False


def _matches(pattern: str, name: str) -> bool:
    if "." not in pattern:
        return fnmatch.fnmatchcase(name.rsplit(".", 1)[-1], pattern)
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase("model." + name, pattern)


def _select(cands, targets: Sequence[str]) -> list[tuple[tuple, nnx.Module, list[str]]]:
    """The candidates ``targets`` select, each at most once; ValueError (one line) for a target that selects
    nothing and for a pattern that splits a stacked module."""
    names = [n for _, _, ns in cands for n in ns]
    parents = {n.rsplit(".", 1)[0] for n in names}
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    chosen: dict[tuple, tuple] = {}
    for target in targets:
        pats, each = _patterns(target)
        hit_target = False
        for pat in pats:
            if each and not any(fnmatch.fnmatchcase(q, pat.rsplit(".", 1)[0]) for q in parents):
                continue  # a preset's pattern for a layer kind this model does not have
            hit = False
            for path, mod, ns in cands:
                got = [_matches(pat, n) for n in ns]
                if any(got) and not all(got):
                    raise ValueError(f"LoRA target {pat!r} selects {sum(got)} of the {len(ns)} layers stacked in "
                                     f"{'.'.join(map(str, path))} (scanned layout): select all or none of them")
                if all(got):
                    hit = True
                    chosen[path] = (path, mod, ns)
            if each and not hit:
                raise ValueError(f"LoRA preset {target!r}: pattern {pat!r} matches no projection of this model")
            hit_target |= hit
        if not hit_target:
            raise ValueError(f"LoRA target {target!r} matches no projection of this model "
                             f"(adaptable names: {', '.join(leaves)}; presets: {', '.join(sorted(PRESETS))})")
    return sorted(chosen.values(), key=lambda c: c[2][0])


def _parent(model, path: tuple):
    node = model
    for k in path[:-1]:
        node = node[k] if isinstance(k, int) else getattr(node, k)
    return node


# ------------------------------------------------------------------------------------------------- API
def apply_lora(model: OlmoHybridForCausalLM, cfg: LoraConfig, *, rngs: nnx.Rngs) -> list[str]:
    """Add adapters to the projections ``cfg.targets`` selects, in place; returns the adapted module names
    (list-layout names, sorted by first layer). B is zero, so ``model`` computes what it did before.

    Raises ValueError (one line): a target that adapts nothing, a stacked module split by a pattern, or a
    module that already has adapters.
    """
    selected = _select(_adaptable(model), cfg.targets)
    for _, mod, ns in selected:
        if isinstance(mod, (LoraLinear, LoraShortConv)):
            raise ValueError(f"LoRA: {ns[0]} already has adapters (merge_lora first)")
    for path, mod, _ in selected:
        cls = LoraShortConv if isinstance(mod, ShortConv) else LoraLinear
        setattr(_parent(model, path), path[-1], cls(mod, rank=cfg.rank, scale=cfg.scale, dtype=cfg.adapter_dtype,
                                                    rngs=rngs))
    return sorted((n for _, _, ns in selected for n in ns), key=_name_key)


def _name_key(name: str):
    parts = name.split(".")
    return (int(parts[1]) if parts[0] == "layers" else 1 << 30, name)


def lora_modules(model: OlmoHybridForCausalLM) -> list[str]:
    """List-layout names of the adapted modules of ``model``, in layer order."""
    return sorted((n for _, m, ns in _adaptable(model) if isinstance(m, (LoraLinear, LoraShortConv)) for n in ns),
                  key=_name_key)


def has_lora(model: nnx.Module) -> bool:
    """Whether ``model`` holds any adapter (then ``convert.save_hf`` would drop them: merge first)."""
    return bool(jax.tree.leaves(nnx.state(model, LoraParam)))


def split_adapters(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """``(graphdef, adapter_state, base_state)``: the LoraParam leaves, and everything else (frozen base
    weights, any other state). ``nnx.merge(graphdef, adapter_state, base_state)`` rebuilds the model."""
    return nnx.split(model, LoraParam, ...)


def _stacked_to_list(pure: dict, cfg) -> dict:
    """``model/blocks/layers/{j}`` [G, ...] -> ``model/layers/{g*p+j}``, for the slots ``pure`` has (an adapter
    tree need not cover every layer kind, unlike ``model.stacked_to_list``'s full parameter trees)."""
    p = layer_period(cfg.layer_types)
    model = dict(pure["model"])
    slots = model.pop("blocks")["layers"]
    layers = {g * p + j: jax.tree.map(lambda x, g=g: x[g], sub) for j, sub in slots.items()
              for g in range(cfg.num_hidden_layers // p)}
    return {**pure, "model": {**model, "layers": dict(sorted(layers.items()))}}


def _list_to_stacked(pure: dict, cfg) -> dict:
    """The inverse of ``_stacked_to_list``: layer i goes to slot i % p, stacked in g order."""
    p = layer_period(cfg.layer_types)
    model = dict(pure["model"])
    layers = {int(i): sub for i, sub in model.pop("layers").items()}
    slots = {j: jax.tree.map(lambda *xs: jnp.stack(xs), *[layers[i] for i in sorted(layers) if i % p == j])
             for j in sorted({i % p for i in layers})}
    return {**pure, "model": {**model, "blocks": {"layers": slots}}}


def adapter_params(model: OlmoHybridForCausalLM) -> dict:
    """The adapters as a pure dict in the list layout (``model/layers/{i}/.../lora_a``), whatever ``model``'s
    layout: what an adapter-only checkpoint stores."""
    pure = nnx.to_pure_dict(nnx.state(model, LoraParam))
    if model.scan_layers and "blocks" in pure.get("model", {}):
        pure = _stacked_to_list(pure, model.config)
    return pure


def load_adapter_params(model: OlmoHybridForCausalLM, params: dict) -> None:
    """Set ``model``'s adapters (already added with the same targets and rank) from ``adapter_params``'s
    dict, in place, for either layout. Raises ValueError when the trees differ."""
    if model.scan_layers and "layers" in params.get("model", {}):
        try:
            params = _list_to_stacked(params, model.config)
        except (ValueError, TypeError) as e:  # a layer missing from a slot: the stacks do not line up
            raise ValueError(f"adapter params do not fit the model's scanned layout: {e}") from None
    state = nnx.state(model, LoraParam)
    have = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(state))[0]}
    got = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]}
    if have != got:
        diff = sorted(have ^ got)
        raise ValueError(f"adapter params do not fit the model's adapters: {len(diff)} paths differ, e.g. {diff[0]}")
    nnx.replace_by_pure_dict(state, jax.tree.map(lambda new, old: jnp.asarray(new, old.dtype), params,
                                                 nnx.to_pure_dict(state)))
    nnx.update(model, state)


def merge_lora(model: OlmoHybridForCausalLM) -> OlmoHybridForCausalLM:
    """Fold each adapter into its kernel (``W + scale * lora_a @ lora_b``, summed in fp32 and stored in the
    kernel's dtype) and put plain ``nnx.Linear`` / ``ShortConv`` modules back, in place; returns ``model``,
    whose parameter tree is then the base model's (ready for ``convert.save_hf``)."""
    for path, mod, _ in _adaptable(model):
        if not isinstance(mod, (LoraLinear, LoraShortConv)):
            continue
        k = mod.kernel
        k[...] = (k[...].astype(jnp.float32) + mod.delta()).astype(k.dtype)
        if isinstance(mod, LoraShortConv):
            plain = nnx.eval_shape(lambda m=mod: ShortConv(m.kernel.shape[-1], m.kernel_size, activation=m.activation,
                                                           dtype=m.dtype, rngs=nnx.Rngs(0)))
        else:
            plain = nnx.eval_shape(lambda m=mod: nnx.Linear(
                m.in_features, m.out_features, use_bias=m.use_bias, dtype=m.dtype, param_dtype=m.param_dtype,
                precision=m.precision, dot_general=m.dot_general, promote_dtype=m.promote_dtype,
                preferred_element_type=m.preferred_element_type, rngs=nnx.Rngs(0)))
            if mod.use_bias:
                plain.bias = mod.bias
        plain.kernel = k  # the base Variable itself (stacked shape, metadata and all)
        setattr(_parent(model, path), path[-1], plain)
    return model
