"""graphlora: LoRA, QLoRA and quantization as compiler passes over torch.fx graphs."""

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
    TraceError,
)

__version__ = "0.1.0"
