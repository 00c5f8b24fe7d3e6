"""Gated delta rule with the state passing between chunks as an associative scan.

Algorithm
---------
The chunked form (``xla_chunked.py``) makes each chunk n an affine map of the
state entering it (S in R^{K x V}, everything fp32):

    S_out = M_n S_in + c_n,    M_n = d_n I - k_end_n^T W_n   [K, K],   c_n = k_end_n^T U_n   [K, V]

Affine maps compose associatively, (M2, c2) o (M1, c1) = (M2 M1, M2 c1 + c2), so
``jax.lax.associative_scan`` gives every prefix map in O(log N) parallel steps
(N = ceil(T / C) chunks). S_in of chunk n is prefix_{n-1} applied to the
initial state; outputs then come from the same per-chunk pieces as the chunked
backend (one batched matmul). Work is O(N K^2 (K + V)) for the scan against
O(N K V C) for the sequential chunk walk: it trades FLOPs for depth, which pays
when the sequence is split across devices.

Context parallelism (``context_parallel_gated_delta_rule``): the sequence axis
is split across a mesh axis. Each device builds its chunks' maps and composes
them locally (one associative scan); the per-device total maps are
``all_gather``-ed (P x (K^2 + K V) floats per head), each device composes the
maps of the devices before it with the initial state to get its entry state,
and the final state is every device's composition of all P maps (so it comes
out replicated). Only the maps cross devices, never activations.

The two-pass form (``context_parallel_states``, what ``gated_delta_rule`` runs for every backend but
this one) reduces each device's chunk maps to its slice's total map (a pairwise tree, no prefixes),
gets the entry state the same way, and hands the slice and that state to a single-device backend:
the Pallas kernels keep their speed and only the maps are extra work.

Segment restarts are inside the maps (a restart zeroes d_n and the rows of W
past it), so they need no special case; the restart flags are computed on the
whole sequence before it is split so that a restart at a device boundary is
seen. Pads that make a device's slice a whole number of chunks are inert
(q = k = v = beta = g = 0), so they may sit mid-sequence.

HBM passes: as the chunked backend for the pieces and outputs, plus log2(N)
passes over the [N, B, H, K, K + V] maps. Rounding: fp32 throughout, HIGHEST
matmul precision; the caller rounds O once.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .common import segment_starts
from .config import DEFAULT_CHUNK_CONFIG, ChunkConfig
from .gates import NO_TRANSFORMS, InputTransforms, apply_input_transforms
from .xla_chunked import chunk_outputs, chunk_pieces

try:  # jax >= 0.7 exports shard_map at the top level
    from jax import shard_map as _shard_map

    _CHECK_KW = "check_vma"
except ImportError:  # pragma: no cover - older jax
    from jax.experimental.shard_map import shard_map as _shard_map

    _CHECK_KW = "check_rep"

_HI = jax.lax.Precision.HIGHEST


def _mm(spec, *ops):
    return jnp.einsum(spec, *ops, precision=_HI)


def chunk_maps(pieces):
    """Per-chunk affine maps (M [N,B,H,K,K], c [N,B,H,K,V]) with S_out = M S_in + c."""
    K = pieces["W"].shape[-1]
    eye = jnp.eye(K, dtype=jnp.float32)
    M = pieces["state_decay"][..., None, None] * eye - _mm("nbhck,nbhcj->nbhkj", pieces["k_end"], pieces["W"])
    c = _mm("nbhck,nbhcv->nbhkv", pieces["k_end"], pieces["U"])
    return M, c


def compose(first, second):
    """second o first for (M, c) maps (batched over leading dims)."""
    M1, c1 = first
    M2, c2 = second
    return _mm("...ij,...jk->...ik", M2, M1), _mm("...ij,...jv->...iv", M2, c1) + c2


def apply_map(m, S):
    M, c = m
    return _mm("...ij,...jv->...iv", M, S) + c


def _local_states(M, c, S_entry):
    """Chunk-entry states S_in [N,B,H,K,V] and the exit state, from maps and the entry state."""
    pM, pc = jax.lax.associative_scan(compose, (M, c), axis=0)  # inclusive prefixes
    S_out = apply_map((pM, pc), S_entry[None])  # [N,B,H,K,V]
    S_in = jnp.concatenate([S_entry[None], S_out[:-1]], axis=0)
    return S_in, S_out[-1], (pM[-1], pc[-1])


def _outputs(pieces, S_in, T):
    v_new = pieces["U"] - _mm("nbhck,nbhkv->nbhcv", pieces["W"], S_in)
    return chunk_outputs(pieces, S_in, v_new, T)


def associative_scan_gated_delta_rule(
    q, k, v, g, beta, *, scale, initial_state=None, segment_ids=None, config: ChunkConfig = DEFAULT_CHUNK_CONFIG
):
    """Gated delta rule with an associative scan over chunk maps (module docstring).

    Shapes as the chunked backend; returns o float32 [B, T, H, V], final state float32 [B, H, K, V].
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    S0 = jnp.zeros((B, H, K, V), jnp.float32) if initial_state is None else initial_state.astype(jnp.float32)
    starts = None if segment_ids is None else segment_starts(segment_ids)
    pieces = chunk_pieces(q, k, v, g, beta, scale=scale, starts=starts, chunk_size=config.chunk_size)
    M, c = chunk_maps(pieces)
    S_in, final, _ = _local_states(M, c, S0)
    return _outputs(pieces, S_in, T), final


