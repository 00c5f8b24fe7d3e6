"""Run the gated-delta-rule kernel per shard (``shard_map``) so XLA never has to partition it.

XLA's SPMD partitioner cannot split an opaque custom call (the Pallas/Triton GDN kernel): given
batch-sharded inputs it all-gathers them and runs the whole batch on every device. The recurrence is
independent per (batch row, head), so the trainer registers a variant of the kernel backend that runs
inside ``jax.shard_map`` with specs from the same rules table as everything else: batch over
``rules["batch"]`` (data, fsdp) and heads over ``rules["heads"]`` (tensor), each falling back to
replication when the size does not divide. The variant is a ``kernels.gated_delta_rule`` backend
(registry entry ``"<inner>@shard_map"``), so the model's GDN layers pick it up through their
``gdn_backend`` string; nothing in ``kernels/`` or the model changes.

Array roles by rank: [B, T, H, X] (q, k, v), [B, T, H] (g, beta), [B, T] (segment_ids),
[B, H, K, V] (initial_state), [H] (A_log, dt_bias); anything else is passed through unsharded.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

try:  # jax >= 0.7 exports shard_map at the top level
    from jax import shard_map as _shard_map
except ImportError:  # pragma: no cover
    from jax.experimental.shard_map import shard_map as _shard_map


def _axes(rule, size, mesh):
    """Mesh axes of ``rule`` that divide ``size`` (largest dividing prefix), as a spec entry."""
    axes = tuple(a for a in (rule if isinstance(rule, (tuple, list)) else (rule,)) if a and mesh.shape.get(a, 1) > 1)
    while axes and size % math.prod(mesh.shape[a] for a in axes):
        axes = axes[:-1]
    return None if not axes else (axes[0] if len(axes) == 1 else axes)


def default_inner_backend() -> str:
    """What "auto" resolves to on this platform, by the kernels' own priority list."""
    from olmo_hybrid_jax.kernels.gated_delta_rule import api

    platform = jax.default_backend()
    for name in api._AUTO_PRIORITY:
        be = api.BACKENDS[name]
        plats = getattr(be, "platforms", None)
        if plats is None or platform in plats:
            return name
    return "chunked"


def register_sharded_backend(mesh, rules, inner: str = "auto") -> str:
    """Register ``<inner>@shard_map`` in the kernels' backend registry for ``mesh``; return its name."""
    from olmo_hybrid_jax.kernels.gated_delta_rule import api

    if inner == "auto":
        inner = default_inner_backend()
    if inner not in api.BACKENDS:
        raise ValueError(f"unknown gated_delta_rule backend {inner!r}")
    base = api.BACKENDS[inner]
    batch_rule, head_rule = rules.get("batch"), rules.get("heads")

    def fn(q, k, v, g, beta, **kwargs):
        B, T, H, K = q.shape
        V = v.shape[-1]
        b, h = _axes(batch_rule, B, mesh), _axes(head_rule, H, mesh)
        if b is not None and h is not None:  # a mesh axis may appear once per spec
            hb = set(b if isinstance(b, tuple) else (b,))
            if h in hb or (isinstance(h, tuple) and hb & set(h)):
                h = None

        def spec(x):
            if not hasattr(x, "ndim"):
                return None
            if x.ndim == 4 and x.shape[:3] == (B, T, H):
                return P(b, None, h, None)
            if x.ndim == 3 and x.shape == (B, T, H):
                return P(b, None, h)
            if x.ndim == 2 and x.shape == (B, T):
                return P(b, None)
            if x.ndim == 4 and x.shape[:2] == (B, H):
                return P(b, h, None, None)
            if x.ndim == 1 and x.shape == (H,):
                return P(h)
            return P()

        arrays = {"q": q, "k": k, "v": v, "g": g, "beta": beta}
        static = {}
        for key, val in kwargs.items():
            (arrays if isinstance(val, jax.Array) or hasattr(val, "shape") and hasattr(val, "dtype")
             else static)[key] = val
        names = list(arrays)

        def body(*xs):
            a = dict(zip(names, xs))
            o, state = base.fn(a.pop("q"), a.pop("k"), a.pop("v"), a.pop("g"), a.pop("beta"), **a, **static)
            if state is None:
                state = jnp.zeros((o.shape[0], o.shape[2], K, V), jnp.float32)
            return o, state

        in_specs = tuple(spec(arrays[n]) for n in names)
        out_specs = (P(b, None, h, None), P(b, h, None, None))
        return _shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)(
            *[arrays[n] for n in names])

    name = f"{inner}@shard_map"
    api.BACKENDS[name] = dataclasses.replace(base, fn=fn)
    return name
