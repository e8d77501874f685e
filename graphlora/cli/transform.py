"""``graphlora transform`` and ``graphlora export``: build the model from MODEL and RULES the way
``graphlora.transform`` (and ``calibrate``) would, then write it: as a model directory, graph text
and encodings, or as an ONNX file."""

from __future__ import annotations

import argparse
import importlib
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from graphlora.cli.app import subcommand, wrap_help
from graphlora.cli.model_options import MODEL_HELP, add_model_arguments, load_rules_and_model
from graphlora.errors import ExportError, GraphloraWarning, InputError, MissingDependencyError
from graphlora.model_source import LoadedModel, calibration_batches

if TYPE_CHECKING:
    from graphlora.model import LoraModel


SAVE_MODES: dict[str, dict[str, bool]] = {
    "adapters": {"only_save_adapters": True},
    "separate": {"save_adapters_separately": True},
    "merged": {"save_adapters_separately": False},
}


def _build_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by transform and export: how the model is built before it is written."""
    add_model_arguments(parser)
    parser.add_argument(
        "--calibrate-with",
        metavar="TEXTFILE",
        help="text file, one sample per line: GPTQ calibration data and activation calibration "
        "(rules with act_qtype / lora_act_qtype / lora_weight_qtype); needs the model's tokenizer",
    )
    parser.add_argument(
        "--weight-storage",
        choices=("packed", "float"),
        default="packed",
        help="quantized base weights as integer codes (packed, QLoRA; default) or float values on "
        "the quantization grid (float, QW-LoRA)",
    )
    parser.add_argument("--strict", action="store_true", help="rules that match nothing are an error")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _wants_activation_encodings(model: "LoraModel") -> bool:
    return any(
        s.rule is not None and (s.rule.act_qtype or s.rule.lora_act_qtype or s.rule.lora_weight_qtype)
        for s in model.sites
    )


def _build(args: argparse.Namespace, *, require_calibration: bool) -> tuple["LoraModel", LoadedModel]:
    """Load, transform and (with --calibrate-with) calibrate, exactly as the Python API would."""
    from graphlora.calibration import calibrate
    from graphlora.pipeline import transform
    from graphlora.rules_file import load_activation_rules

    progress = not args.no_progress
    rules, loaded = load_rules_and_model(args, progress=progress)
    activations = load_activation_rules(args.rules)
    batches = calibration_batches(args.calibrate_with, loaded) if args.calibrate_with else None
    data_rules = [i for i, r in enumerate(rules) if r.needs_calibration_data]
    if data_rules and batches is None:
        first = rules[data_rules[0]]
        raise InputError(
            f"{args.rules}: rule #{data_rules[0]} uses weight_calibration={first.weight_calibration!r}, "
            "which needs calibration data: pass --calibrate-with TEXTFILE"
        )
    model = transform(
        loaded.model,
        rules,
        loaded.example_args,
        loaded.example_kwargs,
        method=args.method,
        strict=args.strict,
        weight_storage=args.weight_storage,
        calibration_data=batches,
        progress=progress,
    )
    if activations and batches is None:
        raise InputError(
            f"{args.rules}: its [[activations]] tables place activation encodings across the graph, "
            "which need calibration data: pass --calibrate-with TEXTFILE"
        )
    if _wants_activation_encodings(model) or activations:
        if batches is not None:
            calibrate(model, batches, activations=activations or None, progress=progress)
        elif require_calibration:
            raise InputError(
                f"{args.rules}: rules ask for activation (or LoRA-branch) quantization, which needs "
                "calibration data: pass --calibrate-with TEXTFILE"
            )
        else:
            warnings.warn(
                "rules ask for activation (or LoRA-branch) quantization, but no --calibrate-with "
                "was given: activation encodings are not calibrated (run graphlora.calibrate later)",
                GraphloraWarning,
                stacklevel=2,
            )
    return model, loaded


def _summary(model: "LoraModel") -> str:
    """Counted from the graph itself: quantized base weights are buffers, not parameters."""
    sites = model.sites
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    quantized = int(model.memory_report()["quantized_params"])
    return (
        f"{len(sites)} linear site(s) matched ({sum(1 for s in sites if s.weight_qtype)} with quantized "
        f"weights); trainable LoRA parameters: {trainable:,d}; frozen base: {frozen:,d} float + "
        f"{quantized:,d} quantized"
    )


def _transform_arguments(parser: argparse.ArgumentParser) -> None:
    _build_arguments(parser)
    parser.add_argument("--out", metavar="DIR", help="save the transformed model here (see --save)")
    parser.add_argument(
        "--save",
        choices=tuple(SAVE_MODES),
        default="separate",
        help="adapters: PEFT adapter only; separate: base weights + adapter (default); merged: one "
        "model with the LoRA delta folded in",
    )
    parser.add_argument("--graph-text", metavar="FILE", help="write the transformed graph's canonical text (for graphlora diff)")
    parser.add_argument("--encodings", metavar="FILE", help="write the quantization encodings (JSON, graphlora.save_encodings)")


@subcommand(
    "transform",
    help="apply rules to a model and save the result",
    arguments=_transform_arguments,
    description=wrap_help(
        "Trace MODEL, apply RULES (LoRA, QLoRA, quantization) with graphlora.transform, optionally "
        "calibrate, and write any of: the model (--out, in the --save format of "
        "LoraModel.save_pretrained), the graph text (--graph-text), the encodings (--encodings). "
        "Every file is written atomically."
    )
    + MODEL_HELP,
)
def run_transform(args: argparse.Namespace) -> int:
    from graphlora.diff import save_graph_text
    from graphlora.io.encodings_file import save_encodings

    if not (args.out or args.graph_text or args.encodings):
        raise InputError("nothing to write: pass --out DIR, --graph-text FILE and/or --encodings FILE")
    model, _ = _build(args, require_calibration=False)
    print(_summary(model))
    if args.out:
        result = model.save_pretrained(args.out, **SAVE_MODES[args.save])
        print(f"saved ({args.save}) to {result.directory}: {', '.join(result.files)}")
    if args.graph_text:
        print(f"graph text: {save_graph_text(model, args.graph_text)}")
    if args.encodings:
        save_encodings(model, args.encodings)
        print(f"encodings: {args.encodings}")
    return 0


def _export_arguments(parser: argparse.ArgumentParser) -> None:
    _build_arguments(parser)
    parser.add_argument("--out", required=True, metavar="FILE", help="the ONNX file to write (e.g. model.onnx)")
    parser.add_argument(
        "--lora",
        choices=("merged", "branch", "inputs"),
        default="merged",
        help="merged: delta folded into the base weight (default); branch: LoRA as its own MatMuls; "
        "inputs: LoRA weights as named graph inputs, switchable at run time",
    )
    parser.add_argument("--opset", type=int, default=21, help="ONNX opset, 18..21 (default 21: int4 needs it)")
    parser.add_argument("--graph-text", metavar="FILE", help="also write the exported ONNX graph's canonical text")


def _export_function() -> Callable[..., Any]:
    """``graphlora.onnx.export.export_onnx``, imported only when needed (it pulls in onnxscript)."""
    try:
        module = importlib.import_module("graphlora.onnx.export")
    except ModuleNotFoundError as exc:
        if exc.name in ("graphlora.onnx", "graphlora.onnx.export"):
            raise ExportError("ONNX export is not available in this graphlora installation (graphlora.onnx.export is missing)") from exc
        raise MissingDependencyError(f"ONNX export needs the package {exc.name!r}: pip install {exc.name}") from exc
    export = getattr(module, "export_onnx", None)
    if export is None:
        raise ExportError("ONNX export is not available in this graphlora installation (no export_onnx)")
    return export


@subcommand(
    "export",
    help="apply rules to a model and export it to ONNX (QDQ)",
    arguments=_export_arguments,
    description=wrap_help(
        "Trace MODEL, apply RULES, calibrate activations with --calibrate-with when the rules "
        "quantize activations (required then), and export standard ONNX QDQ with "
        "graphlora.onnx.export_onnx. The ONNX inputs are the example inputs' names."
    )
    + MODEL_HELP,
)
def run_export(args: argparse.Namespace) -> int:
    from graphlora.diff import save_graph_text

    export_onnx = _export_function()
    model, loaded = _build(args, require_calibration=True)
    print(_summary(model))
    result = export_onnx(
        model, args.out, loaded.example_args, loaded.example_kwargs, lora=args.lora, opset=args.opset
    )
    path = getattr(result, "path", args.out)
    details = [f"opset {args.opset}", f"lora {args.lora}"]
    if getattr(result, "inputs", None):
        details.append("inputs " + ", ".join(result.inputs))
    if getattr(result, "quantized_weights", None):
        details.append(f"{len(result.quantized_weights)} quantized weight(s)")
    if getattr(result, "external_data", None):
        details.append(f"external data {result.external_data}")
    print(f"exported {path} ({'; '.join(details)})")
    if args.graph_text:
        print(f"graph text: {save_graph_text(Path(path), args.graph_text)}")
    return 0
