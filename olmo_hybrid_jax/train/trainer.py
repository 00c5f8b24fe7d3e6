"""The training loop: build mesh, model, optimizer and data; jit the step; log; checkpoint; resume.

State (one pytree, sharded by the rules table, donated to the step):
``{"step": int32, "params": fp32 master weights (pure dict), "opt_state": SkipStepState, "rng": uint32[2]}``.

Step (``jax.jit`` with explicit in/out shardings): cast matrices to the compute dtype (so FSDP
all-gathers move bf16), forward with per-layer remat (scanned over 3:1 blocks where the pattern
repeats), chunked cross-entropy + z-loss, gradients, skip-step AdamW. Metrics of step s are fetched
after step s+1 is dispatched, so logging never idles the device.

Gradient accumulation (``train.grad_accum_steps`` = N > 1): the global batch is split into N
microbatches (microbatch i = rows i, i+N, i+2N, ..., so each device splits its own rows and nothing
moves), and a ``lax.scan`` runs forward + backward on one at a time, summing fp32 gradients (kept in
the parameters' shardings) and the loss terms. Each microbatch's CE and z sums are divided by the
token count of the whole step (known from the mask before any forward), so the summed loss and
gradient are those of one step on the whole batch; clipping, the skip-step guard and the logged
metrics see the step's values. N = 1 is the plain step.

In-loop evaluation (``eval.every`` = N > 0): after every N-th step, the mean cross-entropy of a fixed
held-out set (``eval.paths``, ``eval.batches`` batches of one microbatch's shape, see
``data.held_out_batches``) under the step's parameters: ``loss_fn`` with the sums kept (the same forward,
document-aware or not, the same chunked CE; the z-loss term is left out of the reported loss), one jit
with the step's shardings, compiled at the first evaluation. It reads the parameters only: the training
rng, the data iterator and the step's losses are those of a run without it. Its time is kept out of the
step's throughput; the values go into that step's metrics row (``eval/loss``, ``eval/ppl``, ...).

LoRA (``model.lora``): the model is built and loaded from ``model.init_from`` as for full fine-tuning, then
``post.lora.apply_lora`` adds the adapters (B = 0: the first step's loss is the base model's). The state's
``params`` (and so the AdamW moments and the checkpoints) are the adapters only; the frozen base
(``Trainer.base``, in ``model.param_dtype``, sharded by the same rules) is a separate, non-donated argument of
the step and the evaluation, loaded from ``init_from`` again on resume. The checkpoint meta records the
base (``init_from`` and a checksum of its weights); resuming onto another base is a ConfigError.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from olmo_hybrid_jax.config import OlmoHybridConfig
from olmo_hybrid_jax.model import OlmoHybridForCausalLM, list_to_stacked
from olmo_hybrid_jax.train import sharding as shd
from olmo_hybrid_jax.train.config import Config, ConfigError, dump_yaml, gdn_kernel_config, lora_config, validate
from olmo_hybrid_jax.train.flops import peak_flops_per_device, train_flops_per_token
from olmo_hybrid_jax.train.loss import cross_entropy_sums, token_count
from olmo_hybrid_jax.train.optim import make_optimizer

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def log(msg: str) -> None:
    if jax.process_index() == 0:
        print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------- model
def model_config(cfg: Config) -> OlmoHybridConfig:
    """The architecture: ``init_from``'s config.json (run:RUN_DIR: the run's config.yaml) if set, else the preset,
    plus ``model.overrides``."""
    m = cfg.model
    if m.init_from:
        kind, path = m.init_from.split(":", 1)
        from olmo_hybrid_jax.train.data import resolve_path

        p = resolve_path(path)
        if kind == "run":
            if not (p / "config.yaml").is_file():
                raise ConfigError(f"model.init_from={m.init_from!r}: {p} is not a training run (no config.yaml)")
            from olmo_hybrid_jax.train.config import load_config

            base = model_config(load_config(p / "config.yaml"))
            return _with_overrides(base, m)
        cfg_file = p / "config.json" if p.is_dir() else p
        if not cfg_file.is_file():
            raise ConfigError(f"model.init_from={m.init_from!r}: no config.json at {cfg_file}")
        base = OlmoHybridConfig.from_hf(cfg_file)
    else:
        from olmo_hybrid_jax.config import PRESET_DIR
        from olmo_hybrid_jax.train.data import resolve_path

        if (PRESET_DIR / f"{m.preset}.json").is_file():
            base = OlmoHybridConfig.preset(m.preset)
        else:
            p = resolve_path(m.preset)
            if not p.exists():
                have = sorted(q.stem for q in PRESET_DIR.glob("*.json"))
                raise ConfigError(f"model.preset={m.preset!r} is neither a preset {have} nor an HF config path")
            base = OlmoHybridConfig.from_hf(p)
    return _with_overrides(base, m)


def _with_overrides(base: OlmoHybridConfig, m) -> OlmoHybridConfig:
    ov = dict(m.overrides)
    if ov:
        fields = {f.name for f in dataclasses.fields(OlmoHybridConfig)}
        bad = sorted(set(ov) - fields)
        if bad:
            raise ConfigError(f"model.overrides has unknown OlmoHybridConfig fields {bad}")
        if "num_hidden_layers" in ov and "layer_types" not in ov:
            ov["layer_types"] = None  # re-derive the 3:1 pattern for the new depth
        try:
            base = base.replace(**ov)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"model.overrides: {e}") from e
    return base


def model_kwargs(cfg: Config) -> dict:
    """``OlmoHybridForCausalLM``'s construction options from ``model.*`` (the GDN sharding: ``gdn_sharding``)."""
    m = cfg.model
    return dict(param_dtype=DTYPES[m.param_dtype], dtype=DTYPES[m.compute_dtype], gdn_backend=m.gdn_backend,
                attention_impl=m.attention_impl, scan_layers=m.scan_layers, remat=m.remat,
                gdn_kernel=gdn_kernel_config(m))


