"""Inference: caches, prefill/decode/continuation against the full forward, generation against transformers.

Everything runs fp32 on CPU on tiny random models in the release checkpoint layout (tests/hf_utils.py).
Greedy generation must be token-identical to ``transformers``' ``generate`` (batched, left padding);
cached logits must equal the uncached forward at every position to 1e-4 relative.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hf_utils import rel_l2, release_checkpoint
from olmo_hybrid_jax import OlmoHybridConfig, OlmoHybridForCausalLM
from olmo_hybrid_jax.cache import GDNCache, KVCache, cache_nbytes, init_cache
from olmo_hybrid_jax.convert import load_hf, save_hf
from olmo_hybrid_jax.generate import Sampling, extend, generate, prefill, process_logits
from olmo_hybrid_jax.generate import main as generate_cli
from olmo_hybrid_jax.model import with_layout
from olmo_hybrid_jax.modules import causal_attention, causal_attention_left_padded

torch = pytest.importorskip("torch")

# NoPE MHA; GVA (nv = 2 nk) + GQA + RoPE; tied embeddings + attention first + conv 3 + no negative eigenvalues.
CONFIGS = {
    "base": dict(),
    "gva_gqa_rope": dict(linear_num_value_heads=4, num_key_value_heads=2,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    "tied_attnfirst": dict(tie_word_embeddings=True, linear_allow_neg_eigval=False, linear_conv_kernel_dim=3,
                           num_hidden_layers=3, num_key_value_heads=1,
                           layer_types=["full_attention", "linear_attention", "linear_attention"],
                           rope_parameters={"rope_type": "default", "rope_theta": 500000.0}),
}
PAD, EOS = 0, 1


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory):
    hf, path = release_checkpoint(tmp_path_factory.mktemp(request.param), seed=7 + len(request.param),
                                  **CONFIGS[request.param])
    ours = load_hf(path, progress=False, gdn_backend="chunked", attention_impl="xla")
    return request.param, hf, ours


def _prompts(seed, B=3, P=9, vocab=211):
    """Left-padded prompts [B, P] (row 0 full, the others shorter) and their mask; no EOS/PAD ids inside."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(2, vocab, (B, P))
    mask = np.ones((B, P), np.int64)
    for b in range(1, B):
        mask[b, : min(P - 1, 3 * b + 1)] = 0
    ids[mask == 0] = PAD
    return ids, mask


def _hf_generate(hf, ids, mask, n, **kw):
    with torch.no_grad():
        out = hf.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=n, do_sample=False,
                          pad_token_id=PAD, **kw)
    return out.numpy()


def _full_logits(model, ids, mask):
    return np.asarray(model(jnp.asarray(ids), attention_mask=None if mask is None else jnp.asarray(mask)))


# ----------------------------------------------------------------------------------------- vs transformers
def test_greedy_matches_transformers_batched_left_padded(pair):
    name, hf, ours = pair
    ids, mask = _prompts(1)
    ref = _hf_generate(hf, ids, mask, 14, eos_token_id=None)
    got = generate(ours, ids, 14, attention_mask=mask, eos_token_id=())
    np.testing.assert_array_equal(got, ref, err_msg=name)


def test_greedy_eos_matches_transformers(pair):
    """Rows stop independently at EOS, later tokens are PAD, the loop ends when all rows are done."""
    name, hf, ours = pair
    ids, mask = _prompts(2)
    free = generate(ours, ids, 10, attention_mask=mask, eos_token_id=())
    eos = int(free[1, ids.shape[1] + 2])  # row 1 stops after its 3rd token
    ref = _hf_generate(hf, ids, mask, 10, eos_token_id=eos)
    got = generate(ours, ids, 10, attention_mask=mask, eos_token_id=eos)
    np.testing.assert_array_equal(got, ref, err_msg=name)
    P = ids.shape[1]
    first = int(np.argmax(got[1, P:] == eos))
    assert (got[1, P + first + 1:] == PAD).all()


