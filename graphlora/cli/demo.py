"""``graphlora demo``: the command line of the end-to-end demo (its body lives in graphlora.demo)."""

from __future__ import annotations

import argparse
import importlib
from typing import Any

from graphlora.cli.app import subcommand, wrap_help
from graphlora.errors import GraphloraError, InputError


def _demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", metavar="DIR", help="where the artefacts go (default: the demo's, ./graphlora-demo)")
    parser.add_argument("--steps", type=int, metavar="N", help="LoRA training steps (default: the demo's)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


@subcommand(
    "demo",
    help="run the end-to-end QW-LoRA demo on the pretrained MiniLM",
    arguments=_demo_arguments,
    description=wrap_help(
        "The main job on the embedded default model: QW-LoRA on the pretrained MiniLM-L6 sentence "
        "encoder (int4 base, LoRA, int8 activations), saved adapters and merged model, ONNX export "
        "run in onnxruntime, and a comparison table. Runs offline."
    ),
)
def run_demo(args: argparse.Namespace) -> int:
    try:
        demo = importlib.import_module("graphlora.demo")
    except ModuleNotFoundError as exc:
        if exc.name != "graphlora.demo":
            raise
        raise GraphloraError("the demo is not available in this graphlora installation (graphlora.demo is missing)") from exc
    kwargs: dict[str, Any] = {"progress": not args.no_progress}
    if args.out is not None:
        kwargs["out_dir"] = args.out
    if args.steps is not None:
        if args.steps < 0:
            raise InputError(f"--steps must be >= 0, got {args.steps}")
        kwargs["steps"] = args.steps
    result = demo.run_demo(**kwargs)
    print(_format_demo(demo, result))
    return 0


def _format_demo(demo: Any, result: Any) -> str:
    """The demo's own table when it has one, else one ``key: value`` line per entry."""
    formatter = getattr(demo, "format_table", None)
    if callable(formatter) and isinstance(result, dict):
        return formatter(result)
    if isinstance(result, dict):
        return "\n".join(f"{key}: {value}" for key, value in result.items())
    return str(result)
