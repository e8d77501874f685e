"""DDP for a LoraModel: PyTorch's own ``DistributedDataParallel`` with one changed default.

DDP buckets only parameters with ``requires_grad=True``, which in a LoraModel are the LoRA
factors; frozen float weights and packed (integer) quantized buffers get no gradient bucket.
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from graphlora.collectives import require_initialized
from graphlora.distributed.fsdp import is_sharded
from graphlora.distributed.unwrap import unwrap_model
from graphlora.errors import DistributedError
from graphlora.model import LoraModel

__all__ = ["ddp_bucket_parameter_names", "wrap_ddp"]


def wrap_ddp(model: LoraModel, *, sync_buffers: bool = False, **ddp_kwargs: Any) -> nn.parallel.DistributedDataParallel:
    """``DistributedDataParallel(model, ...)`` with checks and one changed default.

    DDP needs nothing special for a LoraModel: it buckets only ``requires_grad`` parameters (the
    LoRA factors) and every factor of the active adapters is used in every forward, so
    ``find_unused_parameters`` is not needed. ``sync_buffers=False`` by default: a quantized base
    lives in buffers (packed weights, scales) that are identical on all ranks, and re-sending them
    from rank 0 before every forward would move the whole base model each step. DDP still copies
    rank 0's parameters and buffers once when it is built. Other keyword arguments go to DDP.
    """
    require_initialized("wrap_ddp()")
    model = unwrap_model(model)
    if is_sharded(model):
        raise DistributedError("this model is sharded with FSDP (shard_lora_model); do not also wrap it in DDP")
    if not any(p.requires_grad for p in model.parameters()):
        raise DistributedError(
            "the model has no trainable (LoRA) parameter: activate an adapter (model.set_adapter) "
            "before wrapping it in DistributedDataParallel"
        )
    if "broadcast_buffers" not in ddp_kwargs and "forward_sync_buffers" not in ddp_kwargs:
        params = inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters
        # torch >= 2.13 spells it forward_sync_buffers (broadcast_buffers is deprecated there)
        key = "forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers"
        ddp_kwargs[key] = sync_buffers
    return nn.parallel.DistributedDataParallel(model, **ddp_kwargs)


def ddp_bucket_parameter_names(ddp: nn.parallel.DistributedDataParallel) -> list[list[str]]:
    """Parameter names (of ``ddp.module``) in each of DDP's gradient buckets, to check that only
    LoRA factors are synchronised."""
    names = {id(p): n for n, p in ddp.module.named_parameters()}
    return [[names.get(id(p), "<unnamed>") for p in bucket.parameters()] for bucket in ddp.reducer._get_zeros_like_grad_buckets()]
