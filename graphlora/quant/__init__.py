"""Quantization math: qtypes, encodings, packing, custom ops, calibration and observers.

Tensor-level only — this package knows nothing of graphs or LoRA. Importing it registers the
``torch.ops.graphlora.*`` custom ops (see :mod:`graphlora.quant.ops` for their schemas).
"""

from graphlora.quant import ops
from graphlora.quant.encoding import PER_BLOCK, PER_CHANNEL, PER_TENSOR, DoubleQuant, Encoding
from graphlora.quant.gptq import GPTQResult, HessianAccumulator, gptq_quantize
from graphlora.quant.memory import bits_per_param, storage_breakdown
from graphlora.quant.observers import (
    HistogramObserver,
    MinMaxObserver,
    Observer,
    make_observer,
    reduce_observers,
)
from graphlora.quant.packing import pack_4bit, packed_length, unpack_4bit
from graphlora.quant.qtypes import (
    DEFAULT_GRIDS,
    GRIDS,
    NF4_CODEBOOK,
    QType,
    check_qtype_use,
    default_grid,
    get_qtype,
    is_valid_for,
    qtype_names,
    resolve_grid,
    with_grid,
)
from graphlora.quant.weight_calibration import calibrate_weight
from graphlora.quant.seqmse import adaround_quantize, seqmse_quantize
from graphlora.quant.weight_methods import (
    WeightMethod,
    data_free_method,
    register_weight_method,
    weight_method,
    weight_method_names,
)

__all__ = [
    "DEFAULT_GRIDS",
    "GRIDS",
    "NF4_CODEBOOK",
    "PER_BLOCK",
    "PER_CHANNEL",
    "PER_TENSOR",
    "DoubleQuant",
    "Encoding",
    "GPTQResult",
    "HessianAccumulator",
    "HistogramObserver",
    "MinMaxObserver",
    "Observer",
    "QType",
    "bits_per_param",
    "calibrate_weight",
    "check_qtype_use",
    "get_qtype",
    "gptq_quantize",
    "seqmse_quantize",
    "adaround_quantize",
    "is_valid_for",
    "make_observer",
    "ops",
    "pack_4bit",
    "packed_length",
    "qtype_names",
    "reduce_observers",
    "storage_breakdown",
    "unpack_4bit",
    "WeightMethod",
    "data_free_method",
    "register_weight_method",
    "weight_method",
    "weight_method_names",
    "default_grid",
    "resolve_grid",
    "with_grid",
]
