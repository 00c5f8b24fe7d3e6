"""Test helpers: random tiny OLMo Hybrid checkpoints in the release on-disk layout, and the HF reference.

The checkpoint tensors come from transformers' own OlmoHybridForCausalLM (so the names and shapes are
HF's, not ours), with every parameter perturbed away from its init (norm weights != 1) so a swapped
or skipped tensor changes the logits. transformers >= 5.24 keeps one fused ``linear_attn.conv1d``;
the release stores three tensors, so we split it at the exact q/k/v channel boundaries ourselves
(``save_pretrained`` splits it into equal thirds, which is wrong whenever value_dim != key_dim).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

TINY = dict(
    vocab_size=211, hidden_size=48, intermediate_size=80, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=4, linear_num_key_heads=2, linear_num_value_heads=2, linear_key_head_dim=12,
    linear_value_head_dim=20, linear_conv_kernel_dim=4,
    # NoPE as transformers understands it (a bare None becomes theta=10000 RoPE in transformers >= 5.24)
    rope_parameters={"rope_type": "default", "rope_theta": None}, pad_token_id=0, eos_token_id=1,
    bos_token_id=None, tie_word_embeddings=False,
)


def hf_config(**overrides):
    from transformers import OlmoHybridConfig

    return OlmoHybridConfig(**{**TINY, **overrides})


def hf_random_model(seed: int = 0, **overrides):
    """A transformers OlmoHybridForCausalLM (fp32, eager attention) with perturbed random weights."""
    import torch
    from transformers import OlmoHybridForCausalLM

    torch.manual_seed(seed)
    cfg = hf_config(**overrides)
    cfg._attn_implementation = "eager"
    model = OlmoHybridForCausalLM(cfg).eval()
    assert (model.model.rotary_emb is None) == (cfg.rope_parameters.get("rope_theta") is None)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("A_log"):
                p.copy_(torch.log(torch.empty(p.shape).uniform_(0.5, 8.0, generator=g)))
            elif name.endswith("dt_bias"):
                p.copy_(0.5 * torch.randn(p.shape, generator=g) - 2.0)
            elif name.endswith("conv1d.weight"):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.08 * torch.randn(p.shape, generator=g))
    return model


def release_state_dict(model) -> dict:
    """HF model -> {release tensor name: torch tensor}, splitting each fused conv1d into q/k/v."""
    cfg = model.config
    kd = cfg.linear_num_key_heads * cfg.linear_key_head_dim
    vd = cfg.linear_num_value_heads * cfg.linear_value_head_dim
    out = {}
    for name, t in model.state_dict().items():
        if name.endswith("linear_attn.conv1d.weight"):
            assert t.shape[0] == 2 * kd + vd
            base = name[: -len("conv1d.weight")]
            out[base + "q_conv1d.weight"] = t[:kd].clone()
            out[base + "k_conv1d.weight"] = t[kd: 2 * kd].clone()
            out[base + "v_conv1d.weight"] = t[2 * kd:].clone()
        elif name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        else:
            out[name] = t.detach().clone().contiguous()
    return out


def write_checkpoint(path: Path, config_dict: dict, tensors: dict) -> Path:
    """Write config.json + model.safetensors (torch tensors) as an HF checkpoint directory."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"),
              metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(config_dict, indent=2))
    return path


def hf_config_dict(model) -> dict:
    d = model.config.to_dict()
    d["dtype"] = "float32"
    return d


def release_checkpoint(path: Path, seed: int = 0, **overrides):
    """(hf_model, checkpoint dir) for a random tiny model written in the release layout."""
    model = hf_random_model(seed, **overrides)
    write_checkpoint(path, hf_config_dict(model), release_state_dict(model))
    return model, Path(path)


def hf_from_pretrained(path):
    """Load with transformers and assert that every tensor was used and none was missing."""
    from transformers import OlmoHybridForCausalLM

    model, info = OlmoHybridForCausalLM.from_pretrained(str(path), output_loading_info=True,
                                                        attn_implementation="eager")
    problems = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    assert not problems, f"transformers could not load {path} cleanly: {problems}"
    return model.float().eval()


def hf_logits(model, ids: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
    import torch

    with torch.no_grad():
        kw = {} if attention_mask is None else {"attention_mask": torch.tensor(attention_mask)}
        return model(torch.tensor(ids), **kw).logits.float().numpy()


def rel_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))
