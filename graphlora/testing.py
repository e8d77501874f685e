"""Snapshot assertions for graphs, usable in any test suite (pytest, unittest, plain asserts).

A golden file holds the canonical :func:`graphlora.diff.graph_text` of a graph. Comparing against
it turns an accidental change -- a torch upgrade, a new rule, a refactor of a pass -- into a failing
test whose message is a readable, grouped diff; an intended change is accepted by rewriting the
goldens (``--graphlora-update-snapshots`` with pytest, or ``GRAPHLORA_UPDATE_SNAPSHOTS=1``) and
reviewing the file diff in version control. A missing golden is a failure, never silently created,
so a typo in a snapshot name cannot make a test pass vacuously.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any

from graphlora.diff import GRAPH_TEXT_SUFFIX, diff, graph_text
from graphlora.diff._common import atomic_write_text

__all__ = [
    "UPDATE_ENV",
    "GraphSnapshotError",
    "assert_graph_snapshot",
    "resolve_snapshot_dir",
    "snapshot_path",
    "update_requested",
]

UPDATE_ENV = "GRAPHLORA_UPDATE_SNAPSHOTS"
UPDATE_OPTION = "--graphlora-update-snapshots"


class _Session:
    """What the pytest plugin tells this module about the running pytest session."""

    def __init__(self, update: bool) -> None:
        self.update = update
        self.written: list[Path] = []  # goldens (re)written, for the end-of-session report


# Pushed/popped by the pytest plugin: a stack, so that a nested in-process pytest run (pytester)
# neither sees nor leaks the outer session's settings.
_sessions: list[_Session] = []

_NAME = re.compile(r"[A-Za-z0-9_.\-]+(/[A-Za-z0-9_.\-]+)*")


class GraphSnapshotError(AssertionError):
    """A graph does not match its golden snapshot, or the golden file does not exist."""


def update_requested() -> bool:
    """True when goldens should be rewritten: ``GRAPHLORA_UPDATE_SNAPSHOTS`` is set to a true value
    or pytest runs with ``--graphlora-update-snapshots``."""
    env = os.environ.get(UPDATE_ENV, "").strip().lower()
    if env in ("1", "true", "yes", "on"):
        return True
    return bool(_sessions and _sessions[-1].update)


def snapshot_path(name: str, snapshot_dir: str | os.PathLike) -> Path:
    """Path of the golden file for ``name`` (``<snapshot_dir>/<name>.graph.txt``)."""
    if not _NAME.fullmatch(name) or any(part in ("", ".", "..") for part in name.split("/")):
        raise ValueError(
            f"invalid snapshot name {name!r}: use letters, digits, '_', '-', '.' (and '/' for subfolders)"
        )
    filename = name if name.endswith(GRAPH_TEXT_SUFFIX) else name + GRAPH_TEXT_SUFFIX
    return Path(snapshot_dir) / filename


def _normalize(text: str) -> str:
    text = text.replace("\r\n", "\n")
    return text if text.endswith("\n") else text + "\n"


def _caller_dir(depth: int) -> Path:
    return Path(sys._getframe(depth + 1).f_code.co_filename).resolve().parent


def resolve_snapshot_dir(snapshot_dir: str | os.PathLike | None, base: Path) -> Path:
    """``snapshot_dir`` made absolute against ``base`` (the test file's folder), so goldens do not
    depend on the directory pytest is started from; ``None`` means ``base / "snapshots"``."""
    if snapshot_dir is None:
        return base / "snapshots"
    return base / Path(snapshot_dir)  # an absolute snapshot_dir replaces base


def assert_graph_snapshot(
    graph: Any,
    name: str,
    snapshot_dir: str | os.PathLike | None = None,
    *,
    update: bool | None = None,
) -> Path:
    """Assert that ``graph_text(graph)`` equals the golden file ``<snapshot_dir>/<name>.graph.txt``.

    ``graph`` is anything :func:`graphlora.diff.graph_text` accepts. ``snapshot_dir`` is absolute
    or relative to the calling file's folder, and defaults to ``snapshots`` next to it. With
    ``update`` (default: :func:`update_requested`, i.e. the pytest option or the environment
    variable) the golden is (re)written atomically instead of compared. Raises :class:`GraphSnapshotError` (an
    ``AssertionError``) with the grouped diff on mismatch, or with instructions when the golden is
    missing. Returns the golden's path.
    """
    path = snapshot_path(name, resolve_snapshot_dir(snapshot_dir, _caller_dir(1)))
    actual = _normalize(graph_text(graph))
    requested = update is None and update_requested()
    if update or requested:
        if not path.is_file() or _normalize(path.read_text(encoding="utf-8")) != actual:
            atomic_write_text(path, actual)
            if requested and _sessions:  # reported at the end of a pytest session run in update mode
                _sessions[-1].written.append(path)
        return path
    if not path.is_file():
        raise GraphSnapshotError(
            f"graph snapshot {name!r} has no golden file at {path}; create it by running the test with "
            f"{UPDATE_OPTION} (pytest) or {UPDATE_ENV}=1, then review and commit the file"
        )
    expected = _normalize(path.read_text(encoding="utf-8"))
    if expected == actual:
        return path
    result = diff(expected, actual, labels=("golden", "actual"))
    raise GraphSnapshotError(
        f"graph snapshot {name!r} differs from {path}:\n{result}\n"
        f"If the change is intended, rerun with {UPDATE_OPTION} or {UPDATE_ENV}=1 and review the file diff."
    )
