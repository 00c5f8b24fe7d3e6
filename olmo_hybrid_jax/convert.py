"""Hugging Face safetensors <-> NNX model, without torch; and the orbax form of a model.

``load_hf(path)`` reads ``config.json`` and ``model.safetensors`` (or shards listed in
``model.safetensors.index.json``) tensor by tensor straight into an abstractly built model, so host
memory peaks near one copy of the weights plus one tensor. Every naming variant of the checkpoints
is accepted (spec §4.4):

- release names: ``model.layers.{i}.linear_attn.{q,k,v}_conv1d.weight`` (separate short convs);
- legacy GDN norms ``attention_layer_norm`` / ``feedforward_layer_norm`` (early Hub revisions, old
  ``olmo3_5_hybrid`` code);
- newest transformers' fused ``linear_attn.conv1d.weight`` ``[2 key_dim + value_dim, 1, Kc]``, split
  at the exact q/k/v channel boundaries;
- OLMo-core names (``blocks.{i}.attention.w_q``, ``feed_forward.w1``, ``attention_norm``, ...), the
  OLMo-core main-branch ``linear_attn.out_proj`` / ``linear_attn.norm``, and training-era
  ``blocks.{i}.fla.inner.*`` / ``fla_norm``.

Every shape is checked; one one-line ``CheckpointMismatchError`` counts the missing, unexpected and
misshapen tensors, shows an example of each and names the config fields behind a misshapen dimension.

``save_hf(model, path)`` writes ``config.json`` and safetensors in the release layout (sharded with
an index above ``max_shard_size``), which ``transformers``' ``OlmoHybridForCausalLM.from_pretrained``
loads. The whole new checkpoint is written under a temporary folder inside ``path`` and only then
renamed into place, so a failed save leaves the previous checkpoint whole; files get the umask's mode
(``0666 & ~umask``, as ``open()``), not safetensors' private 0600.

Output folders (``check_output_dir``): a new or empty folder is written; one holding this project's
checkpoint (``config.json`` of model_type olmo_hybrid with safetensors / an index / ``params/``) is
replaced only with ``overwrite``, and then only its checkpoint files (config, weights, index,
``params/``): a README.md, notes or tokenizer files kept there survive. Checkpoint-format files of
anything else (another model's config.json or safetensors) are never replaced: the save refuses,
naming them. A folder a failed save created is removed again.

CLI::

    python -m olmo_hybrid_jax.convert hf-to-orbax SRC_HF_DIR DST_ORBAX_DIR [--dtype bfloat16]
    python -m olmo_hybrid_jax.convert orbax-to-hf SRC_ORBAX_DIR DST_HF_DIR [--dtype bfloat16]

``--dtype`` (here, in ``generate`` and in ``train.export``) takes float32, bfloat16 or float16, or
their short spellings fp32, bf16, fp16 (``dtype_arg``); anything else is a usage error (exit 2).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from olmo_hybrid_jax.config import LINEAR, OlmoHybridConfig
from olmo_hybrid_jax.model import OlmoHybridForCausalLM, from_list_params, list_params

SAFETENSORS_DTYPES = {"BF16": jnp.bfloat16, "F16": jnp.float16, "F32": jnp.float32, "F64": jnp.float64}
# The dtype names the CLIs and the string forms of ``dtype=`` accept (the short forms are common ML spellings).
DTYPE_NAMES = {"float32": jnp.float32, "fp32": jnp.float32, "bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16,
               "float16": jnp.float16, "fp16": jnp.float16}


def canonical_dtype(dtype) -> jnp.dtype | None:
    """``dtype`` (None, a name of ``DTYPE_NAMES`` or a floating dtype object) as a ``jnp.dtype``."""
    if dtype is None:
        return None
    if isinstance(dtype, str):
        if dtype.lower() not in DTYPE_NAMES:
            raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPE_NAMES)}")
        return jnp.dtype(DTYPE_NAMES[dtype.lower()])
    try:
        out = jnp.dtype(dtype)
    except TypeError as e:
        raise ValueError(f"not a dtype: {dtype!r}") from e
    if not jnp.issubdtype(out, jnp.floating):
        raise ValueError(f"parameters need a floating dtype, got {out}")
    return out


def dtype_arg(name: str) -> jnp.dtype:
    """argparse ``type=`` for ``--dtype``: a bad name is a usage error (exit 2) before any work."""
    try:
        return canonical_dtype(name)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


class CheckpointMismatchError(ValueError):
    """The checkpoint's tensors do not match the config (missing, unexpected or misshapen); one line."""


