"""Every error graphlora raises on purpose derives from :class:`GraphloraError`.

Users catch one class; each area has its own subclass so tests and callers can be precise. A
message says what was wrong, where (module path, rule, file, key) and what to do about it.
"""

from __future__ import annotations


class GraphloraError(Exception):
    """Base class of all graphlora errors."""


class TraceError(GraphloraError):
    """The model could not be traced into a graph (names the tracer and suggests a fix)."""


class InputError(GraphloraError, ValueError):
    """Example or runtime inputs do not fit the model or the traced graph."""


class RuleError(GraphloraError, ValueError):
    """A LoRA or quantization rule is invalid, or (strict mode) matched nothing."""


class PassError(GraphloraError):
    """A graph pass produced an invalid graph or was given a graph it cannot handle."""


class QuantizationError(GraphloraError, ValueError):
    """Unsupported qtype/granularity, or values that cannot be quantized (NaN/Inf)."""


class CalibrationError(GraphloraError):
    """Calibration could not produce encodings (no batches, NaN/Inf data, ...)."""


class AdapterError(GraphloraError):
    """A saved adapter or model directory is missing, corrupt or does not fit the model."""


class FileFormatError(AdapterError):
    """A file graphlora reads is truncated, corrupt or of an unexpected format."""


class CheckpointMismatchError(FileFormatError):
    """A checkpoint that does not fit the model it is read into: a tensor missing, or of another
    shape or kind (the message names the tensor and the file)."""


class UnsafeFileError(FileFormatError):
    """Reading this file would run code (it is, or contains, a Python pickle); graphlora refuses
    unless the caller opts in with ``allow_pickle=True`` (see docs/security.md)."""


class SaveError(GraphloraError, OSError):
    """A write graphlora refuses or could not finish safely (a symlinked or unsafe target, a file
    where a directory belongs, a stranded backup); the previous artefact is left as it was."""


class ExportError(GraphloraError):
    """ONNX export cannot express the model as asked (opset, qtype, mode)."""


class MissingDependencyError(GraphloraError, ImportError):
    """An optional package is needed for this feature; the message names it."""


class DistributedError(GraphloraError):
    """torch.distributed is used in a way graphlora cannot support."""


class GraphloraWarning(UserWarning):
    """Warnings graphlora emits (e.g. rules that matched nothing)."""


def first_few(items, limit: int = 5) -> str:
    """``a, b, c`` or ``a, b, c, d, e and 3 more``: the first offenders, for a message."""
    items = [str(i) for i in items]
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def require(package: str, feature: str, install: str | None = None):
    """Import an optional dependency or raise a MissingDependencyError that says what to install."""
    import importlib

    try:
        return importlib.import_module(package)
    except ImportError as exc:  # pragma: no cover - exercised through monkeypatching in tests
        hint = install or package.split(".")[0]
        raise MissingDependencyError(
            f"{feature} needs the package '{hint}', which is not installed: pip install {hint}"
        ) from exc
