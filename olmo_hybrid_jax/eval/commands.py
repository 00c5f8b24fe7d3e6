"""The subcommands' work, reusable: ppl inputs and scoring, lm-eval task checks and runs (see ``__main__``)."""

from __future__ import annotations

import functools
import math
from pathlib import Path

import numpy as np

_TEXT_SUFFIXES = {".txt", ".jsonl"}


class InputError(ValueError):
    """Bad command-line input: reported as one ``error:`` line, exit status 2."""


# ----------------------------------------------------------------------------------------- ppl
def _split_documents(tokens: np.ndarray, eos: int) -> list[np.ndarray]:
    """Documents of a token stream: each ends at (and holds) its EOS; a trailing piece without one counts too."""
    ends = np.flatnonzero(tokens == eos) + 1
    return [d for d in np.split(np.asarray(tokens, np.int64), ends) if d.size]


def _load_documents(path: Path, tok, eos: int, args) -> tuple[list[np.ndarray], list[int] | None]:
    """(documents as token arrays, UTF-8 bytes per document or None) for one input file."""
    from olmo_hybrid_jax.train.data import DataError, open_token_file, read_documents

    try:
        if path.suffix in _TEXT_SUFFIXES:
            if tok is None:
                raise InputError(f"{path}: text input needs a tokenizer (--tokenizer, or the checkpoint's own)")
            texts = list(read_documents([str(path)], args.text_field))
            docs = [np.asarray(tok.encode(t, add_special_tokens=False) + [eos], np.int64) for t in texts]
            return docs, [len(t.encode("utf-8")) for t in texts]
        docs = _split_documents(np.asarray(open_token_file(path, args.token_dtype)), eos)
    except DataError as e:
        raise InputError(str(e)) from e
    if tok is None:
        return docs, None
    return docs, [tok.text_bytes(d) for d in docs]


def _summary(nll: float, tokens: int, nbytes: int | None, docs: int) -> dict:
    loss = nll / tokens if tokens else float("nan")
    return {"documents": docs, "tokens": tokens, "nll": nll, "loss": loss,
            "perplexity": math.exp(loss) if tokens else float("nan"),
            "bytes": nbytes, "bits_per_byte": nll / math.log(2) / nbytes if nbytes else None}


def ppl_inputs(files, checkpoint, cfg, args) -> tuple[dict, int]:
    """({file: (documents, UTF-8 bytes per document or None)}, EOS id): every file read and checked.

    The tokenizer is ``args.tokenizer``, else ``checkpoint``'s tokenizer.json, else byte-level ids; ``cfg``
    (the model config) gives the vocabulary and the fallback EOS. Raises InputError before any scoring.
    """
    from olmo_hybrid_jax.eval.loading import TextTokenizer

    files = [Path(f) for f in files]
    for f in files:
        if not f.is_file():
            raise InputError(f"input file not found: {f}")
    tok_path = args.tokenizer or (Path(checkpoint) / "tokenizer.json")
    try:
        tok = TextTokenizer(tok_path if Path(tok_path).is_file() or args.tokenizer else None,
                            vocab_size=cfg.vocab_size, eos_token_id=cfg.eos_token_id)
    except ValueError:  # no tokenizer and no byte-level ids: scores without bits per byte
        tok = None
    eos = args.eos_id if args.eos_id is not None else (tok.eos_token_id if tok else None)
    if eos is None:
        eos = cfg.eos_token_id[0] if isinstance(cfg.eos_token_id, tuple) else cfg.eos_token_id
    if eos is None:
        raise InputError("no EOS id: the tokenizer and the model config name none; pass --eos-id")
    loaded = {}
    for f in files:
        docs, nbytes = _load_documents(f, tok, eos, args)
        if args.limit:
            docs, nbytes = docs[:args.limit], None if nbytes is None else nbytes[:args.limit]
        hi = max((int(d.max()) for d in docs), default=-1)
        if hi >= cfg.vocab_size or eos >= cfg.vocab_size:
            raise InputError(f"{f}: token id {max(hi, eos)} >= the model's vocab_size {cfg.vocab_size}")
        loaded[f] = (docs, nbytes)
    return loaded, eos


