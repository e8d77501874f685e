"""Rules files: LoRA / quantization rules as TOML or JSON, for the command line and for scripts.

Why a file format at all: a rule list is configuration. Keeping it next to a training script (or in
a CI job running ``graphlora inspect``) lets people review and diff it without reading Python.
The format is the dataclass fields of :class:`~graphlora.LoraRule` / :class:`~graphlora.QuantRule`
and nothing else, so there is no second vocabulary to learn::

    # rules.toml -- one [[rules]] table per rule, first match wins
    [[rules]]
    module_path = '.*attention\\.self\\.(query|value)'
    rank = 8
    alpha = 16.0
    weight_qtype = "nf4"

    [[rules]]                      # no `rank`: a QuantRule (quantization only)
    module_path = '.*\\.dense'
    weight_qtype = "int8"

Whole-graph activation placement (:class:`~graphlora.ActivationRule`, used by
``graphlora.calibrate(..., activations=...)``) goes in ``[[activations]]`` tables beside the
rules, with ``kinds`` as a list::

    [[activations]]                # the attention-mask add stays float
    tensor = '.*attention\\.self\\.add'
    qtype = "none"

    [[activations]]                # residual adds and linear outputs in 16 bits
    kinds = ["add", "linear"]
    qtype = "uint16"

    [[activations]]                # every other op output: uint8, mse-calibrated
    calibration = "mse"

``qtype = "none"`` is how a file says ``qtype=None`` (keep in float), since TOML has no null.

JSON takes the same tables as a list, or as ``{"rules": [...], "activations": [...]}``. A table with ``rank`` is a
``LoraRule``, one without is a ``QuantRule``. Absent fields keep their defaults (TOML has no
null; in JSON ``null`` means "default None"). Every error names the file, the rule (``rule #i``,
counted from 0 as in all graphlora messages) and the field; unknown field names suggest the
closest valid one.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import sys
import types
import typing
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from graphlora.errors import RuleError
from graphlora.io.json_file import parse_json
from graphlora.rules import ActivationRule, LoraRule, QuantRule, normalize_activation_rules, set_source, validate_rule

__all__ = ["ACTIVATIONS_KEY", "RULES_KEY", "activation_rules_from_data", "dump_rules", "load_activation_rules",
           "load_rules", "parse_activation_rules", "parse_rules", "rules_from_data", "save_rules"]

RULES_KEY = "rules"
ACTIVATIONS_KEY = "activations"
NONE_QTYPE = "none"  # an ActivationRule's qtype=None in a file (TOML has no null)
_FORMATS = ("toml", "json")
# Fields only a LoraRule has: a table using one of them without `rank` is a mistake, not a QuantRule.
_LORA_ONLY = tuple(f.name for f in fields(LoraRule) if f.name not in {g.name for g in fields(QuantRule)})


# ------------------------------------------------------------------------------------------ reading


def load_rules(path: str | os.PathLike) -> list[QuantRule]:
    """Read and validate a rules file (``.toml`` or ``.json``; other suffixes are sniffed)."""
    text, fmt, where = _read(path)
    return parse_rules(text, fmt=fmt, source=where)


def load_activation_rules(path: str | os.PathLike) -> list[ActivationRule]:
    """The ``[[activations]]`` tables of a rules file, validated (``[]`` when it has none)."""
    text, fmt, where = _read(path)
    return parse_activation_rules(text, fmt=fmt, source=where)


def _read(path: str | os.PathLike) -> tuple[str, str, str]:
    where = os.fspath(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RuleError(f"{where}: rules file does not exist") from None
    except IsADirectoryError:
        raise RuleError(f"{where}: is a directory, expected a rules file (.toml or .json)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RuleError(f"{where}: cannot read rules file: {exc}") from None
    return text, _format_of(Path(path), text), where


def parse_rules(text: str, *, fmt: str = "toml", source: str = "<rules>") -> list[QuantRule]:
    """Parse rules from TOML or JSON text; ``source`` names the text in error messages."""
    return rules_from_data(_parse(text, fmt, source), source=source)


def parse_activation_rules(text: str, *, fmt: str = "toml", source: str = "<rules>") -> list[ActivationRule]:
    """Parse the ``[[activations]]`` tables from TOML or JSON text."""
    return activation_rules_from_data(_parse(text, fmt, source), source=source)


def _parse(text: str, fmt: str, source: str) -> Any:
    if fmt not in _FORMATS:
        raise RuleError(f"{source}: unknown rules format {fmt!r}; use 'toml' or 'json'")
    return _parse_toml(text, source) if fmt == "toml" else _parse_json(text, source)


def rules_from_data(data: Any, *, source: str = "<rules>") -> list[QuantRule]:
    """Rules from already-parsed data: a list of tables, or a table with a ``rules`` list."""
    tables = _rule_tables(data, source)
    rules = [_rule_from_table(i, table, source) for i, table in enumerate(tables)]
    return rules


def activation_rules_from_data(data: Any, *, source: str = "<rules>") -> list[ActivationRule]:
    """ActivationRules from already-parsed data: the ``activations`` list of a rules table."""
    if not isinstance(data, Mapping):
        _rule_tables(data, source)  # a bare list holds rules only; anything else: the rules' error
        return []
    _check_top_level(data, source)
    tables = data.get(ACTIVATIONS_KEY, [])
    if not isinstance(tables, list):
        raise RuleError(f"{source}: '{ACTIVATIONS_KEY}' must be a list of tables, got {_type_name(tables)}")
    rules = [_activation_rule_from_table(i, t, source) for i, t in enumerate(tables)]
    try:
        return normalize_activation_rules(rules)
    except RuleError as exc:
        raise RuleError(f"{source}: {exc}") from None


def _activation_rule_from_table(index: int, table: Any, source: str) -> ActivationRule:
    where = f"{source}: activation rule #{index}"
    if not isinstance(table, Mapping):
        raise RuleError(f"{where}: an activation rule must be a table of fields, got {_type_name(table)}")
    known = {f.name for f in fields(ActivationRule)}
    hints = typing.get_type_hints(ActivationRule)
    values: dict[str, Any] = {}
    for key, value in table.items():
        if key not in known:
            raise RuleError(f"{where}: unknown field {key!r}{_suggest(str(key), sorted(known))}")
        if key == "kinds":
            if not isinstance(value, list) or not all(isinstance(k, str) for k in value):
                raise RuleError(f"{where}: field 'kinds' must be a list of op kinds (strings), "
                                f"got {_type_name(value)} {value!r}")
            values[key] = tuple(value)
        elif key == "qtype" and value == NONE_QTYPE:
            values[key] = None
        else:
            values[key] = _check_type(where, key, value, hints[key])
    return ActivationRule(**values)


def _check_top_level(data: Mapping, source: str) -> None:
    extra = sorted(set(data) - {RULES_KEY, ACTIVATIONS_KEY})
    if extra:
        raise RuleError(
            f"{source}: unknown top-level key {extra[0]!r}{_suggest(extra[0], [RULES_KEY, ACTIVATIONS_KEY])}; "
            f"a rules file holds a '{RULES_KEY}' list ([[{RULES_KEY}]] tables in TOML) and optionally "
            f"an '{ACTIVATIONS_KEY}' list"
        )


def _format_of(path: Path, text: str) -> str:
    """``.toml``/``.json`` by suffix; otherwise JSON when the text opens like a JSON document."""
    suffix = path.suffix.lower()
    if suffix in (".toml", ".json"):
        return suffix[1:]
    head = text.lstrip()
    return "json" if head.startswith("{") or re.match(r"\[\s*[{\]]", head) else "toml"


def _toml_module() -> types.ModuleType:
    if sys.version_info >= (3, 11):
        import tomllib

        return tomllib
    from graphlora.errors import require

    return require("tomli", "reading TOML rules files on Python 3.10")


def _parse_toml(text: str, source: str) -> Any:
    toml = _toml_module()
    try:
        return toml.loads(text)
    except toml.TOMLDecodeError as exc:
        raise RuleError(f"{source}: not valid TOML: {exc}") from None
    except RecursionError:
        raise RuleError(f"{source}: TOML nested too deeply to parse (a rules file nests two levels; a nesting bomb?)") from None
    except ValueError as exc:  # e.g. an integer with more digits than Python converts
        raise RuleError(f"{source}: not valid TOML: {exc}") from None


def _parse_json(text: str, source: str) -> Any:
    return parse_json(text, source=source, what="a rules file", error=RuleError, joiner=": ")


def _rule_tables(data: Any, source: str) -> list[Any]:
    if isinstance(data, Mapping):
        _check_top_level(data, source)
        if RULES_KEY not in data:
            raise RuleError(f"{source}: no rules: expected [[{RULES_KEY}]] tables (TOML) or a '{RULES_KEY}' list")
        data = data[RULES_KEY]
    if not isinstance(data, list):
        raise RuleError(f"{source}: '{RULES_KEY}' must be a list of tables, got {_type_name(data)}")
    if not data:
        raise RuleError(f"{source}: the rules list is empty; add at least one rule")
    return data


def _rule_from_table(index: int, table: Any, source: str) -> QuantRule:
    where = f"{source}: rule #{index}"
    if not isinstance(table, Mapping):
        raise RuleError(f"{where}: a rule must be a table of fields, got {_type_name(table)}")
    cls = LoraRule if "rank" in table else QuantRule
    known = {f.name: f for f in fields(cls)}
    for key in table:
        if key not in known:
            raise RuleError(f"{where}: {_unknown_field_message(str(key), cls)}")
    hints = typing.get_type_hints(cls)
    values = {}
    for key, value in table.items():
        values[key] = _check_type(where, key, value, hints[key], required=known[key].default is MISSING)
    rule = cls(**values)
    try:
        validate_rule(index, rule)
    except RuleError as exc:
        raise RuleError(f"{source}: {exc}") from None
    return set_source(rule, source)


def _unknown_field_message(key: str, cls: type) -> str:
    if cls is QuantRule and key in _LORA_ONLY:
        return f"field {key!r} is a LoRA field, but the rule has no 'rank'; add rank = N (a LoraRule)"
    names = [f.name for f in fields(LoraRule)] if cls is QuantRule else [f.name for f in fields(cls)]
    return f"unknown field {key!r}{_suggest(key, names)}"


def _suggest(key: str, names: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _check_type(where: str, key: str, value: Any, hint: Any, *, required: bool = False) -> Any:
    """The value if it fits the dataclass annotation (ints are accepted for floats; a list of
    strings for a tuple of strings)."""
    if typing.get_origin(hint) is tuple:
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return tuple(value)
        raise RuleError(f"{where}: field {key!r} must be a list of strings, got {_type_name(value)} {value!r}")
    allowed = typing.get_args(hint) if _is_union(hint) else (hint,)
    if value is None:
        if type(None) in allowed:
            return None
        fix = "give a value" if required else "leave it out to use the default"
        raise RuleError(f"{where}: field {key!r} cannot be null/None; {fix}")
    for kind in allowed:
        if kind is type(None):
            continue
        if kind is bool and isinstance(value, bool):
            return value
        if kind is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                return float(value)
            except OverflowError:
                raise RuleError(f"{where}: field {key!r} = {value} is too large for a number") from None
        if kind is str and isinstance(value, str):
            return value
    expected = " or ".join(_type_word(k) for k in allowed if k is not type(None))
    raise RuleError(f"{where}: field {key!r} must be {expected}, got {_type_name(value)} {value!r}")


def _is_union(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)


def _type_word(kind: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}.get(kind, str(kind))


def _type_name(value: Any) -> str:
    if isinstance(value, Mapping):
        return "a table"
    if isinstance(value, list):
        return "a list"
    return type(value).__name__


# ------------------------------------------------------------------------------------------ writing


def dump_rules(rules: Iterable[QuantRule], fmt: str = "toml", *,
               activations: Iterable[ActivationRule] = ()) -> str:
    """Rules (and activation rules) as TOML or JSON text that :func:`parse_rules` and
    :func:`parse_activation_rules` read back to equal rules.

    Only fields that differ from their defaults are written (``module_path`` and ``rank`` always).
    """
    tables = [_rule_table(rule) for rule in rules]
    act_tables = [_activation_table(rule) for rule in normalize_activation_rules(list(activations))]
    if fmt == "json":
        doc: dict[str, Any] = {RULES_KEY: tables}
        if act_tables:
            doc[ACTIVATIONS_KEY] = act_tables
        return json.dumps(doc, indent=2) + "\n"
    if fmt != "toml":
        raise RuleError(f"unknown rules format {fmt!r}; use 'toml' or 'json'")
    return "\n".join([*(_toml_table(t) for t in tables), *(_toml_table(t, ACTIVATIONS_KEY) for t in act_tables)])


def save_rules(rules: Iterable[QuantRule], path: str | os.PathLike, fmt: str | None = None, *,
               activations: Iterable[ActivationRule] = ()) -> Path:
    """Write a rules file atomically; the format follows the suffix unless ``fmt`` is given."""
    from graphlora.io.atomic import atomic_write

    target = Path(path)
    fmt = fmt or ("json" if target.suffix.lower() == ".json" else "toml")
    text = dump_rules(rules, fmt, activations=activations)
    with atomic_write(target, "w") as fh:
        fh.write(text)
    return target


def _rule_table(rule: QuantRule) -> dict[str, Any]:
    if not isinstance(rule, QuantRule):
        raise RuleError(f"expected a LoraRule or QuantRule, got {type(rule).__name__}")
    table: dict[str, Any] = {}
    order = sorted(fields(rule), key=lambda f: (f.name != "module_path", f.name not in _LORA_ONLY))
    for f in order:
        value = getattr(rule, f.name)
        if f.name in ("module_path", "rank") or f.default is MISSING or value != f.default:
            table[f.name] = list(value) if isinstance(value, tuple) else value
    return table


def _activation_table(rule: ActivationRule) -> dict[str, Any]:
    table: dict[str, Any] = {}
    for f in fields(rule):
        value = getattr(rule, f.name)
        if value == f.default:
            continue
        if f.name == "kinds":
            value = list(value)
        elif f.name == "qtype" and value is None:
            value = NONE_QTYPE
        table[f.name] = value
    return table


def _toml_table(table: Mapping[str, Any], key: str = RULES_KEY) -> str:
    lines = [f"[[{key}]]"]
    for key, value in table.items():
        if value is None:
            continue  # TOML has no null; absent means the default (None)
        lines.append(f"{key} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, str):
        if "'" not in value and "\n" not in value:
            return f"'{value}'"  # literal string: regex backslashes stay as written
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    raise RuleError(f"cannot write {type(value).__name__} {value!r} to TOML")
