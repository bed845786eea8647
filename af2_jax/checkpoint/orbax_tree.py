"""Nested dicts of arrays as Orbax trees on disk: save, restore (into given shapes and shardings) and read the
stored shapes, with Orbax's multi-page failures turned into one `CheckpointError` line."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import traceback
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from af2_jax.checkpoint.errors import RECONVERT, CheckpointError, reason


def nest(flat: dict[str, Any]) -> dict:
    """{"a.b.c": x} -> {"a": {"b": {"c": x}}}."""
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        *parents, leaf = path.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict):
            out.update(flatten(value, path))
        else:
            out[path] = value
    return out


def save_tree(path: Path, tree: dict) -> None:
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(path.absolute(), tree)


def _tree_folder(path: Path) -> None:
    if not path.is_dir():
        problem = "is not a folder" if path.exists() else "is missing"
        raise CheckpointError(f"{path}: this Orbax tree {problem}; the checkpoint is incomplete: {RECONVERT}")


@contextlib.contextmanager
def _orbax_errors(path: Path, action: str):
    """Orbax reports a damaged tree with a multi-line message that dumps the whole TensorStore spec; the innermost
    cause's first line names the array and the problem, which is what a one-line error shows."""
    quiet = _AbandonedReads()
    try:
        yield
    except Exception as err:
        quiet.keep()
        cause = err
        while (inner := cause.__cause__ or cause.__context__) is not None:
            cause = inner
        raise CheckpointError(f"{path}: cannot {action} this Orbax tree ({reason(cause)}); the checkpoint is "
                              f"damaged: {RECONVERT}") from err
    quiet.remove()


_ORBAX_SOURCE = f"{os.sep}orbax{os.sep}"
_OCDBT_READ = "in OCDBT database at"  # how TensorStore names the checkpoint in a failed read


class _AbandonedReads:
    """Drops the reports of the reads Orbax abandons when one array fails. It closes its event loop while TensorStore
    still completes the other reads it had started, and for as long as they run (on a full release, until well after
    the one-line error) each reports 'Event loop is closed', and each abandoned read task its own failure, through
    sys.unraisablehook, the asyncio logger and "never awaited" warnings: pages of tracebacks. Installed around an
    Orbax call (the first reports come while its error unwinds); kept after a failure, removed after a success."""

    def __init__(self):
        self.previous = sys.unraisablehook
        sys.unraisablehook = self.unraisable
        logging.getLogger("asyncio").addFilter(self)

    def unraisable(self, unraisable) -> None:
        closed_loop = isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == \
            "Event loop is closed"
        code = getattr(unraisable.object, "cr_code", None)  # a read coroutine closed before it finished
        if not (closed_loop or (code is not None and _ORBAX_SOURCE in code.co_filename)):
            self.previous(unraisable)

    def filter(self, record: logging.LogRecord) -> bool:
        """False for asyncio's "exception was never retrieved" / "destroyed but pending" on an Orbax task, which
        names Orbax's source in the task or in the exception's traceback, or TensorStore's OCDBT reader in the
        exception (a read task wrapped by asyncio alone, whose traceback has no Orbax frame)."""
        message = record.getMessage()
        if _ORBAX_SOURCE in message or _OCDBT_READ in message:
            return False
        err = record.exc_info[1] if record.exc_info else None
        while err is not None:
            if _OCDBT_READ in str(err) or any(_ORBAX_SOURCE in frame.filename
                                              for frame in traceback.extract_tb(err.__traceback__)):
                return False
            err = err.__cause__ or err.__context__
        return True

    def keep(self) -> None:
        # Coroutines that never started are reported when collected, often at exit.
        warnings.filterwarnings("ignore", r"coroutine '_read\w*' was never awaited", RuntimeWarning)

    def remove(self) -> None:
        if sys.unraisablehook == self.unraisable:
            sys.unraisablehook = self.previous
        logging.getLogger("asyncio").removeFilter(self)


def restore_tree(path: Path, abstract: dict) -> dict:
    import orbax.checkpoint as ocp

    _tree_folder(path)
    with _orbax_errors(path, "read"), ocp.StandardCheckpointer() as checkpointer:
        return checkpointer.restore(path.absolute(), abstract)


def stored_shapes(path: Path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Flat path -> (shape, dtype) of an Orbax tree, from its metadata alone."""
    import orbax.checkpoint as ocp

    _tree_folder(path)
    with _orbax_errors(path, "read the metadata of"), ocp.StandardCheckpointer() as checkpointer:
        meta = checkpointer.metadata(path.absolute())
    if hasattr(meta, "item_metadata"):  # a StepMetadata; older Orbax versions return the tree itself
        if meta.item_metadata is None:  # Orbax logs a warning and returns no tree instead of raising
            raise CheckpointError(f"{path}: cannot read the metadata of this Orbax tree "
                                  f"({_unreadable_metadata(path)}); the checkpoint is damaged: {RECONVERT}")
        meta = meta.item_metadata.tree
    return {k: (tuple(v.shape), np.dtype(v.dtype)) for k, v in flatten(meta).items()}


def _unreadable_metadata(path: Path) -> str:
    """Why Orbax found no tree metadata in `path`, as far as the files tell (Orbax drops its own reason)."""
    metadata = path / "_METADATA"
    if not metadata.is_file():
        return "_METADATA is missing"
    try:
        json.loads(metadata.read_bytes())
    except ValueError:
        return "_METADATA is corrupt"
    return "its array index, manifest.ocdbt and d/, is corrupt"


