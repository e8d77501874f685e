"""Canonical text of FX graphs: local node ids, module paths from metadata, shapes from meta vals."""

from __future__ import annotations

import re
from typing import Any

from graphlora.diff._common import (
    HEADER,
    ADDRESS,
    INSERTED_ROLES,
    SymNamer,
    attr_local,
    attr_owner,
    clean_repr,
    comment,
    dtype_name,
    path_of,
    sanitize_id,
    short_dtype,
)
from graphlora.meta import META_KEY


class FxRenderer:
    """Renders one FX graph (and its higher-order-op subgraphs) into canonical lines."""

    def __init__(self, root: Any, syms: SymNamer) -> None:
        self.root = root  # the owning nn.Module, or None
        self.syms = syms
        self._target_cache: dict[Any, tuple[str, str]] = {}
        self._path_cache: dict[str, str] = {}
        self._flat_modules: dict[str, str] | None = None

    # --- module paths -----------------------------------------------------------------------------

    def _flat_names(self) -> dict[str, str]:
        if self._flat_modules is None:
            names: dict[str, str] = {}
            if self.root is not None:
                for name, _ in self.root.named_modules():
                    if name:
                        names[name.replace(".", "_")] = name
            self._flat_modules = names
        return self._flat_modules

    def _normalize_path(self, raw: str) -> str:
        """Normalise the path spellings torch versions put in ``nn_module_stack``."""
        cached = self._path_cache.get(raw)
        if cached is not None:
            return cached
        path = raw
        if path.startswith("_empty_nn_module_stack"):
            path = ""
        # L['self'].encoder.layer[0] / getattr(L['self'].encoder, 'layer')
        path = re.sub(r"getattr\((.*?),\s*'([^']*)'\)", r"\1.\2", path)
        path = re.sub(r"^L\[['\"]self['\"]\]\.?", "", path)
        path = re.sub(r"\[['\"]?([^\]'\"]+)['\"]?\]", r".\1", path)
        if path.startswith("L__self__"):
            flat = path[len("L__self__") :].lstrip("_")
            path = self._flat_names().get(flat, flat)
        path = path.strip(".")
        self._path_cache[raw] = path
        return path

    def module_path(self, node: Any) -> str:
        info = node.meta.get(META_KEY)
        if info:
            given = info.get("module_path")
            if given is not None:
                return str(given)
        if node.op == "call_module":
            return str(node.target)
        stack = node.meta.get("nn_module_stack")
        if stack:
            entry = next(reversed(stack.values()))
            raw = entry[0] if isinstance(entry, tuple) else entry
            return self._normalize_path(str(raw))
        if node.op == "get_attr":
            return attr_owner(str(node.target))
        return ""

    # --- targets ----------------------------------------------------------------------------------

    def target(self, node: Any) -> tuple[str, str]:
        """(display name, short key) of a call_function/call_method/call_module target."""
        if node.op == "call_method":
            return str(node.target), str(node.target)
        if node.op == "call_module":
            module = _resolve_attr(self.root, str(node.target))
            kind = type(module).__name__ if module is not _MISSING else "module"
            return str(node.target), kind
        fn = node.target
        try:
            cached = self._target_cache.get(fn)
        except TypeError:
            cached = None
        if cached is not None:
            return cached
        result = _describe_callable(fn)
        try:
            self._target_cache[fn] = result
        except TypeError:
            pass
        return result

    # --- values -----------------------------------------------------------------------------------

    def tensor_type(self, value: Any) -> str:
        dims = []
        for d in value.shape:
            dims.append(str(d) if type(d) is int else self.syms.sym(d))
        return f"{short_dtype(dtype_name(value.dtype))}[{','.join(dims)}]"

    def value_type(self, value: Any) -> str:
        import torch

        if isinstance(value, torch.Tensor):
            return self.tensor_type(value)
        if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)):
            return f"sym {self.syms.sym(value)}"
        if isinstance(value, (list, tuple)):
            return "(" + ", ".join(self.value_type(v) for v in value) + ")"
        if value is None or isinstance(value, (bool, int, float, str)):
            return repr(value)
        return type(value).__name__

    def node_type(self, node: Any) -> str:
        meta = node.meta
        if "val" in meta:
            val = meta["val"]
            if val is None:
                return ""
            return self.value_type(val)
        tm = meta.get("tensor_meta")
        if tm is not None and hasattr(tm, "shape") and hasattr(tm, "dtype"):
            dims = [str(d) if type(d) is int else self.syms.sym(d) for d in tm.shape]
            return f"{short_dtype(dtype_name(tm.dtype))}[{','.join(dims)}]"
        return ""

    def attr_type(self, node: Any) -> str:
        """Type of a get_attr node: kind (param/buffer/const/subgraph/module) plus dtype and shape."""
        import torch
        import torch.fx as fx

        target = str(node.target)
        obj = _resolve_attr(self.root, target)
        if obj is _MISSING:
            found = self.node_type(node)
            return f"attr {found}" if found else "attr ?"
        if isinstance(obj, torch.Tensor):
            if isinstance(obj, torch.nn.Parameter):
                kind = "param"
            else:
                owner = _resolve_attr(self.root, target.rpartition(".")[0]) if "." in target else self.root
                buffers = getattr(owner, "_buffers", None) or {}
                kind = "buffer" if target.rsplit(".", 1)[-1] in buffers else "const"
            return f"{kind} {self.tensor_type(obj)}"
        if isinstance(obj, fx.GraphModule):
            return "subgraph"
        if isinstance(obj, torch.nn.Module):
            return f"module {type(obj).__name__}"
        return type(obj).__name__

    def module_tensors(self, target: str) -> str:
        """``[weight=f32[3,4], bias=f32[3]]``: a called module's own parameters and buffers, so a
        symbolic_trace graph (no shapes in meta) still shows what a module holds."""
        import torch

        module = _resolve_attr(self.root, target)
        if not isinstance(module, torch.nn.Module):
            return ""
        tensors = [
            f"{name}={self.tensor_type(t)}"
            for name, t in list(module._parameters.items()) + list(module._buffers.items())
            if t is not None
        ]
        return "[" + ", ".join(tensors) + "]" if tensors else ""

    # --- arguments --------------------------------------------------------------------------------

    def arg(self, value: Any, ids: dict[Any, str]) -> str:
        import torch
        import torch.fx as fx

        if isinstance(value, fx.Node):
            ref = ids.get(value)
            return f"%{ref}" if ref is not None else f"%?{value.name}"
        if value is None or isinstance(value, (bool, int)):
            return str(value)
        if isinstance(value, float):
            return repr(value)
        if isinstance(value, str):
            return clean_repr(value)
        if isinstance(value, list):
            return "[" + ", ".join(self.arg(v, ids) for v in value) + "]"
        if isinstance(value, tuple):
            inner = ", ".join(self.arg(v, ids) for v in value)
            return f"({inner},)" if len(value) == 1 else f"({inner})"
        if isinstance(value, dict):
            return "{" + ", ".join(f"{self.arg(k, ids)}: {self.arg(v, ids)}" for k, v in value.items()) + "}"
        if isinstance(value, slice):
            return f"slice({self.arg(value.start, ids)}, {self.arg(value.stop, ids)}, {self.arg(value.step, ids)})"
        if isinstance(value, (torch.dtype, torch.device, torch.layout, torch.memory_format)):
            return str(value)
        if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)):
            return self.syms.sym(value)
        if isinstance(value, torch.Tensor):
            return f"tensor({self.tensor_type(value)})"
        return clean_repr(value)

    # --- the graph --------------------------------------------------------------------------------

    def render(self, graph: Any, out: list[str], prefix: str = "", indent: str = "", home: str = "") -> None:
        """Append one line per node of ``graph``. Subgraph nodes get ids ``<subgraph id>::<local>``,
        where ``<local>`` omits the module path when it is the subgraph's own (``home``)."""
        import torch.fx as fx

        def scoped(path: str, local: str) -> str:
            return local if not path or path == home else f"{path}/{local}"

        ids: dict[Any, str] = {}
        used: set[str] = set()
        counters: dict[str, int] = {}

        def unique(candidate: str) -> str:
            if candidate in used:
                k = 1
                while f"{candidate}#{k}" in used:
                    k += 1
                candidate = f"{candidate}#{k}"
            used.add(candidate)
            return candidate

        for node in graph.nodes:
            op = node.op
            info = node.meta.get(META_KEY) or {}
            subgraph = None
            if op == "placeholder":
                local = unique(sanitize_id(str(node.target).lstrip("*")))
                head = "placeholder"
                typ = self.node_type(node)
            elif op == "output":
                local = unique("output")
                head = "output" + "(" + ", ".join(self.arg(a, ids) for a in node.args) + ")"
                typ = ""
            elif op == "get_attr":
                path = self.module_path(node)
                target = str(node.target)
                obj = _resolve_attr(self.root, target)
                if isinstance(obj, fx.GraphModule):
                    # Submodule names such as ``submod_3`` are counters: name the subgraph by place.
                    key = scoped(path, "subgraph")
                    n = counters.get(key, 0)
                    counters[key] = n + 1
                    local = unique(f"{key}#{n}")
                    head = "get_attr"
                    subgraph = obj
                else:
                    name = attr_local(target, path)
                    local = unique(scoped(path, name))
                    head = f"get_attr {target}"
                typ = self.attr_type(node)
            else:
                path = self.module_path(node)
                display, key = self.target(node)
                role = info.get("role")
                if role in INSERTED_ROLES:
                    key = role
                    adapter = info.get("adapter")
                    if adapter and adapter != "default":
                        key = f"{key}@{adapter}"
                key = scoped(path, key)
                n = counters.get(key, 0)
                counters[key] = n + 1
                local = unique(f"{key}#{n}")
                args = [self.arg(a, ids) for a in node.args]
                args.extend(f"{k}={self.arg(v, ids)}" for k, v in node.kwargs.items())
                if op == "call_module":
                    display += self.module_tensors(str(node.target))
                head = f"{op} {display}(" + ", ".join(args) + ")"
                typ = self.node_type(node)
            full = f"{prefix}{local}"
            ids[node] = full
            line = f"{indent}{full} = {head}"
            if typ:
                line += f" :: {typ}"
            out.append(line + comment(info))
            if subgraph is not None:
                child = FxRenderer(subgraph, self.syms)
                child.render(subgraph.graph, out, prefix=f"{full}::", indent=indent + "  ", home=path_of(full))


