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
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from graphlora.adapters import lora_param_name
from graphlora.errors import AdapterError, ExportError, FileFormatError
from graphlora.graph_utils import get_tensor
from graphlora.io.atomic import atomic_path
from graphlora.passes.export_lora_inputs import adapter_input_name, input_layout

ADAPTER_SUFFIX = ".onnx_adapter"


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
) -> Path:
    """Write an onnxruntime adapter file (atomically).

    ``source`` is a :class:`~graphlora.LoraModel` (``adapter`` picks which of its adapters; default
    the active one) or a mapping of input name -> array already in the ``lora="inputs"`` layout.
    """
    import onnxruntime as ort

    if isinstance(source, Mapping):
        tensors = {k: np.ascontiguousarray(np.asarray(v, dtype=np.float32)) for k, v in source.items()}
    else:
        tensors = adapter_tensors(source, adapter)
    if not tensors:
        raise ExportError("the adapter has no LoRA tensors to write")
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(int(adapter_version))
    fmt.set_model_version(int(model_version))
    fmt.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in tensors.items()})
    path = Path(path)
    with atomic_path(path) as tmp:
        fmt.export_adapter(os.fspath(tmp))
    return path


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


def load_adapter(adapter):
    """An ``onnxruntime.LoraAdapter`` from a path (a loaded adapter is returned as is); the file is
    checked first as by :func:`read_adapter`."""
    import onnxruntime as ort

    if isinstance(adapter, ort.LoraAdapter):
        return adapter
    path = Path(adapter)
    if not path.is_file():
        raise AdapterError(f"no onnxruntime adapter file at {path}")
    read_adapter(path)
    loaded = ort.LoraAdapter()
    try:
        loaded.Load(os.fspath(path))
    except (RuntimeError, ValueError) as exc:
        raise FileFormatError(f"{path}: onnxruntime cannot load this adapter file: {_first_line(exc)}") from None
    return loaded


def _first_line(exc: BaseException) -> str:
    lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
    return lines[-1] if lines else type(exc).__name__
