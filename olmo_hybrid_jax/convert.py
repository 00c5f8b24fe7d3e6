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

Every shape is checked; one error lists all missing, unexpected and misshapen tensors.

``save_hf(model, path)`` writes ``config.json`` and safetensors in the release layout (sharded with
an index above ``max_shard_size``), which ``transformers``' ``OlmoHybridForCausalLM.from_pretrained``
loads. Files are written under temporary names and renamed, so an interrupted save never leaves a
half-written file under a final name.

CLI::

    python -m olmo_hybrid_jax.convert hf-to-orbax SRC_HF_DIR DST_ORBAX_DIR [--dtype bfloat16]
    python -m olmo_hybrid_jax.convert orbax-to-hf SRC_ORBAX_DIR DST_HF_DIR [--dtype bfloat16]
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


class CheckpointMismatchError(ValueError):
    """The checkpoint's tensors do not match the config (missing, unexpected or misshapen)."""


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


def _plan_load(ckpt: _SafetensorsDir, cfg: OlmoHybridConfig):
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
                    f"fused conv {src} has {shape[0]} channels, config expects 2*{kd}+{vd}={2 * kd + vd}")
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
    for name, srcs in sources.items():
        if name not in expected or len(srcs) != 1:
            continue
        src, sl = srcs[0]
        shape = ckpt.entries[src][1]
        if sl is not None:
            shape = (sl.stop - sl.start,) + shape[1:]
        if tuple(shape) != expected[name][2]:
            bad_shape.append(f"{src}: checkpoint {tuple(shape)} vs expected {expected[name][2]}")
    if missing or unexpected or dup or bad_shape:
        lines = ["checkpoint does not match the config:"]
        for title, items in (("missing", missing), ("unexpected", unexpected),
                             ("given more than once (several naming variants?)", dup), ("misshapen", bad_shape)):
            if items:
                more = " ..." if len(items) > 20 else ""
                lines.append(f"  {title} ({len(items)}): " + ", ".join(items[:20]) + more)
        raise CheckpointMismatchError("\n".join(lines))
    return [(expected[n][0], expected[n][1], sources[n][0]) for n in expected]


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


def load_hf(path: str | os.PathLike, dtype=None, *, compute_dtype=None, progress: bool = True,
            **model_kwargs) -> OlmoHybridForCausalLM:
    """Load an HF OLMo Hybrid checkpoint directory into an ``OlmoHybridForCausalLM``.

    Args:
      path: directory with ``config.json`` and ``model.safetensors`` (or sharded + index).
      dtype: parameter dtype (e.g. ``jnp.float32``); None keeps the checkpoint's own dtype.
      compute_dtype: matmul dtype (None = the parameter dtype).
      model_kwargs: the model's other construction options (``gdn_backend``, ``attention_impl``,
        ``scan_layers``, ...; see ``OlmoHybridForCausalLM``).
    """
    path = Path(path)
    cfg = OlmoHybridConfig.from_hf(path)
    ckpt = _SafetensorsDir(path)
    plan = _plan_load(ckpt, cfg)
    if dtype is None:
        emb_src = plan[0][2][0]
        dtype = SAFETENSORS_DTYPES[ckpt.entries[emb_src][2]]
    dtype = jnp.dtype(dtype)
    pure = _list_layout_target(cfg, dtype)
    for param_path, kind, (src, sl) in tqdm(plan, desc=f"loading {path.name}", disable=not progress, unit="tensor"):
        x = ckpt.read(src)
        if sl is not None:
            x = x[sl]
        x = np.ascontiguousarray(to_nnx_layout(kind, x))
        _set_path(pure, param_path, jnp.asarray(x, dtype=dtype))
        del x
    return from_list_params(cfg, pure, param_dtype=dtype, dtype=compute_dtype, **model_kwargs)


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


