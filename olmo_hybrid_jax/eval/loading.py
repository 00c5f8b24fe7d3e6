"""What an evaluation needs before it scores: the model (HF, orbax or a training run) and its tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from olmo_hybrid_jax.convert import canonical_dtype


def checkpoint_kind(path: str | Path) -> str:
    """"run", "orbax" or "hf" for a directory; FileNotFoundError (one line) for anything else."""
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"no checkpoint directory at {p}")
    if (p / "config.yaml").is_file():
        return "run"
    if (p / "params").is_dir() and (p / "config.json").is_file():
        return "orbax"
    if any(p.glob("*.safetensors")) or (p / "model.safetensors.index.json").is_file():
        return "hf"
    if (p / "model_and_optim").is_dir():  # OLMo-core's own save format: torch.distributed.checkpoint shards
        raise FileNotFoundError(f"{p} is an OLMo-core distributed checkpoint (model_and_optim/): convert it to HF "
                                "safetensors first (OLMo-core's HF conversion script)")
    raise FileNotFoundError(f"{p} holds no HF checkpoint (*.safetensors), orbax model (params/) "
                            "or training run (config.yaml)")


def checkpoint_config(path: str | Path):
    """The ``OlmoHybridConfig`` of the checkpoint in ``path`` without reading any weights."""
    from olmo_hybrid_jax.config import OlmoHybridConfig

    if checkpoint_kind(path) != "run":
        return OlmoHybridConfig.from_hf(Path(path) / "config.json")
    from olmo_hybrid_jax.train.config import load_config
    from olmo_hybrid_jax.train.trainer import model_config

    return model_config(load_config(Path(path) / "config.yaml"))


def load_model(path: str | Path, *, step: int | None = None, dtype=None, **model_kwargs):
    """The ``OlmoHybridForCausalLM`` in ``path``: HF safetensors, orbax, or a training run (latest or ``step``).

    ``dtype`` is the parameter dtype: None keeps the stored dtypes, "auto" casts to config.json's dtype
    (transformers' and lm-eval's hf default; a run: its fp32 master weights), else a run's fp32 master
    weights are cast to it too. ``model_kwargs`` are construction options (``gdn_shard_axes``, ...).
    """
    from olmo_hybrid_jax.generate import load_checkpoint

    kind = checkpoint_kind(path)
    auto = isinstance(dtype, str) and dtype == "auto"
    dtype = None if auto else canonical_dtype(dtype)
    if kind != "run":
        if step is not None:
            raise ValueError(f"step={step} needs a training run directory; {path} is an {kind} checkpoint")
        return load_checkpoint(path, dtype="auto" if auto else dtype, **model_kwargs)
    from olmo_hybrid_jax.train.export import load_run_model

    model = load_run_model(path, step=step, **({"param_dtype": dtype} if dtype is not None else {}), **model_kwargs)
    if dtype is not None:  # from_list_params keeps the restored arrays' dtype
        graphdef, state = nnx.split(model)
        state = jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, state)
        model = nnx.merge(graphdef, state)
    return model


def eval_mesh(mesh: str | None = None, fsdp: int | None = None):
    """(Mesh, rules) over this host's devices for ``mesh`` = "fsdp" (parameters sharded over every device),
    "data" (replicated), "auto" ("fsdp" on several devices, else none) or ``fsdp=N`` (N shards, the rest
    replicas); (None, None) for none. Rows are split over the data and fsdp axes (the training "batch" rule)."""
    from olmo_hybrid_jax.train import sharding as shd

    mesh = None if mesh in (None, "", "none") else str(mesh)
    if mesh not in (None, "auto", "fsdp", "data"):
        raise ValueError(f"mesh={mesh!r}: expected none, auto, fsdp or data")
    devices = jax.local_devices()
    if fsdp is not None:
        if mesh not in (None, "fsdp"):
            raise ValueError(f"fsdp={fsdp} goes with mesh=fsdp (or no mesh), not mesh={mesh}")
        sizes = {"data": -1, "fsdp": int(fsdp)}
    elif mesh == "fsdp" or (mesh == "auto" and len(devices) > 1):
        sizes = {"data": 1, "fsdp": -1}
    elif mesh == "data":
        sizes = {"data": -1, "fsdp": 1}
    else:
        return None, None
    return shd.make_mesh(**sizes, devices=devices), shd.merged_rules()


def mesh_model_kwargs(mesh, rules) -> dict:
    """The GDN op's per-shard options on ``mesh`` (rows over the "batch" axes): XLA cannot partition the GPU
    kernel's custom call and would gather the whole batch onto every device otherwise."""
    from olmo_hybrid_jax.kernels import ShardAxes
    from olmo_hybrid_jax.train.sharding import rule_axes

    if mesh is None or mesh.size == 1:
        return {}
    return {"gdn_shard_axes": ShardAxes(batch=rule_axes(rules, "batch")), "gdn_mesh": mesh}


