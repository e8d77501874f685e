"""What a LoraModel holds, for the user to inspect: its matched sites, quantization encodings,
memory, parameter counts and the base model's weights under their original names.

A mixin of :class:`graphlora.LoraModel`; everything here reads the canonical graph
(``graph_module``) and changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from graphlora import meta
from graphlora.graph_utils import is_own
from graphlora.passes.weights import dequant_node
from graphlora.rules import QuantRule
from graphlora.sites import tagged_sites

if TYPE_CHECKING:
    from graphlora.quant import Encoding

__all__ = ["MatchedSite", "ModelContents"]


@dataclass(frozen=True)
class MatchedSite:
    """A linear site a rule matched: where it is, its shape, and the rule that won."""

    module_path: str
    kind: str
    in_features: int
    out_features: int
    weight_name: str
    use_index: int
    rule_index: int
    rule: QuantRule
    fan_in_fan_out: bool  # the parameter is stored (in, out), like transformers' Conv1D
    weight_qtype: str | None = None  # how the base weight is stored now (None: float)


class ModelContents:
    """The inspection side of :class:`graphlora.LoraModel` (mixed in; reads ``graph_module``)."""

    @property
    def sites(self) -> list[MatchedSite]:
        out = []
        for site in tagged_sites(self.graph_module):
            info = meta.info(site.node)
            s = site.spec
            out.append(
                MatchedSite(
                    module_path=s.module_path,
                    kind=s.kind,
                    in_features=s.in_features,
                    out_features=s.out_features,
                    weight_name=s.weight_name,
                    use_index=s.use_index,
                    rule_index=info["rule_index"],
                    rule=info["rule"],
                    fan_in_fan_out=s.param_layout == "in_out" and s.site_kind == "linear",
                    weight_qtype=info.get("weight_qtype")
                    or (info["weight_encoding"].qtype.name if "weight_encoding" in info else None),
                )
            )
        return out

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, all) parameter counts; a quantized weight counts its original elements."""
        # parameters() yields a tensor shared by several modules (tied weights) once
        params = list(self.parameters())
        trainable = sum(p.numel() for p in params if p.requires_grad)
        total = sum(p.numel() for p in params)
        # quantized base weights are buffers now: count the parameters they encode
        total += int(self.memory_report()["quantized_params"])
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        pct = 100 * trainable / total if total else 0.0
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {pct:.4f}")

    # ------------------------------------------------------------------ quantization

    def encodings(self) -> dict[str, "Encoding"]:
        """Every quantization encoding in the model, by tensor name.

        Base weights by parameter name (``encoder.layer.0.attention.self.query.weight``),
        activations as ``<site>.input`` / ``<site>.lora_A.output``, LoRA weights as
        ``<site>.lora_A.weight``.
        """
        found: dict[str, Any] = {}
        for node in self.graph_module.graph.nodes:
            info = meta.info(node)
            if info.get("role") in ("dequant", "fake_quant") and "encoding" in info:
                found[info["tensor"]] = info["encoding"]
            elif info.get("role") == "base" and "weight_encoding" in info:
                found[info["site"].weight_name] = info["weight_encoding"]
        return found

    def memory_report(self) -> dict[str, float]:
        """Bytes held by the base weights (quantized and float) and by LoRA, and bits per
        quantized parameter (codes plus scales and zero points)."""
        gm = self.graph_module
        lora_ids = {id(p) for a in self._adapters for p in self.lora_parameters(a)}
        quant_bytes = sum(
            b.numel() * b.element_size()
            for n, b in gm.named_buffers()
            if n.startswith("graphlora_quant.weight.")
        )
        quantized_params = sum(
            int(torch.Size(info["encoding"].shape).numel())
            for node in gm.graph.nodes
            for info in [meta.info(node)]
            if info.get("role") == "dequant"
        )
        float_bytes = 0
        lora_bytes = 0
        for p in gm.parameters():  # each shared (tied) tensor once
            nbytes = p.numel() * p.element_size()
            if id(p) in lora_ids:
                lora_bytes += nbytes
            else:
                float_bytes += nbytes
        return {
            "base_bytes": float(float_bytes + quant_bytes),
            "float_base_bytes": float(float_bytes),
            "quantized_weight_bytes": float(quant_bytes),
            "quantized_params": float(quantized_params),
            "bits_per_quantized_param": (8.0 * quant_bytes / quantized_params) if quantized_params else 0.0,
            "lora_bytes": float(lora_bytes),
        }

    # ------------------------------------------------------------------ base weights

    def base_state_dict(self) -> dict[str, torch.Tensor]:
        """The base model's tensors under the original model's state-dict keys.

        Weights a quantization pass replaced are evaluated through their dequantize nodes, so
        the result has the float weights the base computes with (on the quantization grid) —
        also when the float parameter is still there for another reader (a quantized
        ``lm_head`` tied to the embedding).
        """
        gm = self.graph_module
        state = {
            k: v
            for k, v in gm.state_dict().items()
            if not is_own(k)
        }
        for site in tagged_sites(gm):
            name = site.spec.weight_name
            if name not in state or dequant_node(site) is not None:
                state[name] = site.param_value().detach()
        order = gm.meta.get(meta.STATE_KEYS_KEY)
        if order:
            state = {k: state[k] for k in order if k in state} | {
                k: v for k, v in state.items() if k not in set(order)
            }
        return state