def total_map(M, c):
    """The whole sequence of chunk maps [N, ...] as one map (chunk 0 applied first), by a pairwise tree.

    log2(N) levels of batched compositions, N - 1 in all (an associative scan would form every prefix).
    """
    while M.shape[0] > 1:
        if M.shape[0] % 2:  # an identity map pads an odd level
            M = jnp.concatenate([M, jnp.broadcast_to(jnp.eye(M.shape[-1], dtype=M.dtype), M[:1].shape)])
            c = jnp.concatenate([c, jnp.zeros_like(c[:1])])
        M, c = compose((M[0::2], c[0::2]), (M[1::2], c[1::2]))
    return M[0], c[0]


def context_parallel_entry(total, S0, *, axis_name, n_dev: int):
    """(the state entering this device's slice, the final state of the whole sequence), inside ``shard_map``.

    total: this device's slice as one map (M [B, H, K, K], c [B, H, K, V]); S0 [B, H, K, V] fp32, the same on
    every device of ``axis_name``. The P maps are all-gathered (P x (K^2 + K V) floats per head, never
    activations); the final state is every device's composition of all of them, so it comes out replicated.
    """
    all_M = jax.lax.all_gather(total[0], axis_name)  # [P, B, H, K, K]
    all_c = jax.lax.all_gather(total[1], axis_name)
    me = jax.lax.axis_index(axis_name)
    S_entry, S_final = S0, S0
    for p in range(n_dev):  # P is small: a Python loop of P map applications
        S_next = apply_map((all_M[p], all_c[p]), S_entry)
        S_entry = jnp.where(p < me, S_next, S_entry)
        S_final = apply_map((all_M[p], all_c[p]), S_final)
    return S_entry, S_final


def context_parallel_shard(q, k, v, g, beta, starts, S0, *, axis_name, n_dev: int, scale: float,
                           config: ChunkConfig = DEFAULT_CHUNK_CONFIG, out_dtype=jnp.float32):
    """One device's part of the context-parallel rule, called inside ``shard_map`` (module docstring).

    q, k [B, T_loc, H, K], v [B, T_loc, H, V], g, beta [B, T_loc, H] (transforms already applied), starts
    [B, T_loc] int restart flags (computed on the whole sequence), S0 [B, H, K, V] fp32 (the same on every
    device of ``axis_name``): this device's slice of the sequence along ``axis_name`` (a mesh axis or a
    tuple of them, ``n_dev`` devices in all; other mesh axes may split B and H). Returns (o [B, T_loc, H, V]
    in ``out_dtype``, the final state fp32, the same on every device of ``axis_name``).
    """
    T_loc = q.shape[1]
    pieces = chunk_pieces(q, k, v, g, beta, scale=scale, starts=starts, chunk_size=config.chunk_size)
    M, c = chunk_maps(pieces)
    pM, pc = jax.lax.associative_scan(compose, (M, c), axis=0)
    S_entry, S_final = context_parallel_entry((pM[-1], pc[-1]), S0, axis_name=axis_name, n_dev=n_dev)
    S_out = apply_map((pM, pc), S_entry[None])
    S_in = jnp.concatenate([S_entry[None], S_out[:-1]], axis=0)
    return _outputs(pieces, S_in, T_loc).astype(out_dtype), S_final


