"""Turning graphs and saved graph files into graph texts, and writing graph texts to files."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from graphlora.diff._common import HEADER, atomic_write_text
from graphlora.diff.fx_text import render_fx
from graphlora.diff.onnx_text import OnnxRenderer
from graphlora.errors import FileFormatError, InputError, UnsafeFileError


def _is_text(value: str) -> bool:
    return "\n" in value or value.startswith(HEADER)


def graph_text(graph: Any, *, allow_pickle: bool = False) -> str:
    """Canonical, stable text of a graph: one line per node, identical across runs and processes.

    Accepts an ``fx.GraphModule`` (or ``fx.Graph``), anything with a ``.graph_module`` attribute
    (``LoraModel``), a ``torch.export.ExportedProgram``, an ``onnx.ModelProto``, a path to a saved
    graph (``.onnx``, ``.pt2``, ``*.graph.txt``), or an existing graph text (returned as is).
    ``allow_pickle`` as for :func:`read_graph_text`.
    """
    if isinstance(graph, str):
        if _is_text(graph):
            return graph if graph.endswith("\n") else graph + "\n"
        return read_graph_text(graph, allow_pickle=allow_pickle)
    if isinstance(graph, os.PathLike):
        return read_graph_text(graph, allow_pickle=allow_pickle)
    try:
        import torch.fx as fx
    except ImportError:  # pragma: no cover - torch is a hard dependency
        fx = None
    if fx is not None:
        from torch.export import ExportedProgram

        if isinstance(graph, fx.GraphModule):
            return render_fx(graph)
        if isinstance(graph, ExportedProgram):
            # the unlifted module (parameters as get_attr), as passes and LoraModel see it
            return render_fx(graph.module())
        inner = getattr(graph, "graph_module", None)
        if isinstance(inner, fx.GraphModule):
            return render_fx(inner)
        if isinstance(graph, fx.Graph):
            return render_fx(graph.owning_module, graph)
    if type(graph).__name__ == "ModelProto" and hasattr(graph, "graph"):
        return OnnxRenderer(graph).render()
    raise InputError(
        f"cannot make a graph text from {type(graph).__name__}: expected an fx.GraphModule, a LoraModel, "
        "a torch.export.ExportedProgram, an onnx.ModelProto, a saved graph path or a graph text; "
        "trace a plain nn.Module first, e.g. torch.export.export(model, args, strict=False).module()"
    )


def _sniff(path: Path) -> str:
    """The reader for a file: by suffix, else by content. Content never selects the pickle-based
    ``.pt2`` reader: a zip archive not named ``.pt2`` is refused, not loaded."""
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        return "onnx"
    if suffix == ".pt2":
        return "pt2"
    with open(path, "rb") as fh:
        head = fh.read(64)
    if head.startswith(HEADER.encode()):
        return "text"
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if suffix == ".txt":
        return "text"
    return "onnx?"


def read_graph_text(path: str | os.PathLike, *, allow_pickle: bool = False) -> str:
    """Graph text of a saved graph file.

    A *saved graph* is one of: an ONNX model (``.onnx``; external data is not loaded, only shapes
    and dtypes are needed), a ``torch.export.save`` archive (``.pt2``), or a graph text written by
    :func:`save_graph_text` (conventionally ``*.graph.txt``; recognised by its header line).

    ``.pt2`` archives are read with ``torch.export.load``, which unpickles parts of the archive (and
    evaluates symbolic shape strings): a crafted archive runs arbitrary code. They are refused
    (:class:`~graphlora.errors.UnsafeFileError`) unless ``allow_pickle=True`` says you trust the
    file; prefer ``.onnx`` or ``*.graph.txt`` for graphs from elsewhere (docs/security.md).
    """
    path = Path(path)
    if not path.is_file():
        raise FileFormatError(f"{path}: no such file (expected a saved graph: .onnx, .pt2 or *.graph.txt)")
    kind = _sniff(path)
    if kind == "text":
        try:
            text = path.read_text(encoding="utf-8").replace("\r\n", "\n")
        except UnicodeDecodeError as exc:
            raise FileFormatError(f"{path}: not a graph text (not UTF-8: {exc.reason})") from exc
        if not text.startswith(HEADER):
            raise FileFormatError(
                f"{path}: not a graph text (the first line should start with {HEADER!r}); "
                "write one with graphlora.save_graph_text(graph, path)"
            )
        return text if text.endswith("\n") else text + "\n"
    if kind == "zip":
        raise UnsafeFileError(
            f"{path}: a zip archive, not a graph text or ONNX model (a torch.export .pt2 archive under "
            "another name?). graphlora picks no pickle-based reader from a file's content; if it is a "
            "torch.export archive you trust, name it *.pt2 and pass allow_pickle=True"
        )
    if kind == "pt2":
        if not allow_pickle:
            raise UnsafeFileError(
                f"{path}: reading a torch.export archive (.pt2) unpickles it, and a crafted archive runs "
                "arbitrary code. Pass allow_pickle=True (graphlora diff/graph-text: --allow-pickle) "
                "only for archives you trust; share graphs as .onnx or *.graph.txt instead"
            )
        import torch

        try:
            program = torch.export.load(str(path))
        except Exception as exc:
            raise FileFormatError(f"{path}: cannot load as a torch.export archive (.pt2): {exc}") from exc
        return render_fx(program.module())
    import onnx

    if path.stat().st_size == 0:
        raise FileFormatError(f"{path}: an empty file, not an ONNX model (a saved graph is .onnx, .pt2 or *.graph.txt)")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise FileFormatError(
            f"{path}: not a readable ONNX model ({type(exc).__name__}); a saved graph is a .onnx, .pt2 "
            "or *.graph.txt file"
        ) from exc
    if model.ir_version == 0 or not model.HasField("graph"):
        raise FileFormatError(
            f"{path}: not an ONNX model (no IR version or graph; truncated or another format?); a "
            "saved graph is a .onnx, .pt2 or *.graph.txt file"
        )
    if kind == "onnx?" and not model.graph.node and not model.opset_import:
        raise FileFormatError(f"{path}: unknown file format; a saved graph is a .onnx, .pt2 or *.graph.txt file")
    return OnnxRenderer(model).render()


def save_graph_text(graph: Any, path: str | os.PathLike, *, allow_pickle: bool = False) -> Path:
    """Write ``graph_text(graph)`` to ``path`` atomically (temp file + ``os.replace``), so a crash
    never leaves a half-written golden file. Returns the path. ``allow_pickle`` as for
    :func:`read_graph_text` when ``graph`` is the path of a ``.pt2`` archive."""
    path = Path(path)
    atomic_write_text(path, graph_text(graph, allow_pickle=allow_pickle))
    return path
