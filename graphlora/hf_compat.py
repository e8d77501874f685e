"""The attributes Hugging Face tools read from a model, on a LoraModel.

The Trainer, PEFT and ``generate`` are written against ``PreTrainedModel``: they read ``config``,
``device``, ``dtype``, ``main_input_name``, ``loss_type`` (which decides how the Trainer counts
``num_items_in_batch`` for a causal LM), call ``activation_checkpointing_enable`` (the
``gradient_checkpointing=True`` training argument) and ``get_input_embeddings``. This mixin
answers them for a LoraModel from the model it was made from (its structure-only copy, which
holds the original ``config``) and from the canonical graph's tensors. Nothing is forwarded
wholesale: an attribute the Trainer probes with ``getattr(model, name, default)`` to detect a
feature (``hf_device_map``, ``is_quantized``) must stay absent.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn as nn

from graphlora.errors import InputError

__all__ = ["HuggingFaceSurface"]

_UNSET = object()


class HuggingFaceSurface:
    """``PreTrainedModel``'s surface for :class:`graphlora.LoraModel` (mixed in; needs
    ``graph_module``, ``source`` and the ``_template`` structure-only copy)."""

    #: the LoraModel checkpoints transformer blocks itself (activation_checkpointing_enable)
    supports_gradient_checkpointing = True
    _checkpointing = None  # graphlora.activation_checkpointing.CheckpointPolicy when enabled

    # ------------------------------------------------------------------ what the model is

    @property
    def config(self) -> Any:
        """The original model's config (the same object; ``None`` for models without one)."""
        template = self.__dict__.get("_template")
        if template is not None and getattr(template, "config", None) is not None:
            return template.config
        return self.source.get("config")

    @property
    def generation_config(self) -> Any:
        template = self.__dict__.get("_template")
        return getattr(template, "generation_config", None)

    @generation_config.setter
    def generation_config(self, value: Any) -> None:
        template = self.__dict__.get("_template")
        if template is None:
            raise InputError("this LoraModel was not made from a transformers model: it has no generation_config")
        template.generation_config = value

    @property
    def name_or_path(self) -> str | None:
        return self.source.get("name_or_path")

    @property
    def main_input_name(self) -> str:
        return getattr(self.__dict__.get("_template"), "main_input_name", "input_ids")

    @property
    def loss_type(self) -> Any:
        """The original's loss type: the Trainer counts ``num_items_in_batch`` of a causal LM loss
        over the shifted labels only, as the loss itself does."""
        return self._from_template("loss_type")

    @property
    def accepts_loss_kwargs(self) -> bool:
        """Whether the original's forward takes ``num_items_in_batch`` (absent when it does not say)."""
        return self._from_template("accepts_loss_kwargs")

    def _from_template(self, name: str) -> Any:
        template = self.__dict__.get("_template")
        value = getattr(template, name, _UNSET) if template is not None else _UNSET
        if value is _UNSET:
            raise AttributeError(name)
        return value

    @property
    def warnings_issued(self) -> dict:
        """transformers' record of one-time warnings, per model."""
        return self.__dict__.setdefault("_warnings_issued", {})

    def can_generate(self) -> bool:
        """Whether ``generate`` works on this model: it exists here and the original could generate."""
        template = self.__dict__.get("_template")
        original = getattr(template, "can_generate", None)
        return callable(getattr(type(self), "generate", None)) and bool(original() if callable(original) else False)

    def _get_name(self) -> str:
        """The original model's class name, as PEFT reports its base model's (the Trainer's label
        smoothing shifts labels for causal LM classes by this name)."""
        return self.source.get("model_class") or type(self).__name__

    # ------------------------------------------------------------------ where its tensors are

    @property
    def device(self) -> torch.device:
        for t in _tensors(self.graph_module):
            return t.device
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the base model's float tensors (the first one, as transformers reads it)."""
        for t in _tensors(self.graph_module):
            if t.is_floating_point():
                return t.dtype
        return torch.get_default_dtype()

    def get_input_embeddings(self) -> nn.Module:
        """The original's input embedding module, reading this model's embedding weight (a module
        of its own, not part of the graph: hooks on it do not run in the graph)."""
        return self._module_like("get_input_embeddings")

    def get_output_embeddings(self) -> nn.Module | None:
        return self._module_like("get_output_embeddings")

    def _module_like(self, getter: str) -> nn.Module | None:
        template = self.__dict__.get("_template")
        method = getattr(template, getter, None)
        if method is None:
            raise AttributeError(f"{self._get_name()} has no {getter}()")
        module = method()
        if module is None:
            return None
        path = next((name for name, m in template.named_modules() if m is module), None)
        memo: dict[int, Any] = {}
        for name, p in module.named_parameters(recurse=True):
            full = f"{path}.{name}" if path else name
            try:
                memo[id(p)] = self.graph_module.get_parameter(full)
            except AttributeError:
                raise InputError(f"{getter}(): {full} is not a float tensor of this LoraModel (quantized or "
                                 "removed by a pass)") from None
        return copy.deepcopy(module, memo)

    # ------------------------------------------------------------------ activation checkpointing

    def activation_checkpointing_enable(
        self, activation_checkpointing_kwargs: dict | None = None, every_n_layers: int = 1, offload: bool = False
    ) -> None:
        """Recompute each transformer block in backward instead of keeping its activations.

        The graph running a training step is cut into its blocks (the mechanism FSDP uses,
        :mod:`graphlora.block_split`) and each block runs under ``torch.utils.checkpoint``
        (non-reentrant unless ``activation_checkpointing_kwargs`` says otherwise), every
        ``every_n_layers``-th block; ``offload`` keeps the saved block inputs on the CPU. The
        gradients are those without checkpointing; the graphs themselves do not change.
        """
        from graphlora.activation_checkpointing import CheckpointPolicy

        self._checkpointing = CheckpointPolicy(dict(activation_checkpointing_kwargs or {}), every_n_layers, offload)

    def activation_checkpointing_disable(self) -> None:
        self._checkpointing = None

    @property
    def is_activation_checkpointing(self) -> bool:
        return self._checkpointing is not None

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None, **kwargs: Any) -> None:
        """transformers' older name of :meth:`activation_checkpointing_enable`."""
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **kwargs)

    def gradient_checkpointing_disable(self) -> None:
        self.activation_checkpointing_disable()

    @property
    def is_gradient_checkpointing(self) -> bool:
        return self.is_activation_checkpointing

    def enable_input_require_grads(self) -> None:
        """Nothing to do: reentrant checkpointing needs inputs that require grad, graphlora's
        block checkpointing is non-reentrant by default (PEFT calls this before checkpointing)."""

    def disable_input_require_grads(self) -> None:
        """See :meth:`enable_input_require_grads`."""


def _tensors(module: nn.Module):
    yield from module.parameters()
    yield from module.buffers()
