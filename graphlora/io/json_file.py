"""Reading JSON that someone else wrote: every failure a clear error naming the file, none a hang.

graphlora reads JSON from adapters (``adapter_config.json``), checkpoints (the safetensors index,
``graphlora_quantization.json``), encodings files and rules files, any of which may come from a
stranger. Python's ``json`` turns a deeply nested document (``[[[[...]]]]``, a "nesting bomb")
into a ``RecursionError``, a 5000-digit integer into a ``ValueError``, and a file that is not
UTF-8 into a ``UnicodeDecodeError``; a directory where the file belongs raises
``IsADirectoryError``. Here each becomes the caller's :class:`~graphlora.errors.GraphloraError`
subclass, naming the file and what it was expected to be. Memory and time stay linear in the
file's size (JSON has no references that could expand).

The typed accessors (:func:`expect`) check the shape of what was parsed, so a wrong type in a
field is reported as that field, not as a ``TypeError`` deep in a constructor.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from graphlora.errors import FileFormatError, GraphloraError

__all__ = ["expect", "parse_json", "read_json"]


def read_json(
    path: str | os.PathLike[str],
    *,
    what: str = "JSON file",
    error: type[GraphloraError] = FileFormatError,
    joiner: str = " is ",
) -> Any:
    """Parse the JSON file at ``path``; ``what`` names it in errors (``"adapter config"``)."""
    file = Path(path)
    if file.is_dir():
        raise error(f"{file} is a directory, expected {what} (a JSON file)")
    try:
        data = file.read_bytes()
    except FileNotFoundError:
        raise error(f"{file} does not exist (expected {what})") from None
    except OSError as exc:
        raise error(f"cannot read {file} ({what}): {exc.strerror or exc}") from None
    return parse_json(data, source=str(file), what=what, error=error, joiner=joiner)


def parse_json(
    data: bytes | str,
    *,
    source: str,
    what: str = "JSON",
    error: type[GraphloraError] = FileFormatError,
    joiner: str = " is ",
) -> Any:
    """Parse JSON text (bytes must be UTF-8; a BOM is allowed); errors name ``source``."""
    if isinstance(data, bytes):
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise error(
                f"{source}{joiner}not UTF-8 text (byte {exc.start}: {exc.reason}); {what} must be UTF-8 JSON"
            ) from None
    else:
        text = data
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise error(
            f"{source}{joiner}not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})"
        ) from None
    except RecursionError:
        raise error(
            f"{source}{joiner}JSON nested too deeply to parse ({what} nests a few levels at most; "
            "a nesting bomb?)"
        ) from None
    except ValueError as exc:  # e.g. an integer with more digits than Python converts
        raise error(f"{source}{joiner}not valid JSON: {exc}") from None


_KINDS: dict[str, tuple[tuple[type, ...], str]] = {
    "object": ((dict,), "an object"),
    "list": ((list,), "a list"),
    "str": ((str,), "a string"),
    "bool": ((bool,), "true or false"),
    "int": ((int,), "an integer"),
    "number": ((int, float), "a number"),
}


def expect(
    obj: Mapping[str, Any],
    key: str,
    kind: str,
    where: str,
    *,
    error: type[GraphloraError] = FileFormatError,
    required: bool = True,
    nullable: bool = False,
    default: Any = None,
) -> Any:
    """``obj[key]`` if it is of ``kind`` (``object``, ``list``, ``str``, ``bool``, ``int``,
    ``number``; bools are not numbers), else ``error`` naming ``where`` and the key. A missing key
    is an error when ``required``, else ``default``; ``null`` passes when ``nullable``."""
    if key not in obj:
        if required:
            raise error(f"{where}: the field {key!r} is missing")
        return default
    value = obj[key]
    if value is None and nullable:
        return None
    types, word = _KINDS[kind]
    ok = isinstance(value, types) and not (kind in ("int", "number") and isinstance(value, bool))
    if not ok:
        raise error(f"{where}: {key!r} must be {word}, got {_describe(value)}")
    return value


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return f"a list of {len(value)}"
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:40] + '...'}"
