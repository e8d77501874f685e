"""The registry of quantized types (qtypes) graphlora knows.

A qtype says what a quantized value *is* — its bit width, its integer grid ``[qmin, qmax]`` (or, for
``nf4``, its 16-entry codebook; for ``fp8_e4m3``, its float format), the torch dtype its unpacked
codes live in and whether storage packs two codes per byte. It says nothing about scales or zero
points: those belong to an :class:`~graphlora.quant.encoding.Encoding`.

Code dtypes are chosen so every code fits and torch has kernels for it on CPU: 4-bit codes are held
unpacked in ``int8``/``uint8`` and packed two per byte for storage; ``uint16`` codes are held in
``int32`` because torch has almost no ``uint16`` kernels.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import torch

from graphlora.errors import QuantizationError

Kind = Literal["int", "nf4", "float8"]
Grid = Literal["full", "restricted"]

#: the symmetric integer grids: ``full`` uses every code of the type (int4: -8..7, AIMET's), its
#: scale ``max(|min| / 2**(b-1), max / (2**(b-1) - 1))`` so the more negative side may use the extra
#: code; ``restricted`` drops the most negative code (int4: -7..7) so the grid is mirror-symmetric,
#: its scale ``max|w| / (2**(b-1) - 1)``. Asymmetric grids (with a zero point) are always full.
GRIDS: tuple[str, ...] = ("full", "restricted")

#: the grid a symmetric integer encoding gets when nobody names one, per qtype: measured on the
#: pretrained MiniLM (held-out cosine, ``benchmarks/bench_quant.py``; numbers in docs/qw-lora.md)
DEFAULT_GRIDS: dict[str, str] = {
    "int4": "full", "uint4": "full", "int8": "full", "uint8": "full", "int16": "full",
    "uint16": "full",
}

# The 16 NormalFloat4 levels of the QLoRA paper (Dettmers et al. 2023, appendix E), exactly as
# bitsandbytes tabulates them (functional.py ``get_4bit_type("nf4")`` / csrc ``nf4_data``): code i
# dequantizes to NF4_CODEBOOK[i] * absmax. Index 7 is exactly zero.
NF4_CODEBOOK: tuple[float, ...] = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)


@dataclass(frozen=True)
class QType:
    """One quantized type.

    ``qmin``/``qmax`` are the integer code range for ``kind == "int"``, the code index range
    (0..15) for ``nf4`` and the largest finite magnitude (±448) for ``fp8_e4m3``. ``signed`` refers
    to the code grid (nf4 codes are unsigned indices even though the values they stand for are
    signed). ``grid`` is ``"full"`` for the registry's types; :func:`with_grid` gives the
    ``"restricted"`` variant of an integer type (``qmin`` one higher, same name), which is what
    quantization clamps to — so every function taking a QType honours the grid it carries.
    """

    name: str
    bits: int
    signed: bool
    qmin: int
    qmax: int
    kind: Kind
    code_dtype: torch.dtype
    packed: bool
    for_weights: bool
    for_activations: bool
    grid: Grid = "full"

    @property
    def storage_dtype(self) -> torch.dtype:
        """dtype of the stored tensor: packed 4-bit types are stored as ``uint8`` bytes."""
        return torch.uint8 if self.packed else self.code_dtype

    @property
    def is_integer(self) -> bool:
        return self.kind == "int"

    @property
    def levels(self) -> int:
        return 2**self.bits

    @property
    def full(self) -> QType:
        """The registry's (full-range) type of the same name."""
        return _REGISTRY[self.name]

    def codebook(self) -> torch.Tensor:
        """The float32 codebook of an ``nf4`` qtype (code -> normalised value)."""
        if self.kind != "nf4":
            raise QuantizationError(f"qtype {self.name!r} has no codebook (kind {self.kind!r})")
        return torch.tensor(NF4_CODEBOOK, dtype=torch.float32)


def _int(name: str, bits: int, signed: bool, code_dtype: torch.dtype, *, weights: bool,
         activations: bool) -> QType:
    qmin, qmax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    return QType(name, bits, signed, qmin, qmax, "int", code_dtype, bits == 4, weights, activations)


