"""The lm-evaluation-harness model ``olmo_hybrid_jax`` (registered when this module is imported).

    import olmo_hybrid_jax.eval, lm_eval
    lm_eval.simple_evaluate(model="olmo_hybrid_jax", model_args="pretrained=DIR,batch_size=4", tasks=[...])

model_args: ``pretrained`` (an HF directory, an orbax model directory, or a training run directory,
whose latest checkpoint or ``step=N``; from Python also a loaded ``OlmoHybridForCausalLM``, whose
tokenizer must then be given or is byte level), ``tokenizer`` (a tokenizer.json or its folder; default the
checkpoint's, else byte level), ``dtype`` ("auto": config.json's, as ``hf``; None: as stored),
``batch_size``, ``mesh`` / ``fsdp`` (below), ``max_length`` (default the config's
``max_position_embeddings``, as lm-eval's ``hf``), ``max_gen_toks`` (256), ``add_bos_token``,
``prefix_token_id``, ``seed`` (sampling).

``mesh=fsdp`` shards the parameters over this host's devices by the training rules
(``train.sharding``: the hidden dim of every matrix over the ``fsdp`` axis), ``mesh=data`` replicates
them, ``fsdp=N`` gives N parameter shards and the rest replicas, ``mesh=auto`` is fsdp on several
devices and nothing on one; the rows of every scoring batch are split over all of them (``batch_size``
a multiple of the device count) and the GDN op runs per shard. The checkpoint is read onto the first
device and then placed, so that device needs room for one whole copy. ``generate_until`` runs with the
sharded parameters but its rows are not split explicitly.

``batch_size=auto`` (lm-eval's search for the largest batch that fits) is refused: here every batch
size is its own XLA program (prefill plus extension, tens of seconds to compile for the 7B), so each
probe costs a compile, and with JAX's preallocated pool an out-of-memory surfaces only when a program
runs, sometimes leaving the pool fragmented for the next try. Memory is predictable instead: the
caches hold ``batch_size x (max_length x kv_heads x head_dim x 2 x attention layers + the GDN states)``
next to the weights, so pick the number once per GPU and model (no tested value is recorded here)
and reuse it.

Tokenization mirrors lm-eval's ``hf`` backend (``HFLM``) so the numbers are the same: ``TemplateLM``'s
context/continuation split (trailing context spaces move to the continuation; the continuation is
the whole encoding minus the context's), the empty context replaced by ``prefix_token_id`` (BOS, else
EOS), ``add_special_tokens`` left to the tokenizer unless ``add_bos_token`` is given or the text
already starts with the BOS text, and ``(context + continuation)[-(max_length + 1):][:-1]`` as the
scored input (left truncation).

Where the numbers differ from ``hf`` on purpose: ``loglikelihood_rolling`` carries the cache from one
window of ``max_length`` tokens to the next, so it is the exact log-likelihood of the whole document;
``hf`` scores disjoint windows that each restart from one token of context. The two agree whenever
the document (plus the prefix token) fits in ``max_length``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import (
    _add_special_kwargs,
    handle_stop_sequences,
    has_bos_prefix,
    normalize_gen_kwargs,
    postprocess_generated_text,
)
from tqdm.auto import tqdm

from olmo_hybrid_jax.eval.loading import (
    TextTokenizer,
    batch_sharding,
    checkpoint_kind,
    eval_mesh,
    load_model,
    mesh_model_kwargs,
    shard_model,
)
from olmo_hybrid_jax.eval.scoring import MIN_PREFIX, bucket, score_continuations, score_documents

log = logging.getLogger(__name__)
_SAMPLING_KEYS = {"do_sample", "temperature", "top_k", "top_p"}


class _Stop(Exception):
    """Raised from generate's stream callback once every row holds a stop string (ends the decode loop)."""


