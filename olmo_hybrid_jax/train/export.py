"""A trained model out of a run directory: as an ``OlmoHybridForCausalLM``, or as an HF checkpoint.

    python -m olmo_hybrid_jax.train.export RUN_DIR HF_DIR [--step N] [--dtype bfloat16] [--overwrite] [--tokenizer DIR]

``load_run_model(run_dir)`` restores the parameters of a training checkpoint (the latest, or ``step``)
into an ``OlmoHybridForCausalLM`` in the list layout (``scan_layers=True`` for the scanned one), whatever
layout the run trained with. The CLI writes with ``convert.save_hf`` (its output folder policy: HF_DIR
new, or this project's checkpoint replaced with ``--overwrite``; files 0666 & ~umask) and copies the tokenizer
files (tokenizer.json, tokenizer_config.json with its chat template, special_tokens_map.json) from ``--tokenizer``,
by default from the run's chat data (``data.format: chat``: the first folder's ``tokenizer/``), so the folder
loads with ``AutoTokenizer`` and ``apply_chat_template``. ``train.export_hf: true`` does the same at the end of
a run (``export_params``, into RUN/hf).

A LoRA run (``model.lora``) checkpoints its adapters only: the base comes from its ``model.init_from`` again
(refused when its weights are not the ones the checkpoint records), the adapters are merged into it
(``post.lora.merge_lora``) and the result is a plain model / HF checkpoint.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax

from olmo_hybrid_jax.model import OlmoHybridForCausalLM, from_list_params, stacked_to_list


def load_run_model(run_dir: str | Path, step: int | None = None, **model_kwargs) -> OlmoHybridForCausalLM:
    """Restore the fp32 master weights of ``run_dir``'s checkpoint ``step`` (default: the latest).

    ``model_kwargs`` override the run's construction options (dtypes, backends); unless given, the model
    has the list layout, no remat and an unsharded GDN op.
    """
    from olmo_hybrid_jax.train.checkpoint import Checkpointer
    from olmo_hybrid_jax.train.config import load_config
    from olmo_hybrid_jax.train.trainer import Trainer, _abstract_with_shardings

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"{run_dir} is not a training run directory (no config.yaml)")
    if not (run_dir / "checkpoints").is_dir():  # before the Checkpointer, which would create the folder
        raise FileNotFoundError(f"{run_dir / 'checkpoints'} does not exist: the run saved no checkpoint")
    cfg = load_config(run_dir / "config.yaml")
    ckpt = Checkpointer(run_dir / "checkpoints", every=cfg.checkpoint.every, keep=cfg.checkpoint.keep,
                        async_save=False)
    try:
        steps = ckpt.all_steps()
        if not steps:
            raise FileNotFoundError(f"{run_dir / 'checkpoints'} holds no finished checkpoint")
        step = max(steps) if step is None else step
        if step not in steps:
            raise ValueError(f"no checkpoint for step {step} in {run_dir / 'checkpoints'}; have {sorted(steps)}")
        trainer = Trainer(cfg)
        state, _, meta = ckpt.restore(step, _abstract_with_shardings(trainer))
    finally:
        ckpt.close()
    params = jax.device_get(state["params"])
    if trainer.lora is not None:
        from olmo_hybrid_jax.train.config import ConfigError
        from olmo_hybrid_jax.train.trainer import check_lora_base

        trainer.load_base()
        try:
            check_lora_base(trainer, meta, f"checkpoint step {step} in {run_dir / 'checkpoints'}")
        except ConfigError as e:
            raise ValueError(str(e)) from None
        params = merged_params(trainer, params, jax.device_get(trainer.base))
    if trainer.scanned:
        params = stacked_to_list(params, trainer.mcfg)
    kwargs = {**trainer.kw, "scan_layers": False, "remat": "none", "gdn_shard_axes": None, "gdn_mesh": None,
              **model_kwargs}
    return from_list_params(trainer.mcfg, params, **kwargs)


def merged_params(trainer, adapters, base) -> dict:
    """The plain model's params (pure dict, ``trainer``'s layout) of a LoRA run: ``base`` with ``adapters``
    folded into its kernels (``post.lora.merge_lora``, summed in fp32, stored in the base's dtype)."""
    import jax.numpy as jnp
    from flax import nnx

    from olmo_hybrid_jax.post.lora import merge_lora

    as_jax = lambda t: jax.tree.map(jnp.asarray, t)  # noqa: E731  (host numpy is read-only: merge_lora writes)
    model = merge_lora(nnx.merge(trainer.graphdef, as_jax(adapters), as_jax(base)))
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def run_tokenizer_dir(cfg) -> Path | None:
    """The tokenizer files that travel with a run's export: its chat data's ``tokenizer/`` (None: tokens data)."""
    if cfg.data.format != "chat":
        return None
    from olmo_hybrid_jax.train.data import resolve_path

    d = resolve_path(cfg.data.paths[0]) / "tokenizer"
    return d if d.is_dir() else None


def copy_tokenizer_files(src: str | Path, hf_dir: str | Path) -> list[str]:
    """Copy ``TOKENIZER_FILES`` present in ``src`` into ``hf_dir``; the names copied."""
    import shutil

    src = Path(src)
    if not src.is_dir():
        raise FileNotFoundError(f"tokenizer folder not found: {src}")
    names = [n for n in TOKENIZER_FILES if (src / n).is_file()]
    for n in names:
        shutil.copyfile(src / n, Path(hf_dir) / n)
    return names


def export_params(trainer, params, hf_dir: str | Path, *, tokenizer_dir: str | Path | None = None,
                  dtype=None, overwrite: bool = False) -> Path:
    """Write host ``params`` (the training layout of ``trainer``) as an HF checkpoint plus tokenizer files."""
    from olmo_hybrid_jax.convert import save_hf

    if trainer.scanned:
        params = stacked_to_list(params, trainer.mcfg)
    kwargs = {**trainer.kw, "scan_layers": False, "remat": "none", "gdn_shard_axes": None, "gdn_mesh": None}
    out = save_hf(from_list_params(trainer.mcfg, params, **kwargs), hf_dir, dtype=dtype, overwrite=overwrite,
                  progress=False)
    if tokenizer_dir is not None:
        copy_tokenizer_files(tokenizer_dir, out)
    return out


def main(argv=None) -> int:
    from olmo_hybrid_jax.convert import DTYPE_NAMES, check_output_dir, dtype_arg, save_hf

    ap = argparse.ArgumentParser(prog="python -m olmo_hybrid_jax.train.export", description=__doc__.split("\n")[0])
    ap.add_argument("run_dir")
    ap.add_argument("hf_dir")
    ap.add_argument("--step", type=int, default=None)
    ap.add_argument("--dtype", type=dtype_arg, default=None,
                    help=f"dtype of the written tensors: {', '.join(DTYPE_NAMES)} (default: fp32 master weights)")
    ap.add_argument("--overwrite", action="store_true", help="replace this project's checkpoint in HF_DIR")
    ap.add_argument("--tokenizer", default=None, help="folder of tokenizer files to copy (default: the run's chat "
                                                      "data tokenizer/, if any)")
    args = ap.parse_args(argv)
    try:
        check_output_dir(args.hf_dir, args.overwrite)  # refuse before restoring anything
        tok = Path(args.tokenizer) if args.tokenizer else None
        if tok is not None and not tok.is_dir():
            raise FileNotFoundError(f"tokenizer folder not found: {tok}")
        model = load_run_model(args.run_dir, args.step)
        out = save_hf(model, args.hf_dir, dtype=args.dtype, overwrite=args.overwrite)
        if tok is None and (Path(args.run_dir) / "config.yaml").is_file():
            from olmo_hybrid_jax.train.config import load_config

            tok = run_tokenizer_dir(load_config(Path(args.run_dir) / "config.yaml"))
        if tok is not None:
            copy_tokenizer_files(tok, out)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
