"""Context parallelism in training (``mesh.context``): each row's sequence split over the context axis.

One subprocess on 4 emulated CPU devices (XLA_FLAGS must be set before JAX starts) runs, on the tiny
model in fp32 with packed documents (a restart sits on the shard boundary):
  - the GDN op with ``ShardAxes(batch, heads, seq)`` against the unsharded op (values and every input
    gradient), restarts at the boundary included;
  - two training steps with context=2 (2 devices, one kv head: all-gather CP attention), context=2 x
    fsdp=2 (document-aware, the scanned layout, Ulysses attention) and context=4 (document-aware, the Pallas
    kernels), each against the same steps on one device with the sequential backend: loss and grad norm of
    both steps and the first step's gradient (Adam's first moment) within 1e-5;
  - the compiled context=2 x fsdp=2 step: no "Involuntary full rematerialization", all-to-alls only at
    attention's Ulysses constraints, collective-permutes only halo-sized (short conv, next-token labels),
    and no gather/reduce larger than one parameter (an activation would be, at these shapes).
In process: the config errors and the long-context recipe.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from olmo_hybrid_jax.train.config import CONFIG_DIR, ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
T, GB = 128, 8  # an fsdp shard's activation [GB / 2, T, 64] is larger than the largest parameter [256, 64]
BASE = ["model.compute_dtype=float32", f"data.seq_len={T}", f"data.global_batch_size={GB}", "optim.lr=1e-3",
        "optim.warmup_steps=0", "train.progress=false", "train.loss_chunk=32"]  # 4 strided loss chunks a row
CASES = {  # name -> (devices, overrides)
    # one kv head does not split in 2: attention gathers k/v whole (all-gather CP); no documents (causal mask)
    "cp2_one_kv_head": (2, ["mesh.context=2", "model.overrides.num_key_value_heads=1"]),
    # the long-context recipe's form: Ulysses attention, packed documents, FSDP, the scanned layout
    "cp2_fsdp2_docs_scanned": (4, ["mesh.context=2", "data.document_aware=true",
                                   "model.overrides.num_hidden_layers=8"]),
    # four sequence shards of 32 tokens: documents and conv halos cross three boundaries a row; the Pallas
    # kernels (interpret mode) run each shard from the state the maps hand it (the cp2 cases run the
    # sequential backend; one case for both: each step compile costs ~10 s on CPU)
    "cp4_pallas_docs": (4, ["mesh.context=4", "data.document_aware=true", "model.gdn_backend=pallas"]),
}
HLO_CASE = "cp2_fsdp2_docs_scanned"

_SCRIPT = textwrap.dedent("""
    import json, math, sys
    import jax, jax.numpy as jnp, numpy as np
    from olmo_hybrid_jax.kernels import ShardAxes, gated_delta_rule
    from olmo_hybrid_jax.train.config import load_config
    from olmo_hybrid_jax.train.data import pack_row
    from olmo_hybrid_jax.train.sharding import make_mesh
    from olmo_hybrid_jax.train.trainer import Trainer
    args = json.loads(sys.argv[1])
    out = {}

    # --- the op: batch over fsdp, heads over tensor, sequence over context, against no sharding; every
    # backend (associative_scan in one pass; the others in two, the Pallas kernels in interpret mode)
    B, L, H, K, V = 2, 32, 4, 8, 12
    ks = jax.random.split(jax.random.key(0), 8)
    q, k = (jax.random.normal(x, (B, L, H, K)) for x in ks[:2])
    v = jax.random.normal(ks[2], (B, L, H, V))
    a, b = (jax.random.normal(x, (B, L, H)) for x in ks[3:5])
    s0 = 0.3 * jax.random.normal(ks[7], (B, H, K, V))
    seg = jnp.asarray([[0] * 16 + [1] * 16, [0] * 11 + [1] * 21])  # row 0 restarts on the boundary
    kw = dict(segment_ids=seg, use_qk_l2norm_in_kernel=True, A_log=0.1 * jax.random.normal(ks[5], (H,)),
              dt_bias=0.1 * jax.random.normal(ks[6], (H,)), beta_sigmoid=True, beta_scale=2.0,
              output_final_state=True)
    def loss(q, k, v, a, b, s0, backend="sequential", **extra):
        o, s = gated_delta_rule(q, k, v, a, b, initial_state=s0, backend=backend, **kw, **extra)
        return jnp.sum(o * jnp.sin(o)) + jnp.sum(s * jnp.cos(s))
    mesh = make_mesh(1, 1, 2, context=2)
    sa = ShardAxes(batch="fsdp", heads="tensor", seq="context")
    ref = jax.jit(jax.value_and_grad(loss, argnums=range(6)))(q, k, v, a, b, s0)
    out["op"] = {}
    for backend in ("sequential", "associative_scan", "chunked", "pallas"):
        fn = lambda *x: loss(*x, backend=backend, shard_axes=sa, mesh=mesh)
        got = jax.jit(jax.value_and_grad(fn, argnums=range(6)))(q, k, v, a, b, s0)
        out["op"][backend] = [abs(float(got[0] - ref[0])) / abs(float(ref[0]))] + [
            float(jnp.max(jnp.abs(x - y)) / jnp.max(jnp.abs(y))) for x, y in zip(got[1], ref[1])]

    # --- training steps
    rng = np.random.default_rng(0)
    toks = rng.integers(2, 256, (args["GB"], args["T"]))
    toks[rng.random(toks.shape) < 0.05] = 1
    toks[::2, args["T"] // 2 - 1] = 1  # EOS last on the first shard: a document starts on the boundary
    rows = [pack_row(r, eos_id=1) for r in toks]
    batch = {key: np.stack([r[key] for r in rows]) for key in rows[0]}
    assert (batch["segment_ids"][0, args["T"] // 2] != batch["segment_ids"][0, args["T"] // 2 - 1])

    def steps(overrides, n_dev, init=None, hlo=False):
        tr = Trainer(load_config("configs/tiny.yaml", overrides + ["mesh.fsdp=-1"]), devices=jax.devices()[:n_dev])
        state = tr.init_state() if init is None else jax.device_put(init, tr.state_sharding)
        res = {"mesh": dict(tr.mesh.shape)}
        step = tr.step_fn
        if hlo:  # the step run below is the one whose HLO is checked (one compile)
            abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                    tr.abstract_state, tr.state_sharding)
            bs = {key: jax.ShapeDtypeStruct(batch[key].shape, jnp.int32, sharding=tr.batch_sharding) for key in batch}
            step = tr.step_fn.lower(abstract, bs).compile()
            res["hlo"] = step.as_text()
            res["largest_param"] = max(math.prod(x.shape) for x in jax.tree.leaves(tr.abstract_params))
        first = jax.tree.map(np.asarray, state)
        metrics, mu = [], None
        for i in range(2):
            state, m = step(state, tr.device_batch(batch))
            metrics.append({key: float(m[key]) for key in ("loss", "grad_norm", "skipped")})
            if i == 0:
                adam = next(s for s in state["opt_state"].inner if hasattr(s, "mu"))
                mu = jax.tree.map(np.asarray, adam.mu)
        res["metrics"] = metrics
        return res, first, mu

    for name, (n_dev, overrides) in args["cases"].items():
        # the oracle: one device, the sequential backend (tiny.yaml's; pallas in interpret mode compiles 2x longer)
        ref_over = [o for o in args["base"] + overrides if not o.startswith(("mesh.", "model.gdn_backend="))]
        ref, init, ref_mu = steps(ref_over, 1)
        got, _, mu = steps(args["base"] + overrides, n_dev, init=init, hlo=name == args["hlo_case"])
        err = max(float(np.max(np.abs(x - y)) / np.max(np.abs(y)))
                  for x, y in zip(jax.tree.leaves(mu), jax.tree.leaves(ref_mu)))
        out[name] = {"ref": ref["metrics"], "got": got["metrics"], "mu_err": err, "mesh": got["mesh"],
                     **{key: got[key] for key in ("hlo", "largest_param") if key in got}}
    print("RESULTS" + json.dumps(out))
""")


@pytest.fixture(scope="module")
def results():
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("JAX_PLATFORMS", None)
    args = {"base": BASE, "cases": CASES, "hlo_case": HLO_CASE, "T": T, "GB": GB}
    p = subprocess.run([sys.executable, "-c", _SCRIPT, json.dumps(args)], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-4000:]
    return json.loads(p.stdout.split("RESULTS", 1)[1]), p.stderr


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sequential", "associative_scan", "chunked", "pallas"])
def test_gdn_op_splits_the_sequence_with_batch_and_heads(results, backend):
    errs = results[0]["op"][backend]
    assert max(errs) < 1e-5, errs  # loss (output and final state), then the gradients of q, k, v, g, beta, state


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_context_parallel_steps_equal_the_single_device_steps(results, name):
    res = results[0][name]
    ctx = {"data": 1, "fsdp": 1, "context": 4 if name.startswith("cp4") else 2, "tensor": 1}
    assert res["mesh"] == {**ctx, **({"fsdp": 2} if "fsdp2" in name else {})}
    for got, ref in zip(res["got"], res["ref"]):
        assert got["skipped"] == ref["skipped"] == 0
        assert got["loss"] == pytest.approx(ref["loss"], rel=1e-5)
        assert got["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-5)
    assert res["mu_err"] < 1e-5  # the first step's gradient, leaf by leaf (relative to the leaf's largest)


@pytest.mark.slow
def test_context_parallel_step_moves_only_what_the_design_needs(results):
    from hlo_helpers import collective_ops

    out, stderr = results
    assert "Involuntary full rematerialization" not in stderr, stderr[-3000:]
    res = out[HLO_CASE]
    ops = collective_ops(res["hlo"])
    assert any(op == "all-to-all" for op, _, _ in ops)  # Ulysses: q, k, v, o (and their gradients)
    assert any(op == "all-gather" and "gdn_core" in name for op, _, name in ops)  # GDN: the per-shard maps
    assert any(op == "collective-permute" and "short_conv" in name for op, _, name in ops)  # conv halos
    halo = GB * 3 * 96  # rows x (conv kernel - 1) x the widest conv (value dim 4 x 24)
    bad = [(op, n, name[-80:]) for op, n, name in ops
           if (op == "all-to-all" and not ("attention" in name and "sharding_constraint" in name))
           or (op == "collective-permute" and n > halo)
           or (op in ("all-gather", "all-reduce", "reduce-scatter") and n > res["largest_param"])]
    assert not bad, sorted(set(bad))


def test_seq_len_must_divide_by_context():
    with pytest.raises(ConfigError, match=r"data.seq_len=100 is not divisible by mesh.context=3"):
        load_config(CONFIG_DIR / "tiny.yaml", ["data.seq_len=100", "mesh.context=3"])
    with pytest.raises(ConfigError, match="mesh.context must be >= 1"):
        load_config(CONFIG_DIR / "tiny.yaml", ["mesh.context=0"])
    with pytest.raises(ConfigError, match="optim.schedule='step'"):
        load_config(CONFIG_DIR / "tiny.yaml", ["optim.schedule=step"])


def test_long_context_recipe_loads():
    from olmo_hybrid_jax.train.optim import lr_schedule
    from olmo_hybrid_jax.train.trainer import model_config

    cfg = load_config(CONFIG_DIR / "7b_long_context.yaml")
    assert (cfg.data.seq_len, cfg.data.global_batch_size, cfg.mesh.context) == (65536, 64, 2)
    assert cfg.data.seq_len * cfg.data.global_batch_size == 4 * 1024 * 1024
    o = cfg.optim
    assert (o.lr, o.warmup_steps, o.schedule, o.alpha_f, o.decay_steps) == (2.0712e-4, 200, "linear", 0.0, 23842)
    s = lr_schedule(o.lr, o.warmup_steps, o.decay_steps, o.alpha_f, o.schedule)
    assert float(s(200)) == pytest.approx(2.0712e-4) and float(s(23842)) == 0.0
    mcfg = model_config(cfg)
    assert mcfg.rope_parameters is None and mcfg.rope_theta is None  # NoPE
    assert mcfg.num_attention_heads % cfg.mesh.context == 0  # Ulysses splits the heads
    assert cfg.model.preset == "olmo_hybrid_7b" and cfg.model.init_from is None
