"""graphlora's encodings file: AIMET's 1.0.0 layout plus a ``graphlora`` object per entry, written
and read back exactly. (AIMET's own files, which lack what that object says, are read by
:func:`graphlora.load_aimet_encodings`, which proves their layout against the model, and written
by :func:`graphlora.save_aimet_encodings`.)

Schema (JSON)::

    {
      "version": "1.0.0",
      "producer": "graphlora <version>",
      "activation_encodings": [ENTRY, ...],   # tensors computed at run time
      "param_encodings": [ENTRY, ...],        # weights (base and LoRA)
      "excluded_layers": [],
      "quantizer_args": {...}
    }

    ENTRY = {"name": str, "dtype": "INT" | "FLOAT" | "NF4", "enc_type": "PER_TENSOR" |
             "PER_CHANNEL" | "PER_BLOCK", "bw": int, "is_sym": bool, "scale": [float],
             "offset": [int] (integer dtypes; AIMET's offset = qmin - zero_point),
             "block_size": int (PER_BLOCK only), "graphlora": {qtype, axis, shape, scale_dtype,
             double_quant}}

Per-channel and per-block scales are flattened row-major from the ``(channels,)`` /
``(channels, blocks)`` layout. ``NF4`` is graphlora's extension (AIMET has no NF4). The
``graphlora`` sub-object carries what AIMET's entries cannot (the exact qtype and grid, the
channel axis and tensor shape). An entry without it is read only when it is per tensor or per
channel and the caller supplies the shape and axis; a per-block one is refused (its scale order
cannot be proven from the entry), and an AIMET file is pointed to ``load_aimet_encodings``.
Names: base weights by parameter name, activations as ``<site>.input`` / ``<site>.lora_A.output``,
LoRA weights as ``<site>.lora_A.weight``.
"""

from __future__ import annotations

import json
import math
import os
from typing import Mapping

from graphlora.errors import FileFormatError, QuantizationError
from graphlora.io.aimet_format import is_aimet_file
from graphlora.io.atomic import atomic_write
from graphlora.io.json_file import expect, read_json
from graphlora.quant import GRIDS, Encoding

VERSION = "1.0.0"


def _is_param(name: str, encoding: Encoding) -> bool:
    return bool(encoding.shape) and not name.endswith((".input", ".output", ".lora_input"))


def encodings_to_json(encodings: Mapping[str, Encoding]) -> dict:
    from graphlora.version import __version__

    acts, params = [], []
    for name in sorted(encodings):
        entry = encodings[name].to_dict(name)
        (params if _is_param(name, encodings[name]) else acts).append(entry)
    return {
        "version": VERSION,
        "producer": f"graphlora {__version__}",
        "activation_encodings": acts,
        "param_encodings": params,
        "excluded_layers": [],
        "quantizer_args": {"activation_bitwidth": sorted({e["bw"] for e in acts}),
                           "param_bitwidth": sorted({e["bw"] for e in params})},
    }


def save_encodings(encodings, path: str | os.PathLike) -> None:
    """Write ``encodings`` (a dict by tensor name, or a LoraModel) atomically."""
    if hasattr(encodings, "encodings") and callable(encodings.encodings):
        encodings = encodings.encodings()
    text = json.dumps(encodings_to_json(encodings), indent=2)
    with atomic_write(path, "w", encoding="utf-8") as f:
        f.write(text)


def load_encodings(
    path: str | os.PathLike,
    *,
    shapes: Mapping[str, tuple[int, ...]] | None = None,
    axes: Mapping[str, int] | None = None,
) -> dict[str, Encoding]:
    """Read an encodings file into Encoding objects by tensor name (FileFormatError if broken:
    not JSON, not UTF-8, nested too deeply, a field of the wrong type, a non-finite scale, ...).
    AIMET's own files are refused with a pointer to :func:`graphlora.load_aimet_encodings`."""
    where = os.fspath(path)
    if not os.path.exists(where):
        raise FileFormatError(f"encodings file {where!r} does not exist")
    data = read_json(path, what="an encodings file")
    if is_aimet_file(data):
        raise FileFormatError(
            f"{where!r} is an AIMET encodings file (version {data.get('version', '0.6.1')}): "
            "its entries do not say their layout; read it with graphlora.load_aimet_encodings(model, "
            "path, onnx_model=...), which maps AIMET's names onto the model and proves each layout")
    if not isinstance(data, dict) or "param_encodings" not in data and "activation_encodings" not in data:
        raise FileFormatError(
            f"{where!r} is not an encodings file: expected 'param_encodings' / "
            "'activation_encodings' lists"
        )
    version = data.get("version", "")
    if not isinstance(version, str):
        raise FileFormatError(f"{where!r}: 'version' must be a string such as '1.0.0', got {version!r}")
    if version and not version.startswith("1."):
        raise FileFormatError(f"{where!r}: encodings version {version} is not supported (1.x)")
    out: dict[str, Encoding] = {}
    for section in ("param_encodings", "activation_encodings"):
        entries = data.get(section, [])
        if not isinstance(entries, list):
            raise FileFormatError(f"{where!r}: {section} must be a list")
        for i, entry in enumerate(entries):
            name = entry.get("name") if isinstance(entry, dict) else None
            if not name or not isinstance(name, str):
                raise FileFormatError(f"{where!r}: {section}[{i}] has no name")
            if "graphlora" not in entry and entry.get("enc_type") == "PER_BLOCK":
                raise FileFormatError(
                    f"{where!r}: {section}[{i}] ({name}): a PER_BLOCK entry without "
                    "graphlora's layout object: AIMET flattens block scales (out, blocks) or "
                    "(blocks, out) depending on how it named the tensor; read AIMET files with "
                    "graphlora.load_aimet_encodings")
            out[name] = encoding_from_entry(
                entry, f"{where!r}: {section}[{i}] ({name})",
                shape=(shapes or {}).get(name), axis=(axes or {}).get(name),
            )
    return out


