"""Device mesh, logical-axis rules, and the parameter-path -> logical-axes table.

Mesh axes: ``data`` (replicas), ``fsdp`` (parameter / optimizer-state shards), ``context`` (the sequence
of every activation; context parallelism) and ``tensor``.
The model modules carry no annotations: ``param_logical_axes`` derives each parameter's logical axes
from its path (one regex table, ``PARAM_AXES``), and ``RULES`` maps logical names to mesh axes.
HSDP is a rule choice, not a code path: parameters map ``embed`` to ``fsdp`` only, so they are
sharded within a replica group and replicated over ``data``; activations map ``batch`` to
``(data, fsdp)``. ``mesh.data=1`` gives plain FSDP, ``mesh.fsdp=1`` plain data parallelism.
Context parallelism is the rule ``seq -> context``; parameters are sharded over ``(fsdp, context)``
(OLMo-core's FSDP over the whole non-replica mesh): the context ranks hold different tokens of the same
rows, so they reduce-scatter gradients like FSDP ranks instead of all-reducing replicated copies.
Full attention moves that split from the sequence to the heads and back (Ulysses, ``attention_shardings``).

A dimension whose size does not divide its mesh axes falls back to replication (e.g. the 30 GDN
heads of ``a_proj`` on 4 tensor shards), and a mesh axis is used at most once per array.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "context", "tensor")

#: logical axis -> mesh axis (or tuple of mesh axes, or None = replicated).
RULES: dict[str, Any] = {
    # parameters
    "vocab": "tensor",
    "embed": ("fsdp", "context"),  # ZeRO-3 style: the hidden dim of every matrix is sharded over fsdp x context
    "heads": "tensor",       # projected q/k/v/g widths, conv channels, o_proj input
    "mlp": "tensor",
    "layers": None,          # the stacked-block axis of the scanned model
    "conv_tap": None,
    "norm": None,
    "gate_heads": None,      # a_proj / b_proj outputs, A_log, dt_bias (tiny)
    # activations
    "batch": ("data", "fsdp"),
    "seq": "context",        # context parallelism: every activation's sequence is split over context
    "act_embed": None,
    "act_vocab": "tensor",
}

#: (regex on the '/'-joined parameter path, logical axes of the trailing dims). First match wins; a
#: stacked parameter gets a leading "layers" axis. Paths are those of the list layout
#: (model/layers/3/self_attn/q_proj/kernel) and of the scanned one (model/blocks/layers/3/...).
PARAM_AXES: list[tuple[str, tuple]] = [
    (r"embed_tokens/embedding$", ("vocab", "embed")),
    (r"lm_head/kernel$", ("embed", "vocab")),
    (r"(self_attn|linear_attn)/[qkvg]_proj/kernel$", ("embed", "heads")),
    (r"(self_attn|linear_attn)/[qkvg]_proj/bias$", ("heads",)),
    (r"linear_attn/[ab]_proj/kernel$", ("embed", "gate_heads")),
    (r"(self_attn|linear_attn)/o_proj/kernel$", ("heads", "embed")),
    (r"o_proj/bias$", ("norm",)),
    (r"mlp/(gate|up)_proj/kernel$", ("embed", "mlp")),
    (r"mlp/down_proj/kernel$", ("mlp", "embed")),
    (r"_conv1d/kernel$", ("conv_tap", "heads")),
    (r"(A_log|dt_bias)$", ("gate_heads",)),
    (r"(norm|layernorm)/weight$", ("norm",)),
    (r"lora_[ab]$", (None, None)),  # LoRA factors (post.lora): rank-r, small, replicated
]


def path_str(path) -> str:
    """'/'-joined string of a jax key path (DictKey / SequenceKey / GetAttrKey) or tuple of keys."""
    parts = []
    for k in path:
        for attr in ("key", "idx", "name"):
            if hasattr(k, attr):
                k = getattr(k, attr)
                break
        parts.append(str(k))
    return "/".join(parts)


def param_logical_axes(path: str, ndim: int) -> tuple:
    """Logical axes of the parameter at ``path`` (str) with ``ndim`` dims."""
    for pat, axes in PARAM_AXES:
        if re.search(pat, path):
            if ndim == len(axes) + 1:
                return ("layers",) + tuple(axes)
            if ndim != len(axes):
                raise ValueError(f"parameter {path}: rank {ndim} does not fit logical axes {axes}")
            return tuple(axes)
    raise ValueError(f"no logical-axis rule for parameter {path!r} (add one to sharding.PARAM_AXES)")


def merged_rules(overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    rules = dict(RULES)
    for k, v in (overrides or {}).items():
        if k not in rules:
            raise ValueError(f"mesh.rules: unknown logical axis {k!r}; known: {sorted(rules)}")
        v = tuple(v) if isinstance(v, list) else v
        for ax in (v if isinstance(v, tuple) else (v,)):
            if ax is not None and ax not in MESH_AXES:
                raise ValueError(f"mesh.rules[{k!r}] = {v!r}: {ax!r} is not a mesh axis {MESH_AXES}")
        rules[k] = v
    return rules


def rule_axes(rules: Mapping, name: str | None) -> tuple[str, ...]:
    """The mesh axes that logical axis ``name`` maps to (a rule is None, one mesh axis or a tuple of them)."""
    target = rules.get(name) if name is not None else None
    if target is None:
        return ()
    return tuple(target) if isinstance(target, (tuple, list)) else (target,)


def logical_to_spec(axes: Sequence, shape: Sequence[int] | None, mesh: Mesh, rules: Mapping) -> P:
    """PartitionSpec for logical ``axes``; dims that don't divide their mesh axes stay replicated."""
    used: set[str] = set()
    out = []
    for i, name in enumerate(axes):
        target = rule_axes(rules, name)
        if not target:
            out.append(None)
            continue
        mesh_axes = tuple(a for a in target if a not in used and mesh.shape.get(a, 1) > 1)
        size = math.prod(mesh.shape[a] for a in mesh_axes) if mesh_axes else 1
        if not mesh_axes or (shape is not None and shape[i] % size != 0):
            # fall back: the largest prefix of the mesh axes that divides the dim
            while mesh_axes and shape is not None and shape[i] % math.prod(mesh.shape[a] for a in mesh_axes):
                mesh_axes = mesh_axes[:-1]
            if not mesh_axes:
                out.append(None)
                continue
        used.update(mesh_axes)
        out.append(mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    return P(*out)


def param_shardings(abstract_params, mesh: Mesh, rules: Mapping):
    """A tree of NamedShardings matching ``abstract_params`` (arrays or ShapeDtypeStructs)."""
    def one(path, x):
        p = path_str(path)
        return NamedSharding(mesh, logical_to_spec(param_logical_axes(p, x.ndim), x.shape, mesh, rules))

    return jax.tree_util.tree_map_with_path(one, abstract_params)


def activation_sharding(mesh: Mesh, rules: Mapping, axes=("batch", "seq", "act_embed"), shape=None) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(axes, shape, mesh, rules))


