"""Public entry point and backend dispatch for the gated delta rule.

Contract (arrays in, arrays out; no model knowledge):

    gated_delta_rule(q, k, v, g, beta, *, scale=None, initial_state=None,
                     segment_ids=None, output_final_state=False, backend="auto",
                     use_qk_l2norm_in_kernel=False, A_log=None, dt_bias=None,
                     beta_sigmoid=False, beta_scale=1.0, config=None, mesh=None,
                     shard_axes=None)
        -> (o, final_state)

    q, k          [B, T, H, K]    floating
    v             [B, T, H, V]    floating
    g             [B, T, H]       floating, log decay (<= 0)
    beta          [B, T, H]       floating, write strength (typically in (0, 2))
    initial_state [B, H, K, V]    floating or None (zeros); the state before token 0
    segment_ids   [B, T]          integer or None; the state restarts from zero
                                  before any t >= 1 whose id differs from t - 1
    o             [B, T, H, V]    in v.dtype
    final_state   [B, H, K, V]    float32, or None unless output_final_state

Per (b, h), with state S in R^{K x V}:
    S_t = exp(g_t) S_{t-1};  S_t += k_t (beta_t (v_t - S_t^T k_t))^T;  o_t = S_t^T (scale q_t)
scale=None means K ** -0.5. q and k are NOT normalised unless asked.
All math is float32 whatever the input dtype; o is rounded once, to v.dtype
(the pallas backend feeds its dots 16-bit operands when q, k, v are 16-bit).

Input transforms (default off; same math on every backend, from ``gates.py``;
differentiable w.r.t. the raw inputs):
    use_qk_l2norm_in_kernel  q, k <- x * rsqrt(sum(x^2) + 1e-6)   (fp32)
    A_log [H] (+ dt_bias [H]) g is the raw gate input a: g <- -exp(A_log) softplus(a + dt_bias)
    beta_sigmoid, beta_scale  beta <- beta_scale * (sigmoid(beta) if beta_sigmoid else beta)
The pallas backend applies them to the tiles it loads (no extra HBM pass); the
others apply them in plain JAX before the recurrence.

Launch parameters: ``config`` is the resolved backend's own block-size dataclass (``PallasConfig``
for "pallas", None = the tuned table ``config.TUNED_PALLAS_CONFIGS`` for this device and K, V;
``ChunkConfig`` for "chunked" / "associative_scan"; "sequential" takes none).

Sharding: with ``shard_axes=ShardAxes(batch=(...), heads=(...))`` (mesh axis names) the resolved
backend runs per shard inside ``jax.shard_map`` over ``mesh`` (or the context mesh), batch and heads
split as named (``sharding.py``): the kernels' custom calls never meet XLA's partitioner. With
``ShardAxes(seq=(...))`` naming axes of more than one device, the sequence is split over them too
(context parallelism, ``associative_scan.py``). backend "associative_scan" then runs in one pass
(per-chunk maps, their prefixes, the outputs); every other backend in two: the per-device total maps
give each device the state entering its slice (an all-gather of the small maps), then the resolved
backend (the Pallas kernels on GPU) runs the slice from that state. A ``ChunkConfig`` sets the maps'
chunk size; a ``PallasConfig`` still launches the kernels.

Backends: "sequential" (token-by-token oracle), "chunked" (WY form, lax.scan
over chunks), "associative_scan" (WY form, associative scan over per-chunk
affine maps), "pallas" (Triton kernels; interpret mode on CPU). "auto" is
pallas on GPU, chunked elsewhere.

Backends live in ``BACKENDS`` (a name -> Backend registry); adding one is one
entry plus, if it should be picked automatically, one place in
``_AUTO_PRIORITY``. ``backend``, ``scale`` and ``output_final_state`` are
static Python values, so the whole call works under jit / grad / vjp.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from . import pallas_gpu
from .associative_scan import associative_scan_gated_delta_rule, context_parallel_shard, context_parallel_states
from .config import DEFAULT_CHUNK_CONFIG, ChunkConfig, PallasConfig
from .gates import InputTransforms, apply_input_transforms
from .reference import sequential_gated_delta_rule
from .sharding import ShardAxes, resolve_mesh, run_sharded, seq_split
from .xla_chunked import chunked_gated_delta_rule


@dataclasses.dataclass(frozen=True)
class Backend:
    """A registered implementation.

    fn: (q, k, v, g, beta, *, scale, initial_state, segment_ids) -> (o, state fp32);
        receives float32 arrays that already passed validation and had the
        input transforms applied, unless ``fused``.
    supports: (q, k, v, platform) -> reason it cannot run, or None. Only
        backend-specific limits go here (shared validation happens first).
    fused: fn takes the caller's dtypes and the transforms itself, as extra
        keywords transforms=InputTransforms, A_log=, dt_bias=.
    platforms: where "auto" may pick it (None: anywhere).
    config_type: the launch-parameter dataclass fn takes as ``config=`` (None: takes none).
    """

    fn: Callable
    supports: Callable[..., str | None] = lambda q, k, v, platform: None
    fused: bool = False
    platforms: tuple[str, ...] | None = None
    config_type: type | None = None


BACKENDS: dict[str, Backend] = {
    "sequential": Backend(sequential_gated_delta_rule),
    "chunked": Backend(chunked_gated_delta_rule, config_type=ChunkConfig),
    "associative_scan": Backend(associative_scan_gated_delta_rule, config_type=ChunkConfig),
    "pallas": Backend(
        pallas_gpu.pallas_gated_delta_rule,
        supports=pallas_gpu.supports,
        fused=True,
        platforms=("gpu", "cuda"),
        config_type=PallasConfig,
    ),
}

# "auto" takes the first backend here that supports the input on this platform.
_AUTO_PRIORITY: tuple[str, ...] = ("pallas", "chunked")


def _valid_names() -> str:
    return ", ".join(repr(n) for n in ("auto",) + tuple(BACKENDS))


def _is_float(x) -> bool:
    return jnp.issubdtype(x.dtype, jnp.floating)


def _check_inputs(q, k, v, g, beta, initial_state, segment_ids) -> str | None:
    """Shared input validation. Returns a message naming the problem, or None."""
    named = {"q": q, "k": k, "v": v, "g": g, "beta": beta}
    if initial_state is not None:
        named["initial_state"] = initial_state
    for name, x in named.items():
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            return f"{name} must be an array, got {type(x).__name__}"
    for name, rank, layout in (
        ("q", 4, "[B, T, H, K]"),
        ("k", 4, "[B, T, H, K]"),
        ("v", 4, "[B, T, H, V]"),
        ("g", 3, "[B, T, H]"),
        ("beta", 3, "[B, T, H]"),
    ):
        x = named[name]
        if x.ndim != rank:
            return f"{name} must have rank {rank} {layout}, got shape {tuple(x.shape)}"
    for name, x in named.items():
        if not _is_float(x):
            return f"{name} must be a floating dtype, got {x.dtype}"
    B, T, H, K = q.shape
    for name in ("k", "v", "g", "beta"):
        x = named[name]
        if tuple(x.shape[:3]) != (B, T, H):
            return (
                f"{name} has leading dims [B, T, H] = {list(x.shape[:3])}, "
                f"but q has {[B, T, H]} (q {tuple(q.shape)}, {name} {tuple(x.shape)})"
            )
    if k.shape[3] != K:
        return f"q and k must share the key dim K: q {tuple(q.shape)}, k {tuple(k.shape)}"
    V = v.shape[3]
    if initial_state is not None and tuple(initial_state.shape) != (B, H, K, V):
        return (
            f"initial_state must have shape [B, H, K, V] = {[B, H, K, V]}, "
            f"got {tuple(initial_state.shape)}"
        )
    if segment_ids is not None:
        if not hasattr(segment_ids, "shape") or not hasattr(segment_ids, "dtype"):
            return f"segment_ids must be an array, got {type(segment_ids).__name__}"
        if tuple(segment_ids.shape) != (B, T):
            return f"segment_ids must have shape [B, T] = {[B, T]}, got {tuple(segment_ids.shape)}"
        if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
            return f"segment_ids must have an integer dtype, got {segment_ids.dtype}"
    return None


def _platform() -> str:
    return jax.default_backend()


def _resolve(backend: str, q, k, v) -> str:
    if backend == "auto":
        platform = _platform()
        for name in _AUTO_PRIORITY:
            be = BACKENDS[name]
            if be.platforms is not None and platform not in be.platforms:
                continue
            if be.supports(q, k, v, platform) is None:
                return name
        return "sequential"  # always supported
    if backend not in BACKENDS:
        raise ValueError(f"unknown gated_delta_rule backend {backend!r}; valid: {_valid_names()}")
    return backend


def shapes_supported(backend, q, k, v, g=None, beta=None, *, initial_state=None, segment_ids=None):
    """Why ``backend`` cannot take these inputs (a message), or None if it can.

    Works on arrays or jax.ShapeDtypeStruct. g and beta are optional; pass them
    to have their shapes/dtypes checked too.
    """
    if not isinstance(backend, str) or (backend != "auto" and backend not in BACKENDS):
        return f"unknown gated_delta_rule backend {backend!r}; valid: {_valid_names()}"
    B, T, H = (tuple(q.shape) + (0, 0, 0))[:3] if hasattr(q, "shape") else (0, 0, 0)
    if g is None:
        g = jax.ShapeDtypeStruct((B, T, H), jnp.float32)
    if beta is None:
        beta = jax.ShapeDtypeStruct((B, T, H), jnp.float32)
    problem = _check_inputs(q, k, v, g, beta, initial_state, segment_ids)
    if problem is not None:
        return problem
    name = _resolve(backend, q, k, v)
    return BACKENDS[name].supports(q, k, v, _platform())


def _transforms(q, use_qk_l2norm_in_kernel, A_log, dt_bias, beta_sigmoid, beta_scale):
    """Validates the transform options; returns (InputTransforms, message or None)."""
    H = q.shape[2]
    if A_log is None:
        if dt_bias is not None:
            return None, "dt_bias is only used with A_log (the in-kernel gate); pass A_log too"
    else:
        for name, x in (("A_log", A_log), ("dt_bias", dt_bias)):
            if x is None:
                continue
            if not hasattr(x, "shape") or tuple(x.shape) != (H,):
                return None, f"{name} must have shape [H] = [{H}], got {tuple(getattr(x, 'shape', ()))}"
            if not _is_float(x):
                return None, f"{name} must be a floating dtype, got {x.dtype}"
    if not isinstance(beta_scale, (int, float, np.floating, np.integer)):
        return None, f"beta_scale must be a static Python number, got {type(beta_scale).__name__}"
    tr = InputTransforms(
        qk_l2norm=bool(use_qk_l2norm_in_kernel),
        gate=A_log is not None,
        beta_sigmoid=bool(beta_sigmoid),
        beta_scale=float(beta_scale),
    )
    return tr, None


def gated_delta_rule(
    q,
    k,
    v,
    g,
    beta,
    *,
    scale=None,
    initial_state=None,
    segment_ids=None,
    output_final_state=False,
    backend="auto",
    use_qk_l2norm_in_kernel=False,
    A_log=None,
    dt_bias=None,
    beta_sigmoid=False,
    beta_scale=1.0,
    config=None,
    mesh=None,
    shard_axes=None,
):
    """Gated delta rule; see the module docstring for shapes, math and options.

    Returns (o in v.dtype [B, T, H, V], final_state float32 [B, H, K, V] or None).
    Raises ValueError naming the problem for bad shapes/dtypes or an unknown
    backend, for a backend that cannot take the input, for a ``config`` of
    another backend and for ``shard_axes`` without a usable mesh.
    """
    if not isinstance(backend, str) or (backend != "auto" and backend not in BACKENDS):
        raise ValueError(f"unknown gated_delta_rule backend {backend!r}; valid: {_valid_names()}")
    problem = _check_inputs(q, k, v, g, beta, initial_state, segment_ids)
    if problem is not None:
        raise ValueError(f"gated_delta_rule: {problem}")
    tr, problem = _transforms(q, use_qk_l2norm_in_kernel, A_log, dt_bias, beta_sigmoid, beta_scale)
    if problem is not None:
        raise ValueError(f"gated_delta_rule: {problem}")
    name = _resolve(backend, q, k, v)
    be = BACKENDS[name]
    problem = be.supports(q, k, v, _platform())
    if problem is not None:
        raise ValueError(f"gated_delta_rule backend {name!r} cannot take this input: {problem}")
    if config is not None and (be.config_type is None or not isinstance(config, be.config_type)):
        want = "no config" if be.config_type is None else f"a {be.config_type.__name__} or None"
        raise ValueError(f"gated_delta_rule backend {name!r} takes {want}, got config={config!r}")
    if shard_axes is not None:
        if not isinstance(shard_axes, ShardAxes):
            raise ValueError(f"shard_axes must be a ShardAxes, got {type(shard_axes).__name__}")
        mesh, problem = resolve_mesh(mesh, shard_axes)
        if problem is not None:
            raise ValueError(f"gated_delta_rule: {problem}")
    elif mesh is not None:
        raise ValueError("gated_delta_rule: mesh= is only used with shard_axes=ShardAxes(...); pass both")

    K = q.shape[-1]
    if scale is None:
        scale = float(K) ** -0.5
    elif not isinstance(scale, (int, float, np.floating, np.integer)):
        raise ValueError(f"scale must be a static Python number or None, got {type(scale).__name__}")
    scale = float(scale)
    opts = {} if config is None else {"config": config}

    f32 = jnp.float32

    def run(q, k, v, g, beta, initial_state, segment_ids, A_log, dt_bias):
        if be.fused:
            return be.fn(q, k, v, g, beta, scale=scale, initial_state=initial_state, segment_ids=segment_ids,
                         transforms=tr, A_log=A_log, dt_bias=dt_bias, **opts)
        if initial_state is None and q.shape[1] > 0:
            # Zeros derived from k and v: inside a user's shard_map they vary over the same mesh
            # axes as the inputs (a constant would not, and lax.scan's carry types would differ).
            initial_state = (k[:, 0, :, :, None] * 0).astype(f32) * (v[:, 0, :, None, :] * 0).astype(f32)
        q, k, g, beta = apply_input_transforms(q, k, g, beta, transforms=tr, A_log=A_log, dt_bias=dt_bias)
        return be.fn(q.astype(f32), k.astype(f32), v.astype(f32), g, beta, scale=scale,
                     initial_state=None if initial_state is None else initial_state.astype(f32),
                     segment_ids=segment_ids, **opts)

    arrays = dict(q=q, k=k, v=v, g=g, beta=beta, initial_state=initial_state, segment_ids=segment_ids,
                  A_log=A_log, dt_bias=dt_bias)
    if shard_axes is None:
        o, final_state = run(**arrays)
    else:
        B, T, H, _ = q.shape
        seq, n_seq = seq_split(mesh, shard_axes, T)
        if seq:
            chunk_config = config if isinstance(config, ChunkConfig) else DEFAULT_CHUNK_CONFIG

            axis = seq[0] if len(seq) == 1 else seq
            one_pass = name == "associative_scan"

            def run_cp(q, k, v, g, beta, initial_state, starts, A_log, dt_bias):
                qt, kt, gt, bt = apply_input_transforms(q, k, g, beta, transforms=tr, A_log=A_log, dt_bias=dt_bias)
                S0 = (jnp.zeros((*k.shape[:1], *k.shape[2:], v.shape[-1]), f32) if initial_state is None
                      else initial_state.astype(f32))
                if one_pass:
                    return context_parallel_shard(qt.astype(f32), kt.astype(f32), v.astype(f32), gt, bt, starts, S0,
                                                  axis_name=axis, n_dev=n_seq, scale=scale, config=chunk_config)
                # two passes: the slice-entry states from the maps, then the resolved backend runs the slice
                S_entry, S_final = context_parallel_states(kt.astype(f32), v.astype(f32), gt, bt, starts, S0,
                                                           axis_name=axis, n_dev=n_seq, config=chunk_config)
                local_ids = None if segment_ids is None else jnp.cumsum(starts, axis=1)  # changes at the restarts
                o, _ = run(q, k, v, g, beta, S_entry, local_ids, A_log, dt_bias)
                return o, S_final

            # restart flags on the whole sequence (before the split), so a restart at a shard boundary is seen;
            # segment_starts' neighbour compare as a pad, which XLA partitions with a one-token halo
            prev = None if segment_ids is None else jnp.pad(segment_ids, ((0, 0), (1, 0)))[:, :T]
            starts = (jnp.zeros((B, T), jnp.int32) if segment_ids is None
                      else ((segment_ids != prev) & (jnp.arange(T) > 0)).astype(jnp.int32))
            cp_arrays = {**{n: x for n, x in arrays.items() if n != "segment_ids"}, "starts": starts}
            o, final_state = run_sharded(run_cp, cp_arrays, mesh=mesh, shard_axes=shard_axes, B=B, H=H, seq=seq)
        else:
            o, final_state = run_sharded(run, arrays, mesh=mesh, shard_axes=shard_axes, B=B, H=H)
    o = o.astype(v.dtype)  # the single rounding to the caller's dtype
    return o, (final_state if output_final_state else None)
