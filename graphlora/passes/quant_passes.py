"""Which quantization passes run around LoRA insertion in :func:`graphlora.transform`.

Weights are quantized before LoRA is inserted (the LoRA branch trains on the quantized base);
activation encodings need data, so they come later from :func:`graphlora.calibrate`.
"""

from __future__ import annotations

from typing import Any, Iterable

from graphlora.passes.base import GraphPass
from graphlora.passes.gptq import GPTQPass
from graphlora.passes.quantize_weights import QuantizeWeightsPass, Storage
from graphlora.rules import QuantRule


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
    if any(r.weight_qtype and r.weight_calibration == "gptq" for r in rules):
        passes.append(GPTQPass(calibration_data, storage=storage, progress=progress))
    return passes