def gdn_sharding(cfg: Config, mesh, rules) -> dict:
    """The GDN op's per-shard options (``model.shard_gdn`` on more than one device): batch over the mesh axes
    of the rules' "batch", heads over those of "heads", the sequence over those of "seq" (context parallelism:
    the op's context-parallel form). XLA cannot partition the kernel's custom call (it would gather the whole
    batch onto every device), so the op runs itself under shard_map."""
    if not cfg.model.shard_gdn or mesh.size == 1:
        return {}
    from olmo_hybrid_jax.kernels import ShardAxes

    batch = shd.rule_axes(rules, "batch")
    seq = tuple(a for a in shd.rule_axes(rules, "seq") if a not in batch)
    heads = tuple(a for a in shd.rule_axes(rules, "heads") if a not in batch + seq)  # a mesh axis splits one dim
    return dict(gdn_shard_axes=ShardAxes(batch=batch, heads=heads, seq=seq), gdn_mesh=mesh)


def load_init_params(cfg: Config, mcfg: OlmoHybridConfig, scanned: bool) -> dict:
    """Pure-dict params (host) from ``model.init_from`` (hf:PATH, orbax:PATH or run:RUN_DIR, the run's latest
    checkpoint) in the training layout."""
    from olmo_hybrid_jax import convert
    from olmo_hybrid_jax.train.data import resolve_path

    kind, path = cfg.model.init_from.split(":", 1)
    p = resolve_path(path)
    dt = DTYPES[cfg.model.param_dtype]
    log(f"initialising from {kind} checkpoint {p}")
    if kind == "run":
        from olmo_hybrid_jax.train.export import load_run_model

        model = load_run_model(p, param_dtype=dt)
    else:
        model = convert.load_hf(p, dtype=dt) if kind == "hf" else convert.load_orbax(p, dtype=dt)
    pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return list_to_stacked(pure, mcfg) if scanned else pure


# ------------------------------------------------------------------------------------------- state
def base_checksum(base) -> list[float]:
    """[sum, sum |x|, sum x^2] of every leaf of the frozen LoRA base (fp32 per leaf, fp64 over leaves): a cheap
    fingerprint that tells two bases apart (same architecture, different weights) without hashing the files."""
    @jax.jit
    def stats(tree):
        return [jnp.stack([jnp.sum(x), jnp.sum(jnp.abs(x)), jnp.sum(x * x)])
                for x in (leaf.astype(jnp.float32) for leaf in jax.tree.leaves(tree))]

    return [float(v) for v in np.sum(np.asarray(jax.device_get(stats(base)), np.float64), axis=0)]


def state_shardings(abstract_state, mesh, rules):
    """Shardings for the whole train state: params and param-shaped optimizer leaves by the rules
    table (matched on the path suffix), everything else (scalars, ring buffers) replicated."""
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def one(path, x):
        if getattr(x, "ndim", 0) == 0:
            return replicated
        p = shd.path_str(path)
        try:
            axes = shd.param_logical_axes(p, x.ndim)
        except ValueError:
            return replicated
        return jax.sharding.NamedSharding(mesh, shd.logical_to_spec(axes, x.shape, mesh, rules))

    return jax.tree_util.tree_map_with_path(one, abstract_state)


