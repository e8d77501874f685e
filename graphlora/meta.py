"""The one place metadata conventions live: every key graphlora stores on nodes and graphs.

Every node a graphlora pass creates or recognises carries ``node.meta["graphlora"]``, a plain dict,
so later passes, the graph diff and the ONNX lowering read *roles* rather than guessing from node
names. Its keys are :data:`FIELDS` (all optional except ``role``); :func:`tag` refuses any other,
so a new key is added here, with what it means, or not at all.

Graph-level facts live in ``GraphModule.meta`` under the ``*_KEY`` constants below (written by
the tracer, read by the model and the checkpoint layer).

Edit metadata only through :func:`tag` and :func:`drop`: both replace the dict instead of
changing it. fx copies ``node.meta`` shallowly, so a graph copy (a merged save, an export's
prepared graph) shares these dicts with the model it was copied from.
"""

from __future__ import annotations

from typing import Any

import torch.fx as fx

META_KEY = "graphlora"

ROLES = (
    "base",
    "lora_a",
    "lora_b",
    "lora_dropout",
    "lora_scale",
    "lora_add",
    "lora_gate",
    "lora_cast_in",
    "lora_cast_out",
    "lora_view",
    "dora_norm",
    "dora_scale",
    "dora_mix",
    "weight",
    "quant",
    "dequant",
    "fake_quant",
    "observer",
)


#: Every key of ``node.meta["graphlora"]``, with what it holds.
FIELDS: dict[str, str] = {
    "role": "what the node is (one of ROLES)",
    "module_path": "the module path of the site the node belongs to",
    "adapter": "the adapter name, for nodes a LoRA branch owns",
    "site_key": "the site use a branch node belongs to (SiteSpec.key: path, or path#n)",
    "rule": "for base nodes: the rule (a frozen dataclass) that matched the site",
    "rule_index": "for base nodes: that rule's index in the rule list",
    "site": "for base nodes: the normalised SiteSpec of the linear site (see sites.py)",
    "weight_qtype": "for base nodes: the qtype the base weight is stored in (packed storage)",
    "weight_encoding": "for base nodes: the encoding a float weight sits on the grid of (QW-LoRA)",
    "weight_method": "for base nodes: the calibration method that made weight_encoding",
    "tensor": "the tensor a quantization node or weight read is about (parameter or activation name)",
    "qtype": "for quantization nodes: the qtype",
    "encoding": "for quantization nodes: the Encoding applied",
    "block_size": "for dequant nodes: the encoding's block size",
    "axis": "for dequant nodes: the encoding's channel axis",
    "method": "for dequant nodes: the calibration method that made the encoding",
    "symmetric": "for observers and fake-quant: whether the grid is symmetric",
    "grid": "for observers: the symmetric integer grid asked for (full / restricted; None: default)",
    "calibration": "for observers: the activation calibration method",
    "percentile": "for observers: the percentile of percentile calibration",
}

#: ``GraphModule.meta`` keys.
CALL_FORM_KEY = "graphlora_call_form"  # signature.CallForm: which arguments go positionally, which by name
CALL_KEY = "graphlora_call_key"  # signature.call_key of the call the graph was traced for
RANGES_KEY = "graphlora_ranges"  # {symbol: (low, high)} of the graph's symbolic input sizes
STATE_KEYS_KEY = "graphlora_state_keys"  # the original model's state-dict keys, in order
TRACE_KEY = "graphlora_trace"  # {"method", "model_class"} of the trace
DYNAMIC_KEY = "graphlora_dynamic"  # True when the trace kept its dynamic shapes
#: ``node.meta`` key (outside the graphlora dict) of a block call in an FSDP split graph.
BLOCK_KEY = "graphlora_block"


def info(node: fx.Node) -> dict[str, Any]:
    """The graphlora metadata of a node ({} when it has none)."""
    return node.meta.get(META_KEY, {})


def role(node: fx.Node) -> str | None:
    return node.meta.get(META_KEY, {}).get("role")


def tag(node: fx.Node, role: str, **fields: Any) -> fx.Node:
    """Set the graphlora metadata of ``node`` (merging with what it has) and return the node."""
    if role not in ROLES:
        raise ValueError(f"unknown graphlora role {role!r}; expected one of {ROLES}")
    unknown = sorted(set(fields) - set(FIELDS))
    if unknown:
        raise ValueError(f"unknown graphlora metadata key(s) {unknown}: add them to meta.FIELDS")
    data = dict(node.meta.get(META_KEY, {}))
    data["role"] = role
    data.update({k: v for k, v in fields.items() if v is not None})
    node.meta[META_KEY] = data
    return node


def drop(node: fx.Node, *keys: str) -> fx.Node:
    """Remove ``keys`` from the graphlora metadata of ``node`` (a new dict) and return the node."""
    node.meta[META_KEY] = {k: v for k, v in info(node).items() if k not in keys}
    return node

