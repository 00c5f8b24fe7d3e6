"""Training configuration: frozen dataclasses loaded from YAML, with ``key=value`` overrides.

One base file (``configs/base.yaml``) holds every default; overlays name it with ``base: base.yaml``
and change a few keys. Precedence, lowest first: dataclass defaults < base YAML < overlay YAML(s) <
command-line ``section.key=value`` overrides (values are parsed as YAML, so ``optim.lr=1e-3``,
``data.paths=[a.npy,b.npy]`` and ``model.overrides.num_hidden_layers=8`` all work). A key that no
dataclass declares is an error that names the key, the file it came from and the nearest valid keys.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

#: The YAML configs: the repo's configs/, installed as the package data olmo_hybrid_jax.configs.
CONFIG_DIR = Path(str(resources.files("olmo_hybrid_jax.configs")))


class ConfigError(ValueError):
    """A config file or override is malformed, names an unknown key, or has a value of the wrong type."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    preset: str = "tiny"                 # configs/models/<preset>.json, or a path to an HF config.json
    overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # HF config fields to change
    param_dtype: str = "float32"         # master weights
    compute_dtype: str = "bfloat16"      # matmuls / activations
    gdn_backend: str = "auto"            # kernels.gated_delta_rule backend
    gdn_kernel: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # kernels.PallasConfig fields; {} = tuned
    shard_gdn: bool = True               # run the GDN kernel per shard (batch/heads over the mesh) on >1 device
    attention_impl: str = "auto"         # auto | xla | cudnn
    scan_layers: bool = True             # scan over periodic (3 GDN + 1 attention) blocks
    remat: str = "full"                  # none | full | dots | dots_no_batch
    init_from: str | None = None         # hf:PATH | orbax:PATH | run:RUN_DIR (architecture then comes from PATH)
    lora: Mapping[str, Any] | None = None  # None: full fine-tuning; {rank, alpha, targets, adapter_dtype}: LoRA


@dataclasses.dataclass(frozen=True)
class DataConfig:
    paths: tuple[str, ...] = ("data/pydoc_topics.u8",)  # token files (relative: cwd, then repo root)
    format: str = "tokens"               # tokens (token files) | chat (post.chat prepare folders: loss on assistant)
    token_dtype: str = "auto"            # auto (.npy header or .u8/.u16/.u32 suffix) | uint8 | uint16 | uint32
    seq_len: int = 256
    global_batch_size: int = 16          # rows per step, across all devices and hosts
    eos_token_id: int | None = None      # None: the model config's eos_token_id
    document_aware: bool = False         # pass segment_ids so state/conv/attention restart per document
    shuffle: bool = True
    seed: int = 0
    num_threads: int = 2                 # grain read threads
    prefetch: int = 4                    # grain prefetch buffer (batches)


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    lr: float = 3e-4
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    no_decay: tuple[str, ...] = ("embeddings",)  # groups without decay: embeddings, norms, gdn_gates, biases
    max_grad_norm: float = 1.0
    warmup_steps: int = 2000
    schedule: str = "cosine"             # cosine | linear: the decay after the linear warmup
    decay_steps: int = 100_000           # schedule length (incl. warmup); independent of --steps on purpose
    alpha_f: float = 0.1                 # final lr = alpha_f * lr
    z_loss: float = 1e-5
    skip_sigma: float = 6.0              # skip a step whose loss or grad norm is > sigma std above the mean
    skip_window: int = 128               # ... of the last skip_window steps (0 disables the guard)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    data: int = 1                        # replicas (HSDP: params replicated over this axis)
    fsdp: int = -1                       # param/optimizer shards; -1 = all remaining devices
    tensor: int = 1                      # tensor parallel
    context: int = 1                     # context parallel: each row's sequence split over this many devices
    rules: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # logical axis -> mesh axes overrides


@dataclasses.dataclass(frozen=True)
class TrainLoopConfig:
    steps: int = 1000                    # total steps to reach (--steps)
    seed: int = 34521                    # parameter init / rng
    loss_chunk: int = 1024               # sequence positions per cross-entropy chunk
    grad_accum_steps: int = 1            # microbatches per optimizer step (data.global_batch_size split)
    peak_flops_per_device: float | None = None  # override of the device-kind table (MFU)
    progress: bool = True                # tqdm progress bar
    loggers: tuple[str, ...] = ("jsonl",)  # jsonl (OUT/metrics.jsonl) | tensorboard (OUT/tensorboard/) | wandb
    wandb_project: str = "olmo-hybrid-jax"
    wandb_name: str | None = None        # None: the run folder's name
    wandb_mode: str | None = None        # online | offline | disabled; None: $WANDB_MODE, else online
    export_hf: bool = False              # at the last step write OUT/hf (HF checkpoint + the chat data's tokenizer)


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    every: int = 0                       # evaluate every N steps (0: never)
    paths: tuple[str, ...] = ()          # held-out token files (data.paths' formats, data.token_dtype)
    batches: int | None = 8              # batches of one training microbatch each; None: every whole one in paths


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    every: int = 1000                    # save every N steps (and always at the last step)
    keep: int = 3                        # keep the last k
    async_save: bool = True


