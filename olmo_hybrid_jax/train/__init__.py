"""Training: configs, mesh/sharding, scanned layers, chunked loss, OLMo-core optimizer, grain data,
orbax checkpoints, metrics and MFU. Entry point: ``train.py`` at the repo root (``run`` below).

Submodules import lazily so ``olmo_hybrid_jax.train.flops`` etc. stay cheap to import.
"""

__all__ = ["run"]


def run(*args, **kwargs):
    from olmo_hybrid_jax.train.trainer import run as _run

    return _run(*args, **kwargs)
