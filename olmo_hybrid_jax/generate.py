"""Generation with OLMo Hybrid: prefill and decode over the hybrid caches, greedy or sampled.

    from olmo_hybrid_jax.generate import generate
    ids = generate(model, [[5, 9, 17], [4, 2]], max_new_tokens=32)              # greedy, left-pads ragged
    ids = generate(model, prompt_ids, 64, attention_mask=mask, do_sample=True,  # HF-style sampling
                   temperature=0.8, top_k=50, top_p=0.95, seed=0)

CLI (HF or orbax checkpoint directory; ``tokenizer.json`` there, else byte-level ids = UTF-8 bytes)::

    python -m olmo_hybrid_jax.generate --checkpoint DIR --prompt "..." [--max-new-tokens 64]
        [--temperature 0.8 --top-k 50 --top-p 0.95 --seed 0] [--dtype bfloat16]

How it runs (everything jit-compiled once per shape; no recompilation per token):

1. **Prefill** (``prefill``): the prompt goes through the model in one forward with an empty
   :class:`~olmo_hybrid_jax.cache.Cache`. GDN layers run the chunked kernel from a zero state and return
   the final fp32 state and the last ``Kc - 1`` pre-conv inputs; attention layers run the fused causal
   kernel over the prompt and store K (after k_norm and RoPE) and V in the preallocated buffer. Only the
   last position's logits are computed. Large batches can be prefilled ``prefill_batch_size`` rows at a
   time into the one batch cache.
2. **Decode**: one ``lax.while_loop`` (in segments of ``stream_interval`` tokens when streaming, the
   segment end being a traced argument) samples a token from the carried logits, writes it, and runs
   the model on that one token: GDN layers take one recurrent step from the cached state and conv window,
   attention layers append to the KV buffer and attend over it. Rows stop at EOS independently (later
   tokens are ``pad_token_id``); the loop ends when every row is done.
3. **Continuation** (``extend``): more tokens (one or many) appended to an existing cache: the conv
   windows are prepended, the state is the kernel's initial state, K/V are appended.

Left padding follows transformers: ``attention_mask`` zeros mark pads, GDN inputs are multiplied by the
mask, pad keys are masked in attention, and RoPE positions are ``cumsum(mask) - 1``. Greedy output is
token-identical to ``transformers``' ``generate`` on the same weights in fp32 (tests/test_generate.py).
"""

from __future__ import annotations

import argparse
import codecs
import dataclasses
import functools
import sys
import time
import types
import warnings
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from olmo_hybrid_jax.cache import Cache, init_cache, set_rows

Array = jax.Array

__all__ = ["Sampling", "check_generate_args", "generate", "prefill", "extend", "sample_logits", "init_cache", "Cache"]


# ----------------------------------------------------------------------------------------- sampling
@dataclasses.dataclass(frozen=True)
class Sampling:
    """Token choice (static under jit). ``do_sample=False`` is greedy (argmax).

    With sampling, logits are processed as transformers does, in order: divided by ``temperature``,
    then all but the ``top_k`` largest (ties kept) set to -inf, then the smallest tokens whose total
    probability is at most ``1 - top_p`` removed (at least one token kept); then one categorical draw.
    """

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self):
        check_generate_args(top_k=self.top_k, top_p=self.top_p)
        if self.temperature is None or not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature!r} "
                             "(use do_sample=False for greedy)")