@dataclasses.dataclass(frozen=True)
class Config:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    train: TrainLoopConfig = dataclasses.field(default_factory=TrainLoopConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        return _to_plain(dataclasses.asdict(self))

    def replace(self, **sections) -> Config:
        return dataclasses.replace(self, **sections)


# validated downstream
_FREE_MAPPINGS = {("model", "overrides"), ("model", "gdn_kernel"), ("model", "lora"), ("mesh", "rules")}


def _to_plain(x):
    if isinstance(x, Mapping):
        return {k: _to_plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_to_plain(v) for v in x]
    return x


def _suggest(key: str, choices) -> str:
    near = difflib.get_close_matches(key, list(choices), n=3, cutoff=0.5)
    return f" (did you mean {', '.join(near)}?)" if near else f" (valid: {', '.join(sorted(choices))})"


def _coerce(value, tp, where: str):
    """Check/convert a YAML value to the declared field type; raise ConfigError naming ``where``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where} must be true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where} must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads "3e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where} must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where} must be a string, got {value!r}")
    if origin is tuple:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        (elem,) = typing.get_args(tp)[:1]
        return tuple(_coerce(v, elem, f"{where}[{i}]") for i, v in enumerate(value))
    if origin in (Mapping, dict) or tp in (Mapping, dict):
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        return dict(value)
    return value


def _merge(dst: dict, src: Mapping, source: str, prefix: str = "") -> None:
    """Deep-merge ``src`` into ``dst`` (both nested dicts), refusing keys ``dst`` doesn't have."""
    for k, v in src.items():
        key = f"{prefix}{k}"
        if k not in dst:
            raise ConfigError(f"{source}: unknown config key {key!r}{_suggest(str(k), dst.keys())}")
        path = tuple(key.split("."))
        if path in _FREE_MAPPINGS:
            if v is not None and not isinstance(v, Mapping):
                raise ConfigError(f"{source}: {key} must be a mapping, got {v!r}")
            # model.lora=null switches LoRA off; otherwise keys merge into what is there
            dst[k] = None if v is None and path == ("model", "lora") else {**(dst[k] or {}), **(v or {})}
        elif isinstance(dst[k], dict):
            if not isinstance(v, Mapping):
                raise ConfigError(f"{source}: {key} is a section; give it a mapping, got {v!r}")
            _merge(dst[k], v, source, key + ".")
        else:
            dst[k] = v


def _read_yaml(path: Path, seen: tuple = ()) -> list[tuple[str, dict]]:
    """[(source name, mapping)] from the root base down to ``path``, following ``base:`` links."""
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"config base cycle: {' -> '.join(map(str, seen + (path,)))}")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from e
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    doc = dict(doc)
    base = doc.pop("base", None)
    chain = []
    if base is not None:
        chain = _read_yaml((path.parent / base), seen + (path,))
    return chain + [(str(path), doc)]


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not key=value (e.g. optim.lr=1e-3)")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: cannot parse value: {e}") from e
    return key.strip().split("."), value