_REGISTRY: dict[str, QType] = {
    q.name: q
    for q in (
        _int("int4", 4, True, torch.int8, weights=True, activations=False),
        _int("uint4", 4, False, torch.uint8, weights=True, activations=False),
        _int("int8", 8, True, torch.int8, weights=True, activations=True),
        _int("uint8", 8, False, torch.uint8, weights=True, activations=True),
        _int("int16", 16, True, torch.int16, weights=False, activations=True),
        _int("uint16", 16, False, torch.int32, weights=False, activations=True),
        QType("nf4", 4, False, 0, 15, "nf4", torch.uint8, True, True, False),
        QType("fp8_e4m3", 8, True, -448, 448, "float8", torch.float8_e4m3fn, False, True, False),
    )
}


# one restricted variant per integer qtype, so `with_grid` always returns the same object
_RESTRICTED: dict[str, QType] = {
    q.name: replace(q, qmin=q.qmin + 1, grid="restricted") for q in _REGISTRY.values()
    if q.kind == "int"
}


def qtype_names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def get_qtype(name: str | QType) -> QType:
    """Look a qtype up by name (a :class:`QType` is returned unchanged)."""
    if isinstance(name, QType):
        return name
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise QuantizationError(
            f"unknown qtype {name!r}; valid qtypes are: {', '.join(_REGISTRY)}"
        ) from None


def check_qtype_use(name: str | QType, use: Literal["weight", "activation"]) -> QType:
    """Return the qtype if it may be used for ``use``, else raise a QuantizationError saying which
    qtypes may."""
    qtype = get_qtype(name)
    if not is_valid_for(qtype, use):
        valid = [q.name for q in _REGISTRY.values() if is_valid_for(q, use)]
        raise QuantizationError(
            f"qtype {qtype.name!r} cannot be used for {use}s; {use} qtypes are: {', '.join(valid)}"
        )
    return qtype


def is_valid_for(name: str | QType, use: Literal["weight", "activation"]) -> bool:
    """Whether a qtype may quantize weights (``"weight"``) or activations (``"activation"``)."""
    qtype = get_qtype(name)
    if use == "weight":
        return qtype.for_weights
    if use == "activation":
        return qtype.for_activations
    raise ValueError(f"use must be 'weight' or 'activation', not {use!r}")


def with_grid(qtype: str | QType, grid: str) -> QType:
    """``qtype`` on the symmetric grid ``grid`` (see :data:`GRIDS`). Only integer types have a
    restricted grid; ``"full"`` is the registry's type itself."""
    qt = get_qtype(qtype).full
    if grid == "full":
        return qt
    if grid != "restricted":
        raise QuantizationError(f"unknown grid {grid!r}; grids are: {', '.join(GRIDS)}")
    if qt.kind != "int":
        raise QuantizationError(
            f"qtype {qt.name!r} has no restricted grid (only integer qtypes do; {qt.kind} grids "
            "are symmetric by construction)")
    return _RESTRICTED[qt.name]


def default_grid(qtype: str | QType) -> str:
    """The measured default grid of a qtype (``"full"`` for non-integer kinds)."""
    return DEFAULT_GRIDS.get(get_qtype(qtype).name, "full")


def resolve_grid(qtype: str | QType, grid: str | None, symmetric: bool) -> QType:
    """The QType a calibration quantizes to.

    ``grid`` names the grid; None means: a QType object keeps the grid it carries (so an
    encoding's qtype reproduces its grid exactly), a qtype *name* gets its default grid. Only
    symmetric integer encodings have a choice: asymmetric ones (a zero point) always use the
    full range, and asking for ``"restricted"`` there is an error.
    """
    qt = get_qtype(qtype)
    if grid is None:
        grid = qt.grid if isinstance(qtype, QType) or not symmetric else default_grid(qt)
    if grid not in GRIDS:
        raise QuantizationError(f"unknown grid {grid!r}; grids are: {', '.join(GRIDS)}")
    if qt.kind != "int":
        if grid == "restricted":
            with_grid(qt, grid)  # raises, naming the qtype
        return qt
    if not symmetric:
        if grid == "restricted":
            raise QuantizationError(
                f"{qt.name}: the restricted grid is symmetric; an asymmetric encoding (with a "
                "zero point) always uses the full range")
        return qt.full
    return with_grid(qt, grid)