def check_generate_args(*, max_new_tokens: int = 0, temperature: float | None = None, top_k: int | None = None,
                        top_p: float | None = None, stream_interval: int = 1) -> None:
    """ValueError naming the first bad one of ``generate``'s keywords (the API, ``Sampling`` and the CLI)."""
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if temperature is not None and not temperature >= 0:  # also refuses NaN
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, (int, np.integer)) or top_k < 1):
        raise ValueError(f"top_k must be an int >= 1, got {top_k!r}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if not isinstance(stream_interval, (int, np.integer)) or stream_interval < 1:
        raise ValueError(f"stream_interval must be an int >= 1, got {stream_interval!r}")


def process_logits(logits: Array, sampling: Sampling) -> Array:
    """Temperature, top-k and top-p warping of fp32 logits [B, V] (transformers' order and rules)."""
    logits = logits.astype(jnp.float32)
    if sampling.temperature != 1.0:
        logits = logits / sampling.temperature
    neg = -jnp.inf
    if sampling.top_k is not None and sampling.top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, sampling.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, neg, logits)
    if sampling.top_p is not None and sampling.top_p < 1.0:
        srt = jnp.sort(logits, axis=-1)  # ascending, as transformers' TopPLogitsWarper
        cum = jnp.cumsum(jax.nn.softmax(srt, axis=-1), axis=-1)
        remove = (cum <= 1.0 - sampling.top_p).at[:, -1].set(False)
        # ``remove`` is a prefix of the ascending order: the threshold is the first kept logit.
        first_kept = jnp.argmin(remove, axis=-1)
        thresh = jnp.take_along_axis(srt, first_kept[:, None], axis=-1)
        logits = jnp.where(logits < thresh, neg, logits)
    return logits


def sample_logits(logits: Array, key: Array, sampling: Sampling) -> Array:
    """Next tokens [B] int32 from logits [B, V]."""
    if not sampling.do_sample:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, process_logits(logits, sampling), axis=-1).astype(jnp.int32)


# ----------------------------------------------------------------------------------------- jitted steps
def compute_dtype(model) -> jnp.dtype:
    """The model's activation dtype (what K/V and conv windows are stored in)."""
    emb = model.model.embed_tokens
    return jnp.dtype(emb.dtype if emb.dtype is not None else emb.embedding[...].dtype)


# graphdef travels as an ordinary (leafless, static-registered) argument: jit compares it by equality;
# as a static_argname it would need a hash, which a config holding a rope dict does not have.
@functools.partial(jax.jit, static_argnames=("logits_to_keep", "rows", "max_len", "cache_dtype"),
                   donate_argnames=("cache",))
def prefill_rows(graphdef, state, ids, mask, cache, start, *, logits_to_keep, rows, max_len, cache_dtype):
    """Prefill ``ids`` (``rows`` rows) into a fresh cache and write it at rows ``start:`` of ``cache``.

    ``cache`` None: return the fresh cache itself (the whole batch in one go). Public, jitted on
    ``(graphdef, state)`` of ``nnx.split(model)``, so a benchmark can ``.lower(...)`` it ahead of time
    for a shape (``benchmarks/inference_bench.py``); :func:`prefill` is the user-facing call.
    """
    model = nnx.merge(graphdef, state)
    fresh = init_cache(model.config, rows, max_len, cache_dtype)
    logits, fresh = model(ids, attention_mask=mask, cache=fresh, fresh_cache=True, logits_to_keep=logits_to_keep)
    if cache is None:
        return logits, fresh
    return logits, set_rows(cache, fresh, start)


@functools.partial(jax.jit, static_argnames=("logits_to_keep",), donate_argnames=("cache",))
def _extend(graphdef, state, ids, mask, cache, *, logits_to_keep):
    model = nnx.merge(graphdef, state)
    return model(ids, attention_mask=mask, cache=cache, logits_to_keep=logits_to_keep)


