"""A transformers KV cache as the tensor state of a traced graph.

``torch.export`` takes tensors, not a ``Cache`` object, and a graph cannot return one. A static
cache (transformers' ``StaticCache``: every layer's keys and values preallocated to the maximum
length, written in place with ``index_copy_``, plus the number of tokens seen) is nothing but
tensors updated in place, which ``torch.export`` supports as input mutations. So a call that
passes ``past_key_values=<StaticCache>`` is traced with the cache's tensors as inputs: inside the
traced function a cache object is rebuilt around them (:meth:`CacheLayout.rebuild`), the model
updates it as it always does, and the exported graph writes the new keys, values and lengths back
into the very tensors the caller's cache object holds. The caller's cache object is then the
state of the graph: the graph's output names it again (:func:`restore`), as the model's own
output would.

A dynamic cache (``DynamicCache``, transformers' default) grows its tensors with ``torch.cat``;
a graph cannot replace a caller's tensor by a larger one, so it is refused with what to do.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from graphlora.errors import InputError

__all__ = ["CacheLayout", "find_cache", "is_cache", "layout_of", "restore", "strip"]

#: The argument a transformers decoder takes its KV cache in.
CACHE_ARGUMENT = "past_key_values"


def is_cache(value: Any) -> bool:
    """Whether ``value`` is a transformers ``Cache`` (found by class, so graphlora imports no transformers)."""
    return any(cls.__name__ == "Cache" and cls.__module__.startswith("transformers.")
               for cls in type(value).__mro__)


def find_cache(bound: Mapping[str, Any]) -> tuple[str, Any] | tuple[None, None]:
    """``(argument name, cache)`` of the call's KV cache object, or ``(None, None)``."""
    value = bound.get(CACHE_ARGUMENT)
    if value is not None and is_cache(value):
        return CACHE_ARGUMENT, value
    return None, None


@dataclass(frozen=True, eq=False)
class CacheLayout:
    """How a cache object is laid out as tensors: its class and layers (tensors removed), and
    the names of each layer's tensor attributes, in the order the graph takes them."""

    prototype: Any
    fields: tuple[tuple[str, ...], ...]

    @property
    def key(self) -> tuple:
        """The part of a call's structure the cache decides (its class and its layers' classes)."""
        layers = tuple(type(layer).__name__ for layer in self.prototype.layers)
        return (type(self.prototype).__name__, layers, self.fields)

    def fits(self, cache: Any) -> bool:
        """Whether ``cache`` still has this layout (every layer initialized, the same tensor names)."""
        layers = getattr(cache, "layers", ())
        return len(layers) == len(self.fields) and all(
            getattr(layer, "is_initialized", False) and all(isinstance(getattr(layer, n, None), torch.Tensor) for n in names)
            for layer, names in zip(layers, self.fields))

    def state(self, cache: Any) -> tuple[tuple[torch.Tensor, ...], ...]:
        """The tensors of ``cache`` (a cache of this layout), one tuple per layer."""
        return tuple(tuple(getattr(layer, name) for name in names) for layer, names in zip(cache.layers, self.fields))

    def rebuild(self, state: tuple[tuple[torch.Tensor, ...], ...]) -> Any:
        """A cache object of this layout holding the tensors of ``state`` (inside a trace: the
        graph's inputs, so the model's in-place updates become the graph's input mutations)."""
        cache = copy.copy(self.prototype)
        layers = []
        for layer, names, tensors in zip(self.prototype.layers, self.fields, state):
            new = copy.copy(layer)
            for name, tensor in zip(names, tensors):
                setattr(new, name, tensor)
            keys = dict(zip(names, tensors)).get("keys")
            if keys is not None:  # sizes the layer keeps as Python ints follow the tensors (dynamic)
                if getattr(layer, "max_cache_len", None) == getattr(layer, "_graphlora_length", None):
                    new.max_cache_len = keys.shape[-2]
                new.batch_size = keys.shape[0]
            layers.append(new)
        cache.layers = layers
        return cache


def layout_of(cache: Any, config: Any, dtype: torch.dtype, device: torch.device, batch: int) -> CacheLayout:
    """The layout of ``cache`` as a graph state; allocates a static cache's tensors if the
    model has not written it yet (as transformers' export recipe does, ``early_initialization``).

    Raises :class:`InputError` for a cache whose tensors change size (``DynamicCache``)."""
    layers = list(getattr(cache, "layers", ()))
    growing = [type(layer).__name__ for layer in layers if not getattr(layer, "is_compileable", False)]
    if not layers or growing:
        what = ", ".join(sorted(set(growing))) or "no layers"
        raise InputError(
            f"past_key_values is a {type(cache).__name__} ({what}), whose tensors grow with every token: a "
            "traced graph can only update a cache in place. Use a static cache: LoraModel.generate() does "
            "by default (cache_implementation='static'), or pass transformers.StaticCache(config, max_cache_len)"
        )
    sliding = sorted({type(layer).__name__ for layer in layers if getattr(layer, "is_sliding", False)})
    if sliding:
        raise InputError(
            f"past_key_values has sliding-window layers ({', '.join(sliding)}), which count tokens in a "
            "Python int that a traced graph cannot update. LoraModel.generate() builds its own cache with "
            "full-length layers for a sliding-window model (the same tokens: the model masks by position); "
            "pass no past_key_values, or graphlora.generation.full_attention_layers(cache, max_cache_len)"
        )
    if not all(getattr(layer, "is_initialized", False) for layer in layers):
        heads, head_dim = _attention_shape(config)
        cache.early_initialization(batch, heads, head_dim, dtype, device)
    fields = []
    for layer in layers:
        names = tuple(name for name, value in vars(layer).items() if isinstance(value, torch.Tensor))
        fields.append(names)
    prototype = copy.copy(cache)
    prototype.layers = []
    for layer, names in zip(layers, fields):
        empty = copy.copy(layer)
        keys = getattr(layer, "keys", None)
        empty._graphlora_length = keys.shape[-2] if isinstance(keys, torch.Tensor) else None
        for name in names:
            setattr(empty, name, None)
        prototype.layers.append(empty)
    return CacheLayout(prototype, tuple(fields))


def _attention_shape(config: Any) -> tuple[int, int]:
    """``(key/value heads, head dimension)`` from a transformers config (its text config)."""
    if config is None:
        raise InputError("a static KV cache that was never written needs the model's config to be allocated")
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    heads = getattr(text, "num_attention_heads", None)
    head_dim = getattr(text, "head_dim", None) or (text.hidden_size // heads if heads else None)
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    if not kv_heads or not head_dim:
        raise InputError(f"{type(config).__name__} does not say the model's attention heads: allocate the "
                         "cache yourself (cache.early_initialization(...)) before the first call")
    return int(kv_heads), int(head_dim)


def strip(output: Any) -> Any:
    """The model's output without its cache object (a graph returns tensors): a ``ModelOutput``'s
    ``past_key_values`` becomes None, a tuple's cache entry None."""
    if isinstance(output, tuple):
        return type(output)(None if is_cache(v) else v for v in output)
    if hasattr(output, "keys") and CACHE_ARGUMENT in output.keys():
        output[CACHE_ARGUMENT] = None
    return output


def restore(output: Any, cache: Any) -> Any:
    """The graph's output with the caller's cache object back where the model returns it (the
    graph updated its tensors in place)."""
    if hasattr(output, "keys") and hasattr(output, "__setitem__"):
        output[CACHE_ARGUMENT] = cache
        return output
    if isinstance(output, tuple):
        return type(output)(cache if v is None else v for v in output)
    return output
