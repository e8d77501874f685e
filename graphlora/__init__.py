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
from graphlora.pretrained import from_pretrained
from graphlora.rules import ActivationRule, LoraRule, QuantRule
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


def load_aimet_encodings(model, path, *, onnx_model=None):
    """Read an AIMET encodings file (0.6.1 / 1.0.0 / 2.0.0) onto a LoraModel, proving each entry's
    layout (see :func:`graphlora.onnx.aimet.load_aimet_encodings`)."""
    from graphlora.onnx.aimet import load_aimet_encodings as _load

    return _load(model, path, onnx_model=onnx_model)


def save_aimet_encodings(encodings, path):
    """Write encodings as the file AIMET's ``QuantizationSimModel.load_encodings`` reads (see
    :func:`graphlora.onnx.aimet.save_aimet_encodings`); returns what it left out, with why."""
    from graphlora.onnx.aimet import save_aimet_encodings as _save

    return _save(encodings, path)


def load_adapter(model, adapter_dir, **kwargs):
    """Load a PEFT LoRA adapter directory into a LoraModel (or transform a plain model with it).

    See :func:`graphlora.checkpoint.load_adapter` for the options.
    """
    from graphlora.checkpoint import load_adapter as _load_adapter

    return _load_adapter(model, adapter_dir, **kwargs)


__all__ = [
    "ActivationRule",
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
    "from_pretrained",
    "load_adapter",
    "load_aimet_encodings",
    "save_aimet_encodings",
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
