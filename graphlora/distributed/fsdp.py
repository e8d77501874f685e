"""FSDP2 for a LoraModel: one ``fully_shard`` unit per transformer block, LoRA factors included.

Each block becomes one FSDP group together with the block's LoRA factors, which live in a
separate tree (``graphlora_adapters.<adapter>.<block path>``): ``fully_shard([block, adapter
container, ...])`` all-gathers them and reduce-scatters their gradients together with the block.
The model itself is the root group. The graph runs block by block (:mod:`.split`) so that the
groups' hooks fire. Frozen packed weights are buffers, which FSDP leaves alone: they stay packed,
replicated on every rank.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import fx, nn

from graphlora.adapters import ADAPTERS_ROOT
from graphlora.block_split import check_blocks
from graphlora.collectives import require_initialized
from graphlora.distributed.blocks import find_transformer_blocks
from graphlora.distributed.split import execution_state, noop_forward, run_blockwise, split_graph
from graphlora.distributed.unwrap import unwrap_model
from graphlora.errors import DistributedError
from graphlora.model import LoraModel

__all__ = ["is_sharded", "shard_lora_model", "sharded_blocks"]


def is_sharded(model: nn.Module) -> bool:
    """Whether :func:`shard_lora_model` was applied (the GraphModule runs block by block)."""
    gm = getattr(unwrap_model(model), "graph_module", None)
    return gm is not None and execution_state(gm) is not None


def sharded_blocks(model: nn.Module) -> list[str]:
    """The block paths a sharded model runs as FSDP units ([] when not sharded)."""
    gm = unwrap_model(model).graph_module
    state = execution_state(gm)
    return list(state.blocks) if state is not None else []


def shard_lora_model(
    model: LoraModel,
    *,
    mesh: Any = None,
    blocks: Sequence[str] | str | None = None,
    reshard_after_forward: bool | int | None = None,
    mp_policy: Any = None,
    offload_policy: Any = None,
    shard_frozen: bool = True,
) -> LoraModel:
    """Apply FSDP2 ``fully_shard`` to every transformer block of ``model`` and to the model.

    ``blocks``: module paths (default :func:`find_transformer_blocks`) or a regex fullmatching
    them. Each block becomes one FSDP group together with its LoRA factors (all adapters the
    model has now); the model itself is the root group (embeddings, final norm, head and LoRA on
    sites outside blocks). ``mesh``, ``reshard_after_forward``, ``mp_policy`` and
    ``offload_policy`` are passed to ``fully_shard``. Frozen float weights are sharded too
    (that is the memory saving); ``shard_frozen=False`` keeps them replicated and unmanaged, so
    FSDP only shards and all-gathers LoRA factors. Integer (packed) tensors are never sharded.

    Returns ``model`` (now also an ``FSDPModule``); train it as usual — its parameters are
    ``DTensor`` shards, so build the optimizer after this call. Add adapters before sharding;
    switching between them afterwards works.
    """
    require_initialized("shard_lora_model()")
    if isinstance(model, nn.parallel.DistributedDataParallel):
        raise DistributedError("shard_lora_model() takes the LoraModel itself, not a DDP wrapper: use one of DDP or FSDP")
    model = unwrap_model(model)
    gm = model.graph_module
    if execution_state(gm) is not None:
        raise DistributedError("this model is already sharded (shard_lora_model() was applied)")
    from torch.distributed.fsdp import fully_shard

    paths = find_transformer_blocks(model, blocks) if (blocks is None or isinstance(blocks, str)) else list(blocks)
    if not paths:
        raise DistributedError(
            "found no transformer blocks to shard (no module with integer-named children such as "
            "model.layers.0); pass blocks=[module paths] or a regex"
        )
    _check_block_paths(gm, paths)
    containers = _adapter_containers(gm, paths)
    # validate the split before touching the model, so a failure leaves it unsharded
    split_graph(gm.graph, paths, containers)

    given = {
        "mesh": mesh,
        "reshard_after_forward": reshard_after_forward,
        "mp_policy": mp_policy,
        "offload_policy": offload_policy,
        "ignored_params": _ignored_parameters(model, shard_frozen) or None,
    }
    options = {k: v for k, v in given.items() if v is not None}  # fully_shard's own defaults otherwise
    for path in paths:
        group = [gm.get_submodule(path)] + [gm.get_submodule(c) for c in containers[path]]
        for c in containers[path]:
            gm.get_submodule(c).__dict__["forward"] = noop_forward
        fully_shard(group if len(group) > 1 else group[0], **options)
    fully_shard(model, **options)

    run_blockwise(gm, paths, containers)
    return model


def _check_block_paths(gm: fx.GraphModule, paths: Sequence[str]) -> None:
    problem = check_blocks(dict(gm.named_modules()), paths)
    if problem is not None:
        raise DistributedError(problem)


def _adapter_containers(gm: fx.GraphModule, paths: Sequence[str]) -> dict[str, list[str]]:
    """Block path -> the adapter-tree containers holding that block's LoRA factors."""
    root = gm._modules.get(ADAPTERS_ROOT)
    out: dict[str, list[str]] = {p: [] for p in paths}
    if root is None:
        return out
    for adapter in root._modules:
        for p in paths:
            name = f"{ADAPTERS_ROOT}.{adapter}.{p}"
            try:
                gm.get_submodule(name)
            except AttributeError:
                continue
            out[p].append(name)
    return out


def _ignored_parameters(model: LoraModel, shard_frozen: bool) -> set[nn.Parameter]:
    """Parameters FSDP must leave alone: integer (packed) ones always, frozen ones on request."""
    ignored = set()
    for p in model.parameters():
        packed = not (p.dtype.is_floating_point or p.dtype.is_complex)
        if packed or (not shard_frozen and not p.requires_grad):
            ignored.add(p)
    return ignored
