"""The ``graphlora`` command line (also ``python -m graphlora``).

Each subcommand is one function ``run(args) -> exit code`` registered with :func:`subcommand`
together with a function that adds its arguments, so adding a command is one decorated function::

    def _hello_arguments(parser): parser.add_argument("--times", type=int, default=1)

    @subcommand("hello", help="say hello", arguments=_hello_arguments)
    def hello(args): print("hello " * args.times); return 0

Exit codes: what the command returns (``diff``: 0 identical, 1 different); 2 on any error, reported
as one line on stderr (``--verbose`` adds the traceback).

Commands that take a model (``inspect``, ``transform``, ``export``) share one convention for MODEL
(a transformers directory or a ``module:attr`` factory), RULES (a TOML/JSON rules file, see
:mod:`graphlora.rules_file`) and the example inputs used for tracing; see :func:`load_model`.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import inspect
import json
import os
import sys
import textwrap
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from graphlora.errors import (
    AdapterError,
    ExportError,
    GraphloraError,
    GraphloraWarning,
    InputError,
    MissingDependencyError,
    RuleError,
)

if TYPE_CHECKING:
    import torch.nn as nn

    from graphlora.model import LoraModel
    from graphlora.rules import QuantRule

__all__ = ["LoadedModel", "Subcommand", "build_parser", "inspect_sites", "load_model", "main", "subcommand"]

EXIT_ERROR = 2


@dataclass(frozen=True)
class Subcommand:
    name: str
    help: str
    run: Callable[[argparse.Namespace], int]
    arguments: Callable[[argparse.ArgumentParser], None] | None = None
    description: str | None = None


_SUBCOMMANDS: dict[str, Subcommand] = {}


def subcommand(
    name: str,
    *,
    help: str,
    arguments: Callable[[argparse.ArgumentParser], None] | None = None,
    description: str | None = None,
) -> Callable[[Callable[[argparse.Namespace], int]], Callable[[argparse.Namespace], int]]:
    """Register ``run(args) -> int`` as the subcommand ``name``; ``arguments(parser)`` adds its options."""

    def register(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        if name in _SUBCOMMANDS:
            raise ValueError(f"graphlora subcommand {name!r} is registered twice")
        _SUBCOMMANDS[name] = Subcommand(name, help, run, arguments, description or (run.__doc__ or help))
        return run

    return register


def _common() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="show tracebacks on errors"
    )
    return common


def _wrap(*paragraphs: str) -> str:
    """Help paragraphs wrapped for the terminal (descriptions use RawDescriptionHelpFormatter so
    that the MODEL/RULES tables keep their layout)."""
    return "".join(textwrap.fill(p, 96) + "\n\n" for p in paragraphs)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every registered subcommand."""
    from graphlora.version import __version__

    common = _common()
    parser = argparse.ArgumentParser(
        prog="graphlora",
        description="LoRA, QLoRA and quantization as compiler passes over torch.fx graphs.",
        parents=[common],
    )
    parser.add_argument("--version", action="version", version=f"graphlora {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for cmd in _SUBCOMMANDS.values():
        sub = subparsers.add_parser(
            cmd.name,
            help=cmd.help,
            description=cmd.description,
            parents=[common],
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        if cmd.arguments is not None:
            cmd.arguments(sub)
        sub.set_defaults(_run=cmd.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (the console script passes it to sys.exit)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    run = getattr(args, "_run", None)
    if run is None:
        parser.print_help(sys.stderr)
        return EXIT_ERROR
    verbose = getattr(args, "verbose", False)
    try:
        with _one_line_warnings(args.command):
            return int(run(args))
    except KeyboardInterrupt:
        print("graphlora: interrupted", file=sys.stderr)
        return 130
    except GraphloraError as exc:
        if verbose:
            traceback.print_exc()
        message = " ".join(str(exc).split("\n"))
        print(f"graphlora {args.command}: error: {message}", file=sys.stderr)
        return EXIT_ERROR
    except Exception as exc:  # noqa: BLE001 - a bug still ends with one line and exit code 2
        if verbose:
            traceback.print_exc()
        hint = "" if verbose else " (rerun with --verbose for the traceback)"
        print(f"graphlora {args.command}: internal error: {type(exc).__name__}: {exc}{hint}", file=sys.stderr)
        return EXIT_ERROR


# --------------------------------------------------------------------------------------------------
# diff
# --------------------------------------------------------------------------------------------------

_SAVED_GRAPHS = """\
A saved graph is one of:
  *.onnx        an ONNX model (external data is not needed)
  *.pt2         a torch.export archive (torch.export.save)
  *.graph.txt   a graph text written by graphlora.save_graph_text(graph, path)
                or by `graphlora graph-text MODEL -o FILE`

exit status: 0 if the graphs are identical, 1 if they differ, 2 on error.
"""


def _diff_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("before", help="saved graph (.onnx, .pt2, *.graph.txt)")
    parser.add_argument("after", help="saved graph (.onnx, .pt2, *.graph.txt)")
    parser.add_argument(
        "-U", "--context", type=int, default=3, metavar="N", help="lines of context in the unified diff (default 3)"
    )
    parser.add_argument(
        "--summary", action="store_true", help="print only the summary grouped by module path, no unified diff"
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="print nothing; only set the exit status")


@subcommand(
    "diff",
    help="compare two saved graphs node by node",
    arguments=_diff_arguments,
    description=_wrap(
        "Compare two saved graphs; print a summary grouped by module path and a unified diff of "
        "their canonical graph texts."
    )
    + _SAVED_GRAPHS,
)
def run_diff(args: argparse.Namespace) -> int:
    from graphlora.diff import diff, read_graph_text

    result = diff(read_graph_text(args.before), read_graph_text(args.after), context=args.context)
    if not args.quiet:
        if not result:
            print("no differences")
        elif args.summary:
            print(result.summary)
            for line in result.grouped():
                print(f"  {line}")
        else:
            print(str(result))
    return 1 if result else 0


def _graph_text_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("graph", help="saved graph (.onnx, .pt2, *.graph.txt)")
    parser.add_argument("-o", "--output", help="write to this file (atomically) instead of stdout")


@subcommand(
    "graph-text",
    help="print the canonical graph text of a saved graph",
    arguments=_graph_text_arguments,
    description=_wrap(
        "Print (or save with -o) the canonical graph text of a saved graph, e.g. to keep a "
        "*.graph.txt next to an exported model for later `graphlora diff`."
    )
    + _SAVED_GRAPHS.split("\n\n")[0],
)
def run_graph_text(args: argparse.Namespace) -> int:
    from graphlora.diff import read_graph_text, save_graph_text

    text = read_graph_text(args.graph)
    if args.output:
        save_graph_text(text, args.output)
    else:
        sys.stdout.write(text)
    return 0


@contextlib.contextmanager
def _one_line_warnings(command: str) -> Iterator[None]:
    """Show graphlora's own warnings as one ``graphlora CMD: warning: ...`` line, like errors;
    other libraries' warnings keep Python's default display."""
    original = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if isinstance(category, type) and issubclass(category, GraphloraWarning):
            text = " ".join(str(message).split("\n"))
            print(f"graphlora {command}: warning: {text}", file=sys.stderr)
        else:
            original(message, category, filename, lineno, file, line)

    with warnings.catch_warnings():
        warnings.showwarning = show
        yield


# --------------------------------------------------------------------------------------------------
# MODEL: a transformers directory or a module:attr factory, plus example inputs for tracing
# --------------------------------------------------------------------------------------------------

#: Sentences tokenized as example inputs when MODEL is a transformers directory with a tokenizer.
EXAMPLE_SENTENCES = (
    "The quick brown fox jumps over the lazy dog.",
    "graphlora applies LoRA and quantization as compiler passes over traced graphs.",
)
#: Shape of the ``input_ids`` example when there is no tokenizer (batch, sequence); sizes >= 2 keep
#: both dimensions dynamic in the traced graph.
FALLBACK_INPUT_SHAPE = (2, 8)
#: ``--calibrate-with``: lines per batch and the tokenizer's truncation length.
CALIBRATION_BATCH_SIZE = 8
CALIBRATION_MAX_LENGTH = 128

_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "vocab.json",
    "tokenizer.model",
    "spiece.model",
)

_MODEL_HELP = """\
MODEL is one of:
  DIR           a transformers model directory (config.json + weights, as written by
                save_pretrained), loaded with the class named in config.json "architectures"
                (AutoModel when it names none); example inputs are two sentences tokenized
                with the directory's tokenizer, or input_ids of shape (2, 8) without one
  module:attr   a Python factory: a function (called without arguments) or an nn.Module
                instance, in an importable module or a file (path/to/models.py:make_model;
                the current directory is importable). The factory returns the model, or
                (model, example_args) or (model, example_args, example_kwargs); example_args
                is a tuple of positional inputs (a single tensor is wrapped), a dict in second
                place is taken as example_kwargs

RULES is a TOML or JSON rules file: [[rules]] tables (JSON: a list, or {"rules": [...]}) with
the fields of graphlora.LoraRule (a table with `rank`) or graphlora.QuantRule (without). The
first rule whose module_path regex fully matches a layer's module path wins.
"""


@dataclass
class LoadedModel:
    """A model named on the command line, with the example inputs it is traced with."""

    model: "nn.Module"
    example_args: tuple = ()
    example_kwargs: dict[str, Any] = field(default_factory=dict)
    tokenizer: Any = None
    description: str = ""


def load_model(spec: str) -> LoadedModel:
    """Load MODEL (see ``_MODEL_HELP``): a transformers directory or a ``module:attr`` factory.

    The model is put in eval mode so tracing and exports are deterministic.
    """
    path = Path(spec)
    if path.is_dir():
        loaded = _load_transformers_dir(path)
    elif path.exists():
        raise InputError(
            f"MODEL {spec!r} is a file; expected a transformers model directory or module:attr "
            "(e.g. models.py:make_model)"
        )
    elif ":" in spec:
        loaded = _load_factory(spec)
    else:
        raise InputError(
            f"MODEL {spec!r} is neither a directory nor module:attr; pass a transformers model "
            "directory (written by save_pretrained) or a factory such as mypkg.models:make_model"
        )
    loaded.model.eval()
    return loaded


def _load_transformers_dir(path: Path) -> LoadedModel:
    from graphlora.errors import require

    transformers = require("transformers", "loading a model directory")
    if not (path / "config.json").is_file():
        hint = (
            " (it is a LoRA adapter directory: pass its base model as MODEL)"
            if (path / "adapter_config.json").is_file()
            else ""
        )
        raise AdapterError(f"{path}: no config.json, so not a transformers model directory{hint}")
    try:
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as exc:
        raise AdapterError(f"{path}: cannot read config.json: {_first_line(exc)}") from exc
    architectures = getattr(config, "architectures", None) or []
    cls = getattr(transformers, architectures[0], None) if architectures else None
    cls = cls if cls is not None else transformers.AutoModel
    try:
        model = cls.from_pretrained(path, local_files_only=True)
    except Exception as exc:
        raise AdapterError(f"{path}: transformers {cls.__name__} cannot load it: {_first_line(exc)}") from exc
    tokenizer = _load_tokenizer(transformers, path)
    args, kwargs = _transformers_example_inputs(model, tokenizer)
    what = "tokenized example sentences" if tokenizer is not None else f"input_ids {FALLBACK_INPUT_SHAPE}"
    return LoadedModel(model, args, kwargs, tokenizer, f"{type(model).__name__} from {path} ({what})")


def _load_tokenizer(transformers: Any, path: Path) -> Any:
    """The directory's tokenizer, or None when it has no tokenizer files (then input_ids are made up)."""
    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        return None
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as exc:
        raise AdapterError(f"{path}: has tokenizer files but AutoTokenizer cannot load them: {_first_line(exc)}") from exc
    if getattr(tokenizer, "pad_token", None) is None and getattr(tokenizer, "eos_token", None) is not None:
        tokenizer.pad_token = tokenizer.eos_token  # decoder tokenizers (GPT-2, Llama) have no pad token
    return tokenizer


def _transformers_example_inputs(model: "nn.Module", tokenizer: Any) -> tuple[tuple, dict[str, Any]]:
    """Keyword example inputs a transformers model accepts; ``use_cache=False`` where it applies
    (a KV cache would be traced into the graph as extra outputs)."""
    import torch

    params = _forward_parameters(model)
    if tokenizer is not None:
        encoded = tokenizer(list(EXAMPLE_SENTENCES), padding=True, return_tensors="pt")
        kwargs = {k: v for k, v in dict(encoded).items() if params is None or k in params}
    else:
        vocab = int(getattr(model.config, "vocab_size", 0) or 2)
        generator = torch.Generator().manual_seed(0)
        kwargs = {"input_ids": torch.randint(0, vocab, FALLBACK_INPUT_SHAPE, generator=generator)}
    if params is not None and "use_cache" in params:
        kwargs["use_cache"] = False
    return (), kwargs


def _forward_parameters(model: "nn.Module") -> set[str] | None:
    try:
        return set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return None


def _load_factory(spec: str) -> LoadedModel:
    module_name, _, attr = spec.rpartition(":")
    if not module_name or not attr:
        raise InputError(f"MODEL {spec!r}: expected module:attr, e.g. mypkg.models:make_model")
    module = _import_factory_module(module_name, spec)
    target: Any = module
    for part in attr.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise InputError(f"MODEL {spec!r}: {module_name} has no attribute {attr!r}") from None
    import torch.nn as nn

    if isinstance(target, nn.Module):
        result = target
    elif callable(target):
        try:
            result = target()
        except GraphloraError:
            raise
        except Exception as exc:
            raise InputError(f"MODEL {spec!r}: the factory raised {type(exc).__name__}: {_first_line(exc)}") from exc
    else:
        raise InputError(f"MODEL {spec!r}: {attr} is a {type(target).__name__}, not a factory function or nn.Module")
    return _factory_result(result, spec)


def _import_factory_module(module_name: str, spec: str) -> Any:
    """Import ``module_name``: a file path (``models.py``) or a dotted name, the current directory
    importable as with ``python -m``."""
    if module_name.endswith(".py") or os.sep in module_name or "/" in module_name:
        return _import_file(Path(module_name), spec)
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise InputError(
                f"MODEL {spec!r}: no module named {exc.name!r}; run graphlora from the folder that "
                "holds it, set PYTHONPATH, or give a file path (path/to/models.py:make_model)"
            ) from exc
        raise InputError(f"MODEL {spec!r}: importing {module_name} failed: {exc}") from exc
    except Exception as exc:
        raise InputError(f"MODEL {spec!r}: importing {module_name} failed: {type(exc).__name__}: {_first_line(exc)}") from exc
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)


def _import_file(path: Path, spec: str) -> Any:
    if not path.is_file():
        raise InputError(f"MODEL {spec!r}: no such file {str(path)!r}")
    name = path.stem if path.stem.isidentifier() and path.stem not in sys.modules else f"_graphlora_model_{abs(hash(path.resolve()))}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise InputError(f"MODEL {spec!r}: cannot import {str(path)!r} as a Python module")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # dataclasses and pickling look the module up by name
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:
        sys.modules.pop(name, None)
        raise InputError(f"MODEL {spec!r}: importing {path} failed: {type(exc).__name__}: {_first_line(exc)}") from exc
    return module


def _factory_result(result: Any, spec: str) -> LoadedModel:
    """Apply the factory convention: model | (model, args) | (model, args, kwargs)."""
    import torch
    import torch.nn as nn

    parts = tuple(result) if isinstance(result, (tuple, list)) else (result,)
    if not parts or not isinstance(parts[0], nn.Module) or len(parts) > 3:
        raise InputError(
            f"MODEL {spec!r}: the factory must return an nn.Module, (model, example_args) or "
            f"(model, example_args, example_kwargs); got {_describe_value(result)}"
        )
    model, args, kwargs = parts[0], (), {}
    if len(parts) >= 2:
        first = parts[1]
        if isinstance(first, dict) and len(parts) == 2:
            kwargs = dict(first)
        elif isinstance(first, torch.Tensor):
            args = (first,)
        elif isinstance(first, (tuple, list)):
            args = tuple(first)
        elif first is not None:
            raise InputError(f"MODEL {spec!r}: example_args must be a tuple of inputs or a tensor, got {type(first).__name__}")
    if len(parts) == 3 and parts[2] is not None:
        if not isinstance(parts[2], dict):
            raise InputError(f"MODEL {spec!r}: example_kwargs must be a dict, got {type(parts[2]).__name__}")
        kwargs = dict(parts[2])
    if not args and not kwargs and hasattr(getattr(model, "config", None), "vocab_size"):
        _, kwargs = _transformers_example_inputs(model, None)  # a transformers model: input_ids (2, 8)
    return LoadedModel(model, args, kwargs, None, f"{type(model).__name__} from {spec}")


def _require_inputs(loaded: LoadedModel, spec: str, method: str) -> None:
    """torch.export traces with example inputs; say how a factory provides them."""
    if method == "export" and not loaded.example_args and not loaded.example_kwargs:
        raise InputError(
            f"MODEL {spec!r}: {type(loaded.model).__name__} needs example inputs for torch.export: make "
            "the factory return (model, example_args) or (model, example_args, example_kwargs), or "
            "use --method symbolic"
        )


def _describe_value(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {len(value)} ({', '.join(type(v).__name__ for v in value)})"
    return f"a {type(value).__name__}"


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _describe_inputs(loaded: LoadedModel) -> str:
    import torch

    def one(name: str, value: Any) -> str:
        if isinstance(value, torch.Tensor):
            return f"{name}[{','.join(str(d) for d in value.shape)}]"
        return f"{name}={value!r}"

    items = [one(f"arg{i}", v) for i, v in enumerate(loaded.example_args)]
    items += [one(k, v) for k, v in loaded.example_kwargs.items()]
    return ", ".join(items) if items else "none"


def _calibration_batches(path: str, loaded: LoadedModel) -> list[dict[str, Any]]:
    """One line of text per sample, CALIBRATION_BATCH_SIZE lines per batch, tokenized like the
    example inputs (the traced graph takes exactly those keyword inputs)."""
    if loaded.tokenizer is None:
        raise InputError(
            "--calibrate-with needs a tokenizer: MODEL must be a transformers directory with "
            "tokenizer files (a factory model has none; calibrate from Python with graphlora.calibrate)"
        )
    try:
        lines = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"--calibrate-with {path}: cannot read it: {exc}") from None
    lines = [line for line in lines if line]
    if not lines:
        raise InputError(f"--calibrate-with {path}: no text (one sample per non-empty line)")
    batches = []
    for start in range(0, len(lines), CALIBRATION_BATCH_SIZE):
        encoded = loaded.tokenizer(
            lines[start : start + CALIBRATION_BATCH_SIZE],
            padding=True,
            truncation=True,
            max_length=CALIBRATION_MAX_LENGTH,
            return_tensors="pt",
        )
        # the traced keyword structure exactly (GPTQ runs the graph itself): constants such as
        # use_cache=False included, in the example's order
        batches.append({k: encoded[k] if k in encoded else v for k, v in loaded.example_kwargs.items()})
    return batches


@contextlib.contextmanager
def _quiet_transformers(progress: bool) -> Iterator[None]:
    """Hide transformers' weight-loading progress bars with --no-progress (restored afterwards)."""
    if progress:
        yield
        return
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        yield
        return
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


# --------------------------------------------------------------------------------------------------
# inspect
# --------------------------------------------------------------------------------------------------


@dataclass
class SiteReport:
    """One matched module path: its shape, how often the graph uses it, and the winning rule."""

    module_path: str
    in_features: int
    out_features: int
    uses: int
    rule_index: int
    rule: "QuantRule"

    @property
    def lora_parameters(self) -> int:
        rank = getattr(self.rule, "rank", 0) if self.rule.has_lora else 0
        return rank * (self.in_features + self.out_features)

    @property
    def quantized_parameters(self) -> int:
        return self.in_features * self.out_features if self.rule.weight_qtype else 0

    def qtypes(self) -> str:
        """``weight=int4/g32 act=int8 lora_weight=... lora_act=...`` (only what the rule sets)."""
        r = self.rule
        parts = []
        if r.weight_qtype:
            parts.append(f"weight={r.weight_qtype}" + (f"/g{r.group_size}" if r.group_size else ""))
        for name in ("act_qtype", "lora_weight_qtype", "lora_act_qtype"):
            value = getattr(r, name)
            if value:
                parts.append(f"{name[: -len('_qtype')]}={value}")
        return " ".join(parts) or "-"


@dataclass
class Inspection:
    """What ``transform`` would do with these rules, computed without changing anything."""

    sites: list[SiteReport]
    unmatched: list[str]
    unused_rules: list[int]
    problems: list[str]
    model_parameters: int

    @property
    def lora_parameters(self) -> int:
        return sum(s.lora_parameters for s in self.sites)

    @property
    def quantized_parameters(self) -> int:
        return sum(s.quantized_parameters for s in self.sites)


def inspect_sites(gm: Any, rules: Sequence["QuantRule"], model_parameters: int = 0) -> Inspection:
    """Match ``rules`` against the linear sites of a traced graph the way ``transform`` does
    (first match wins), reporting rank problems instead of raising on the first one."""
    from graphlora.rules import first_match
    from graphlora.sites import find_linear_sites, iter_site_groups

    reports: list[SiteReport] = []
    unmatched: list[str] = []
    used: set[int] = set()
    problems: list[str] = []
    for path, group in iter_site_groups(find_linear_sites(gm)):
        spec = group[0].spec
        match = first_match(path, rules)
        if match is None:
            unmatched.append(path)
            continue
        used.add(match.index)
        report = SiteReport(path, spec.in_features, spec.out_features, len(group), match.index, match.rule)
        reports.append(report)
        limit = min(spec.in_features, spec.out_features)
        if match.rule.has_lora and match.rule.rank > limit:
            problems.append(
                f"rule #{match.index}: rank {match.rule.rank} is larger than {path!r} allows "
                f"(in={spec.in_features}, out={spec.out_features}, so rank <= {limit})"
            )
    unused = [i for i in range(len(rules)) if i not in used]
    return Inspection(reports, unmatched, unused, problems, model_parameters)


def _count_parameters(model: "nn.Module") -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() already skips tied duplicates


def _inspection_json(ins: Inspection, rules: Sequence["QuantRule"], loaded: LoadedModel) -> dict[str, Any]:
    return {
        "model": loaded.description,
        "rules": [{"index": i, "rule": r.describe(), "sites": [s.module_path for s in ins.sites if s.rule_index == i]}
                  for i, r in enumerate(rules)],
        "sites": [
            {
                "module_path": s.module_path,
                "in_features": s.in_features,
                "out_features": s.out_features,
                "uses": s.uses,
                "rule_index": s.rule_index,
                "lora": s.rule.has_lora,
                "rank": getattr(s.rule, "rank", None),
                "alpha": getattr(s.rule, "lora_alpha", None),
                "weight_qtype": s.rule.weight_qtype,
                "group_size": s.rule.group_size,
                "act_qtype": s.rule.act_qtype,
                "lora_weight_qtype": s.rule.lora_weight_qtype,
                "lora_act_qtype": s.rule.lora_act_qtype,
                "lora_parameters": s.lora_parameters,
            }
            for s in ins.sites
        ],
        "unmatched": ins.unmatched,
        "unused_rules": ins.unused_rules,
        "problems": ins.problems,
        "parameters": {
            "model": ins.model_parameters,
            "lora": ins.lora_parameters,
            "quantized": ins.quantized_parameters,
        },
    }


def _format_inspection(ins: Inspection, rules: Sequence["QuantRule"], loaded: LoadedModel, rules_path: str,
                       show_unmatched: bool) -> str:
    total_sites = len(ins.sites) + len(ins.unmatched)
    lines = [
        f"model: {loaded.description}",
        f"example inputs: {_describe_inputs(loaded)}",
        f"rules: {rules_path} ({len(rules)} rule{'s' if len(rules) != 1 else ''})",
        "",
    ]
    width = max([len(s.module_path) for s in ins.sites] + [11])
    for i, rule in enumerate(rules):
        mine = [s for s in ins.sites if s.rule_index == i]
        lines.append(f"rule #{i} {rule.describe()}: {len(mine)} site{'s' if len(mine) != 1 else ''}")
        for s in mine:
            rank = f"rank {s.rule.rank:<3} alpha {s.rule.lora_alpha:g}" if s.rule.has_lora else "no LoRA"
            uses = f"  (used {s.uses}x)" if s.uses > 1 else ""
            lines.append(
                f"  {s.module_path:<{width}}  in {s.in_features:>5} out {s.out_features:>5}  {rank:<18} {s.qtypes()}{uses}"
            )
    lines.append("")
    lines.append(f"linear sites: {total_sites} ({len(ins.sites)} matched, {len(ins.unmatched)} left untouched)")
    if ins.unmatched and show_unmatched:
        lines.extend(f"  untouched: {path}" for path in ins.unmatched)
    if ins.unused_rules:
        lines.append("unused rules: " + "; ".join(f"#{i} {rules[i].describe()}" for i in ins.unused_rules))
    pct = 100.0 * ins.lora_parameters / ins.model_parameters if ins.model_parameters else 0.0
    lines.append(
        f"parameters: {ins.model_parameters:,d} in the model; LoRA adds {ins.lora_parameters:,d} trainable "
        f"({pct:.2f}%); {ins.quantized_parameters:,d} base weights quantized"
    )
    for problem in ins.problems:
        lines.append(f"problem: {problem}")
    return "\n".join(lines)


def _model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help="transformers model directory or module:attr factory")
    parser.add_argument("--rules", required=True, metavar="RULES", help="rules file (.toml or .json)")
    parser.add_argument(
        "--method",
        choices=("export", "symbolic"),
        default="export",
        help="tracer: torch.export (default; needs the example inputs) or torch.fx symbolic_trace",
    )