def _build(cls, d: Mapping, prefix: str):
    kwargs = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        v = d[f.name]
        where = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):
            kwargs[f.name] = _build(hints[f.name], v, where + ".")
        else:
            kwargs[f.name] = _coerce(v, hints[f.name], where)
    return cls(**kwargs)


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Config from a YAML file (following ``base:``) plus ``key=value`` overrides."""
    tree = Config().to_dict()
    if path is not None:
        p = Path(path)
        if not p.is_file() and not p.is_absolute() and p.parent in (Path("."), Path("configs")):
            # `--config tiny.yaml` and `--config configs/tiny.yaml` find the shipped configs/tiny.yaml from any cwd
            if not (CONFIG_DIR / p.name).is_file():
                have = sorted(q.name for q in CONFIG_DIR.glob("*.yaml"))
                raise ConfigError(f"config file not found: {path} (nor in {CONFIG_DIR}: {have})")
            p = CONFIG_DIR / p.name
        for source, doc in _read_yaml(p):
            _merge(tree, doc, source)
    for text in overrides:
        keys, value = parse_override(text)
        nested: Any = value
        for k in reversed(keys):
            nested = {k: nested}
        _merge(tree, nested, f"override {text!r}")
    cfg = _build(Config, tree, "")
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    def req(cond, msg):
        if not cond:
            raise ConfigError(msg)

    from olmo_hybrid_jax.model import REMAT_POLICIES
    from olmo_hybrid_jax.train.optim import NO_DECAY_GROUPS, SCHEDULES

    req(cfg.model.remat in REMAT_POLICIES, f"model.remat={cfg.model.remat!r}; choose from {sorted(REMAT_POLICIES)}")
    gdn_kernel_config(cfg.model)
    for name in ("param_dtype", "compute_dtype"):
        v = getattr(cfg.model, name)
        req(v in ("float32", "bfloat16", "float16"), f"model.{name}={v!r}; choose float32, bfloat16 or float16")
    req(cfg.model.attention_impl in ("auto", "xla", "cudnn"), f"model.attention_impl={cfg.model.attention_impl!r}")
    if cfg.model.init_from is not None:
        req(cfg.model.init_from.split(":", 1)[0] in ("hf", "orbax", "run") and ":" in cfg.model.init_from,
            f"model.init_from={cfg.model.init_from!r} must be 'hf:PATH', 'orbax:PATH' or 'run:RUN_DIR'")
    lora_config(cfg.model)
    req(cfg.model.lora is None or cfg.model.init_from is not None,
        "model.lora needs model.init_from (adapters on randomly initialised weights train a random model)")
    req(cfg.data.format in ("tokens", "chat"),
        f"data.format={cfg.data.format!r}; choose tokens (token files) or chat (post.chat prepare folders)")
    req(cfg.data.token_dtype in ("auto", "uint8", "uint16", "uint32", "int32"),
        f"data.token_dtype={cfg.data.token_dtype!r}; choose auto, uint8, uint16, uint32 or int32")
    req(len(cfg.data.paths) > 0, "data.paths is empty")
    req(cfg.data.seq_len >= 2, f"data.seq_len must be >= 2, got {cfg.data.seq_len}")
    req(cfg.data.global_batch_size >= 1, f"data.global_batch_size must be >= 1, got {cfg.data.global_batch_size}")
    bad = [g for g in cfg.optim.no_decay if g not in NO_DECAY_GROUPS]
    req(not bad, f"optim.no_decay has unknown groups {bad}; choose from {sorted(NO_DECAY_GROUPS)}")
    req(cfg.optim.warmup_steps >= 0 and cfg.optim.decay_steps > cfg.optim.warmup_steps,
        f"need 0 <= optim.warmup_steps < optim.decay_steps, got {cfg.optim.warmup_steps}, {cfg.optim.decay_steps}")
    req(cfg.optim.skip_window >= 0, "optim.skip_window must be >= 0")
    req(cfg.optim.schedule in SCHEDULES, f"optim.schedule={cfg.optim.schedule!r}; choose from {sorted(SCHEDULES)}")
    o = cfg.optim
    # NaN fails every comparison, so each check below also refuses `.nan`
    req(math.isfinite(o.lr) and o.lr > 0, f"optim.lr must be a finite number > 0, got {o.lr}")
    for name in ("b1", "b2"):
        v = getattr(o, name)
        req(0 <= v < 1, f"optim.{name} must be in [0, 1), got {v}")
    req(o.eps > 0, f"optim.eps must be > 0, got {o.eps}")
    req(o.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {o.weight_decay}")
    req(o.max_grad_norm >= 0, f"optim.max_grad_norm must be >= 0 (0 disables clipping), got {o.max_grad_norm}")
    req(0 <= o.alpha_f <= 1, f"optim.alpha_f must be in [0, 1] (final lr = alpha_f * lr), got {o.alpha_f}")
    req(o.z_loss >= 0, f"optim.z_loss must be >= 0, got {o.z_loss}")
    req(o.skip_sigma > 0, f"optim.skip_sigma must be > 0, got {o.skip_sigma}")
    d = cfg.data
    req(d.eos_token_id is None or d.eos_token_id >= 0, f"data.eos_token_id must be >= 0, got {d.eos_token_id}")
    req(d.num_threads >= 0, f"data.num_threads must be >= 0, got {d.num_threads}")
    req(d.seed >= 0, f"data.seed must be >= 0, got {d.seed}")
    req(d.prefetch >= 0, f"data.prefetch must be >= 0, got {d.prefetch}")
    pf = cfg.train.peak_flops_per_device
    req(pf is None or (math.isfinite(pf) and pf > 0), f"train.peak_flops_per_device must be > 0, got {pf}")
    for ax in ("data", "fsdp", "tensor"):
        v = getattr(cfg.mesh, ax)
        req(v == -1 or v >= 1, f"mesh.{ax} must be >= 1 or -1, got {v}")
    req(sum(getattr(cfg.mesh, ax) == -1 for ax in ("data", "fsdp", "tensor")) <= 1,
        "at most one of mesh.data/fsdp/tensor may be -1")
    cp = cfg.mesh.context
    req(cp >= 1, f"mesh.context must be >= 1, got {cp}")
    req(cfg.data.seq_len % cp == 0,
        f"data.seq_len={cfg.data.seq_len} is not divisible by mesh.context={cp} "
        "(context parallelism gives each of the mesh.context devices an equal slice of every row)")
    req(cfg.train.steps >= 0, "train.steps must be >= 0")
    req(cfg.train.loss_chunk >= 1, "train.loss_chunk must be >= 1")
    k = cfg.train.grad_accum_steps
    req(k >= 1, f"train.grad_accum_steps must be >= 1, got {k}")
    req(cfg.data.global_batch_size % k == 0,
        f"data.global_batch_size={cfg.data.global_batch_size} is not divisible by train.grad_accum_steps={k} "
        "(each optimizer step splits the global batch into that many equal microbatches)")
    req(cfg.checkpoint.every >= 1 and cfg.checkpoint.keep >= 1, "checkpoint.every and checkpoint.keep must be >= 1")
    from olmo_hybrid_jax.train.metrics import LOGGERS

    for name in cfg.train.loggers:
        req(name in LOGGERS, f"train.loggers: unknown logger {name!r}{_suggest(name, LOGGERS)}")
    lg = list(cfg.train.loggers)
    req(len(set(lg)) == len(lg), f"train.loggers names a logger twice: {lg}")
    wm = cfg.train.wandb_mode
    req(wm in (None, "online", "offline", "disabled"), f"train.wandb_mode={wm!r}; choose online, offline or disabled")
    e = cfg.eval
    req(e.every >= 0, f"eval.every must be >= 0 (0: no evaluation), got {e.every}")
    req(e.every == 0 or len(e.paths) > 0,
        f"eval.every={e.every} but eval.paths is empty; name the held-out token files")
    req(e.batches is None or e.batches >= 1, f"eval.batches must be >= 1 (or null: all of eval.paths), got {e.batches}")


def gdn_kernel_config(m: ModelConfig):
    """``model.gdn_kernel`` as a ``kernels.PallasConfig`` (None when empty: the kernels' tuned table); each key
    must be a PallasConfig field and each value of that field's type."""
    if not m.gdn_kernel:
        return None
    from olmo_hybrid_jax.kernels import PallasConfig

    hints = typing.get_type_hints(PallasConfig)
    kwargs = {}
    for k, v in m.gdn_kernel.items():
        if k not in hints:
            raise ConfigError(f"model.gdn_kernel: unknown PallasConfig field {k!r}{_suggest(str(k), hints)}")
        kwargs[k] = _coerce(v, hints[k], f"model.gdn_kernel.{k}")
    try:
        return PallasConfig(**kwargs)
    except ValueError as e:
        raise ConfigError(f"model.gdn_kernel: {e}") from e


LORA_KEYS = ("rank", "alpha", "targets", "adapter_dtype")


def lora_config(m: ModelConfig):
    """``model.lora`` as a ``post.lora.LoraConfig`` (None: LoRA off); rank and alpha are required."""
    if m.lora is None:
        return None
    import jax.numpy as jnp

    from olmo_hybrid_jax.post.lora import LoraConfig

    d = dict(m.lora)
    bad = sorted(set(d) - set(LORA_KEYS))
    if bad:
        raise ConfigError(f"model.lora: unknown key {bad[0]!r}{_suggest(str(bad[0]), LORA_KEYS)}")
    missing = [k for k in ("rank", "alpha") if k not in d]
    if missing:
        raise ConfigError(f"model.lora needs {' and '.join(missing)} (e.g. {{rank: 16, alpha: 32, targets: [all]}})")
    rank = _coerce(d["rank"], int, "model.lora.rank")
    alpha = _coerce(d["alpha"], float, "model.lora.alpha")
    targets = _coerce(d.get("targets", ["all"]), tuple[str, ...], "model.lora.targets")
    dt = d.get("adapter_dtype", "float32")
    dtypes = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
    if dt not in dtypes:
        raise ConfigError(f"model.lora.adapter_dtype={dt!r}; choose float32 or bfloat16")
    if not (math.isfinite(alpha) and alpha > 0):
        raise ConfigError(f"model.lora.alpha must be a finite number > 0, got {alpha}")
    try:
        return LoraConfig(rank=rank, alpha=alpha, targets=targets, adapter_dtype=dtypes[dt])
    except ValueError as e:
        raise ConfigError(f"model.lora: {e}") from None


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
