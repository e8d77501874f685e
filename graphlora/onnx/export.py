"""``export_onnx``: a graphlora model as standard ONNX QDQ that onnxruntime accelerates.

The pipeline, each step in its own module:

1. :mod:`~graphlora.onnx.prepare` — graph passes on an eval-mode, storage-sharing copy of the graph
   (recorded in :attr:`OnnxExport.pass_log`): LoRA merged / kept as a branch / turned into named
   weights, every quantized weight a ``graphlora::dequantize*``;
2. ``torch.onnx.export(dynamo=True)`` with :mod:`~graphlora.onnx.dialect`'s translation table —
   graphlora ops become ``pkg.graphlora`` nodes; onnxscript's optimizer cleans the graph (it
   folds no Q/DQ and does not touch dialect nodes);
3. :mod:`~graphlora.onnx.lowering` — dialect nodes become QuantizeLinear/DequantizeLinear (and
   MatMulBnb4 for NF4), with initializers typed and laid out for onnxruntime's fusions;
4. ``onnx.checker.check_model(full_check=True)`` and an atomic save (external data beyond 2 GB).
"""

from __future__ import annotations

import contextlib
import inspect
import io
import json
import logging
import os
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from graphlora.errors import ExportError, MissingDependencyError
from graphlora.io.atomic import atomic_path, atomic_write, target_lock
from graphlora.onnx.prepare import check_lora_mode, prepare
from graphlora.passes.base import PassRecord
from graphlora.passes.export_lora_inputs import LoraInput

log = logging.getLogger("graphlora.onnx")

DEFAULT_OPSET = 21
IR_VERSION = 10  # opset 21's IR version: the widest onnxruntime support
TWO_GB = 2**31
_EXTERNAL_MARGIN = 64 * 2**20  # protobuf's limit includes the graph itself


@dataclass
class OnnxExport:
    """What :func:`export_onnx` wrote, and the preparation passes that led to it (``pass_log``:
    name, modified, seconds, and graph texts before/after — ``record.diff`` — when the model was
    transformed with ``record=True``)."""

    path: Path
    lora: str
    opset: int
    external_data: Path | None = None
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    lora_inputs: list[LoraInput] = field(default_factory=list)
    adapter: str | None = None
    quantized_weights: dict[str, str] = field(default_factory=dict)
    quantized_activations: int = 0
    contrib_ops: list[str] = field(default_factory=list)
    unfused: list[str] = field(default_factory=list)
    pass_log: list[PassRecord] = field(default_factory=list)


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    example_args: tuple = (),
    example_kwargs: Mapping[str, Any] | None = None,
    *,
    lora: str = "merged",
    opset: int = DEFAULT_OPSET,
    dynamic_shapes: Any = None,
    external_data: bool | None = None,
    lora_rank: int | Mapping[str, int] | None = None,
    kv_cache: bool | None = None,
) -> OnnxExport:
    """Export a :class:`~graphlora.LoraModel` (or a graphlora GraphModule) to ONNX at ``path``.

    ``lora``: ``"merged"`` (delta folded into the base weight before it is quantized),
    ``"branch"`` (quantized base plus the LoRA branch as its own small MatMuls) or ``"inputs"``
    (LoRA weights as named graph inputs initialised with the active adapter, switchable at run
    time with onnxruntime adapters; see :func:`graphlora.onnx.write_adapter`).
    ``lora_rank`` (``inputs`` only): the rank each site's inputs are exported at, an int for every
    site or a mapping module path -> rank; by default the largest rank any adapter of the model
    has there. Adapters of lower rank are zero-padded to it (exact), higher ones refused.
    ``dynamic_shapes`` follows ``torch.export``; by default every input dimension except the
    feature dimension of float inputs is dynamic and the first two are named ``batch`` and
    ``sequence``. ``external_data``: None = only when the model exceeds protobuf's 2 GB limit.
    ``kv_cache``: export a causal LM as a decoder step with past/present key-value inputs and
    outputs (:mod:`graphlora.onnx.decoder`; example inputs not needed); None = whenever the model
    is a LoraModel of a transformers model that generates.
    Nothing is written unless the whole export succeeds.
    """
    _require_onnx()
    gm = _graph_module(model)
    check_lora_mode(lora)
    check_opset(opset)
    from graphlora.onnx import decoder

    if kv_cache or (kv_cache is None and decoder.is_causal_lm(model)):
        step, args, shapes, name_io = decoder.decoder_step(model)
        return export_graph(model, step, path, args, {}, lora=lora, opset=opset, dynamic_shapes=shapes,
                            external_data=external_data, lora_rank=lora_rank, name_io=name_io)
    if not isinstance(example_args, tuple):
        example_args = (example_args,)
    example_kwargs = dict(example_kwargs or {})
    if not example_args and not example_kwargs:
        raise ExportError("export_onnx needs example inputs (example_args / example_kwargs), the "
                          "same structure the model was traced with")
    return export_graph(model, gm, path, example_args, example_kwargs, lora=lora, opset=opset,
                        dynamic_shapes=dynamic_shapes, external_data=external_data, lora_rank=lora_rank)