def score_ppl(model, loaded: dict, eos: int, *, window: int, batch_size: int, quiet: bool = False,
              sharding=None) -> dict:
    """``{"files": {path: summary}, "total": summary}`` of ``ppl_inputs``' documents under ``model``
    (``sharding``: ``loading.batch_sharding``'s, for a model placed on a mesh)."""
    from tqdm.auto import tqdm

    from olmo_hybrid_jax.eval.scoring import score_documents

    cfg = model.config
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else 0
    out: dict = {"files": {}}
    tot_nll, tot_tok, tot_bytes, tot_docs = 0.0, 0, 0, 0
    for f, (docs, nbytes) in loaded.items():
        seqs = [np.concatenate([[eos], d]) for d in docs]
        with tqdm(total=len(seqs), desc=f"ppl {f.name}", unit="doc", disable=quiet) as bar:
            res = score_documents(model, seqs, window=window, batch_size=batch_size, pad_id=pad,
                                  progress=bar.update, sharding=sharding)
        nll, n = -sum(lp for lp, _ in res), sum(k for _, k in res)
        b = None if nbytes is None else sum(nbytes)
        out["files"][str(f)] = _summary(nll, n, b, len(docs))
        tot_nll, tot_tok, tot_docs = tot_nll + nll, tot_tok + n, tot_docs + len(docs)
        tot_bytes = None if b is None or tot_bytes is None else tot_bytes + b
    out["total"] = _summary(tot_nll, tot_tok, tot_bytes, tot_docs)
    return out


def ppl(args) -> dict:
    from olmo_hybrid_jax.eval.loading import checkpoint_config, load_model

    loaded, eos = ppl_inputs(args.files, args.checkpoint, checkpoint_config(args.checkpoint), args)
    model = load_model(args.checkpoint, step=args.step, dtype=args.dtype)
    window = args.max_length or model.config.max_position_embeddings
    res = score_ppl(model, loaded, eos, window=window, batch_size=args.batch_size, quiet=args.quiet)
    return {"checkpoint": str(args.checkpoint), "max_length": window, **res}


# ----------------------------------------------------------------------------------------- lm-eval
def _model_args(args) -> dict:
    from lm_eval.utils import simple_parse_args_string

    kw = simple_parse_args_string(args.model_args or "")
    kw["pretrained"] = args.checkpoint
    for key in ("step", "dtype", "tokenizer", "max_length"):
        if getattr(args, key, None) is not None:
            kw[key] = getattr(args, key)
    kw["batch_size"] = args.batch_size
    return kw


@functools.lru_cache(maxsize=4)
def task_manager(include_path: tuple[str, ...] = ()):
    """lm-eval's TaskManager (it indexes every task YAML it ships: seconds; kept for the process)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(include_path) or None)


def check_tasks(args) -> tuple:
    """(TaskManager, task names) of ``args.tasks`` / ``args.include_path``; InputError for unknown ones."""
    try:
        import lm_eval  # noqa: F401
    except ImportError as e:
        raise InputError("lm-eval is not installed: pip install 'olmo_hybrid_jax[eval]'") from e
    for p in args.include_path or []:
        if not Path(p).is_dir():
            raise InputError(f"--include-path {p} is not a directory")
    tm = task_manager(tuple(args.include_path or ()))
    tasks = [t for t in args.tasks.split(",") if t]
    unknown = [t for t in tasks if t not in tm.all_tasks]
    if unknown or not tasks:
        raise InputError(f"unknown task {unknown[0]!r} (list them with `lm-eval ls tasks`; local YAMLs need "
                         "--include-path)" if unknown else "no task given")
    return tm, tasks


def run_tasks(lm, tm, tasks: list[str], args) -> dict:
    """``lm_eval.simple_evaluate`` of ``tasks`` on the model ``lm``: results, versions, n-shot, ..."""
    import lm_eval
    from lm_eval.utils import make_table

    res = lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=args.num_fewshot, limit=args.limit,
                                  task_manager=tm, log_samples=False, random_seed=args.seed,
                                  numpy_random_seed=args.seed, torch_random_seed=args.seed,
                                  fewshot_random_seed=args.seed)
    if not args.quiet:
        print(make_table(res))
    return {k: res[k] for k in ("results", "versions", "n-shot", "higher_is_better", "n-samples") if k in res}


def lm_eval_tasks(args) -> dict:
    from olmo_hybrid_jax.eval.loading import checkpoint_kind

    checkpoint_kind(args.checkpoint)
    tm, tasks = check_tasks(args)
    from olmo_hybrid_jax.eval.harness import OlmoHybridLM

    return run_tasks(OlmoHybridLM(**_model_args(args)), tm, tasks, args)
