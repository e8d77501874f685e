"""Passes are small objects turning a GraphModule into a GraphModule, run by a pipeline.

In the spirit of ``torch.fx.passes.infra``: a pass has ``requires`` (preconditions), ``call``
(the rewrite) and ``ensures`` (postconditions); the pipeline lints and recompiles after every
pass so a broken rewrite is caught at the pass that made it, not three passes later. With
``record=True`` the pipeline keeps the canonical text of the graph before and after each pass, from
which :func:`graphlora.diff` shows exactly what that pass changed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence

import torch.fx as fx

from graphlora.errors import GraphloraError, PassError


@dataclass
class PassResult:
    graph_module: fx.GraphModule
    modified: bool


class GraphPass:
    """Base class: override :meth:`call`; ``name`` defaults to the class name."""

    @property
    def name(self) -> str:
        return type(self).__name__

    def requires(self, gm: fx.GraphModule) -> None:
        """Raise PassError when ``gm`` is not something this pass can rewrite."""

    def call(self, gm: fx.GraphModule) -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError

    def ensures(self, gm: fx.GraphModule) -> None:
        """Raise PassError when the rewrite broke an invariant this pass promises."""

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        self.requires(gm)
        result = self.call(gm)
        self.ensures(result.graph_module)
        return result


@dataclass
class PassRecord:
    """What one pass did: its name, whether it changed the graph, its time and (recorded) texts."""

    name: str
    modified: bool
    seconds: float
    before: str | None = None
    after: str | None = None

    @property
    def diff(self):
        """A :class:`graphlora.diff.GraphDiff` of this pass (needs ``record=True``)."""
        if self.before is None or self.after is None:
            raise PassError(f"pass {self.name} was not recorded; transform with record=True")
        from graphlora.diff import diff

        return diff(self.before, self.after)


@dataclass
class PassPipeline:
    passes: Sequence[GraphPass]
    record: bool = False
    log: list[PassRecord] = field(default_factory=list)

    def __call__(self, gm: fx.GraphModule) -> fx.GraphModule:
        text = _graph_text(gm) if self.record else None
        for p in self.passes:
            start = time.perf_counter()
            try:
                result = p(gm)
            except GraphloraError:
                raise
            except Exception as exc:
                raise PassError(f"pass {p.name} failed: {type(exc).__name__}: {exc}") from exc
            gm = result.graph_module
            if result.modified:
                try:
                    gm.graph.lint()
                except Exception as exc:
                    raise PassError(f"pass {p.name} produced an invalid graph: {exc}") from exc
                gm.recompile()
            seconds = time.perf_counter() - start
            after = _graph_text(gm) if self.record else None
            self.log.append(PassRecord(p.name, result.modified, seconds, text, after))
            text = after
        return gm


def _graph_text(gm: fx.GraphModule) -> str:
    from graphlora.diff import graph_text

    return graph_text(gm)