def check_opset(opset: int) -> None:
    if not isinstance(opset, int) or opset < 18:
        raise ExportError(f"opset {opset!r} is not supported; graphlora exports opset 18..21 "
                          "(int4/uint4 and int16 need 21, fp8 needs 19)")
    if opset > DEFAULT_OPSET:
        raise ExportError(f"opset {opset} is newer than graphlora's lowering (max {DEFAULT_OPSET})")


def export_graph(model: nn.Module, gm: fx.GraphModule, path, example_args: tuple, example_kwargs: dict, *,
                 lora: str, opset: int, dynamic_shapes: Any, external_data: bool | None,
                 lora_rank: Any = None, name_io=None) -> OnnxExport:
    """Steps 1-4 for ``gm`` (``model``'s graph for the example call); ``name_io(onnx_model)``
    names the inputs, outputs and dynamic dims when the caller knows better."""
    from graphlora.onnx.adapters import exported_ranks
    from graphlora.onnx.lowering import required_opset

    ranks = exported_ranks(model, lora_rank) if lora == "inputs" else None
    prepared = prepare(gm, lora, record=_records(model), lora_ranks=ranks)
    too_new = [(where, need) for where, need in required_opset(prepared.graph_module) if need > opset]
    if too_new:
        where, need = too_new[0]
        raise ExportError(
            f"opset {opset} cannot express {where}: it needs opset >= {need} "
            f"({len(too_new)} tensor(s) affected); export with opset={DEFAULT_OPSET}"
        )
    onnx_model = _to_onnx(prepared.graph_module, example_args, example_kwargs, opset, dynamic_shapes)
    if lora == "inputs":
        _promote_lora_inputs(onnx_model, prepared.lora_inputs)
    _fold_weight_transposes(onnx_model)
    _optimize(onnx_model)
    from graphlora.onnx.lowering import lower_model

    report = lower_model(onnx_model, opset=opset)
    if lora == "inputs":
        from graphlora.onnx.adapters import free_rank_dims

        free_rank_dims(onnx_model, prepared.lora_inputs)
    if report.unfused:
        from graphlora.errors import GraphloraWarning

        warnings.warn(
            f"{len(report.unfused)} MatMul(s) read a 4-bit weight and a quantized activation "
            f"(first: {report.unfused[0]}); onnxruntime has no static W4A8 kernel, so they run "
            "in float. For onnxruntime's fused 4-bit MatMul export without act_qtype on these "
            "sites (accuracy_level=4 quantizes activations to int8 dynamically instead).",
            GraphloraWarning, stacklevel=2,
        )
    if name_io is not None:
        name_io(onnx_model)
    else:
        if dynamic_shapes is None:
            _name_dynamic_dims(onnx_model, example_args, example_kwargs, prepared.graph_module)
        _name_outputs(onnx_model, prepared.graph_module)
    _finalise(onnx_model, opset, lora, prepared)
    result = OnnxExport(
        path=Path(path), lora=lora, opset=opset, lora_inputs=prepared.lora_inputs,
        adapter=prepared.adapter, quantized_weights=report.weights,
        quantized_activations=report.activations, contrib_ops=sorted(set(report.contrib_ops)),
        unfused=report.unfused, pass_log=prepared.pass_log,
        inputs=[v.name for v in onnx_model.graph.inputs],
        outputs=[v.name for v in onnx_model.graph.outputs],
    )
    result.external_data = save_model(onnx_model, path, external_data=external_data)
    return result


