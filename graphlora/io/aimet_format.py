"""AIMET's encodings files, as AIMET writes and reads them: parsing every version into plain
entries, and writing the file ``aimet_torch.QuantizationSimModel.load_encodings`` reads.

This module knows the *files*, not the model: it says what an entry holds (bit width, symmetry,
scales and offsets exactly as stored, block size, axis where the version states one) and leaves
to :mod:`graphlora.onnx.aimet` the question of which graphlora tensor an entry is and how its
scales are laid out — that needs the model, and for ONNX tensor names AIMET's ONNX graph.

The layouts AIMET writes (aimet-torch 2.42; ``tests/fixtures/aimet`` holds a file of each):

* **0.6.1** (``sim.export``'s ``<prefix>_torch.encodings``, and the legacy ``<prefix>.encodings``):
  ``{"param_encodings": {name: [ENTRY, ...]}, "activation_encodings": {...}}`` with one
  ``ENTRY = {"min", "max", "scale", "offset", "bitwidth", "dtype", "is_symmetric": "True"}`` per
  channel or block, flattened row-major from the quantizer's shape. Activations are keyed by
  ONNX tensor name, or, in the torch file, ``{module: {"input"|"output": {"0": ENTRY}}}``.
* **1.0.0**: lists of ``{"name", "dtype", "enc_type", "bw", "is_sym", "scale": [...],
  "offset": [...], "block_size"}``; no axis, no shape.
* **2.0.0** (``sim.onnx.export``): one list ``"encodings"`` of ``{"name", "output_dtype":
  "int4"|"uint8"|..., "y_scale", "y_zero_point", "axis", "block_size"}`` with ``y_scale`` nested
  in the shape of the ONNX ``DequantizeLinear`` scale (``axis`` is the blocked axis for blocks).

Offsets follow AIMET: dequantization is ``(q + offset) * scale`` on the unsigned grid, so an
entry's zero point is ``-offset`` there (``2.0.0`` states ``y_zero_point`` on the type's own
grid). Everything is read as float32/int64 tensors, bit for bit as the JSON holds them (AIMET
writes float32 values as Python floats, which round-trip exactly).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Any, Literal, Mapping

import torch

from graphlora.errors import FileFormatError
from graphlora.io.atomic import atomic_write
from graphlora.io.json_file import read_json as _read_json
from graphlora.quant import Encoding

Section = Literal["param", "activation", "any"]  # 2.0.0 does not say
VERSIONS = ("0.6.1", "1.0.0", "2.0.0")


@dataclass(frozen=True, eq=False)
class AimetEntry:
    """One encoding as an AIMET file states it; nothing inferred.

    ``scale`` is float32, flat for 0.6.1/1.0.0 and in ``y_scale``'s nested shape for 2.0.0;
    ``zero_point`` is int64 shaped like it, on the entry's own grid (``qmin - offset`` for
    0.6.1/1.0.0, so 0 for AIMET's signed symmetric grids; ``y_zero_point`` for 2.0.0), None where
    the file states none. ``signed`` is
    the code grid's signedness (``is_sym`` in 0.6.1/1.0.0, where AIMET's grids are signed
    symmetric or unsigned asymmetric; the ``output_dtype`` in 2.0.0). ``module``/``io``/``index``
    name a torch-file activation (``module``'s ``"input"``/``"output"`` number ``index``).
    """

    name: str
    section: Section
    version: str
    bitwidth: int
    symmetric: bool
    signed: bool
    scale: torch.Tensor
    zero_point: torch.Tensor | None
    enc_type: str
    block_size: int | None = None
    axis: int | None = None
    dtype: str = "int"
    module: str | None = None
    io: str | None = None
    index: int = 0

    @property
    def where(self) -> str:
        return f"{self.section} encoding {self.name!r}"


@dataclass
class AimetFile:
    """A parsed AIMET encodings file."""

    path: str
    version: str
    entries: list[AimetEntry]
    #: the 0.6.1 torch layout (``load_encodings``'s): activations keyed by module
    torch_layout: bool


# ------------------------------------------------------------------------------------------ reading
def is_aimet_file(data: Any) -> bool:
    """Whether parsed JSON is a file AIMET wrote rather than graphlora's own: AIMET names itself
    as the producer (``{"package": "aimet-torch", ...}``), and its 2.0.0 (``encodings``) and
    0.6.1 (sections as dicts keyed by name) layouts are never graphlora's. A 1.0.0-shaped file
    from elsewhere is graphlora's schema; its entries without a ``graphlora`` object are then
    read, or refused, one by one."""
    if not isinstance(data, dict):
        return False
    producer = data.get("producer")
    package = producer.get("package") if isinstance(producer, dict) else producer
    if isinstance(package, str) and package.lower().startswith("aimet"):
        return True
    if str(data.get("version", "")) == "2.0.0" or "encodings" in data:
        return True
    return any(isinstance(data.get(key), dict) for key in ("param_encodings", "activation_encodings"))


def read_json(path: str | os.PathLike) -> Any:
    """Parse an encodings file with :mod:`graphlora.io.json_file` (FileFormatErrors for a missing,
    non-UTF-8, nested-bomb or broken file)."""
    return _read_json(path, what="an encodings file")


def read_aimet_file(path: str | os.PathLike) -> AimetFile:
    """Parse any AIMET encodings file (0.6.1 dicts, 1.0.0 lists, 2.0.0) into entries."""
    where = os.fspath(path)
    data = read_json(path)
    if not isinstance(data, dict):
        raise FileFormatError(f"{where!r} is not an AIMET encodings file: expected a JSON object")
    version = str(data.get("version", "0.6.1"))
    try:
        if "encodings" in data or version.startswith("2."):
            if not version.startswith("2."):
                raise FileFormatError(f"an 'encodings' list needs version 2.0.0, the file says {version}")
            entries = [_entry_2(e, i) for i, e in enumerate(_list(data, "encodings"))]
            return AimetFile(where, "2.0.0", entries, False)
        params, acts = data.get("param_encodings", {}), data.get("activation_encodings", {})
        if "param_encodings" not in data and "activation_encodings" not in data:
            raise FileFormatError("no 'param_encodings' / 'activation_encodings' (nor a 2.0.0 'encodings' list)")
        if isinstance(params, list) or isinstance(acts, list):
            if not version.startswith("1."):
                raise FileFormatError(f"encodings as lists are version 1.0.0, the file says {version}")
            entries = [_entry_1(e, "param", i) for i, e in enumerate(_list(data, "param_encodings"))]
            entries += [_entry_1(e, "activation", i) for i, e in enumerate(_list(data, "activation_encodings"))]
            return AimetFile(where, "1.0.0", entries, False)
        if not isinstance(params, dict) or not isinstance(acts, dict):
            raise FileFormatError("0.6.1 sections must be objects keyed by name")
        entries = [_entry_0(name, value, "param") for name, value in params.items()]
        torch_layout = any(isinstance(v, dict) and ({"input", "output"} & set(v)) for v in acts.values())
        for name, value in acts.items():
            if torch_layout:
                entries += _module_entries(name, value)
            else:
                entries.append(_entry_0(name, value, "activation"))
        return AimetFile(where, "0.6.1", entries, torch_layout)
    except FileFormatError as exc:
        raise FileFormatError(f"{where!r}: {exc}") from None


def _list(data: dict, key: str) -> list:
    value = data.get(key, [])
    if not isinstance(value, list):
        raise FileFormatError(f"{key} must be a list")
    return value


def _fail(where: str, msg: str):
    raise FileFormatError(f"{where}: {msg}")


def _floats(values: Any, where: str, what: str) -> torch.Tensor:
    try:
        t = torch.tensor(values, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError):
        _fail(where, f"{what} must be a number or a (nested) list of numbers")
    if t.numel() == 0 or not bool(torch.isfinite(t).all()) or not bool((t > 0).all()):
        _fail(where, f"{what} must be finite and > 0")
    f32 = t.to(torch.float32)
    if not torch.equal(f32.to(torch.float64), t):
        _fail(where, f"{what} holds values that are not float32 (AIMET writes float32 scales)")
    return f32


def _ints(values: Any, where: str, what: str) -> torch.Tensor:
    try:
        t = torch.tensor(values)
    except (TypeError, ValueError, RuntimeError):
        _fail(where, f"{what} must be an integer or a (nested) list of integers")
    if t.dtype.is_floating_point:
        if not bool((t == t.round()).all()):
            _fail(where, f"{what} must be integers")
    return t.to(torch.int64)


def _bitwidth(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value not in (2, 4, 8, 16, 32):
        _fail(where, f"bit width must be 4, 8, 16 or 32, got {value!r}")
    return int(value)


def _bool(value: Any, where: str, what: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    _fail(where, f"{what} must be true/false, got {value!r}")


def _refuse_unsupported(d: Mapping, where: str) -> None:
    for key, why in (("zero_point_shift", "a half-step zero point shift"),
                     ("per_block_int_scale", "low-power blockwise (LPBQ) scales"),
                     ("per_channel_float_scale", "low-power blockwise (LPBQ) scales"),
                     ("rows_per_block", "vector quantization"), ("vector_dim", "vector quantization")):
        if key in d and d[key] not in (None, 0, 0.0):
            _fail(where, f"{why} ({key!r}) has no graphlora equivalent")


def _entry_0(name: str, value: Any, section: Section, *, module: str | None = None,
             io: str | None = None, index: int = 0) -> AimetEntry:
    where = f"{section} encoding {name!r}"
    items = [value] if isinstance(value, dict) else value
    if not isinstance(items, list) or not items or not all(isinstance(e, dict) for e in items):
        _fail(where, "expected a list of per-channel encoding objects")
    for e in items:
        _refuse_unsupported(e, where)
    try:
        dtype = str(items[0].get("dtype", "int")).lower()
        bw = _bitwidth(items[0]["bitwidth"], where)
        sym = _bool(items[0]["is_symmetric"], where, "is_symmetric")
        if any((e["bitwidth"], str(e["is_symmetric"]).lower(), str(e.get("dtype", "int")).lower())
               != (bw, str(sym).lower(), dtype) for e in items):
            _fail(where, "channels disagree on bitwidth, symmetry or dtype")
        scale = _floats([e["scale"] for e in items], where, "scale") if dtype == "int" else \
            torch.ones(len(items))
        offset = _ints([e.get("offset", 0) for e in items], where, "offset") if dtype == "int" else None
    except KeyError as exc:
        _fail(where, f"lacks key {exc}")
    enc_type = "PER_TENSOR" if len(items) == 1 else "PER_CHANNEL"  # blocks: the consumer tells
    return AimetEntry(name, section, "0.6.1", bw, sym, sym, scale, _zero_point(offset, bw, sym, where),
                      enc_type, dtype=dtype, module=module, io=io, index=index)


def _zero_point(offset: torch.Tensor | None, bw: int, sym: bool, where: str) -> torch.Tensor | None:
    """The zero point on the entry's own grid from AIMET's offset (``qmin - offset``): AIMET's
    0.6.1/1.0.0 grids are signed when symmetric (zero point 0), unsigned otherwise."""
    if offset is None:
        return None
    zp = (-(2 ** (bw - 1)) if sym else 0) - offset
    if sym and bool((zp != 0).any()):
        _fail(where, f"a symmetric entry's offset must be {-(2 ** (bw - 1))} (AIMET's signed grid), "
                     f"got {int(offset.reshape(-1)[(zp.reshape(-1) != 0).nonzero()[0, 0]])}")
    if not sym and (bool((zp < 0).any()) or bool((zp > 2 ** bw - 1).any())):
        _fail(where, f"an offset puts the zero point outside [0, {2 ** bw - 1}]")
    return zp


def _module_entries(module: str, value: Any) -> list[AimetEntry]:
    where = f"activation encodings of module {module!r}"
    if not isinstance(value, dict):
        _fail(where, "expected {'input': {...}, 'output': {...}}")
    out = []
    for io in ("input", "output"):
        slots = value.get(io, {})
        if not isinstance(slots, dict):
            _fail(where, f"{io!r} must map indices to encodings")
        for index, enc in slots.items():
            try:
                i = int(index)
            except ValueError:
                _fail(where, f"{io} index {index!r} is not an integer")
            name = f"{module}.{io}" + ("" if i == 0 else f".{i}")
            out.append(_entry_0(name, enc, "activation", module=module, io=io, index=i))
    return out


def _entry_1(e: Any, section: Section, i: int) -> AimetEntry:
    if not isinstance(e, dict) or not isinstance(e.get("name"), str):
        _fail(f"{section}_encodings[{i}]", "expected an object with a name")
    name = e["name"]
    where = f"{section} encoding {name!r}"
    _refuse_unsupported(e, where)
    enc_type = e.get("enc_type", "PER_TENSOR")
    if enc_type not in ("PER_TENSOR", "PER_CHANNEL", "PER_BLOCK"):
        _fail(where, f"enc_type {enc_type!r} has no graphlora equivalent (PER_TENSOR, PER_CHANNEL, PER_BLOCK)")
    dtype = str(e.get("dtype", "INT")).lower()
    try:
        bw = _bitwidth(e["bw"], where)
        sym = _bool(e.get("is_sym", False), where, "is_sym")
        scale = _floats(e["scale"], where, "scale").reshape(-1) if dtype == "int" else torch.ones(1)
        offset = _ints(e["offset"], where, "offset").reshape(-1) if dtype == "int" else None
    except KeyError as exc:
        _fail(where, f"lacks key {exc}")
    if offset is not None and offset.numel() != scale.numel():
        _fail(where, f"{scale.numel()} scales but {offset.numel()} offsets")
    block = e.get("block_size")
    if enc_type == "PER_BLOCK" and (isinstance(block, bool) or not isinstance(block, int) or block < 1):
        _fail(where, f"PER_BLOCK needs a positive integer block_size, got {block!r}")
    return AimetEntry(name, section, "1.0.0", bw, sym, sym, scale, _zero_point(offset, bw, sym, where),
                      enc_type, block if enc_type == "PER_BLOCK" else None, dtype=dtype)


_DTYPES_2 = {f"{s}int{b}": (s == "", b) for s in ("", "u") for b in (4, 8, 16, 32)}


def _entry_2(e: Any, i: int) -> AimetEntry:
    if not isinstance(e, dict) or not isinstance(e.get("name"), str):
        _fail(f"encodings[{i}]", "expected an object with a name")
    name = e["name"]
    where = f"encoding {name!r}"
    _refuse_unsupported(e, where)
    out_dtype = e.get("output_dtype")
    if out_dtype not in _DTYPES_2:
        if isinstance(out_dtype, str) and out_dtype.startswith(("float", "bfloat")):
            return AimetEntry(name, "activation", "2.0.0", 16, True, True, torch.ones(1), None,
                              "PER_TENSOR", dtype="float")
        _fail(where, f"output_dtype {out_dtype!r} is not an integer type")
    signed, bw = _DTYPES_2[out_dtype]
    if "y_scale" not in e:
        _fail(where, "lacks key 'y_scale'")
    scale = _floats(e["y_scale"], where, "y_scale")
    zp = None
    if e.get("y_zero_point") is not None:
        zp = _ints(e["y_zero_point"], where, "y_zero_point")
        if zp.dim() == 0 and scale.dim() > 0:
            zp = zp.expand(scale.shape).clone()
        if tuple(zp.shape) != tuple(scale.shape):
            _fail(where, f"y_zero_point shape {tuple(zp.shape)} differs from y_scale's {tuple(scale.shape)}")
    axis, block = e.get("axis"), e.get("block_size")
    if axis is not None and (isinstance(axis, bool) or not isinstance(axis, int)):
        _fail(where, f"axis must be an integer, got {axis!r}")
    if block is not None and (isinstance(block, bool) or not isinstance(block, int) or block < 1):
        _fail(where, f"block_size must be a positive integer, got {block!r}")
    if block is not None and (axis is None or scale.dim() < 1):
        _fail(where, "a block_size needs an axis and a y_scale tensor")
    enc_type = "PER_BLOCK" if block is not None else ("PER_CHANNEL" if scale.dim() >= 1 and scale.numel() > 1 else "PER_TENSOR")
    symmetric = zp is None or (not signed and bool((zp == 2 ** (bw - 1)).all()))
    return AimetEntry(name, "any", "2.0.0",
                      bw, symmetric, signed, scale, zp, enc_type, block, axis)


# ------------------------------------------------------------------------------------------ writing
def legacy_entries(encoding: Encoding) -> list[dict]:
    """AIMET's 0.6.1 per-channel dicts of an integer encoding, in the order of ``scale``'s
    canonical ``(C,)`` / ``(C, G)`` layout — AIMET's quantizer shape for an ``(out, in)`` weight.

    ``min``/``max`` are what AIMET writes (``scale * (offset + qmin)`` / ``(offset + qmax)`` in
    float32 on its grid), except that ``max`` moves by the fewest float32 ulps needed for AIMET's
    reader — which recomputes ``scale = (max - min) / (qmax - qmin)`` in float32 and keeps no
    ``scale`` — to get graphlora's scale back bit for bit (:func:`exact_max`).
    """
    q = encoding.qtype
    if q.kind != "int":
        raise FileFormatError(f"{encoding.name or 'encoding'}: AIMET files have no {q.name} encodings")
    scale = encoding.scale.to(torch.float32).reshape(-1)
    zp = (encoding.zero_point if encoding.zero_point is not None
          else torch.zeros(encoding.scale.shape, dtype=torch.int32)).reshape(-1).to(torch.int64)
    if q.signed and encoding.symmetric and not bool((zp != 0).any()):
        # AIMET's signed symmetric grid: internal offset 0, codes [-2**(b-1), 2**(b-1) - 1]
        qmin, qmax, internal = -(2 ** (q.bits - 1)), 2 ** (q.bits - 1) - 1, torch.zeros_like(zp)
    else:
        # AIMET's asymmetric grids are unsigned; a signed grid with a zero point is the same grid
        # shifted by 2**(b-1) (code q <-> q + 2**(b-1)), so it is written as its unsigned twin
        shift = 2 ** (q.bits - 1) if q.signed else 0
        qmin, qmax, internal = 0, 2 ** q.bits - 1, -(zp + shift)
    lo = scale * (internal + qmin).to(torch.float32)
    hi = exact_max(lo, scale * (internal + qmax).to(torch.float32), scale, qmax - qmin)
    legacy_offset = internal + qmin
    sym = "True" if qmin < 0 else "False"
    return [
        {"bitwidth": q.bits, "dtype": "int", "is_symmetric": sym, "max": float(h), "min": float(l),
         "offset": int(o), "scale": float(s)}
        for l, h, o, s in zip(lo.tolist(), hi.tolist(), legacy_offset.tolist(), scale.tolist())
    ]


def exact_max(lo: torch.Tensor, hi: torch.Tensor, scale: torch.Tensor, steps: int,
              reach: int = 16) -> torch.Tensor:
    """``hi`` nudged (by at most ``reach`` float32 ulps, nearest first) so that
    ``float32((hi - lo) / steps) == scale`` where such a value exists; unchanged elsewhere."""
    best = hi.clone()
    found = (hi - lo) / steps == scale
    up, down = hi.clone(), hi.clone()
    inf = torch.full_like(hi, float("inf"))
    for _ in range(reach):
        up, down = torch.nextafter(up, inf), torch.nextafter(down, -inf)
        for cand in (up, down):
            hit = ~found & ((cand - lo) / steps == scale)
            best = torch.where(hit, cand, best)
            found |= hit
        if bool(found.all()):
            break
    return best


def aimet_torch_document(params: Mapping[str, Encoding],
                         activations: Mapping[tuple[str, str, int], Encoding]) -> dict:
    """The 0.6.1 torch-layout document: ``params`` by parameter name, ``activations`` by
    ``(module, "input"|"output", index)``."""
    from graphlora.version import __version__

    acts: dict[str, dict] = {}
    for (module, io, index), enc in sorted(activations.items()):
        (entry,) = legacy_entries(enc)
        acts.setdefault(module, {}).setdefault(io, {})[str(index)] = entry
    return {
        "activation_encodings": acts,
        "excluded_layers": [],
        "param_encodings": {name: legacy_entries(params[name]) for name in sorted(params)},
        "producer": {"package": "graphlora", "version": __version__},
        "quantizer_args": {},
        "version": "0.6.1",
    }


def write_aimet_torch_file(path: str | os.PathLike, params: Mapping[str, Encoding],
                           activations: Mapping[tuple[str, str, int], Encoding]) -> None:
    """Write :func:`aimet_torch_document` atomically."""
    text = json.dumps(aimet_torch_document(params, activations), indent=4, sort_keys=True)
    with atomic_write(path, "w", encoding="utf-8") as f:
        f.write(text)


def block_count(shape: tuple[int, ...], block_size: int) -> int:
    """Blocks along the input axis of an ``(out, in)`` weight."""
    return shape[0] * math.ceil(shape[1] / block_size)
