"""OLMo Hybrid (Gated DeltaNet + attention, 3:1) in JAX / Flax NNX."""

from olmo_hybrid_jax.config import OlmoHybridConfig
from olmo_hybrid_jax.model import OlmoHybridForCausalLM

__all__ = ["OlmoHybridConfig", "OlmoHybridForCausalLM", "generate", "load_hf", "save_hf"]


def __getattr__(name):  # conversion and generation pull in more: import them on first use
    if name in ("load_hf", "save_hf", "load_orbax", "save_orbax"):
        from olmo_hybrid_jax import convert

        return getattr(convert, name)
    if name == "generate":  # a callable module: olmo_hybrid_jax.generate(model, prompt_ids, max_new_tokens)
        import importlib

        return importlib.import_module("olmo_hybrid_jax.generate")
    raise AttributeError(name)
