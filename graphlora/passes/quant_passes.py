"""Which quantization passes run around LoRA insertion in :func:`graphlora.transform`.

Weights are quantized before LoRA is inserted (the LoRA branch trains on the quantized base);
activation encodings need data, so they come later from :func:`graphlora.calibrate`.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable, Iterable

from graphlora.errors import QuantizationError
from graphlora.passes.base import GraphPass
from graphlora.passes.gptq import GPTQPass
from graphlora.passes.quantize_weights import QuantizeWeightsPass, Storage
from graphlora.rules import QuantRule

#: the pass that runs each data-driven weight method of graphlora.quant.weight_methods
DATA_METHOD_PASSES: dict[str, Callable[..., GraphPass]] = {
    "gptq": GPTQPass,
    "seqmse": partial(GPTQPass, method="seqmse"),
    "adaround": partial(GPTQPass, method="adaround"),
}


def data_method_passes(
    methods: Iterable[str],
    calibration_data: Iterable[Any] | None,
    *,
    storage: Storage,
    num_batches: int | None = None,
    progress: bool = True,
) -> list[GraphPass]:
    """One pass per data-driven method in ``methods`` (each once, in the order given)."""
    passes = []
    for name in dict.fromkeys(methods):
        factory = DATA_METHOD_PASSES.get(name)
        if factory is None:
            raise QuantizationError(f"weight method {name!r} needs data but no pass runs it")
        passes.append(factory(calibration_data, storage=storage, num_batches=num_batches,
                              progress=progress))
    return passes


def before_lora(
    rules: list[QuantRule],
    *,
    storage: Storage = "packed",
    calibration_data: Iterable[Any] | None = None,
    progress: bool = True,
) -> list[GraphPass]:
    passes: list[GraphPass] = []
    if any(r.weight_qtype for r in rules):
        passes.append(QuantizeWeightsPass(storage=storage))
    data_methods = [r.weight_calibration for r in rules if r.needs_calibration_data]
    passes += data_method_passes(data_methods, calibration_data, storage=storage, progress=progress)
    return passes
