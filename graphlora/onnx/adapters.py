"""LoRA adapters in onnxruntime's own format, for models exported with ``lora="inputs"``.

Such a model has two graph inputs per LoRA site, ``<site>.lora_A`` = ``A^T`` ``(in, r)`` and
``<site>.lora_B`` = ``(scale * B)^T`` ``(r, out)`` (the scale is folded in so an adapter is
self-contained and ranks may differ between adapters), initialised with the adapter that was
active at export. An onnxruntime adapter file (``onnxruntime.AdapterFormat``) holds the same
tensors under the same names; activating one for a run feeds them instead::

    sess = graphlora.onnx.InferenceSession("model.onnx")
    adapter = onnxruntime.LoraAdapter(); adapter.Load("legal.onnx_adapter")
    options = onnxruntime.RunOptions(); options.add_active_adapter(adapter)
    sess.run(None, feeds, options)          # or sess.run_with_adapter(None, feeds, "legal.onnx_adapter")

Keep the ``LoraAdapter`` object alive while runs use it: ``RunOptions`` does not own it.

No re-export, no session rebuild; the base weights are shared by every adapter.

**Never mixed.** onnxruntime feeds an adapter's tensors and keeps the exported default for every
input the file lacks, so a file covering fewer sites than the model would silently run *mixed*
with the exported adapter. An adapter written or loaded *for a model* (``model=`` a path, an
:class:`~graphlora.onnx.OnnxExport`, a session or an ONNX model; :meth:`InferenceSession.run_with_adapter`
passes its own) is therefore conformed to the model's sites (:func:`conform`): every exported
site present, an absent one as exact zeros (no LoRA there), a lower rank zero-padded to the
exported one (zero A columns and B rows add nothing), and a higher rank, a site the model does
not have, or a mismatched width refused with :class:`~graphlora.errors.AdapterError` naming the
sites. The export records each input's shape in the ``graphlora.lora_inputs`` metadata, and the
rank dimension is left symbolic in the graph, so onnxruntime never plans buffers for one rank.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from graphlora.adapters import lora_param_name
from graphlora.errors import AdapterError, ExportError, FileFormatError
from graphlora.graph_utils import get_tensor
from graphlora.io.atomic import atomic_path
from graphlora.passes.export_lora_inputs import adapter_input_name, input_layout

ADAPTER_SUFFIX = ".onnx_adapter"
METADATA_KEY = "graphlora.lora_inputs"


@dataclass(frozen=True)
class ExportedInput:
    """One LoRA input of an exported model: its site, which factor, and its exported shape."""

    name: str
    module_path: str
    which: str  # "lora_A" (in, rank) | "lora_B" (rank, out)
    shape: tuple[int, int]


def exported_ranks(model, lora_rank: int | Mapping[str, int] | None) -> dict[str, int]:
    """The rank each site is exported at: ``lora_rank`` (an int for all, or per module path),
    else the largest rank any adapter of ``model`` has at that site."""
    from graphlora.model import LoraModel

    ranks: dict[str, int] = {}
    if isinstance(model, LoraModel):
        for specs in model.adapters.values():
            for path, spec in specs.items():
                ranks[path] = max(ranks.get(path, 0), int(spec.rank))
    if lora_rank is None:
        return ranks
    if isinstance(lora_rank, Mapping):
        return {**ranks, **{str(k): int(v) for k, v in lora_rank.items()}}
    if isinstance(lora_rank, bool) or not isinstance(lora_rank, int) or lora_rank < 1:
        raise ExportError(f"lora_rank must be a positive int or a mapping module path -> rank, got {lora_rank!r}")
    return {path: int(lora_rank) for path in ranks} | {"*": int(lora_rank)}


def free_rank_dims(onnx_model, lora_inputs) -> None:
    """Make the rank dimension of each branch's inner activation (``x @ A^T``) symbolic, as the
    inputs' own: a shape fixed at the exported rank makes onnxruntime plan buffers for it."""
    import onnx_ir as ir

    graph = onnx_model.graph
    by_site: dict[str, dict[str, Any]] = {}
    for item in lora_inputs:
        value = next((v for v in graph.inputs if v.name == item.name), None)
        if value is not None:
            by_site.setdefault(item.module_path, {})[item.which] = value
    for path, pair in by_site.items():
        a, b = pair.get("lora_A"), pair.get("lora_B")
        if a is None:
            continue
        stop = {id(node) for node, _ in b.uses()} if b is not None else set()
        dim = ir.SymbolicDim(f"{path}.rank")
        frontier = [node for node, _ in a.uses()]
        seen: set[int] = set()
        while frontier:
            node = frontier.pop()
            if id(node) in seen or id(node) in stop:
                continue
            seen.add(id(node))
            for out in node.outputs:
                if out.shape is not None and len(out.shape):
                    out.shape = ir.Shape([*list(out.shape)[:-1], dim])
                frontier.extend(n for n, _ in out.uses())