def save_hf(model: OlmoHybridForCausalLM, path: str | os.PathLike, *, dtype=None,
            max_shard_size: int | str = "5GB", overwrite: bool = False, progress: bool = True) -> Path:
    """Write ``model`` as an HF checkpoint (config.json + safetensors, release tensor names/layout).

    Args:
      dtype: dtype of the written tensors (None = the parameters' dtype).
      max_shard_size: above this many bytes the weights are split into
        ``model-0000i-of-0000n.safetensors`` files with a ``model.safetensors.index.json``.
      overwrite: replace an existing checkpoint in ``path``; otherwise refuse to touch it.
    """
    from safetensors.numpy import save_file

    path = Path(path)
    if path.exists() and any(path.glob("*.safetensors*")) and not overwrite:
        raise FileExistsError(f"{path} already holds a checkpoint; pass overwrite=True to replace it")
    path.mkdir(parents=True, exist_ok=True)
    limit = _parse_size(max_shard_size)
    total = len(_param_paths(model.config))
    tmpdir = path / ".tmp_save_hf"
    if tmpdir.exists():
        shutil.rmtree(tmpdir)
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
    final_names = (["model.safetensors"] if n == 1
                   else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)])
    # Remove stale files of a previous layout only now that the new one is fully written.
    for old in list(path.glob("model*.safetensors")) + list(path.glob("model.safetensors.index.json")):
        old.unlink()
    for f, final in zip(written, final_names):
        os.replace(f, path / final)
    if n > 1:
        total_size = sum((path / fn).stat().st_size for fn in final_names)
        index = {"metadata": {"total_size": total_size},
                 "weight_map": {k: final_names[v] for k, v in sorted(weight_map.items())}}
        _atomic_write_text(path / "model.safetensors.index.json", json.dumps(index, indent=2))
    cfg_dict = model.config.to_hf()
    pdtype = jnp.dtype(dtype) if dtype is not None else _param_dtype(model)
    cfg_dict["dtype"] = {"bfloat16": "bfloat16", "float32": "float32", "float16": "float16"}.get(pdtype.name, "float32")
    _atomic_write_text(path / "config.json", json.dumps(cfg_dict, indent=2))
    shutil.rmtree(tmpdir, ignore_errors=True)
    return path


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _param_dtype(model) -> jnp.dtype:
    return jnp.dtype(model.model.embed_tokens.embedding[...].dtype)


# ----------------------------------------------------------------------------------------- orbax
def save_orbax(model: OlmoHybridForCausalLM, path: str | os.PathLike, *, dtype=None, overwrite: bool = False) -> Path:
    """Save the parameters with orbax (``path/params``, the list layout whatever ``model``'s) and the HF
    config (``path/config.json``)."""
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    if (path / "params").exists() and not overwrite:
        raise FileExistsError(f"{path}/params exists; pass overwrite=True to replace it")
    path.mkdir(parents=True, exist_ok=True)
    params = list_params(model)
    if dtype is not None:
        params = jax.tree.map(lambda x: x.astype(dtype), params)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path / "params", params, force=overwrite)
        ckptr.wait_until_finished()
    _atomic_write_text(path / "config.json", json.dumps(model.config.to_hf(), indent=2))
    return path


def load_orbax(path: str | os.PathLike, dtype=None, *, compute_dtype=None, **model_kwargs) -> OlmoHybridForCausalLM:
    """Load a model saved by ``save_orbax`` (or ``hf-to-orbax``); arguments as ``load_hf``'s."""
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    if not (path / "config.json").is_file() or not (path / "params").is_dir():
        raise FileNotFoundError(f"{path} is not an orbax model directory (needs config.json and params/)")
    cfg = OlmoHybridConfig.from_hf(path / "config.json")
    with ocp.StandardCheckpointer() as ckptr:
        meta = ckptr.metadata(path / "params")
        tree = getattr(meta, "item_metadata", meta)
        stored = {jnp.dtype(x.dtype) for x in jax.tree.leaves(tree) if hasattr(x, "dtype")}
        pdtype = jnp.dtype(dtype) if dtype is not None else (stored.pop() if len(stored) == 1 else jnp.float32)
        target = _list_layout_target(cfg, pdtype)
        try:
            params = ckptr.restore(path / "params", target)
        except (ValueError, KeyError) as e:
            raise CheckpointMismatchError(f"orbax params in {path} do not match its config.json: {e}") from e
    return from_list_params(cfg, params, param_dtype=pdtype, dtype=compute_dtype, **model_kwargs)


# ----------------------------------------------------------------------------------------- CLI
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m olmo_hybrid_jax.convert", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for cmd, help_ in (("hf-to-orbax", "HF safetensors directory -> orbax model directory"),
                       ("orbax-to-hf", "orbax model directory -> HF safetensors directory")):
        p = sub.add_parser(cmd, help=help_)
        p.add_argument("src")
        p.add_argument("dst")
        p.add_argument("--dtype", default=None, help="parameter dtype to write (default: keep)")
        p.add_argument("--overwrite", action="store_true")
        if cmd == "orbax-to-hf":
            p.add_argument("--max-shard-size", default="5GB")
    args = ap.parse_args(argv)
    dtype = jnp.dtype(args.dtype) if args.dtype else None
    try:
        if args.cmd == "hf-to-orbax":
            model = load_hf(args.src, dtype=dtype)
            out = save_orbax(model, args.dst, overwrite=args.overwrite)
        else:
            model = load_orbax(args.src, dtype=dtype)
            out = save_hf(model, args.dst, max_shard_size=args.max_shard_size, overwrite=args.overwrite)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
