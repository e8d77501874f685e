"""Feeding user data to a model: one convention for calibration, GPTQ and training.

A batch is a tuple/list of positional arguments, a dict of keyword arguments, or a single tensor;
``batches`` is any iterable of those (a list, a generator, a ``DataLoader``). Progress bars use
tqdm and can be turned off.
"""

from __future__ import annotations

import itertools
from typing import Any, Iterable, Iterator

import torch

from graphlora.errors import InputError
from graphlora.validate import check_count


def call(model, batch: Any):
    """Run ``model`` on one batch, whatever its form."""
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        if len(batch) == 2 and isinstance(batch[0], (tuple, list)) and isinstance(batch[1], dict):
            return model(*batch[0], **batch[1])  # (args, kwargs)
        return model(*batch)
    if isinstance(batch, torch.Tensor):
        return model(batch)
    if hasattr(batch, "keys") and hasattr(batch, "__getitem__"):  # transformers BatchEncoding
        return model(**{k: batch[k] for k in batch.keys()})
    raise InputError(
        f"a batch must be a tuple of positional arguments, a dict of keyword arguments or a "
        f"tensor; got {type(batch).__name__}"
    )


def iterate(
    batches: Iterable[Any],
    *,
    num_batches: int | None = None,
    progress: bool = True,
    desc: str = "batches",
) -> Iterator[Any]:
    """Iterate ``batches`` (at most ``num_batches``), with a tqdm bar unless ``progress=False``.

    The arguments are checked when this is called, not when iteration starts."""
    if batches is None:
        raise InputError(f"{desc}: no data given (batches is None)")
    check_count(num_batches, "num_batches", optional=True)
    return _iterate(batches, num_batches, progress, desc)


def _iterate(batches: Iterable[Any], num_batches: int | None, progress: bool, desc: str) -> Iterator[Any]:
    total = num_batches
    if total is None:
        try:
            total = len(batches)  # type: ignore[arg-type]
        except TypeError:
            total = None
    it: Iterable[Any] = batches if num_batches is None else itertools.islice(batches, num_batches)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, total=total, desc=desc, leave=False)
    yield from it

