"""``graphlora.transform``: trace, match rules, quantize, insert LoRA — one pipeline of passes."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterable

import torch.fx as fx
import torch.nn as nn

from graphlora.adapters import ADAPTERS_ROOT, DEFAULT_ADAPTER, LoraSpec
from graphlora.errors import InputError, TraceError
from graphlora.model import LoraModel, model_class
from graphlora.passes.base import GraphPass, PassPipeline
from graphlora.lora_init import is_base_init
from graphlora.passes.insert_lora import InsertLoraPass
from graphlora.passes.lora_init import LoraInitPass
from graphlora.passes.load_checkpoint import LoadCheckpointPass, TensorSource
from graphlora.passes import quant_passes
from graphlora.passes.match_rules import MatchRulesPass
from graphlora.rules import LoraRule, QuantRule, normalize_rules
from graphlora.sites import tagged_sites
from graphlora.trace import TraceMethod, structure_copy, trace, trace_meta
from graphlora.validate import check_adapter_name


def lora_specs_from_rules(gm: fx.GraphModule, autocast_dtype: bool = True) -> dict[str, LoraSpec]:
    """Module path -> LoraSpec for every tagged site whose winning rule is a LoraRule."""
    specs: dict[str, LoraSpec] = {}
    for site in tagged_sites(gm):
        rule = site.rule
        if isinstance(rule, LoraRule):
            specs[site.module_path] = LoraSpec(
                rank=rule.rank,
                alpha=rule.lora_alpha,
                dropout=float(rule.dropout),
                use_rslora=rule.use_rslora,
                init=rule.init,
                autocast_dtype=autocast_dtype,
                loftq_iter=rule.loftq_iter,
                use_dora=rule.use_dora,
                share_experts=rule.share_experts,
            )
    return specs


@dataclass
class _InsertRuleLoraPass(InsertLoraPass):
    """InsertLoraPass whose specs come from the rules tagged by MatchRulesPass."""

    autocast_dtype: bool = True

    def call(self, gm):
        self.specs = lora_specs_from_rules(gm, self.autocast_dtype)
        return super().call(gm)


def build_passes(
    rules: list[QuantRule],
    *,
    strict: bool,
    adapter: str,
    weight_storage: str = "packed",
    calibration_data: Iterable[Any] | None = None,
    progress: bool = True,
    quantize_weights: bool = True,
    autocast_adapter_dtype: bool = True,
    load: LoadCheckpointPass | None = None,
) -> list[GraphPass]:
    """The default pass list; the quantization passes slot in around the LoRA insertion, and a
    checkpoint is read (quantizing as it goes) right after the rules are matched."""
    weight_passes = (
        quant_passes.before_lora(
            rules, storage=weight_storage, calibration_data=calibration_data, progress=progress
        )
        if quantize_weights
        else []
    )
    return [
        MatchRulesPass(rules, strict=strict),
        *([load] if load is not None else []),
        *([LoraInitPass(adapter, autocast_adapter_dtype)] if any(
            isinstance(r, LoraRule) and is_base_init(r.init) for r in rules) else []),
        *weight_passes,
        _InsertRuleLoraPass(adapter, {}, autocast_dtype=autocast_adapter_dtype),
    ]


def transform(
    model: nn.Module,
    rules: int | QuantRule | Iterable[QuantRule],
    example_args: tuple = (),
    example_kwargs: dict[str, Any] | None = None,
    *,
    method: TraceMethod = "export",
    strict: bool = False,
    record: bool = False,
    adapter_name: str = DEFAULT_ADAPTER,
    weight_storage: str = "packed",
    calibration_data: Iterable[Any] | None = None,
    progress: bool = True,
    quantize_weights: bool = True,
    autocast_adapter_dtype: bool = True,
    checkpoint: str | os.PathLike | TensorSource | None = None,
) -> LoraModel:
    """Trace ``model``, apply ``rules`` and return a trainable :class:`LoraModel`.

    ``rules`` is a list of :class:`LoraRule`/:class:`QuantRule` (first match wins), one rule, or
    an int rank: the one-line toggle applying LoRA of that rank (alpha = rank) to the attention
    query and value projections. The original model is not modified. With ``record=True`` the
    returned model's ``pass_log`` holds each pass's graph diff.

    Rules with ``weight_qtype`` quantize base weights: ``weight_storage="packed"`` stores integer
    codes (QLoRA), ``"float"`` keeps float weights on the quantization grid (QW-LoRA).
    ``calibration_data`` (batches) is needed by ``weight_calibration="gptq"``. Activation
    encodings are calibrated afterwards with :func:`graphlora.calibrate`. With
    ``quantize_weights=False`` the rules' weight quantization is left for a later, explicit step
    (the QW-LoRA workflow).

    ``autocast_adapter_dtype`` (PEFT's option of that name, default ``True`` as there): LoRA
    factors of a float16/bfloat16 base are float32, the branch reading its input cast up and
    the site's sum cast back to the base's dtype; ``False`` keeps the factors in the base dtype.

    ``checkpoint`` (a transformers safetensors directory, sharded or not, or one file) gives the
    weights: every tensor of the model's state dict is read from it, tensor by tensor, and a
    weight the rules quantize is quantized as it is read, so a model built on the ``meta``
    device is fine-tuned with QLoRA without its float weights ever being in memory
    (docs/causal-lm.md). A tensor missing from the checkpoint, or of another shape or kind, raises
    :class:`~graphlora.errors.CheckpointMismatchError` naming it and its file.
    """
    return build_lora_model(
        model, rules, example_args, example_kwargs, method=method, strict=strict, record=record,
        adapter_name=adapter_name, weight_storage=weight_storage, calibration_data=calibration_data,
        progress=progress, quantize_weights=quantize_weights, autocast_adapter_dtype=autocast_adapter_dtype,
        load=_checkpoint_pass(model, checkpoint, quantize_weights, weight_storage, progress),
    )


def _checkpoint_pass(model: nn.Module, checkpoint, quantize: bool, storage: str, progress: bool) -> LoadCheckpointPass | None:
    if checkpoint is None:
        return None
    from graphlora.meta_buffers import meta_buffer_values
    from graphlora.io.lazy_safetensors import LazyCheckpoint

    source = LazyCheckpoint(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) else checkpoint
    return LoadCheckpointPass(source, quantize=quantize, storage=storage,  # type: ignore[arg-type]
                              compute_buffers=meta_buffer_values(model), progress=progress)


def build_lora_model(
    model: nn.Module,
    rules: int | QuantRule | Iterable[QuantRule],
    example_args: tuple = (),
    example_kwargs: dict[str, Any] | None = None,
    *,
    method: TraceMethod = "export",
    strict: bool = False,
    record: bool = False,
    adapter_name: str = DEFAULT_ADAPTER,
    weight_storage: str = "packed",
    calibration_data: Iterable[Any] | None = None,
    progress: bool = True,
    quantize_weights: bool = True,
    autocast_adapter_dtype: bool = True,
    load: LoadCheckpointPass | None = None,
) -> LoraModel:
    """:func:`transform` with the checkpoint pass given as a pass (``load_quantized`` gives one
    that leaves the saved codes' weights to it)."""
    rules = normalize_rules(rules)
    if not isinstance(model, nn.Module):
        raise TraceError(f"transform() needs a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, LoraModel) or ADAPTERS_ROOT in model._modules:
        raise InputError(
            f"transform() got a model graphlora already transformed ({type(model).__name__}); tracing its "
            "graph again would find no layers to match. Add LoRA to it with model.add_adapter(...) or "
            "graphlora.load_adapter(model, ...), quantize it with graphlora.qw_lora(model), or transform "
            "the original nn.Module"
        )
    check_adapter_name(adapter_name, where="adapter_name")
    if load is None and quantize_weights and any(r.weight_qtype for r in rules) and _on_meta(model):
        raise InputError(
            f"{type(model).__name__} has weights on the meta device, so there is nothing to quantize: pass "
            "checkpoint=<a safetensors checkpoint directory> to read and quantize its weights from there, or "
            "use graphlora.from_pretrained(directory, rules)"
        )
    spares: list[fx.GraphModule] = []  # traces of the example's call for other sizes
    if load is not None and method == "export" and _on_meta(model):
        gm = trace_meta(model, example_args, example_kwargs, device=load.device, spares=spares)
    else:
        gm = trace(model, example_args, example_kwargs, method=method, spares=spares)
    passes = build_passes(
        rules,
        strict=strict,
        adapter=adapter_name,
        weight_storage=weight_storage,
        calibration_data=calibration_data,
        progress=progress,
        quantize_weights=quantize_weights,
        autocast_adapter_dtype=autocast_adapter_dtype,
        load=load,
    )
    pipeline = PassPipeline(passes, record=record)
    gm = pipeline(gm)
    specs = lora_specs_from_rules(gm, autocast_adapter_dtype)
    for p in gm.parameters():
        p.requires_grad_(False)
    template = structure_copy(model) if method == "export" else None
    lora_model = model_class(template)(
        gm,
        rules=rules,
        adapters={adapter_name: specs} if specs else {},
        active_adapters=[adapter_name] if specs else [],
        source=_source_info(model, method),
        pass_log=pipeline.log,
        training=model.training,
        template=template,
        traces=spares,
    )
    for p in lora_model.lora_parameters() if specs else ():
        p.requires_grad_(True)
    lora_model._record_passes = record
    return lora_model


def _on_meta(model: nn.Module) -> bool:
    return any(t.device.type == "meta" for t in list(model.parameters()) + list(model.buffers()))


def _source_info(model: nn.Module, method: str) -> dict[str, Any]:
    config = getattr(model, "config", None)
    info: dict[str, Any] = {
        "model_class": type(model).__name__,
        "model_module": type(model).__module__,
        "trace_method": method,
    }
    if config is not None and hasattr(config, "to_dict"):
        info["config"] = config
        info["name_or_path"] = getattr(config, "_name_or_path", None) or None
        info["task_type"] = _task_type(type(model).__name__)
        tied = _tied_weights(model)
        if tied:
            info["tied_weights"] = tied
    return info


def _tied_weights(model: nn.Module) -> dict[str, str]:
    """transformers' tied parameters, ``{tied key: the key it is tied to}`` (``lm_head.weight``
    -> ``model.embed_tokens.weight`` with ``tie_word_embeddings``), which its ``save_pretrained``
    leaves out of the checkpoint and ``from_pretrained`` ties again; saves do the same."""
    expand = getattr(model, "get_expanded_tied_weights_keys", None)
    try:
        tied = expand(all_submodels=True) if callable(expand) else getattr(model, "all_tied_weights_keys", None)
    except (AttributeError, KeyError, TypeError, ValueError):  # patterns that do not resolve: save every key
        return {}
    if not isinstance(tied, dict):
        return {}
    return {str(k): str(v) for k, v in tied.items() if isinstance(k, str) and isinstance(v, str)}


def _task_type(class_name: str) -> str | None:
    for suffix, task in (
        ("ForCausalLM", "CAUSAL_LM"),
        ("ForSequenceClassification", "SEQ_CLS"),
        ("ForTokenClassification", "TOKEN_CLS"),
        ("ForQuestionAnswering", "QUESTION_ANS"),
        ("ForSeq2SeqLM", "SEQ_2_SEQ_LM"),
        ("ForConditionalGeneration", "SEQ_2_SEQ_LM"),
    ):
        if class_name.endswith(suffix):
            return task
    if class_name.endswith("Model"):
        return "FEATURE_EXTRACTION"
    return None
