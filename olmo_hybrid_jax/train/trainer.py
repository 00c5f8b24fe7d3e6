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
"""

from __future__ import annotations

import dataclasses
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
from olmo_hybrid_jax.train.config import Config, ConfigError, dump_yaml, gdn_kernel_config, validate
from olmo_hybrid_jax.train.flops import peak_flops_per_device, train_flops_per_token
from olmo_hybrid_jax.train.loss import cross_entropy_sums, token_count
from olmo_hybrid_jax.train.optim import make_optimizer

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def log(msg: str) -> None:
    if jax.process_index() == 0:
        print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------- model
def model_config(cfg: Config) -> OlmoHybridConfig:
    """The architecture: ``init_from``'s config.json if set, else the preset, plus ``model.overrides``."""
    m = cfg.model
    if m.init_from:
        kind, path = m.init_from.split(":", 1)
        from olmo_hybrid_jax.train.data import resolve_path

        p = resolve_path(path)
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
    of the rules' "batch", heads over those of "heads". XLA cannot partition the kernel's custom call (it
    would gather the whole batch onto every device), so the op runs itself under shard_map."""
    if not cfg.model.shard_gdn or mesh.size == 1:
        return {}
    from olmo_hybrid_jax.kernels import ShardAxes

    batch = shd.rule_axes(rules, "batch")
    heads = tuple(a for a in shd.rule_axes(rules, "heads") if a not in batch)  # a mesh axis splits one dim
    return dict(gdn_shard_axes=ShardAxes(batch=batch, heads=heads), gdn_mesh=mesh)


def load_init_params(cfg: Config, mcfg: OlmoHybridConfig, scanned: bool) -> dict:
    """Pure-dict params (host) from ``model.init_from`` (hf:PATH or orbax:PATH) in the training layout."""
    from olmo_hybrid_jax import convert
    from olmo_hybrid_jax.train.data import resolve_path

    kind, path = cfg.model.init_from.split(":", 1)
    p = resolve_path(path)
    dt = DTYPES[cfg.model.param_dtype]
    log(f"initialising from {kind} checkpoint {p}")
    model = convert.load_hf(p, dtype=dt) if kind == "hf" else convert.load_orbax(p, dtype=dt)
    pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return list_to_stacked(pure, mcfg) if scanned else pure


# ------------------------------------------------------------------------------------------- state
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
        self.mesh = shd.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, devices=devices)
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
        self.kw = {**model_kwargs(cfg), **gdn_sharding(cfg, self.mesh, self.rules)}
        abstract = nnx.eval_shape(lambda: OlmoHybridForCausalLM(self.mcfg, rngs=nnx.Rngs(0), **self.kw))
        self.scanned = abstract.scan_layers
        self.graphdef, abstract_state = nnx.split(abstract)
        self.abstract_params = nnx.to_pure_dict(abstract_state)
        self.param_count = sum(math.prod(x.shape) for x in jax.tree.leaves(self.abstract_params))
        self.tx, self.schedule = make_optimizer(cfg.optim, self.abstract_params)
        abstract_opt = jax.eval_shape(self.tx.init, self.abstract_params)
        self.abstract_state = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": self.abstract_params,
                               "opt_state": abstract_opt, "rng": jax.ShapeDtypeStruct((2,), jnp.uint32)}
        self.state_sharding = state_shardings(self.abstract_state, self.mesh, self.rules)
        self.batch_sharding = shd.activation_sharding(self.mesh, self.rules, ("batch", "seq"),
                                                      (dc.global_batch_size, dc.seq_len))
        # activations live per microbatch (the whole batch when grad_accum_steps = 1)
        micro = shd.activation_sharding(self.mesh, self.rules, ("batch", "seq"), (mb, dc.seq_len))
        self.micro_sharding = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec(None, *micro.spec))
        self.act_sharding = shd.activation_sharding(self.mesh, self.rules, ("batch", "seq", "act_embed"),
                                                    (mb, dc.seq_len, self.mcfg.hidden_size))
        self.logits_sharding = shd.activation_sharding(self.mesh, self.rules, ("batch", "seq", "act_vocab"),
                                                       (mb, min(cfg.train.loss_chunk, dc.seq_len),
                                                        self.mcfg.vocab_size))
        self.flops_per_token = train_flops_per_token(self.mcfg, dc.seq_len)
        kind = jax.devices()[0].device_kind
        self.device_kind = kind
        self.peak = peak_flops_per_device(kind, cfg.train.peak_flops_per_device)
        self._step_fn = None

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
        if cfg.model.init_from:
            host = load_init_params(cfg, self.mcfg, self.scanned)
            params = jax.tree.map(lambda x, s: jax.device_put(x, s), host, self.state_sharding["params"])
        else:
            def init_params():
                m = OlmoHybridForCausalLM(self.mcfg, rngs=nnx.Rngs(seed), **self.kw)
                return nnx.to_pure_dict(nnx.state(m))

            params = jax.jit(init_params, out_shardings=self.state_sharding["params"])()

        def rest(params):
            return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": self.tx.init(params),
                    "rng": jax.random.key_data(jax.random.key(seed)).astype(jnp.uint32)}

        return jax.jit(rest, out_shardings=self.state_sharding, donate_argnums=0)(params)

    # ---------------------------------------------------------------- step
    @staticmethod
    def targets(tokens):
        """Next-token labels [B, T] and the loss mask [B, T] (every position but a row's last)."""
        B, T = tokens.shape
        labels = jnp.concatenate([tokens[:, 1:], jnp.zeros((B, 1), tokens.dtype)], axis=1)
        mask = jnp.broadcast_to(jnp.arange(T) < T - 1, (B, T))
        return labels, mask

    def loss_fn(self, params, batch, count=None):
        """(CE + z_loss * z, (CE, z)): sums over ``batch``'s valid targets divided by ``count``, which
        defaults to their number (the mean). A microbatch comes with its rows' ``labels`` and ``mask``
        (cut from the whole batch's) and passes the whole step's count."""
        cfg = self.cfg
        cdt = DTYPES[cfg.model.compute_dtype]
        if cdt != DTYPES[cfg.model.param_dtype]:
            # matrices in the compute dtype before use: FSDP gathers move half the bytes; numerically
            # the same as the modules' own casts. 1-D params (norms, A_log, dt_bias) stay fp32.
            params = jax.tree.map(lambda p: p.astype(cdt) if p.ndim >= 2 else p, params)
        model = nnx.merge(self.graphdef, params)
        tokens = batch["tokens"]
        doc = cfg.data.document_aware
        h = model.model(tokens, positions=batch["positions"] if doc else None,
                        segment_ids=batch["segment_ids"] if doc else None, act_sharding=self.act_sharding)
        labels, mask = (batch["labels"], batch["mask"]) if "mask" in batch else self.targets(tokens)
        total, ce_sum, z_sum = cross_entropy_sums(h, model.lm_head_kernel(), labels, mask, z_loss=cfg.optim.z_loss,
                                                  chunk=cfg.train.loss_chunk, compute_dtype=cdt,
                                                  logits_sharding=self.logits_sharding)
        count = token_count(mask) if count is None else count
        return total / count, (ce_sum / count, z_sum / count)

    def accumulated_grads(self, params, batch):
        """(loss, (CE, z)), grads of the whole batch, computed one microbatch at a time (lax.scan)."""
        n = self.cfg.train.grad_accum_steps
        labels, mask = self.targets(batch["tokens"])  # of the whole batch, then cut with its rows
        count = token_count(mask)  # the step's normaliser, known before any forward

        def split(x):  # [B, T] -> [n, B/n, T]; microbatch i = rows i, i+n, ...: each device's rows stay local
            x = x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1)
            return jax.lax.with_sharding_constraint(x, self.micro_sharding)

        grad_sharding = self.state_sharding["params"]
        acc0 = jax.lax.with_sharding_constraint(jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params),
                                                grad_sharding)

        def body(carry, micro):
            acc, ce_acc, z_acc = carry
            (_, (ce, z)), g = jax.value_and_grad(self.loss_fn, has_aux=True)(params, micro, count)
            acc = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), acc, g)
            return (jax.lax.with_sharding_constraint(acc, grad_sharding), ce_acc + ce, z_acc + z), None

        zero = jnp.zeros((), jnp.float32)
        micro = jax.tree.map(split, {**batch, "labels": labels, "mask": mask})
        (acc, ce, z), _ = jax.lax.scan(body, (acc0, zero, zero), micro)
        grads = jax.tree.map(lambda a, p: a.astype(p.dtype), acc, params)
        return (ce + self.cfg.optim.z_loss * z, (ce, z)), grads

    def train_step(self, state, batch):
        if self.cfg.train.grad_accum_steps == 1:
            (loss, (ce, z)), grads = jax.value_and_grad(self.loss_fn, has_aux=True)(state["params"], batch)
        else:
            (loss, (ce, z)), grads = self.accumulated_grads(state["params"], batch)
        with jax.named_scope("optimizer"):
            updates, opt_state = self.tx.update(grads, state["opt_state"], state["params"], loss=ce)
            params = jax.tree.map(lambda p, u: (p + u).astype(p.dtype), state["params"], updates)
        metrics = {"loss": ce, "total_loss": loss, "z_loss": z, "grad_norm": opt_state.last_grad_norm,
                   "lr": self.schedule(state["step"] + 1), "skipped": opt_state.last_skipped,
                   "skipped_total": opt_state.skipped}
        rng = jax.random.key_data(jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), 1)).astype(jnp.uint32)
        return {"step": state["step"] + 1, "params": params, "opt_state": opt_state, "rng": rng}, metrics

    @property
    def step_fn(self):
        if self._step_fn is None:
            rep = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
            bs = {"tokens": self.batch_sharding, "segment_ids": self.batch_sharding, "positions": self.batch_sharding}
            self._step_fn = jax.jit(self.train_step, in_shardings=(self.state_sharding, bs),
                                    out_shardings=(self.state_sharding, rep), donate_argnums=0)
        return self._step_fn

    def device_batch(self, host_batch: dict) -> dict:
        """This host's rows -> global arrays sharded over (data, fsdp)."""
        GB, L = self.cfg.data.global_batch_size, self.cfg.data.seq_len
        return {k: jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(host_batch[k], np.int32),
                                                          (GB, L))
                for k in ("tokens", "segment_ids", "positions")}


