"""AIMET encodings files onto a graphlora model, and graphlora's encodings into the file AIMET's
``QuantizationSimModel.load_encodings`` reads.

Reading means deciding, for each entry of an AIMET file (parsed by
:mod:`graphlora.io.aimet_format`), which graphlora tensor it is and how its scales are laid out —
and refusing, naming the entry, whenever the file and the model cannot *prove* it. What proves
it:

* **A torch parameter name** (``encoder.layer.0.attention.self.query.weight``; ``sim.export``'s
  files): AIMET's quantizer holds the parameter itself, so the scales are in its own layout —
  ``(out, in / block)`` flattened row-major for an ``nn.Linear`` weight, graphlora's canonical
  layout. Checked: the count must be ``out`` (per channel) or ``out * in / block``.
* **An ONNX tensor name** (``..._0``; ``sim.onnx.export``'s files): only AIMET's ONNX graph says
  what the tensor is, so ``onnx_model=`` is required. The tensor must be an initializer read
  (through any 2-D ``Transpose``) as the ``B`` input of a ``MatMul`` or ``Gemm`` in the scope of
  a linear module the model has; that read fixes its orientation — a MatMul's ``B`` is
  ``(in, out)``, the transpose of the torch weight — and its dims must equal the weight's in that
  orientation. Its scales are in *that tensor's* layout: 1.0.0 flattens block scales from
  ``(in / block, out)``, 2.0.0 gives ``y_scale`` shaped so, with ``axis`` the blocked axis.
  Everything is then transposed to graphlora's ``(out, blocks)``.
* **Module activations**: the torch file names modules (``{module: {"output": {"0": ...}}}``),
  read as ``<module>.output`` / ``<module>.input``; an ONNX tensor is ``<module>.output`` when
  AIMET's graph shows it produced in a leaf module of the model's scope and consumed outside it.

A 0.6.1 entry has no block size: a list of ``out * G`` channels is blocks of ``in / G`` (AIMET's
blocks divide the input dimension exactly; anything else is refused). 1.0.0 entries have no axis:
per-channel scales of a linear weight are AIMET's output channels (its Linear quantizers have no
other), which the count must confirm. Entries for tensors graphlora does not quantize
(embeddings, LayerNorm weights, int32 biases, ops inside a module) are returned in ``skipped``
with the reason, never silently dropped.
"""

from __future__ import annotations

import ast
import math
import os
import re
import warnings
from dataclasses import dataclass, field
from typing import Mapping

import torch

from graphlora.errors import FileFormatError, GraphloraWarning, QuantizationError
from graphlora.io.aimet_format import AimetEntry, read_aimet_file, write_aimet_torch_file
from graphlora.quant import Encoding, get_qtype


@dataclass
class AimetEncodings:
    """What :func:`load_aimet_encodings` read: graphlora encodings by tensor name (weights by
    parameter name, activations ``<module>.output`` / ``<module>.input``), and every entry it
    did not take, by its name in the file, with the reason."""

    encodings: dict[str, Encoding]
    skipped: dict[str, str] = field(default_factory=dict)
    version: str = ""

    def weights(self) -> dict[str, Encoding]:
        """The weight encodings only (what QW-LoRA step 1 applies)."""
        return {k: v for k, v in self.encodings.items() if v.shape}


@dataclass(frozen=True)
class _Weight:
    name: str
    module: str
    out_features: int
    in_features: int
    layout: str  # "out_in" (nn.Linear) or "in_out" (transformers Conv1D)


def _weights(model) -> dict[str, _Weight]:
    out = {}
    for s in model.sites:
        out[s.weight_name] = _Weight(s.weight_name, s.module_path, s.out_features, s.in_features,
                                     "in_out" if s.fan_in_fan_out else "out_in")
    return out


