"""Context parallelism: one sequence split over 4 emulated CPU devices equals the single-device result.

The device count must be set before jax initialises, so the check runs in a fresh Python process
with XLA_FLAGS=--xla_force_host_platform_device_count=4.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent(
    r"""
    import jax, jax.numpy as jnp, numpy as np
    assert len(jax.devices()) == 4, jax.devices()
    from olmo_hybrid_jax.kernels import context_parallel_gated_delta_rule, gated_delta_rule
    from olmo_hybrid_jax.kernels.gated_delta_rule.gates import InputTransforms

    from jax.sharding import AxisType
    rel = lambda x, r: float(np.abs(np.asarray(x) - np.asarray(r)).max() / np.abs(np.asarray(r)).max())
    cases = [(256, AxisType.Auto), (200, AxisType.Auto), (256, AxisType.Explicit)]  # 200: pads mid-sequence
    refs = {}
    for T, axis_type in cases:
        mesh = jax.make_mesh((4,), ("sp",), axis_types=(axis_type,))
        B, H, K, V = 2, 2, 12, 20
        rng = np.random.default_rng(T)
        q = jnp.asarray(rng.standard_normal((B, T, H, K)), jnp.float32)
        k = jnp.asarray(rng.standard_normal((B, T, H, K)), jnp.float32)
        v = jnp.asarray(rng.standard_normal((B, T, H, V)), jnp.float32)
        a = jnp.asarray(rng.standard_normal((B, T, H)) - 3, jnp.float32)
        b = jnp.asarray(rng.standard_normal((B, T, H)), jnp.float32)
        A_log = jnp.asarray(np.log(rng.uniform(0.1, 1.0, H)), jnp.float32)
        s0 = jnp.asarray(rng.standard_normal((B, H, K, V)), jnp.float32)
        seg = np.zeros((B, T), np.int32)
        seg[0, T // 2:] = 1          # a restart exactly at a device boundary
        seg[1, 30:] = 1; seg[1, 31:] = 2  # a one-token segment inside device 0
        seg = jnp.asarray(seg)
        opts = dict(use_qk_l2norm_in_kernel=True, A_log=A_log, beta_sigmoid=True, beta_scale=2.0)
        ct_o = jnp.asarray(rng.standard_normal((B, T, H, V)), jnp.float32)
        ct_s = jnp.asarray(rng.standard_normal((B, H, K, V)), jnp.float32)

        def single(q, k, v, a, b, s0):
            return gated_delta_rule(q, k, v, a, b, initial_state=s0, segment_ids=seg, output_final_state=True,
                                    backend="sequential", **opts)

        def split(q, k, v, a, b, s0):
            tr = InputTransforms(qk_l2norm=True, gate=True, beta_sigmoid=True, beta_scale=2.0)
            return context_parallel_gated_delta_rule(
                q, k, v, a, b, mesh=mesh, axis_name="sp", initial_state=s0, segment_ids=seg,
                output_final_state=True, transforms=tr, A_log=A_log)

        args = (q, k, v, a, b, s0)

        def values_and_grads(fn):
            def run(*x):
                out, pull = jax.vjp(fn, *x)
                return out, pull((ct_o, ct_s))
            return jax.jit(run)(*args)  # the whole backward under jit (collectives in one program)

        if T not in refs:  # the Explicit-mesh case reuses the same-T oracle (same inputs, no mesh)
            refs[T] = values_and_grads(single)
        (o_r, s_r), g_r = refs[T]
        if axis_type == AxisType.Explicit:
            with jax.set_mesh(mesh):
                (o, s), g = values_and_grads(split)
        else:
            (o, s), g = values_and_grads(split)
        assert o.shape == o_r.shape and s.shape == s_r.shape
        assert len(o.sharding.device_set) == 4  # really split
        errs = [rel(o, o_r), rel(s, s_r)]
        errs += [rel(x, y) for x, y in zip(g, g_r)]
        print(T, axis_type, ["%.1e" % e for e in errs])
        assert max(errs) < 5e-5, (T, errs)
    print("CP_OK")
    """
)


def run_on_4_devices(script, marker):
    """Run ``script`` in a fresh Python with 4 emulated CPU devices; assert it printed ``marker``."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and marker in r.stdout, r.stdout + r.stderr[-4000:]


@pytest.mark.slow
def test_context_parallel_matches_single_device():
    run_on_4_devices(SCRIPT, "CP_OK")


SHARDED_SCRIPT = textwrap.dedent(
    r"""
    import functools
    import jax, jax.numpy as jnp, numpy as np
    assert len(jax.devices()) == 4, jax.devices()
    try:
        from jax import shard_map
    except ImportError:
        from jax.experimental.shard_map import shard_map
    from jax.sharding import NamedSharding, PartitionSpec as P
    from olmo_hybrid_jax.kernels import gated_delta_rule

    mesh = jax.make_mesh((4,), ("data",))
    B, T, H, K, V = 4, 100, 2, 12, 20
    rng = np.random.default_rng(0)
    x = [jnp.asarray(rng.standard_normal(s), jnp.float32) for s in
         ((B, T, H, K), (B, T, H, K), (B, T, H, V), (B, T, H), (B, T, H))]
    x[0] = x[0] / jnp.linalg.norm(x[0], axis=-1, keepdims=True)
    x[1] = x[1] / jnp.linalg.norm(x[1], axis=-1, keepdims=True)
    x[3] = -jax.nn.softplus(x[3])
    x[4] = jax.nn.sigmoid(x[4])
    rel = lambda a, r: float(np.abs(np.asarray(a) - np.asarray(r)).max() / np.abs(np.asarray(r)).max())

    def loss(core, *a):
        return jnp.sum(core(*a) ** 2)

    def plain(backend):
        return lambda *a: gated_delta_rule(*a, backend=backend)[0]

    ref = jax.jit(jax.value_and_grad(functools.partial(loss, plain("sequential")), argnums=(0, 1, 2, 3, 4)))(*x)
    sharded = [jax.device_put(a, NamedSharding(mesh, P("data"))) for a in x]
    for backend in ("chunked", "associative_scan", "sequential"):
        cores = {"jit": plain(backend),
                 # a user's own shard_map, with its default type checks (check_vma)
                 "shard_map": shard_map(plain(backend), mesh=mesh, in_specs=(P("data"),) * 5, out_specs=P("data"))}
        for how, core in cores.items():
            f = jax.jit(jax.value_and_grad(functools.partial(loss, core), argnums=(0, 1, 2, 3, 4)))
            for _ in range(3):  # the old LAPACK solve deadlocked from the second call on
                val, grads = jax.block_until_ready(f(*sharded))
            errs = [rel(val, ref[0])] + [rel(a, r) for a, r in zip(grads, ref[1])]
            print(backend, how, ["%.1e" % e for e in errs], flush=True)
            assert max(errs) < 5e-5, (backend, how, errs)
    print("SHARDED_OK")
    """
)


@pytest.mark.slow
def test_xla_backends_on_a_batch_sharded_over_devices():
    """The plain-XLA backends under jit with a batch sharded over 4 devices and inside a user's
    shard_map (default checks) give the single-device values and gradients, call after call."""
    run_on_4_devices(SHARDED_SCRIPT, "SHARDED_OK")


SHARD_AXES_SCRIPT = textwrap.dedent(
    r"""
    import functools
    import jax, jax.numpy as jnp, numpy as np
    assert len(jax.devices()) == 4, jax.devices()
    from jax.sharding import NamedSharding, PartitionSpec as P
    from olmo_hybrid_jax.kernels import ShardAxes, gated_delta_rule

    mesh = jax.make_mesh((2, 2), ("data", "fsdp"))
    B, T, H, K, V = 4, 70, 2, 12, 20
    rng = np.random.default_rng(1)
    f32 = jnp.float32
    q, k = (jnp.asarray(rng.standard_normal((B, T, H, K)), f32) for _ in range(2))
    v = jnp.asarray(rng.standard_normal((B, T, H, V)), f32)
    a, b = (jnp.asarray(rng.standard_normal((B, T, H)), f32) for _ in range(2))
    s0 = jnp.asarray(rng.standard_normal((B, H, K, V)) * 0.3, f32)
    A_log = jnp.asarray(np.log(rng.uniform(0.5, 8, H)), f32)
    dt_bias = jnp.asarray(rng.uniform(-3, 1, H), f32)
    seg = np.zeros((B, T), np.int32); seg[:, 37:] = 1; seg[1, 5:] += 1
    seg = jnp.asarray(seg)
    ct_o = jnp.asarray(rng.standard_normal((B, T, H, V)), f32)
    ct_s = jnp.asarray(rng.standard_normal((B, H, K, V)), f32)
    rel = lambda x, r: float(np.abs(np.asarray(x) - np.asarray(r)).max() / np.abs(np.asarray(r)).max())

    def loss(q, k, v, a, b, s0, A_log, dt_bias, *, backend, axes, mesh=None):
        o, s = gated_delta_rule(q, k, v, a, b, initial_state=s0, segment_ids=seg, output_final_state=True,
                                backend=backend, use_qk_l2norm_in_kernel=True, A_log=A_log, dt_bias=dt_bias,
                                beta_sigmoid=True, beta_scale=2.0, shard_axes=axes, mesh=mesh)
        return jnp.sum(o * ct_o) + jnp.sum(s * ct_s)

    args = (q, k, v, a, b, s0, A_log, dt_bias)
    grad = lambda **kw: jax.jit(jax.value_and_grad(functools.partial(loss, **kw), argnums=tuple(range(8))))
    ref = grad(backend="sequential", axes=None)(*args)
    flat = lambda r: [r[0]] + list(r[1])
    batch = NamedSharding(mesh, P(("data", "fsdp")))
    placed = [jax.device_put(x, batch) for x in args[:6]] + list(args[6:])
    assert ShardAxes(batch=("data", "fsdp"), heads=()) == ShardAxes(batch=("data", "fsdp"))  # () = no split
    for backend in ("pallas", "chunked"):
        for axes in (ShardAxes(batch=("data", "fsdp")), ShardAxes(batch="data", heads="fsdp")):
            f = grad(backend=backend, axes=axes, mesh=mesh).lower(*placed).compile()  # one compile: values, HLO
            errs = [rel(x, r) for x, r in zip(flat(f(*placed)), flat(ref))]
            print(backend, axes, ["%.1e" % e for e in errs], flush=True)
            assert max(errs) < 5e-5, (backend, axes, errs)
            if not axes.heads:
                # batch over every device, inputs placed that way: the op adds no all-gather (no input is
                # gathered to run the kernel whole on every device, what XLA does with an opaque custom call)
                hlo = f.as_text()
                assert "all-gather" not in hlo and "all-to-all" not in hlo, backend
    # the context mesh stands in for mesh= (resolved before any backend runs: one backend checks it)
    with jax.set_mesh(mesh):
        ctx = grad(backend="chunked", axes=ShardAxes(batch=("data", "fsdp")))(*placed)
    assert max(rel(x, r) for x, r in zip(flat(ctx), flat(ref))) < 5e-5
    # a mesh of Auto axes (inputs unplaced: shard_map places them)
    from jax.sharding import AxisType
    auto = jax.make_mesh((2, 2), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2)
    out = grad(backend="chunked", axes=ShardAxes(batch="data", heads="fsdp"), mesh=auto)(*args)
    assert max(rel(x, r) for x, r in zip(flat(out), flat(ref))) < 5e-5
    # B = 3 does not divide over 4 devices: the batch falls back to its dividing prefix ("data" is 2: no)
    q3 = [x[:3] for x in args[:6]]
    o = jax.jit(lambda *x: gated_delta_rule(*x[:5], initial_state=x[5], backend="chunked",
                                            shard_axes=ShardAxes(batch=("data", "fsdp")), mesh=mesh)[0])(*q3)
    o_ref = jax.jit(lambda *x: gated_delta_rule(*x[:5], initial_state=x[5], backend="chunked")[0])(*q3)
    assert rel(o, o_ref) < 1e-5
    # T == H == K: the state [B, H, K, V] has q's shape; specs go by role, so heads split the state's H
    x4 = [jnp.asarray(rng.standard_normal((2, 4, 4, 4)), f32) for _ in range(4)]
    gb = [jnp.asarray(rng.uniform(-1, 0, (2, 4, 4)), f32) for _ in range(2)]
    kw = dict(initial_state=x4[3], output_final_state=True, backend="chunked")
    # (under jit: op-by-op, the chunked op takes seconds at any size)
    got = jax.jit(lambda *x: gated_delta_rule(*x, **kw, shard_axes=ShardAxes(batch="data", heads="fsdp"),
                                              mesh=mesh))(*x4[:3], *gb)
    want = jax.jit(lambda *x: gated_delta_rule(*x, **kw))(*x4[:3], *gb)
    assert max(rel(x, r) for x, r in zip(got, want)) < 1e-5
    print("SHARD_AXES_OK")
    """
)


@pytest.mark.slow
def test_shard_axes_runs_the_op_per_shard():
    """gated_delta_rule(..., shard_axes=...) on a data x fsdp mesh of 4 devices (batch over both, or
    batch x heads), pallas (interpret) and chunked, with the in-kernel transforms, segments and an
    initial state: values and every gradient equal the unsharded oracle; the batch-sharded call adds
    no all-gather / all-to-all; the context mesh works in place of mesh=; a batch that does not
    divide falls back to replication."""
    run_on_4_devices(SHARD_AXES_SCRIPT, "SHARD_AXES_OK")