def attention_shardings(mesh: Mesh, rules: Mapping, *, batch: int, seq: int, num_heads: int, num_kv_heads: int,
                        head_dim: int):
    """``modules.AttentionShardings`` for context parallelism, None when the sequence is not split.

    Ulysses when both head counts divide the mesh axes of "seq": q, k, v move their split from the sequence
    to the heads ("attn_heads") and attention runs on whole sequences (any kernel, cuDNN included); else
    all-gather CP: q keeps the sequence split and k, v are gathered whole.
    """
    from olmo_hybrid_jax.modules import AttentionShardings

    seq_axes = tuple(a for a in rule_axes(rules, "seq") if mesh.shape.get(a, 1) > 1)
    n = math.prod(mesh.shape[a] for a in seq_axes)
    if not seq_axes or seq % n:
        return None
    ulysses = num_heads % n == 0 and num_kv_heads % n == 0
    inner = {**rules, "attn_heads": seq_axes if ulysses else None}

    def spec(axes, heads, rules):
        return NamedSharding(mesh, logical_to_spec(axes, (batch, seq, heads, head_dim), mesh, rules))

    split = ("batch", "seq", None, None)
    return AttentionShardings(
        seq_q=spec(split, num_heads, rules), seq_kv=spec(split, num_kv_heads, rules),
        q=spec(("batch", None, "attn_heads", None) if ulysses else split, num_heads, inner),
        kv=spec(("batch", None, "attn_heads", None), num_kv_heads, inner),
        ids=NamedSharding(mesh, logical_to_spec(("batch", None), (batch, seq), mesh, rules)))


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, devices=None, *, context: int = 1) -> Mesh:
    """A (data, fsdp, context, tensor) mesh over all devices (of all hosts); one size may be -1 (= the rest)."""
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    sizes = [data, fsdp, context, tensor]
    if sizes.count(-1) > 1:
        raise ValueError("at most one mesh axis may be -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if n % known:
            raise ValueError(f"{n} devices do not divide into mesh data={data} fsdp={fsdp} context={context} "
                             f"tensor={tensor}")
        sizes[sizes.index(-1)] = n // known
    if math.prod(sizes) != n:
        raise ValueError(f"mesh data*fsdp*context*tensor = {math.prod(sizes)} but there are {n} devices "
                         f"(set one of mesh.data/fsdp/context/tensor to -1 to fill)")
    if len({d.process_index for d in devices}) > 1:
        # several hosts: host-major order, so with fsdp * tensor = devices per host the data (replica)
        # axis runs across hosts (slow links carry only the gradient all-reduce of HSDP) and
        # fsdp / context / tensor stay inside a host (NVLink)
        arr = np.asarray(sorted(devices, key=lambda d: (d.process_index, d.id))).reshape(sizes)
    else:
        try:  # topology-aware order on one host (tensor innermost, on the fastest links)
            from jax.experimental import mesh_utils

            arr = mesh_utils.create_device_mesh(tuple(sizes), devices=devices, allow_split_physical_axes=True)
        except Exception:  # noqa: BLE001  (CPU / unusual topologies: plain order)
            arr = np.asarray(devices).reshape(sizes)
    return Mesh(arr, MESH_AXES)


def maybe_initialize_distributed() -> bool:
    """Call ``jax.distributed.initialize()`` when a multi-process launcher's environment is present.

    Recognised: JAX's own (``JAX_COORDINATOR_ADDRESS`` + ``JAX_NUM_PROCESSES`` + ``JAX_PROCESS_ID``),
    SLURM (``SLURM_NTASKS`` > 1, auto-detected by JAX), Open MPI (``OMPI_COMM_WORLD_SIZE`` > 1) and
    torchrun-style (``MASTER_ADDR``/``MASTER_PORT``/``WORLD_SIZE``/``RANK``). Must run before any
    other JAX call. Returns whether it initialised.
    """
    env = os.environ
    if env.get("JAX_COORDINATOR_ADDRESS") and env.get("JAX_NUM_PROCESSES"):
        jax.distributed.initialize(coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
                                   num_processes=int(env["JAX_NUM_PROCESSES"]),
                                   process_id=int(env.get("JAX_PROCESS_ID", "0")))
        return True
    if int(env.get("WORLD_SIZE", "1")) > 1 and env.get("MASTER_ADDR"):
        port = int(env.get("MASTER_PORT", "29500")) + 1  # next to torch's port, not on it
        jax.distributed.initialize(coordinator_address=f"{env['MASTER_ADDR']}:{port}",
                                   num_processes=int(env["WORLD_SIZE"]), process_id=int(env["RANK"]))
        return True
    if int(env.get("SLURM_NTASKS", "1")) > 1 or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        jax.distributed.initialize()  # cluster auto-detection
        return True
    return False
