"""The gated delta rule per shard: ``jax.shard_map`` over the caller's mesh.

XLA's SPMD partitioner cannot split an opaque custom call (the Pallas/Triton kernels): given
batch-sharded inputs it all-gathers them and runs the whole batch on every device. The recurrence is
independent per (batch row, head), so ``gated_delta_rule(..., shard_axes=ShardAxes(...))`` runs the
resolved backend inside ``shard_map`` with the batch dim over ``ShardAxes.batch`` and the head dim
over ``ShardAxes.heads`` (mesh axis names, e.g. from a model's logical-axis rules table), each cut
back to its largest prefix whose size divides the dim (replication when none does).

``ShardAxes.seq`` splits the sequence too (context parallelism): where those axes have more than one
device in all, the op runs the context-parallel form (``associative_scan.context_parallel_shard``: each
device's chunk maps composed locally, the per-device totals all-gathered over ``seq``) in the same
shard_map as the batch and head split. A seq split that does not divide T is an error, not a fallback
(replicating the sequence would hide an activation-sized all-gather).

Array roles by shape: [B, T, H, X] (q, k, v, o), [B, T, H] (g, beta), [B, T] (segment_ids, starts),
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
    """Mesh axes the batch, head and sequence dims of the gated delta rule are split over.

    batch: e.g. ("data", "fsdp"); heads: e.g. ("tensor",); seq: e.g. ("context",) (context parallelism).
    A str is one axis; None or () none.
    """

    batch: tuple[str, ...] = ()
    heads: tuple[str, ...] = ()
    seq: tuple[str, ...] = ()

    def __post_init__(self):
        for dim in ("batch", "heads", "seq"):
            object.__setattr__(self, dim, _names(getattr(self, dim)))
        names = self.batch + self.heads + self.seq
        for name in names:
            if not isinstance(name, str) or not name:
                raise ValueError(f"ShardAxes takes mesh axis names (str), got {name!r}")
        if len(set(names)) != len(names):
            raise ValueError(f"ShardAxes: a mesh axis may split one dim only; batch {self.batch}, heads "
                             f"{self.heads}, seq {self.seq}")

    @property
    def names(self) -> tuple[str, ...]:
        return self.batch + self.heads + self.seq


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
    missing = [a for a in shard_axes.names if a not in mesh.shape]
    if missing:
        return None, f"shard_axes names mesh axes {missing} that the mesh {dict(mesh.shape)} does not have"
    return mesh, None


def seq_split(mesh, shard_axes: ShardAxes, T: int) -> tuple[tuple[str, ...], int]:
    """(the mesh axes of ``shard_axes.seq`` with more than one device, their device count); T must divide."""
    shape = dict(mesh.shape)
    axes = tuple(a for a in shard_axes.seq if shape.get(a, 1) > 1)
    n = math.prod(shape[a] for a in axes)
    if T % n:
        raise ValueError(f"gated_delta_rule: T = {T} must divide by the {n} devices of the seq axes {axes}")
    return axes, n


def run_sharded(fn, arrays: dict, *, mesh, shard_axes: ShardAxes, B: int, H: int, seq: tuple[str, ...] = ()):
    """``fn(**arrays) -> (o [B, T, H, V], state [B, H, K, V])`` run per shard of ``mesh``.

    ``arrays``: q, k, v, g, beta, initial_state, segment_ids or starts, A_log, dt_bias (None where not
    given). ``seq``: the mesh axes T is split over (``seq_split``; the state comes out replicated over them).
    """
    b = _dividing(shard_axes.batch, B, mesh) or None
    h = _dividing(shard_axes.heads, H, mesh) or None
    s = (seq[0] if len(seq) == 1 else seq) or None

    # by role, not by shape: a state [B, H, K, V] has the shape of q [B, T, H, K] when T == H == K
    roles = {"q": (b, s, h, None), "k": (b, s, h, None), "v": (b, s, h, None), "g": (b, s, h),
             "beta": (b, s, h), "segment_ids": (b, s), "starts": (b, s), "initial_state": (b, h, None, None),
             "A_log": (h,), "dt_bias": (h,)}
    spec = {name: P(*dims) for name, dims in roles.items()}

    names = [n for n, x in arrays.items() if x is not None]

    def body(*xs):
        return fn(**dict(zip(names, xs)), **{n: None for n, x in arrays.items() if x is None})

    in_specs = tuple(spec[n] for n in names)
    out_specs = (P(b, s, h, None), P(b, h, None, None))
    xs = [arrays[n] for n in names]
    if any(t == AxisType.Explicit for t in getattr(mesh, "axis_types", ())):
        # explicit axes type every array's sharding: bring each to its spec (auto axes: shard_map does)
        xs = [jax.sharding.reshard(x, NamedSharding(mesh, sp)) for x, sp in zip(xs, in_specs)]
    # check_vma=False: the kernels' custom calls carry no varying-mesh-axis types.
    return jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)(*xs)