_ENC_TYPES = ("PER_TENSOR", "PER_CHANNEL", "PER_BLOCK")


def encoding_from_entry(
    entry: object, where: str, *, shape: tuple[int, ...] | None = None, axis: int | None = None
) -> Encoding:
    """One encodings-file entry (``Encoding.to_dict``'s schema) as an :class:`Encoding`, with every
    field's type and range checked first so a bad file names the field, not a torch error."""
    if not isinstance(entry, dict):
        raise FileFormatError(f"{where}: an encoding entry must be an object, got {type(entry).__name__}")
    expect(entry, "enc_type", "str", where)
    if entry["enc_type"] not in _ENC_TYPES:
        raise FileFormatError(f"{where}: 'enc_type' must be one of {_ENC_TYPES}, got {entry['enc_type']!r}")
    bw = expect(entry, "bw", "int", where)
    if not 1 <= bw <= 32:
        raise FileFormatError(f"{where}: 'bw' must be a bit width in 1..32, got {bw}")
    expect(entry, "is_sym", "bool", where, required=False)
    expect(entry, "dtype", "str", where, required=False)
    _numbers(expect(entry, "scale", "list", where), "scale", where, integers=False)
    if "offset" in entry:
        _numbers(expect(entry, "offset", "list", where), "offset", where, integers=True)
    block = expect(entry, "block_size", "int", where, required=False, nullable=True)
    if block is not None and block < 1:
        raise FileFormatError(f"{where}: 'block_size' must be a positive int, got {block}")
    extra = expect(entry, "graphlora", "object", where, required=False, nullable=True) or {}
    sub = f"{where}: graphlora"
    expect(extra, "qtype", "str", sub, required=False)
    grid = expect(extra, "grid", "str", sub, required=False)
    if grid is not None and grid not in GRIDS:
        raise FileFormatError(f"{sub}: 'grid' must be one of {GRIDS}, got {grid!r}")
    expect(extra, "axis", "int", sub, required=False, nullable=True)
    expect(extra, "scale_dtype", "str", sub, required=False)
    dims = expect(extra, "shape", "list", sub, required=False)
    if dims is not None:
        _numbers(dims, "shape", sub, integers=True, minimum=0, allow_empty=True)
    dq = expect(extra, "double_quant", "object", sub, required=False, nullable=True)
    if dq is not None:
        dq_where = f"{sub}.double_quant"
        _numbers(expect(dq, "codes", "list", dq_where), "codes", dq_where, integers=True, minimum=-128, maximum=127)
        _numbers(expect(dq, "scale", "list", dq_where), "scale", dq_where, integers=False)
        expect(dq, "mean", "number", dq_where)
        if expect(dq, "block_size", "int", dq_where) < 1:
            raise FileFormatError(f"{dq_where}: 'block_size' must be a positive int")
    try:
        return Encoding.from_dict(entry, shape=shape, axis=axis)
    except QuantizationError as exc:
        raise FileFormatError(f"{where}: {exc}") from None
    except (ValueError, TypeError, RuntimeError, IndexError, OverflowError, ZeroDivisionError) as exc:
        # sizes that do not fit together (a scale list of the wrong length for the shape, ...)
        raise FileFormatError(f"{where}: inconsistent encoding ({type(exc).__name__}: {exc})") from None


def _numbers(
    values: list,
    key: str,
    where: str,
    *,
    integers: bool,
    minimum: float | None = None,
    maximum: float | None = None,
    allow_empty: bool = False,
) -> None:
    if not values and not allow_empty:
        raise FileFormatError(f"{where}: {key!r} is empty")
    for i, v in enumerate(values):
        ok = isinstance(v, int) if integers else isinstance(v, (int, float))
        if isinstance(v, bool) or not ok:
            kind = "integers" if integers else "numbers"
            raise FileFormatError(f"{where}: {key!r} must be a list of {kind}; item {i} is {v!r}")
        if not integers and not math.isfinite(v):
            raise FileFormatError(f"{where}: {key!r} item {i} is {v!r}; values must be finite")
        if (minimum is not None and v < minimum) or (maximum is not None and v > maximum):
            raise FileFormatError(f"{where}: {key!r} item {i} = {v} is outside [{minimum}, {maximum}]")
