"""``graphlora.from_pretrained``: a transformers checkpoint directory to a LoraModel, its float
weights never all in memory.

What a PEFT user does with bitsandbytes in one call (``from_pretrained(..., quantization_config=
...)`` then ``get_peft_model``), done the graphlora way: the architecture is built from
``config.json`` on the ``meta`` device (no weights, no memory), traced, and
:func:`graphlora.transform` reads the checkpoint tensor by tensor, quantizing the weights the
rules quantize as they are read. The directory is data: no ``trust_remote_code``, safetensors
only.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable

import torch

from graphlora.errors import AdapterError, InputError, require
from graphlora.model import LoraModel
from graphlora.model_source import config_and_class
from graphlora.pipeline import transform
from graphlora.rules import QuantRule

__all__ = ["from_pretrained", "meta_model_from_config"]


def meta_model_from_config(directory: str | os.PathLike, *, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """The model class ``config.json`` names (its ``architectures``; else a causal LM), built on
    the meta device in ``dtype`` (default: the config's ``dtype``, float32 when it names none)."""
    transformers = require("transformers", "building a model from config.json")
    root = Path(directory)
    if not (root / "config.json").is_file():
        raise AdapterError(f"{root}: no config.json, so not a transformers model directory")
    config, cls = config_and_class(root, transformers.AutoModelForCausalLM)
    if dtype is None:
        dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise InputError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    with torch.device("meta"):
        if hasattr(cls, "_from_config"):
            model = cls._from_config(config, dtype=dtype)
        else:
            model = cls.from_config(config, dtype=dtype)
    return model.eval()


def from_pretrained(
    directory: str | os.PathLike,
    rules: int | QuantRule | Iterable[QuantRule],
    example_args: tuple = (),
    example_kwargs: dict[str, Any] | None = None,
    *,
    dtype: torch.dtype | None = None,
    progress: bool = True,
    **transform_kwargs: Any,
) -> LoraModel:
    """Build the model of ``directory`` on meta and transform it with its weights read from the
    directory's safetensors (``model.safetensors`` or shards with their index).

    Without example inputs, the model is traced with ``input_ids`` of shape (2, 8) (every size
    stays dynamic). ``dtype`` is the float dtype of the model's unquantized tensors and of the
    dequantized base (default: the config's). Other keywords go to :func:`graphlora.transform`.
    """
    from graphlora.model_source import FALLBACK_INPUT_SHAPE

    model = meta_model_from_config(directory, dtype=dtype)
    if not example_args and not example_kwargs:
        vocab = int(getattr(model.config, "vocab_size", 0) or 2)
        generator = torch.Generator().manual_seed(0)
        example_kwargs = {"input_ids": torch.randint(0, vocab, FALLBACK_INPUT_SHAPE, generator=generator)}
    return transform(model, rules, example_args, example_kwargs, checkpoint=directory, progress=progress,
                     **transform_kwargs)