_MISSING = object()


def _resolve_attr(root: Any, target: str) -> Any:
    if root is None:
        return _MISSING
    obj = root
    for part in target.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            return _MISSING
    return obj


def _describe_callable(fn: Any) -> tuple[str, str]:
    """(display name, short key) of an FX call_function target, without memory addresses."""
    import torch

    if isinstance(fn, torch._ops.OpOverload):
        return str(fn), fn._opname
    if isinstance(fn, torch._ops.OpOverloadPacket):
        return str(fn), str(fn).rsplit(".", 1)[-1]
    if isinstance(fn, torch._ops.HigherOrderOperator):
        return f"higher_order.{fn.name()}", fn.name()
    try:
        from torch.fx.node import _get_qualified_name

        display = _get_qualified_name(fn)
    except Exception:  # noqa: BLE001 - any callable fx accepted must still render
        module = getattr(fn, "__module__", None) or type(fn).__module__
        display = f"{module}.{getattr(fn, '__qualname__', type(fn).__qualname__)}"
    if display.startswith("_operator."):
        display = display[1:]
    key = getattr(fn, "__name__", None) or display.rsplit(".", 1)[-1]
    return ADDRESS.sub("", display), sanitize_id(str(key))


def render_fx(gm: Any, graph: Any = None) -> str:
    graph = gm.graph if graph is None else graph
    lines = [f"{HEADER} fx"]
    FxRenderer(gm, SymNamer()).render(graph, lines)
    return "\n".join(lines) + "\n"