def _inspect_arguments(parser: argparse.ArgumentParser) -> None:
    _model_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print the report as JSON (for scripts)")
    parser.add_argument("-a", "--all", action="store_true", help="also list the linear sites no rule matches")
    parser.add_argument("--strict", action="store_true", help="unused rules are an error (exit 2), as transform(strict=True)")


@subcommand(
    "inspect",
    help="show which layers each rule would change, before changing anything",
    arguments=_inspect_arguments,
    description=_wrap(
        "Trace MODEL and match RULES against its linear layers the way `graphlora transform` would: "
        "for each rule the module paths it wins (shape, rank, alpha, qtypes), the rules that match "
        "nothing and the parameter counts. Nothing is written.",
        "exit status: 0 if transform would accept the rules, 2 otherwise (a rank larger than a layer "
        "allows; unused rules with --strict).",
    )
    + _MODEL_HELP,
)
def run_inspect(args: argparse.Namespace) -> int:
    from graphlora.rules_file import load_rules
    from graphlora.trace import trace

    rules = load_rules(args.rules)
    with _quiet_transformers(progress=False):
        loaded = load_model(args.model)
    _require_inputs(loaded, args.model, args.method)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # static-shape fallbacks do not matter here
        gm = trace(loaded.model, loaded.example_args, loaded.example_kwargs, method=args.method)
    ins = inspect_sites(gm, rules, _count_parameters(loaded.model))
    if args.json:
        print(json.dumps(_inspection_json(ins, rules, loaded), indent=2))
    else:
        print(_format_inspection(ins, rules, loaded, args.rules, args.all))
    if ins.problems:
        more = f" (and {len(ins.problems) - 1} more)" if len(ins.problems) > 1 else ""
        raise RuleError(f"{args.rules}: {ins.problems[0]}{more}")
    if args.strict and ins.unused_rules:
        raise RuleError(
            f"{args.rules}: {len(ins.unused_rules)} rule(s) matched no linear site: "
            + ", ".join(f"#{i}" for i in ins.unused_rules)
            + " (--strict)"
        )
    return 0


