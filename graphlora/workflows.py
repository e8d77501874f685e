"""QW-LoRA and QWA-LoRA: quantization-aware LoRA as three explicit, separately callable steps.

QW-LoRA (AIMET's workflow):

1. :meth:`QuantLoraWorkflow.quantize_base` — compute encodings for the base weights (any
   calibration method, GPTQ, or encodings supplied by the user) and *apply* them: each weight is
   replaced by ``dequantize(quantize(W))``, exactly on the grid, frozen. The encodings are kept.
2. :meth:`QuantLoraWorkflow.train` — LoRA trains on the quantized base (:func:`train_lora`, or
   any loop of your own on ``workflow.model``).
3. :meth:`QuantLoraWorkflow.ptq` — calibrate the base's activation encodings and the LoRA
   branches' weight and activation encodings. Step 1's weight encodings are reused, never
   recomputed.

QWA-LoRA moves the base *activation* calibration into step 1 (frozen before training, so LoRA
trains against a fake-quantized base) and step 3 calibrates the LoRA encodings only.

Each step is a graph pass (or a pipeline of them) recorded in ``model.pass_log`` when the workflow
was created with ``record=True``.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Iterable, Literal, Mapping

import torch.nn as nn

from graphlora import meta
from graphlora.calibration import calibrate
from graphlora.errors import GraphloraError, InputError
from graphlora.model import LoraModel
from graphlora.passes.base import GraphPass, PassRecord, PassResult
from graphlora.passes.quant_passes import data_method_passes
from graphlora.passes.quantize_weights import QuantizeWeightsPass
from graphlora.quant import Encoding
from graphlora.quant.weight_methods import weight_method
from graphlora.sites import tagged_sites
from graphlora.train import TrainResult, train_lora

Variant = Literal["qw", "qwa"]


@dataclasses.dataclass
class RetagRulesPass(GraphPass):
    """Override fields of the rules tagged on sites (e.g. the activation bit width for PTQ)."""

    changes: Mapping[str, Any]

    def call(self, gm):
        changed = False
        for site in tagged_sites(gm):
            rule = site.rule
            if rule is None:
                continue
            new = dataclasses.replace(rule, **self.changes)
            if new != rule:
                meta.tag(site.node, "base", rule=new)
                changed = True
        return PassResult(gm, changed)


class QuantLoraWorkflow:
    """QW-LoRA (``variant="qw"``) or QWA-LoRA (``variant="qwa"``) on one LoraModel."""

    def __init__(self, model: LoraModel, variant: Variant = "qw"):
        if variant not in ("qw", "qwa"):
            raise InputError(f"variant must be 'qw' or 'qwa', got {variant!r}")
        if not any(s.rule is not None and s.rule.weight_qtype for s in model.sites):
            raise InputError(
                "the workflow quantizes base weights, but no rule of this model has a weight_qtype"
            )
        self.model = model
        self.variant = variant
        self.steps_done: list[str] = []

    # ----------------------------------------------------------------- step 1

    def quantize_base(
        self,
        *,
        method: str | None = None,
        encodings: Mapping[str, Encoding] | str | os.PathLike | None = None,
        calibration_data: Iterable[Any] | None = None,
        num_batches: int | None = None,
        progress: bool = True,
    ) -> dict[str, Encoding]:
        """Step 1: compute (or take) base weight encodings and apply them to the weights.

        ``method`` overrides the rules' ``weight_calibration`` (``absmax``, ``minmax``, ``mse``,
        ``gptq``); ``encodings`` — a dict by parameter name or an encodings-file path — are used
        instead of computing any (a weight the rules quantize without an entry there is an error). ``calibration_data`` feeds GPTQ and, for QWA-LoRA, the base
        activation calibration.
        """
        if "quantize_base" in self.steps_done:
            raise GraphloraError("step 1 (quantize_base) already ran on this model")
        if isinstance(encodings, (str, os.PathLike)):
            from graphlora.io.encodings_file import load_encodings

            encodings = load_encodings(encodings)
        if encodings is not None:
            # a full encodings file also holds activations and LoRA weights: step 1 takes the
            # base weights only (unknown weight names still fail loudly in the pass)
            encodings = {
                k: v
                for k, v in encodings.items()
                if v.shape and not k.endswith((".lora_A.weight", ".lora_B.weight"))
            }
        passes: list[GraphPass] = []
        if method is not None:
            passes.append(RetagRulesPass({"weight_calibration": method}))
        passes.append(QuantizeWeightsPass(storage="float", encodings=encodings, complete=encodings is not None))
        if encodings is None:
            chosen = [method] if method is not None else [s.rule.weight_calibration for s in self.model.sites if s.rule]
            data_methods = [m for m in chosen if weight_method(m).needs_data]
            if data_methods and calibration_data is None:
                raise InputError(f"{data_methods[0].upper()} (step 1) needs calibration_data")
            passes += data_method_passes(data_methods, calibration_data, storage="float",
                                         num_batches=num_batches, progress=progress)
        was_training = self.model.training
        self.model.eval()
        try:
            self.model.run_passes(passes)
        finally:
            self.model.train(was_training)
        self.steps_done.append("quantize_base")
        if self.variant == "qwa":
            if calibration_data is None:
                raise InputError("QWA-LoRA calibrates base activations in step 1: pass calibration_data")
            calibrate(self.model, calibration_data, num_batches=num_batches, targets="base", progress=progress)
        return {k: v for k, v in self.model.encodings().items() if v.shape}

    # ----------------------------------------------------------------- step 2

    def train(self, batches: Iterable[Any], loss_fn: Callable, **kwargs) -> TrainResult:
        """Step 2: LoRA training on the quantized base (see :func:`graphlora.train_lora`)."""
        self._require("quantize_base", "train")
        result = train_lora(self.model, batches, loss_fn, **kwargs)
        self.model.pass_log.append(PassRecord("train_lora", False, 0.0))
        self.steps_done.append("train")
        return result

    # ----------------------------------------------------------------- step 3

    def ptq(
        self,
        batches: Iterable[Any],
        *,
        act_qtype: str | None = None,
        lora_act_qtype: str | None = None,
        lora_weight_qtype: str | None = None,
        num_batches: int | None = None,
        progress: bool = True,
    ) -> dict[str, Encoding]:
        """Step 3: calibrate activation encodings (base and LoRA) and LoRA weight encodings.

        The qtype arguments override the rules (e.g. ``act_qtype="int16"``); base weight
        encodings stay those of step 1.
        """
        self._require("quantize_base", "ptq")
        changes = {
            k: v
            for k, v in dict(
                act_qtype=act_qtype, lora_act_qtype=lora_act_qtype, lora_weight_qtype=lora_weight_qtype
            ).items()
            if v is not None
        }
        if self.variant == "qwa":
            changes.pop("act_qtype", None)  # frozen before training
        if changes:
            self.model.run_passes([RetagRulesPass(changes)])
        targets = "lora" if self.variant == "qwa" else "all"
        result = calibrate(self.model, batches, num_batches=num_batches, targets=targets, progress=progress)
        self.steps_done.append("ptq")
        return result

    # ----------------------------------------------------------------- results

    def encodings(self) -> dict[str, Encoding]:
        return self.model.encodings()

    def save_encodings(self, path: str | os.PathLike) -> None:
        """All encodings as an AIMET-1.0.0-like JSON file (see :mod:`graphlora.io.encodings_file`)."""
        from graphlora.io.encodings_file import save_encodings

        save_encodings(self.model.encodings(), path)

    def _require(self, step: str, caller: str) -> None:
        if step not in self.steps_done:
            raise GraphloraError(f"{caller}() needs step {step!r} first (the QW-LoRA steps run in order)")


def _make(variant: Variant, model, rules, example_args, example_kwargs, **transform_kwargs) -> QuantLoraWorkflow:
    if isinstance(model, LoraModel):
        if rules is not None:
            raise InputError("pass rules only with a plain nn.Module; a LoraModel already has them")
        return QuantLoraWorkflow(model, variant)
    if not isinstance(model, nn.Module):
        raise InputError(f"expected an nn.Module or LoraModel, got {type(model).__name__}")
    from graphlora.pipeline import transform

    lora_model = transform(
        model, rules, example_args, example_kwargs, quantize_weights=False, **transform_kwargs
    )
    return QuantLoraWorkflow(lora_model, variant)


def qw_lora(model, rules=None, example_args: tuple = (), example_kwargs: dict | None = None, **transform_kwargs) -> QuantLoraWorkflow:
    """Start QW-LoRA: transform ``model`` with ``rules`` (weights not yet quantized)."""
    return _make("qw", model, rules, example_args, example_kwargs, **transform_kwargs)


def qwa_lora(model, rules=None, example_args: tuple = (), example_kwargs: dict | None = None, **transform_kwargs) -> QuantLoraWorkflow:
    """Start QWA-LoRA: like :func:`qw_lora`, with base activations frozen before training."""
    return _make("qwa", model, rules, example_args, example_kwargs, **transform_kwargs)
