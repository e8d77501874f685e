"""Parsing graph texts back into node records and diffing two of them by canonical node id."""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from typing import Any

from graphlora.diff._common import DTYPE_LONG, INSERTED_ROLES, LORA_CONTAINERS, REF, ROLE_LABELS, path_of
from graphlora.diff.files import graph_text
from graphlora.meta import ROLES


@dataclass(slots=True)
class _Record:
    id: str
    line: str
    body: str
    op: str
    target: str
    type: str
    refs: list[str]
    masked: str
    info: dict[str, str]
    order: int = 0  # position in its text

    @property
    def module_path(self) -> str:
        return path_of(self.id)

    @property
    def role(self) -> str | None:
        return self.info.get("role")


def _parse_line(line: str) -> _Record | None:
    s = line.strip()
    if not s or s.startswith("#"):
        return None
    if " = " not in s:
        return _Record(s, s, s, "?", "", "", [], s, {})
    ident, rest = s.split(" = ", 1)
    body = rest
    info: dict[str, str] = {}
    if "  # " in rest:
        rest, comment = rest.rsplit("  # ", 1)
        for token in comment.split():
            key, sep, value = token.partition("=")
            if sep:
                info[key] = value
    typ = ""
    if " :: " in rest:
        rest, typ = rest.rsplit(" :: ", 1)
    m = re.match(r"([^\s(\[]+)\s*([^\s(]*)", rest)
    op, target = (m.group(1), m.group(2)) if m else (rest, "")
    refs = REF.findall(rest)
    masked = REF.sub("%", body)
    return _Record(ident, s, body, op, target, typ, refs, masked, info)


def _parse(text: str) -> list[_Record]:
    records = []
    seen: set[str] = set()
    for line in text.splitlines():
        rec = _parse_line(line)
        if rec is None:
            continue
        if rec.id in seen:  # tolerate hand-edited files with repeated ids
            k = 1
            while f"{rec.id}~{k}" in seen:
                k += 1
            rec.id = f"{rec.id}~{k}"
        seen.add(rec.id)
        rec.order = len(records)
        records.append(rec)
    return records


def _label(rec: _Record) -> str:
    """Short human label of a node for the grouped summary: role for inserted nodes, else op."""
    role = rec.role
    if role in INSERTED_ROLES:
        return ROLE_LABELS.get(role, role)
    local = rec.id.rsplit("::", 1)[-1]
    local = local.rsplit("/", 1)[-1]
    if rec.op in ("placeholder", "input"):
        return f"input {local}"
    if rec.op in ("get_attr", "initializer"):
        parts = local.split(".")
        for i, part in enumerate(parts[:-1]):
            if part in LORA_CONTAINERS:  # adapters.default.lora_A.weight -> lora_A.weight
                return ".".join(parts[i:])
        return local
    key = local.split("#", 1)[0].split("@", 1)[0]
    return key


def _dtype_of(type_text: str) -> str:
    """Long dtype name of the first tensor in a type string (``param f32[4,8]`` -> ``float32``)."""
    m = re.search(r"([a-z][a-z0-9_]*)\[", type_text)
    if not m:
        return "?"
    return DTYPE_LONG.get(m.group(1), m.group(1))


# --------------------------------------------------------------------------------------------------
# the diff
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NodeChange:
    """One node that was added, removed or changed between two graphs.

    ``rewired`` is True for a changed node whose only difference is that an input now refers to a
    node that was added (or no longer to one that was removed): a consequence of an insertion
    elsewhere, reported under the module path(s) in ``caused_by`` rather than the node's own.
    """

    kind: str  # "added" | "removed" | "changed"
    id: str
    module_path: str
    label: str
    role: str | None
    before: str | None
    after: str | None
    rewired: bool = False
    caused_by: tuple[str, ...] = ()

    def __str__(self) -> str:
        if self.kind == "added":
            return f"+ {self.after}"
        if self.kind == "removed":
            return f"- {self.before}"
        return f"- {self.before}\n+ {self.after}"


