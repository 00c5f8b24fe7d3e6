"""Training checkpoints with orbax's CheckpointManager.

Layout of ``OUT/checkpoints/<step>/``:

- ``state/``: the train state pytree (``step``, ``params`` fp32 master weights, ``opt_state`` with the
  Adam moments and the skip-step guard's ring buffers, ``rng``) with its shardings (``StandardSave``;
  every host writes its own shards);
- ``data/``: the grain iterator state (JSON), i.e. the next batch to read;
- ``meta/``: JSON with the config, the model's HF config and the parameter layout (list / scanned).

Saves are asynchronous (the step loop continues while tensorstore writes) every ``checkpoint.every``
steps and at the last step; ``checkpoint.keep`` newest are kept. Atomicity is orbax's: a step is
written into a temporary directory (``<step>.orbax-checkpoint-tmp-*``) and renamed to ``<step>`` only
after every item and the commit marker are complete, so a process killed mid-save leaves at most a
temporary directory that ``latest_step`` ignores and the next manager cleans up; the previous
checkpoint stays restorable.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _ocp():
    import orbax.checkpoint as ocp

    return ocp


class Checkpointer:
    """A thin wrapper over ``ocp.CheckpointManager`` with the three items above."""

    def __init__(self, directory: str | Path, *, every: int, keep: int, async_save: bool = True):
        ocp = _ocp()
        self.directory = Path(directory).absolute()
        self.every = every
        opts = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                            enable_async_checkpointing=async_save,
                                            cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(self.directory, item_names=("state", "data", "meta"), options=opts)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, data_state: dict, meta: dict, *, force: bool = False) -> bool:
        ocp = _ocp()
        return self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state), meta=ocp.args.JsonSave(meta)),
            force=force)

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict, dict]:
        """(state with the shardings of ``abstract_state``, data iterator state, meta)."""
        ocp = _ocp()
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
        return out["state"], out["data"], out["meta"]

    def read_meta(self, step: int) -> dict:
        ocp = _ocp()
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
