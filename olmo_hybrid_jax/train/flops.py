"""Analytic training FLOPs of OLMo Hybrid, and peak FLOP/s per device kind, for MFU.

Per token, training = 3 x forward (forward + backward's two matmuls per forward matmul):

    forward = 2 * N_matmul                                   (every weight one multiply-add)
            + n_attn * 4 * nh * hd * (T + 1) / 2             (causal QK^T and PV: (T+1)/2 keys on average)
            + n_gdn  * nv * 2 * (3 C dk + 2 C dv + 3 dk dv + C^2 / 3)   (chunked gated delta rule)

- N_matmul: all projection kernels, the MLPs, the LM head and the depthwise conv kernels (each weight
  is used once per token). Not counted: the embedding lookup, norms, gates, softmax, elementwise ops.
  With tied embeddings the LM head (V x H) is counted once.
- GDN core, chunked WY form with chunk C = 64 (spec §3.7), per head and chunk of C tokens, in
  multiply-adds: K K^T (C^2 dk), Q K^T (C^2 dk), T W-build (C^2 dk), T U-build (C^2 dv),
  (Q K^T * D) V_new (C^2 dv), W S, Q S and the state update K^T V_new (3 C dk dv each C dk dv), and the
  unit-lower-triangular inverse (C^3 / 3); divided by C tokens and doubled into FLOPs. q/k are
  repeated to the nv value heads, so the count is per value head.
- The 7B at T = 8192: ~4.42e10 FLOPs/token (shared/docs/performance.md quotes ~4.43e10).

MFU = train_flops_per_token * tokens/s / (devices * peak FLOP/s per device).
"""

from __future__ import annotations

from olmo_hybrid_jax.config import FULL, LINEAR, OlmoHybridConfig

GDN_CHUNK = 64

#: Dense bf16 peak FLOP/s by (lower-case) substring of ``jax.Device.device_kind``; first match wins.
PEAK_FLOPS: list[tuple[str, float]] = [
    ("gh200", 989e12),
    ("h200", 989e12),
    ("h100", 989e12),
    ("h800", 989e12),
    ("b200", 2250e12),
    ("gb200", 2500e12),
    ("a100", 312e12),
    ("a800", 312e12),
    ("l40s", 362e12),
    ("a10g", 125e12),
    ("mi300x", 1307e12),
    ("tpu v6", 918e12),
    ("tpu v5p", 459e12),
    ("tpu v5 lite", 197e12),
    ("tpu v5e", 197e12),
    ("tpu v4", 275e12),
]


def matmul_params(cfg: OlmoHybridConfig) -> int:
    """Weights used as multiply-adds once per token (all matmul kernels + conv kernels, incl. LM head)."""
    H, I, V = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size  # noqa: E741  (I: the MLP width, as in the papers)
    mlp = 3 * H * I
    kd, vd, nv, Kc = cfg.linear_key_dim, cfg.linear_value_dim, cfg.linear_num_value_heads, cfg.linear_conv_kernel_dim
    gdn = H * (2 * kd + vd) + 2 * H * nv + H * vd + vd * H + Kc * (2 * kd + vd)
    nh, nkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    attn = H * nh * hd + 2 * H * nkv * hd + nh * hd * H
    total = V * H  # LM head (tied or not, one V x H matmul)
    for t in cfg.layer_types:
        total += mlp + (gdn if t == LINEAR else attn)
    return total


def attention_flops_per_token(cfg: OlmoHybridConfig, seq_len: int) -> float:
    """Forward FLOPs per token of the causal score and value products, all attention layers."""
    n = sum(t == FULL for t in cfg.layer_types)
    return n * 4 * cfg.num_attention_heads * cfg.head_dim * (seq_len + 1) / 2


def gdn_flops_per_token(cfg: OlmoHybridConfig, chunk: int = GDN_CHUNK) -> float:
    """Forward FLOPs per token of the chunked gated-delta-rule core, all GDN layers."""
    n = sum(t == LINEAR for t in cfg.layer_types)
    C, dk, dv = chunk, cfg.linear_key_head_dim, cfg.linear_value_head_dim
    macs = 3 * C * dk + 2 * C * dv + 3 * dk * dv + C * C / 3
    return n * cfg.linear_num_value_heads * 2 * macs


def forward_flops_per_token(cfg: OlmoHybridConfig, seq_len: int) -> float:
    return 2 * matmul_params(cfg) + attention_flops_per_token(cfg, seq_len) + gdn_flops_per_token(cfg)


def train_flops_per_token(cfg: OlmoHybridConfig, seq_len: int) -> float:
    """Model FLOPs per trained token (forward + backward, no rematerialisation counted)."""
    return 3 * forward_flops_per_token(cfg, seq_len)


def peak_flops_per_device(device_kind: str, override: float | None = None) -> float | None:
    """Dense bf16 peak of a device kind (None when unknown, e.g. CPU, unless ``override``)."""
    if override:
        return float(override)
    kind = device_kind.lower()
    for key, val in PEAK_FLOPS:
        if key in kind:
            return val
    return None
