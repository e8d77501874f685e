"""graphlora: LoRA, QLoRA and quantization as compiler passes over torch.fx graphs."""

from graphlora.adapters import LoraSpec
from graphlora.calibration import calibrate
from graphlora.diff import GraphDiff, diff, graph_text, read_graph_text, save_graph_text
from graphlora.errors import (
    AdapterError,
    CalibrationError,
    DistributedError,
    ExportError,
    FileFormatError,
    GraphloraError,
    GraphloraWarning,
    InputError,
    MissingDependencyError,
    PassError,
    QuantizationError,
    RuleError,
    SaveError,
    TraceError,
    UnsafeFileError,
)
from graphlora.model import LoraModel, MatchedSite
from graphlora.pipeline import transform
from graphlora.rules import LoraRule, QuantRule
from graphlora.io.encodings_file import load_encodings, save_encodings
from graphlora.trace import trace
from graphlora.train import TrainResult, train_lora
from graphlora.workflows import QuantLoraWorkflow, qw_lora, qwa_lora

from graphlora.version import __version__


def export_onnx(model, path, example_args=(), example_kwargs=None, **kwargs):
    """Export a LoraModel to ONNX QDQ for onnxruntime (see :func:`graphlora.onnx.export_onnx`)."""
    from graphlora.onnx.export import export_onnx as _export_onnx

    return _export_onnx(model, path, example_args, example_kwargs, **kwargs)


def load_quantized(model, directory, example_args=(), example_kwargs=None, **kwargs):
    """Rebuild a LoraModel from a ``save_pretrained(..., keep_quantized=True)`` directory."""
    from graphlora.checkpoint import load_quantized as _load_quantized

    return _load_quantized(model, directory, example_args, example_kwargs, **kwargs)


def load_adapter(model, adapter_dir, **kwargs):
    """Load a PEFT LoRA adapter directory into a LoraModel (or transform a plain model with it).

    See :func:`graphlora.checkpoint.load_adapter` for the options.
    """
    from graphlora.checkpoint import load_adapter as _load_adapter

    return _load_adapter(model, adapter_dir, **kwargs)


__all__ = [
    "AdapterError",
    "CalibrationError",
    "DistributedError",
    "ExportError",
    "FileFormatError",
    "GraphloraError",
    "GraphloraWarning",
    "InputError",
    "LoraModel",
    "LoraRule",
    "LoraSpec",
    "MatchedSite",
    "MissingDependencyError",
    "PassError",
    "QuantRule",
    "QuantizationError",
    "RuleError",
    "SaveError",
    "TraceError",
    "UnsafeFileError",
    "GraphDiff",
    "calibrate",
    "diff",
    "graph_text",
    "read_graph_text",
    "save_graph_text",
    "export_onnx",
    "load_adapter",
    "QuantLoraWorkflow",
    "TrainResult",
    "load_encodings",
    "load_quantized",
    "qw_lora",
    "qwa_lora",
    "save_encodings",
    "trace",
    "train_lora",
    "transform",
]