# ----------------------------------------------------------------------------------------- naming
# Per-layer suffix renames applied before matching; each (pattern, replacement) is tried in order.
# ``{kind}`` is LINEAR or FULL: several OLMo-core names map differently by layer kind.
_COMMON_RENAMES = [
    (r"^feed_forward\.w1\.", "mlp.gate_proj."),
    (r"^feed_forward\.w3\.", "mlp.up_proj."),
    (r"^feed_forward\.w2\.", "mlp.down_proj."),
]
_LINEAR_RENAMES = _COMMON_RENAMES + [
    (r"^attention_layer_norm\.", "input_layernorm."),
    (r"^feedforward_layer_norm\.", "post_attention_layernorm."),
    (r"^(attention_norm|fla_norm)\.", "input_layernorm."),
    (r"^feed_forward_norm\.", "post_attention_layernorm."),
    (r"^(attention|fla\.inner)\.w_([qkvabg])\.", r"linear_attn.\2_proj."),
    (r"^(attention|fla\.inner)\.w_out\.", "linear_attn.o_proj."),
    (r"^fla\.inner\.", "linear_attn."),
    (r"^attention\.", "linear_attn."),
    (r"^linear_attn\.out_proj\.", "linear_attn.o_proj."),
    (r"^linear_attn\.norm\.", "linear_attn.o_norm."),
]
_FULL_RENAMES = _COMMON_RENAMES + [
    (r"^attention_norm\.", "post_attention_layernorm."),
    (r"^feed_forward_norm\.", "post_feedforward_layernorm."),
    (r"^attention\.w_([qkv])\.", r"self_attn.\1_proj."),
    (r"^attention\.w_out\.", "self_attn.o_proj."),
    (r"^attention\.([qk])_norm\.", r"self_attn.\1_norm."),
]
_GLOBAL_RENAMES = {
    "embeddings.weight": "model.embed_tokens.weight",
    "lm_head.norm.weight": "model.norm.weight",
    "lm_head.w_out.weight": "lm_head.weight",
}
_LAYER_RE = re.compile(r"^(?:model\.layers|blocks)\.(\d+)\.(.+)$")


def canonical_name(name: str, cfg: OlmoHybridConfig) -> str:
    """Map any supported checkpoint naming variant onto the release (HF) name."""
    if name in _GLOBAL_RENAMES:
        return _GLOBAL_RENAMES[name]
    m = _LAYER_RE.match(name)
    if not m:
        return name
    i, rest = int(m.group(1)), m.group(2)
    if i < cfg.num_hidden_layers:
        for pat, rep in (_LINEAR_RENAMES if cfg.layer_types[i] == LINEAR else _FULL_RENAMES):
            new = re.sub(pat, rep, rest)
            if new != rest:
                rest = new
                break
    return f"model.layers.{i}.{rest}"


