"""Gathering FSDP shards into full tensors, and saving from rank 0 while every rank waits.

Every gather is a collective, so every rank runs the same code up to the write; only rank 0
writes (with :meth:`LoraModel.save_pretrained`, graphlora's atomic save), and the outcome is
broadcast so that no rank hangs when the write fails.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import fx, nn

from graphlora.adapters import ADAPTERS_ROOT
from graphlora.collectives import is_initialized, rank
from graphlora.distributed.unwrap import unwrap_model
from graphlora.errors import DistributedError
from graphlora.model import LoraModel

__all__ = ["gather_lora_state_dict", "save_on_rank0"]


def _is_dtensor(t: Any) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without DTensor
        return False
    return isinstance(t, DTensor)


def _sharded_parameters(model: LoraModel, lora_only: bool) -> list[tuple[nn.Module, str, nn.Parameter]]:
    """(owner module, name, parameter) of every DTensor parameter, in module order (the same on
    every rank, which the gathers rely on). ``lora_only``: just the adapter tree."""
    root = model.graph_module
    out = []
    seen: set[int] = set()
    for path, module in root.named_modules():
        if lora_only and not (path == ADAPTERS_ROOT or path.startswith(ADAPTERS_ROOT + ".")):
            continue
        for name, p in module._parameters.items():
            if p is not None and _is_dtensor(p) and id(p) not in seen:
                seen.add(id(p))
                out.append((module, name, p))
    return out


@contextlib.contextmanager
def _full_parameters(model: LoraModel, *, lora_only: bool, keep: bool) -> Iterator[None]:
    """Gather every sharded parameter (a collective on all ranks, one tensor at a time) and, where
    ``keep``, register the full tensors in place of the shards until the block exits."""
    _reshard_all(model)
    swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
    try:
        for module, name, p in _sharded_parameters(model, lora_only):
            full = p.full_tensor().detach()
            if keep:
                module._parameters[name] = nn.Parameter(full, requires_grad=p.requires_grad)
                swapped.append((module, name, p))
        yield
    finally:
        for module, name, p in swapped:
            module._parameters[name] = p


def _reshard_all(model: nn.Module) -> None:
    """Put every FSDP group into its sharded state (the root stays gathered after a forward, and
    ``state_dict()`` would reshard it mid-save), so the gathers see one consistent layout."""
    fsdp_cls = _fsdp_module_class()
    if fsdp_cls is None:
        return
    for module in model.modules():
        if isinstance(module, fsdp_cls):
            module.reshard()


def gather_lora_state_dict(model: nn.Module, adapter: str | None = None, *, rank0_only: bool = False) -> dict[str, torch.Tensor]:
    """Full (unsharded) LoRA weights under PEFT names, from a plain, DDP or FSDP-sharded model.

    A collective when the model is sharded: call it on every rank. ``rank0_only=True`` returns
    an empty dict on other ranks (they still take part in the gathers).
    """
    lora = unwrap_model(model)
    keep = not rank0_only or rank() == 0
    with _full_parameters(lora, lora_only=True, keep=keep):
        if not keep:
            return {}
        return {k: v.detach().clone() for k, v in lora.lora_state_dict(adapter).items()}


def save_on_rank0(model: nn.Module, save_directory: Any, *, group: Any = None, **save_options: Any) -> Any:
    """``model.save_pretrained(save_directory, **save_options)`` on rank 0 only, from any rank.

    Sharded tensors are gathered first (all ranks take part): just the LoRA factors for
    ``only_save_adapters=True``, every parameter for the base-and-adapter and merged layouts.
    All ranks then wait until rank 0 finished writing, and every rank returns rank 0's result
    (a :class:`graphlora.checkpoint.SaveResult`). If rank 0 fails, rank 0 raises its error and
    the other ranks raise :class:`DistributedError` instead of hanging. Without a process group
    this is ``model.save_pretrained``.
    """
    lora = unwrap_model(model)
    if not is_initialized():
        return lora.save_pretrained(save_directory, **save_options)
    is_zero = dist.get_rank(group) == 0
    error: BaseException | None = None
    result: Any = None
    with _full_parameters(lora, lora_only=bool(save_options.get("only_save_adapters")), keep=is_zero):
        if is_zero:
            try:
                with _plain_module_tree(lora.graph_module):
                    result = lora.save_pretrained(save_directory, **save_options)
            except Exception as exc:  # noqa: BLE001 - reported to the other ranks below, then re-raised
                error = exc
    outcome = [None if error is None else f"{type(error).__name__}: {error}", result]
    dist.broadcast_object_list(outcome, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
    if error is not None:
        raise error
    if outcome[0] is not None:
        raise DistributedError(f"rank 0 failed to save to {save_directory}: {outcome[0]}")
    return outcome[1]


def _fsdp_module_class() -> type | None:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return None
    return FSDPModule


@contextlib.contextmanager
def _plain_module_tree(gm: fx.GraphModule) -> Iterator[None]:
    """Temporarily replace FSDP-managed submodules by plain look-alikes sharing their tensors.

    FSDP modules refuse ``deepcopy``, which ``LoraModel.merge`` (merged saves) relies on. The
    look-alikes have the original class, tensors and children but no FSDP state or hooks.
    """
    fsdp_cls = _fsdp_module_class()
    if fsdp_cls is None:
        yield
        return
    original = dict(gm._modules)
    try:
        for name, child in original.items():
            if child is not None:
                gm._modules[name] = _plain(child, fsdp_cls)
        yield
    finally:
        gm._modules.clear()
        gm._modules.update(original)


def _plain(module: nn.Module, fsdp_cls: type) -> nn.Module:
    """``module`` itself when no FSDP module is inside it, else a plain shell (see above)."""
    children = {k: (None if c is None else _plain(c, fsdp_cls)) for k, c in module._modules.items()}
    if not isinstance(module, fsdp_cls) and all(children[k] is module._modules[k] for k in children):
        return module
    cls = next(c for c in type(module).__mro__ if not issubclass(c, fsdp_cls))
    shell = cls.__new__(cls)
    nn.Module.__init__(shell)
    for key, value in module.__dict__.items():
        if key not in shell.__dict__ and not key.startswith("_") and key != "forward":
            shell.__dict__[key] = value  # plain settings such as in_features
    shell.training = module.training
    shell._parameters.update(module._parameters)
    shell._buffers.update(module._buffers)
    shell._non_persistent_buffers_set = set(module._non_persistent_buffers_set)
    shell._modules.update(children)
    return shell