def exported_inputs(model) -> dict[str, ExportedInput]:
    """The LoRA inputs of a ``lora="inputs"`` export, from a path, an :class:`OnnxExport`, an
    onnxruntime session, or an ONNX model (``onnx.ModelProto`` or ``onnx_ir.Model``)."""
    entries = None
    if hasattr(model, "lora_inputs") and hasattr(model, "path"):  # OnnxExport
        entries = [{"name": i.name, "module_path": i.module_path, "which": i.which, "shape": list(i.shape)}
                   for i in model.lora_inputs]
    else:
        text = _metadata(model)
        if text is not None:
            try:
                entries = json.loads(text)
            except ValueError:
                raise AdapterError(f"the model's {METADATA_KEY} metadata is not JSON") from None
    if entries is None:
        raise AdapterError("the model has no LoRA inputs (graphlora.lora_inputs metadata): it was not "
                           "exported with lora='inputs', so adapters cannot switch it")
    out = {}
    for e in entries:
        if not isinstance(e, dict) or len(e.get("shape") or ()) != 2:
            raise AdapterError("the model's LoRA inputs carry no shapes (exported by an older graphlora): "
                               "re-export it to write or load adapters for it")
        out[e["name"]] = ExportedInput(e["name"], e["module_path"], e["which"], tuple(int(d) for d in e["shape"]))
    return out


def _metadata(model) -> str | None:
    if isinstance(model, (str, os.PathLike)):
        import onnx

        if not Path(model).is_file():
            raise AdapterError(f"no ONNX model at {model}")
        model = onnx.load(os.fspath(model), load_external_data=False)
    if hasattr(model, "get_modelmeta"):  # an onnxruntime session
        return model.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
    props = getattr(model, "metadata_props", None)
    if isinstance(props, Mapping):  # onnx_ir
        return props.get(METADATA_KEY)
    if props is not None:  # onnx.ModelProto
        return next((p.value for p in props if p.key == METADATA_KEY), None)
    raise AdapterError(f"cannot read LoRA inputs from a {type(model).__name__}; give the model's path, "
                       "its OnnxExport or an onnxruntime session")


def conform(tensors: Mapping[str, np.ndarray], model) -> dict[str, np.ndarray]:
    """``tensors`` laid out for exactly ``model``'s LoRA inputs: absent sites as zeros, lower
    ranks zero-padded; unknown names, half pairs, higher ranks and wrong widths refused."""
    inputs = exported_inputs(model)
    unknown = sorted(set(tensors) - set(inputs))
    if unknown:
        raise AdapterError(f"the adapter has tensors for {len(unknown)} input(s) the model does not take: "
                           f"{', '.join(unknown[:6])}{' ...' if len(unknown) > 6 else ''}; the model's LoRA "
                           "sites are fixed at export (export with LoRA on these modules)")
    sites: dict[str, dict[str, ExportedInput]] = {}
    for item in inputs.values():
        sites.setdefault(item.module_path, {})[item.which] = item
    out: dict[str, np.ndarray] = {}
    half, too_big, wrong = [], [], []
    for path, pair in sites.items():
        a_in, b_in = pair["lora_A"], pair["lora_B"]
        a, b = tensors.get(a_in.name), tensors.get(b_in.name)
        if (a is None) != (b is None):
            half.append(path)
            continue
        rank = a_in.shape[1]
        if a is None:  # a site this adapter leaves alone: no LoRA there, exactly
            a = np.zeros(a_in.shape, np.float32)
            b = np.zeros(b_in.shape, np.float32)
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != a_in.shape[0] or b.shape[1] != b_in.shape[1] \
                or a.shape[1] != b.shape[0]:
            wrong.append(f"{path} (A^T {tuple(a.shape)}, B^T {tuple(b.shape)}; the model takes "
                         f"({a_in.shape[0]}, r) and (r, {b_in.shape[1]}))")
            continue
        if a.shape[1] > rank:
            too_big.append(f"{path} (rank {a.shape[1]} > {rank})")
            continue
        pad = rank - a.shape[1]
        out[a_in.name] = np.ascontiguousarray(np.pad(a, ((0, 0), (0, pad))))
        out[b_in.name] = np.ascontiguousarray(np.pad(b, ((0, pad), (0, 0))))
    if half:
        raise AdapterError(f"the adapter has only one of lora_A/lora_B at: {', '.join(half)}")
    if wrong:
        raise AdapterError(f"the adapter's tensors do not fit the model at: {'; '.join(wrong)}")
    if too_big:
        raise AdapterError(f"the adapter's rank exceeds the exported rank at: {', '.join(too_big)}; "
                           "export with a larger lora_rank")
    return out