def _modules(model) -> dict[str, str]:
    """Module paths the traced graph ran (path -> class name), from ``nn_module_stack``."""
    from graphlora.sites import _normalise_stack_path

    paths: dict[str, str] = {}
    for node in model.graph_module.graph.nodes:
        for path, cls in (node.meta.get("nn_module_stack") or {}).values():
            paths.setdefault(_normalise_stack_path(path), cls if isinstance(cls, str) else cls.__name__)
    return paths


def _is_leaf(path: str, modules: Mapping[str, str]) -> bool:
    return bool(path) and path in modules and not any(m.startswith(path + ".") for m in modules)


# ----------------------------------------------------------------------------- AIMET's ONNX graph
class _OnnxIndex:
    """What AIMET's ONNX model says about names: initializer dims, producers, consumers, scopes."""

    def __init__(self, path: str | os.PathLike):
        import onnx

        try:
            model = onnx.load(os.fspath(path), load_external_data=False)
        except Exception as exc:  # protobuf DecodeError, OSError
            raise FileFormatError(f"cannot read AIMET's ONNX model {os.fspath(path)!r}: {exc}") from None
        g = model.graph
        self.path = os.fspath(path)
        self.dims = {i.name: tuple(int(d) for d in i.dims) for i in g.initializer}
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
        for node in g.node:
            for o in node.output:
                self.producer[o] = node
            for i, name in enumerate(node.input):
                self.consumers.setdefault(name, []).append((node, i))
        self.outputs = {o.name for o in g.output}

    @staticmethod
    def scope(node) -> str | None:
        """The module path a node ran in: the dynamo exporter's ``name_scopes`` metadata (last
        entry is the op), or the node name AIMET's TorchScript export gives a module's nodes
        (``<module>`` / ``<module>#<n>.end``)."""
        for prop in node.metadata_props:
            if prop.key == "pkg.torch.onnx.name_scopes":
                try:
                    scopes = ast.literal_eval(prop.value)
                except (ValueError, SyntaxError):
                    return None
                return scopes[-2] if isinstance(scopes, list) and len(scopes) >= 2 else None
        name = re.sub(r"#\d+(\.end)?$", "", node.name)
        return name if name and "/" not in name and not name.startswith("node_") else None

    def matmul_read(self, name: str) -> tuple[object, bool] | None:
        """``(consumer, transposed)`` when initializer ``name`` is read as the B input of exactly
        one MatMul/Gemm (through 2-D Transposes); ``transposed`` says the consumer reads the
        tensor's transpose as its ``(in, out)`` B matrix."""
        found = []

        def walk(value: str, flipped: bool) -> None:
            for node, index in self.consumers.get(value, []):
                perm = [a for a in node.attribute if a.name == "perm"]
                if node.op_type == "Transpose" and (not perm or list(perm[0].ints) == [1, 0]):
                    walk(node.output[0], not flipped)
                elif node.op_type == "MatMul" and index == 1:
                    found.append((node, flipped))
                elif node.op_type == "Gemm" and index == 1:
                    trans_b = any(a.name == "transB" and a.i for a in node.attribute)
                    found.append((node, flipped != trans_b))
                else:
                    found.append((node, None))

        walk(name, False)
        if len(found) != 1 or found[0][1] is None:
            return None
        return found[0]


# ----------------------------------------------------------------------------- reading
def load_aimet_encodings(model, path: str | os.PathLike, *,
                         onnx_model: str | os.PathLike | None = None) -> AimetEncodings:
    """Read an AIMET encodings file (0.6.1, 1.0.0 or 2.0.0, from ``sim.export`` or
    ``sim.onnx.export``) onto ``model`` (a LoraModel), exactly.

    ``onnx_model`` is the ``.onnx`` AIMET wrote beside the file; it is needed for entries named
    by ONNX tensor (every name in ``sim.onnx.export``'s files, activations in ``sim.export``'s).
    Raises a :class:`~graphlora.errors.FileFormatError` naming the entry when its layout cannot
    be proven (see the module docstring); returns the encodings by graphlora name, and what it
    skipped, with why.
    """
    parsed = read_aimet_file(path)
    index = _OnnxIndex(onnx_model) if onnx_model is not None else None
    weights, modules = _weights(model), _modules(model)
    result = AimetEncodings({}, {}, parsed.version)
    for entry in parsed.entries:
        try:
            name, enc = _map(entry, weights, modules, index)
        except _Skip as skip:
            result.skipped[entry.name] = str(skip)
            continue
        except QuantizationError as exc:
            raise FileFormatError(f"{parsed.path!r}: {entry.where}: {exc}") from None
        except FileFormatError as exc:
            raise FileFormatError(f"{parsed.path!r}: {exc}") from None
        if name in result.encodings:
            raise FileFormatError(f"{parsed.path!r}: {entry.where} and another entry both map to {name!r}")
        result.encodings[name] = enc
    return result


