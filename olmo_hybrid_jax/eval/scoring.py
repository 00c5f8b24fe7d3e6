"""Exact token scoring on the hybrid caches: what the lm-eval model and ``ppl`` are built on.

:func:`score_continuations` computes log p(continuation | prefix) for (prefix, continuation) pairs
on ``generate.prefill`` / ``generate.extend`` (fp32 log-softmax). Each distinct prefix is prefilled
once (left-padded into a batch); its cache (GDN state, conv windows, K/V) is then gathered once per
continuation and extended by the continuation's tokens, right-padded (causal: a pad after the last
real token changes no logit before it), ``window`` tokens per call with the cache carried from one
call to the next. A multiple-choice question costs one context forward plus one short extension per
choice; a long continuation is scored exactly (every token sees all tokens before it: there are no
window restarts), with constant memory per GDN layer and the whole sequence in the attention K/V.
The first continuation token is scored from the prefill's last logits, the others from the extensions'.

:func:`score_documents` is the same with the first token of each sequence as the prefix (the
rolling log-likelihood of lm-eval, and ``ppl``).

Shapes are bucketed (prefixes to a power of two >= 32 tokens, continuations to a power of two >= 8,
the cache to a power of two, batches to ``batch_size`` rows by repeating a row) so that an evaluation
compiles a handful of programs, not one per request.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from olmo_hybrid_jax.generate import compute_dtype, extend, prefill_rows

Array = jax.Array
MIN_BUCKET = 8
MIN_PREFIX = 32


def bucket(n: int, minimum: int = MIN_BUCKET) -> int:
    """The padded length for ``n`` tokens: the next power of two, at least ``minimum``."""
    return max(minimum, 1 << max(0, int(n) - 1).bit_length())


@jax.jit
def _token_scores(logits: Array, targets: Array, valid: Array) -> tuple[Array, Array]:
    """Per row: (sum of log p(target) over valid positions, every valid target is the argmax).

    logits [B, T, V], targets [B, T] int, valid [B, T] bool -> ([B] fp32, [B] bool).
    """
    lp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    tok = jnp.take_along_axis(lp, targets[..., None], axis=-1)[..., 0]
    greedy = jnp.argmax(lp, axis=-1) == targets
    return jnp.sum(jnp.where(valid, tok, 0.0), axis=-1), jnp.all(greedy | ~valid, axis=-1)


@jax.jit
def _take_rows(cache, rows: Array):
    """The cache of rows ``rows`` (with repeats) of ``cache``; scalar leaves (``length``) are shared."""
    return jax.tree.map(lambda x: x if x.ndim == 0 else x[rows], cache)


def _pad_rows(rows: list, batch_size: int) -> list:
    return rows + [rows[0]] * (batch_size - len(rows))


def score_continuations(model, requests: Sequence[tuple[Sequence[int], Sequence[int]]], *, window: int,
                        batch_size: int = 1, pad_id: int = 0, progress: Callable[[int], None] | None = None,
                        sharding=None) -> list[tuple[float, bool]]:
    """(sum log p(cont | prefix), cont is the greedy continuation) for each (prefix, cont) request.

    Both need at least one token. ``batch_size`` distinct prefixes are prefilled together, then their
    continuations extended ``batch_size`` rows and at most ``window`` tokens per call (the longest
    first). ``progress(n)`` is called as requests finish. ``sharding``: where the [batch, tokens] inputs go
    (rows split over a mesh; None: the default device).
    """
    put = jnp.asarray if sharding is None else (lambda x: jax.device_put(x, sharding))
    if batch_size < 1 or window < 1:
        raise ValueError(f"batch_size and window must be >= 1, got {batch_size}, {window}")
    groups: dict[tuple, list[int]] = {}
    vocab = model.config.vocab_size
    for i, (prefix, cont) in enumerate(requests):
        if len(prefix) < 1 or len(cont) < 1:
            raise ValueError(f"request {i}: prefix and continuation need at least one token each")
        if not all(0 <= int(t) < vocab for t in (*prefix, *cont)):  # jitted calls would not check
            raise ValueError(f"request {i} holds a token id outside the model's vocabulary [0, {vocab})")
        groups.setdefault(tuple(int(t) for t in prefix), []).append(i)
    keys = sorted(groups, key=lambda k: (-len(k), k))  # longest first: the first chunk shows the peak memory
    out: list[tuple[float, bool] | None] = [None] * len(requests)
    for g0 in range(0, len(keys), batch_size):
        chunk = keys[g0:g0 + batch_size]
        members = sorted(((gi, r) for gi, k in enumerate(chunk) for r in groups[k]),
                         key=lambda m: -len(requests[m[1]][1]))
        P = bucket(max(len(k) for k in chunk), MIN_PREFIX)
        C = len(requests[members[0][1]][1]) - 1  # tokens to extend by (the first is scored from the prefill)
        W = min(bucket(C), window)
        ext_len = -(-C // W) * W
        ids = np.full((batch_size, P), pad_id, np.int32)
        mask = np.zeros((batch_size, P), np.int32)
        for gi, k in enumerate(_pad_rows(chunk, batch_size)):
            ids[gi, P - len(k):], mask[gi, P - len(k):] = k, 1
        # prefill_rows rather than prefill: the mask stays an array even when no row is padded (one program)
        first, cache = prefill_rows(*nnx.split(model), put(ids), put(mask), None, 0, logits_to_keep=1,
                                    rows=batch_size, max_len=bucket(P + max(ext_len, MIN_BUCKET)),
                                    cache_dtype=compute_dtype(model))
        for m0 in range(0, len(members), batch_size):
            sub = members[m0:m0 + batch_size]
            rows = jnp.asarray([gi for gi, _ in _pad_rows(sub, batch_size)], jnp.int32)
            n = len(requests[sub[0][1]][1])  # the longest of this sub-batch
            targets = np.full((batch_size, 1 + ext_len), pad_id, np.int32)
            valid = np.zeros((batch_size, 1 + ext_len), bool)
            for j, (_, r) in enumerate(sub):
                c = requests[r][1]
                targets[j, :len(c)], valid[j, :len(c)] = c, True
            inputs = np.concatenate([targets[:, :-1], np.full((batch_size, 1), pad_id, np.int32)], axis=1)[:, :ext_len]
            lp, greedy = _token_scores(first[rows], put(targets[:, :1]), put(valid[:, :1]))
            sub_cache = _take_rows(cache, rows)
            for w0 in range(0, n - 1, W):  # windows past this sub-batch's longest continuation are skipped
                # host ids: extend copies them itself (the cache's sharding places the step)
                logits, sub_cache = extend(model, sub_cache, inputs[:, w0:w0 + W])
                sl = slice(1 + w0, 1 + w0 + W)
                s, g = _token_scores(logits, put(np.ascontiguousarray(targets[:, sl])),
                                     put(np.ascontiguousarray(valid[:, sl])))
                lp, greedy = lp + s, greedy & g
            lp, greedy = jax.device_get((lp, greedy))
            for j, (_, r) in enumerate(sub):
                out[r] = (float(lp[j]), bool(greedy[j]))
            if progress is not None:
                progress(len(sub))
    return out


def score_documents(model, seqs: Sequence[Sequence[int]], *, window: int, batch_size: int = 1, pad_id: int = 0,
                    progress: Callable[[int], None] | None = None, sharding=None) -> list[tuple[float, int]]:
    """(sum over t >= 1 of log p(seq[t] | seq[:t]), number of scored tokens) for each sequence.

    The first token of each sequence (a BOS/EOS prefix) is only conditioned on; sequences of one token
    score (0.0, 0). Every token sees the whole sequence before it (``window`` tokens per forward).
    """
    todo = [i for i, s in enumerate(seqs) if len(s) > 1]
    res = score_continuations(model, [(seqs[i][:1], seqs[i][1:]) for i in todo], window=window,
                              batch_size=batch_size, pad_id=pad_id, progress=progress, sharding=sharding)
    out = [(0.0, 0)] * len(seqs)
    for i, (lp, _) in zip(todo, res):
        out[i] = (lp, len(seqs[i]) - 1)
    return out
