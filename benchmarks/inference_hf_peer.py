"""The PyTorch peer for benchmarks/inference_bench.py: transformers' OlmoHybridForCausalLM (+ FLA kernels) generate.

Runs under the GPU image's python3 (torch, transformers, triton), with FLA's two pure-Python wheels put on
the path (see shared/bench/get_fla_wheels.sh; carried in .whl/):

    python3 -m pip install -q --no-index --no-deps --target /tmp/fla .whl/fla_core-*.whl \\
        .whl/flash_linear_attention-*.whl
    PYTHONPATH=/tmp/fla python3 benchmarks/inference_hf_peer.py --out DIR

Same model as the JAX benchmark (7B widths, 32 layers, random bf16 weights, SDPA attention), batch 1:
prefill time = one forward of the prompt with a fresh cache and last-position logits; decode = ``generate``
of 256 greedy tokens (min_new_tokens=256) minus the prefill. ``--smoke`` runs a tiny model on the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "out/inference_bench"))
    ap.add_argument("--contexts", default="8192,65536")
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args(argv)
    import torch
    import transformers
    from transformers import OlmoHybridConfig, OlmoHybridForCausalLM

    dev = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    res = {"torch": torch.__version__, "transformers": transformers.__version__, "device": dev, "contexts": {}}
    try:
        import fla

        res["fla"] = getattr(fla, "__version__", "?")
    except Exception as e:  # the peer still runs on transformers' torch fallbacks
        res["fla"] = f"unavailable: {e!r}"
    if dev == "cuda":
        res["gpu"] = torch.cuda.get_device_name(0)
    print(f"HF peer: torch {torch.__version__}, transformers {transformers.__version__}, fla {res['fla']}, {dev}",
          flush=True)
    if args.smoke:
        cfg = OlmoHybridConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                               num_attention_heads=4, linear_num_key_heads=2, linear_num_value_heads=2,
                               linear_key_head_dim=16, linear_value_head_dim=32, pad_token_id=0, eos_token_id=1,
                               rope_parameters={"rope_type": "default", "rope_theta": None})
        contexts, n_new = [96, 160], 16
    else:
        cfg = OlmoHybridConfig(num_hidden_layers=args.layers,
                               rope_parameters={"rope_type": "default", "rope_theta": None})
        contexts, n_new = [int(c) for c in args.contexts.split(",")], args.new_tokens
    cfg._attn_implementation = "sdpa"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    torch.set_default_dtype(dtype)
    t0 = time.perf_counter()
    with torch.device(dev):
        model = OlmoHybridForCausalLM(cfg).eval()
    torch.set_default_dtype(torch.float32)
    res["params"] = sum(p.numel() for p in model.parameters())
    res["build_s"] = time.perf_counter() - t0
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    g = torch.Generator().manual_seed(0)

    def prefill(ids):
        with torch.no_grad():
            out = model(ids, use_cache=True, logits_to_keep=1)
        sync()
        return out

    def gen(ids, n):
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                 pad_token_id=cfg.pad_token_id, eos_token_id=cfg.eos_token_id)
        sync()
        return out

    for C in contexts:
        P = C - n_new
        row = res["contexts"].setdefault(str(C), {"prompt": P})
        ids = torch.randint(2, cfg.vocab_size - 2, (1, P), generator=g).to(dev)
        try:
            gen(ids, 4)  # warm-up: Triton JIT / autotune at this length
            t0 = time.perf_counter()
            out = prefill(ids)
            row["prefill_s"] = time.perf_counter() - t0
            del out
            t0 = time.perf_counter()
            seq = gen(ids, n_new)
            total = time.perf_counter() - t0
            n = seq.shape[1] - P
            row.update(prefill_tok_s=P / row["prefill_s"], generate_s=total, new_tokens=n,
                       decode_s=total - row["prefill_s"], decode_tok_s=n / max(total - row["prefill_s"], 1e-9),
                       e2e_tok_s=(P + n) / total)
            print(f"  HF C={C}: prefill {row['prefill_s']:.3f}s ({row['prefill_tok_s']:,.0f} tok/s), generate {n} "
                  f"in {total:.2f}s -> decode {row['decode_tok_s']:.1f} tok/s, e2e {row['e2e_tok_s']:,.0f} tok/s",
                  flush=True)
        except Exception as e:
            row["error"] = repr(e)[:2000]
            print(f"  HF C={C}: FAILED {e!r}"[:2000], flush=True)
        if dev == "cuda":
            row["max_memory_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
            torch.cuda.empty_cache()
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "hf_peer.json").write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