# ------------------------------------------------------------------------------------------- loop
def _meta(trainer: Trainer) -> dict:
    return {"config": trainer.cfg.to_dict(), "model_config": trainer.mcfg.to_hf(),
            "layout": "scanned" if trainer.scanned else "list", "param_count": trainer.param_count}


def run(cfg: Config, out_dir: str | Path, *, resume: bool = False) -> dict:
    """Train to ``cfg.train.steps`` total steps, writing OUT/{config.yaml,metrics.jsonl,checkpoints/}.

    Returns a summary dict (last metrics row, steps run, wall time).
    """
    from olmo_hybrid_jax.train.checkpoint import Checkpointer
    from olmo_hybrid_jax.train.data import make_dataset, make_iterator
    from olmo_hybrid_jax.train.metrics import MetricsWriter, format_postfix, progress_bar, truncate_metrics

    out = Path(out_dir)
    is_main = jax.process_index() == 0
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    trainer = Trainer(cfg, out)
    ckpt = Checkpointer(out / "checkpoints", every=cfg.checkpoint.every, keep=cfg.checkpoint.keep,
                        async_save=cfg.checkpoint.async_save)
    latest = ckpt.latest_step()
    if latest is not None and not resume:
        raise ConfigError(f"{out} already has checkpoints (latest step {latest}); pass --resume to continue "
                          "or choose a new --out")
    dataset, rows = make_dataset(cfg.data, trainer.eos_id, process_index=jax.process_index(),
                                 process_count=jax.process_count(), vocab_size=trainer.mcfg.vocab_size,
                                 max_id_cache=(out / "data_max_token_ids.json") if is_main else None)
    data_iter = make_iterator(dataset, cfg.data)
    mesh_desc = "x".join(f"{k}={v}" for k, v in trainer.mesh.shape.items())
    log(f"devices: {jax.device_count()} x {trainer.device_kind} ({jax.process_count()} process(es)); mesh {mesh_desc}")
    log(f"model: {trainer.param_count / 1e6:,.2f}M params, {trainer.mcfg.num_hidden_layers} layers, layout "
        f"{'scanned' if trainer.scanned else 'list'}, remat {cfg.model.remat}, compute {cfg.model.compute_dtype}; "
        f"{trainer.flops_per_token:.3e} train FLOPs/token")
    accum = (f" ({cfg.train.grad_accum_steps} microbatches of {trainer.micro_batch_size})"
             if cfg.train.grad_accum_steps > 1 else "")
    log(f"data: {len(rows):,} rows x {cfg.data.seq_len} from {rows.num_tokens:,} tokens in {len(rows.paths)} "
        f"file(s); global batch {cfg.data.global_batch_size}{accum}; document_aware={cfg.data.document_aware}")

    start_step = 0
    if resume and latest is not None:
        meta = ckpt.read_meta(latest)
        _warn_config_drift(meta.get("config", {}), cfg)
        state, data_state, _ = ckpt.restore(latest, _abstract_with_shardings(trainer))
        data_iter.set_state(data_state)
        start_step = int(jax.device_get(state["step"]))
        log(f"resumed from {out / 'checkpoints' / str(latest)} at step {start_step}")
    else:
        if resume:
            log(f"--resume: no checkpoint in {out / 'checkpoints'}; starting from scratch")
        state = trainer.init_state()
    if is_main:
        (out / "config.yaml").write_text(dump_yaml(cfg))
        if start_step == 0:
            (out / "metrics.jsonl").unlink(missing_ok=True)
        else:
            truncate_metrics(out / "metrics.jsonl", start_step)
    writer = MetricsWriter(out / "metrics.jsonl", enabled=is_main)
    total = cfg.train.steps
    meta = _meta(trainer)
    bar = progress_bar(start_step, total, cfg.train.progress and is_main)
    tokens_per_step = cfg.data.global_batch_size * cfg.data.seq_len
    ndev = jax.device_count()
    last_row: dict = {}
    pending = None
    t_prev = time.time()

    def flush(pending):
        nonlocal t_prev, last_row
        step, m = pending
        m = jax.device_get(m)
        now = time.time()
        dt = now - t_prev
        t_prev = now
        tps = tokens_per_step / dt if dt > 0 else None
        row = {"step": step, "loss": float(m["loss"]), "total_loss": float(m["total_loss"]),
               "z_loss": float(m["z_loss"]), "grad_norm": float(m["grad_norm"]), "lr": float(m["lr"]),
               "skipped": bool(m["skipped"]), "tokens": step * tokens_per_step, "step_time_s": dt,
               "tokens_per_s": tps, "tokens_per_s_per_device": tps / ndev if tps else None,
               "mfu": (tps * trainer.flops_per_token / (ndev * trainer.peak)) if (tps and trainer.peak) else None}
        writer.write(row)
        bar.update(1)
        bar.set_postfix(format_postfix(row), refresh=False)
        last_row = row

    stop = _install_sigterm_handler()
    try:
        for step in range(start_step + 1, total + 1):
            batch = trainer.device_batch(next(data_iter))
            state, metrics = trainer.step_fn(state, batch)
            if pending is not None:
                flush(pending)
            pending = (step, metrics)
            if step % cfg.checkpoint.every == 0 or step == total or stop["flag"]:
                flush(pending)  # the checkpoint's step must be logged before it is saved
                pending = None
                ckpt.save(step, state, data_iter.get_state(), meta, force=True)
                if stop["flag"]:
                    log(f"SIGTERM: saved step {step}; exiting (continue with --resume)")
                    break
        if pending is not None:
            flush(pending)
        ckpt.wait()
    finally:
        bar.close()
        writer.close()
        ckpt.close()
    reached = last_row.get("step", start_step)
    summary = {"last": last_row, "start_step": start_step, "steps": reached, "wall_s": time.time() - t_start}
    log(f"{'done' if reached >= total else 'stopped'}: step {reached} of {total}, "
        f"loss {last_row.get('loss', float('nan')):.4f}, {summary['wall_s']:.1f}s; "
        f"checkpoints {ckpt.all_steps()} in {out / 'checkpoints'}")
    return summary


def _install_sigterm_handler() -> dict:
    """On SIGTERM (preemption) finish the current step, checkpoint it and stop. Single-process only:
    with several processes each would stop at its own step, so there the default handler stays."""
    import signal
    import threading

    stop = {"flag": False}
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
        def handler(signum, frame):
            stop["flag"] = True

        signal.signal(signal.SIGTERM, handler)
    return stop


def _abstract_with_shardings(trainer: Trainer):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        trainer.abstract_state, trainer.state_sharding)


_DRIFT_IGNORED = {("train", "steps"), ("train", "progress"), ("checkpoint", "every"), ("checkpoint", "keep"),
                  ("checkpoint", "async_save"), ("data", "num_threads"), ("data", "prefetch")}


def _warn_config_drift(saved: dict, cfg: Config) -> None:
    now = cfg.to_dict()
    for sec, vals in now.items():
        for k, v in vals.items():
            if (sec, k) in _DRIFT_IGNORED:
                continue
            old = saved.get(sec, {}).get(k, v)
            if json.dumps(old, sort_keys=True) != json.dumps(v, sort_keys=True):
                log(f"warning: {sec}.{k} was {old!r} in the checkpoint, now {v!r}; the run will not match "
                    "an uninterrupted one")
