"""An encodings file close to AIMET's 1.0.0 schema, written and read back exactly.

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
``graphlora`` sub-object carries what AIMET's entries cannot (the exact qtype, the channel axis
and tensor shape); files from AIMET without it load for integer encodings when the caller
supplies shapes and axes. Names: base weights by parameter name, activations as
``<site>.input`` / ``<site>.lora_A.output``, LoRA weights as ``<site>.lora_A.weight``.
"""

from __future__ import annotations

import json
import os
from typing import Mapping

from graphlora.errors import FileFormatError, QuantizationError
from graphlora.io.atomic import atomic_write
from graphlora.quant import Encoding

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
    """Read an encodings file into Encoding objects by tensor name (FileFormatError if broken)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise FileFormatError(f"encodings file {os.fspath(path)!r} does not exist") from None
    except json.JSONDecodeError as exc:
        raise FileFormatError(
            f"encodings file {os.fspath(path)!r} is not valid JSON (line {exc.lineno}, column {exc.colno})"
        ) from None
    if not isinstance(data, dict) or "param_encodings" not in data and "activation_encodings" not in data:
        raise FileFormatError(
            f"{os.fspath(path)!r} is not an encodings file: expected 'param_encodings' / "
            "'activation_encodings' lists"
        )
    version = str(data.get("version", ""))
    if version and not version.startswith("1."):
        raise FileFormatError(f"{os.fspath(path)!r}: encodings version {version} is not supported (1.x)")
    out: dict[str, Encoding] = {}
    for section in ("param_encodings", "activation_encodings"):
        entries = data.get(section, [])
        if not isinstance(entries, list):
            raise FileFormatError(f"{os.fspath(path)!r}: {section} must be a list")
        for i, entry in enumerate(entries):
            name = entry.get("name") if isinstance(entry, dict) else None
            if not name:
                raise FileFormatError(f"{os.fspath(path)!r}: {section}[{i}] has no name")
            try:
                out[name] = Encoding.from_dict(
                    entry, shape=(shapes or {}).get(name), axis=(axes or {}).get(name)
                )
            except QuantizationError as exc:
                raise FileFormatError(f"{os.fspath(path)!r}: {section}[{i}] ({name}): {exc}") from None
    return out
