"""Values for the buffers of a ``meta``-device model that no checkpoint holds.

A model built under ``torch.device("meta")`` has every tensor on meta, including buffers it
computes in ``__init__`` and keeps out of its state dict (rotary frequencies, causal masks).
A checkpoint cannot give them, so they are computed again: a copy of the module that owns one
is given real storage and the model's own ``_init_weights`` (transformers' hook, which recomputes
exactly these buffers when ``from_pretrained`` loads onto meta) fills it. The copy is filled with
NaN first: a buffer the hook leaves alone is reported, never handed over as uninitialised memory
(so only floating buffers are computed).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn as nn

__all__ = ["meta_buffer_values"]


def meta_buffer_values(model: nn.Module) -> Callable[[list[str]], dict[str, torch.Tensor]]:
    """A function from the names of one (tied) tensor of ``model`` to ``{name: value}`` for the
    names it can compute; empty when the model has no ``_init_weights`` or it leaves them unset."""

    def compute(names: list[str]) -> dict[str, torch.Tensor]:
        init = getattr(model, "_init_weights", None)
        if not callable(init):
            return {}
        out: dict[str, torch.Tensor] = {}
        for name in names:
            head, _, leaf = name.rpartition(".")
            try:
                owner = model.get_submodule(head) if head else model
            except AttributeError:
                continue
            if leaf not in owner._buffers or owner._buffers[leaf] is None:
                continue
            memo = {id(v): v for v in vars(owner).values() if not isinstance(v, (torch.Tensor, nn.Module, dict, list))}
            fresh = copy.deepcopy(owner, memo).to_empty(device="cpu", recurse=True)
            with torch.no_grad():
                for t in list(fresh.parameters()) + list(fresh.buffers()):
                    if t.is_floating_point():
                        t.fill_(float("nan"))
                try:
                    init(fresh)
                except Exception:  # a hook that cannot run on a lone module computes nothing
                    continue
            value = fresh._buffers.get(leaf)
            if value is not None and value.is_floating_point() and not bool(value.isnan().any()):
                out[name] = value.detach()
        return out

    return compute
