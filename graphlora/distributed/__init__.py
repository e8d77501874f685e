"""graphlora under ``torch.distributed``: DDP, FSDP2 (``fully_shard``), calibration across ranks,
and saving from rank 0.

graphlora does not distribute anything itself. A :class:`~graphlora.LoraModel` is an ordinary
``nn.Module`` whose only trainable tensors are the LoRA factors, so PyTorch's own engines apply:

DDP
    ``DistributedDataParallel(lora_model)`` works as is: DDP buckets only parameters with
    ``requires_grad=True``, which are the LoRA factors; frozen float weights and packed (integer)
    quantized buffers get no gradient bucket. :func:`wrap_ddp` adds one default (no buffer
    broadcast before every forward: packed base weights are identical on every rank, re-sending
    them each step is waste) and checks; :func:`ddp_bucket_parameter_names` shows the buckets.

FSDP2
    ``fully_shard`` works through module forward hooks, but a traced graph never calls its
    submodules: ``model.layers.3`` in a GraphModule is a plain container of tensors that the one
    flat graph reads with ``get_attr``. :func:`shard_lora_model` therefore gives every
    transformer block a real call: it splits the flat graph into one subgraph per block (the
    nodes whose module path lies under the block) and a root graph that calls the blocks, then
    applies ``fully_shard`` per block and to the model. The LoRA factors of a block live in a
    separate tree (``graphlora_adapters.<adapter>.<block path>``); they are sharded in the
    block's FSDP group through ``fully_shard([block, adapter container, ...])``, so they are
    all-gathered and their gradients reduce-scattered together with the block. The flat graph
    stays the model's graph (graph text, diffs, saving, ``train()``/``eval()`` all read it); the
    split is derived from it and rebuilt when it changes. Frozen packed weights are buffers,
    which FSDP leaves alone: they stay packed (replicated on every rank).

Calibration
    :func:`sync_stats` all-reduces the mergeable statistics of observers and GPTQ Hessian
    accumulators following their reduce protocol, so every rank computes the encodings one
    process would compute from all ranks' data. :func:`graphlora.calibrate` and the GPTQ pass
    call it. It lives in :mod:`graphlora.collectives`, below the graph and model layers that
    need it (it knows no LoraModel), and is re-exported here.

Saving
    :func:`save_on_rank0` gathers sharded tensors, saves on rank 0 with
    :meth:`LoraModel.save_pretrained` and makes every rank wait for (and see the result of) the
    save.

One module per job: :mod:`.blocks` (finding the blocks), :mod:`.split` (the flat graph cut into
per-block calls, with their generated code), :mod:`.fsdp`, :mod:`.ddp`, :mod:`.saving`
(gathering and rank-0 saving), :mod:`.unwrap` (the LoraModel inside a DDP wrapper).
"""

from __future__ import annotations

from graphlora.collectives import is_initialized, sync_stats
from graphlora.distributed.blocks import find_transformer_blocks
from graphlora.distributed.ddp import ddp_bucket_parameter_names, wrap_ddp
from graphlora.distributed.fsdp import is_sharded, shard_lora_model, sharded_blocks
from graphlora.distributed.saving import gather_lora_state_dict, save_on_rank0
from graphlora.distributed.unwrap import unwrap_model

__all__ = [
    "ddp_bucket_parameter_names",
    "find_transformer_blocks",
    "gather_lora_state_dict",
    "is_initialized",
    "is_sharded",
    "save_on_rank0",
    "shard_lora_model",
    "sharded_blocks",
    "sync_stats",
    "unwrap_model",
    "wrap_ddp",
]