@functools.partial(jax.jit, static_argnames=("sampling", "eos", "pad"), donate_argnames=("carry",))
def decode_loop(graphdef, state, carry, stop, *, sampling, eos, pad):
    """Run the decode while_loop until step ``stop`` (traced: segments never recompile) or all rows are done.

    Public for ahead-of-time lowering like :func:`prefill_rows`; :func:`generate` drives it.

    carry: cache, logits [B, V] fp32 (for the next token), out [B, N] int32, step [], done [B], key.
    """
    model = nnx.merge(graphdef, state)
    eos_arr = jnp.asarray(eos if eos else (-1,), jnp.int32)

    def cond(c):
        return (c["step"] < stop) & ~jnp.all(c["done"])

    def body(c):
        key, sub = jax.random.split(c["key"])
        tok = sample_logits(c["logits"], sub, sampling)
        tok = jnp.where(c["done"], pad, tok).astype(jnp.int32)
        out = jax.lax.dynamic_update_slice_in_dim(c["out"], tok[:, None], c["step"], axis=1)
        done = c["done"] | jnp.any(tok[:, None] == eos_arr[None, :], axis=1)
        logits, cache = model(tok[:, None], cache=c["cache"], logits_to_keep=1)
        return dict(cache=cache, logits=logits[:, -1].astype(jnp.float32), out=out, step=c["step"] + 1,
                    done=done, key=key)

    return jax.lax.while_loop(cond, body, carry)


