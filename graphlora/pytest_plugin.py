"""pytest plugin (entry point ``pytest11``): graph snapshot testing for everyone who installs graphlora.

Adds the ``--graphlora-update-snapshots`` option and the ``graph_snapshot`` fixture::

    def test_lora_graph(graph_snapshot):
        model = graphlora.transform(...)
        graph_snapshot(model)                 # golden: snapshots/<test module>.<test name>.graph.txt
        graph_snapshot(model.graph_module, "after_lora", snapshot_dir="goldens")  # relative to the test file
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest

from graphlora import testing

__all__ = ["GraphSnapshot", "graph_snapshot"]

_session_key = pytest.StashKey["testing._Session"]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("graphlora")
    group.addoption(
        testing.UPDATE_OPTION,
        action="store_true",
        default=False,
        dest="graphlora_update_snapshots",
        help=f"rewrite graphlora graph snapshot goldens instead of comparing (same as {testing.UPDATE_ENV}=1)",
    )


def pytest_configure(config: pytest.Config) -> None:
    session = testing._Session(update=bool(config.getoption("graphlora_update_snapshots", False)))
    config.stash[_session_key] = session
    testing._sessions.append(session)


def pytest_unconfigure(config: pytest.Config) -> None:
    session = config.stash.get(_session_key, None)
    if session is not None and session in testing._sessions:
        testing._sessions.remove(session)


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    session = config.stash.get(_session_key, None)
    paths = list(dict.fromkeys(session.written)) if session is not None else []
    if paths:
        terminalreporter.write_sep("-", f"graphlora: wrote {len(paths)} graph snapshot(s)")
        for path in paths:
            terminalreporter.write_line(str(path))


class GraphSnapshot:
    """The ``graph_snapshot`` fixture value: call it with a graph to assert against a golden.

    Golden files live in ``snapshot_dir`` (default: ``snapshots/`` next to the test module; a
    relative ``snapshot_dir`` argument is relative to the test module's folder); the
    default name is ``<test module>.<test name>``, with ``.1``, ``.2``... for further calls in the
    same test.
    """

    def __init__(self, request: pytest.FixtureRequest) -> None:
        self._base_dir = Path(request.path).resolve().parent
        self.snapshot_dir = self._base_dir / "snapshots"
        module = Path(request.path).stem
        self._base = re.sub(r"[^A-Za-z0-9_.\-]", "_", f"{module}.{request.node.name}")
        self._calls = 0

    @property
    def update(self) -> bool:
        """Whether goldens are rewritten (``--graphlora-update-snapshots`` or the environment variable)."""
        return testing.update_requested()

    def __call__(
        self, graph: Any, name: str | None = None, *, snapshot_dir: str | os.PathLike | None = None
    ) -> Path:
        if name is None:
            name = self._base if self._calls == 0 else f"{self._base}.{self._calls}"
        self._calls += 1
        if snapshot_dir is None:
            directory = self.snapshot_dir
        else:
            directory = testing.resolve_snapshot_dir(snapshot_dir, self._base_dir)
        return testing.assert_graph_snapshot(graph, name, directory)


@pytest.fixture
def graph_snapshot(request: pytest.FixtureRequest) -> GraphSnapshot:
    """Assert graphs against golden text files; see :class:`GraphSnapshot`."""
    return GraphSnapshot(request)