class Trainer:
    """Everything a run needs; ``run`` drives it. Usable from tests and benchmarks."""

    def __init__(self, cfg: Config, out_dir: str | Path | None = None, *, devices=None):
        validate(cfg)  # load_config did, but a Config may be built or replaced by hand
        self.cfg = cfg
        self.out = Path(out_dir) if out_dir is not None else None
        try:
            self.mesh = shd.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, devices=devices,
                                      context=cfg.mesh.context)
        except ValueError as e:  # mesh sizes that do not fit the devices: a config problem, one line
            raise ConfigError(str(e)) from None
        self.rules = shd.merged_rules(cfg.mesh.rules)
        self.mcfg = model_config(cfg)
        dc = cfg.data
        ndata = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        if dc.global_batch_size % ndata:
            raise ConfigError(f"data.global_batch_size={dc.global_batch_size} is not divisible by the "
                              f"{ndata} data-parallel shards (mesh data x fsdp)")
        accum = cfg.train.grad_accum_steps
        self.micro_batch_size = mb = dc.global_batch_size // accum
        if mb % ndata:
            raise ConfigError(f"train.grad_accum_steps={accum} makes microbatches of {mb} rows "
                              f"(data.global_batch_size={dc.global_batch_size} / {accum}), not divisible by the "
                              f"{ndata} data-parallel shards (mesh data x fsdp)")
        self.eos_id = dc.eos_token_id if dc.eos_token_id is not None else self._model_eos()
        mc = self.mcfg
        attn = shd.attention_shardings(self.mesh, self.rules, batch=mb, seq=dc.seq_len, head_dim=mc.head_dim,
                                       num_heads=mc.num_attention_heads, num_kv_heads=mc.num_key_value_heads)
        self.kw = {**model_kwargs(cfg), **gdn_sharding(cfg, self.mesh, self.rules), "attn_shardings": attn}
        self.lora = lora_config(cfg.model)
        abstract = nnx.eval_shape(self._build_model)
        self.scanned = abstract.scan_layers
        self.base = None  # the frozen LoRA base (load_base); None without LoRA
        if self.lora is not None:
            from olmo_hybrid_jax.post.lora import lora_modules, split_adapters

            self.lora_modules = lora_modules(abstract)
            self.graphdef, adapters, base = split_adapters(abstract)
            self.abstract_params = nnx.to_pure_dict(adapters)  # what is trained, optimised and checkpointed
            self.abstract_base = nnx.to_pure_dict(base)
        else:
            self.graphdef, abstract_state = nnx.split(abstract)
            self.abstract_params = nnx.to_pure_dict(abstract_state)
            self.abstract_base = {}
        self.trainable_count = sum(math.prod(x.shape) for x in jax.tree.leaves(self.abstract_params))
        self.param_count = self.trainable_count + sum(math.prod(x.shape) for x in jax.tree.leaves(self.abstract_base))
        self.tx, self.schedule = make_optimizer(cfg.optim, self.abstract_params)
        abstract_opt = jax.eval_shape(self.tx.init, self.abstract_params)
        self.abstract_state = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": self.abstract_params,
                               "opt_state": abstract_opt, "rng": jax.ShapeDtypeStruct((2,), jnp.uint32)}
        self.state_sharding = state_shardings(self.abstract_state, self.mesh, self.rules)
        self.base_sharding = state_shardings(self.abstract_base, self.mesh, self.rules)
        self.batch_sharding = shd.activation_sharding(self.mesh, self.rules, ("batch", "seq"),
                                                      (dc.global_batch_size, dc.seq_len))
        # activations live per microbatch (the whole batch when grad_accum_steps = 1)
        micro = shd.activation_sharding(self.mesh, self.rules, ("batch", "seq"), (mb, dc.seq_len))
        self.micro_sharding = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec(None, *micro.spec))
        self.eval_batch_sharding = micro  # a held-out batch has a microbatch's shape: the step's shardings fit it
        self.act_sharding = shd.activation_sharding(self.mesh, self.rules, ("batch", "seq", "act_embed"),
                                                    (mb, dc.seq_len, self.mcfg.hidden_size))
        self.logits_sharding = shd.activation_sharding(self.mesh, self.rules, ("batch", "seq", "act_vocab"),
                                                       (mb, min(cfg.train.loss_chunk, dc.seq_len),
                                                        self.mcfg.vocab_size))
        self.embed_lookup_sharding = shd.activation_sharding(self.mesh, self.rules, ("vocab", None),
                                                             (self.mcfg.vocab_size, self.mcfg.hidden_size))
        self.flops_per_token = train_flops_per_token(self.mcfg, dc.seq_len)
        kind = jax.devices()[0].device_kind
        self.device_kind = kind
        self.peak = peak_flops_per_device(kind, cfg.train.peak_flops_per_device)
        self._step_fn = None
        self._eval_fn = None

    def _build_model(self) -> OlmoHybridForCausalLM:
        """A freshly initialised model (under jit / eval_shape), with the LoRA adapters when configured."""
        m = OlmoHybridForCausalLM(self.mcfg, rngs=nnx.Rngs(self.cfg.train.seed), **self.kw)
        if self.lora is not None:
            from olmo_hybrid_jax.post.lora import apply_lora

            try:
                apply_lora(m, self.lora, rngs=nnx.Rngs(self.cfg.train.seed + 1))
            except ValueError as e:  # a target that adapts nothing in this model: a config problem
                raise ConfigError(f"model.lora.targets: {e}") from None
        return m

    def load_base(self):
        """Load the frozen LoRA base from ``model.init_from`` into ``self.base`` (once); returns it."""
        if self.base is None:
            host = load_init_params(self.cfg, self.mcfg, self.scanned)
            self.base = jax.tree.map(lambda x, s: jax.device_put(x, s), host, self.base_sharding)
            self.base_fingerprint = {"init_from": self.cfg.model.init_from, "checksum": base_checksum(self.base)}
        return self.base

    def _model_eos(self) -> int:
        eos = self.mcfg.eos_token_id
        if isinstance(eos, (tuple, list)):
            eos = eos[0]
        if eos is None:
            raise ConfigError("the model config has no eos_token_id; set data.eos_token_id")
        return int(eos)

    # ---------------------------------------------------------------- init
    def init_state(self):
        """Fresh state, created directly in its shardings (never whole on one device)."""
        cfg = self.cfg
        seed = cfg.train.seed
        if self.lora is not None:
            self.load_base()
            params = jax.jit(lambda: nnx.to_pure_dict(nnx.state(self._build_model(), nnx.LoRAParam)),
                             out_shardings=self.state_sharding["params"])()
        elif cfg.model.init_from:
            host = load_init_params(cfg, self.mcfg, self.scanned)
            params = jax.tree.map(lambda x, s: jax.device_put(x, s), host, self.state_sharding["params"])
        else:
            params = jax.jit(lambda: nnx.to_pure_dict(nnx.state(self._build_model())),
                             out_shardings=self.state_sharding["params"])()

        def rest(params):
            return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": self.tx.init(params),
                    "rng": jax.random.key_data(jax.random.key(seed)).astype(jnp.uint32)}

        return jax.jit(rest, out_shardings=self.state_sharding, donate_argnums=0)(params)

    # ---------------------------------------------------------------- step
    @staticmethod
    def targets(tokens):
        """Next-token labels [B, T] and the loss mask [B, T] (every position but a row's last)."""
        B, T = tokens.shape
        labels = jnp.pad(tokens[:, 1:], ((0, 0), (0, 1)))  # pad: a 1-token halo under context parallelism
        mask = jnp.broadcast_to(jnp.arange(T) < T - 1, (B, T))
        return labels, mask

    def batch_targets(self, batch):
        """(labels, mask) of a batch: ``targets``; with an ``assistant_mask`` (``data.format: chat``) a target is
        kept only where the next token is an assistant token of the same segment (labels -100 elsewhere, in
        transformers' terms)."""
        labels, mask = self.targets(batch["tokens"])
        if "assistant_mask" in batch:
            nxt = lambda x: jnp.pad(x[:, 1:], ((0, 0), (0, 1)))  # noqa: E731  (position t scores token t + 1)
            seg = batch["segment_ids"]
            mask = mask & (nxt(batch["assistant_mask"]) > 0) & (nxt(seg) == seg)
        return labels, mask

    @property
    def batch_keys(self) -> tuple[str, ...]:
        """The arrays of a batch (``device_batch``, the step's input shardings)."""
        base = ("tokens", "segment_ids", "positions")
        return base + ("assistant_mask",) if self.cfg.data.format == "chat" else base

    def loss_fn(self, params, batch, count=None, base=None):
        """(CE + z_loss * z, (CE, z)): sums over ``batch``'s valid targets divided by ``count``, which
        defaults to their number (the mean). A microbatch comes with its rows' ``labels`` and ``mask``
        (cut from the whole batch's) and passes the whole step's count. With LoRA ``params`` are the
        adapters and ``base`` the frozen rest."""
        cfg = self.cfg
        cdt = DTYPES[cfg.model.compute_dtype]
        weights = params if base is None else base  # adapters stay in their dtype: the modules cast them
        if cdt != DTYPES[cfg.model.param_dtype]:
            # matrices in the compute dtype before use: FSDP gathers move half the bytes; numerically
            # the same as the modules' own casts. 1-D params (norms, A_log, dt_bias) stay fp32.
            weights = jax.tree.map(lambda p: p.astype(cdt) if p.ndim >= 2 else p, weights)
        # the embedding table gathered over its hidden dim before the lookup, as FSDP gathers every matrix
        # before its matmul: with the table's fsdp-sharded hidden dim, the SPMD partitioner would replicate
        # the whole batch's gradient for the scatter-add ("Involuntary full rematerialization" under HSDP)
        emb = weights["model"]["embed_tokens"]
        emb = {**emb, "embedding": jax.lax.with_sharding_constraint(emb["embedding"], self.embed_lookup_sharding)}
        weights = {**weights, "model": {**weights["model"], "embed_tokens": emb}}
        model = nnx.merge(self.graphdef, weights) if base is None else nnx.merge(self.graphdef, params, weights)
        tokens = batch["tokens"]
        doc = cfg.data.document_aware
        h = model.model(tokens, positions=batch["positions"] if doc else None,
                        segment_ids=batch["segment_ids"] if doc else None, act_sharding=self.act_sharding)
        labels, mask = (batch["labels"], batch["mask"]) if "mask" in batch else self.batch_targets(batch)
        total, ce_sum, z_sum = cross_entropy_sums(h, model.lm_head_kernel(), labels, mask, z_loss=cfg.optim.z_loss,
                                                  chunk=cfg.train.loss_chunk, compute_dtype=cdt,
                                                  logits_sharding=self.logits_sharding)
        count = token_count(mask) if count is None else count
        return total / count, (ce_sum / count, z_sum / count)

    def accumulated_grads(self, params, batch, base=None):
        """(loss, (CE, z)), grads of the whole batch, computed one microbatch at a time (lax.scan)."""
        n = self.cfg.train.grad_accum_steps
        labels, mask = self.batch_targets(batch)  # of the whole batch, then cut with its rows
        count = token_count(mask)  # the step's normaliser, known before any forward

        def split(x):  # [B, T] -> [n, B/n, T]; microbatch i = rows i, i+n, ...: each device's rows stay local
            x = x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1)
            return jax.lax.with_sharding_constraint(x, self.micro_sharding)

        grad_sharding = self.state_sharding["params"]
        acc0 = jax.lax.with_sharding_constraint(jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params),
                                                grad_sharding)

        def body(carry, micro):
            acc, ce_acc, z_acc = carry
            (_, (ce, z)), g = jax.value_and_grad(self.loss_fn, has_aux=True)(params, micro, count, base)
            acc = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), acc, g)
            return (jax.lax.with_sharding_constraint(acc, grad_sharding), ce_acc + ce, z_acc + z), None

        zero = jnp.zeros((), jnp.float32)
        micro = jax.tree.map(split, {**batch, "labels": labels, "mask": mask})
        (acc, ce, z), _ = jax.lax.scan(body, (acc0, zero, zero), micro)
        grads = jax.tree.map(lambda a, p: a.astype(p.dtype), acc, params)
        return (ce + self.cfg.optim.z_loss * z, (ce, z)), grads

    def train_step(self, state, batch, base=None):
        if self.cfg.train.grad_accum_steps == 1:
            (loss, (ce, z)), grads = jax.value_and_grad(self.loss_fn, has_aux=True)(state["params"], batch, None, base)
        else:
            (loss, (ce, z)), grads = self.accumulated_grads(state["params"], batch, base)
        with jax.named_scope("optimizer"):
            updates, opt_state = self.tx.update(grads, state["opt_state"], state["params"], loss=ce)
            params = jax.tree.map(lambda p, u: (p + u).astype(p.dtype), state["params"], updates)
        metrics = {"loss": ce, "total_loss": loss, "z_loss": z, "grad_norm": opt_state.last_grad_norm,
                   "lr": self.schedule(state["step"] + 1), "skipped": opt_state.last_skipped,
                   "skipped_total": opt_state.skipped, "target_tokens": token_count(self.batch_targets(batch)[1])}
        rng = jax.random.key_data(jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), 1)).astype(jnp.uint32)
        return {"step": state["step"] + 1, "params": params, "opt_state": opt_state, "rng": rng}, metrics

    def _with_base(self, fn):
        """``fn(a, b)`` of a step or evaluation: with LoRA the jitted ``fn(a, b, base)`` given ``self.base``."""
        return fn if self.lora is None else (lambda a, b: fn(a, b, self.load_base()))

    @property
    def step_fn(self):
        """``(state, batch) -> (state, metrics)``, jitted, the state donated (the LoRA base is not)."""
        if self._step_fn is None:
            rep = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
            bs = {k: self.batch_sharding for k in self.batch_keys}
            ins = (self.state_sharding, bs) + ((self.base_sharding,) if self.lora is not None else ())
            self._step_fn = self._with_base(jax.jit(self.train_step, in_shardings=ins,
                                                    out_shardings=(self.state_sharding, rep), donate_argnums=0))
        return self._step_fn

    def eval_step(self, params, batch, base=None):
        """(sum of CE, number of targets) of one held-out batch: ``loss_fn``'s math, without the z-loss term."""
        _, (ce_sum, _) = self.loss_fn(params, batch, 1.0, base)
        return ce_sum, token_count(self.batch_targets(batch)[1])

    @property
    def eval_fn(self):
        if self._eval_fn is None:
            rep = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
            bs = {k: self.eval_batch_sharding for k in self.batch_keys}
            ins = (self.state_sharding["params"], bs) + ((self.base_sharding,) if self.lora is not None else ())
            self._eval_fn = self._with_base(jax.jit(self.eval_step, in_shardings=ins, out_shardings=(rep, rep)))
        return self._eval_fn

    def evaluate(self, params, held_out: dict) -> dict:
        """``eval/loss`` (mean CE over every target of ``held_out``'s batches, see ``data.held_out_batches``),
        ``eval/ppl`` = exp(loss), ``eval/tokens`` (targets scored) and ``eval/time_s``. Reads nothing of the
        training state but ``params``: the training rng and data position are untouched."""
        t0 = time.time()
        nb = next(iter(held_out.values())).shape[0]
        shape = (self.micro_batch_size, self.cfg.data.seq_len)
        outs = [self.eval_fn(params, {k: jax.make_array_from_process_local_data(self.eval_batch_sharding, v[b], shape)
                                      for k, v in held_out.items()})
                for b in range(nb)]  # all dispatched before the first is read
        got = jax.device_get(outs)
        ce, n = math.fsum(float(c) for c, _ in got), math.fsum(float(k) for _, k in got)
        loss = ce / n
        try:
            ppl = math.exp(loss)
        except OverflowError:
            ppl = math.inf
        return {"eval/loss": loss, "eval/ppl": ppl, "eval/tokens": int(n), "eval/time_s": time.time() - t0}

    def device_batch(self, host_batch: dict) -> dict:
        """This host's rows -> global arrays sharded over (data, fsdp)."""
        GB, L = self.cfg.data.global_batch_size, self.cfg.data.seq_len
        return {k: jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(host_batch[k], np.int32),
                                                          (GB, L))
                for k in self.batch_keys}


