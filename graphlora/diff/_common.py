"""Shared pieces of the graph text format: header, dtype names, symbol renaming, metadata comments."""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

HEADER = "# graphlora graph_text v1"
GRAPH_TEXT_SUFFIX = ".graph.txt"

# Roles that mark nodes a pass *inserted*: their id is keyed by role, so the base graph's op
# counters inside the same module path do not shift. ``base`` and ``weight`` only annotate nodes
# that were already there, so those keep their op-based id and show up as "changed".
INSERTED_ROLES = frozenset(
    {"lora_a", "lora_b", "lora_dropout", "lora_scale", "lora_add", "lora_cast_in", "lora_cast_out",
     "quant", "dequant", "fake_quant", "observer"}
)
ROLE_LABELS = {"lora_a": "lora_A", "lora_b": "lora_B"}
# graphlora metadata fields that are shown elsewhere on the line or are not plain values.
HIDDEN_META = frozenset({"role", "module_path"})
# PEFT-style parameter containers: ``q_proj.lora_A.default.weight`` belongs to site ``q_proj``.
LORA_CONTAINERS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")

DTYPE_SHORT = {
    "float32": "f32",
    "float16": "f16",
    "bfloat16": "bf16",
    "float64": "f64",
    "complex64": "c64",
    "complex128": "c128",
    "int64": "i64",
    "int32": "i32",
    "int16": "i16",
    "int8": "i8",
    "uint64": "u64",
    "uint32": "u32",
    "uint16": "u16",
    "uint8": "u8",
    "int4": "i4",
    "uint4": "u4",
    "int2": "i2",
    "uint2": "u2",
    "bool": "bool",
    "float8_e4m3fn": "f8e4m3fn",
    "float8_e4m3fnuz": "f8e4m3fnuz",
    "float8_e5m2": "f8e5m2",
    "float8_e5m2fnuz": "f8e5m2fnuz",
    "float4_e2m1": "f4e2m1",
    "float4_e2m1fn_x2": "f4e2m1x2",
}
DTYPE_LONG = {short: long for long, short in DTYPE_SHORT.items()}

# Symbols torch (``s72``, ``u3``) and the ONNX exporter write: history-dependent, so renumbered.
SYMBOL = re.compile(r"\b(s|u|ps|zf|zuf)(\d+)\b")
REF = re.compile(r"%([^\s,()\[\]{}=]+)")
ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
ANONYMOUS_NAME = re.compile(r"^(val_\d+.*|.*_\d+|.*::.*|\d+)$")


class SymNamer:
    """Renames symbolic sizes to ``s0, s1, ...`` in order of first appearance in the text."""

    __slots__ = ("_names", "_counts", "_cache")

    def __init__(self) -> None:
        self._names: dict[str, str] = {}
        self._counts: dict[str, int] = {}
        self._cache: dict[Any, str] = {}

    def _rename(self, match: re.Match) -> str:
        token = match.group(0)
        name = self._names.get(token)
        if name is None:
            prefix = match.group(1)
            n = self._counts.get(prefix, 0)
            self._counts[prefix] = n + 1
            name = self._names[token] = f"{prefix}{n}"
        return name

    def expr(self, text: str) -> str:
        """Canonical form of a symbolic expression given as text (``s72*2`` -> ``s0*2``)."""
        return SYMBOL.sub(self._rename, text).replace(" ", "")

    def sym(self, value: Any) -> str:
        """Canonical form of a torch SymInt/SymFloat/SymBool."""
        node = getattr(value, "node", None)
        key = getattr(node, "expr", None)
        if key is None:
            return self.expr(str(value))
        try:
            cached = self._cache.get(key)
        except TypeError:  # unhashable expression: no caching
            return self.expr(str(key))
        if cached is None:
            cached = self._cache[key] = self.expr(str(key))
        return cached


def dtype_name(dtype: Any) -> str:
    text = str(dtype)
    return text[6:] if text.startswith("torch.") else text


def short_dtype(long_name: str) -> str:
    return DTYPE_SHORT.get(long_name, long_name)


def clean_repr(value: Any) -> str:
    """repr() without memory addresses or characters that would break the line grammar."""
    text = ADDRESS.sub("", repr(value))
    return text.replace("\n", "\\n").replace(" :: ", " \\x3a\\x3a ").replace("  # ", " \\x20# ")


def meta_value(value: Any) -> str:
    text = str(value)
    if re.fullmatch(r"[\w.\-/:\[\]@]+", text):
        return text
    return clean_repr(text)


def comment(info: dict[str, Any]) -> str:
    """The trailing ``  # role=... k=v`` part: graphlora metadata with plain values only."""
    if not info:
        return ""
    parts = []
    role = info.get("role")
    if role is not None:
        parts.append(f"role={role}")
    for key in sorted(info):
        if key in HIDDEN_META:
            continue
        value = info[key]
        if value is None or not isinstance(value, (str, int, float, bool)):
            continue
        parts.append(f"{key}={meta_value(value)}")
    return "  # " + " ".join(parts) if parts else ""


def sanitize_id(text: str) -> str:
    return re.sub(r"[\s,()\[\]{}=%]", "_", text)


def join_scopes(scopes: Iterable[str]) -> str:
    """Join module scopes that are either full paths (``a``, ``a.b``) or relative names (``a``, ``b``)."""
    path = ""
    for scope in scopes:
        scope = scope.strip(".")
        if not scope:
            continue
        if not path or scope == path or scope.startswith(path + "."):
            path = scope
        else:
            path = f"{path}.{scope}"
    return path


def path_of(ident: str) -> str:
    """Module path of a canonical id: the part before the last '/'; a subgraph node without a path
    of its own (``<subgraph id>::mul#0``) belongs to its subgraph's module path."""
    outer, sep, last = ident.rpartition("::")
    if "/" in last:
        return last.rsplit("/", 1)[0]
    return path_of(outer) if sep else ""


def attr_owner(target: str) -> str:
    """Module path of a parameter/buffer: the attribute path minus the last component, except that
    PEFT-style containers (``q_proj.lora_A.default.weight``) belong to the site (``q_proj``)."""
    parts = target.split(".")
    for i, part in enumerate(parts[:-1]):
        if part in LORA_CONTAINERS:
            return ".".join(parts[:i])
    return ".".join(parts[:-1])


def attr_local(target: str, path: str) -> str:
    """The part of an attribute name that is local to its module path: ``q_proj.weight`` -> ``weight``;
    a tree mirroring module paths keeps its root (``adapters.default.q_proj.lora_A.weight`` ->
    ``adapters.default.lora_A.weight``) so ids stay unique per adapter without repeating the path."""
    if not path:
        return target
    if target.startswith(path + "."):
        return target[len(path) + 1 :]
    inner = f".{path}."
    if inner in target:
        return target.replace(inner, ".", 1)
    return target


def atomic_write_text(path: Path, text: str) -> None:
    """Write text through graphlora's one atomic-write helper (creating the folder if needed)."""
    from graphlora.io.atomic import atomic_write

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "w", encoding="utf-8", newline="\n") as fh:
        fh.write(text)
