"""The ``pkg.graphlora`` ONNX dialect: graphlora's custom ops spelled as ONNX nodes, one to one.

Why a dialect: ``torch.onnx.export`` translates one FX node at a time and cannot change the dtype
or layout of an initializer (packed ``uint8`` bytes must become an ``INT4`` tensor, a ``(out, in)``
weight must become ``(K, N)`` for ``MatMul``), nor look at the consumer of a node (NF4 lowers to a
contrib ``MatMulBnb4`` that *replaces* the MatMul). So export happens in two steps:

1. every ``torch.ops.graphlora.*`` call becomes a node of this dialect — same name, tensor
   arguments as inputs (in schema order, ``None`` for an absent optional), every other argument as
   an attribute of the same name (``ScalarType`` as the ONNX data type number, ``bool`` as 0/1,
   ``None`` omitted);
2. :mod:`graphlora.onnx.lowering` rewrites each dialect node into standard ONNX (or the one
   onnxruntime contrib op NF4 needs), seeing the whole graph.

Schemas are derived from the torch op schemas in :mod:`graphlora.quant.ops`, so a new op there
gets a dialect node without changes here; the lowering then refuses it with a clear error until
it is taught the mapping. Registering the schemas with ``onnx.defs`` is needed only because
onnxscript builds nodes from schemas; no exported model ever contains a dialect node.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from graphlora.quant import ops as gl_ops

DOMAIN = "pkg.graphlora"
VERSION = 1

_ANY_TENSOR = [
    f"tensor({t})"
    for t in (
        "float", "float16", "bfloat16", "double", "uint8", "int8", "uint16", "int16", "int32",
        "int64", "bool", "float8e4m3fn",
    )
]


@dataclass(frozen=True)
class DialectOp:
    """One graphlora op as a dialect node: which schema arguments are inputs, which attributes."""

    name: str
    overload: Any  # torch OpOverload
    inputs: tuple[tuple[str, bool], ...]  # (argument name, optional)
    attributes: tuple[tuple[str, str], ...]  # (argument name, kind: int | ints | bool | dtype)

    @property
    def argument_names(self) -> list[str]:
        return [a.name for a in self.overload._schema.arguments]


def _kind(arg) -> str | None:
    t = str(arg.type)
    if "Tensor" in t:
        return None
    if "List[int]" in t:
        return "ints"
    if t.endswith("bool") or t == "bool":
        return "bool"
    if arg.name == "dtype":  # ScalarType prints as int
        return "dtype"
    if "int" in t:
        return "int"
    raise TypeError(f"graphlora op argument {arg.name!r} has unsupported type {t}")


def dialect_ops() -> dict[str, DialectOp]:
    """Every graphlora custom op as a :class:`DialectOp`, keyed by op name."""
    table = {}
    for name, overload in gl_ops.OPS.items():
        inputs, attrs = [], []
        for arg in overload._schema.arguments:
            kind = _kind(arg)
            if kind is None:
                inputs.append((arg.name, "Optional" in str(arg.type)))
            else:
                attrs.append((arg.name, kind))
        table[name] = DialectOp(name, overload, tuple(inputs), tuple(attrs))
    return table


_REGISTERED = False


def register_schemas() -> None:
    """Register one ``onnx.defs`` schema per dialect op (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    import onnx
    from onnx.defs import OpSchema

    attr_types = {
        "int": OpSchema.AttrType.INT,
        "bool": OpSchema.AttrType.INT,
        "dtype": OpSchema.AttrType.INT,
        "ints": OpSchema.AttrType.INTS,
    }
    for op in dialect_ops().values():
        if onnx.defs.has(op.name, VERSION, DOMAIN):
            continue
        params, constraints = [], []
        for i, (arg, optional) in enumerate(op.inputs):
            option = (OpSchema.FormalParameterOption.Optional if optional
                      else OpSchema.FormalParameterOption.Single)
            params.append(OpSchema.FormalParameter(arg, f"T{i}", param_option=option))
            constraints.append((f"T{i}", _ANY_TENSOR, ""))
        constraints.append(("Tout", _ANY_TENSOR, ""))
        schema = OpSchema(
            op.name, DOMAIN, VERSION,
            doc=f"graphlora::{op.name} (see graphlora.quant.ops); lowered before saving.",
            inputs=params,
            outputs=[OpSchema.FormalParameter("y", "Tout")],
            type_constraints=constraints,
            attributes=[OpSchema.Attribute(a, attr_types[k], "", required=False)
                        for a, k in op.attributes],
        )
        onnx.defs.register_schema(schema)
    _REGISTERED = True


def _attribute_value(kind: str, value: Any) -> Any:
    if kind == "ints":
        return [int(v) for v in value]
    if kind == "bool":
        return int(bool(value))
    if kind == "dtype":
        return _onnx_dtype(value)
    return int(value)


def _onnx_dtype(value: Any) -> int:
    """ONNX data type number of a dtype as torch.onnx hands it over (ir.DataType or torch)."""
    if isinstance(value, torch.dtype):
        import onnx_ir as ir

        mapping = {torch.float32: ir.DataType.FLOAT, torch.float16: ir.DataType.FLOAT16,
                   torch.bfloat16: ir.DataType.BFLOAT16, torch.float64: ir.DataType.DOUBLE,
                   torch.int8: ir.DataType.INT8, torch.uint8: ir.DataType.UINT8,
                   torch.int16: ir.DataType.INT16, torch.int32: ir.DataType.INT32}
        return int(mapping[value])
    return int(value)


def _translation(op: DialectOp) -> Callable:
    import onnxscript

    opset = onnxscript.values.Opset(DOMAIN, VERSION)
    node_op = onnxscript.values.Op(opset, op.name)
    names = op.argument_names
    input_names = [n for n, _ in op.inputs]
    kinds = dict(op.attributes)

    def translate(*args, **kwargs):
        bound = dict(zip(names, args))
        bound.update(kwargs)
        inputs = [bound.get(n) for n in input_names]
        while inputs and inputs[-1] is None:
            inputs.pop()
        attrs = {n: _attribute_value(k, bound[n]) for n, k in kinds.items()
                 if bound.get(n) is not None}
        return node_op(*inputs, **attrs)

    translate.__name__ = f"graphlora_{op.name}"
    translate.__signature__ = inspect.Signature(
        [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in names]
    )
    return translate


def translation_table() -> dict[Any, Callable]:
    """``custom_translation_table`` for ``torch.onnx.export``: graphlora op -> dialect node."""
    register_schemas()
    return {op.overload: _translation(op) for op in dialect_ops().values()}