def batch_sharding(mesh, rules, batch_size: int):
    """Where a [batch_size, tokens] scoring input goes on ``mesh``: its rows split over the "batch" axes
    (None without a mesh); ValueError when ``batch_size`` does not split (the GDN op's shards need it)."""
    import math

    from olmo_hybrid_jax.train.sharding import activation_sharding, rule_axes

    if mesh is None:
        return None
    shards = math.prod(mesh.shape[a] for a in rule_axes(rules, "batch"))
    if batch_size % shards:
        raise ValueError(f"batch_size={batch_size} must be a multiple of the {shards} devices the rows are split over")
    return activation_sharding(mesh, rules, ("batch", None))


def shard_model(model, mesh, rules):
    """``model`` with its parameters placed by the training rules (``train.sharding.param_shardings``)."""
    from olmo_hybrid_jax.train.sharding import param_shardings

    graphdef, state = nnx.split(model)
    pure = nnx.to_pure_dict(state)  # the rules match paths without nnx's trailing "value"
    nnx.replace_by_pure_dict(state, jax.device_put(pure, param_shardings(pure, mesh, rules)))
    return nnx.merge(graphdef, state)


def _token_str(v) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or an AddedToken dict."""
    if isinstance(v, dict):
        return v.get("content")
    return v if isinstance(v, str) else None


class TextTokenizer:
    """The slice of a transformers fast tokenizer that lm-eval's HF backend uses, on HF ``tokenizers``.

    ``tokenizer.json`` does the encoding and decoding (its post-processor is what
    ``add_special_tokens=True`` adds, as in transformers); ``tokenizer_config.json`` and
    ``special_tokens_map.json`` beside it name the BOS/EOS/PAD tokens and ``model_max_length``.
    Without ``tokenizer.json``: byte level (id = UTF-8 byte; vocab >= 256), EOS from the model config.
    """

    def __init__(self, path: str | Path | None, *, vocab_size: int, eos_token_id=None):
        p = None if path is None else Path(path)
        if p is not None and p.is_dir():
            p = p / "tokenizer.json"
        self.tok = None
        self.model_max_length = None
        self.clean_up_spaces = False
        names: dict[str, str | None] = {}
        if p is not None and p.is_file():
            from tokenizers import Tokenizer

            self.tok = Tokenizer.from_file(str(p))
            for extra in ("special_tokens_map.json", "tokenizer_config.json"):  # the config wins, as in transformers
                f = p.parent / extra
                d = json.loads(f.read_text()) if f.is_file() else {}
                for key in ("bos_token", "eos_token", "pad_token"):
                    if key in d:
                        names[key] = _token_str(d[key])
                if extra == "tokenizer_config.json":
                    self.model_max_length = d.get("model_max_length")
                    self.clean_up_spaces = bool(d.get("clean_up_tokenization_spaces", False))
        elif p is not None:
            raise FileNotFoundError(f"no tokenizer.json at {p}")
        elif vocab_size < 256:
            raise ValueError(f"no tokenizer given and vocab_size={vocab_size} < 256: cannot use bytes")
        eos = eos_token_id[0] if isinstance(eos_token_id, (tuple, list)) else eos_token_id
        self.bos_token = names.get("bos_token")
        self.bos_token_id = self._id(self.bos_token)
        self.eos_token_id = self._id(names.get("eos_token")) if names.get("eos_token") else eos
        self.pad_token_id = self._id(names.get("pad_token"))
        self.vocab_size = self.tok.get_vocab_size() if self.tok is not None else 256

    def _id(self, token: str | None) -> int | None:
        if token is None or self.tok is None:
            return None
        return self.tok.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if self.tok is None:
            return list(text.encode("utf-8"))
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        ids = [int(i) for i in np.atleast_1d(np.asarray(ids))]
        if self.tok is None:
            skip = {self.eos_token_id} if skip_special_tokens else set()
            return bytes(i for i in ids if i < 256 and i not in skip).decode("utf-8", errors="replace")
        text = self.tok.decode(ids, skip_special_tokens=skip_special_tokens)
        return _clean_up_tokenization(text) if self.clean_up_spaces else text


    def text_bytes(self, ids) -> int:
        """UTF-8 bytes of the text of ``ids`` (special tokens have none; byte level: one per byte id)."""
        if self.tok is None:
            return sum(1 for i in np.asarray(ids).tolist() if i < 256 and i != self.eos_token_id)
        return len(self.decode(ids, skip_special_tokens=True).encode("utf-8"))


def _clean_up_tokenization(s: str) -> str:
    """transformers' ``clean_up_tokenization`` (applied when tokenizer_config.json asks for it)."""
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
                 (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        s = s.replace(a, b)
    return s
