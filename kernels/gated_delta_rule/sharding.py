"""The gated delta rule per shard: ``jax.shard_map`` over the caller's mesh.

XLA's SPMD partitioner cannot split an opaque custom call (the Pallas/Triton kernels): given
batch-sharded inputs it all-gathers them and runs the whole batch on every device. The recurrence is
independent per (batch row, head), so ``gated_delta_rule(..., shard_axes=ShardAxes(...))`` runs the
resolved backend inside ``shard_map`` with the batch dim over ``ShardAxes.batch`` and the head dim
over ``ShardAxes.heads`` (mesh axis names, e.g. from a model's logical-axis rules table), each cut
back to its largest prefix whose size divides the dim (replication when none does).

Array roles by shape: [B, T, H, X] (q, k, v, o), [B, T, H] (g, beta), [B, T] (segment_ids),
[B, H, K, V] (initial_state, final state), [H] (A_log, dt_bias).
"""

from __future__ import annotations

import dataclasses
import math

import jax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P


def _names(x) -> tuple[str, ...]:
    if x is None:
        return ()
    if isinstance(x, str):
        return (x,)
    return tuple(x)


@dataclasses.dataclass(frozen=True)
class ShardAxes:
    """Mesh axes the batch dim and the head dim of the gated delta rule are split over.

    batch: e.g. ("data", "fsdp"); heads: e.g. ("tensor",). A str is one axis; None or () none.
    """

    batch: tuple[str, ...] = ()
    heads: tuple[str, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "batch", _names(self.batch))
        object.__setattr__(self, "heads", _names(self.heads))
        for name in self.batch + self.heads:
            if not isinstance(name, str) or not name:
                raise ValueError(f"ShardAxes takes mesh axis names (str), got {name!r}")
        if set(self.batch) & set(self.heads):
            raise ValueError(f"ShardAxes: a mesh axis may split one dim only; batch {self.batch}, heads {self.heads}")


def _dividing(axes: tuple[str, ...], size: int, mesh) -> tuple[str, ...]:
    """The largest prefix of ``axes`` (those of size > 1 in ``mesh``) whose product divides ``size``."""
    shape = dict(mesh.shape)
    axes = tuple(a for a in axes if shape.get(a, 1) > 1)
    while axes and size % math.prod(shape[a] for a in axes):
        axes = axes[:-1]
    return axes


def resolve_mesh(mesh, shard_axes: ShardAxes):
    """The mesh to shard over (the argument, else the context mesh); a message when unusable."""
    if mesh is None:
        mesh = jax.sharding.get_abstract_mesh()
        if mesh is None or mesh.empty:
            return None, "shard_axes needs a mesh: pass mesh= or call inside `with jax.set_mesh(mesh):`"
    missing = [a for a in shard_axes.batch + shard_axes.heads if a not in mesh.shape]
    if missing:
        return None, f"shard_axes names mesh axes {missing} that the mesh {dict(mesh.shape)} does not have"
    return mesh, None


def run_sharded(fn, arrays: dict, *, mesh, shard_axes: ShardAxes, B: int, H: int):
    """``fn(**arrays) -> (o [B, T, H, V], state [B, H, K, V])`` run per shard of ``mesh``.

    ``arrays``: q, k, v, g, beta, initial_state, segment_ids, A_log, dt_bias (None where not given).
    """
    b = _dividing(shard_axes.batch, B, mesh) or None
    h = _dividing(shard_axes.heads, H, mesh) or None

    # by role, not by shape: a state [B, H, K, V] has the shape of q [B, T, H, K] when T == H == K
    roles = {"q": (b, None, h, None), "k": (b, None, h, None), "v": (b, None, h, None), "g": (b, None, h),
             "beta": (b, None, h), "segment_ids": (b, None), "initial_state": (b, h, None, None), "A_log": (h,),
             "dt_bias": (h,)}
    spec = {name: P(*dims) for name, dims in roles.items()}

    names = [n for n, x in arrays.items() if x is not None]

    def body(*xs):
        return fn(**dict(zip(names, xs)), **{n: None for n, x in arrays.items() if x is None})

    in_specs = tuple(spec[n] for n in names)
    out_specs = (P(b, None, h, None), P(b, h, None, None))
    xs = [arrays[n] for n in names]
    if any(t == AxisType.Explicit for t in getattr(mesh, "axis_types", ())):
        # explicit axes type every array's sharding: bring each to its spec (auto axes: shard_map does)
        xs = [jax.sharding.reshard(x, NamedSharding(mesh, sp)) for x, sp in zip(xs, in_specs)]
    # check_vma=False: the kernels' custom calls carry no varying-mesh-axis types.
    return jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)(*xs)