@dataclass(repr=False)
class GraphDiff:
    """Node-level differences between two graph texts, aligned by canonical node id."""

    before_text: str
    after_text: str
    added: list[NodeChange] = field(default_factory=list)
    removed: list[NodeChange] = field(default_factory=list)
    changed: list[NodeChange] = field(default_factory=list)
    context: int = 3
    labels: tuple[str, str] = ("before", "after")
    _before: list[_Record] = field(default_factory=list, repr=False)
    _after: list[_Record] = field(default_factory=list, repr=False)
    _index: tuple[dict[str, _Record], dict[str, _Record]] | None = field(default=None, repr=False, compare=False)

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.changed) or self.before_text != self.after_text

    def __repr__(self) -> str:
        return f"<GraphDiff {self.summary}>"

    # --- grouping -----------------------------------------------------------------------------------

    def by_module_path(self) -> dict[str, list[NodeChange]]:
        """Changes grouped by module path ("" is the root), in graph order. Rewired nodes are listed
        under the module paths that caused them."""
        order: dict[str, int] = {}
        for rec in self._after + self._before:
            order.setdefault(rec.module_path, len(order))
        groups: dict[str, list[NodeChange]] = {}
        for change in self.added + self.removed + self.changed:
            paths = change.caused_by if change.rewired else (change.module_path,)
            for path in paths:
                order.setdefault(path, len(order))
                groups.setdefault(path, []).append(change)
        return {path: groups[path] for path in sorted(groups, key=order.__getitem__)}

    def _indexes(self) -> tuple[dict[str, _Record], dict[str, _Record]]:
        """(tensors of the old graph by attribute name, records of the new graph by id), built once."""
        if self._index is None:
            tensors = {r.target: r for r in self._before if r.op in ("get_attr", "initializer") and r.target}
            self._index = (tensors, {r.id: r for r in self._after})
        return self._index

    def _quant_items(self, changes: list[NodeChange], hidden: set[str]) -> list[str]:
        before_by_target, after_by_id = self._indexes()
        items: list[str] = []
        for change in changes:
            if change.role != "dequant" or change.kind == "removed":
                continue
            rec = after_by_id.get(change.id)
            if rec is None:
                continue
            tensor = rec.info.get("tensor")
            qtype = rec.info.get("qtype")
            if not qtype:
                continue
            # the dequant and the tensors it reads (packed weight, scales) are summed up by one item
            hidden.add(change.id)
            for ref in rec.refs:
                src_rec = after_by_id.get(ref)
                if src_rec is not None and src_rec.op in ("get_attr", "initializer"):
                    hidden.add(ref)
            old = before_by_target.get(tensor) if tensor else None
            if old is not None:
                hidden.add(old.id)
            src = _dtype_of(old.type) if old is not None else _dtype_of(rec.type)
            block = rec.info.get("block_size")
            axis = rec.info.get("axis")
            if block not in (None, "None", "0"):
                gran = f"[g{block}]"
            elif axis not in (None, "None"):
                gran = f"[axis{axis}]"
            else:
                gran = ""
            name = tensor or "weight"
            path = rec.module_path
            if path and name.startswith(path + "."):
                name = name[len(path) + 1 :]
            item = f"{name} {src} -> {qtype}{gran}"
            if item not in items:
                items.append(item)
        return items

    def grouped(self) -> list[str]:
        """One line per module path: ``path: +lora_A +lora_B ~linear; weight float32 -> int4[g32]``."""
        lines = []
        for path, changes in self.by_module_path().items():
            hidden: set[str] = set()
            quant = self._quant_items(changes, hidden)
            tokens: list[str] = []
            rewired = 0
            for kind, sign in (("added", "+"), ("removed", "-"), ("changed", "~")):
                for change in changes:
                    if change.kind != kind or change.id in hidden:
                        continue
                    if change.rewired:
                        rewired += 1
                        continue
                    tokens.append(f"{sign}{change.label}")
            parts = []
            if tokens:
                parts.append(" ".join(_count_runs(tokens)))
            parts.extend(quant)
            if rewired:
                parts.append(f"{rewired} user{'s' if rewired != 1 else ''} rewired")
            lines.append(f"{path or '<root>'}: " + "; ".join(parts))
        return lines

    @property
    def summary(self) -> str:
        """One line: ``+148 nodes (lora_a 37, ...), -0 nodes, ~37 changed (37 rewired)``."""
        if not self:
            return "no differences"
        rewired = sum(1 for c in self.changed if c.rewired)
        changed = f"~{len(self.changed)} changed"
        if rewired:
            changed += f" ({rewired} rewired)"
        added = f"+{len(self.added)} nodes{_role_counts(self.added)}"
        removed = f"-{len(self.removed)} nodes{_role_counts(self.removed)}"
        return f"{added}, {removed}, {changed}"

    def unified(self, context: int | None = None) -> str:
        """Unified diff (difflib) of the two canonical texts."""
        n = self.context if context is None else context
        lines = difflib.unified_diff(
            self.before_text.splitlines(), self.after_text.splitlines(), *self.labels, lineterm="", n=n
        )
        return "\n".join(lines)

    def __str__(self) -> str:
        if not self:
            return "no differences"
        out = [self.summary]
        out.extend(f"  {line}" for line in self.grouped())
        unified = self.unified()
        if unified:
            out.append("")
            out.append(unified)
        return "\n".join(out)


def _count_runs(tokens: list[str]) -> list[str]:
    counts: dict[str, int] = {}
    for t in tokens:
        counts[t] = counts.get(t, 0) + 1
    return [t if n == 1 else f"{t} x{n}" for t, n in counts.items()]


def _role_counts(changes: list[NodeChange]) -> str:
    if not changes:
        return ""
    counts: dict[str, int] = {}
    for c in changes:
        key = c.role or "other"
        counts[key] = counts.get(key, 0) + 1
    rank = {role: i for i, role in enumerate(ROLES)}
    ordered = sorted(counts.items(), key=lambda kv: (rank.get(kv[0], len(rank)), kv[0]))
    return " (" + ", ".join(f"{k} {n}" for k, n in ordered) + ")"