class _Skip(Exception):
    """An entry graphlora does not take (with the reason)."""


def _map(entry: AimetEntry, weights: dict[str, _Weight], modules: dict[str, str],
         index: _OnnxIndex | None) -> tuple[str, Encoding]:
    if entry.dtype != "int":
        raise _Skip(f"{entry.dtype} (not integer) quantization")
    if entry.bitwidth == 32:
        raise _Skip("an int32 (bias) encoding: graphlora keeps biases in float")
    if entry.module is not None:  # the torch file's activations
        if entry.module not in modules:
            raise _Skip(f"module {entry.module!r} is not in the model")
        return entry.name, _activation(entry, entry.name)
    weight = weights.get(entry.name)
    if weight is not None:
        return weight.name, _weight_encoding(entry, weight, "torch")
    if index is None:
        stem = re.sub(r"_\d+$", "", entry.name)
        if stem in weights:
            raise FileFormatError(
                f"{entry.where} is an ONNX tensor (by its name, the MatMul weight of "
                f"{stem!r}, perhaps transposed): its layout cannot be proven without the ONNX "
                "model AIMET exported with it; pass onnx_model=...")
        if entry.section == "param":
            raise _Skip("not a linear weight graphlora quantizes")
        raise _Skip("an ONNX tensor name; pass onnx_model=... to map it to a module")
    if entry.name in index.dims:
        return _onnx_weight(entry, weights, index)
    if entry.section == "param":
        raise _Skip("not an initializer of the ONNX model")
    return _onnx_activation(entry, modules, index)


def _onnx_weight(entry: AimetEntry, weights: dict[str, _Weight], index: _OnnxIndex):
    dims = index.dims[entry.name]
    read = index.matmul_read(entry.name)
    if read is None:
        raise _Skip("an initializer not read as a MatMul/Gemm weight (not a linear site)")
    consumer, transposed = read
    scope = index.scope(consumer)
    candidates = [w for w in weights.values() if w.module == scope]
    if not candidates:
        raise _Skip(f"read by {consumer.op_type} {consumer.name!r} in scope {scope!r}, which is "
                    "not a linear site of the model")
    (weight,) = candidates
    # the MatMul reads B as (in, out); `transposed` means the tensor itself is (out, in)
    layout = "torch_ck" if transposed else "onnx_kc"
    expected = (weight.out_features, weight.in_features) if transposed else (weight.in_features, weight.out_features)
    if dims != expected:
        raise FileFormatError(
            f"{entry.where}: ONNX initializer dims {dims} do not match {weight.name!r} read as "
            f"{'(out, in)' if transposed else '(in, out)'} {expected}")
    return weight.name, _weight_encoding(entry, weight, layout)


def _onnx_activation(entry: AimetEntry, modules: dict[str, str], index: _OnnxIndex):
    node = index.producer.get(entry.name)
    if node is None:
        if entry.name in index.dims:
            raise _Skip("an initializer, not an activation")
        raise _Skip("a graph input or a tensor the ONNX model does not produce")
    scope = index.scope(node)
    if scope is None or not _is_leaf(scope, modules):
        raise _Skip(f"computed by {node.op_type} {node.name!r} inside {scope or 'the model'!r}, not "
                    "a module's output")
    inside = [c for c, _ in index.consumers.get(entry.name, []) if index.scope(c) == scope]
    if inside:
        raise _Skip(f"an intermediate value of module {scope!r} (read again by {inside[0].name!r})")
    return f"{scope}.output", _activation(entry, f"{scope}.output")