def _param_paths(cfg: OlmoHybridConfig) -> dict[str, tuple[tuple, str, tuple]]:
    """Release HF name -> (NNX param path, layout kind, HF shape) for every tensor of ``cfg``.

    Layout kinds: "linear" (HF [out, in] -> kernel [in, out]), "conv" (HF [C, 1, Kc] -> kernel [Kc, C]),
    "copy" (1-D tensors and the embedding, as is).
    """
    H, V, F = cfg.hidden_size, cfg.vocab_size, cfg.intermediate_size
    out: dict[str, tuple[tuple, str, tuple]] = {
        "model.embed_tokens.weight": (("model", "embed_tokens", "embedding"), "copy", (V, H)),
        "model.norm.weight": (("model", "norm", "weight"), "copy", (H,)),
    }
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = (("lm_head", "kernel"), "linear", (V, H))
    kd, vd, nv, Kc = cfg.linear_key_dim, cfg.linear_value_dim, cfg.linear_num_value_heads, cfg.linear_conv_kernel_dim
    nh, nkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim

    def lin(prefix, path, o, i, bias=False):
        out[f"{prefix}.weight"] = (path + ("kernel",), "linear", (o, i))
        if bias:
            out[f"{prefix}.bias"] = (path + ("bias",), "copy", (o,))

    for li, t in enumerate(cfg.layer_types):
        p, P = f"model.layers.{li}", ("model", "layers", li)
        for n, (o, i) in {"gate_proj": (F, H), "up_proj": (F, H), "down_proj": (H, F)}.items():
            lin(f"{p}.mlp.{n}", P + ("mlp", n), o, i)
        out[f"{p}.post_attention_layernorm.weight"] = (P + ("post_attention_layernorm", "weight"), "copy", (H,))
        if t == LINEAR:
            a = f"{p}.linear_attn"
            A = P + ("linear_attn",)
            out[f"{p}.input_layernorm.weight"] = (P + ("input_layernorm", "weight"), "copy", (H,))
            for n, o in {"q_proj": kd, "k_proj": kd, "v_proj": vd, "a_proj": nv, "b_proj": nv, "g_proj": vd}.items():
                lin(f"{a}.{n}", A + (n,), o, H)
            lin(f"{a}.o_proj", A + ("o_proj",), H, vd)
            for n, c in {"q_conv1d": kd, "k_conv1d": kd, "v_conv1d": vd}.items():
                out[f"{a}.{n}.weight"] = (A + (n, "kernel"), "conv", (c, 1, Kc))
            out[f"{a}.A_log"] = (A + ("A_log",), "copy", (nv,))
            out[f"{a}.dt_bias"] = (A + ("dt_bias",), "copy", (nv,))
            out[f"{a}.o_norm.weight"] = (A + ("o_norm", "weight"), "copy", (cfg.linear_value_head_dim,))
        else:
            a, A = f"{p}.self_attn", P + ("self_attn",)
            b = cfg.attention_bias
            lin(f"{a}.q_proj", A + ("q_proj",), nh * hd, H, b)
            lin(f"{a}.k_proj", A + ("k_proj",), nkv * hd, H, b)
            lin(f"{a}.v_proj", A + ("v_proj",), nkv * hd, H, b)
            lin(f"{a}.o_proj", A + ("o_proj",), H, nh * hd, b)
            out[f"{a}.q_norm.weight"] = (A + ("q_norm", "weight"), "copy", (nh * hd,))
            out[f"{a}.k_norm.weight"] = (A + ("k_norm", "weight"), "copy", (nkv * hd,))
            out[f"{p}.post_feedforward_layernorm.weight"] = (P + ("post_feedforward_layernorm", "weight"), "copy", (H,))
    return out


def hf_tensor_shapes(cfg: OlmoHybridConfig) -> dict[str, tuple[int, ...]]:
    """The release checkpoint's tensor names and shapes for ``cfg`` (what ``save_hf`` writes)."""
    return {name: shape for name, (_, _, shape) in _param_paths(cfg).items()}


def to_nnx_layout(kind: str, x: np.ndarray) -> np.ndarray:
    if kind == "linear":
        return x.T
    if kind == "conv":
        return x[:, 0, :].T
    return x


def to_hf_layout(kind: str, x: np.ndarray) -> np.ndarray:
    if kind == "linear":
        return x.T
    if kind == "conv":
        return x.T[:, None, :]
    return x


# ----------------------------------------------------------------------------------------- reading
class _SafetensorsDir:
    """The tensors of an HF checkpoint directory: names -> (file, shape, dtype), read lazily."""

    def __init__(self, path: Path):
        from safetensors import safe_open

        self._safe_open = safe_open
        index = path / "model.safetensors.index.json"
        single = path / "model.safetensors"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise ValueError(f"{index} is not a valid safetensors index (needs a 'weight_map'): {e}") from e
            files = sorted(set(weight_map.values()))
        elif single.is_file():
            files = [single.name]
        else:
            raise FileNotFoundError(f"{path} has neither model.safetensors nor model.safetensors.index.json")
        self.entries: dict[str, tuple[Path, tuple[int, ...], str]] = {}
        for fname in files:
            fpath = path / fname
            if not fpath.is_file():
                raise FileNotFoundError(f"{fpath} is listed in the index but missing")
            try:
                with safe_open(str(fpath), framework="np") as f:
                    for name in f.keys():
                        sl = f.get_slice(name)
                        self.entries[name] = (fpath, tuple(sl.get_shape()), sl.get_dtype())
            except Exception as e:  # safetensors raises its own error types for corrupt headers
                raise ValueError(f"cannot read safetensors file {fpath}: {e}") from e

    def read(self, name: str) -> np.ndarray:
        fpath, _, dtype = self.entries[name]
        if dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"tensor {name} in {fpath.name} has unsupported dtype {dtype}")
        with self._safe_open(str(fpath), framework="np") as f:
            return f.get_tensor(name)