# ------------------------------------------------------------------------------------------- loop
MAX_BAD_STEPS = 8  # consecutive non-finite or skipped steps that stop a run as diverged (run(max_bad_steps=))
SIGNAL_EXIT_CODES = {"SIGINT": 130, "SIGTERM": 143}  # 128 + the signal's number, what a shell reports for it


class TrainingDiverged(RuntimeError):
    """``max_bad_steps`` steps in a row had a non-finite loss or were skipped; nothing newer than the last good
    checkpoint was saved."""


def _meta(trainer: Trainer) -> dict:
    meta = {"config": trainer.cfg.to_dict(), "model_config": trainer.mcfg.to_hf(),
            "layout": "scanned" if trainer.scanned else "list", "param_count": trainer.param_count}
    if trainer.lora is not None:  # the adapters mean nothing without their base: record which one it was
        meta["lora_base"] = trainer.base_fingerprint
    return meta


def check_lora_base(trainer: Trainer, meta: dict, where: str) -> None:
    """ConfigError (one line) when ``trainer``'s loaded LoRA base is not the one ``meta``'s adapters were trained
    on (checksums differ beyond summation-order noise); a moved base folder is only logged."""
    saved = meta.get("lora_base")
    if trainer.lora is None or saved is None:
        return
    now = trainer.base_fingerprint
    if not np.allclose(saved["checksum"], now["checksum"], rtol=1e-5, atol=0):
        raise ConfigError(f"{where} holds LoRA adapters trained on the base {saved['init_from']!r}; "
                          f"model.init_from={now['init_from']!r} has other weights (checksum {now['checksum'][1]:.6g} "
                          f"vs {saved['checksum'][1]:.6g}): set model.init_from to that base")
    if saved["init_from"] != now["init_from"]:
        log(f"LoRA base: {now['init_from']!r} has the weights of the checkpoint's base {saved['init_from']!r}")


