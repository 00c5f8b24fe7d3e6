"""olmo_hybrid_jax.train.loss: chunked / fused cross-entropy against full logits, its HLO, its errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from olmo_hybrid_jax.train.loss import chunked_cross_entropy, reference_cross_entropy


@pytest.mark.parametrize("T,chunk", [(12, 4), (13, 5), (8, 64)])
def test_chunked_cross_entropy_matches_full_logits(T, chunk):
    k = jax.random.split(jax.random.key(0), 4)
    B, H, V = 3, 16, 50
    h = jax.random.normal(k[0], (B, T, H))
    w = jax.random.normal(k[1], (H, V)) * 0.3
    labels = jax.random.randint(k[2], (B, T), 0, V)
    mask = jax.random.uniform(k[3], (B, T)) > 0.2

    def chunked(h, w):
        return chunked_cross_entropy(h, w, labels, mask, z_loss=1e-2, chunk=chunk)[0]

    def full(h, w):
        return reference_cross_entropy(jnp.einsum("bth,hv->btv", h, w), labels, mask, z_loss=1e-2)[0]

    np.testing.assert_allclose(chunked(h, w), full(h, w), rtol=1e-6)
    gc, gf = jax.grad(chunked, argnums=(0, 1))(h, w), jax.grad(full, argnums=(0, 1))(h, w)
    for a, b in zip(gc, gf):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("z_loss", [0.0, 1e-4])
def test_fused_cross_entropy_bf16_and_metrics(z_loss):
    """bf16 compute: loss and gradients close to the fp32 full-logits reference; the CE/z sums are exact
    metrics without gradients; forward-only (no differentiation) gives the same values."""
    k = jax.random.split(jax.random.key(1), 4)
    B, T, H, V = 2, 40, 32, 300
    h = jax.random.normal(k[0], (B, T, H))
    w = jax.random.normal(k[1], (H, V)) * 0.2
    labels = jax.random.randint(k[2], (B, T), 0, V)
    mask = jax.random.uniform(k[3], (B, T)) > 0.3

    def fused(h, w):
        return chunked_cross_entropy(h.astype(jnp.bfloat16), w, labels, mask, z_loss=z_loss, chunk=16,
                                     compute_dtype=jnp.bfloat16)

    def full(h, w):
        hb, wb = h.astype(jnp.bfloat16).astype(jnp.float32), w.astype(jnp.bfloat16).astype(jnp.float32)
        return reference_cross_entropy(jnp.einsum("bth,hv->btv", hb, wb), labels, mask, z_loss=z_loss)

    (loss, ce, z), (rl, rce, rz) = jax.jit(fused)(h, w), full(h, w)
    np.testing.assert_allclose([loss, ce, z], [rl, rce, rz], rtol=2e-3)
    gf = jax.grad(lambda h, w: fused(h, w)[0], argnums=(0, 1))(h, w)
    gr = jax.grad(lambda h, w: full(h, w)[0], argnums=(0, 1))(h, w)
    for a, b in zip(gf, gr):
        assert a.dtype == b.dtype == jnp.float32
        assert float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b)) < 2e-2
    g_ce = jax.grad(lambda h: fused(h, w)[1])(h)  # a metric: stop_gradient, not a wrong gradient
    assert float(jnp.abs(g_ce).max()) == 0.0
    # the differentiated forward's loss equals the plain forward's
    val, _ = jax.value_and_grad(lambda h: fused(h, w)[0])(h)
    np.testing.assert_allclose(val, loss, rtol=1e-6)


def test_fused_cross_entropy_backward_has_no_fp32_vocab_matmul():
    """With bf16 compute, every [*, V] matmul of the loss's gradient takes bf16 inputs (fp32 inputs
    would run as slow tf32/fp32 GEMMs on GPU), and the logits are not recomputed (3 vocab matmuls)."""
    B, T, H, V = 2, 64, 16, 1000
    h, w = jnp.ones((B, T, H), jnp.bfloat16), jnp.ones((H, V), jnp.float32)
    lab, mask = jnp.zeros((B, T), jnp.int32), jnp.ones((B, T), bool)
    f = jax.jit(jax.grad(lambda h, w: chunked_cross_entropy(h, w, lab, mask, chunk=16,
                                                            compute_dtype=jnp.bfloat16)[0], argnums=(0, 1)))
    hlo = f.lower(h, w).as_text()
    dots = [ln for ln in hlo.splitlines() if "dot_general" in ln and "1000" in ln]
    assert len(dots) == 3, dots
    for ln in dots:
        operand_types = ln.rsplit(" : (", 1)[1].split(") ->")[0]  # "tensor<..xbf16>, tensor<..xbf16>"
        assert operand_types.count("xbf16>") == 2, ln


def test_cross_entropy_rejects_mismatched_shapes():
    h, w = jnp.ones((2, 8, 4)), jnp.ones((4, 10))
    with pytest.raises(ValueError, match="kernel"):
        chunked_cross_entropy(h, jnp.ones((5, 10)), jnp.zeros((2, 8), int), jnp.ones((2, 8), bool))
    with pytest.raises(ValueError, match="labels"):
        chunked_cross_entropy(h, w, jnp.zeros((2, 7), int), jnp.ones((2, 8), bool))


def test_chunked_cross_entropy_keeps_logits_chunk_sized():
    B, T, H, V, c = 2, 256, 8, 1000, 32
    h, w = jnp.ones((B, T, H)), jnp.ones((H, V))
    lab, mask = jnp.zeros((B, T), jnp.int32), jnp.ones((B, T), bool)
    f = jax.jit(jax.grad(lambda h, w: chunked_cross_entropy(h, w, lab, mask, chunk=c)[0], argnums=(0, 1)))
    hlo = f.lower(h, w).as_text()
    assert f"{B}x{T}x{V}" not in hlo and f"tensor<{B}x{T}x{V}" not in hlo
    assert f"{B}x{c}x{V}" in hlo
