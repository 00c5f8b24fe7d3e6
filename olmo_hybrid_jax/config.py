"""Model configuration: a frozen mirror of transformers' ``OlmoHybridConfig``.

Every field of the HF config is here with the same name and default, so ``from_hf``/``to_hf`` are
lossless for the fields that define the model. HF's ``None`` defaults are resolved at construction
(as HF's ``__post_init__`` does), so a built config always carries concrete head counts and dims.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

LINEAR = "linear_attention"
FULL = "full_attention"

#: Preset model configs (HF config.json format): the repo's configs/models/, installed as the package
#: data olmo_hybrid_jax.configs/models (a regular install unpacks it, so this is a real directory).
PRESET_DIR = Path(str(resources.files("olmo_hybrid_jax.configs") / "models"))

_ACTIVATIONS = ("silu", "swish", "gelu", "gelu_new", "gelu_pytorch_tanh", "relu")


@dataclasses.dataclass(frozen=True)
class OlmoHybridConfig:
    """Architecture of an OLMo Hybrid model (3 Gated DeltaNet layers : 1 attention layer by default).

    Field names and defaults follow ``transformers.OlmoHybridConfig``; the defaults are the released
    7B's. ``rope_parameters=None`` (or ``rope_theta`` None) means no rotary embedding (NoPE), as in
    the released checkpoints.

    Note: transformers >= 5.24 turns a ``rope_parameters`` that is null or absent into default RoPE
    with theta 10000 when it reads a config.json. ``to_hf`` therefore spells NoPE explicitly as
    ``{"rope_type": "default", "rope_theta": null}``, which every transformers version reads as NoPE.
    """

    vocab_size: int = 100352
    hidden_size: int = 3840
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 30
    num_key_value_heads: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 65536
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    pad_token_id: int | None = 100277
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = 100257
    tie_word_embeddings: bool = False
    rope_parameters: Mapping[str, Any] | None = None
    attention_bias: bool = False
    attention_dropout: float = 0.0
    layer_types: tuple[str, ...] | None = None
    linear_num_key_heads: int | None = None
    linear_num_value_heads: int | None = None
    linear_key_head_dim: int | None = None
    linear_value_head_dim: int | None = None
    linear_a_log_min: float = 0.0
    linear_a_log_max: float = 16.0
    linear_dt_min: float = 0.001
    linear_dt_max: float = 0.1
    linear_dt_init_floor: float = 1e-4
    linear_conv_kernel_dim: int = 4
    linear_allow_neg_eigval: bool = True

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731  (frozen dataclass)
        n = int(self.num_hidden_layers)
        if self.layer_types is None:
            types = [FULL if i % 4 == 3 else LINEAR for i in range(n)]
            if FULL not in types and n > 0:
                types[-1] = FULL
            set_("layer_types", tuple(types))
        else:
            set_("layer_types", tuple(self.layer_types))
        if self.linear_num_key_heads is None:
            set_("linear_num_key_heads", self.num_attention_heads)
        if self.linear_num_value_heads is None:
            set_("linear_num_value_heads", self.num_attention_heads)
        if self.linear_key_head_dim is None:
            set_("linear_key_head_dim", int(0.75 * self.hidden_size / self.linear_num_key_heads))
        if self.linear_value_head_dim is None:
            set_("linear_value_head_dim", 2 * self.linear_key_head_dim)
        if self.num_key_value_heads is None:
            set_("num_key_value_heads", self.num_attention_heads)
        if isinstance(self.eos_token_id, list):
            set_("eos_token_id", tuple(self.eos_token_id))
        if self.rope_parameters is not None:
            # One canonical spelling of NoPE: a rope dict without a theta is None.
            rp = dict(self.rope_parameters)
            set_("rope_parameters", rp if rp.get("rope_theta") is not None else None)
        self.validate()

    # ------------------------------------------------------------------ derived quantities
    @property
    def head_dim(self) -> int:
        """Attention head dim; HF derives it as hidden_size // num_attention_heads."""
        return self.hidden_size // self.num_attention_heads

    @property
    def linear_key_dim(self) -> int:
        return self.linear_num_key_heads * self.linear_key_head_dim

    @property
    def linear_value_dim(self) -> int:
        return self.linear_num_value_heads * self.linear_value_head_dim

    @property
    def rope_theta(self) -> float | None:
        """RoPE base, or None for NoPE (released checkpoints)."""
        if not self.rope_parameters:
            return None
        return self.rope_parameters.get("rope_theta")

    @property
    def num_linear_layers(self) -> int:
        return sum(t == LINEAR for t in self.layer_types)

    @property
    def num_full_layers(self) -> int:
        return sum(t == FULL for t in self.layer_types)

    def validate(self) -> None:
        """Raise ValueError naming the first inconsistency."""
        def req(cond, msg):
            if not cond:
                raise ValueError(f"OlmoHybridConfig: {msg}")

        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "linear_num_key_heads",
                     "linear_num_value_heads", "linear_key_head_dim", "linear_value_head_dim",
                     "linear_conv_kernel_dim"):
            v = getattr(self, name)
            req(isinstance(v, int) and not isinstance(v, bool) and v > 0, f"{name} must be a positive int, got {v!r}")
        req(len(self.layer_types) == self.num_hidden_layers,
            f"layer_types has {len(self.layer_types)} entries but num_hidden_layers={self.num_hidden_layers}")
        bad = sorted({t for t in self.layer_types if t not in (LINEAR, FULL)})
        req(not bad, f"unknown layer_types {bad}; expected {LINEAR!r} or {FULL!r}")
        req(LINEAR in self.layer_types, "needs at least one 'linear_attention' layer")
        req(FULL in self.layer_types, "needs at least one 'full_attention' layer")
        req(self.hidden_size % self.num_attention_heads == 0,
            f"hidden_size={self.hidden_size} is not divisible by num_attention_heads={self.num_attention_heads}")
        req(self.num_attention_heads % self.num_key_value_heads == 0,
            f"num_attention_heads={self.num_attention_heads} is not a multiple of "
            f"num_key_value_heads={self.num_key_value_heads}")
        req(self.linear_num_value_heads % self.linear_num_key_heads == 0,
            f"linear_num_value_heads={self.linear_num_value_heads} is not a multiple of "
            f"linear_num_key_heads={self.linear_num_key_heads}")
        req(self.hidden_act in _ACTIVATIONS, f"hidden_act={self.hidden_act!r} is not one of {_ACTIVATIONS}")
        req(self.rms_norm_eps > 0, "rms_norm_eps must be > 0")
        if self.rope_theta is not None:
            rtype = self.rope_parameters.get("rope_type", self.rope_parameters.get("type", "default"))
            req(rtype in (None, "default"),
                f"rope_type={rtype!r} is not supported (only 'default' RoPE or none)")
            req(self.head_dim % 2 == 0, f"RoPE needs an even head_dim, got {self.head_dim}")

    # ------------------------------------------------------------------ HF interop
    @classmethod
    def from_hf(cls, path_or_dict: str | os.PathLike | Mapping[str, Any]) -> OlmoHybridConfig:
        """Build from an HF ``config.json`` (a dict, a file path, or a checkpoint directory)."""
        if isinstance(path_or_dict, Mapping):
            d = dict(path_or_dict)
            where = "config dict"
        else:
            p = Path(path_or_dict)
            if p.is_dir():
                p = p / "config.json"
            if not p.is_file():
                raise FileNotFoundError(f"no HF config at {p}")
            try:
                d = json.loads(p.read_text())
            except json.JSONDecodeError as e:
                raise ValueError(f"{p} is not valid JSON: {e}") from e
            where = str(p)
        mt = d.get("model_type")
        if mt is not None and mt not in ("olmo_hybrid", "olmo3_5_hybrid"):
            raise ValueError(f"{where}: model_type={mt!r} is not an OLMo Hybrid config")
        if d.get("linear_use_gate") is False:
            raise ValueError(f"{where}: linear_use_gate=False is not supported (released models use the gate)")
        if "rope_parameters" not in d and d.get("rope_theta") is not None:  # older HF spelling
            d["rope_parameters"] = {"rope_type": "default", "rope_theta": d["rope_theta"]}
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in fields}  # HF bookkeeping keys are ignored
        if d.get("head_dim") is not None and d["hidden_size"] // d["num_attention_heads"] != d["head_dim"]:
            raise ValueError(f"{where}: head_dim={d['head_dim']} != hidden_size // num_attention_heads; "
                             "OLMo Hybrid derives the attention head dim")
        return cls(**kwargs)

    def to_hf(self) -> dict[str, Any]:
        """The HF ``config.json`` dict that transformers' OlmoHybridConfig reads back to this config."""
        d = dataclasses.asdict(self)
        d["layer_types"] = list(self.layer_types)
        if self.rope_theta is None:  # explicit NoPE: transformers reads a bare null as theta=10000 RoPE
            d["rope_parameters"] = {"rope_type": "default", "rope_theta": None}
        if isinstance(self.eos_token_id, tuple):
            d["eos_token_id"] = list(self.eos_token_id)
        return {"architectures": ["OlmoHybridForCausalLM"], "model_type": "olmo_hybrid", **d}

    def replace(self, **changes) -> OlmoHybridConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def preset(cls, name: str) -> OlmoHybridConfig:
        """A named preset from configs/models/ (e.g. "olmo_hybrid_7b", "olmo_hybrid_1b", "tiny")."""
        p = PRESET_DIR / f"{name}.json"
        if not p.is_file():
            have = sorted(q.stem for q in PRESET_DIR.glob("*.json"))
            raise ValueError(f"unknown preset {name!r}; available: {have}")
        return cls.from_hf(p)
