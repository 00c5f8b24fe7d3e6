"""OLMo-core's optimizer in optax: AdamW + global-norm clipping + a warmup schedule + the skip-step guard.

Schedules (``optim.schedule``): ``cosine`` (OLMo-core ``CosWithWarmup``, pretraining) and ``linear``
(``LinearWithWarmup``: the midtraining and long-context stages decay linearly to ``alpha_f * lr``).

``skip_step_adamw`` is one ``optax.GradientTransformationExtraArgs``; call
``tx.update(grads, state, params, loss=loss)``. Per step:

1. ``grad_norm`` = global L2 norm of the raw gradients (what is logged and what the guard watches).
2. The guard (OLMo-core ``SkipStepOptimizer``): with the last ``window`` (loss, grad_norm) pairs in a
   ring buffer, the step is skipped when ``loss - mean > sigma * std`` or ``grad_norm - mean > sigma *
   std`` (std with ddof=1), once at least ``max(2, window // 2)`` pairs have been seen. The current pair
   enters the buffer whether or not the step is skipped (as in OLMo-core). A non-finite loss or
   gradient norm is always skipped.
3. AdamW: clip to ``max_grad_norm``, Adam moments (b1, b2, eps), decoupled weight decay
   ``lr * wd * param`` on masked parameters, update ``-lr * (adam + wd * param)`` = PyTorch AdamW.
4. A skipped step leaves the Adam moments and counts untouched and applies a zero update
   (``jnp.where``, no host sync). The learning rate follows the global step, skipped steps included,
   as OLMo-core's scheduler does.

Everything the guard needs (ring buffer, counts) is in the optimizer state, so it is checkpointed.

Weight decay (``no_decay`` groups): OLMo-core decays everything except the embedding, and that is the
default here (``["embeddings"]``). Other groups can be exempted: ``norms`` (all RMSNorm weights),
``gdn_gates`` (``A_log``, ``dt_bias``: FLA marks them ``_no_weight_decay``, which OLMo-core does not
honour) and ``biases``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from olmo_hybrid_jax.train.sharding import path_str

NO_DECAY_GROUPS: dict[str, str] = {
    "embeddings": r"embed_tokens/embedding$",
    "norms": r"(norm|layernorm)/weight$",
    "gdn_gates": r"(A_log|dt_bias)$",
    "biases": r"/bias$",
}


def decay_mask(params, no_decay=("embeddings",)):
    """Tree of bools: True where weight decay applies."""
    pats = [re.compile(NO_DECAY_GROUPS[g]) for g in no_decay]
    return jax.tree_util.tree_map_with_path(lambda p, _: not any(r.search(path_str(p)) for r in pats), params)


SCHEDULES = ("cosine", "linear")


def lr_schedule(lr: float, warmup_steps: int, decay_steps: int, alpha_f: float = 0.1,
                kind: str = "cosine") -> optax.Schedule:
    """Linear 0 -> lr over warmup, then down to alpha_f * lr at decay_steps (held there after): a cosine
    (OLMo-core ``CosWithWarmup``) or a straight line (``LinearWithWarmup``)."""
    if kind == "cosine":
        return optax.warmup_cosine_decay_schedule(init_value=0.0, peak_value=lr, warmup_steps=warmup_steps,
                                                  decay_steps=decay_steps, end_value=alpha_f * lr)
    if kind != "linear":
        raise ValueError(f"unknown lr schedule {kind!r}; choose from {SCHEDULES}")
    warm = optax.linear_schedule(0.0, lr, max(warmup_steps, 1))  # optax's cosine form also warms from 0
    decay = optax.linear_schedule(lr, alpha_f * lr, decay_steps - warmup_steps)
    return optax.join_schedules([warm, decay], [warmup_steps]) if warmup_steps else decay


def _global_norm(tree):
    tree_ns = getattr(optax, "tree", None)  # optax >= 0.2.5; global_norm is deprecated there
    return tree_ns.norm(tree) if tree_ns is not None and hasattr(tree_ns, "norm") else optax.global_norm(tree)


class SkipStepState(NamedTuple):
    step: jax.Array          # int32: global steps seen (skipped ones too); drives the lr schedule
    inner: Any               # clip + Adam + decay state (frozen on skipped steps)
    losses: jax.Array        # [window] f32 ring buffer
    grad_norms: jax.Array    # [window] f32 ring buffer
    seen: jax.Array          # int32: pairs pushed into the buffers
    skipped: jax.Array       # int32: total skipped steps
    last_skipped: jax.Array  # bool: whether the latest step was skipped
    last_grad_norm: jax.Array  # f32: grad norm of the latest step (for logging)


def _mean_std(buf, n):
    """Mean and ddof=1 std of the first ``n`` valid entries of a ring buffer."""
    valid = jnp.arange(buf.shape[0]) < n
    nf = jnp.maximum(n.astype(jnp.float32), 1.0)
    mean = jnp.sum(jnp.where(valid, buf, 0.0)) / nf
    var = jnp.sum(jnp.where(valid, (buf - mean) ** 2, 0.0)) / jnp.maximum(nf - 1.0, 1.0)
    return mean, jnp.sqrt(var)


def skip_guard_decision(losses, grad_norms, seen, loss, grad_norm, *, sigma: float, window: int):
    """Whether to skip, from the history before this step (exposed for tests)."""
    n = jnp.minimum(seen, window)
    lm, ls = _mean_std(losses, n)
    gm, gs = _mean_std(grad_norms, n)
    ready = n >= max(2, window // 2)
    outlier = ((loss - lm) > sigma * ls) | ((grad_norm - gm) > sigma * gs)
    return (ready & outlier) | ~jnp.isfinite(loss) | ~jnp.isfinite(grad_norm)


def skip_step_adamw(schedule: Callable, *, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, mask=None,
                    max_grad_norm: float | None = 1.0, sigma: float = 6.0,
                    window: int = 128) -> optax.GradientTransformationExtraArgs:
    """AdamW with clipping, a step-indexed lr schedule and OLMo-core's skip-step guard (see module doc)."""
    parts = []
    if max_grad_norm is not None and max_grad_norm > 0:
        parts.append(optax.clip_by_global_norm(max_grad_norm))
    parts += [optax.scale_by_adam(b1=b1, b2=b2, eps=eps)]
    if weight_decay:
        parts.append(optax.add_decayed_weights(weight_decay, mask=mask))
    inner = optax.chain(*parts)
    W = max(int(window), 1)

    def init(params):
        return SkipStepState(step=jnp.zeros((), jnp.int32), inner=inner.init(params),
                             losses=jnp.zeros((W,), jnp.float32), grad_norms=jnp.zeros((W,), jnp.float32),
                             seen=jnp.zeros((), jnp.int32), skipped=jnp.zeros((), jnp.int32),
                             last_skipped=jnp.zeros((), bool), last_grad_norm=jnp.zeros((), jnp.float32))

    def update(grads, state: SkipStepState, params=None, *, loss=None, **extra):
        if loss is None:
            raise ValueError("skip_step_adamw.update needs loss=... (the step's loss)")
        loss = jnp.asarray(loss, jnp.float32)
        gnorm = _global_norm(grads).astype(jnp.float32)
        if window > 0:
            skip = skip_guard_decision(state.losses, state.grad_norms, state.seen, loss, gnorm,
                                       sigma=sigma, window=W)
        else:
            skip = ~jnp.isfinite(loss) | ~jnp.isfinite(gnorm)
        updates, new_inner = inner.update(grads, state.inner, params)
        lr = schedule(state.step + 1)  # 1-based step number, as OLMo-core (no zero-lr first step)
        updates = jax.tree.map(lambda u: jnp.where(skip, jnp.zeros_like(u), -lr * u), updates)
        new_inner = jax.tree.map(lambda o, n: jnp.where(skip, o, n), state.inner, new_inner)
        slot = state.seen % W
        finite = jnp.isfinite(loss) & jnp.isfinite(gnorm)  # a non-finite pair never enters the history
        new = SkipStepState(
            step=state.step + 1, inner=new_inner,
            losses=state.losses.at[slot].set(jnp.where(finite, loss, state.losses[slot])),
            grad_norms=state.grad_norms.at[slot].set(jnp.where(finite, gnorm, state.grad_norms[slot])),
            seen=state.seen + finite.astype(jnp.int32),
            skipped=state.skipped + skip.astype(jnp.int32), last_skipped=skip, last_grad_norm=gnorm)
        return updates, new

    return optax.GradientTransformationExtraArgs(init, update)


def make_optimizer(ocfg, params) -> tuple[optax.GradientTransformationExtraArgs, optax.Schedule]:
    """The trainer's optimizer and its lr schedule from an ``OptimConfig``."""
    schedule = lr_schedule(ocfg.lr, ocfg.warmup_steps, ocfg.decay_steps, ocfg.alpha_f, ocfg.schedule)
    tx = skip_step_adamw(schedule, b1=ocfg.b1, b2=ocfg.b2, eps=ocfg.eps, weight_decay=ocfg.weight_decay,
                         mask=decay_mask(params, ocfg.no_decay), max_grad_norm=ocfg.max_grad_norm,
                         sigma=ocfg.skip_sigma, window=ocfg.skip_window)
    return tx, schedule