# ------------------------------------------------------------------------------ steps
def _graph_module(model: nn.Module) -> fx.GraphModule:
    from graphlora.model import LoraModel

    if isinstance(model, LoraModel):
        return model.graph_module
    if isinstance(model, fx.GraphModule):
        return model
    raise ExportError(
        f"export_onnx needs a graphlora LoraModel (from graphlora.transform) or a GraphModule "
        f"(e.g. LoraModel.merge()), got {type(model).__name__}"
    )


def _records(model: nn.Module) -> bool:
    """Whether the export keeps graph texts of its passes: as the model's own passes did."""
    from graphlora.model import LoraModel

    return isinstance(model, LoraModel) and model._record_passes


def default_dynamic_shapes(gm: fx.GraphModule, args: tuple, kwargs: dict) -> dict | None:
    """``Dim.AUTO`` for every dimension except the last (feature) one of float inputs."""
    from graphlora.trace import auto_dynamic_shapes

    shapes = auto_dynamic_shapes(gm.forward, args, kwargs, static_float_features=True)
    if shapes is None:
        try:
            inspect.signature(gm.forward).bind(*args, **kwargs)
        except (TypeError, ValueError) as exc:
            raise ExportError(f"example inputs do not fit the model's forward: {exc}") from None
    return shapes


def _to_onnx(gm: fx.GraphModule, args: tuple, kwargs: dict, opset: int, dynamic_shapes):
    from graphlora.onnx.dialect import translation_table

    shapes = dynamic_shapes if dynamic_shapes is not None else default_dynamic_shapes(gm, args, kwargs)
    try:
        # torch.onnx logs a warning per missing torchvision op on every export: not ours to show
        with _quiet("torch.onnx", "onnx_ir", "onnxscript"):
            program = torch.onnx.export(
                gm, args, kwargs=kwargs or None, dynamo=True, opset_version=opset,
                optimize=False, custom_translation_table=translation_table(),
                dynamic_shapes=shapes, verbose=False, report=False,
            )
    except ExportError:
        raise
    except Exception as exc:
        root = exc
        while root.__cause__ is not None:
            root = root.__cause__
        lines = [ln for ln in str(root).strip().splitlines() if ln.strip()]
        summary = lines[0] if lines else type(root).__name__
        raise ExportError(
            f"torch.onnx.export failed ({type(root).__name__}: {summary}). Check that the example "
            "inputs have the names, ranks and dtypes the model was traced with"
        ) from exc
    return program.model


def _promote_lora_inputs(model, lora_inputs: list[LoraInput]) -> None:
    """LoRA weights become graph inputs that keep their initializer as the default value
    (ONNX "overridable initializers"): the model runs as exported, adapters override them."""
    import onnx_ir as ir

    graph = model.graph
    for item in lora_inputs:
        value = graph.initializers.get(item.buffer)
        if value is None:
            raise ExportError(f"lora='inputs': LoRA weight {item.buffer!r} is missing from the "
                              "exported graph (was the branch optimised away?)")
        del graph.initializers[item.buffer]
        value.name = item.name
        if value.const_value is not None:
            value.const_value.name = item.name
        dims = list(value.shape)
        dims[item.rank_axis] = ir.SymbolicDim(f"{item.module_path}.rank")
        value.shape = ir.Shape(dims)
        graph.register_initializer(value)
        graph.inputs.append(value)


