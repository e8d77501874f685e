"""``generate()`` on a LoraModel: transformers' generation loop over graphs with a KV cache.

A LoraModel made from a transformers model that can generate is also a ``GenerationMixin``
(:func:`graphlora.call_graphs.signed_class`), so ``generate`` is transformers' own: greedy search,
sampling, ``max_new_tokens``, eos, logits processors, stopping criteria and ``GenerationConfig``
behave as on the original model. What differs is the cache: transformers' default cache grows
with every token, which a traced graph cannot do, so generation runs with transformers' static
cache (``cache_implementation="static"``). Its tensors are the state of two graphs traced on the
first call (:mod:`graphlora.kv_cache`): the prefill (the prompt) and the decode step (one token
against the cache), each built by the same passes as every other graph of the model (LoRA
branches, quantized weights, gated adapters), so each new token costs one token of compute.
They run unfused, and in eval mode under ``no_grad`` (as ``generate`` runs) with the active
adapters merged into their weights once per change of the LoRA weights
(:func:`merged_for_decoding`): a decoded token costs what it costs the merged model. A quantized
base keeps its branches and dequantizes per token unless ``cache_dequantized_weights`` is on
(then it is dequantized and merged once, like a float base); a mixed-adapter batch keeps its
branches.

``adapter_names=[...]`` (one adapter per prompt, ``"__base__"`` for none) generates each row with
its own adapter, as PEFT's mixed-adapter ``generate``.
"""

from __future__ import annotations

import contextlib
from typing import Any, Sequence

from graphlora.errors import InputError

__all__ = ["GenerationSupport", "full_attention_layers", "generation_mixin"]


def generation_mixin(cls: type) -> type | None:
    """transformers' ``GenerationMixin`` among ``cls``'s bases (found by name: no import)."""
    for base in cls.__mro__:
        if base.__name__ == "GenerationMixin" and base.__module__.startswith("transformers."):
            return base
    return None