def _plan_load(ckpt: _SafetensorsDir, cfg: OlmoHybridConfig, where: str):
    """Match checkpoint tensors to params; return [(param_path, kind, [(src_name, row_slice)])]."""
    expected = _param_paths(cfg)
    sources: dict[str, list] = {}  # release name -> list of (src name, channel slice or None)
    unexpected = []
    for src, (_, shape, _) in ckpt.entries.items():
        name = canonical_name(src, cfg)
        m = re.match(r"^(model\.layers\.\d+\.linear_attn)\.conv1d\.weight$", name)
        if m and int(name.split(".")[2]) < cfg.num_hidden_layers and cfg.layer_types[int(name.split(".")[2])] == LINEAR:
            kd, vd = cfg.linear_key_dim, cfg.linear_value_dim
            if shape[0] != 2 * kd + vd:
                raise CheckpointMismatchError(
                    f"{where} does not match its config.json: fused conv {src} has {shape[0]} channels, config "
                    f"gives 2*{kd}+{vd}={2 * kd + vd} (linear_key_dim={kd}, linear_value_dim={vd})")
            for part, sl in (("q", slice(0, kd)), ("k", slice(kd, 2 * kd)), ("v", slice(2 * kd, 2 * kd + vd))):
                sources.setdefault(f"{m.group(1)}.{part}_conv1d.weight", []).append((src, sl))
            continue
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # some tied checkpoints still store the (identical) head
        if name not in expected:
            unexpected.append(src)
            continue
        sources.setdefault(name, []).append((src, None))
    missing = [n for n in expected if n not in sources]
    dup = [n for n, s in sources.items() if len(s) > 1]
    bad_shape = []
    for name in expected:
        if len(sources.get(name, ())) != 1:
            continue
        src, sl = sources[name][0]
        shape = ckpt.entries[src][1]
        if sl is not None:
            shape = (sl.stop - sl.start,) + shape[1:]
        if tuple(shape) != expected[name][2]:
            bad_shape.append((name, src, tuple(shape)))
    if missing or unexpected or dup or bad_shape:
        layers = {int(m.group(1)) for n in ckpt.entries if (m := _LAYER_RE.match(n))}
        raise mismatch_error(where, cfg, hf_tensor_shapes, bad_shape, missing, unexpected, dup,
                             max(layers) + 1 if layers else None)
    return [(expected[n][0], expected[n][1], sources[n][0]) for n in expected]


# Config fields that set tensor dimensions (num_hidden_layers / layer_types set the tensor count).
_SHAPE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                 "linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim", "linear_value_head_dim",
                 "linear_conv_kernel_dim")


def _fields_behind(cfg: OlmoHybridConfig, shapes_of, name: str, got: tuple) -> list[str]:
    """``field=value`` of the config fields that set the dims where tensor ``name`` is ``got`` instead of
    ``shapes_of(cfg)[name]``: each field is doubled in turn and kept if one of those dims moves."""
    want = shapes_of(cfg)[name]
    dims = [i for i, (a, b) in enumerate(zip(got, want)) if a != b] if len(got) == len(want) else range(len(want))
    out = []
    for f in _SHAPE_FIELDS:
        try:
            alt = shapes_of(cfg.replace(**{f: 2 * getattr(cfg, f)})).get(name)
        except ValueError:  # the doubled value breaks a divisibility rule of the config
            continue
        if alt is not None and any(alt[i] != want[i] for i in dims):
            out.append(f"{f}={getattr(cfg, f)}")
    return out


def mismatch_error(where: str, cfg: OlmoHybridConfig, shapes_of, misshapen, missing=(), unexpected=(), dup=(),
                   stored_layers: int | None = None) -> CheckpointMismatchError:
    """One-line error for a checkpoint ``where`` that does not fit ``cfg``.

    misshapen: [(name in ``shapes_of(cfg)``, name in the checkpoint, checkpoint shape)]; missing,
    unexpected, dup: tensor names; stored_layers: the checkpoint's layer count when known.
    """
    def some(items):
        return ", ".join(items[:3]) + (", ..." if len(items) > 3 else "")

    parts = []
    if misshapen:
        name, src, got = misshapen[0]
        fields = _fields_behind(cfg, shapes_of, name, got)
        parts.append(f"{len(misshapen)} misshapen, e.g. {src} is {list(got)}, config gives "
                     f"{list(shapes_of(cfg)[name])}" + (f" ({', '.join(fields)})" if fields else ""))
    for title, items in (("missing", missing), ("unexpected", unexpected),
                         ("given more than once (several naming variants?)", dup)):
        if items:
            parts.append(f"{len(items)} {title}: {some(list(items))}")
    if stored_layers is not None and stored_layers != cfg.num_hidden_layers:
        parts.append(f"the checkpoint has {stored_layers} layers, config num_hidden_layers={cfg.num_hidden_layers}")
    n = len(misshapen) + len(missing) + len(unexpected) + len(dup)
    return CheckpointMismatchError(f"{where} does not match its config.json: {n} tensor{'s' * (n != 1)} differ"
                                   f"{'s' * (n == 1)} ({'; '.join(parts)})")


