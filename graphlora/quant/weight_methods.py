"""The registry of weight-calibration methods a rule may name (``weight_calibration=...``).

Callers ask the registry what a method *is* instead of comparing names: whether it works from the
weight alone (round-to-nearest: ``absmax``, ``minmax``, ``mse``) or needs calibration inputs
(``gptq``, run by a graph pass over data), which grid symmetry it implies, and what to use in a
context that has no data (re-quantizing a merged weight at save or export time). A new method is
one :func:`register_weight_method` call plus, for a data-driven one, the pass that runs it.
"""

from __future__ import annotations

from dataclasses import dataclass

from graphlora.errors import QuantizationError


@dataclass(frozen=True)
class WeightMethod:
    """What graphlora needs to know about one weight-calibration method."""

    name: str
    #: computed from calibration inputs by a graph pass, not from the weight alone
    needs_data: bool
    #: the grid it implies: True symmetric, False asymmetric, None either (the rule or qtype says)
    symmetric: bool | None
    #: the round-to-nearest method that stands in where no data is available
    data_free: str
    summary: str


_REGISTRY: dict[str, WeightMethod] = {}


def register_weight_method(method: WeightMethod) -> WeightMethod:
    """Add ``method`` (replacing one of the same name); its ``data_free`` stand-in must exist."""
    if method.data_free != method.name and method.data_free not in _REGISTRY:
        raise QuantizationError(
            f"weight method {method.name!r}: its data-free stand-in {method.data_free!r} is not registered"
        )
    _REGISTRY[method.name] = method
    return method


for _method in (
    WeightMethod("absmax", False, True, "absmax", "symmetric, range [-max|w|, max|w|]"),
    WeightMethod("minmax", False, False, "minmax", "asymmetric, range [min w, max w] with a zero point"),
    WeightMethod("mse", False, None, "mse", "the clipped range with the lowest quantization error"),
    WeightMethod("gptq", True, None, "mse", "GPTQ: error compensation from the Hessian of the inputs"),
    WeightMethod("seqmse", True, None, "mse",
                 "SeqMSE (AIMET): per channel/block, the clipping of the range with the lowest layer-output error"),
    WeightMethod("adaround", True, None, "mse",
                 "AdaRound: learned up/down rounding on mse scales, minimising the layer-output error"),
):
    register_weight_method(_method)


def weight_method_names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def weight_method(name: str | WeightMethod) -> WeightMethod:
    """Look a method up by name; an unknown name raises a QuantizationError listing the known ones."""
    if isinstance(name, WeightMethod):
        return name
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise QuantizationError(
            f"unknown weight calibration method {name!r}; known methods: {', '.join(_REGISTRY)}"
        ) from None


def data_free_method(name: str | None, symmetric: bool) -> str:
    """The round-to-nearest method to re-quantize with, without data, on a grid of ``symmetric``.

    A data-driven method gives way to its stand-in; a method whose implied symmetry contradicts
    the grid gives way to the method of that symmetry (absmax or minmax); an unknown or missing
    name does too.
    """
    known = _REGISTRY.get(name) if name is not None else None
    if known is not None and known.needs_data:
        known = _REGISTRY[known.data_free]
    if known is None or (known.symmetric is not None and known.symmetric != symmetric):
        return "absmax" if symmetric else "minmax"
    return known.name
