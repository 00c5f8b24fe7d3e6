"""Flax NNX building blocks of OLMo Hybrid.

Attribute names follow the Hugging Face module tree (``q_proj``, ``linear_attn``, ``o_norm``, ...), so a
checkpoint tensor maps onto a parameter path by renaming ``weight`` to ``kernel``/``embedding`` and
transposing; see ``olmo_hybrid_jax.convert``.

Dtypes: parameters are stored in ``param_dtype`` (fp32 master weights by default); matmuls run in
``dtype`` (e.g. bf16). Norm statistics, the GDN gates and the recurrence always run in fp32.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from olmo_hybrid_jax.cache import GDNCache, KVCache
from olmo_hybrid_jax.kernels import decay_gate, gated_delta_rule, gated_delta_rule_step, l2_normalize, write_strength

Array = jax.Array

ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}


def scoped(name: str):
    """Decorator: run a module's ``__call__`` under ``jax.named_scope(name)``, so profiles and HLO dumps
    attribute its ops (e.g. ``gdn/...``, ``transpose(jvp(gdn))/...`` for its backward)."""
    def wrap(fn):
        @functools.wraps(fn)
        def call(self, *args, **kwargs):
            with jax.named_scope(name):
                return fn(self, *args, **kwargs)
        return call
    return wrap


def _normal(std: float):
    return nnx.initializers.normal(stddev=std)


def dense(in_features: int, out_features: int, *, std: float, bias: bool = False, dtype=None,
          param_dtype=jnp.float32, rngs: nnx.Rngs) -> nnx.Linear:
    """A bias-free (by default) linear layer; kernel [in, out] = the PyTorch weight transposed."""
    return nnx.Linear(in_features, out_features, use_bias=bias, dtype=dtype, param_dtype=param_dtype,
                      kernel_init=_normal(std), bias_init=nnx.initializers.zeros_init(), rngs=rngs)


class RMSNorm(nnx.Module):
    """OLMo RMSNorm: ``(w * (x_f32 * rsqrt(mean(x_f32^2) + eps))).astype(x.dtype)``.

    The weight multiplies in fp32 before the cast back (OLMo 2/3 style, not Llama's cast-then-multiply).
    """

    def __init__(self, dim: int, *, eps: float, param_dtype=jnp.float32):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype))

    @scoped("rmsnorm")
    def __call__(self, x: Array) -> Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (self.weight[...].astype(jnp.float32) * y).astype(x.dtype)


class GatedRMSNorm(nnx.Module):
    """Per-head gated RMSNorm of the GDN output: norm -> weight -> * silu(gate), all in fp32.

    ``x`` and ``gate`` are [..., dv]; the weight [dv] is shared across heads. eps is 1e-5 in the
    released model (FLA's FusedRMSNormGated default, hard-coded in HF), not the config's rms_norm_eps.
    """

    def __init__(self, dim: int, *, eps: float = 1e-5, param_dtype=jnp.float32):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype))

    @scoped("gated_rmsnorm")
    def __call__(self, x: Array, gate: Array) -> Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        y = self.weight[...].astype(jnp.float32) * y * jax.nn.silu(gate.astype(jnp.float32))
        return y.astype(x.dtype)


class ShortConv(nnx.Module):
    """Causal depthwise 1-D convolution over time, no bias, then an activation.

    ``out[t, c] = act(sum_j kernel[j, c] * x[t - (Kc - 1) + j, c])`` with zeros before t = 0 (and before
    the start of the token's packed document when ``segment_ids`` is given). ``kernel`` is [Kc, C];
    the PyTorch Conv1d weight [C, 1, Kc] is ``kernel.T[:, None, :]``. Tap Kc-1 multiplies the current
    token (PyTorch convolution is cross-correlation).

    ``cache`` (optional, [B, Kc-1, C]) holds the previous Kc-1 *pre-conv* inputs (oldest first) and
    replaces the zero left-padding, so a prefill can be continued; the updated window is returned.
    """

    def __init__(self, channels: int, kernel_size: int, *, activation: str = "silu", std: float = 0.02,
                 param_dtype=jnp.float32, dtype=None, rngs: nnx.Rngs):
        self.kernel_size = kernel_size
        self.activation = activation
        self.dtype = dtype
        self.kernel = nnx.Param(_normal(std)(rngs.params(), (kernel_size, channels), param_dtype))

    @scoped("short_conv")
    def __call__(self, x: Array, *, segment_ids: Array | None = None, cache: Array | None = None,
                 return_cache: bool = False):
        if segment_ids is not None and cache is not None:
            raise ValueError("ShortConv: segment_ids and cache cannot be combined")
        T = x.shape[1]
        Kc = self.kernel_size
        dtype = self.dtype or x.dtype
        w = self.kernel[...].astype(dtype)
        x = x.astype(dtype)
        # jnp.pad, not a concatenate with zeros: on a sequence split over devices (context parallelism)
        # XLA's partitioner pads with a (Kc-1)-token halo from the previous shard; a concatenate reshards x
        xp = jnp.pad(x, ((0, 0), (Kc - 1, 0), (0, 0))) if cache is None else jnp.concatenate(
            [cache.astype(dtype), x], axis=1)  # [B, T + Kc - 1, C]
        y = _short_conv(xp, w, segment_ids, self.activation)
        if return_cache:
            return y, xp[:, T:, :]
        return y


def _conv_keeps(segment_ids: Array | None, T: int, Kc: int) -> list[Array] | None:
    """Per tap j, [B, T, 1]: whether row t's tap (xp row t + j) lies in t's packed document."""
    if segment_ids is None:
        return None
    sp = jnp.pad(segment_ids, ((0, 0), (Kc - 1, 0)), constant_values=-1)
    return [(sp[:, j:j + T] == segment_ids)[..., None] for j in range(Kc)]


def _conv_pre(xp: Array, w: Array, segment_ids: Array | None) -> Array:
    """fp32 pre-activation sum_j w[j] * xp[:, t + j] (masked taps), xp [B, T + Kc - 1, C], w [Kc, C]."""
    T = xp.shape[1] - w.shape[0] + 1
    keeps = _conv_keeps(segment_ids, T, w.shape[0])
    acc = jnp.zeros(xp.shape[:1] + (T,) + xp.shape[2:], jnp.float32)
    for j in range(w.shape[0]):  # Kc is tiny (4): an unrolled sum of shifted products beats a conv op
        tap = xp[:, j:j + T, :] if keeps is None else jnp.where(keeps[j], xp[:, j:j + T, :], 0)
        acc = acc + tap.astype(jnp.float32) * w[j].astype(jnp.float32)
    return acc


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _short_conv(xp: Array, w: Array, segment_ids: Array | None, activation: str) -> Array:
    """act(conv) [B, T, C] in xp.dtype from the left-padded (or cache-prefixed) xp [B, T + Kc - 1, C]."""
    return ACTIVATIONS[activation](_conv_pre(xp, w, segment_ids)).astype(xp.dtype)


def _short_conv_fwd(xp, w, segment_ids, activation):
    return _short_conv(xp, w, segment_ids, activation), (xp, w, segment_ids)


def _short_conv_bwd(activation, res, dy):
    # Written out, not autodiff: autodiff summed the shifted cotangents in bf16 (dx twice as far from
    # the fp32 oracle); here dx is summed in fp32 and rounded once (RESULTS.md, issue 17, run D).
    xp, w, segment_ids = res
    Kc = w.shape[0]
    T = xp.shape[1] - Kc + 1
    acc = _conv_pre(xp, w, segment_ids)  # recomputed from xp: nothing fp32 kept from the forward
    _, slope = jax.jvp(ACTIVATIONS[activation], (acc,), (jnp.ones_like(acc),))
    dacc = dy.astype(jnp.float32) * slope
    keeps = _conv_keeps(segment_ids, T, Kc)
    dxp, dw = None, []
    for j in range(Kc):
        d = dacc * w[j].astype(jnp.float32)
        tap = xp[:, j:j + T, :].astype(jnp.float32)
        if keeps is not None:
            d, tap = jnp.where(keeps[j], d, 0), jnp.where(keeps[j], tap, 0)
        d = jnp.pad(d, ((0, 0), (j, Kc - 1 - j), (0, 0)))  # row t's tap j came from xp row t + j
        dxp = d if dxp is None else dxp + d
        dw.append(jnp.sum(dacc * tap, axis=(0, 1)))
    dseg = None if segment_ids is None else np.zeros(segment_ids.shape, jax.dtypes.float0)
    return dxp.astype(xp.dtype), jnp.stack(dw).astype(w.dtype), dseg


_short_conv.defvjp(_short_conv_fwd, _short_conv_bwd)


def rope_cos_sin(positions: Array, head_dim: int, theta: float) -> tuple[Array, Array]:
    """fp32 cos/sin [.., T, head_dim] of standard RoPE (frequencies concatenated as [f, f])."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    ang = positions.astype(jnp.float32)[..., None] * inv_freq
    ang = jnp.concatenate([ang, ang], axis=-1)
    return jnp.cos(ang), jnp.sin(ang)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """Rotate-half RoPE on x [B, T, H, D] with cos/sin [B, T, D] (fp32 math, cast back)."""
    half = x.shape[-1] // 2
    x32 = x.astype(jnp.float32)
    rot = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    return (x32 * cos[:, :, None, :] + rot * sin[:, :, None, :]).astype(x.dtype)


def causal_attention(q: Array, k: Array, v: Array, *, scale: float, segment_ids: Array | None = None,
                     key_mask: Array | None = None, implementation: str = "auto") -> Array:
    """Causal softmax attention with GQA. q [B, T, H, D], k/v [B, S, Hkv, D] -> [B, T, H, D].

    Queries are the last T of the S key positions. ``segment_ids`` [B, T] (T == S) restricts attention to
    the same packed document; ``key_mask`` [B, S] (True = real token) hides left padding.
    implementation: "xla" (einsum, fp32 softmax; what CPU and the parity tests use), "cudnn"
    (jax.nn.dot_product_attention's fused kernel, GPU), or "auto" (cudnn on GPU, xla elsewhere).
    """
    B, T, H, D = q.shape
    S = k.shape[1]
    if implementation == "auto":
        implementation = "cudnn" if jax.default_backend() == "gpu" else "xla"
    mask = attention_mask(B, T, S, segment_ids=segment_ids, key_mask=key_mask)
    if implementation == "cudnn":
        return jax.nn.dot_product_attention(
            q, k, v, scale=scale, is_causal=mask is None, mask=None if mask is None else mask[:, None],
            implementation="cudnn")
    if implementation != "xla":
        raise ValueError(f"attention implementation must be 'auto', 'xla' or 'cudnn', got {implementation!r}")
    Hkv = k.shape[2]
    probs = attention_probs(q, k, scale=scale, mask=mask, dtype=v.dtype)
    out = jnp.einsum("bgrts,bsgd->btgrd", probs.reshape(B, Hkv, H // Hkv, T, S), v,
                     preferred_element_type=jnp.float32)
    return out.reshape(B, T, H, D).astype(q.dtype)


def attention_mask(B: int, T: int, S: int, *, segment_ids: Array | None = None,
                   key_mask: Array | None = None) -> Array | None:
    """[B, T, S] bool (True = may attend) of causal attention whose queries are the last T of S keys,
    restricted to the same packed document and to real keys; None when plain causal (T == S) suffices."""
    if segment_ids is None and key_mask is None and T == S:
        return None
    qpos = jnp.arange(S - T, S)
    mask = (qpos[:, None] >= jnp.arange(S)[None, :])[None]  # [1, T, S]
    if segment_ids is not None:
        mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
    if key_mask is not None:
        mask = mask & key_mask[:, None, :].astype(bool)
    return jnp.broadcast_to(mask, (B, T, S))


def attention_probs(q: Array, k: Array, *, scale: float, mask: Array | None, dtype=jnp.float32) -> Array:
    """Softmax probabilities [B, H, T, S] of q [B, T, H, D] over k [B, S, Hkv, D] (GQA: query head h reads
    key head h // (H / Hkv)) under ``mask`` [B, T, S] (None: causal); fp32 logits and softmax, then ``dtype``."""
    B, T, H, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    qg = q.reshape(B, T, Hkv, H // Hkv, D)
    logits = jnp.einsum("btgrd,bsgd->bgrts", qg, k, preferred_element_type=jnp.float32) * scale
    if mask is None:
        mask = jnp.tril(jnp.ones((T, S), bool))[None]
    return _masked_softmax(logits, mask[:, None, None], dtype).reshape(B, H, T, S)


def _masked_softmax(logits: Array, mask: Array, dtype) -> Array:
    """fp32 softmax of ``logits`` where ``mask``; rows with no key at all (left padding) give zeros."""
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)
    return jnp.where(mask, probs, 0.0).astype(dtype)


def causal_attention_left_padded(q: Array, k: Array, v: Array, *, scale: float, key_mask: Array,
                                 implementation: str = "auto") -> Array:
    """Causal attention over left-padded rows without materialising a [T, T] mask.

    Each row is rotated so its real tokens come first and its pads last, plain causal attention runs
    (a real query never sees the trailing pads), and the output is rotated back. Real tokens get exactly
    what ``causal_attention(..., key_mask=key_mask)`` gives them; pad queries get finite values that
    nothing reads (GDN inputs and attention keys are masked at pads). ``key_mask`` [B, T] must be
    left padding (zeros, then ones). This keeps the fused cuDNN kernel (``is_causal``, no mask operand)
    usable for padded prefill at long T, where a [B, 1, T, T] mask would not fit.
    """
    B, T = key_mask.shape
    npad = T - jnp.sum(key_mask.astype(jnp.int32), axis=1)  # [B]
    t = jnp.arange(T)[None, :]
    fwd = ((t + npad[:, None]) % T)[:, :, None, None]  # rotated[t] = x[(t + npad) % T]
    back = ((t - npad[:, None]) % T)[:, :, None, None]
    rot = lambda x, idx: jnp.take_along_axis(x, idx, axis=1)  # noqa: E731
    o = causal_attention(rot(q, fwd), rot(k, fwd), rot(v, fwd), scale=scale, implementation=implementation)
    return rot(o, back)


def attention_over_cache(q: Array, k_cache: Array, v_cache: Array, mask: Array, *, scale: float) -> Array:
    """Softmax attention of new queries over a heads-major cache.

    q [B, T, H, D]; k_cache, v_cache [B, Hkv, S, D]; mask [B, T, S] (True = may attend) -> [B, T, H, D].
    Both products are batched over (row, kv head) with contiguous [S, D] slabs, so a decode step reads
    each cached key and value once (memory-bound; no relayout of the cache). fp32 logits and softmax.
    """
    B, T, H, D = q.shape
    Hkv = k_cache.shape[1]
    qg = q.reshape(B, T, Hkv, H // Hkv, D).transpose(0, 2, 3, 1, 4)  # [B, g, r, T, D]
    logits = jnp.einsum("bgrtd,bgsd->bgrts", qg.astype(k_cache.dtype), k_cache,
                        preferred_element_type=jnp.float32) * scale
    probs = _masked_softmax(logits, mask[:, None, None], v_cache.dtype)
    out = jnp.einsum("bgrts,bgsd->bgrtd", probs, v_cache, preferred_element_type=jnp.float32)
    return out.transpose(0, 3, 1, 2, 4).reshape(B, T, H, D).astype(q.dtype)


@dataclasses.dataclass(frozen=True)
class AttentionShardings:
    """Where the no-cache attention core runs, for context parallelism: q [B, T, nh, hd] and k/v
    [B, T, nkv, hd] leave the projections in ``seq_q`` / ``seq_kv`` (the residual stream's sequence split),
    are moved to ``q`` / ``kv`` for the core (Ulysses: heads split instead, one all-to-all each; or k/v
    whole: all-gather CP), and o comes back from ``q`` to ``seq_q``. Both ends are pinned: with only the
    inner one, XLA would push the heads split back into the projections (gathering x and the weights).
    ``ids`` holds segment ids [B, T] whole along T: the [B, T, T] document mask is built from them on each
    device (built from split ids, XLA would move the mask)."""

    seq_q: Any
    seq_kv: Any
    q: Any
    kv: Any
    ids: Any


class Attention(nnx.Module):
    """Full causal attention with QK-norm over the whole projected width (OLMo 2/3), optional RoPE, GQA.

    ``shardings`` (an ``AttentionShardings``) constrains q, k, v and o of the no-cache path (training).
    """

    def __init__(self, cfg, *, dtype=None, param_dtype=jnp.float32, implementation: str = "auto",
                 shardings: AttentionShardings | None = None, rngs: nnx.Rngs):
        H, nh, nkv, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        std = cfg.initializer_range
        kw = dict(std=std, bias=cfg.attention_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.num_heads, self.num_kv_heads, self.head_dim = nh, nkv, hd
        self.rope_theta = cfg.rope_theta
        self.implementation = implementation
        self.shardings = shardings
        self.q_proj = dense(H, nh * hd, **kw)
        self.k_proj = dense(H, nkv * hd, **kw)
        self.v_proj = dense(H, nkv * hd, **kw)
        self.o_proj = dense(nh * hd, H, **kw)
        self.q_norm = RMSNorm(nh * hd, eps=cfg.rms_norm_eps, param_dtype=param_dtype)
        self.k_norm = RMSNorm(nkv * hd, eps=cfg.rms_norm_eps, param_dtype=param_dtype)

    def project(self, x: Array, *, positions: Array) -> tuple[Array, Array, Array]:
        """q [B, T, nh, hd], k, v [B, T, nkv, hd] as attention uses them (q, k after QK-norm and RoPE)."""
        B, T, _ = x.shape
        q = self.q_norm(self.q_proj(x)).reshape(B, T, self.num_heads, self.head_dim)
        k = self.k_norm(self.k_proj(x)).reshape(B, T, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(B, T, self.num_kv_heads, self.head_dim)
        if self.rope_theta is not None:
            cos, sin = rope_cos_sin(positions, self.head_dim, self.rope_theta)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return q, k, v

    def intermediates(self, x: Array, *, positions: Array, segment_ids: Array | None = None,
                      key_mask: Array | None = None) -> dict[str, Array]:
        """What the no-cache forward computes: ``q``, ``k``, ``v`` (see ``project``) and ``probs``
        [B, nh, T, T], the fp32 attention probabilities (rows of masked queries are zero)."""
        q, k, v = self.project(x, positions=positions)
        B, T = x.shape[:2]
        mask = attention_mask(B, T, T, segment_ids=segment_ids, key_mask=key_mask)
        probs = attention_probs(q, k, scale=self.head_dim ** -0.5, mask=mask)
        return dict(q=q, k=k, v=v, probs=probs)

    @scoped("attention")
    def __call__(self, x: Array, *, positions: Array, segment_ids: Array | None = None,
                 key_mask: Array | None = None, cache: KVCache | None = None, cache_index=None,
                 cache_key_mask: Array | None = None):
        """x [B, T, H] -> [B, T, H]; with ``cache``, -> (output, updated cache).

        Cached mode (inference): the new keys/values are written into the heads-major ``cache`` at slots
        ``cache_index .. cache_index + T``. ``cache_index`` is the Python int 0 for a prefill into an
        empty cache (attention then runs over the new tokens only, through the fused causal kernel, with
        ``key_mask`` [B, T] marking left padding), or a traced slot index for a continuation/decode step
        (attention over the whole buffer, masked by ``cache_key_mask`` [B, max_len], which already marks
        the new tokens, and by slot order).
        """
        B, T, _ = x.shape
        q, k, v = self.project(x, positions=positions)
        scale = self.head_dim ** -0.5
        if cache is None:
            sh = self.shardings
            wsc = jax.lax.with_sharding_constraint
            if sh is not None:
                q, k, v = wsc(q, sh.seq_q), wsc(k, sh.seq_kv), wsc(v, sh.seq_kv)
                q, k, v = wsc(q, sh.q), wsc(k, sh.kv), wsc(v, sh.kv)
                segment_ids = None if segment_ids is None else wsc(segment_ids, sh.ids)
            o = causal_attention(q, k, v, scale=scale, segment_ids=segment_ids,
                                 key_mask=key_mask, implementation=self.implementation)
            if sh is not None:
                o = wsc(wsc(o, sh.q), sh.seq_q)
            return self.o_proj(o.reshape(B, T, -1))
        if segment_ids is not None:
            raise ValueError("Attention: segment_ids cannot be combined with a cache")
        if cache_index is None:
            raise ValueError("Attention: cached mode needs cache_index (0 for a fresh prefill)")
        to_cache = lambda x: x.swapaxes(1, 2).astype(cache.k.dtype)  # noqa: E731  [B, nkv, T, hd]
        new = KVCache(k=jax.lax.dynamic_update_slice_in_dim(cache.k, to_cache(k), cache_index, axis=2),
                      v=jax.lax.dynamic_update_slice_in_dim(cache.v, to_cache(v), cache_index, axis=2))
        fresh = isinstance(cache_index, int) and not isinstance(cache_index, bool) and cache_index == 0
        if fresh:  # nothing older in the cache: causal attention over the new tokens
            if T > cache.k.shape[2]:
                raise ValueError(f"Attention: {T} tokens do not fit a cache of {cache.k.shape[2]} slots")
            impl = self.implementation
            if impl == "auto":
                impl = "cudnn" if jax.default_backend() == "gpu" else "xla"
            if key_mask is not None and impl == "cudnn":
                o = causal_attention_left_padded(q, k, v, scale=scale, key_mask=key_mask, implementation=impl)
            else:
                o = causal_attention(q, k, v, scale=scale, key_mask=key_mask, implementation=impl)
        else:
            if cache_key_mask is None:
                raise ValueError("Attention: a continued cache needs cache_key_mask [B, max_len]")
            L = cache.k.shape[2]
            slots = jnp.arange(L)
            qslots = cache_index + jnp.arange(T)
            mask = (slots[None, :] <= qslots[:, None])[None] & cache_key_mask[:, None, :].astype(bool)
            o = attention_over_cache(q, new.k, new.v, mask, scale=scale)
        return self.o_proj(o.reshape(B, T, -1)), new


def gdn_gates(a: Array, b: Array, A_log: Array, dt_bias: Array, *, allow_neg_eigval: bool) -> tuple[Array, Array]:
    """(g, beta) of Gated DeltaNet from the raw projections a, b [B, T, nv], in fp32.

    g = -exp(A_log) * softplus(a + dt_bias) (the log-decay, <= 0); beta = sigmoid(b), doubled when
    negative eigenvalues are allowed (so 1 - beta spans (-1, 1)). The math lives in kernels (the fused
    kernels compute the same gates in-kernel); this names the model's use of it.
    """
    return decay_gate(a, A_log, dt_bias), write_strength(b, sigmoid=True, scale=2.0 if allow_neg_eigval else 1.0)


class GatedDeltaNet(nnx.Module):
    """Gated DeltaNet sequence mixer (HF ``OlmoHybridGatedDeltaNet``).

    x [B, T, H] -> q, k, v projections -> separate causal short convs + activation -> heads
    (q, k: [B, T, nk, dk]; v: [B, T, nv, dv]) -> l2norm q, k -> repeat q, k over value heads when
    nv > nk (value head j reads key head j // (nv / nk)) -> gated delta rule with q scaled by dk^-1/2
    -> gated RMSNorm with silu(g_proj(x)) -> o_proj.

    ``backend``, ``kernel_config`` (a ``kernels.PallasConfig``), ``shard_axes`` (a ``kernels.ShardAxes``)
    and ``mesh`` are passed to ``kernels.gated_delta_rule`` as ``backend``, ``config``, ``shard_axes`` and
    ``mesh``: the op picks its implementation and, given shard axes, runs itself per shard.
    """

    def __init__(self, cfg, *, dtype=None, param_dtype=jnp.float32, backend: str = "auto", kernel_config=None,
                 shard_axes=None, mesh=None, rngs: nnx.Rngs):
        H = cfg.hidden_size
        self.nk, self.nv = cfg.linear_num_key_heads, cfg.linear_num_value_heads
        self.dk, self.dv = cfg.linear_key_head_dim, cfg.linear_value_head_dim
        self.allow_neg_eigval = cfg.linear_allow_neg_eigval
        self.backend = backend
        self.kernel_config, self.shard_axes, self.mesh = kernel_config, shard_axes, mesh
        key_dim, value_dim = self.nk * self.dk, self.nv * self.dv
        std = cfg.initializer_range
        kw = dict(std=std, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = dense(H, key_dim, **kw)
        self.k_proj = dense(H, key_dim, **kw)
        self.v_proj = dense(H, value_dim, **kw)
        self.a_proj = dense(H, self.nv, **kw)
        self.b_proj = dense(H, self.nv, **kw)
        self.g_proj = dense(H, value_dim, **kw)
        self.o_proj = dense(value_dim, H, **kw)
        ckw = dict(activation=cfg.hidden_act, std=std, param_dtype=param_dtype, dtype=dtype, rngs=rngs)
        self.q_conv1d = ShortConv(key_dim, cfg.linear_conv_kernel_dim, **ckw)
        self.k_conv1d = ShortConv(key_dim, cfg.linear_conv_kernel_dim, **ckw)
        self.v_conv1d = ShortConv(value_dim, cfg.linear_conv_kernel_dim, **ckw)
        # Mamba-style init: A uniform in [a_log_min, a_log_max] (log-stored), dt log-uniform, dt_bias = softplus^-1(dt).
        A = jax.random.uniform(rngs.params(), (self.nv,), jnp.float32,
                               cfg.linear_a_log_min, cfg.linear_a_log_max)
        self.A_log = nnx.Param(jnp.log(jnp.maximum(A, 1e-12)).astype(param_dtype))
        u = jax.random.uniform(rngs.params(), (self.nv,), jnp.float32)
        dt = jnp.exp(u * (math.log(cfg.linear_dt_max) - math.log(cfg.linear_dt_min)) + math.log(cfg.linear_dt_min))
        dt = jnp.maximum(dt, cfg.linear_dt_init_floor)
        self.dt_bias = nnx.Param((dt + jnp.log(-jnp.expm1(-dt))).astype(param_dtype))
        self.o_norm = GatedRMSNorm(self.dv, eps=1e-5, param_dtype=param_dtype)

    def _streams(self, x: Array, *, segment_ids: Array | None = None, cache: GDNCache | None = None):
        """(q, k [B, T, nv, dk] after the short convs, repeated over value heads; v [B, T, nv, dv];
        the updated conv windows (cq, ck, cv), None without a cache)."""
        B, T, _ = x.shape
        windows = None
        if cache is not None:
            if segment_ids is not None:
                raise ValueError("GatedDeltaNet: segment_ids cannot be combined with a cache")
            q, cq = self.q_conv1d(self.q_proj(x), cache=cache.conv_q, return_cache=True)
            k, ck = self.k_conv1d(self.k_proj(x), cache=cache.conv_k, return_cache=True)
            v, cv = self.v_conv1d(self.v_proj(x), cache=cache.conv_v, return_cache=True)
            windows = (cq, ck, cv)
        else:
            q = self.q_conv1d(self.q_proj(x), segment_ids=segment_ids)
            k = self.k_conv1d(self.k_proj(x), segment_ids=segment_ids)
            v = self.v_conv1d(self.v_proj(x), segment_ids=segment_ids)
        q = q.reshape(B, T, self.nk, self.dk)
        k = k.reshape(B, T, self.nk, self.dk)
        v = v.reshape(B, T, self.nv, self.dv)
        if self.nv != self.nk:
            r = self.nv // self.nk
            q, k = jnp.repeat(q, r, axis=2), jnp.repeat(k, r, axis=2)
        return q, k, v, windows

    def _transforms(self) -> dict:
        """The recurrence's input transforms, applied by the kernels (in-kernel on GPU: no extra HBM
        passes): l2norm of q, k and the gates g, beta from the raw projections a, b."""
        return dict(use_qk_l2norm_in_kernel=True, A_log=self.A_log[...], dt_bias=self.dt_bias[...],
                    beta_sigmoid=True, beta_scale=2.0 if self.allow_neg_eigval else 1.0)

    def intermediates(self, x: Array, *, segment_ids: Array | None = None,
                      padding_mask: Array | None = None) -> dict[str, Array]:
        """What the no-cache forward feeds the recurrence, as the kernels' transforms make it:
        ``q``, ``k`` [B, T, nv, dk] (short conv, l2-normalised, fp32, repeated over value heads),
        ``v`` [B, T, nv, dv], ``g`` (log decay <= 0) and ``beta`` [B, T, nv] fp32, and ``gate``
        [B, T, nv, dv] (g_proj(x), the output gate's input)."""
        B, T, _ = x.shape
        if padding_mask is not None:
            x = x * padding_mask[:, :, None].astype(x.dtype)
        q, k, v, _ = self._streams(x, segment_ids=segment_ids)
        g, beta = gdn_gates(self.a_proj(x), self.b_proj(x), self.A_log[...], self.dt_bias[...],
                            allow_neg_eigval=self.allow_neg_eigval)
        return dict(q=l2_normalize(q), k=l2_normalize(k), v=v, g=g, beta=beta,
                    gate=self.g_proj(x).reshape(B, T, self.nv, self.dv))

    @scoped("gdn")
    def __call__(self, x: Array, *, segment_ids: Array | None = None, padding_mask: Array | None = None,
                 cache: GDNCache | None = None):
        """x [B, T, H] -> [B, T, H]; with ``cache`` (a :class:`GDNCache`), -> (output, updated cache).

        Cached mode continues the sequence: the conv windows replace the zero left-padding of the short
        convs and the state is the recurrence's initial state (the chunked kernel for T > 1, one
        recurrent step for T == 1); the new windows and the final fp32 state are returned.
        """
        B, T, _ = x.shape
        if padding_mask is not None:  # HF zeroes left-padding tokens before the projections
            x = x * padding_mask[:, :, None].astype(x.dtype)
        q, k, v, windows = self._streams(x, segment_ids=segment_ids, cache=cache)
        a, b = self.a_proj(x), self.b_proj(x)
        scale = self.dk ** -0.5
        if cache is not None and T == 1:  # decode: one recurrent step
            o, state = gated_delta_rule_step(q[:, 0], k[:, 0], v[:, 0], a[:, 0], b[:, 0], cache.state, scale=scale,
                                             **self._transforms())
            o = o[:, None]
        else:
            with jax.named_scope("gdn_core"):
                o, state = gated_delta_rule(q, k, v, a, b, scale=scale, segment_ids=segment_ids,
                                            initial_state=None if cache is None else cache.state,
                                            output_final_state=cache is not None, backend=self.backend,
                                            config=self.kernel_config, shard_axes=self.shard_axes, mesh=self.mesh,
                                            **self._transforms())
        gate = self.g_proj(x).reshape(B, T, self.nv, self.dv)
        y = self.o_proj(self.o_norm(o, gate).reshape(B, T, self.nv * self.dv))
        if cache is None:
            return y
        dt = cache.conv_q.dtype
        return y, GDNCache(conv_q=windows[0].astype(dt), conv_k=windows[1].astype(dt), conv_v=windows[2].astype(dt),
                           state=state)


class MLP(nnx.Module):
    """SwiGLU feed-forward: down(act(gate(x)) * up(x)), no biases."""

    def __init__(self, cfg, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(std=cfg.initializer_range, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.act = cfg.hidden_act
        self.gate_proj = dense(cfg.hidden_size, cfg.intermediate_size, **kw)
        self.up_proj = dense(cfg.hidden_size, cfg.intermediate_size, **kw)
        self.down_proj = dense(cfg.intermediate_size, cfg.hidden_size, **kw)

    @scoped("mlp")
    def __call__(self, x: Array) -> Array:
        return self.down_proj(ACTIVATIONS[self.act](self.gate_proj(x)) * self.up_proj(x))