def _qtype(entry: AimetEntry):
    if entry.bitwidth not in (4, 8, 16):
        raise QuantizationError(f"{entry.bitwidth}-bit integer encodings have no graphlora qtype")
    return get_qtype(("int" if entry.signed else "uint") + str(entry.bitwidth))


def _activation(entry: AimetEntry, name: str) -> Encoding:
    if entry.scale.numel() != 1:
        raise FileFormatError(f"{entry.where}: an activation encoding with {entry.scale.numel()} "
                              "scales (graphlora quantizes activations per tensor)")
    qt = _qtype(entry)
    zp = entry.zero_point
    zp = None if zp is None or (qt.signed and int(zp.reshape(-1)[0]) == 0) else zp.reshape(()).to(torch.int32)
    if zp is None and not qt.signed:
        zp = torch.tensor(2 ** (qt.bits - 1), dtype=torch.int32)
    return Encoding(qt, entry.scale.reshape(()), zp, None, None, (), entry.symmetric, None, name)


def _weight_encoding(entry: AimetEntry, weight: _Weight, layout: str) -> Encoding:
    """An Encoding in graphlora's canonical layout from an entry whose scales are laid out per
    ``layout``: ``torch`` (the parameter's own), ``torch_ck`` ((out, in) ONNX tensor) or
    ``onnx_kc`` ((in, out) ONNX tensor)."""
    if weight.layout != "out_in" and layout == "torch":
        raise FileFormatError(f"{entry.where}: {weight.name!r} is stored (in, out) (transformers "
                              "Conv1D); AIMET's layout for it is not known, refusing")
    c, k = weight.out_features, weight.in_features
    shape = (c, k) if weight.layout == "out_in" else (k, c)
    axis = 0 if weight.layout == "out_in" else 1
    qt = _qtype(entry)
    s, z = entry.scale, entry.zero_point
    n = s.numel()
    block = None
    if n == 1:
        scale, zp, axis_out = s.reshape(()), None if z is None else z.reshape(()), None
    elif entry.version == "2.0.0":
        scale, zp, block = _layout_2(entry, layout, c, k)
        axis_out = axis
    else:
        groups = n // c if n % c == 0 else 0
        if entry.enc_type == "PER_BLOCK":
            block = entry.block_size
            if groups != math.ceil(k / block):
                raise FileFormatError(f"{entry.where}: {n} block scales do not fit {weight.name!r} "
                                      f"({c} outputs x {k} inputs in blocks of {block})")
        elif groups > 1:  # 0.6.1: out * G channels are blocks of in / G (AIMET's divide exactly)
            if k % groups:
                raise FileFormatError(f"{entry.where}: {n} scales for {weight.name!r} ({c} x {k}): "
                                      f"not {c} channels, nor blocks dividing its {k} inputs")
            block = k // groups
        elif groups != 1:
            raise FileFormatError(f"{entry.where}: {n} scales do not fit {weight.name!r} "
                                  f"({c} outputs x {k} inputs): the layout cannot be proven")
        if block is None:
            scale, zp = s.reshape(c), None if z is None else z.reshape(c)
        elif layout == "onnx_kc":
            g = math.ceil(k / block)
            scale = s.reshape(g, c).t().contiguous()
            zp = None if z is None else z.reshape(g, c).t().contiguous()
        else:
            scale, zp = s.reshape(c, -1), None if z is None else z.reshape(c, -1)
        axis_out = axis
    if zp is not None and qt.signed and bool((zp == 0).all()):
        zp = None
    if zp is not None:
        zp = zp.to(torch.int32)
    elif not qt.signed:
        zp = torch.full(scale.shape, 2 ** (qt.bits - 1), dtype=torch.int32)
    return Encoding(qt, scale.to(torch.float32), zp, axis_out, block, shape, entry.symmetric, None,
                    weight.name)


