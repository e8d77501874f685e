"""The one place node metadata conventions live.

Every node a graphlora pass creates or recognises carries ``node.meta["graphlora"]``, a plain dict,
so later passes, the graph diff and the ONNX lowering read *roles* rather than guessing from node
names. Keys (all optional except ``role``):

``role``        what the node is: ``base`` (a recognised linear site), ``lora_a``, ``lora_b``,
                ``lora_dropout``, ``lora_scale``, ``lora_add``, ``weight`` (a weight read),
                ``quant``, ``dequant``, ``fake_quant``, ``observer``
``module_path`` the module path of the site the node belongs to
``adapter``     the adapter name, for LoRA nodes
``rule``        the rule (a frozen dataclass) that matched the site
``site``        for ``base`` nodes: the normalised description of the linear site (see sites.py)

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
    "weight",
    "quant",
    "dequant",
    "fake_quant",
    "observer",
)


def info(node: fx.Node) -> dict[str, Any]:
    """The graphlora metadata of a node ({} when it has none)."""
    return node.meta.get(META_KEY, {})


def role(node: fx.Node) -> str | None:
    return node.meta.get(META_KEY, {}).get("role")


def tag(node: fx.Node, role: str, **fields: Any) -> fx.Node:
    """Set the graphlora metadata of ``node`` (merging with what it has) and return the node."""
    if role not in ROLES:
        raise ValueError(f"unknown graphlora role {role!r}; expected one of {ROLES}")
    data = dict(node.meta.get(META_KEY, {}))
    data["role"] = role
    data.update({k: v for k, v in fields.items() if v is not None})
    node.meta[META_KEY] = data
    return node


def drop(node: fx.Node, *keys: str) -> fx.Node:
    """Remove ``keys`` from the graphlora metadata of ``node`` (a new dict) and return the node."""
    node.meta[META_KEY] = {k: v for k, v in info(node).items() if k not in keys}
    return node