def _list_layout_target(cfg: OlmoHybridConfig, param_dtype) -> dict:
    """The pure-dict parameter tree of the list layout (abstract arrays) that checkpoints fill."""
    abstract = nnx.eval_shape(lambda: OlmoHybridForCausalLM(cfg, rngs=nnx.Rngs(0), param_dtype=param_dtype))
    return nnx.to_pure_dict(nnx.state(abstract, nnx.Param))


def _set_path(tree: dict, path: tuple, value) -> None:
    for key in path[:-1]:
        tree = tree[key]
    if path[-1] not in tree:
        raise KeyError(f"model has no parameter {'/'.join(map(str, path))}")
    tree[path[-1]] = value


def config_dtype(path: str | os.PathLike) -> jnp.dtype | None:
    """The dtype that ``path``'s config.json names (``dtype``, else the older ``torch_dtype``), or None."""
    try:
        d = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    name = d.get("dtype") or d.get("torch_dtype") if isinstance(d, dict) else None
    return jnp.dtype(DTYPE_NAMES[name]) if isinstance(name, str) and name in DTYPE_NAMES else None


def load_hf(path: str | os.PathLike, dtype=None, *, compute_dtype=None, progress: bool = True,
            **model_kwargs) -> OlmoHybridForCausalLM:
    """Load an HF OLMo Hybrid checkpoint directory into an ``OlmoHybridForCausalLM``.

    Args:
      path: directory with ``config.json`` and ``model.safetensors`` (or sharded + index).
      dtype: parameter dtype.
        - None: every tensor keeps the dtype it is stored in (a mixed checkpoint loads mixed, nothing
          is rounded or widened); the model's ``param_dtype`` option is config.json's ``dtype`` /
          ``torch_dtype`` when it names one, else the embedding's stored dtype.
        - "auto": transformers 5.x's ``from_pretrained`` default: every tensor cast to config.json's
          dtype, else to the embedding's stored dtype (transformers: the first floating weight's).
        - a dtype (``jnp.float32``, "bfloat16", "bf16", ...): every tensor cast to it.
      compute_dtype: matmul dtype (None = each op's parameter and input dtypes, promoted).
      model_kwargs: the model's other construction options (``gdn_backend``, ``attention_impl``,
        ``scan_layers``, ...; see ``OlmoHybridForCausalLM``).

    Raises:
      CheckpointMismatchError (a ValueError): the tensors do not fit config.json; one line.
    """
    path = Path(path)
    cfg = OlmoHybridConfig.from_hf(path)
    ckpt = _SafetensorsDir(path)
    plan = _plan_load(ckpt, cfg, f"hf checkpoint {path}")
    stored = SAFETENSORS_DTYPES.get(ckpt.entries[plan[0][2][0]][2], jnp.float32)  # the embedding's
    if isinstance(dtype, str) and dtype == "auto":
        dtype = config_dtype(path) or stored
    dtype = canonical_dtype(dtype)
    param_dtype = dtype or config_dtype(path) or jnp.dtype(stored)
    pure = _list_layout_target(cfg, param_dtype)
    for param_path, kind, (src, sl) in tqdm(plan, desc=f"loading {path.name}", disable=not progress, unit="tensor"):
        x = ckpt.read(src)
        if sl is not None:
            x = x[sl]
        x = np.ascontiguousarray(to_nnx_layout(kind, x))
        _set_path(pure, param_path, jnp.asarray(x, dtype=dtype))
        del x
    return from_list_params(cfg, pure, param_dtype=param_dtype, dtype=compute_dtype, **model_kwargs)


