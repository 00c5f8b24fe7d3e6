"""Reading a compiled step's HLO text: the collectives it runs and how much each moves (test_hsdp.py,
test_context_parallel_train.py)."""

from __future__ import annotations

import math
import re

_COLLECTIVE = re.compile(r"= (.*?) (all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)(?:-start)?\(")
_SHAPE = re.compile(r"[a-z0-9]+\[([0-9,]*)\]")


def group_size(line: str) -> int | None:
    """Devices per replica group of a collective's HLO line (None: a form this parser does not know)."""
    if m := re.search(r"replica_groups=\{(\{[0-9,{}]*\})\}", line):
        return max(len(g.split(",")) for g in re.findall(r"\{([0-9,]*)\}", m.group(1)))
    if m := re.search(r"replica_groups=mesh\[([^\]]*)\].*?\{('[^}]*')\}", line):
        sizes = dict((k, int(v)) for k, v in re.findall(r"'(\w+)'=(\d+)", m.group(1)))
        return math.prod(sizes[a] for a in re.findall(r"'(\w+)'", m.group(2)))
    if m := re.search(r"replica_groups=\[\d+,(\d+)\]<=", line):
        return int(m.group(1))
    return None


def collective_ops(hlo: str) -> list[tuple[str, int, str]]:
    """(op, elements, op_name metadata) of every array a collective of ``hlo`` moves between devices:
    the metadata says which part of the model issued it."""
    out = []
    for line in hlo.splitlines():
        m = _COLLECTIVE.search(line)
        if m and group_size(line) != 1:
            name = re.search(r'op_name="([^"]*)"', line)
            out += [(m.group(2), math.prod(int(d) for d in dims.split(",") if d), name.group(1) if name else "")
                    for dims in _SHAPE.findall(m.group(1))]
    return out


def collectives(hlo: str) -> list[tuple[str, int]]:
    """(op, elements) of every array a collective of ``hlo`` moves between devices (tuple results: each
    element); one-device groups move nothing (shard_map's transpose psums over a size-1 axis)."""
    return [(op, n) for op, n, _ in collective_ops(hlo)]
