"""The LoraModel inside a DDP wrapper: every helper of this package accepts either."""

from __future__ import annotations

from torch import nn

from graphlora.errors import DistributedError
from graphlora.model import LoraModel

__all__ = ["unwrap_model"]


def unwrap_model(model: nn.Module) -> LoraModel:
    """The LoraModel inside a DDP wrapper (or the model itself); why: helpers accept either."""
    inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    if not isinstance(inner, LoraModel):
        raise DistributedError(
            f"expected a graphlora LoraModel (optionally wrapped in DistributedDataParallel), got "
            f"{type(inner).__name__}; build one with graphlora.transform()"
        )
    return inner
