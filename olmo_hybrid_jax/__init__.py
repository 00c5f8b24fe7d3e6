"""OLMo Hybrid (Gated DeltaNet + attention, 3:1) in JAX / Flax NNX."""

from olmo_hybrid_jax.config import OlmoHybridConfig
from olmo_hybrid_jax.model import OlmoHybridForCausalLM

__all__ = ["OlmoHybridConfig", "OlmoHybridForCausalLM", "load_hf", "save_hf"]


def __getattr__(name):  # conversion pulls in safetensors/tqdm: import it on first use
    if name in ("load_hf", "save_hf"):
        from olmo_hybrid_jax import convert

        return getattr(convert, name)
    raise AttributeError(name)