def adapter_tensors(lora_model, adapter: str | None = None) -> dict[str, np.ndarray]:
    """One adapter's tensors under the ``lora="inputs"`` input names, as float32 arrays:
    ``<site>.lora_A`` = ``A^T`` ``(in, r)``, ``<site>.lora_B`` = ``(scale * B)^T`` ``(r, out)``,
    from its stored pairs (any adapter of the model, active or not)."""
    name = lora_model._resolve_adapter(adapter)
    gm = lora_model.graph_module
    out: dict[str, np.ndarray] = {}
    for path, spec in lora_model.adapters[name].items():
        a = get_tensor(gm, lora_param_name(name, path, "lora_A")).detach().float()
        b = get_tensor(gm, lora_param_name(name, path, "lora_B")).detach().float()
        for which, value in zip(("lora_A", "lora_B"), input_layout(a, b, spec.scale)):
            out[adapter_input_name(path, which)] = value.cpu().numpy()
    return out


def write_adapter(
    source,
    path: str | os.PathLike,
    adapter: str | None = None,
    *,
    adapter_version: int = 1,
    model_version: int = 1,
    model: Any = None,
) -> Path:
    """Write an onnxruntime adapter file (atomically).

    ``source`` is a :class:`~graphlora.LoraModel` (``adapter`` picks which of its adapters; default
    the active one) or a mapping of input name -> array already in the ``lora="inputs"`` layout.
    ``model``: the export the file is for (path, :class:`OnnxExport`, session); the file then
    covers exactly its sites (:func:`conform`), so plain onnxruntime can never run it mixed.
    """
    if isinstance(source, Mapping):
        tensors = {k: np.ascontiguousarray(np.asarray(v, dtype=np.float32)) for k, v in source.items()}
    else:
        tensors = adapter_tensors(source, adapter)
    if model is not None:
        tensors = conform(tensors, model)
    if not tensors:
        raise ExportError("the adapter has no LoRA tensors to write")
    path = Path(path)
    fmt = _adapter_format(tensors, adapter_version, model_version)
    with atomic_path(path) as tmp:
        fmt.export_adapter(os.fspath(tmp))
    return path


def _adapter_format(tensors: Mapping[str, np.ndarray], adapter_version: int = 1, model_version: int = 1):
    import onnxruntime as ort

    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(int(adapter_version))
    fmt.set_model_version(int(model_version))
    fmt.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in tensors.items()})
    return fmt


def read_adapter(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The tensors of an onnxruntime adapter file, checked: a truncated or foreign file, or one
    holding non-float or non-finite tensors, raises :class:`~graphlora.errors.FileFormatError`."""
    import onnxruntime as ort

    if not Path(path).is_file():
        raise AdapterError(f"no adapter file at {path}")
    try:
        fmt = ort.AdapterFormat.read_adapter(os.fspath(path))
        params = fmt.get_parameters()
        # the arrays view memory owned by ``fmt``: copy before it goes away
        tensors = {k: np.array(v.numpy(), copy=True) for k, v in params.items()}
    except (RuntimeError, ValueError, TypeError) as exc:
        raise FileFormatError(
            f"{path}: not a readable onnxruntime adapter file (truncated or another format?): "
            f"{_first_line(exc)}"
        ) from None
    for name, value in tensors.items():
        if value.dtype.kind != "f":
            raise FileFormatError(f"{path}: tensor {name!r} has dtype {value.dtype}; LoRA tensors are floating point")
        if value.size and not np.isfinite(value).all():
            raise FileFormatError(f"{path}: tensor {name!r} holds NaN/Inf values")
    return tensors


def load_adapter(adapter, model: Any = None):
    """An ``onnxruntime.LoraAdapter`` from a path (a loaded adapter is returned as is); the file is
    checked first as by :func:`read_adapter`. With ``model`` (as for :func:`write_adapter`) a file
    that does not cover the model's sites at their exported ranks is conformed first
    (:func:`conform`: absent sites as zeros, lower ranks padded) or refused."""
    import onnxruntime as ort

    if isinstance(adapter, ort.LoraAdapter):
        return adapter
    path = Path(adapter)
    if not path.is_file():
        raise AdapterError(f"no onnxruntime adapter file at {path}")
    tensors = read_adapter(path)
    if model is not None:
        fitted = conform(tensors, model)
        if set(fitted) != set(tensors) or any(fitted[k].shape != tensors[k].shape for k in fitted):
            with tempfile.TemporaryDirectory() as tmp:  # onnxruntime loads adapters from files only
                fmt = _adapter_format(fitted)
                with atomic_path(Path(tmp) / path.name) as file:
                    fmt.export_adapter(os.fspath(file))
                loaded = ort.LoraAdapter()
                loaded.Load(os.fspath(Path(tmp) / path.name))  # the adapter holds its tensors: the file may go
                return loaded
    loaded = ort.LoraAdapter()
    try:
        loaded.Load(os.fspath(path))
    except (RuntimeError, ValueError) as exc:
        raise FileFormatError(f"{path}: onnxruntime cannot load this adapter file: {_first_line(exc)}") from None
    return loaded


def _first_line(exc: BaseException) -> str:
    lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
    return lines[-1] if lines else type(exc).__name__