def _base_ref(ref: str, ids: set[str] | dict) -> str:
    """The node id of a reference (``%id:1`` names output 1 of a multi-output ONNX node)."""
    if ref in ids:
        return ref
    m = re.match(r"(.*):\d+$", ref)
    return m.group(1) if m else ref


_OCCURRENCE = re.compile(r"^(.*)#(\d+)$")


def _align(b: list[_Record], a: list[_Record]) -> list[tuple[_Record, _Record]]:
    """Pairs (old, new) records of the same node.

    Ids are local, but an occurrence index still shifts when a node with the same key is removed
    or inserted earlier in the *same* module path (a pass deleting one dead ``arange`` renumbers
    the later ones). So ids that differ only by ``#n`` form a group; groups of equal size pair by
    index, others by a sequence alignment of the node bodies (references masked).
    """
    groups_b: dict[str, list[_Record]] = {}
    groups_a: dict[str, list[_Record]] = {}
    for records, groups in ((b, groups_b), (a, groups_a)):
        for rec in records:
            m = _OCCURRENCE.match(rec.id)
            groups.setdefault(m.group(1) if m else "\0" + rec.id, []).append(rec)
    pairs: list[tuple[_Record, _Record]] = []
    for key, olds in groups_b.items():
        news = groups_a.get(key)
        if not news:
            continue
        if len(olds) == len(news):
            pairs.extend(zip(olds, news))
            continue
        matcher = difflib.SequenceMatcher(None, [r.masked for r in olds], [r.masked for r in news], autojunk=False)
        for tag, i1, i2, j1, j2 in matcher.get_opcodes():
            if tag in ("equal", "replace"):
                pairs.extend(zip(olds[i1:i2], news[j1:j2]))
    return pairs


def diff(
    before: Any,
    after: Any,
    *,
    context: int = 3,
    labels: tuple[str, str] = ("before", "after"),
    allow_pickle: bool = False,
) -> GraphDiff:
    """Structural diff of two graphs, aligned by canonical node id.

    ``before``/``after`` may be anything :func:`graph_text` accepts -- including two graph texts,
    which is how the transform pipeline records a diff per pass cheaply. ``bool(result)`` tells
    whether they differ; ``str(result)`` is a grouped summary followed by a unified diff whose
    file headers are ``labels``. ``allow_pickle`` lets saved ``.pt2`` archives be read (see
    :func:`read_graph_text`: they run code; only for archives you trust).
    """
    before_text = graph_text(before, allow_pickle=allow_pickle)
    after_text = graph_text(after, allow_pickle=allow_pickle)
    b = _parse(before_text)
    a = _parse(after_text)
    bmap = {r.id: r for r in b}
    amap = {r.id: r for r in a}
    pairs = _align(b, a)
    paired_old = {old.id for old, _ in pairs}
    paired_new = {new.id for _, new in pairs}
    added_ids = {r.id for r in a if r.id not in paired_new}
    removed_ids = {r.id for r in b if r.id not in paired_old}
    renamed = {old.id: new.id for old, new in pairs if old.id != new.id}

    def rename(ref: str) -> str:
        if ref in renamed:
            return renamed[ref]
        base = _base_ref(ref, bmap)
        return renamed[base] + ref[len(base) :] if base in renamed else ref

    result = GraphDiff(before_text, after_text, context=context, labels=tuple(labels), _before=b, _after=a)
    for r in a:
        if r.id in added_ids:
            result.added.append(NodeChange("added", r.id, r.module_path, _label(r), r.role, None, r.line))
    for r in b:
        if r.id in removed_ids:
            result.removed.append(NodeChange("removed", r.id, r.module_path, _label(r), r.role, r.line, None))
    for old, new in sorted(pairs, key=lambda pair: pair[1].order):
        old_refs = [rename(ref) for ref in old.refs] if renamed else old.refs
        if old.body == new.body or (renamed and REF.sub(lambda m: "%" + rename(m.group(1)), old.body) == new.body):
            continue
        rewired, causes = False, []
        if old.masked == new.masked and len(old_refs) == len(new.refs):
            rewired = True
            for o, o_renamed, n in zip(old.refs, old_refs, new.refs):
                if o_renamed == n:
                    continue
                nb, ob = _base_ref(n, amap), _base_ref(o, bmap)
                if nb in added_ids:
                    causes.append(amap[nb].module_path)
                elif ob in removed_ids:
                    causes.append(bmap[ob].module_path)
                else:
                    rewired = False
                    break
        causes = list(dict.fromkeys(causes))
        rewired = rewired and bool(causes)
        result.changed.append(
            NodeChange(
                "changed",
                new.id,
                new.module_path,
                _label(new),
                new.role or old.role,
                old.line,
                new.line,
                rewired=rewired,
                caused_by=tuple(causes) if rewired else (),
            )
        )
    return result
