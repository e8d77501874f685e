"""Load a model named by a string, with the example inputs it is traced with.

A model is named the way the command line names it (``graphlora inspect MODEL``): a transformers
model directory or a ``module:attr`` factory. The convention lives here, not in the CLI, so that
scripts, notebooks and other front ends load a model and its tracing inputs exactly as the
``graphlora`` commands do, with the same error messages. :func:`calibration_batches` turns a text
file into batches shaped like those example inputs, which is what GPTQ and ``calibrate`` run.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from graphlora.errors import AdapterError, GraphloraError, InputError, UnsafeFileError, require

if TYPE_CHECKING:
    import torch.nn as nn

__all__ = ["LoadedModel", "calibration_batches", "config_and_class", "load_model", "load_tokenizer"]

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

@dataclass
class LoadedModel:
    """A loaded model with the example inputs it is traced with (and its tokenizer, if any)."""

    model: "nn.Module"
    example_args: tuple = ()
    example_kwargs: dict[str, Any] = field(default_factory=dict)
    tokenizer: Any = None
    description: str = ""


def load_model(spec: str, *, progress: bool = True, allow_pickle: bool = False) -> LoadedModel:
    """Load a transformers directory or a ``module:attr`` factory (docs/cli.md, MODEL), with the
    example inputs it is traced with.

    A ``module:attr`` factory is Python code and runs (it is imported): name only code you trust.
    A directory is data: it is loaded without ``trust_remote_code`` and from safetensors weights
    only, unless ``allow_pickle=True`` lets transformers read pickled ``pytorch_model.bin`` files
    (docs/security.md). The model is put in eval mode so tracing and exports are deterministic.
    ``progress=False`` hides transformers' weight-loading progress bars.
    """
    with _quiet_transformers(progress):
        loaded = _load(spec, allow_pickle)
    loaded.model.eval()
    return loaded


def _load(spec: str, allow_pickle: bool = False) -> LoadedModel:
    path = Path(spec)
    if path.is_dir():
        return _load_transformers_dir(path, allow_pickle)
    if path.exists():
        raise InputError(
            f"MODEL {spec!r} is a file; expected a transformers model directory or module:attr "
            "(e.g. models.py:make_model)"
        )
    if ":" in spec:
        return _load_factory(spec)
    raise InputError(
        f"MODEL {spec!r} is neither a directory nor module:attr; pass a transformers model "
        "directory (written by save_pretrained) or a factory such as mypkg.models:make_model"
    )


def _load_transformers_dir(path: Path, allow_pickle: bool = False) -> LoadedModel:
    transformers = require("transformers", "loading a model directory")
    if not (path / "config.json").is_file():
        hint = (
            " (it is a LoRA adapter directory: pass its base model as MODEL)"
            if (path / "adapter_config.json").is_file()
            else ""
        )
        raise AdapterError(f"{path}: no config.json, so not a transformers model directory{hint}")
    if not allow_pickle and not any(path.glob("*.safetensors")) and any(path.glob("*.bin")):
        raise UnsafeFileError(
            f"{path}: its weights are pickled (*.bin), which can run code when loaded; convert them to "
            "safetensors, or pass allow_pickle=True (the CLI: --allow-pickle) if you trust the files"
        )
    config, cls = config_and_class(path, transformers.AutoModel)
    try:
        model = cls.from_pretrained(
            path, local_files_only=True, trust_remote_code=False, use_safetensors=None if allow_pickle else True
        )
    except Exception as exc:
        raise AdapterError(f"{path}: transformers {cls.__name__} cannot load it: {_first_line(exc)}") from exc
    tokenizer = _load_tokenizer(transformers, path)
    args, kwargs = _transformers_example_inputs(model, tokenizer)
    what = "tokenized example sentences" if tokenizer is not None else f"input_ids {FALLBACK_INPUT_SHAPE}"
    return LoadedModel(model, args, kwargs, tokenizer, f"{type(model).__name__} from {path} ({what})")


def config_and_class(path: Path, fallback: Any) -> tuple[Any, Any]:
    """A transformers directory's config (no remote code) and the class its ``architectures``
    names, or ``fallback`` when it names none that transformers has."""
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except Exception as exc:
        raise AdapterError(f"{path}: cannot read config.json: {_first_line(exc)}") from exc
    architectures = getattr(config, "architectures", None) or []
    cls = getattr(transformers, architectures[0], None) if architectures else None
    return config, (cls if cls is not None else fallback)


def load_tokenizer(path: str | os.PathLike) -> Any:
    """The tokenizer in directory ``path`` (no remote code), or None when it has none."""
    import transformers

    return _load_tokenizer(transformers, Path(path))


def _load_tokenizer(transformers: Any, path: Path) -> Any:
    """The directory's tokenizer, or None when it has no tokenizer files (then input_ids are made up)."""
    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        return None
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
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


def _describe_value(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {len(value)} ({', '.join(type(v).__name__ for v in value)})"
    return f"a {type(value).__name__}"


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def calibration_batches(path: str | Path, loaded: LoadedModel) -> list[dict[str, Any]]:
    """One line of text per sample, CALIBRATION_BATCH_SIZE lines per batch, tokenized like the
    example inputs (the traced graph takes exactly those keyword inputs).

    The messages name ``--calibrate-with``, the option that passes this file on the command line.
    """
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
    """Hide transformers' weight-loading progress bars unless ``progress`` (restored afterwards)."""
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