def _resume_mode(resume) -> str | None:
    if resume is False or resume is None:
        return None
    if resume is True or resume == "auto":
        return "auto"
    if resume == "require":
        return "require"
    raise ValueError(f"resume={resume!r}: expected False, True / 'auto' or 'require'")


def _is_bad(row: dict) -> bool:
    return bool(row["skipped"]) or not math.isfinite(row["loss"])


def run(cfg: Config, out_dir: str | Path, *, resume: bool | str = False, max_bad_steps: int | None = None) -> dict:
    """Train to ``cfg.train.steps`` total steps, writing OUT/{config.yaml,metrics.jsonl,checkpoints/}.

    ``resume``: False refuses a run folder that has checkpoints; True / "auto" continues from the newest
    checkpoint that restores (a broken one is reported and the previous one tried; one that does not fit
    the config is a ConfigError), or starts fresh when there is none; "require" raises ConfigError when
    there is none. A checkpoint already at or past ``train.steps`` runs nothing ("nothing to do").

    A step with a non-finite loss or one the optimizer skipped is never checkpointed (the save moves to the
    next good step); ``max_bad_steps`` (default ``MAX_BAD_STEPS``; 0 = never) of them in a row raise
    TrainingDiverged without saving. SIGTERM / SIGINT finish the current step, save it and return with
    ``summary["stopped_by"]`` = "SIGTERM" / "SIGINT"; a second SIGINT raises KeyboardInterrupt at once.
    A setup that fails (bad data, a checkpoint that does not fit, none that restores) leaves no folder
    behind that this call created: the run folder and its checkpoints/ are removed again (``rmdir``) when
    they hold nothing but this call's data-scan cache; nothing that existed before is touched.

    Returns a summary dict: ``last`` (metrics row), ``start_step``, ``steps`` (reached), ``steps_run`` (this
    call), ``last_finite_loss``, ``stopped_by``, ``resumed_from``, ``unrestorable`` (steps moved aside),
    ``wall_s``.
    """
    from olmo_hybrid_jax.train.checkpoint import Checkpointer
    from olmo_hybrid_jax.train.data import held_out_batches, make_dataset, make_iterator
    from olmo_hybrid_jax.train.metrics import Progress, check_loggers, open_loggers, truncate_metrics

    mode = _resume_mode(resume)
    max_bad = MAX_BAD_STEPS if max_bad_steps is None else max_bad_steps
    out = Path(out_dir)
    ck_dir = out / "checkpoints"
    is_main = jax.process_index() == 0
    t_start = time.time()
    total = cfg.train.steps
    trainer = Trainer(cfg, out)  # config errors before anything is written
    check_loggers(cfg.train.loggers)  # a missing logger package, before any compile

    def new_checkpointer():
        return Checkpointer(ck_dir, every=cfg.checkpoint.every, keep=cfg.checkpoint.keep,
                            async_save=cfg.checkpoint.async_save)

    ckpt = new_checkpointer() if ck_dir.is_dir() else None  # orbax creates its directory: only open one that exists
    latest = ckpt.latest_step() if ckpt is not None else None
    problem = nothing = None
    if latest is not None and mode is None:
        problem = (f"{out} already has checkpoints (latest step {latest}); pass --resume to continue "
                   "or choose a new --out")
    elif latest is None and mode == "require":
        problem = f"--resume=require: no checkpoint in {ck_dir}"
    elif latest is not None and latest >= total:
        nothing = (f"nothing to do: the checkpoint at step {latest} in {ck_dir} is "
                   f"{'already at' if latest == total else 'past'} train.steps={total}")
    elif latest is None and total == 0:
        nothing = "nothing to do: train.steps=0"
    if problem or nothing:
        if ckpt is not None:
            ckpt.close()
        if problem:
            raise ConfigError(problem)
        log(nothing)
        return {"last": {}, "start_step": latest or 0, "steps": latest or 0, "steps_run": 0,
                "last_finite_loss": None, "stopped_by": None, "resumed_from": None, "unrestorable": [],
                "wall_s": time.time() - t_start}

    created = is_main and not out.exists()
    ck_created = is_main and not ck_dir.exists()
    resumed_from, moved = None, []
    try:
        if is_main:
            out.mkdir(parents=True, exist_ok=True)
        if ckpt is None:
            ckpt = new_checkpointer()
        dataset, rows = make_dataset(cfg.data, trainer.eos_id, process_index=jax.process_index(),
                                     process_count=jax.process_count(), vocab_size=trainer.mcfg.vocab_size,
                                     max_id_cache=(out / "data_max_token_ids.json") if is_main else None)
        data_iter = make_iterator(dataset, cfg.data)
        held_out = None
        if cfg.eval.every:
            held_out, eval_rows = held_out_batches(
                cfg.eval.paths, cfg.data, trainer.eos_id, batch_size=trainer.micro_batch_size,
                batches=cfg.eval.batches, process_index=jax.process_index(), process_count=jax.process_count(),
                vocab_size=trainer.mcfg.vocab_size, max_id_cache=(out / "data_max_token_ids.json") if is_main else None)
        mesh_desc = "x".join(f"{k}={v}" for k, v in trainer.mesh.shape.items())
        log(f"devices: {jax.device_count()} x {trainer.device_kind} ({jax.process_count()} process(es)); "
            f"mesh {mesh_desc}")
        log(f"model: {trainer.param_count / 1e6:,.2f}M params, {trainer.mcfg.num_hidden_layers} layers, layout "
            f"{'scanned' if trainer.scanned else 'list'}, remat {cfg.model.remat}, compute {cfg.model.compute_dtype}; "
            f"{trainer.flops_per_token:.3e} train FLOPs/token")
        if trainer.lora is not None:
            lc = trainer.lora
            log(f"LoRA: rank {lc.rank}, alpha {lc.alpha:g} on {len(trainer.lora_modules)} modules "
                f"(targets {list(lc.targets)}); {trainer.trainable_count / 1e6:,.3f}M trainable params "
                f"({100 * trainer.trainable_count / trainer.param_count:.2f}%), base frozen in {cfg.model.param_dtype}")
        accum = (f" ({cfg.train.grad_accum_steps} microbatches of {trainer.micro_batch_size})"
                 if cfg.train.grad_accum_steps > 1 else "")
        log(f"data: {len(rows):,} rows x {cfg.data.seq_len} from {rows.num_tokens:,} tokens in {len(rows.paths)} "
            f"file(s); global batch {cfg.data.global_batch_size}{accum}; document_aware={cfg.data.document_aware}")
        if cfg.data.format == "chat":
            log(f"chat data: {rows.conversations:,} conversations, {rows.assistant_tokens:,} assistant tokens; "
                f"{len(rows) / cfg.data.global_batch_size:,.1f} steps per epoch")
        if held_out is not None:
            nb = held_out["tokens"].shape[0]
            log(f"eval: every {cfg.eval.every} steps, {nb} batch(es) x {trainer.micro_batch_size} rows x "
                f"{cfg.data.seq_len} = {nb * trainer.micro_batch_size * cfg.data.seq_len:,} tokens of the "
                f"{len(eval_rows):,} rows in {len(eval_rows.paths)} held-out file(s)")

        start_step = 0
        if latest is not None:
            if trainer.lora is not None:
                trainer.load_base()  # the adapters' base is checked against the checkpoint's before restoring

            def fits(s, m, shapes):
                _check_fits(trainer, ck_dir, s, m, shapes)
                check_lora_base(trainer, m, f"checkpoint step {s} in {ck_dir}")

            resumed_from, state, saved_meta, failed = ckpt.restore_newest(
                _abstract_with_shardings(trainer), check=fits, use_data=data_iter.set_state, log=log)
            _warn_config_drift(saved_meta.get("config", {}), cfg)
            if failed:  # out of orbax's way: their step numbers are saved again, `keep` counts good ones only
                moved = ckpt.move_aside([s for s, _ in failed], out / "checkpoints_unrestorable")
                log(f"moved the unrestorable step(s) {[s for s, _ in failed]} to {out / 'checkpoints_unrestorable'} "
                    "(nothing deleted)")
            start_step = int(jax.device_get(state["step"]))
            log(f"resumed from {ck_dir / str(resumed_from)} at step {start_step}")
        else:
            if mode is not None:
                log(f"--resume: no checkpoint in {ck_dir}; starting from scratch")
            state = trainer.init_state()
    except BaseException:
        if ckpt is not None:
            ckpt.close()
        _remove_if_created(out if created else None, ck_dir if ck_created else None)
        raise

    if is_main:
        (out / "config.yaml").write_text(dump_yaml(cfg))
        if start_step == 0:
            (out / "metrics.jsonl").unlink(missing_ok=True)
        else:
            truncate_metrics(out / "metrics.jsonl", start_step)
    try:
        writer = open_loggers(cfg, out, start_step=start_step, enabled=is_main)
    except BaseException:
        ckpt.close()
        raise
    meta = _meta(trainer)
    bar = Progress(start_step, total, cfg.train.progress and is_main)
    tokens_per_step = cfg.data.global_batch_size * cfg.data.seq_len
    ndev = jax.device_count()
    last_row: dict = {}
    last_finite: tuple[int, float] | None = None
    bad = {"streak": 0, "first": None}
    pending = None
    t_prev = time.time()

    def flush(pending, final=False) -> dict:
        nonlocal t_prev, last_row, last_finite
        step, m, evaluated = pending
        m = jax.device_get(m)
        now = time.time()
        dt = now - t_prev
        t_prev = now
        tps = tokens_per_step / dt if dt > 0 else None
        row = {"step": step, "loss": float(m["loss"]), "total_loss": float(m["total_loss"]),
               "z_loss": float(m["z_loss"]), "grad_norm": float(m["grad_norm"]), "lr": float(m["lr"]),
               "skipped": bool(m["skipped"]), "tokens": step * tokens_per_step,
               "target_tokens": int(m["target_tokens"]), "step_time_s": dt,
               "tokens_per_s": tps, "tokens_per_s_per_device": tps / ndev if tps else None,
               "mfu": (tps * trainer.flops_per_token / (ndev * trainer.peak)) if (tps and trainer.peak) else None,
               **(evaluated or {})}
        writer.write(row)
        last_row = row
        if math.isfinite(row["loss"]):
            last_finite = (step, row["loss"])
        if _is_bad(row):
            bad["streak"] += 1
            bad["first"] = bad["first"] or step
        else:
            bad["streak"], bad["first"] = 0, None
        diverged = max_bad > 0 and bad["streak"] >= max_bad
        bar.update(row, final=final or diverged)
        if diverged:  # every process reads the same (replicated) metrics: all stop here
            newest = ckpt.latest_step()
            saved = f"the newest checkpoint is step {newest} in {ck_dir}" if newest is not None else "no checkpoint"
            raise TrainingDiverged(
                f"training diverged: {bad['streak']} steps in a row ({bad['first']}-{step}) had a non-finite loss "
                f"or were skipped (step {step}: loss {row['loss']:.4g}, grad_norm {row['grad_norm']:.4g}); nothing "
                f"after the last good step was saved ({saved}); lower optim.lr or check the data")
        return row

    signals = _StopSignals()
    stopped_by = None
    save_due = False  # a checkpoint boundary fell on a bad step: save the next good one
    try:
        for step in range(start_step + 1, total + 1):
            batch = trainer.device_batch(next(data_iter))
            state, metrics = trainer.step_fn(state, batch)
            stopping = signals.agreed()  # the same answer on every process at this step
            if pending is not None:
                flush(pending)
            pending = (step, metrics, None)
            if held_out is not None and step % cfg.eval.every == 0:
                jax.block_until_ready(metrics)  # step `step` done: what follows is the evaluation's own time
                evaluated = trainer.evaluate(state["params"], held_out)
                t_prev += evaluated["eval/time_s"]  # kept out of the step's step_time_s / tokens_per_s / mfu
                pending = (step, metrics, evaluated)
                log(f"step {step}: eval loss {evaluated['eval/loss']:.4f}, ppl {evaluated['eval/ppl']:.4g} "
                    f"({evaluated['eval/tokens']:,} tokens, {evaluated['eval/time_s']:.1f}s)")
            if step % cfg.checkpoint.every == 0 or step == total or save_due or stopping:
                row = flush(pending, final=step == total or stopping is not None)  # logged before it is saved
                pending = None
                if _is_bad(row):
                    if not save_due:
                        log(f"step {step}: loss {row['loss']:.4g}{' (skipped)' if row['skipped'] else ''}; "
                            "not checkpointed, the next good step will be")
                    save_due = step < total
                else:
                    ckpt.save(step, state, data_iter.get_state(), meta, force=True)
                    save_due = False
                if stopping and step < total:
                    stopped_by = stopping
                    what = (f"saved step {step}" if not _is_bad(row) else
                            f"step {step} was not saved (non-finite or skipped; newest checkpoint: "
                            f"{ckpt.latest_step()})")
                    log(f"{stopping}: {what}; exiting (continue with --resume)")
                    break
        if pending is not None:
            flush(pending, final=True)
        bar.close()  # its final rate without the wait for the last save
        ckpt.wait()
    finally:
        signals.restore()
        bar.close()
        writer.close()
        ckpt.close()
    reached = last_row.get("step", start_step)
    exported = None
    if cfg.train.export_hf and stopped_by is None and reached == total:
        exported = _export_at_end(trainer, state, out)
    summary = {"last": last_row, "start_step": start_step, "steps": reached, "steps_run": reached - start_step,
               "last_finite_loss": last_finite[1] if last_finite else None, "stopped_by": stopped_by,
               "resumed_from": resumed_from, "unrestorable": [int(p.name.split(".")[0]) for p in moved],
               "wall_s": time.time() - t_start, "exported": exported}
    loss = f"last finite loss {last_finite[1]:.4f} (step {last_finite[0]})" if last_finite else "no finite loss"
    unsaved = (f"; step {reached} was not checkpointed (non-finite or skipped)"
               if last_row and _is_bad(last_row) else "")
    log(f"{f'stopped by {stopped_by}' if stopped_by else 'done'}: step {reached} of {total}, "
        f"{summary['steps_run']} step(s) this run, {loss}, {summary['wall_s']:.1f}s; "
        f"checkpoints {ckpt.all_steps()} in {ck_dir}{unsaved}")
    return summary