def context_parallel_states(k, v, g, beta, starts, S0, *, axis_name, n_dev: int,
                            config: ChunkConfig = DEFAULT_CHUNK_CONFIG):
    """The first pass of the two-pass context-parallel form, inside ``shard_map``: the state entering this
    device's slice and the final state, so that any single-device backend (the Pallas kernels) then runs the
    slice from that state.

    Arguments as :func:`context_parallel_shard` (no q: only the maps are built; the output products are dead
    code that XLA drops). A restart at the slice's first token zeroes the entry state here, since a backend
    given the slice alone cannot see it. Returns (S_entry, S_final), fp32 [B, H, K, V].
    """
    pieces = chunk_pieces(k, k, v, g, beta, scale=1.0, starts=starts, chunk_size=config.chunk_size)
    S_entry, S_final = context_parallel_entry(total_map(*chunk_maps(pieces)), S0, axis_name=axis_name, n_dev=n_dev)
    S_entry = jnp.where(starts[:, 0, None, None, None] > 0, 0.0, S_entry)
    return S_entry, S_final


def context_parallel_gated_delta_rule(
    q,
    k,
    v,
    g,
    beta,
    *,
    mesh,
    axis_name: str,
    scale=None,
    initial_state=None,
    segment_ids=None,
    output_final_state: bool = False,
    transforms: InputTransforms = NO_TRANSFORMS,
    A_log=None,
    dt_bias=None,
    config: ChunkConfig = DEFAULT_CHUNK_CONFIG,
):
    """Gated delta rule with the sequence split over ``mesh`` axis ``axis_name``.

    Same contract as :func:`kernels.gated_delta_rule` (q, k [B,T,H,K], v [B,T,H,V],
    g, beta [B,T,H], initial_state [B,H,K,V], segment_ids [B,T], the l2norm /
    gate / beta transforms); T must divide by the axis size. Other mesh axes
    are not used (inputs are replicated over them). Returns (o in v.dtype
    sharded along T, final state fp32 replicated or None). Differentiable.

    Meshes with Auto axes work under plain jit; with Explicit axes, call it under
    ``jax.set_mesh(mesh)`` (the inputs are resharded along T with ``jax.reshard``).
    """
    P = jax.sharding.PartitionSpec
    n_dev = mesh.shape[axis_name]
    B, T, H, K = q.shape
    V = v.shape[-1]
    if T % n_dev:
        raise ValueError(f"T = {T} must divide by the size {n_dev} of mesh axis {axis_name!r}")
    if scale is None:
        scale = float(K) ** -0.5
    out_dtype = v.dtype
    f32 = jnp.float32
    q, k, g, beta = apply_input_transforms(q, k, g, beta, transforms=transforms, A_log=A_log, dt_bias=dt_bias)
    v = v.astype(f32)
    S0 = jnp.zeros((B, H, K, V), f32) if initial_state is None else initial_state.astype(f32)
    # Restart flags on the whole sequence: a restart at a device boundary compares across it.
    starts = jnp.zeros((B, T), jnp.int32) if segment_ids is None else segment_starts(segment_ids).astype(jnp.int32)

    def local(q, k, v, g, beta, starts, S0):
        return context_parallel_shard(q, k, v, g, beta, starts, S0, axis_name=axis_name, n_dev=n_dev,
                                      scale=scale, config=config, out_dtype=out_dtype)

    seq = P(None, axis_name)
    if any("Explicit" in str(t) for t in getattr(mesh, "axis_types", ())):
        reshard = jax.sharding.reshard
        q, k, v, g, beta, starts = (reshard(x, seq) for x in (q, k, v, g, beta, starts))
        S0 = reshard(S0, P())
    fn = _shard_map(
        local,
        mesh=mesh,
        in_specs=(seq, seq, seq, seq, seq, seq, P()),
        out_specs=(seq, P()),
        **{_CHECK_KW: False},
    )
    o, final = fn(q, k, v, g, beta, starts, S0)
    return o, (final if output_final_state else None)
