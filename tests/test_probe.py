"""olmo_hybrid_jax.probe: what it reports is what the forward pass computes."""

import jax.numpy as jnp
import numpy as np
from flax import nnx

from olmo_hybrid_jax.kernels import gated_delta_rule
from olmo_hybrid_jax import OlmoHybridConfig, OlmoHybridForCausalLM
from olmo_hybrid_jax.modules import gdn_gates, l2_normalize
from olmo_hybrid_jax.probe import trace


def test_trace_matches_forward_and_kernel():
    cfg = OlmoHybridConfig.preset("tiny")
    model = OlmoHybridForCausalLM(cfg, rngs=nnx.Rngs(1))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 30)))
    seg = jnp.asarray(np.repeat([[0] * 12 + [1] * 18], 2, axis=0))
    tr = trace(model, ids, segment_ids=seg)
    np.testing.assert_allclose(tr.final_hidden, np.asarray(model.model(ids, positions=jnp.broadcast_to(
        jnp.arange(30), (2, 30)), segment_ids=seg)), rtol=1e-5, atol=1e-5)
    assert sorted(tr.gdn) == [0, 1, 2] and sorted(tr.attention) == [3]
    assert tr.residual_update().shape == (4, 2, 30)
    # the state norm after the last token equals the norm of the kernel's final state
    layer = model.model.layers[0]
    a = layer.linear_attn
    x = layer.input_layernorm(model.model.embed_tokens(ids))
    k = jnp.repeat(l2_normalize(a.k_conv1d(a.k_proj(x), segment_ids=seg).reshape(2, 30, a.nk, a.dk)), 2, axis=2)
    v = a.v_conv1d(a.v_proj(x), segment_ids=seg).reshape(2, 30, a.nv, a.dv)
    g, beta = gdn_gates(a.a_proj(x), a.b_proj(x), a.A_log[...], a.dt_bias[...], allow_neg_eigval=True)
    _, S = gated_delta_rule(k, k, v, g, beta, segment_ids=seg, output_final_state=True, backend="sequential")
    np.testing.assert_allclose(tr.gdn[0].state_norm[:, -1], np.sqrt((np.asarray(S) ** 2).sum((-2, -1))), rtol=1e-4)
    np.testing.assert_allclose(tr.gdn[0].g, np.asarray(g), rtol=1e-6)
    assert (tr.gdn[0].decay <= 1).all() and (tr.gdn[0].memory_length >= 1).all()
    # attention: rows are distributions, causal, and blind across the document boundary
    P = tr.attention[3]
    np.testing.assert_allclose(P.sum(-1), 1.0, rtol=1e-5)
    assert np.abs(np.triu(P, 1)).max() == 0
    assert np.abs(P[:, :, 12:, :12]).max() == 0
