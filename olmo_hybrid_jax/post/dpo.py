"""Direct preference optimisation (DPO; IPO and hinge variants) of an OLMo Hybrid model on preference pairs.

    python -m olmo_hybrid_jax.post.dpo --init-from hf:DIR --data prefs.jsonl --out RUN --steps N --beta 0.1 \
        [--loss-type sigmoid|ipo|hinge] [--lora --lora-rank 8] [--export-hf HF_DIR]

Data (``read_preferences``, ``split_pair``): JSONL, one pair a line, in the common HF / TRL shapes:

- explicit prompt: ``{"prompt": [messages], "chosen": [assistant messages], "rejected": [...]}``; a
  ``chosen`` / ``rejected`` that repeats the prompt messages first has them removed;
- implicit prompt: ``{"chosen": [conversation], "rejected": [conversation]}``: the prompt is the longest
  shared leading run of messages (TRL's ``extract_prompt``), the completions the rest;
- strings: a string prompt is one user message, a string completion one assistant message.

Each sequence is ``render(prompt, add_generation_prompt=True)`` + the completion's text (the rendering
of prompt + completion minus that prefix), the two tokenized separately and concatenated (as TRL), so
the completion mask is exact; the mask covers the completion's tokens only (the template's end-of-turn
token included). Pairs are right-padded to ``max_len`` (causal model: padding after a sequence changes
nothing before it), chosen and rejected of a pair always in the same batch; nothing is packed (one
sequence a row keeps the per-sequence sums one pass of the fused loss). A pair longer than ``max_len``
is cut from the left of its prompt (``truncation="left"``, keeping at least one prompt token) or dropped
(``"drop"``; also when its completion alone does not fit); ``PreferenceData.stats`` counts both.

Sequence log-probs (``sequence_logprobs``): per row, the sum of log p(token) over masked targets, from
``train.loss.cross_entropy_sums`` (the fused chunked CE, no [B, T, V] logits): forward one call per row
(vmap), backward one call with the mask weighted by each row's cotangent (the CE sum is linear in the mask).

Reference log-probs: from the frozen starting model, computed once over the dataset and cached in a
``.npy`` next to the data, named by a hash of the data file, the reference checkpoint's files (or its
parameters) and the encoding settings (``reference_logprobs``, ``cached_reference_logprobs``); or on the
fly each step (``reference="on-the-fly"``: a second copy of the starting parameters for full fine-tuning;
with LoRA (``post.lora``, ``--lora``) the base model, i.e. the same weights with zero adapters, no copy).

Losses (``dpo_loss``, TRL's DPOTrainer definitions, h = (pi_c - ref_c) - (pi_r - ref_r)):
sigmoid ``-(1-eps) log sigma(beta h) - eps log sigma(-beta h)`` (eps = label smoothing, cDPO),
ipo ``(h - 1/(2 beta))^2`` on log-probs averaged over each completion's tokens (as TRL), hinge
``relu(1 - beta h)``. Metrics as TRL names them: ``rewards/chosen`` = mean beta (pi_c - ref_c),
``rewards/rejected``, ``rewards/accuracies`` (chosen reward > rejected), ``rewards/margins``,
``logps/chosen``, ``logps/rejected``.

Training (``DPOTrainer``): one jit-compiled step (value_and_grad + optax AdamW with global-norm
clipping) on one device, no mesh; the multi-host / FSDP machinery of ``train.trainer`` is not used
(a single-process tool for models that fit one device). The CLI writes ``RUN/metrics.jsonl`` (one row
a step), ``RUN/dpo.json`` (settings and data counts) and with ``--export-hf`` an HF checkpoint
(``convert.save_hf``; LoRA merged first) plus the tokenizer files.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from olmo_hybrid_jax.train.loss import cross_entropy_sums

LOSS_TYPES = ("sigmoid", "ipo", "hinge")
TRUNCATIONS = ("left", "drop")
REFERENCE_MODES = ("cached", "on-the-fly")


class PreferenceDataError(ValueError):
    """A preference row (or file) that cannot be used; one line naming the row."""


# ------------------------------------------------------------------------------------------------- data
def read_preferences(path: str | Path) -> list[dict]:
    """The rows of a preference JSONL file (blank lines skipped); one-line errors name the line."""
    path = Path(path)
    if not path.is_file():
        raise PreferenceDataError(f"no preference file at {path}")
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise PreferenceDataError(f"{path}:{n}: not JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise PreferenceDataError(f"{path}:{n}: a row must be a JSON object, got {type(row).__name__}")
            rows.append(row)
    if not rows:
        raise PreferenceDataError(f"{path} holds no preference rows")
    return rows


def _messages(x, role: str, where: str, field: str) -> list[dict]:
    """A message list from a list of {role, content} dicts or a string (one message of ``role``)."""
    if isinstance(x, str):
        return [{"role": role, "content": x}]
    if isinstance(x, dict):  # a single message
        x = [x]
    if not isinstance(x, list) or not all(isinstance(m, dict) and "role" in m and "content" in m for m in x):
        raise PreferenceDataError(f"{where}: {field!r} must be a string or a list of {{role, content}} messages")
    return [dict(m) for m in x]


def split_pair(row: dict, where: str = "row") -> tuple[list[dict], list[dict], list[dict]]:
    """(prompt messages, chosen completion messages, rejected completion messages) of one row (see module doc)."""
    for key in ("chosen", "rejected"):
        if key not in row or row[key] is None:
            raise PreferenceDataError(f"{where}: no {key!r}")
    chosen = _messages(row["chosen"], "assistant", where, "chosen")
    rejected = _messages(row["rejected"], "assistant", where, "rejected")
    if row.get("prompt") is not None:
        prompt = _messages(row["prompt"], "user", where, "prompt")
        k = len(prompt)
        if chosen[:k] == prompt and rejected[:k] == prompt:  # full conversations that repeat the prompt
            chosen, rejected = chosen[k:], rejected[k:]
    else:
        k = 0
        while k < min(len(chosen), len(rejected)) - 1 and chosen[k] == rejected[k]:
            k += 1
        prompt, chosen, rejected = chosen[:k], chosen[k:], rejected[k:]
        if not prompt:
            raise PreferenceDataError(f"{where}: no 'prompt' and chosen/rejected share no leading messages")
    for key, c in (("chosen", chosen), ("rejected", rejected)):
        if not c or all(not str(m.get("content") or "").strip() for m in c):
            raise PreferenceDataError(f"{where}: empty {key} completion")
    return prompt, chosen, rejected


def _encode(tokenizer, text: str) -> list[int]:
    """Token ids of ``text``, no added special tokens (a ``chat.load_tokenizer`` result or a tokenizers.Tokenizer)."""
    from tokenizers import Tokenizer

    if isinstance(tokenizer, Tokenizer):
        return tokenizer.encode(text, add_special_tokens=False).ids
    out = tokenizer.encode(text)  # chat's tokenizers: (ids, offsets), no added special tokens
    return [int(i) for i in (out[0] if isinstance(out, tuple) else out)]


def encode_completion(prompt: list[dict], completion: list[dict], template: str, tokenizer, where: str):
    """(prompt ids, completion ids): the prompt rendered with the generation prompt, then the completion's text
    (the rendering of prompt + completion after that prefix), tokenized separately."""
    from olmo_hybrid_jax.post import chat

    try:
        prefix = chat.render(prompt, template, tokenizer=tokenizer, add_generation_prompt=True)
        full = chat.render(prompt + completion, template, tokenizer=tokenizer, add_generation_prompt=False)
    except chat.ChatError as e:
        raise PreferenceDataError(f"{where}: {e}") from None
    if not full.startswith(prefix):
        raise PreferenceDataError(f"{where}: the chat template's rendering of prompt + completion does not start "
                                  f"with the prompt's rendering with the generation prompt")
    p, c = _encode(tokenizer, prefix), _encode(tokenizer, full[len(prefix):])
    if not p:  # the first completion token is predicted from the prompt's last
        raise PreferenceDataError(f"{where}: the prompt renders to no tokens")
    if not c:
        raise PreferenceDataError(f"{where}: the completion renders to no tokens")
    return p, c


@dataclasses.dataclass
class PreferenceData:
    """Encoded pairs: ``ids`` [N, 2, T] int32 (pair i's chosen at [i, 0], rejected at [i, 1], right-padded)
    and ``mask`` [N, 2, T] bool (target t, i.e. token t + 1, is a completion token); ``rows`` [N] the
    source row of each kept pair; ``stats`` counts rows, pairs, truncated and dropped pairs."""

    ids: np.ndarray
    mask: np.ndarray
    rows: np.ndarray
    stats: dict

    def __len__(self) -> int:
        return self.ids.shape[0]


def encode_pairs(rows: Sequence[dict], template, tokenizer, *, max_len: int, pad_id: int = 0,
                 truncation: str = "left", vocab_size: int | None = None, source: str = "row") -> PreferenceData:
    """Encode preference rows (``split_pair`` shapes) into fixed-length pairs; see the module doc."""
    if truncation not in TRUNCATIONS:
        raise ValueError(f"truncation={truncation!r}; choose from {TRUNCATIONS}")
    if max_len < 2:
        raise ValueError(f"max_len={max_len} leaves no room for a prompt and a completion")
    ids, masks, kept = [], [], []
    truncated = dropped = 0
    for n, row in enumerate(rows):
        where = f"{source} {n + 1}"
        prompt, chosen, rejected = split_pair(row, where)
        p, c = encode_completion(prompt, chosen, template, tokenizer, where)
        p2, r = encode_completion(prompt, rejected, template, tokenizer, where)
        if p2 != p:
            raise PreferenceDataError(f"{where}: the prompt renders differently before chosen and rejected")
        if vocab_size is not None:
            top = max(p + c + r)
            if top >= vocab_size:
                raise PreferenceDataError(f"{where}: token id {top} is outside the model's vocabulary "
                                          f"[0, {vocab_size})")
        longest = max(len(c), len(r))
        if len(p) + longest > max_len:
            if truncation == "drop" or longest > max_len - 1:
                dropped += 1
                continue
            p = p[len(p) + longest - max_len:]  # keep the prompt's end, next to the completion
            truncated += 1
        pair_ids = np.full((2, max_len), pad_id, np.int32)
        pair_mask = np.zeros((2, max_len), bool)
        for j, comp in enumerate((c, r)):
            seq = p + comp
            pair_ids[j, :len(seq)] = seq
            pair_mask[j, len(p) - 1:len(seq) - 1] = True  # target t is token t + 1
        ids.append(pair_ids)
        masks.append(pair_mask)
        kept.append(n)
    stats = dict(rows=len(rows), pairs=len(kept), truncated=truncated, dropped=dropped, max_len=max_len,
                 truncation=truncation)
    if not kept:
        raise PreferenceDataError(f"no pair of {len(rows)} fits max_len={max_len} (all dropped)")
    return PreferenceData(np.stack(ids), np.stack(masks), np.asarray(kept, np.int64), stats)


def load_preference_data(path: str | Path, template, tokenizer, **kwargs) -> PreferenceData:
    """``encode_pairs`` of ``read_preferences(path)``; errors name the file's row."""
    return encode_pairs(read_preferences(path), template, tokenizer, source=str(path) + " row", **kwargs)


# ------------------------------------------------------------------------------------------- log-probs
@partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _row_logprob_sums(hidden, kernel, labels, mask, chunk, compute_dtype):
    def one(h, lab, m):
        return cross_entropy_sums(h[None], kernel, lab[None], m[None], chunk=chunk, compute_dtype=compute_dtype)[0]

    return -jax.vmap(one)(hidden, labels, mask)


def _row_logprob_sums_fwd(hidden, kernel, labels, mask, chunk, compute_dtype):
    return _row_logprob_sums(hidden, kernel, labels, mask, chunk, compute_dtype), (hidden, kernel, labels, mask)


def _row_logprob_sums_bwd(chunk, compute_dtype, res, ct):
    hidden, kernel, labels, mask = res
    # sum_b ct_b * logp_b = -(the CE sum with the mask weighted by ct_b): one fused call, one [H, V] gradient
    weights = -ct.astype(jnp.float32)[:, None] * mask.astype(jnp.float32)
    _, vjp = jax.vjp(lambda h, k: cross_entropy_sums(h, k, labels, weights, chunk=chunk,
                                                     compute_dtype=compute_dtype)[0], hidden, kernel)
    dh, dk = vjp(jnp.ones((), jnp.float32))
    return dh, dk, None, None


_row_logprob_sums.defvjp(_row_logprob_sums_fwd, _row_logprob_sums_bwd)


def sequence_logprobs(hidden: jax.Array, kernel: jax.Array, labels: jax.Array, mask: jax.Array, *,
                      chunk: int = 1024, compute_dtype=None) -> jax.Array:
    """[B] fp32: per row, the sum over ``mask``ed targets of log p(labels) under ``hidden @ kernel``.

    hidden [B, T, H] (final-normed), kernel [H, V], labels [B, T] int, mask [B, T] bool. Differentiable
    in hidden and kernel, through ``train.loss.cross_entropy_sums`` (its fused CE; no [B, T, V] logits).
    """
    if hidden.ndim != 3 or labels.shape != hidden.shape[:2] or mask.shape != hidden.shape[:2]:
        raise ValueError(f"sequence_logprobs: hidden [B, T, H] with labels and mask [B, T] expected, got "
                         f"{hidden.shape}, {labels.shape}, {mask.shape}")
    return _row_logprob_sums(hidden, kernel, labels, mask, int(chunk),
                             None if compute_dtype is None else jnp.dtype(compute_dtype))


def shifted_labels(ids: jax.Array) -> jax.Array:
    """Next-token labels [B, T] of ids [B, T] (the last position's label is a 0 that every mask excludes)."""
    return jnp.pad(ids[:, 1:], ((0, 0), (0, 1)))


def model_logprobs(model, ids: jax.Array, mask: jax.Array, *, chunk: int = 1024) -> jax.Array:
    """Sequence log-probs of ``model`` (an ``OlmoHybridForCausalLM``): ids [..., T], mask [..., T] -> [...]."""
    lead = ids.shape[:-1]
    ids2, mask2 = ids.reshape(-1, ids.shape[-1]), mask.reshape(-1, mask.shape[-1])
    h = model.model(ids2)
    out = sequence_logprobs(h, model.lm_head_kernel(), shifted_labels(ids2), mask2, chunk=chunk,
                            compute_dtype=model.options.dtype)
    return out.reshape(lead)


# ------------------------------------------------------------------------------------------------ loss
def dpo_loss(policy: jax.Array, reference: jax.Array, *, beta: float = 0.1, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0, lengths: jax.Array | None = None) -> tuple[jax.Array, dict]:
    """(mean loss, metrics) over pairs: ``policy`` and ``reference`` [P, 2] log-probs (chosen, rejected).

    ``lengths`` [P, 2] (completion token counts) is needed for ``ipo``, whose log-probs are per-token means
    (as TRL). Metrics: TRL's ``rewards/chosen``, ``rewards/rejected``, ``rewards/accuracies``,
    ``rewards/margins``, ``logps/chosen``, ``logps/rejected`` (means over pairs, no gradient).
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type={loss_type!r}; choose from {LOSS_TYPES}")
    if label_smoothing and loss_type != "sigmoid":
        raise ValueError(f"label_smoothing applies to the sigmoid loss only, not {loss_type!r}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing={label_smoothing} must be in [0, 0.5)")
    policy, reference = policy.astype(jnp.float32), reference.astype(jnp.float32)
    if loss_type == "ipo":
        if lengths is None:
            raise ValueError("the ipo loss needs the completion lengths")
        n = jnp.maximum(lengths.astype(jnp.float32), 1.0)
        policy, reference = policy / n, reference / n
    ratios = policy - reference  # [P, 2]: log pi/ref of chosen, rejected
    h = ratios[:, 0] - ratios[:, 1]
    if loss_type == "sigmoid":
        eps = label_smoothing
        losses = -(1.0 - eps) * jax.nn.log_sigmoid(beta * h) - eps * jax.nn.log_sigmoid(-beta * h)
    elif loss_type == "ipo":
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    else:
        losses = jax.nn.relu(1.0 - beta * h)
    rewards = jax.lax.stop_gradient(beta * ratios)
    logps = jax.lax.stop_gradient(policy)
    metrics = {"rewards/chosen": rewards[:, 0].mean(), "rewards/rejected": rewards[:, 1].mean(),
               "rewards/accuracies": (rewards[:, 0] > rewards[:, 1]).astype(jnp.float32).mean(),
               "rewards/margins": (rewards[:, 0] - rewards[:, 1]).mean(),
               "logps/chosen": logps[:, 0].mean(), "logps/rejected": logps[:, 1].mean()}
    return losses.mean(), metrics


# ------------------------------------------------------------------------------------ reference log-probs
def _batches(n: int, size: int):
    for start in range(0, n, size):
        yield np.arange(start, min(start + size, n))


def reference_logprobs(model, data: PreferenceData, *, batch_pairs: int = 8, chunk: int = 1024) -> np.ndarray:
    """[N, 2] fp32 sequence log-probs of every pair under ``model`` (batches of ``batch_pairs``, the last
    padded with copies of its first pair so one compilation serves all)."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, ids, mask):
        return model_logprobs(nnx.merge(graphdef, state), ids, mask, chunk=chunk)

    out = np.zeros((len(data), 2), np.float32)
    for idx in _batches(len(data), batch_pairs):
        full = np.concatenate([idx, np.full(batch_pairs - len(idx), idx[0])])
        out[idx] = np.asarray(run(state, data.ids[full], data.mask[full]))[:len(idx)]
    return out


def file_fingerprint(paths: Sequence[Path]) -> str:
    """sha256 of the files' names and contents, in the given order."""
    h = hashlib.sha256()
    for p in paths:
        h.update(Path(p).name.encode() + b"\0")
        with open(p, "rb") as f:
            while block := f.read(1 << 24):
                h.update(block)
    return h.hexdigest()


def checkpoint_fingerprint(path: str | Path) -> str:
    """sha256 of an HF checkpoint folder's config.json, index and safetensors files (or an orbax folder's files)."""
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")
                   and (p.suffix in (".json", ".safetensors") or "params" in p.relative_to(path).parts))
    if not files:
        raise FileNotFoundError(f"no checkpoint files under {path}")
    return file_fingerprint(files)