def _export_at_end(trainer: Trainer, state, out: Path) -> Path:
    """``train.export_hf``: the final parameters as an HF checkpoint in OUT/hf (replaced if there), with the chat
    data's tokenizer files (``export.export_params``)."""
    from olmo_hybrid_jax.train.export import export_params, run_tokenizer_dir

    params = state["params"] if trainer.lora is None else {"adapters": state["params"], "base": trainer.base}
    if jax.process_count() > 1:  # every process takes part in the gather; process 0 writes
        from jax.experimental import multihost_utils

        params = multihost_utils.process_allgather(params, tiled=True)
    params = jax.device_get(params)
    if trainer.lora is not None:
        from olmo_hybrid_jax.train.export import merged_params

        params = merged_params(trainer, params["adapters"], params["base"])
    hf = out / "hf"
    if jax.process_index() == 0:
        export_params(trainer, params, hf, tokenizer_dir=run_tokenizer_dir(trainer.cfg), overwrite=True)
        log(f"exported the step-{trainer.cfg.train.steps} model to {hf}")
    return hf


def _remove_if_created(out: Path | None, ck_dir: Path | None) -> None:
    """After a failed setup: remove the folders this call created (``None``: it did not), only while they
    hold nothing but its own data-scan cache (``rmdir``, never a recursive delete)."""
    if ck_dir is not None and ck_dir.is_dir() and not any(ck_dir.iterdir()):
        ck_dir.rmdir()
    if out is not None and out.is_dir():
        (out / "data_max_token_ids.json").unlink(missing_ok=True)  # written by this call: the folder is new
        if not any(out.iterdir()):
            out.rmdir()