def _layout_2(entry: AimetEntry, layout: str, c: int, k: int):
    """2.0.0: ``y_scale`` has the ONNX DequantizeLinear scale shape of the tensor; ``axis`` is
    the channel axis (per channel) or the blocked axis (per block)."""
    s, z, axis, block = entry.scale, entry.zero_point, entry.axis, entry.block_size
    out_axis, in_axis = (1, 0) if layout == "onnx_kc" else (0, 1)
    if block is None:
        if s.dim() != 1 or s.numel() != c or axis != out_axis:
            raise FileFormatError(
                f"{entry.where}: per-channel y_scale of shape {tuple(s.shape)} on axis {axis}; the "
                f"weight's output channels ({c}) are axis {out_axis} of this tensor")
        return s, z, None
    g = math.ceil(k / block)
    want = (g, c) if layout == "onnx_kc" else (c, g)
    if axis != in_axis or tuple(s.shape) != want:
        raise FileFormatError(
            f"{entry.where}: y_scale of shape {tuple(s.shape)} blocked on axis {axis}; graphlora's "
            f"blocks run along the input axis ({in_axis} here), which needs shape {want}")
    if layout == "onnx_kc":
        return s.t().contiguous(), None if z is None else z.t().contiguous(), block
    return s, z, block


# ----------------------------------------------------------------------------- writing
def save_aimet_encodings(encodings, path: str | os.PathLike) -> dict[str, str]:
    """Write ``encodings`` (a dict by graphlora tensor name, or a LoraModel) as the 0.6.1 torch
    file AIMET's ``QuantizationSimModel.load_encodings`` reads (``sim.export``'s
    ``<prefix>_torch.encodings`` layout), for the same model AIMET wraps.

    Weights go under their parameter name (``(out, in)`` weights: AIMET's quantizer layout),
    ``<module>.output`` / ``<module>.input`` activations under their module. Encodings AIMET has
    no counterpart for — LoRA tensors (its QuantizationSimModel wraps the base model), a second
    use of a module (``path#1``), nf4 and fp8, ``(in, out)`` weights — are left out; returns
    them with the reason (and warns). Restricted-grid encodings are written as AIMET's
    symmetric grid, whose extra negative code AIMET may use for values beyond the range.
    """
    if hasattr(encodings, "encodings") and callable(encodings.encodings):
        encodings = encodings.encodings()
    params: dict[str, Encoding] = {}
    acts: dict[tuple[str, str, int], Encoding] = {}
    skipped: dict[str, str] = {}
    for name, enc in sorted(encodings.items()):
        why = _unwritable(name, enc)
        if why:
            skipped[name] = why
            continue
        m = re.fullmatch(r"(.+)\.(input|output)(?:\.(\d+))?", name)
        if m and not enc.shape:
            acts[(m.group(1), m.group(2), int(m.group(3) or 0))] = enc
        elif enc.shape:
            params[name] = enc
        else:
            skipped[name] = "an activation name AIMET has no quantizer for"
    if skipped:
        warnings.warn(f"save_aimet_encodings left out {len(skipped)} encoding(s) AIMET cannot hold "
                      f"(first: {next(iter(skipped))}: {next(iter(skipped.values()))})",
                      GraphloraWarning, stacklevel=2)
    write_aimet_torch_file(path, params, acts)
    return skipped


def _unwritable(name: str, enc: Encoding) -> str | None:
    if ".lora_" in name:
        return "a LoRA tensor: AIMET's QuantizationSimModel wraps the base model"
    if "#" in name:
        return "a second use of a module: AIMET has one quantizer per module"
    if enc.qtype.kind != "int":
        return f"{enc.qtype.name}: AIMET has no such encoding"
    if enc.shape and len(enc.shape) == 2 and enc.axis == 1 and enc.scale.dim() > 0:
        return "an (in, out) weight (Conv1D): AIMET's layout for it is not known"
    return None
