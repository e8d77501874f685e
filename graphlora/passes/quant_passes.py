"""Which quantization passes run around LoRA insertion for a rule set.

Filled in by the quantization work: ``before_lora`` (weight quantization of the base) and
``after_lora`` (activation observers, LoRA-branch quantization).
"""

from __future__ import annotations

from graphlora.passes.base import GraphPass
from graphlora.rules import QuantRule


def before_lora(rules: list[QuantRule]) -> list[GraphPass]:
    return []


def after_lora(rules: list[QuantRule]) -> list[GraphPass]:
    return []
