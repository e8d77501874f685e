"""Canonical text of ONNX models: nodes in topological order, values named by their producer's id."""

from __future__ import annotations

import ast
from typing import Any

from graphlora.diff._common import (
    HEADER,
    ANONYMOUS_NAME,
    INSERTED_ROLES,
    SymNamer,
    attr_local,
    attr_owner,
    clean_repr,
    comment,
    join_scopes,
    sanitize_id,
    short_dtype,
)


def _onnx_dtype(elem_type: int) -> str:
    import onnx

    try:
        name = onnx.TensorProto.DataType.Name(elem_type).lower()
    except ValueError:
        return f"dtype{elem_type}"
    return {"float": "float32", "double": "float64", "undefined": "?"}.get(name, name.replace("float8", "float8_"))


def _with_inferred_types(model: Any) -> Any:
    """The model with ONNX shape inference applied, so hand-built graphs also show value types.
    Inference never blocks rendering: on any failure the model is used as it is."""
    import onnx

    try:
        return onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False)
    except Exception:  # noqa: BLE001 - custom domains, huge models, ...: render without inferred types
        return model


class OnnxRenderer:
    """Renders an ONNX graph: nodes in topological order, values named by their producer's id."""

    def __init__(self, model: Any) -> None:
        self.model = _with_inferred_types(model)
        self.graph = self.model.graph
        self.syms = SymNamer()

    def type_of(self, vtype: Any) -> str:
        kind = vtype.WhichOneof("value")
        if kind != "tensor_type":
            return kind or ""
        tt = vtype.tensor_type
        dtype = short_dtype(_onnx_dtype(tt.elem_type))
        if not tt.HasField("shape"):
            return f"{dtype}[?]"
        dims = []
        for d in tt.shape.dim:
            if d.HasField("dim_value"):
                dims.append(str(d.dim_value))
            elif d.HasField("dim_param"):
                dims.append(self.syms.expr(d.dim_param))
            else:
                dims.append("?")
        return f"{dtype}[{','.join(dims)}]"

    @staticmethod
    def module_path(node: Any) -> str:
        props = {p.key: p.value for p in node.metadata_props}
        given = props.get("graphlora.module_path")
        if given is not None:
            return given
        scopes = props.get("pkg.torch.onnx.name_scopes")
        if scopes:
            try:
                parsed = ast.literal_eval(scopes)
                if isinstance(parsed, (list, tuple)) and parsed:
                    return join_scopes(str(s) for s in parsed[:-1])
            except (ValueError, SyntaxError):
                pass
        namespace = props.get("namespace")
        if namespace:
            names = [item.split(":", 1)[0].strip() for item in namespace.split("/")]
            return join_scopes(names[:-1])
        if "/" in node.name:  # TorchScript exporter: /model/layers.0/self_attn/q_proj/MatMul
            return join_scopes(node.name.strip("/").split("/")[:-1])
        return ""

    def attribute(self, attr: Any) -> str:
        import onnx

        helper_value = attr.type
        A = onnx.AttributeProto
        if helper_value == A.INT:
            return str(attr.i)
        if helper_value == A.FLOAT:
            return repr(attr.f)
        if helper_value == A.STRING:
            return clean_repr(attr.s.decode("utf-8", "replace"))
        if helper_value == A.INTS:
            return "[" + ",".join(str(v) for v in attr.ints) + "]"
        if helper_value == A.FLOATS:
            return "[" + ",".join(repr(v) for v in attr.floats) + "]"
        if helper_value == A.STRINGS:
            return "[" + ",".join(clean_repr(v.decode("utf-8", "replace")) for v in attr.strings) + "]"
        if helper_value == A.TENSOR:
            return f"tensor({self.tensor_proto_type(attr.t)})"
        if helper_value == A.GRAPH:
            return f"graph({len(attr.g.node)} nodes)"
        if helper_value == A.GRAPHS:
            return "graphs(" + ",".join(str(len(g.node)) for g in attr.graphs) + ")"
        if attr.ref_attr_name:
            return f"@{attr.ref_attr_name}"
        return "?"

    @staticmethod
    def tensor_proto_type(t: Any) -> str:
        return f"{short_dtype(_onnx_dtype(t.data_type))}[{','.join(str(d) for d in t.dims)}]"

    def _order(self) -> list[Any]:
        """Nodes in topological order, stable with respect to the file's order."""
        import heapq

        nodes = list(self.graph.node)
        available = {i.name for i in self.graph.input} | {t.name for t in self.graph.initializer} | {""}
        producers: dict[str, int] = {}
        for idx, node in enumerate(nodes):
            for name in node.output:
                producers.setdefault(name, idx)
        waiting: dict[int, int] = {}
        consumers: dict[int, list[int]] = {}
        ready: list[int] = []
        for idx, node in enumerate(nodes):
            deps = {producers[n] for n in node.input if n not in available and n in producers and producers[n] != idx}
            waiting[idx] = len(deps)
            for dep in deps:
                consumers.setdefault(dep, []).append(idx)
            if not deps:
                heapq.heappush(ready, idx)
        order = []
        while ready:
            idx = heapq.heappop(ready)
            order.append(idx)
            for c in consumers.get(idx, ()):
                waiting[c] -= 1
                if waiting[c] == 0:
                    heapq.heappush(ready, c)
        if len(order) < len(nodes):  # a cycle: keep the rest in file order
            seen = set(order)
            order.extend(i for i in range(len(nodes)) if i not in seen)
        return [nodes[i] for i in order]

    def render(self) -> str:
        g = self.graph
        lines = [f"{HEADER} onnx"]
        opsets = sorted(f"{o.domain or 'ai.onnx'}:{o.version}" for o in self.model.opset_import)
        lines.append("opset = " + " ".join(opsets))
        types: dict[str, Any] = {}
        for vi in list(g.input) + list(g.value_info) + list(g.output):
            types[vi.name] = vi.type
        inits = {t.name: t for t in g.initializer}
        refs: dict[str, str] = {"": "_"}
        used: set[str] = set()

        def unique(candidate: str) -> str:
            if candidate in used:
                k = 1
                while f"{candidate}#{k}" in used:
                    k += 1
                candidate = f"{candidate}#{k}"
            used.add(candidate)
            return candidate

        for vi in g.input:
            if vi.name in inits:
                continue
            ident = unique(sanitize_id(vi.name))
            refs[vi.name] = f"%{ident}"
            lines.append(f"{ident} = input :: {self.type_of(vi.type)}")

        order = self._order()
        # pass 1: node ids (they depend only on the node itself and earlier nodes of its path)
        counters: dict[str, int] = {}
        node_ids = []
        for node in order:
            props = {p.key: p.value for p in node.metadata_props}
            path = sanitize_id(self.module_path(node))
            op = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
            role = props.get("graphlora.role")
            key = role if role in INSERTED_ROLES else op
            key = f"{path}/{key}" if path else key
            n = counters.get(key, 0)
            counters[key] = n + 1
            node_ids.append(unique(f"{key}#{n}"))

        # pass 2: render, naming each initializer just before its first consumer
        for node, ident in zip(order, node_ids):
            for k, name in enumerate(node.input):
                if name in refs or name not in inits:
                    continue
                if ANONYMOUS_NAME.match(name):
                    init_id = unique(f"{ident}:in{k}")
                    head = "initializer"
                else:
                    owner = sanitize_id(attr_owner(name))
                    local = sanitize_id(attr_local(name, owner))
                    init_id = unique(f"{owner}/{local}" if owner else local)
                    head = f"initializer {name}"
                refs[name] = f"%{init_id}"
                lines.append(f"{init_id} = {head} :: {self.tensor_proto_type(inits[name])}")
            op = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
            attrs = sorted(node.attribute, key=lambda a: a.name)
            if attrs:
                op += "[" + ", ".join(f"{a.name}={self.attribute(a)}" for a in attrs) + "]"
            args = ", ".join(refs.get(name, f"%?{sanitize_id(name)}") for name in node.input)
            for k, name in enumerate(node.output):
                if name:
                    refs[name] = f"%{ident}" if k == 0 else f"%{ident}:{k}"
            out_types = [self.type_of(types[n]) if n in types else "?" for n in node.output]
            line = f"{ident} = {op}({args})"
            if any(t != "?" for t in out_types):
                line += " :: " + (out_types[0] if len(out_types) == 1 else "(" + ", ".join(out_types) + ")")
            info = {p.key[len("graphlora.") :]: p.value for p in node.metadata_props if p.key.startswith("graphlora.")}
            if node.op_type == "DequantizeLinear" and node.input and node.input[0] in inits:
                q = inits[node.input[0]]
                info.setdefault("role", "dequant")
                info.setdefault("tensor", node.input[0])
                info.setdefault("qtype", _onnx_dtype(q.data_type))
                for a in node.attribute:
                    if a.name in ("axis", "block_size"):
                        info.setdefault(a.name, a.i)
            lines.append(line + comment(info))

        outputs = []
        for vi in g.output:
            ref = refs.get(vi.name, f"%?{sanitize_id(vi.name)}")
            outputs.append(ref if ANONYMOUS_NAME.match(vi.name) else f"{sanitize_id(vi.name)}={ref}")
        lines.append(f"{unique('output')} = output(" + ", ".join(outputs) + ")")
        for fn in self.model.functions:
            lines.append(f"function:{fn.domain}.{fn.name} = function({len(fn.node)} nodes)")
        return "\n".join(lines) + "\n"