# ----------------------------------------------------------------------------------------- input checks
def _as_batch(prompt_ids, attention_mask, pad_id: int, vocab: int) -> tuple[np.ndarray, np.ndarray | None]:
    """(ids [B, P] int32, mask [B, P] int32 or None): ragged lists are left-padded; shapes checked."""
    if isinstance(prompt_ids, (list, tuple)) and prompt_ids and all(
            isinstance(r, (list, tuple, np.ndarray)) for r in prompt_ids):
        rows = [np.asarray(r) for r in prompt_ids]
        if any(r.ndim != 1 for r in rows):
            raise ValueError("prompt_ids as a list must hold 1-D token sequences")
        if any(r.size == 0 for r in rows):
            raise ValueError("every prompt needs at least one token")
        if attention_mask is not None:
            raise ValueError("attention_mask is built from the ragged prompt list; do not pass one")
        P = max(r.size for r in rows)
        ids = np.full((len(rows), P), pad_id, np.int64)
        mask = np.zeros((len(rows), P), np.int32)
        for i, r in enumerate(rows):
            ids[i, P - r.size:] = r
            mask[i, P - r.size:] = 1
        if mask.all():
            mask = None
    else:
        ids = np.asarray(prompt_ids)
        if ids.ndim != 2:
            raise ValueError(f"prompt_ids must be [batch, seq] (or a list of token lists), got shape {ids.shape}")
        mask = None if attention_mask is None else np.asarray(attention_mask)
        if mask is not None:
            if mask.shape != ids.shape:
                raise ValueError(f"attention_mask must have the shape of prompt_ids {ids.shape}, got {mask.shape}")
            if not np.isin(mask, (0, 1)).all():
                raise ValueError("attention_mask must hold only 0 (pad) and 1 (token)")
            mask = mask.astype(np.int32)
            if (np.diff(mask, axis=1) < 0).any():
                raise ValueError("attention_mask must be LEFT padding (zeros before ones in every row)")
            if not mask[:, -1].all():
                raise ValueError("every row needs at least one real token (attention_mask[:, -1] must be 1)")
            if mask.all():
                mask = None
    if ids.shape[0] < 1 or ids.shape[1] < 1:
        raise ValueError(f"prompt_ids must hold at least one row and one token, got shape {ids.shape}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"prompt_ids must be integer token ids, got dtype {ids.dtype}")
    real = ids if mask is None else ids[mask.astype(bool)]
    if real.size and (real.min() < 0 or real.max() >= vocab):
        raise ValueError(f"prompt_ids must lie in [0, {vocab}), got [{real.min()}, {real.max()}]")
    ids = np.where(mask.astype(bool), ids, pad_id) if mask is not None else ids
    return ids.astype(np.int32), mask


def _eos_tuple(eos) -> tuple[int, ...]:
    if eos is None:
        return ()
    if isinstance(eos, (int, np.integer)):
        return (int(eos),)
    return tuple(int(e) for e in eos)


# ----------------------------------------------------------------------------------------- public API
def prefill(model, prompt_ids, *, attention_mask=None, max_len: int | None = None, cache_dtype=None,
            prefill_batch_size: int | None = None, logits_to_keep: int | None = 1) -> tuple[Array, Cache]:
    """Run the prompt through ``model`` into a new cache of ``max_len`` slots.

    prompt_ids: [B, P] ints (or a list of token lists, left-padded here); attention_mask: [B, P] left
    padding. Returns (logits [B, logits_to_keep or P, vocab], cache). ``prefill_batch_size`` rows are
    prefilled per call (bounds the activation memory of long prompts at large batch).
    """
    cfg = model.config
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else 0
    ids, mask = _as_batch(prompt_ids, attention_mask, pad, cfg.vocab_size)
    B, P = ids.shape
    max_len = P if max_len is None else int(max_len)
    if P > max_len:
        raise ValueError(f"prompt of {P} tokens is longer than max_len={max_len}")
    cache_dtype = jnp.dtype(cache_dtype or compute_dtype(model))
    rows = B if prefill_batch_size is None else int(prefill_batch_size)
    if rows < 1 or B % rows:
        raise ValueError(f"prefill_batch_size={prefill_batch_size} must divide the batch of {B} rows")
    graphdef, state = nnx.split(model)
    kw = dict(logits_to_keep=logits_to_keep, rows=rows, max_len=max_len,
              cache_dtype=cache_dtype)
    if rows == B:
        return prefill_rows(graphdef, state, jnp.asarray(ids), None if mask is None else jnp.asarray(mask), None,
                             0, **kw)
    cache, outs = init_cache(cfg, B, max_len, cache_dtype), []
    for s in range(0, B, rows):
        m = None if mask is None else jnp.asarray(mask[s:s + rows])
        logits, cache = prefill_rows(graphdef, state, jnp.asarray(ids[s:s + rows]), m, cache, jnp.int32(s), **kw)
        outs.append(logits)
    return jnp.concatenate(outs, axis=0), cache


def extend(model, cache: Cache, ids, *, attention_mask=None, logits_to_keep: int | None = None
           ) -> tuple[Array, Cache]:
    """Append ``ids`` [B, T] (T >= 1) to ``cache``: (logits [B, T or logits_to_keep, vocab], new cache).

    ``cache`` is consumed (its buffers are donated). T == 1 is a decode step (one recurrent GDN step);
    T > 1 continues with the chunked kernel from the cached state and conv windows.
    """
    ids = np.asarray(ids)
    if ids.ndim != 2 or ids.shape[0] != cache.batch_size or ids.shape[1] < 1:
        raise ValueError(f"ids must be [{cache.batch_size}, T>=1] to extend this cache, got shape {ids.shape}")
    T = ids.shape[1]
    length = int(cache.length)
    if length + T > cache.max_len:
        raise ValueError(f"cache holds {length} of {cache.max_len} slots; {T} more tokens do not fit")
    graphdef, state = nnx.split(model)
    mask = None if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
    return _extend(graphdef, state, jnp.asarray(ids, jnp.int32), mask, cache,
                   logits_to_keep=logits_to_keep)


def generate(model, prompt_ids, max_new_tokens: int, *, attention_mask=None, do_sample: bool | None = None,
             temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
             seed: int = 0, eos_token_id=None, pad_token_id: int | None = None, max_len: int | None = None,
             cache_dtype=None, prefill_batch_size: int | None = None,
             stream: Callable[[np.ndarray], None] | None = None, stream_interval: int = 8,
             return_cache: bool = False):
    """Generate up to ``max_new_tokens`` tokens after each prompt.

    Args:
      model: an ``OlmoHybridForCausalLM``.
      prompt_ids: [B, P] int token ids (with ``attention_mask`` for left padding), or a list of token
        lists of any lengths (left-padded here, HF style).
      max_new_tokens: tokens to generate per row (fewer if every row hits EOS).
      attention_mask: [B, P], 0 for left padding, 1 for tokens.
      do_sample: sample instead of greedy argmax. None: sample iff ``temperature`` (> 0), ``top_k`` or
        ``top_p`` is given. ``temperature`` 0 means greedy; a negative one is refused.
      temperature, top_k, top_p: transformers' logits warpers, in that order.
      seed: PRNG seed of the sampling.
      eos_token_id: int or ints ending a row; None = the config's; ``()`` never stops early.
      pad_token_id: written after a row's EOS (None = the config's, else the first EOS id, else 0).
      max_len: cache slots (default prompt length + max_new_tokens; more only wastes memory).
      cache_dtype: K/V and conv-window dtype (default the model's compute dtype; the GDN state is fp32).
      prefill_batch_size: prefill this many rows per call (must divide B; bounds prefill memory).
      stream: called with each new block of tokens [B, n] (n <= stream_interval) as it is decoded.
      return_cache: also return the final cache, which holds the prompt and every generated token
        (continue it with ``extend``; it has ``max_len - P - n`` free slots).

    Returns:
      int32 numpy array [B, P + n]: the (padded) prompts followed by the n generated tokens, where n is
      ``max_new_tokens`` or fewer if all rows stopped (as transformers' ``generate``); and the cache
      with ``return_cache``.
    """
    cfg = model.config
    check_generate_args(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                        stream_interval=stream_interval)
    eos = _eos_tuple(cfg.eos_token_id if eos_token_id is None else eos_token_id)
    if pad_token_id is None:
        pad_token_id = cfg.pad_token_id if cfg.pad_token_id is not None else (eos[0] if eos else 0)
    if do_sample is None:
        do_sample = (temperature is not None and temperature > 0) or top_k is not None or top_p is not None
    if temperature == 0:
        do_sample = False
    sampling = Sampling(do_sample, 1.0 if temperature is None or not do_sample else float(temperature),
                        top_k if do_sample else None, top_p if do_sample else None)
    ids, mask = _as_batch(prompt_ids, attention_mask, int(pad_token_id), cfg.vocab_size)
    B, P = ids.shape
    need = P + int(max_new_tokens)
    if max_len is None:
        max_len = need
    elif need > max_len:
        raise ValueError(f"prompt of {P} tokens + max_new_tokens={max_new_tokens} = {need} exceeds max_len={max_len}")
    if need > cfg.max_position_embeddings:
        warnings.warn(f"generating to {need} tokens, beyond the model's max_position_embeddings="
                      f"{cfg.max_position_embeddings}", stacklevel=2)
    if max_new_tokens == 0:
        return (ids, None) if return_cache else ids

    logits, cache = prefill(model, ids, attention_mask=mask, max_len=max_len, cache_dtype=cache_dtype,
                            prefill_batch_size=prefill_batch_size)
    graphdef, state = nnx.split(model)
    carry = dict(cache=cache, logits=logits[:, -1].astype(jnp.float32),
                 out=jnp.full((B, int(max_new_tokens)), pad_token_id, jnp.int32), step=jnp.zeros((), jnp.int32),
                 done=jnp.zeros((B,), bool), key=jax.random.key(seed))
    interval = int(stream_interval) if stream is not None else int(max_new_tokens)
    shown = 0
    while True:
        stop = min(shown + interval, int(max_new_tokens))
        carry = decode_loop(graphdef, state, carry, jnp.int32(stop), sampling=sampling, eos=eos,
                        pad=int(pad_token_id))
        step = int(carry["step"])
        if stream is not None and step > shown:
            stream(np.asarray(carry["out"][:, shown:step]))
        shown = step
        if step >= max_new_tokens or bool(jnp.all(carry["done"])):
            break
    out = np.concatenate([ids, np.asarray(carry["out"][:, :shown])], axis=1)
    return (out, carry["cache"]) if return_cache else out


# ----------------------------------------------------------------------------------------- CLI
def load_checkpoint(path, dtype=None, **model_kwargs):
    """An HF safetensors directory (``convert.load_hf``) or an orbax one (``convert.load_orbax``)."""
    from olmo_hybrid_jax import convert

    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"no checkpoint directory at {p}")
    if (p / "params").is_dir() and (p / "config.json").is_file():
        return convert.load_orbax(p, dtype=dtype, **model_kwargs)
    if any(p.glob("*.safetensors")) or (p / "model.safetensors.index.json").is_file():
        return convert.load_hf(p, dtype=dtype, progress=False, **model_kwargs)
    raise FileNotFoundError(f"{p} holds neither an HF checkpoint (*.safetensors) nor an orbax one (params/)")