# ----------------------------------------------------------------------------------------- writing
def _iter_hf_tensors(model: OlmoHybridForCausalLM, dtype=None) -> Iterator[tuple[str, np.ndarray]]:
    cfg = model.config
    pure = list_params(model)
    for name, (param_path, kind, shape) in _param_paths(cfg).items():
        node = pure
        for key in param_path:
            node = node[key]
        arr = jax.device_get(node)
        if dtype is not None:
            arr = np.asarray(jnp.asarray(arr, dtype=dtype))
        arr = np.ascontiguousarray(to_hf_layout(kind, np.asarray(arr)))
        assert arr.shape == shape, (name, arr.shape, shape)
        yield name, arr


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)B?\s*", size.upper())
    if not m:
        raise ValueError(f"cannot parse size {size!r} (e.g. '5GB')")
    return int(float(m.group(1)) * 1000 ** " KMGT".index(m.group(2) or " "))


# Names a checkpoint of either form is made of: what a save writes, and replaces with ``overwrite``.
_HF_WEIGHTS_RE = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors")
_FORMAT_NAMES = ("config.json", "model.safetensors.index.json", "params")
_OWN_MODEL_TYPES = ("olmo_hybrid", "olmo3_5_hybrid")


def _format_entries(path: Path) -> list[Path]:
    """The entries of ``path`` named like a checkpoint's files (HF or orbax form)."""
    return sorted(p for p in path.iterdir() if p.name in _FORMAT_NAMES or _HF_WEIGHTS_RE.fullmatch(p.name))