def params_fingerprint(model) -> str:
    """sha256 of a model's parameters (paths, dtypes, shapes, bytes): a reference key without a checkpoint."""
    h = hashlib.sha256()
    for path, x in sorted(jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(nnx.state(model, nnx.Param))),
                          key=lambda kv: jax.tree_util.keystr(kv[0])):
        a = np.asarray(jax.device_get(x))
        h.update(f"{jax.tree_util.keystr(path)}|{a.dtype}|{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def reference_cache_path(data_path: str | Path, data: PreferenceData, model_key: str, extra: str = "") -> Path:
    """``DATA.ref-<key>.npy`` next to the data; key = hash of the data file, the reference and the encoding."""
    data_path = Path(data_path)
    h = hashlib.sha256()
    h.update(file_fingerprint([data_path]).encode())
    h.update(model_key.encode())
    h.update(hashlib.sha256(data.ids.tobytes() + data.mask.tobytes()).hexdigest().encode())  # template, tokenizer
    h.update(extra.encode())
    return data_path.with_name(f"{data_path.name}.ref-{h.hexdigest()[:16]}.npy")


def cached_reference_logprobs(model, data: PreferenceData, cache: Path | None, *, batch_pairs: int = 8,
                              chunk: int = 1024, log: Callable[[str], None] = lambda s: None) -> np.ndarray:
    """``reference_logprobs``, read from ``cache`` when it holds them (right shape) and written there otherwise."""
    if cache is not None and cache.is_file():
        ref = np.load(cache)
        if ref.shape == (len(data), 2) and np.all(np.isfinite(ref)):
            log(f"reference log-probs from {cache}")
            return ref
        log(f"ignoring {cache}: shape {ref.shape}, want {(len(data), 2)}")
    t0 = time.time()
    ref = reference_logprobs(model, data, batch_pairs=batch_pairs, chunk=chunk)
    log(f"reference log-probs of {len(data)} pairs in {time.time() - t0:.1f}s")
    if cache is not None:
        try:
            tmp = cache.with_name(cache.name + ".tmp.npy")
            np.save(tmp, ref)
            tmp.replace(cache)
            log(f"cached them in {cache}")
        except OSError as e:  # a read-only data folder: compute again next time
            log(f"could not cache reference log-probs at {cache}: {e}")
    return ref


# -------------------------------------------------------------------------------------------- training
@dataclasses.dataclass(frozen=True)
class DPOConfig:
    """The step's settings (hashable: static under jit)."""

    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    lr: float = 1e-6
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    b1: float = 0.9
    b2: float = 0.999
    loss_chunk: int = 1024
    reference: str = "cached"

    def __post_init__(self):
        if self.beta <= 0:
            raise ValueError(f"beta={self.beta} must be positive")
        if self.reference not in REFERENCE_MODES:
            raise ValueError(f"reference={self.reference!r}; choose from {REFERENCE_MODES}")
        dpo_loss(jnp.zeros((1, 2)), jnp.zeros((1, 2)), beta=self.beta, loss_type=self.loss_type,
                 label_smoothing=self.label_smoothing, lengths=jnp.ones((1, 2)))  # the loss's own checks


def pair_loss(model, batch: dict, cfg: DPOConfig, reference: jax.Array) -> tuple[jax.Array, dict]:
    """DPO loss and metrics of ``model`` on ``batch`` (ids, mask [P, 2, T]) against ``reference`` [P, 2]."""
    pi = model_logprobs(model, batch["ids"], batch["mask"], chunk=cfg.loss_chunk)
    return dpo_loss(pi, reference, beta=cfg.beta, loss_type=cfg.loss_type, label_smoothing=cfg.label_smoothing,
                    lengths=batch["mask"].sum(-1))


def make_optimizer(cfg: DPOConfig, trainable) -> optax.GradientTransformation:
    """Global-norm clipping + AdamW (weight decay off the embedding and 1-D parameters), linear warmup."""
    schedule = optax.linear_schedule(0.0, cfg.lr, cfg.warmup_steps) if cfg.warmup_steps else cfg.lr
    mask = jax.tree_util.tree_map_with_path(
        lambda p, x: x.ndim >= 2 and "embed_tokens" not in jax.tree_util.keystr(p), trainable)
    parts = [optax.clip_by_global_norm(cfg.max_grad_norm)] if cfg.max_grad_norm else []
    parts.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay, mask=mask))
    return optax.chain(*parts)