_SIGNALS = ("SIGINT", "SIGTERM")  # a vote's code is its index + 1; the max over processes wins


@functools.cache
def _max_over_processes():
    """(sharding of one int per device, jitted max) for the per-step vote of several processes."""
    P = jax.sharding.PartitionSpec
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("p",))
    return (jax.sharding.NamedSharding(mesh, P("p")),
            jax.jit(jnp.max, out_shardings=jax.sharding.NamedSharding(mesh, P())))


class _StopSignals:
    """SIGTERM / SIGINT set a flag the loop reads after dispatching each step (finish it, save it, stop); a
    second SIGINT raises KeyboardInterrupt at once. ``restore`` puts the previous handlers back.

    With several processes each would see its own signal at its own step, so ``agreed`` combines the flags:
    a tiny jitted max over one int per device, dispatched each step and read one step later (by then the
    step before it, which the metrics flush waits for anyway, is done: no extra host sync). One process
    reads its flag directly.
    """

    def __init__(self):
        import signal
        import threading

        self.received: str | None = None
        self._vote = None
        self._old = {}
        if threading.current_thread() is threading.main_thread():  # signal.signal works there only
            for name in _SIGNALS:
                sig = getattr(signal, name)
                self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        import signal

        if signum == signal.SIGINT and self.received == "SIGINT":
            raise KeyboardInterrupt  # the second Ctrl-C: abort now, without saving
        self.received = self.received or signal.Signals(signum).name

    def agreed(self) -> str | None:
        if jax.process_count() == 1:
            return self.received
        sharding, vote_max = _max_over_processes()
        code = _SIGNALS.index(self.received) + 1 if self.received else 0
        local = np.full((jax.local_device_count(),), code, np.int32)
        vote = vote_max(jax.make_array_from_process_local_data(sharding, local, (jax.device_count(),)))
        prev, self._vote = self._vote, vote
        code = int(np.asarray(prev.addressable_data(0))) if prev is not None else 0
        return _SIGNALS[code - 1] if code else None

    def restore(self) -> None:
        import signal

        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}