# --------------------------------------------------------------------------------------------------
# transform and export
# --------------------------------------------------------------------------------------------------

SAVE_MODES: dict[str, dict[str, bool]] = {
    "adapters": {"only_save_adapters": True},
    "separate": {"save_adapters_separately": True},
    "merged": {"save_adapters_separately": False},
}


def _build_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by transform and export: how the model is built before it is written."""
    _model_arguments(parser)
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
    import graphlora
    from graphlora.rules_file import load_rules

    progress = not args.no_progress
    rules = load_rules(args.rules)
    with _quiet_transformers(progress):
        loaded = load_model(args.model)
    _require_inputs(loaded, args.model, args.method)
    batches = _calibration_batches(args.calibrate_with, loaded) if args.calibrate_with else None
    gptq = [i for i, r in enumerate(rules) if r.weight_qtype and r.weight_calibration == "gptq"]
    if gptq and batches is None:
        raise InputError(
            f"{args.rules}: rule #{gptq[0]} uses weight_calibration='gptq', which needs calibration "
            "data: pass --calibrate-with TEXTFILE"
        )
    model = graphlora.transform(
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
    if _wants_activation_encodings(model):
        if batches is not None:
            graphlora.calibrate(model, batches, progress=progress)
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
    description=_wrap(
        "Trace MODEL, apply RULES (LoRA, QLoRA, quantization) with graphlora.transform, optionally "
        "calibrate, and write any of: the model (--out, in the --save format of "
        "LoraModel.save_pretrained), the graph text (--graph-text), the encodings (--encodings). "
        "Every file is written atomically."
    )
    + _MODEL_HELP,
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
    description=_wrap(
        "Trace MODEL, apply RULES, calibrate activations with --calibrate-with when the rules "
        "quantize activations (required then), and export standard ONNX QDQ with "
        "graphlora.onnx.export_onnx. The ONNX inputs are the example inputs' names."
    )
    + _MODEL_HELP,
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


# --------------------------------------------------------------------------------------------------
# demo (the body lives in graphlora.demo)
# --------------------------------------------------------------------------------------------------


def _demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", metavar="DIR", help="where the artefacts go (default: the demo's, ./graphlora-demo)")
    parser.add_argument("--steps", type=int, metavar="N", help="LoRA training steps (default: the demo's)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


@subcommand(
    "demo",
    help="run the end-to-end QW-LoRA demo on the pretrained MiniLM",
    arguments=_demo_arguments,
    description=_wrap(
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