class DPOTrainer:
    """A model, its trainable part (all parameters, or the LoRA adapters) and the jit-compiled DPO step.

    ``trainable_filter`` picks the trained variables (``nnx.Param``; with LoRA ``lora.LoraParam``, the adapters);
    everything else is frozen. ``reference_state``: for ``reference="on-the-fly"``, the trainable state of
    the reference, or a function of the starting one (None: a copy of it, a second copy of the weights for
    full fine-tuning; with LoRA pass ``adapters_off``: the base model, no copy).
    The trainable arrays are donated to the first step: ``model`` itself is spent (use ``trainer.model()``).
    """

    def __init__(self, model, cfg: DPOConfig, *, trainable_filter=nnx.Param, reference_state=None):
        self.cfg = cfg
        self.graphdef, self.trainable, self.frozen = nnx.split(model, trainable_filter, ...)
        self.tx = make_optimizer(cfg, self.trainable)
        self.opt_state = self.tx.init(self.trainable)
        self.ref_state = None
        if cfg.reference == "on-the-fly":
            ref = (lambda t: jax.tree.map(jnp.copy, t)) if reference_state is None else reference_state
            self.ref_state = ref(self.trainable) if callable(ref) else ref
        self.step_count = 0
        self._step = jax.jit(self._step_impl, donate_argnums=(0, 2))

    def loss(self, trainable, frozen, batch, ref_state=None):
        """(loss, metrics) of the model with ``trainable`` on ``batch`` (with ``ref`` [P, 2] when cached)."""
        model = nnx.merge(self.graphdef, trainable, frozen)
        if self.cfg.reference == "on-the-fly":
            ref_model = nnx.merge(self.graphdef, ref_state, frozen)
            ref = jax.lax.stop_gradient(model_logprobs(ref_model, batch["ids"], batch["mask"],
                                                       chunk=self.cfg.loss_chunk))
        else:
            ref = batch["ref"]
        return pair_loss(model, batch, self.cfg, ref)

    def _step_impl(self, trainable, frozen, opt_state, ref_state, batch):
        (loss, metrics), grads = jax.value_and_grad(self.loss, has_aux=True)(trainable, frozen, batch, ref_state)
        updates, opt_state = self.tx.update(grads, opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        return trainable, opt_state, {"loss": loss, **metrics, "grad_norm": optax.tree.norm(grads)}

    def step(self, batch: dict) -> dict:
        """One optimizer step on ``batch`` (ids, mask [P, 2, T]; ref [P, 2] when cached); host metrics."""
        self.trainable, self.opt_state, metrics = self._step(self.trainable, self.frozen, self.opt_state,
                                                             self.ref_state, batch)
        self.step_count += 1
        return {k: float(v) for k, v in jax.device_get(metrics).items()}

    def model(self):
        """The current model (trained variables merged back)."""
        return nnx.merge(self.graphdef, self.trainable, self.frozen)


def batch_stream(n: int, batch_pairs: int, seed: int = 0):
    """Index batches of ``batch_pairs`` pairs forever: one shuffled pass after another, batches running on
    across passes (every pair used; a pair may appear twice in a batch only when n < batch_pairs)."""
    rng = np.random.default_rng(seed)
    buf = np.zeros(0, np.int64)
    while True:
        while len(buf) < batch_pairs:
            buf = np.concatenate([buf, rng.permutation(n)])
        yield buf[:batch_pairs]
        buf = buf[batch_pairs:]


def make_batch(data: PreferenceData, idx: np.ndarray, ref: np.ndarray | None = None) -> dict:
    """The step's inputs for pairs ``idx``: ids, mask [P, 2, T] and, with cached references, ref [P, 2]."""
    batch = {"ids": jnp.asarray(data.ids[idx]), "mask": jnp.asarray(data.mask[idx])}
    if ref is not None:
        batch["ref"] = jnp.asarray(ref[idx])
    return batch


# ------------------------------------------------------------------------------------------------- LoRA
# With LoRA (olmo_hybrid_jax.post.lora) the reference is the base model, i.e. the adapters off: the cached
# reference is computed before the adapters are added, the on-the-fly one runs the adapted model with zero
# adapters (``adapters_off``); the base weights exist once either way.
def _lora_module():
    try:
        from olmo_hybrid_jax.post import lora
    except ImportError:
        return None
    return lora


def adapters_off(adapters):
    """Zero adapters shaped like ``adapters`` (lora_a = lora_b = 0: the adapted model computes the base's)."""
    return jax.tree.map(jnp.zeros_like, adapters)


def add_lora(model, lora_cfg, *, seed: int = 0) -> tuple[Any, list[str]]:
    """(the trainable filter, adapted module names) after adding ``lora_cfg``'s adapters to ``model`` in place."""
    lora = _lora_module()
    if lora is None:
        raise ValueError("LoRA needs olmo_hybrid_jax.post.lora, which this checkout does not have")
    names = lora.apply_lora(model, lora_cfg, rngs=nnx.Rngs(seed))
    return lora.LoraParam, names


# -------------------------------------------------------------------------------------------------- CLI
def _error(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 2


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m olmo_hybrid_jax.post.dpo", description=__doc__.split("\n")[0])
    ap.add_argument("--init-from", required=True, help="hf:DIR or orbax:DIR, the starting (and reference) model")
    ap.add_argument("--data", required=True, help="preference JSONL (see the module doc for the row shapes)")
    ap.add_argument("--out", required=True, help="run folder: metrics.jsonl, dpo.json")
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--loss-type", choices=LOSS_TYPES, default="sigmoid")
    ap.add_argument("--label-smoothing", type=float, default=0.0)
    ap.add_argument("--batch-pairs", type=int, default=4, help="pairs a step (2x rows)")
    ap.add_argument("--max-len", type=int, default=1024, help="tokens a sequence (prompt + completion)")
    ap.add_argument("--truncation", choices=TRUNCATIONS, default="left",
                    help="a too-long pair: cut its prompt from the left, or drop it")
    ap.add_argument("--lr", type=float, default=1e-6)
    ap.add_argument("--warmup-steps", type=int, default=0)
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--max-grad-norm", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reference", choices=REFERENCE_MODES, default="cached")
    ap.add_argument("--ref-cache", default=None, help="reference cache file (default: DATA.ref-<key>.npy); 'off'")
    ap.add_argument("--tokenizer", default=None,
                    help="tokenizer folder, tokenizer.json or 'bytes' (default: the --init-from folder)")
    ap.add_argument("--chat-template", default=None,
                    help="a .jinja file, a folder or 'bytes' (default: the tokenizer's chat template)")
    ap.add_argument("--dtype", default="float32", help="parameter dtype")
    ap.add_argument("--compute-dtype", default=None, help="matmul dtype (default: the parameter dtype)")
    ap.add_argument("--loss-chunk", type=int, default=1024)
    ap.add_argument("--lora", action="store_true", help="train LoRA adapters instead of all parameters")
    ap.add_argument("--lora-rank", type=int, default=8)
    ap.add_argument("--lora-alpha", type=float, default=16.0)
    ap.add_argument("--lora-targets", default=None,
                    help="comma-separated presets / names / patterns (lora.py's; default: all)")
    ap.add_argument("--export-hf", default=None, help="write the trained model here as an HF checkpoint")
    ap.add_argument("--overwrite", action="store_true", help="reuse a run folder / replace an exported checkpoint")
    ap.add_argument("--log-every", type=int, default=1)
    return ap


def _load_model(spec: str, dtype, compute_dtype):
    from olmo_hybrid_jax import convert

    kind, _, path = spec.partition(":")
    if kind not in ("hf", "orbax") or not path:
        raise ValueError(f"--init-from {spec!r}: expected hf:DIR or orbax:DIR")
    p = Path(path)
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"--init-from {spec!r}: no config.json in {p}")
    load = convert.load_hf if kind == "hf" else convert.load_orbax
    kw = {"progress": False} if kind == "hf" else {}
    return load(p, dtype=dtype, compute_dtype=compute_dtype, **kw), p


