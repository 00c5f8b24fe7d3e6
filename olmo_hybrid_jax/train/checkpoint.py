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

A finished step can still be damaged later (a truncated shard, a deleted item, a torn JSON file):
``restore_newest`` tries the steps newest first, reports each one that fails in one line and restores
the next older one (every process the same one: a step counts as restored only where all did); nothing
is deleted. ``move_aside`` then moves the unrestorable newer steps out of
orbax's directory (so the resumed run can save those step numbers again and ``keep`` counts only good
ones).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any


def _ocp():
    import orbax.checkpoint as ocp

    return ocp


class UnrestorableCheckpoints(RuntimeError):
    """No checkpoint of the run restores; the message lists each step tried and why it failed."""


def error_line(e: BaseException) -> str:
    """``Type: first line`` of the innermost cause (tensorstore's own error, not orbax's 60-line wrapper)."""
    while e.__cause__ is not None:
        e = e.__cause__
    text = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
    first = str(text).strip().splitlines()[0] if str(text).strip() else ""
    return f"{type(e).__name__}: {first[:300]}"


_STRAY = ("Event loop is closed", "Encountered error while reading")
_STRAY_ASYNCIO = ("exception was never retrieved", "Task was destroyed but it is pending")
_stray_filter_installed = False


def _from_orbax(tb) -> bool:
    while tb is not None:
        if "/orbax/" in tb.tb_frame.f_code.co_filename:
            return True
        tb = tb.tb_next
    return False


def _drop_abandoned_read_errors() -> None:
    """When one array fails to read, orbax abandons the others; their coroutines and tensorstore callbacks
    later raise into its closed event loop (two "Exception ignored" tracebacks per array, many at interpreter
    exit: thousands of lines after the one-line report). From the first failed restore on, this process
    drops exactly those (raised in orbax or into its closed loop, and asyncio's "never retrieved" / "destroyed
    but pending" records); anything else still prints."""
    global _stray_filter_installed
    if _stray_filter_installed:
        return
    import logging
    import sys

    previous = sys.unraisablehook

    def hook(u):
        if not (_from_orbax(u.exc_traceback) or any(m in str(u.exc_value) for m in _STRAY)):
            previous(u)

    sys.unraisablehook = hook
    logging.getLogger("asyncio").addFilter(lambda r: not any(m in r.getMessage() for m in _STRAY_ASYNCIO))
    _stray_filter_installed = True


def _key(k) -> str:
    for attr in ("key", "idx", "name"):  # DictKey, SequenceKey, GetAttrKey
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def leaf_shapes(tree) -> dict[str, tuple]:
    """``{"params/model/embed_tokens/embedding": shape, ...}`` of a pytree of arrays or array metadata."""
    import jax

    return {"/".join(_key(k) for k in path): tuple(x.shape)
            for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _all_processes(ok: bool) -> bool:
    """Whether ``ok`` holds on every process (each reads its own shards: all must walk back together)."""
    import jax

    if jax.process_count() == 1:
        return ok
    import numpy as np
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


class Checkpointer:
    """A thin wrapper over ``ocp.CheckpointManager`` with the three items above."""

    def __init__(self, directory: str | Path, *, every: int, keep: int, async_save: bool = True):
        ocp = _ocp()
        self.directory = Path(directory).absolute()
        self.every = every
        opts = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                            enable_async_checkpointing=async_save,
                                            cleanup_tmp_directories=True)
        # handlers named up front: item_metadata (the saved shapes) works before any save or restore
        handlers = {"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler(),
                    "meta": ocp.JsonCheckpointHandler()}
        self.manager = ocp.CheckpointManager(self.directory, item_handlers=handlers, options=opts)

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
        return self._read_json(step, "meta")

    def _read_json(self, step: int, item: str) -> dict:
        ocp = _ocp()
        return self.manager.restore(step, args=ocp.args.Composite(**{item: ocp.args.JsonRestore()}))[item]

    def state_shapes(self, step: int) -> dict[str, tuple]:
        """The saved state's array shapes by path (orbax's metadata; no array is read)."""
        md = self.manager.item_metadata(step)
        if "state" not in md.keys():
            raise FileNotFoundError(f"no state item in {self.directory / str(step)}")
        md = md["state"]
        return leaf_shapes(getattr(md, "tree", md))

    def restore_newest(self, abstract_state: Any, *, check: Callable[[int, dict, dict], None] | None = None,
                       use_data: Callable[[dict], None] | None = None,
                       log: Callable[[str], None] = print) -> tuple[int, Any, dict, list[tuple[int, str]]]:
        """Restore the newest step that restores: (step, state, meta, [(step, error line) of newer ones that
        failed]). ``check(step, meta, saved_shapes)`` runs before the arrays are read and raises when the
        checkpoint does not fit the config (a config error, never walked back over); ``use_data(data_state)``
        applies the data iterator state (a failure there counts as a broken checkpoint too). Raises
        ``UnrestorableCheckpoints`` when none restores."""
        ocp = _ocp()
        failed: list[tuple[int, str]] = []
        for step in sorted(self.all_steps(), reverse=True):
            item, why = "meta/", None
            try:  # the small items one at a time first, so the report names the broken one
                meta = self.read_meta(step)
                item = "data/"
                data_state = self._read_json(step, "data")
                item = "state/ metadata"
                shapes = self.state_shapes(step)
                if check is not None:
                    item = None
                    check(step, meta, shapes)
                item = "state/"
                state = self.manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state)))["state"]
                item = "data/ (iterator state)"
                if use_data is not None:
                    use_data(data_state)
            except Exception as e:  # any read failure means this step is unusable; a misfit (item None) is not
                if item is None:
                    raise
                if item == "state/":
                    _drop_abandoned_read_errors()
                why = f"{item}: {error_line(e)}"
            if not _all_processes(why is None) and why is None:
                why = "another process could not restore it"
            if why is not None:
                failed.append((step, why))
                log(f"checkpoint step {step} ({self.directory / str(step)}) does not restore, {why}; "
                    "trying the previous one")
                continue
            return step, state, meta, failed
        tried = "; ".join(f"step {s}: {msg}" for s, msg in failed) or "no checkpoint found"
        raise UnrestorableCheckpoints(f"no checkpoint in {self.directory} restores ({tried}); nothing was deleted")

    def move_aside(self, steps: list[int], dest: Path) -> list[Path]:
        """Move the step folders ``steps`` (unrestorable ones) to ``dest/<step>`` (never deleted) and re-read
        the step list, so those step numbers can be saved again. Process 0 moves; every process waits."""
        import jax

        moved = []
        if jax.process_index() == 0:
            dest.mkdir(parents=True, exist_ok=True)
            for s in steps:
                target = dest / str(s)
                n = 1
                while target.exists():  # an earlier resume moved this step number aside already
                    target = dest / f"{s}.{n}"
                    n += 1
                (self.directory / str(s)).rename(target)
                moved.append(target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("olmo_hybrid_jax.checkpoint.move_aside")
        self.manager.reload()
        return moved

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
