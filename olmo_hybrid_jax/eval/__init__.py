"""Evaluation: an lm-evaluation-harness model and perplexity of token or text files.

- ``olmo_hybrid_jax.eval.harness.OlmoHybridLM``: the lm-eval model ``olmo_hybrid_jax``, registered when
  this package is imported (if lm-eval is installed: ``pip install olmo_hybrid_jax[eval]``).
  lm-eval 0.4.13 discovers no models from other packages (no entry points; ``--include_path`` is
  for tasks only), so its own CLI does not see it; use ``python -m olmo_hybrid_jax.eval lm-eval``.
- ``olmo_hybrid_jax.eval.scoring``: exact continuation and document scoring on the caches.
- ``python -m olmo_hybrid_jax.eval ppl``: loss, perplexity and bits per byte of files.
"""

try:
    import lm_eval  # noqa: F401
except ImportError:  # ppl and scoring need no lm-eval
    pass
else:
    from olmo_hybrid_jax.eval.harness import OlmoHybridLM  # noqa: F401  (registers "olmo_hybrid_jax")
