"""The MODEL / RULES / --method convention of the commands that take a model (``inspect``,
``transform``, ``export``): their shared arguments, help text and loading step, so the three
commands read a model and a rules file the same way."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from graphlora.errors import InputError
from graphlora.model_source import LoadedModel, load_model

if TYPE_CHECKING:
    from graphlora.rules import QuantRule

__all__ = ["MODEL_HELP", "add_model_arguments", "load_rules_and_model"]

MODEL_HELP = """\
MODEL is one of:
  DIR           a transformers model directory (config.json + weights, as written by
                save_pretrained), loaded with the class named in config.json "architectures"
                (AutoModel when it names none); example inputs are two sentences tokenized
                with the directory's tokenizer, or input_ids of shape (2, 8) without one
  module:attr   a Python factory: a function (called without arguments) or an nn.Module
                instance, in an importable module or a file (path/to/models.py:make_model;
                the current directory is importable). The module is imported, so its code
                RUNS: give only code you trust. The factory returns the model, or
                (model, example_args) or (model, example_args, example_kwargs); example_args
                is a tuple of positional inputs (a single tensor is wrapped), a dict in second
                place is taken as example_kwargs

RULES is a TOML or JSON rules file: [[rules]] tables (JSON: a list, or {"rules": [...]}) with
the fields of graphlora.LoraRule (a table with `rank`) or graphlora.QuantRule (without). The
first rule whose module_path regex fully matches a layer's module path wins.
"""


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help="transformers model directory or module:attr factory")
    parser.add_argument("--rules", required=True, metavar="RULES", help="rules file (.toml or .json)")
    parser.add_argument(
        "--allow-pickle",
        action="store_true",
        help="let a MODEL directory with pickled weights (pytorch_model.bin) load; unpickling runs "
        "code, so only for files you trust (safetensors weights need no flag)",
    )
    parser.add_argument(
        "--method",
        choices=("export", "symbolic"),
        default="export",
        help="tracer: torch.export (default; needs the example inputs) or torch.fx symbolic_trace",
    )


def load_rules_and_model(args: argparse.Namespace, *, progress: bool) -> tuple[list["QuantRule"], LoadedModel]:
    """RULES first (a typo in the rules file is reported before a slow model load), then MODEL
    with example inputs the chosen tracer can use."""
    from graphlora.rules_file import load_rules

    rules = load_rules(args.rules)
    loaded = load_model(args.model, progress=progress, allow_pickle=getattr(args, "allow_pickle", False))
    _require_inputs(loaded, args.model, args.method)
    return rules, loaded


def _require_inputs(loaded: LoadedModel, spec: str, method: str) -> None:
    """torch.export traces with example inputs; say how a factory provides them."""
    if method == "export" and not loaded.example_args and not loaded.example_kwargs:
        raise InputError(
            f"MODEL {spec!r}: {type(loaded.model).__name__} needs example inputs for torch.export: make "
            "the factory return (model, example_args) or (model, example_args, example_kwargs), or "
            "use --method symbolic"
        )