@register_model("olmo_hybrid_jax")
class OlmoHybridLM(TemplateLM):
    """lm-eval ``LM`` on this project's model and caches; see the module docstring."""

    def __init__(self, pretrained, tokenizer: str | None = None, step: int | None = None, dtype="auto",
                 batch_size: int | str = 1, max_length: int | None = None, max_gen_toks: int = 256,
                 add_bos_token: bool | None = None, prefix_token_id: int | None = None, seed: int = 1234,
                 device: str | None = None, max_batch_size: int | None = None, mesh: str | None = None,
                 fsdp: int | None = None):
        super().__init__()
        del device, max_batch_size  # lm-eval passes them to every model; JAX places the arrays itself
        if isinstance(batch_size, str) and not batch_size.isdigit():
            raise ValueError(f"batch_size must be an int (no 'auto': see the harness docstring), got {batch_size!r}")
        self._batch_size = int(batch_size)
        if self._batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.mesh, rules = eval_mesh(mesh, fsdp)
        self.batch_sharding = batch_sharding(self.mesh, rules, self._batch_size)
        if isinstance(pretrained, (str, Path)):
            kind = checkpoint_kind(pretrained)
            self.model = load_model(pretrained, step=step, dtype=dtype, **mesh_model_kwargs(self.mesh, rules))
        else:  # a loaded OlmoHybridForCausalLM, as HFLM takes a PreTrainedModel; step and dtype do not apply
            kind, self.model = None, pretrained
        if self.mesh is not None:
            self.model = shard_model(self.model, self.mesh, rules)
        cfg = self.model.config
        if tokenizer is None and kind not in (None, "run"):
            tokenizer = pretrained if (Path(pretrained) / "tokenizer.json").is_file() else None
        self.tokenizer = TextTokenizer(tokenizer, vocab_size=cfg.vocab_size, eos_token_id=cfg.eos_token_id)
        if self.tokenizer.eos_token_id is None:
            raise ValueError("neither the tokenizer nor the model config names an EOS token")
        self._max_length = int(max_length) if max_length else int(cfg.max_position_embeddings)
        self._max_gen_toks = int(max_gen_toks)
        self.add_bos_token = add_bos_token
        self.custom_prefix_token_id = prefix_token_id
        self.seed = int(seed)
        self.pad_token_id = next(i for i in (self.tokenizer.pad_token_id, self.tokenizer.eos_token_id) if i is not None)

    # ------------------------------------------------------------------ what HFLM exposes
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        if self.custom_prefix_token_id is not None:
            return self.custom_prefix_token_id
        if self.tokenizer.bos_token_id is not None:
            return self.tokenizer.bos_token_id
        return self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs) -> list[int]:
        kw = _add_special_kwargs(add_special_tokens, self.add_bos_token)
        if add_special_tokens is None and has_bos_prefix(string, self.tokenizer.decode([self.prefix_token_id])):
            kw["add_special_tokens"] = False
        enc = self.tokenizer.encode(string, **kw)
        return enc[-left_truncate_len:] if left_truncate_len else enc

    def _batch_special_kwargs(self, first: str) -> dict:
        """HFLM.tok_batch_encode's choice for a batch, made from its first string."""
        if has_bos_prefix(first, self.tokenizer.bos_token):
            return {"add_special_tokens": False}
        return {} if self.add_bos_token is None else {"add_special_tokens": self.add_bos_token}

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------ request kinds
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        pairs = []
        for _, ctx, cont in requests:
            if not ctx or not cont:
                raise ValueError("loglikelihood requests need a non-empty context and continuation encoding")
            if len(cont) > self.max_length:
                raise ValueError(f"a continuation of {len(cont)} tokens exceeds max_length={self.max_length}")
            full = (list(ctx) + list(cont))[-(self.max_length + 1):]  # left truncation, as HFLM
            pairs.append((full[:-len(cont)], cont))
        with tqdm(total=len(pairs), disable=disable_tqdm, desc="Running loglikelihood requests") as bar:
            res = score_continuations(self.model, pairs, window=self.max_length,
                                      batch_size=override_bs or self.batch_size, pad_id=self.pad_token_id,
                                      progress=bar.update, sharding=self.batch_sharding)
        for (key, _, _), ans in zip(requests, res):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, ans)
        return res

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        strings = [req.args[0] for req in requests]
        seqs = [[self.prefix_token_id] + self.tok_encode(s) for s in strings]
        with tqdm(total=len(seqs), disable=disable_tqdm, desc="Running loglikelihood_rolling requests") as bar:
            res = score_documents(self.model, seqs, window=self.max_length, batch_size=self.batch_size,
                                  pad_id=self.pad_token_id, progress=bar.update, sharding=self.batch_sharding)
        out = [lp for lp, _ in res]
        for s, lp in zip(strings, out):
            self.cache_hook.add_partial("loglikelihood_rolling", (s,), lp)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from olmo_hybrid_jax.generate import generate

        args = [req.args for req in requests]
        groups: dict[str, list[int]] = {}
        for i, (_, gk) in enumerate(args):  # as HFLM's Collator(group_by="gen_kwargs")
            groups.setdefault(json.dumps(gk, sort_keys=True, default=str), []).append(i)
        eos_text = self.tok_decode(self.eot_token_id, skip_special_tokens=False)
        out: list[str | None] = [None] * len(args)
        bar = tqdm(total=len(args), disable=disable_tqdm, desc="Running generate_until requests")
        calls = 0
        for idxs in groups.values():
            kwargs = normalize_gen_kwargs(args[idxs[0]][1], self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
            max_gen = int(kwargs.pop("max_gen_toks"))
            max_ctx = self.max_length - max_gen
            if max_ctx <= 0:
                raise ValueError(f"max_gen_toks={max_gen} leaves no room for a context in max_length={self.max_length}")
            ignored = sorted(set(kwargs) - _SAMPLING_KEYS)
            if ignored:
                log.warning("olmo_hybrid_jax ignores the generation kwargs %s", ignored)
            do_sample = bool(kwargs.get("do_sample"))
            temperature = float(kwargs.get("temperature", 0.0))
            idxs = sorted(idxs, key=lambda i: (-len(self.tok_encode(args[i][0])), args[i][0]))
            for b0 in range(0, len(idxs), self.batch_size):
                chunk = idxs[b0:b0 + self.batch_size]
                special = self._batch_special_kwargs(args[chunk[0]][0])
                rows = [self.tokenizer.encode(args[i][0], **special)[-max_ctx:] or [self.prefix_token_id]
                        for i in chunk]
                # one pad at least: generate drops an all-ones mask, which would be another prefill program
                P = bucket(max(len(r) for r in rows) + 1, MIN_PREFIX)
                N = bucket(max_gen, 16)  # decoded, then cut to max_gen: one decode program for nearby budgets
                rows += [rows[0]] * (self.batch_size - len(rows))  # fixed batch shape: one compile
                ids = np.array([[self.pad_token_id] * (P - len(r)) + r for r in rows], np.int32)
                mask = np.array([[0] * (P - len(r)) + [1] * len(r) for r in rows], np.int32)
                gen = [[] for _ in chunk]

                def stream(block, gen=gen, until=until, max_gen=max_gen):
                    for row, toks in zip(gen, block):
                        row.extend(int(t) for t in toks)
                    if len(gen[0]) >= max_gen or all(any(t and t in self.tok_decode(row) for t in until)
                                                     for row in gen):
                        raise _Stop

                sample = do_sample and temperature > 0
                try:
                    generate(self.model, ids, N, attention_mask=mask, do_sample=sample,
                             temperature=temperature if sample else None,
                             top_k=kwargs.get("top_k") if sample else None,
                             top_p=kwargs.get("top_p") if sample else None, seed=self.seed + calls,
                             pad_token_id=self.pad_token_id, max_len=bucket(P + N), stream=stream,
                             stream_interval=min(N, 8))
                except _Stop:
                    pass
                calls += 1
                for i, row in zip(chunk, gen):
                    s = postprocess_generated_text(self.tok_decode(row[:max_gen]), until, None)
                    out[i] = s
                    self.cache_hook.add_partial("generate_until", args[i], s)
                    bar.update(1)
        bar.close()
        return out