def _fold_weight_transposes(model) -> None:
    """``Transpose`` of a float weight initializer becomes a transposed initializer with a
    readable name (``<param>_t``), instead of an anonymous ``val_12`` from constant folding."""
    import numpy as np
    import onnx_ir as ir

    graph = model.graph
    for node in list(graph):
        if node.op_type != "Transpose" or node.domain not in ("", "ai.onnx"):
            continue
        src = node.inputs[0]
        perm = node.attributes.get("perm")
        if (src is None or src.const_value is None or src.is_graph_input()
                or len(src.shape or ()) != 2 or (perm is not None and list(perm.value) != [1, 0])):
            continue
        array = np.ascontiguousarray(src.const_value.numpy().T)
        name = src.name
        name = name.removeprefix("graphlora_adapters.")
        name = f"{name}_t"
        while name in graph.initializers:
            name += "_"
        tensor = ir.tensor(array, name=name)
        value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(tensor.dtype),
                         const_value=tensor)
        graph.register_initializer(value)
        out = node.outputs[0]
        out.replace_all_uses_with(value, replace_graph_outputs=False)
        if not out.uses() and not out.is_graph_output():
            graph.remove(node, safe=True)
            if not src.uses() and not src.is_graph_output():
                del graph.initializers[src.name]


@contextlib.contextmanager
def _quiet(*loggers: str):
    """Silence the exporter's and optimizer's own chatter (stdout, warnings, log lines below
    ERROR) for the block; failures still raise."""
    quiet = [logging.getLogger(n) for n in loggers]
    levels = [q.level for q in quiet]
    try:
        for q in quiet:
            q.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for q, level in zip(quiet, levels):
            q.setLevel(level)


def _optimize(model) -> None:
    import onnxscript.optimizer

    with _quiet("onnx_ir", "onnxscript"):
        onnxscript.optimizer.optimize(model)


def _name_dynamic_dims(model, args: tuple, kwargs: dict, gm: fx.GraphModule) -> None:
    """Rename the exporter's symbols (``s77``) of input dims 0/1 to ``batch``/``sequence``."""
    import onnx_ir as ir

    try:
        bound = inspect.signature(gm.forward).bind(*args, **kwargs).arguments
    except (TypeError, ValueError):
        return
    rename: dict[str, str] = {}
    for value in model.graph.inputs:
        example = bound.get(value.name)
        if not isinstance(example, torch.Tensor) or value.shape is None:
            continue
        for axis, label in ((0, "batch"), (1, "sequence")):
            if axis >= len(value.shape):
                continue
            if axis == 1 and example.is_floating_point() and example.dim() < 3:
                continue
            dim = value.shape[axis]
            if (isinstance(dim, ir.SymbolicDim) and dim.value and dim.value not in rename
                    and label not in rename.values()):
                rename[dim.value] = label
    if not rename:
        return

    def fix(value) -> None:
        if value is None or value.shape is None:
            return
        dims = [ir.SymbolicDim(rename[d.value]) if isinstance(d, ir.SymbolicDim) and d.value in rename
                else d for d in value.shape]
        value.shape = ir.Shape(dims)

    for value in model.graph.inputs:
        fix(value)
    for value in model.graph.outputs:
        fix(value)
    for node in model.graph.all_nodes():
        for out in node.outputs:
            fix(out)


def output_names(gm: fx.GraphModule) -> list[str] | None:
    """Names of the model's outputs from its pytree output spec (``last_hidden_state``, ...)."""
    from torch.utils import _pytree as pytree

    spec = getattr(gm, "_out_spec", None)
    if spec is None:
        return None
    structure = pytree.tree_unflatten(list(range(spec.num_leaves)), spec)
    names = []
    for path, _ in pytree.tree_flatten_with_path(structure)[0]:
        parts = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path]
        names.append(".".join(parts))
    if all(n.isdigit() or n == "" for n in names):
        names = ["output"] if len(names) == 1 else [f"output_{i}" for i in range(len(names))]
    return names


def _name_outputs(model, gm: fx.GraphModule) -> None:
    names = output_names(gm)
    outputs = model.graph.outputs
    if not names or len(names) != len(outputs) or len(set(names)) != len(names):
        return
    taken = {v.name for n in model.graph for v in n.outputs} | set(model.graph.initializers)
    taken |= {v.name for v in model.graph.inputs}
    for value, name in zip(outputs, names):
        if value.name == name:
            continue
        if name in taken or value.is_graph_input() or value.is_initializer():
            continue
        value.name = name