class GenerationSupport:
    """``generate`` for :class:`graphlora.LoraModel` (mixed in)."""

    _generation_adapters: Sequence[str] | None = None

    def generate(self, *args: Any, adapter_names: Sequence[str] | None = None, **kwargs: Any) -> Any:
        """transformers' ``GenerationMixin.generate`` with a static KV cache (see the module docs).

        Takes what transformers' ``generate`` takes. Unless a cache is given
        (``past_key_values=``) or asked for (``cache_implementation=``, in the call or the
        ``generation_config``), the cache is transformers' ``StaticCache``; graphs are run as they
        are, never ``torch.compile``\\ d. ``adapter_names`` runs each prompt with its own adapter.
        """
        mixin = generation_mixin(type(self))
        if mixin is None:
            raise InputError(f"generate() needs a LoraModel made from a transformers model that can generate; "
                             f"this one was made from {self._get_name()}")
        config = kwargs.get("generation_config") or self.generation_config
        if "past_key_values" not in kwargs and "cache_implementation" not in kwargs and (
            getattr(config, "cache_implementation", None) in (None, "dynamic")
        ):
            kwargs["cache_implementation"] = "static"
        kwargs.setdefault("disable_compile", True)
        with self._adapters_for_generation(adapter_names):
            return mixin.generate(self, *args, **kwargs)

    @contextlib.contextmanager
    def _adapters_for_generation(self, names: Sequence[str] | None):
        if names is None:
            yield
            return
        if isinstance(names, str) or not isinstance(names, Sequence):
            raise InputError(f"adapter_names must be a list with one adapter name per prompt, got {names!r}")
        self.__dict__["_generation_adapters"] = list(names)
        try:
            yield
        finally:
            self.__dict__.pop("_generation_adapters", None)

    def _prepare_static_cache(self, *args: Any, **kwargs: Any) -> Any:
        """transformers' static cache for ``generate``, with every sliding-window layer made a full
        static layer of the same length.

        A sliding-window layer counts the tokens it holds in a Python int and rolls its tensors
        once full, which a traced decode graph cannot follow. A full-length layer gives the same
        attention: the model masks a sliding layer's keys by absolute position (the config's
        ``sliding_window``), not by what the cache keeps, so the extra keys are masked out. The
        cost is memory: ``max_cache_len`` keys per sliding layer instead of the window. Caches the
        caller builds are left as they are (and refused if sliding: :mod:`graphlora.kv_cache`)."""
        cache = super()._prepare_static_cache(*args, **kwargs)
        asked = kwargs.get("max_cache_len", args[2] if len(args) > 2 else 0)
        return full_attention_layers(cache, max(asked, getattr(self, "_previous_max_cache_length", 0)))

    def _generation_call(self, kwargs: dict) -> dict:
        """A call made by ``generate``: the adapters of its rows (``num_return_sequences`` and
        beams repeat each prompt's row, so its adapter name too)."""
        names = self.__dict__.get("_generation_adapters")
        if names is None or "adapter_names" in kwargs:
            return kwargs
        ids = kwargs.get("input_ids")
        rows = ids.shape[0] if ids is not None and hasattr(ids, "shape") else len(names)
        if rows != len(names) and len(names) and rows % len(names) == 0:
            names = [n for n in names for _ in range(rows // len(names))]
        return {**kwargs, "adapter_names": list(names)}


def full_attention_layers(cache: Any, length: int) -> Any:
    """``cache`` with each sliding-window (or chunked) static layer replaced by a full static layer
    of ``length`` tokens, or the longest layer's if longer (see
    ``GenerationSupport._prepare_static_cache``)."""
    from transformers.cache_utils import StaticLayer, StaticSlidingWindowLayer

    layers = getattr(cache, "layers", None)
    if layers is None:  # an encoder-decoder cache or another kind: left to the cache checks
        return cache
    length = max([length] + [getattr(layer, "max_cache_len", 0) for layer in layers])
    for i, layer in enumerate(layers):
        if type(layer) is StaticSlidingWindowLayer and not getattr(layer, "is_initialized", False):
            layers[i] = StaticLayer(max_cache_len=length)
    return cache


def merged_for_decoding(model: Any, entry: Any, gm: Any) -> Any:
    """The module a graph runs as under ``torch.no_grad()`` in eval mode, made once and reused:
    a storage-sharing copy with the active adapters merged into the weights (``W + s B A``,
    computed once, not per token), so a decoded token costs what it costs the merged model, and
    with :attr:`~graphlora.LoraModel.cache_dequantized_weights` every quantized weight
    dequantized once (:mod:`graphlora.passes.dequant_cache`). It is rebuilt when a LoRA weight
    or a quantized buffer changes (training, ``load_lora_state_dict``: tracked by the tensors'
    versions) or the graph does, and holds one extra float copy of the weights it merged or
    dequantized while it lives. None (run the graph as it is) for gradients, training mode,
    activation quantizers, a quantized base without the cache switch (merging would dequantize
    it: the memory QLoRA saves), and nothing to do. A mixed-adapter batch or
    ``fused_execution=False`` (op for op) is not merged: only dequantized once (bit for bit)."""
    import torch

    cache_quantized = bool(getattr(model, "cache_dequantized_weights", False))
    if torch.is_grad_enabled() or model.training:
        return None
    merge = entry.adapters is None and model.fused_execution and bool(model.active_adapters)
    cached = entry._executables.get("merged_for_decoding")
    if cached is None or cached[0] is not gm._code or cached[1] != (merge, cache_quantized):
        from graphlora import meta

        roles = {meta.role(n) for n in gm.graph.nodes}
        quantized = "dequant" in roles
        usable = not roles & {"fake_quant", "observer"} and (cache_quantized or not quantized) and (
            merge or quantized)
        params = [p for name in model.active_adapters for p in model.lora_parameters(name)] if merge else []
        if quantized:
            params += [t for name, t in gm.named_buffers() if name.startswith("graphlora_quant.")]
        cached = (gm._code, (merge, cache_quantized), usable, params, None, None)
    code, flags, usable, params, versions, module = cached
    if not usable:
        entry._executables["merged_for_decoding"] = cached
        return None
    now = tuple(p._version for p in params)
    if module is None or versions != now:
        from graphlora.graph_utils import share_storage_copy
        from graphlora.passes.dequant_cache import DequantizeOncePass
        from graphlora.passes.merge_lora import MergeLoraPass

        module = share_storage_copy(gm)
        if merge:
            MergeLoraPass({name: model._adapters[name] for name in model.active_adapters})(module)
        DequantizeOncePass()(module)  # what merging left quantized (sites without LoRA)
        module.graph.lint()
        module.recompile()
        _share_merged(model, gm, module, (tuple(model.active_adapters), merge, now))
    entry._executables["merged_for_decoding"] = (code, flags, usable, params, now, module)
    return module


def _share_merged(model: Any, gm: Any, module: Any, version: tuple) -> None:
    """Make the prefill and decode graphs read one merged copy of each weight: a merged tensor
    another graph made for the same LoRA weights (same name, shape, dtype) replaces this one's."""
    shared_version, shared = model.__dict__.get("_merged_for_decoding", (None, {}))
    if shared_version != version:
        shared = {}
    own = {id(t) for t in list(gm.parameters()) + list(gm.buffers())}
    for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
        if id(tensor) in own:
            continue
        other = shared.get(name)
        if other is not None and other.shape == tensor.shape and other.dtype == tensor.dtype:
            head, _, leaf = name.rpartition(".")
            owner = module.get_submodule(head) if head else module
            table = owner._parameters if leaf in owner._parameters else owner._buffers
            table[leaf] = other
        else:
            shared[name] = tensor
    model.__dict__["_merged_for_decoding"] = (version, shared)
