"""The embedded default job: build (or convert) a model, run a forward pass and a short greedy generation.

    python -m olmo_hybrid_jax.demo                      # tiny random byte-level model, offline
    python -m olmo_hybrid_jax.demo --hf-dir PATH        # an HF checkpoint directory instead

The tiny model is random, so its text is noise: the demo shows the pipeline (build -> save_hf ->
load_hf -> logits -> generation), not a trained model.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from olmo_hybrid_jax.config import OlmoHybridConfig
from olmo_hybrid_jax.convert import load_hf, save_hf
from olmo_hybrid_jax.generate import generate
from olmo_hybrid_jax.model import OlmoHybridForCausalLM


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hf-dir", default=None, help="HF checkpoint directory (default: a tiny random model)")
    ap.add_argument("--preset", default="tiny", help="preset of configs/models/ for the random model")
    ap.add_argument("--prompt", default="OLMo Hybrid mixes Gated DeltaNet and attention.")
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    print(f"jax {jax.__version__} on {jax.devices()[0].platform}")
    if args.hf_dir:
        model = load_hf(args.hf_dir)
        cfg = model.config
    else:
        cfg = OlmoHybridConfig.preset(args.preset)
        model = OlmoHybridForCausalLM(cfg, rngs=nnx.Rngs(args.seed))
        with tempfile.TemporaryDirectory() as d:  # show the conversion path on the way
            save_hf(model, d, progress=False)
            model = load_hf(d, progress=False)
            print(f"built preset {args.preset!r}, saved as an HF checkpoint and loaded back")
    n = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    print(f"{cfg.num_hidden_layers} layers {''.join('G' if t == 'linear_attention' else 'A' for t in cfg.layer_types)}"
          f" (G = Gated DeltaNet, A = attention), hidden {cfg.hidden_size}, {n:,} parameters")

    if cfg.vocab_size < 256:
        raise SystemExit("the byte-level demo prompt needs vocab_size >= 256")
    ids = np.frombuffer(args.prompt.encode("utf-8"), np.uint8).astype(np.int32)[None]
    t0 = time.perf_counter()
    logits = nnx.jit(lambda m, x: m(x))(model, jnp.asarray(ids))
    logits.block_until_ready()
    print(f"forward: logits {tuple(logits.shape)} {logits.dtype}, finite={bool(jnp.isfinite(logits).all())}, "
          f"{time.perf_counter() - t0:.2f}s incl. compile")
    t0 = time.perf_counter()
    out = generate(model, ids, args.max_new_tokens, eos_token_id=())  # random weights: no early stop
    new = out[0, ids.shape[1]:]
    print(f"greedy continuation ids (cached prefill + decode, {time.perf_counter() - t0:.2f}s incl. compile): "
          f"{new.tolist()}")
    print(f"as bytes: {bytes(int(t) % 256 for t in new)!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