def test_scanned_layout_generates_like_transformers(tmp_path):
    """A scanned model (two 3:1 blocks) loaded from HF runs the cached forward through its stacked blocks."""
    hf, path = release_checkpoint(tmp_path, seed=11, num_hidden_layers=8,
                                  layer_types=["linear_attention"] * 3 + ["full_attention"] + ["linear_attention"] * 3
                                  + ["full_attention"])
    ours = load_hf(path, progress=False, gdn_backend="chunked", attention_impl="xla", scan_layers=True)
    assert ours.scan_layers
    ids, mask = _prompts(6)
    ref = _hf_generate(hf, ids, mask, 10, eos_token_id=None)
    np.testing.assert_array_equal(generate(ours, ids, 10, attention_mask=mask, eos_token_id=()), ref)
    np.testing.assert_array_equal(generate(with_layout(ours, scan_layers=False), ids, 10, attention_mask=mask,
                                           eos_token_id=()), ref)


# ----------------------------------------------------------------------------------------- vs the full forward
def test_prefill_then_decode_equals_full_forward(pair):
    """Prefill logits at every prompt position, then 6 one-token decode steps: each equals the uncached forward."""
    name, _, ours = pair
    ids, mask = _prompts(3, P=8)
    rng = np.random.default_rng(4)
    new = rng.integers(2, 211, (ids.shape[0], 6))
    full_ids = np.concatenate([ids, new], 1)
    full_mask = np.concatenate([mask, np.ones_like(new)], 1)
    ref = _full_logits(ours, full_ids, full_mask)
    logits, cache = prefill(ours, ids, attention_mask=mask, max_len=16, logits_to_keep=None)
    steps = [np.asarray(logits)]
    for t in range(new.shape[1]):
        lg, cache = extend(ours, cache, new[:, t:t + 1])
        steps.append(np.asarray(lg))
    got = np.concatenate(steps, 1)
    real = full_mask.astype(bool)
    assert rel_l2(got[real], ref[real]) < 1e-4, name
    assert int(cache.length) == 14 and cache.positions.tolist() == full_mask.sum(1).tolist()


def test_multi_token_continuation_equals_full_forward(pair):
    """A 70-token chunk onto a prefilled cache (crosses a 64-token kernel chunk), then a decode step."""
    name, _, ours = pair
    ids, mask = _prompts(5, B=2, P=6)
    rng = np.random.default_rng(6)
    chunk = rng.integers(2, 211, (2, 70))
    last = rng.integers(2, 211, (2, 1))
    full_ids = np.concatenate([ids, chunk, last], 1)
    full_mask = np.concatenate([mask, np.ones((2, 71), np.int64)], 1)
    ref = _full_logits(ours, full_ids, full_mask)
    _, cache = prefill(ours, ids, attention_mask=mask, max_len=80)
    lg1, cache = extend(ours, cache, chunk)
    lg2, cache = extend(ours, cache, last)
    got = np.concatenate([np.asarray(lg1), np.asarray(lg2)], 1)
    assert rel_l2(got, ref[:, 6:]) < 1e-4, name


def test_generate_returns_a_cache_that_extend_continues(tiny):
    ids = np.random.default_rng(9).integers(2, 256, (2, 5))
    out, cache = generate(tiny, ids, 4, eos_token_id=(), max_len=12, return_cache=True)
    assert int(cache.length) == 9 and cache.max_len == 12
    nxt = np.array([[7], [8]])
    logits, cache = extend(tiny, cache, nxt)
    ref = _full_logits(tiny, np.concatenate([out, nxt], 1), None)[:, -1:]
    assert rel_l2(np.asarray(logits), ref) < 1e-4


def test_prefill_in_row_groups_equals_whole_batch():
    cfg = OlmoHybridConfig.preset("tiny")
    m = OlmoHybridForCausalLM(cfg, rngs=nnx.Rngs(1), attention_impl="xla", gdn_backend="chunked")
    ids, mask = _prompts(8, B=4, P=7, vocab=256)
    a_logits, a = prefill(m, ids, attention_mask=mask, max_len=12)
    b_logits, b = prefill(m, ids, attention_mask=mask, max_len=12, prefill_batch_size=2)
    np.testing.assert_allclose(np.asarray(a_logits), np.asarray(b_logits), rtol=1e-5, atol=1e-6)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)
    out_a = generate(m, ids, 5, attention_mask=mask, eos_token_id=())
    out_b = generate(m, ids, 5, attention_mask=mask, eos_token_id=(), prefill_batch_size=1)
    np.testing.assert_array_equal(out_a, out_b)