def _finalise(model, opset: int, lora: str, prepared) -> None:
    from graphlora.version import __version__

    model.opset_imports[""] = opset
    model.graph.opset_imports[""] = opset
    model.ir_version = IR_VERSION if opset >= 21 else min(IR_VERSION, 9)
    model.producer_name = "graphlora"
    model.producer_version = __version__
    model.metadata_props["graphlora.lora"] = lora
    if prepared.adapter is not None:
        model.metadata_props["graphlora.adapter"] = prepared.adapter
    if prepared.lora_inputs:
        model.metadata_props["graphlora.lora_inputs"] = json.dumps(
            [{"name": i.name, "module_path": i.module_path, "which": i.which, "shape": list(i.shape)}
             for i in prepared.lora_inputs]
        )


# ------------------------------------------------------------------------------ saving
def _model_bytes(model) -> int:
    total = 0
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if tensor is not None:
            total += int(tensor.nbytes)
    return total


def save_model(model, path: str | os.PathLike, *, external_data: bool | None = None) -> Path | None:
    """Check and write an ``onnx_ir`` model atomically; returns the external data file, if any.

    With external data the tensors go to ``<name>.<token>.data`` first (a fresh name, so a
    reader of the previous model never sees it change), then the model file is renamed into
    place — the commit point — and every other ``<name>.<token>.data`` is removed: the previous
    model's, and any a crashed export left. The whole write holds the target's lock
    (:func:`graphlora.io.atomic.target_lock`), so two exports to the same path run one after the
    other and the model file always names a data file that exists.
    """
    import onnx_ir as ir

    path = Path(path)
    if path.is_dir():
        raise ExportError(f"export path {path} is a directory; give a file name like model.onnx")
    use_external = bool(external_data) if external_data is not None else (
        _model_bytes(model) > TWO_GB - _EXTERNAL_MARGIN)
    with target_lock(path):
        if not use_external:
            proto = ir.serde.serialize_model(model)
            _check(proto)
            with atomic_write(path) as fh:
                fh.write(proto.SerializeToString())
            _remove_data_files(path, keep=None)
            return None
        import secrets

        data_name = f"{path.name}.{secrets.token_hex(4)}.data"
        data_path = path.parent / data_name
        written: list[int] = []  # inode of the new model file, to tell whether the rename happened
        try:
            with atomic_path(path) as tmp:
                ir.save(model, tmp, external_data=data_name)
                _fsync(data_path)
                _check(str(tmp))
                written.append(os.stat(tmp).st_ino)
        finally:
            # An error after the rename (the commit point: e.g. fsync of the directory) leaves the
            # new model in place, and it needs its data file; before it, the data file is an orphan.
            committed = bool(written) and _inode(path) == written[0]
            if not committed:
                with contextlib.suppress(FileNotFoundError):
                    data_path.unlink()
            else:
                _remove_data_files(path, keep=data_name)
    return data_path


def _remove_data_files(path: Path, keep: str | None) -> None:
    """Delete the external data files of earlier exports to ``path`` (``<name>.<8 hex>.data``,
    exactly the names this module writes) except ``keep``; called holding the target's lock."""
    pattern = re.compile(re.escape(path.name) + r"\.[0-9a-f]{8}\.data")
    for entry in os.listdir(path.parent):
        if entry != keep and pattern.fullmatch(entry):
            with contextlib.suppress(OSError):
                (path.parent / entry).unlink()


def _inode(path: Path) -> int | None:
    try:
        return os.stat(path).st_ino
    except FileNotFoundError:
        return None


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _check(model_or_path) -> None:
    import onnx

    try:
        onnx.checker.check_model(model_or_path, full_check=True)
    except Exception as exc:
        raise ExportError(f"the exported model fails onnx.checker (full_check): {exc}") from exc


def _require_onnx() -> None:  # pragma: no cover - the venv has them
    for pkg in ("onnx", "onnxscript", "onnx_ir"):
        try:
            __import__(pkg)
        except ImportError as exc:
            raise MissingDependencyError(
                f"ONNX export needs the package '{pkg}': pip install {pkg}") from exc