def _abstract_with_shardings(trainer: Trainer):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        trainer.abstract_state, trainer.state_sharding)


def _check_fits(trainer: Trainer, ck_dir: Path, step: int, meta: dict, saved: dict) -> None:
    """Raise ConfigError (one line, naming the differing fields) when the checkpoint's arrays do not fit the
    configured model and optimizer: a config problem, not a broken checkpoint to walk back over."""
    from olmo_hybrid_jax.train.checkpoint import leaf_shapes

    want = leaf_shapes(trainer.abstract_state)
    missing = [k for k in want if k not in saved]
    extra = [k for k in saved if k not in want]
    differ = [k for k in want if k in saved and saved[k] != want[k]]
    if not (missing or extra or differ):
        return
    old, new = meta.get("model_config", {}), trainer.mcfg.to_hf()
    fields = [f"{k}={old.get(k)!r}, the config gives {new.get(k)!r}" for k in sorted(set(old) | set(new))
              if json.dumps(old.get(k), sort_keys=True) != json.dumps(new.get(k), sort_keys=True)]
    layout = "scanned" if trainer.scanned else "list"
    if meta.get("layout", layout) != layout:
        fields.append(f"layout {meta['layout']!r}, the config gives {layout!r} (model.scan_layers)")
    if not fields:  # same model: an optimizer setting shapes its state (e.g. optim.skip_window)
        fields = [f"{key}={was!r}, the config gives {now!r}"
                  for key, was, now in _config_diffs(meta.get("config", {}), trainer.cfg)]
    if differ:
        eg = f"{differ[0]} is {saved[differ[0]]} there, {want[differ[0]]} here"
    else:
        eg = f"{missing[0]} is missing" if missing else f"{extra[0]} is not in the model"
    n = len(missing) + len(extra) + len(differ)
    raise ConfigError(f"checkpoint step {step} in {ck_dir} has {'; '.join(fields) or 'other array shapes'}: "
                      f"{n} saved array(s) do not fit (e.g. {eg}); resume with the checkpoint's settings or "
                      "train into a new --out")


_DRIFT_IGNORED = {("train", "steps"), ("train", "progress"), ("checkpoint", "every"), ("checkpoint", "keep"),
                  ("checkpoint", "async_save"), ("data", "num_threads"), ("data", "prefetch"),
                  ("train", "loggers"), ("train", "wandb_project"), ("train", "wandb_name"), ("train", "wandb_mode"),
                  ("eval", "every"), ("eval", "paths"), ("eval", "batches")}  # evaluation never changes training


def _config_diffs(saved: dict, cfg: Config) -> list[tuple[str, object, object]]:
    """("section.key", saved value, current value) for each config key that changed (bookkeeping keys aside)."""
    out = []
    for sec, vals in cfg.to_dict().items():
        for k, v in vals.items():
            if (sec, k) in _DRIFT_IGNORED:
                continue
            old = saved.get(sec, {}).get(k, v)
            if json.dumps(old, sort_keys=True) != json.dumps(v, sort_keys=True):
                out.append((f"{sec}.{k}", old, v))
    return out


def _warn_config_drift(saved: dict, cfg: Config) -> None:
    for key, old, v in _config_diffs(saved, cfg):
        log(f"warning: {key} was {old!r} in the checkpoint, now {v!r}; the run will not match an uninterrupted one")