class _Text:
    """Token ids <-> text: ``tokenizer.json`` via HF ``tokenizers``, else bytes (id = UTF-8 byte)."""

    def __init__(self, ckpt_dir: Path, vocab: int):
        tj = Path(ckpt_dir) / "tokenizer.json"
        self.tok = None
        if tj.is_file():
            from tokenizers import Tokenizer

            self.tok = Tokenizer.from_file(str(tj))
        elif vocab < 256:
            raise ValueError(f"no tokenizer.json in {ckpt_dir} and vocab_size={vocab} < 256: cannot use bytes")

    def encode(self, text: str) -> list[int]:
        if self.tok is not None:
            return self.tok.encode(text, add_special_tokens=False).ids
        return list(text.encode("utf-8"))

    def streamer(self):
        """A function ids -> newly printable text, for incremental printing."""
        if self.tok is None:
            dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
            return lambda ids: dec.decode(bytes(int(i) % 256 for i in ids))
        seen: list[int] = []
        printed = [0]

        def push(ids):
            seen.extend(int(i) for i in ids)
            text = self.tok.decode(seen, skip_special_tokens=True)
            if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for more tokens
                return ""
            new, printed[0] = text[printed[0]:], len(text)
            return new
        return push


def main(argv=None) -> int:
    from olmo_hybrid_jax.convert import DTYPE_NAMES, dtype_arg

    ap = argparse.ArgumentParser(prog="python -m olmo_hybrid_jax.generate", description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", required=True, help="HF safetensors or orbax model directory")
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=None, help="sample at this temperature (0 = greedy)")
    ap.add_argument("--top-k", type=int, default=None)
    ap.add_argument("--top-p", type=float, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", type=dtype_arg, default=None,
                    help=f"parameter dtype: {', '.join(DTYPE_NAMES)} (default: the checkpoint's)")
    ap.add_argument("--stream-interval", type=int, default=4, help="tokens per printed chunk")
    args = ap.parse_args(argv)
    try:  # every argument is checked before the model loads and the prompt is echoed
        check_generate_args(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, stream_interval=args.stream_interval)
    except ValueError as e:
        name, rest = str(e).split(" ", 1)
        ap.error(f"--{name.replace('_', '-')} {rest}")
    try:
        model = load_checkpoint(args.checkpoint, dtype=args.dtype)
        text = _Text(Path(args.checkpoint), model.config.vocab_size)
        ids = text.encode(args.prompt)
        if not ids:
            raise ValueError("the prompt encodes to no tokens")
        _as_batch([ids], None, 0, model.config.vocab_size)  # the same id check generate makes, before the echo
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    push = text.streamer()
    print(args.prompt, end="", flush=True)
    t0 = time.perf_counter()
    try:
        out = generate(model, [ids], args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                       top_p=args.top_p, seed=args.seed, stream=lambda blk: print(push(blk[0]), end="", flush=True),
                       stream_interval=args.stream_interval)
    except ValueError as e:
        print(f"\nerror: {e}", file=sys.stderr)
        return 2
    n = out.shape[1] - len(ids)
    print(f"\n[{n} tokens in {time.perf_counter() - t0:.2f}s incl. compile]", file=sys.stderr)
    return 0


class _CallableModule(types.ModuleType):
    """``olmo_hybrid_jax.generate`` is both this module (``python -m``, ``prefill``, ``extend``) and,
    called, the ``generate`` function: ``olmo_hybrid_jax.generate(model, prompt_ids, 32)``."""

    def __call__(self, *args, **kwargs):
        return generate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule


if __name__ == "__main__":
    raise SystemExit(main())