def test_left_padded_attention_by_rotation_equals_masked():
    """The mask-free padded prefill path (used with cuDNN) gives the masked result at real tokens."""
    rng = np.random.default_rng(0)
    B, T, H, Hkv, D = 3, 10, 4, 2, 8
    q = jnp.asarray(rng.standard_normal((B, T, H, D)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((B, T, Hkv, D)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((B, T, Hkv, D)), jnp.float32)
    mask = np.ones((B, T), bool)
    mask[1, :3] = False
    mask[2, :9] = False
    ref = causal_attention(q, k, v, scale=D ** -0.5, key_mask=jnp.asarray(mask), implementation="xla")
    got = causal_attention_left_padded(q, k, v, scale=D ** -0.5, key_mask=jnp.asarray(mask), implementation="xla")
    np.testing.assert_allclose(np.asarray(got)[mask], np.asarray(ref)[mask], rtol=1e-6, atol=1e-6)
    assert np.isfinite(np.asarray(got)).all()


# ----------------------------------------------------------------------------------------- cache contract
def test_gdn_cache_is_independent_of_context_length():
    cfg = OlmoHybridConfig.preset("tiny")
    short, long = init_cache(cfg, 2, 16), init_cache(cfg, 2, 512)
    kinds = []
    for a, b in zip(short.layers, long.layers):
        if isinstance(a, GDNCache):
            kinds.append("G")
            assert jax.tree.map(lambda x: (x.shape, x.dtype), a) == jax.tree.map(lambda x: (x.shape, x.dtype), b)
            assert a.state.dtype == jnp.float32
            assert a.state.shape == (2, cfg.linear_num_value_heads, cfg.linear_key_head_dim, cfg.linear_value_head_dim)
            assert a.conv_v.shape == (2, cfg.linear_conv_kernel_dim - 1, cfg.linear_value_dim)
        else:
            kinds.append("A")
            assert isinstance(a, KVCache)
            assert a.k.shape == (2, cfg.num_key_value_heads, 16, cfg.head_dim) and b.k.shape[2] == 512
    assert kinds == ["G", "G", "G", "A"]
    # All growth with max_len is the attention KV buffers (+ the key mask): GDN bytes do not move.
    per_slot = cfg.num_full_layers * 2 * cfg.num_key_value_heads * cfg.head_dim * 2 + 1  # bf16 K,V + bool mask
    assert cache_nbytes(cfg, 2, 512) - cache_nbytes(cfg, 2, 16) == 2 * (512 - 16) * per_slot
    gdn = lambda c: sum(x.nbytes for layer in c.layers if isinstance(layer, GDNCache)  # noqa: E731
                        for x in jax.tree.leaves(layer))
    assert gdn(short) == gdn(long) > 0


def test_decode_loop_compiles_once():
    """Segmented (streaming) decode reuses one executable: the segment end is a traced argument."""
    from olmo_hybrid_jax import generate as gen_mod

    cfg = OlmoHybridConfig.preset("tiny")
    m = OlmoHybridForCausalLM(cfg, rngs=nnx.Rngs(2), attention_impl="xla", gdn_backend="chunked")
    ids = np.random.default_rng(0).integers(2, 256, (2, 5))
    chunks = []
    before = gen_mod.decode_loop._cache_size()
    out = generate(m, ids, 11, eos_token_id=(), stream=lambda blk: chunks.append(blk), stream_interval=3)
    assert gen_mod.decode_loop._cache_size() - before == 1
    assert [c.shape[1] for c in chunks] == [3, 3, 3, 2]
    np.testing.assert_array_equal(np.concatenate(chunks, 1), out[:, 5:])
    np.testing.assert_array_equal(out, generate(m, ids, 11, eos_token_id=()))


# ----------------------------------------------------------------------------------------- sampling
@pytest.fixture(scope="module")
def tiny():
    cfg = OlmoHybridConfig.preset("tiny")
    return OlmoHybridForCausalLM(cfg, rngs=nnx.Rngs(3), attention_impl="xla", gdn_backend="chunked")


def test_sampling_top_k_1_is_greedy(tiny):
    ids = np.random.default_rng(1).integers(2, 256, (2, 6))
    greedy = generate(tiny, ids, 8, eos_token_id=())
    np.testing.assert_array_equal(generate(tiny, ids, 8, top_k=1, temperature=0.7, seed=5, eos_token_id=()), greedy)
    np.testing.assert_array_equal(generate(tiny, ids, 8, top_p=1e-6, seed=5, eos_token_id=()), greedy)
    a = generate(tiny, ids, 8, do_sample=True, seed=11, eos_token_id=())
    np.testing.assert_array_equal(a, generate(tiny, ids, 8, do_sample=True, seed=11, eos_token_id=()))
    assert not np.array_equal(a, generate(tiny, ids, 8, do_sample=True, seed=12, eos_token_id=()))


def test_logits_warpers_follow_transformers():
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    logits = np.random.default_rng(0).standard_normal((4, 50)).astype(np.float32) * 3
    t = torch.tensor(logits)
    for temp, k, p in [(0.7, 5, None), (1.3, None, 0.8), (1.0, 10, 0.5), (0.5, None, 0.95)]:
        ref = TemperatureLogitsWarper(temp)(None, t.clone())
        if k is not None:
            ref = TopKLogitsWarper(k)(None, ref)
        if p is not None:
            ref = TopPLogitsWarper(p)(None, ref)
        got = np.asarray(process_logits(jnp.asarray(logits), Sampling(True, temp, k, p)))
        np.testing.assert_array_equal(np.isfinite(got), np.isfinite(ref.numpy()))
        fin = np.isfinite(got)
        np.testing.assert_allclose(got[fin], ref.numpy()[fin], rtol=1e-6)


# ----------------------------------------------------------------------------------------- bad input
def test_bad_input_raises_clear_errors(tiny):
    ids = np.ones((2, 6), np.int32) * 5
    with pytest.raises(ValueError, match="exceeds max_len"):
        generate(tiny, ids, 5, max_len=8)
    with pytest.raises(ValueError, match="longer than max_len"):
        prefill(tiny, ids, max_len=4)
    with pytest.raises(ValueError, match=r"\[batch, seq\]"):
        generate(tiny, np.ones(6, np.int32), 3)
    with pytest.raises(ValueError, match="shape of prompt_ids"):
        generate(tiny, ids, 3, attention_mask=np.ones((2, 5)))
    with pytest.raises(ValueError, match="LEFT padding"):
        generate(tiny, ids, 3, attention_mask=np.array([[1, 1, 1, 1, 0, 0]] * 2))
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(tiny, ids, -1)
    with pytest.raises(ValueError, match=r"must lie in \[0, 256\)"):
        generate(tiny, ids + 300, 3)
    with pytest.raises(ValueError, match="integer"):
        generate(tiny, ids.astype(np.float32), 3)
    with pytest.raises(ValueError, match="top_p"):
        generate(tiny, ids, 3, top_p=1.5)
    with pytest.raises(ValueError, match="top_k"):
        generate(tiny, ids, 3, top_k=0)
    with pytest.raises(ValueError, match="prefill_batch_size"):
        generate(tiny, ids, 3, prefill_batch_size=3)
    _, cache = prefill(tiny, ids, max_len=7)
    with pytest.raises(ValueError, match="do not fit"):
        extend(tiny, cache, np.ones((2, 2), np.int32))
    with pytest.raises(ValueError, match=r"must be \[2, T>=1\]"):
        extend(tiny, cache, np.ones((3, 1), np.int32))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert generate(tiny, ids, 0).shape == (2, 6)
    ragged = generate(tiny, [[5, 6, 7], [8]], 2, eos_token_id=())  # ragged lists are left-padded
    assert ragged.shape == (2, 5) and ragged[1, :2].tolist() == [0, 0]


# ----------------------------------------------------------------------------------------- CLI
def test_cli_streams_from_hf_and_orbax_checkpoints(tmp_path, capsys):
    from olmo_hybrid_jax.convert import save_orbax

    cfg = OlmoHybridConfig.preset("tiny").replace(eos_token_id=None)
    m = OlmoHybridForCausalLM(cfg, rngs=nnx.Rngs(4))
    save_hf(m, tmp_path / "hf", progress=False)
    save_orbax(m, tmp_path / "orbax")
    ref = generate(m, [list(b"Hi there")], 6)
    for d in ("hf", "orbax"):
        assert generate_cli(["--checkpoint", str(tmp_path / d), "--prompt", "Hi there", "--max-new-tokens", "6",
                             "--stream-interval", "2"]) == 0
        out = capsys.readouterr()
        expect = "Hi there" + bytes(ref[0, 8:].tolist()).decode("utf-8", errors="replace")
        assert out.out.rstrip("\n") == expect, d
        assert "6 tokens" in out.err
    assert generate_cli(["--checkpoint", str(tmp_path / "nothing"), "--prompt", "x"]) == 2