def _load_tokenizer_and_template(tok_spec: str, template_file: str | None):
    from olmo_hybrid_jax.post import chat

    tok = chat.load_tokenizer(tok_spec)
    return tok, chat.load_chat_template(template_file if template_file else tok_spec)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from olmo_hybrid_jax.convert import CheckpointMismatchError, canonical_dtype, check_output_dir

    out = Path(args.out)
    try:  # everything the flags alone decide, before any loading
        cfg = DPOConfig(beta=args.beta, loss_type=args.loss_type, label_smoothing=args.label_smoothing, lr=args.lr,
                        warmup_steps=args.warmup_steps, weight_decay=args.weight_decay,
                        max_grad_norm=args.max_grad_norm, loss_chunk=args.loss_chunk, reference=args.reference)
        if args.steps < 1 or args.batch_pairs < 1 or args.log_every < 1:
            raise ValueError("--steps, --batch-pairs and --log-every must be positive")
        dtype, cdt = canonical_dtype(args.dtype), canonical_dtype(args.compute_dtype)
        if (out / "metrics.jsonl").exists() and not args.overwrite:
            raise FileExistsError(f"{out} already holds a run (metrics.jsonl); pass --overwrite to replace it")
        if args.export_hf:
            check_output_dir(args.export_hf, args.overwrite)
        lora = _lora_module() if args.lora else None
        if args.lora and lora is None:
            raise ValueError("--lora needs olmo_hybrid_jax.post.lora, which this checkout does not have")
        lora_cfg = None
        if lora is not None:
            targets = tuple(t.strip() for t in args.lora_targets.split(",")) if args.lora_targets else ("all",)
            lora_cfg = lora.LoraConfig(rank=args.lora_rank, alpha=args.lora_alpha, targets=targets)
        if not Path(args.data).is_file():
            raise FileNotFoundError(f"--data {args.data}: no such file")
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        return _error(str(e))
    try:
        model, ckpt_dir = _load_model(args.init_from, dtype, cdt)
        tok_spec = args.tokenizer or str(ckpt_dir)
        tok, template = _load_tokenizer_and_template(tok_spec, args.chat_template)
        data = load_preference_data(args.data, template, tok, max_len=args.max_len, pad_id=tok.pad_id,
                                    truncation=args.truncation, vocab_size=model.config.vocab_size)
    except (CheckpointMismatchError, PreferenceDataError, ValueError, FileNotFoundError, OSError) as e:
        return _error(str(e))
    st = data.stats
    _log(f"{st['pairs']} pairs of {st['rows']} rows ({st['truncated']} truncated from the left of the prompt, "
         f"{st['dropped']} dropped as too long for max_len={st['max_len']})")
    ref = None
    if cfg.reference == "cached":
        cache = None
        if args.ref_cache != "off":
            extra = f"max_len={args.max_len}|dtype={dtype}|cdt={cdt}"
            cache = (Path(args.ref_cache) if args.ref_cache else
                     reference_cache_path(args.data, data, checkpoint_fingerprint(ckpt_dir), extra))
        ref = cached_reference_logprobs(model, data, cache, batch_pairs=args.batch_pairs, chunk=args.loss_chunk,
                                        log=_log)
    filt, ref_state = nnx.Param, None
    if lora_cfg is not None:
        try:
            filt, names = add_lora(model, lora_cfg, seed=args.seed)
        except ValueError as e:
            return _error(str(e))
        ref_state = adapters_off
        _log(f"LoRA rank {lora_cfg.rank} on {len(names)} modules")
    trainer = DPOTrainer(model, cfg, trainable_filter=filt, reference_state=ref_state)
    out.mkdir(parents=True, exist_ok=True)
    (out / "dpo.json").write_text(json.dumps({"args": vars(args), "data": st, "config": dataclasses.asdict(cfg)},
                                             indent=2, default=str))
    stream = batch_stream(len(data), args.batch_pairs, args.seed)
    t0 = time.time()
    with open(out / "metrics.jsonl", "w") as f:
        for step in range(1, args.steps + 1):
            row = {"step": step, **trainer.step(make_batch(data, next(stream), ref)), "time": time.time() - t0}
            f.write(json.dumps(row) + "\n")
            f.flush()
            if step % args.log_every == 0 or step == args.steps:
                _log(f"step {step}: loss {row['loss']:.4f} margin {row['rewards/margins']:.4f} "
                     f"acc {row['rewards/accuracies']:.2f}")
    if args.export_hf:
        _export(trainer, lora, args, None if tok_spec == "bytes" else Path(tok_spec))
    return 0


def _export(trainer: DPOTrainer, lora, args, tok_dir: Path | None) -> None:
    from olmo_hybrid_jax.convert import save_hf

    model = trainer.model()
    if lora is not None:
        model = lora.merge_lora(model)
    save_hf(model, args.export_hf, overwrite=args.overwrite, progress=False)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if tok_dir is None or not tok_dir.is_dir():
            break
        src, dst = tok_dir / name, Path(args.export_hf) / name
        if src.is_file() and not dst.exists():
            shutil.copy(src, dst)
    _log(f"wrote {args.export_hf}")


if __name__ == "__main__":
    sys.exit(main())