def _holds_own_checkpoint(path: Path) -> bool:
    """``path`` has an OLMo Hybrid config.json and weights (safetensors, an index or orbax ``params/``)."""
    try:
        model_type = json.loads((path / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return False
    return model_type in _OWN_MODEL_TYPES and any(p.name != "config.json" for p in _format_entries(path))


def check_output_dir(path: str | os.PathLike, overwrite: bool = False) -> None:
    """Refuse (FileExistsError) to write a checkpoint into ``path`` unless it is new, holds no
    checkpoint-format files, or holds this project's checkpoint and ``overwrite`` is set.

    Other files (README.md, notes, tokenizer files) never block a save and are never touched. The CLIs
    call this before loading anything, so a refusal costs no work.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a directory")
    if not path.is_dir() or not (entries := _format_entries(path)):
        return
    if not _holds_own_checkpoint(path):
        raise FileExistsError(f"{path} holds files that are not an OLMo Hybrid checkpoint "
                              f"({', '.join(e.name for e in entries)}); not replacing them, even with --overwrite: "
                              "move them or choose another directory")
    if not overwrite:
        raise FileExistsError(f"{path} already holds a checkpoint; pass --overwrite (overwrite=True) to replace it")


def _make_dirs(path: Path) -> list[Path]:
    """mkdir -p ``path``; return the folders it created, deepest first (to remove on failure)."""
    created = [p for p in (path, *path.parents) if not p.exists()]
    path.mkdir(parents=True, exist_ok=True)
    return created


def _remove_created(created: list[Path]) -> None:
    for p in created:
        try:
            p.rmdir()  # only an empty folder: what existed before, or a file put there meanwhile, stays
        except OSError:
            break


def _default_file_mode() -> int:
    """What ``open()`` gives a new file, 0666 & ~umask (safetensors writes 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _replace_checkpoint(path: Path, new: dict[str, Path]) -> None:
    """Move the fully written ``new`` (final name -> temporary file or folder) into ``path`` and drop
    the old checkpoint's other format files; non-format files in ``path`` are left alone."""
    old = [e for e in _format_entries(path) if e.name not in new]
    for name, tmp in new.items():
        dst = path / name
        if tmp.is_dir() and dst.is_dir():  # os.replace cannot replace a non-empty folder
            tmp_old = path / f".old_{name}"
            os.replace(dst, tmp_old)
            os.replace(tmp, dst)
            shutil.rmtree(tmp_old)
        else:
            if dst.is_dir():
                shutil.rmtree(dst)
            os.replace(tmp, dst)
    for e in old:
        if e.is_dir():
            shutil.rmtree(e)
        else:
            e.unlink()


def _config_json(model: OlmoHybridForCausalLM, dtype) -> str:
    cfg_dict = model.config.to_hf()
    pdtype = jnp.dtype(dtype if dtype is not None else model.options.param_dtype)
    cfg_dict["dtype"] = pdtype.name if pdtype.name in DTYPE_NAMES else "float32"
    return json.dumps(cfg_dict, indent=2)


def save_hf(model: OlmoHybridForCausalLM, path: str | os.PathLike, *, dtype=None,
            max_shard_size: int | str = "5GB", overwrite: bool = False, progress: bool = True) -> Path:
    """Write ``model`` as an HF checkpoint (config.json + safetensors, release tensor names/layout).

    Args:
      dtype: dtype of the written tensors (None = the parameters' dtype).
      max_shard_size: above this many bytes the weights are split into
        ``model-0000i-of-0000n.safetensors`` files with a ``model.safetensors.index.json``.
      overwrite: replace this project's checkpoint in ``path`` (see ``check_output_dir``).
    """
    from safetensors.numpy import save_file

    adapters = jax.tree.leaves(nnx.state(model, nnx.LoRAParam))
    if adapters:  # the release layout has no place for them: writing would silently drop the fine-tune
        raise ValueError(f"save_hf: the model holds {len(adapters)} LoRA adapter arrays; fold them into the "
                         "weights first (olmo_hybrid_jax.post.lora.merge_lora)")
    path = Path(path)
    dtype = canonical_dtype(dtype)
    check_output_dir(path, overwrite)
    limit = _parse_size(max_shard_size)
    total = len(_param_paths(model.config))
    created = _make_dirs(path)
    tmpdir = path / ".tmp_save_hf"
    try:
        if tmpdir.exists():
            shutil.rmtree(tmpdir)  # left by an interrupted save
        tmpdir.mkdir()
        written: list[Path] = []
        weight_map: dict[str, int] = {}
        shard: dict[str, np.ndarray] = {}
        size = 0

        def flush():  # shards are written as they fill: at most one shard is held in host memory
            f = tmpdir / f"shard{len(written)}.safetensors"
            save_file(shard, str(f), metadata={"format": "pt"})
            written.append(f)

        for name, arr in tqdm(_iter_hf_tensors(model, dtype), total=total, desc=f"writing {path.name}",
                              disable=not progress, unit="tensor"):
            if shard and size + arr.nbytes > limit:
                flush()
                shard, size = {}, 0
            shard[name] = arr
            weight_map[name] = len(written)
            size += arr.nbytes
        flush()
        n = len(written)
        final = (["model.safetensors"] if n == 1
                 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)])
        new = dict(zip(final, written))
        if n > 1:
            index = {"metadata": {"total_size": sum(f.stat().st_size for f in written)},
                     "weight_map": {k: final[v] for k, v in sorted(weight_map.items())}}
            (tmpdir / "index.json").write_text(json.dumps(index, indent=2))
            new["model.safetensors.index.json"] = tmpdir / "index.json"
        (tmpdir / "config.json").write_text(_config_json(model, dtype))
        new["config.json"] = tmpdir / "config.json"  # last: a reader sees the new config with the new weights
        mode = _default_file_mode()
        for f in new.values():
            f.chmod(mode)
        _replace_checkpoint(path, new)
    except BaseException:
        shutil.rmtree(tmpdir, ignore_errors=True)
        _remove_created(created)
        raise
    shutil.rmtree(tmpdir, ignore_errors=True)
    return path


# ----------------------------------------------------------------------------------------- orbax
def save_orbax(model: OlmoHybridForCausalLM, path: str | os.PathLike, *, dtype=None, overwrite: bool = False) -> Path:
    """Save the parameters with orbax (``path/params``, the list layout whatever ``model``'s) and the HF
    config (``path/config.json``); output folder policy and failure safety as ``save_hf``'s."""
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    dtype = canonical_dtype(dtype)
    check_output_dir(path, overwrite)
    created = _make_dirs(path)
    tmpdir = path / ".tmp_save_orbax"
    try:
        if tmpdir.exists():
            shutil.rmtree(tmpdir)
        tmpdir.mkdir()
        params = list_params(model)
        if dtype is not None:
            params = jax.tree.map(lambda x: x.astype(dtype), params)
        with ocp.StandardCheckpointer() as ckptr:  # orbax's files already follow the umask
            ckptr.save(tmpdir / "params", params)
            ckptr.wait_until_finished()
        (tmpdir / "config.json").write_text(_config_json(model, dtype))
        _replace_checkpoint(path, {"params": tmpdir / "params", "config.json": tmpdir / "config.json"})
    except BaseException:
        shutil.rmtree(tmpdir, ignore_errors=True)
        _remove_created(created)
        raise
    shutil.rmtree(tmpdir, ignore_errors=True)
    return path


def load_orbax(path: str | os.PathLike, dtype=None, *, compute_dtype=None, **model_kwargs) -> OlmoHybridForCausalLM:
    """Load a model saved by ``save_orbax`` (or ``hf-to-orbax``); arguments as ``load_hf``'s (None keeps
    each array's stored dtype, "auto" casts to config.json's dtype, else to the stored one if single)."""
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    if not (path / "config.json").is_file() or not (path / "params").is_dir():
        raise FileNotFoundError(f"{path} is not an orbax model directory (needs config.json and params/)")
    cfg = OlmoHybridConfig.from_hf(path / "config.json")
    with ocp.StandardCheckpointer() as ckptr:
        meta = ckptr.metadata(path / "params")
        tree = getattr(meta, "item_metadata", meta)
        stored = {_key_path(kp): x for kp, x in jax.tree_util.tree_flatten_with_path(tree)[0] if hasattr(x, "shape")}
        dtypes = {jnp.dtype(x.dtype) for x in stored.values()}
        single = dtypes.pop() if len(dtypes) == 1 else None
        if isinstance(dtype, str) and dtype == "auto":
            dtype = config_dtype(path) or single or jnp.float32
        dtype = canonical_dtype(dtype)
        pdtype = dtype or config_dtype(path) or single or jnp.dtype(jnp.float32)
        target = _list_layout_target(cfg, pdtype)
        want = _nnx_shapes(cfg)  # in the release order: the embedding first
        misshapen = [(k, k, tuple(stored[k].shape)) for k in want if k in stored and tuple(stored[k].shape) != want[k]]
        missing, unexpected = [k for k in want if k not in stored], [k for k in stored if k not in want]
        if misshapen or missing or unexpected:
            layers = {int(k.split("/")[2]) for k in stored if k.startswith("model/layers/")}
            raise mismatch_error(f"orbax checkpoint {path}", cfg, _nnx_shapes, misshapen, missing, unexpected,
                                 stored_layers=max(layers) + 1 if layers else None)
        if dtype is None:  # keep each array's stored dtype
            target = jax.tree_util.tree_map_with_path(
                lambda kp, x: jax.ShapeDtypeStruct(x.shape, stored[_key_path(kp)].dtype), target)
        try:
            params = ckptr.restore(path / "params", target)
        except (ValueError, KeyError) as e:
            raise ValueError(f"cannot restore orbax params in {path}: {str(e).splitlines()[0]}") from e
    return from_list_params(cfg, params, param_dtype=pdtype, dtype=compute_dtype, **model_kwargs)


def _key_path(kp) -> str:
    return "/".join(str(getattr(k, "key", k)) for k in kp)


def _nnx_shapes(cfg: OlmoHybridConfig) -> dict[str, tuple[int, ...]]:
    """NNX parameter path ("model/layers/0/mlp/up_proj/kernel") -> shape, for ``cfg`` (no allocation)."""
    # a broadcast scalar is a zero-copy array of any shape: the layout change runs on it without allocating
    return {"/".join(map(str, pp)): to_nnx_layout(kind, np.broadcast_to(np.int8(0), shape)).shape
            for pp, kind, shape in _param_paths(cfg).values()}


# ----------------------------------------------------------------------------------------- CLI
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m olmo_hybrid_jax.convert", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for cmd, help_ in (("hf-to-orbax", "HF safetensors directory -> orbax model directory"),
                       ("orbax-to-hf", "orbax model directory -> HF safetensors directory")):
        p = sub.add_parser(cmd, help=help_)
        p.add_argument("src")
        p.add_argument("dst")
        p.add_argument("--dtype", type=dtype_arg, default=None,
                       help=f"parameter dtype to write: {', '.join(DTYPE_NAMES)} (default: keep)")
        p.add_argument("--overwrite", action="store_true", help="replace this project's checkpoint in DST")
        if cmd == "orbax-to-hf":
            p.add_argument("--max-shard-size", default="5GB")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "orbax-to-hf":
            _parse_size(args.max_shard_size)
        check_output_dir(args.dst, args.overwrite)  # refuse before loading anything
        if args.cmd == "hf-to-orbax":
            model = load_hf(args.src, dtype=args.dtype)
            out = save_orbax(model, args.dst, overwrite=args.overwrite)
        else:
            model = load_orbax(args.src, dtype=args.dtype)
            out = save_hf(model, args.dst, max_shard_size=args.max_shard_size, overwrite=args.overwrite)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
