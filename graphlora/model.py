"""``LoraModel``: the ``nn.Module`` users hold after :func:`graphlora.transform`.

It owns the transformed GraphModule, the rules, and the LoRA hyper-parameters of every adapter.
The graph always holds the branches of the *active* adapters only; switching or disabling
adapters removes and re-inserts branches (a pair of graph passes), so what runs is exactly what
:func:`graphlora.graph_text` shows. Only LoRA parameters require grad.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Mapping, Sequence

import torch
import torch.fx as fx
import torch.nn as nn

from graphlora import meta
from graphlora import adapters as adapter_store
from graphlora.adapters import DEFAULT_ADAPTER, LoraSpec, peft_name
from graphlora.call_graphs import CallGraph, CallGraphs, signed_class
from graphlora.errors import AdapterError, InputError
from graphlora.graph_utils import share_storage_copy
from graphlora.generation import GenerationSupport, merged_for_decoding
from graphlora.hf_compat import HuggingFaceSurface
from graphlora.model_contents import MatchedSite, ModelContents
from graphlora.passes.base import PassPipeline, PassRecord
from graphlora.passes.recompute_weights import has_quantized_weights, recomputing_copy
from graphlora.passes.insert_lora import InsertLoraPass, RemoveLoraPass
from graphlora.passes.merge_lora import MergeLoraPass
from graphlora.rules import QuantRule
from graphlora.signature import accept_natural_calls
from graphlora.sites import tagged_sites
from graphlora.training_mode import set_module_flags, set_training_flags
from graphlora.validate import check_adapter_name, check_lora_factor

__all__ = ["LoraModel", "MatchedSite", "model_class"]


class LoraModel(ModelContents, HuggingFaceSurface, GenerationSupport, nn.Module):
    """A traced model with LoRA branches (and quantization) inserted by graph passes.

    It is called like the original model, every way the original can be called: ``forward`` has
    the original's signature, and each call structure gets a graph of its own
    (:mod:`graphlora.call_graphs`), all sharing one set of tensors. ``adapter_names=[...]`` (one
    adapter name per batch row, ``"__base__"`` for none) runs a mixed-adapter batch, as in PEFT.
    """

    def __init__(
        self,
        graph_module: fx.GraphModule,
        *,
        rules: Sequence[QuantRule],
        adapters: Mapping[str, Mapping[str, LoraSpec]],
        active_adapters: Sequence[str],
        source: Mapping[str, Any] | None = None,
        pass_log: list[PassRecord] | None = None,
        training: bool = False,
        template: nn.Module | None = None,
        traces: Sequence[fx.GraphModule] = (),
    ):
        nn.Module.__init__(self)  # not a PreTrainedModel base's (see call_graphs.signed_class)
        self.graph_module = graph_module
        self.rules = tuple(rules)
        self._adapters: dict[str, dict[str, LoraSpec]] = {k: dict(v) for k, v in adapters.items()}
        self._active: list[str] = list(active_adapters)
        self.source: dict[str, Any] = dict(source or {})
        self.pass_log: list[PassRecord] = list(pass_log or [])
        self._record_passes = False
        # run the execution-fused copy of the graph (see _executable); False runs the canonical
        # graph op for op, e.g. to compare with another library without summation-order noise
        self.fused_execution = True
        self.__dict__["_cache_dequantized"] = False
        # not submodules: the structure-only copy holds no weights, the graphs share this one's
        self.__dict__["_template"] = template
        self.__dict__["_calls"] = CallGraphs(self, template, traces)
        self.train(training)

    # ------------------------------------------------------------------ running

    def forward(self, *args, **kwargs):
        """Run the graph serving this call (made on the first call of its structure)."""
        if self._generation_adapters is not None:  # inside generate(adapter_names=...)
            kwargs = self._generation_call(kwargs)
        entry, call_args, call_kwargs, finish = self._calls.dispatch(args, dict(kwargs))
        try:
            return finish(self._executable(entry)(*call_args, **call_kwargs))
        except Exception as exc:
            explained = _explain_input_error(exc)
            if explained is exc:
                explained = self._calls.explain_failure(args, kwargs) or exc
            if explained is exc:
                raise
            raise explained from exc

    @property
    def call_graphs(self) -> list[CallGraph]:
        """Every graph this model made so far, one per call structure; the canonical graph (the
        one ``transform`` traced, :attr:`graph_module`) first. Each has its ``pass_log``."""
        return self._calls.graphs

    def graph_for(self, *args: Any, **kwargs: Any) -> fx.GraphModule:
        """The (canonical, unfused) graph serving ``model(*args, **kwargs)``, made if missing."""
        return self._calls.graph_for(args, kwargs)

    def _executable(self, entry: CallGraph | None = None) -> fx.GraphModule:
        """The module a graph runs as: the graph itself, or its execution-fused copy.

        With ``fused_execution`` (the default) a linear site and its LoRA branch run as one
        ``graphlora::lora_linear`` op with a low-rank backward (:mod:`graphlora.passes.fuse_lora`),
        and linear ops that read the same input — query, key and value — as one GEMM
        (:mod:`graphlora.passes.fuse_siblings`) — each where the call's token count pays for
        building the effective or concatenated weight (a one-token step runs op for op, a batch
        of thousands of tokens fused); ``fused_execution="always"`` fuses whatever the size. The
        result equals the canonical graph's up to float summation order. The fused copy shares every tensor and submodule with the graph
        and is rebuilt whenever that graph is recompiled, so the graph stays what passes,
        ``graph_text``, saving and export see. With activation checkpointing enabled
        (:meth:`activation_checkpointing_enable`) a training forward runs block by block,
        each block recomputed in backward.
        """
        entry = entry or self._calls.canonical
        gm = entry.graph_module if entry.graph_module is not None else self.graph_module
        if "forward" in gm.__dict__:  # e.g. FSDP's block-wise forward
            return gm
        exe = gm
        if getattr(entry.form, "state", ()):
            # a graph with a KV cache (generate's prefill and decode): sibling and LoRA fusion
            # build concatenated / effective weights per call, which pays off for a training
            # batch of many tokens, not for one token per step; merged weights are made once
            return merged_for_decoding(self, entry, gm) or gm
        if self._cache_dequantized and not self.training and not torch.is_grad_enabled():
            cached = merged_for_decoding(self, entry, gm)
            if cached is not None:
                return cached
        if self.fused_execution:
            from graphlora.passes.fuse_siblings import fused_copy

            if self.fused_execution == "always":
                exe = entry.executable(gm, "fused_always", lambda g: fused_copy(g, always=True))
            else:
                exe = entry.executable(gm, "fused", fused_copy)
        policy = self._checkpointing
        if policy is not None and self.training and torch.is_grad_enabled():
            exe = entry.executable(exe, ("checkpointed", id(policy)), policy.wrap)
        elif self.training and torch.is_grad_enabled() and has_quantized_weights(gm):
            # dequantized weights remade in backward instead of all kept from forward
            exe = entry.executable(exe, "recompute_weights", recomputing_copy)
        return exe

    @property
    def cache_dequantized_weights(self) -> bool:
        """Opt-in (default False): in eval mode under ``torch.no_grad()``, keep every quantized
        weight dequantized, computed once, instead of rebuilding it from its codes on every call.

        A QLoRA forward then runs at the float model's speed (with ``fused_execution``, the
        active adapters are merged into that copy too: one GEMM per site); the results are the
        graph's, bit for bit with ``fused_execution=False``, up to float summation order (the
        merge) otherwise. The cost is memory: one float copy, in the weights' original dtype, of
        every quantized weight (4 bytes per parameter for a float32 model: ~7.5x the 4-bit codes
        at group 64) while the switch is on, on top of the codes, which stay the model's state
        (saving, export and training read those). Training, and calls with gradients enabled,
        never read the copy. The copy follows LoRA and quantized-buffer updates (tensor
        versions) and is freed when the switch is turned off.
        """
        return self._cache_dequantized

    @cache_dequantized_weights.setter
    def cache_dequantized_weights(self, on: bool) -> None:
        self.__dict__["_cache_dequantized"] = bool(on)
        if not on:  # free the float copies now, not at the next eval call
            self.__dict__.pop("_merged_for_decoding", None)
            for entry in self._calls.graphs:
                entry._executables.pop("merged_for_decoding", None)

    def train(self, mode: bool = True) -> "LoraModel":
        """Switch dropout (base and LoRA) in the graphs; exported graphs refuse ``train()``."""
        set_module_flags(self, mode)
        before = self.graph_module._code
        set_training_flags(self.graph_module, mode)
        calls = self.__dict__.get("_calls")
        if calls is not None:
            calls.training_changed(before, mode)
        return self

    def _apply(self, fn, recurse: bool = True):
        """Device and dtype moves replace buffers: graphs bound to the old ones are made again."""
        result = super()._apply(fn, recurse)
        calls = self.__dict__.get("_calls")
        if calls is not None:
            calls.clear()
        return result

    def __reduce_ex__(self, protocol):
        # a LoraModel's class is made for its original model (signed_class): rebuild it from that
        return (_new_model, (self.__dict__.get("_template"),), self.__dict__)

    # ------------------------------------------------------------------ sites and parameters

    def named_lora_parameters(self, adapter: str | None = None) -> Iterator[tuple[str, nn.Parameter]]:
        """``(<module_path>.lora_A.weight, parameter)`` pairs, PEFT's names, of one adapter."""
        name = self._resolve_adapter(adapter)
        for path, which, param in adapter_store.iter_lora_weights(self.graph_module, name):
            yield peft_name(path, which), param

    def lora_parameters(self, adapter: str | None = None) -> Iterator[nn.Parameter]:
        for _, p in self.named_lora_parameters(adapter):
            yield p

    def lora_state_dict(self, adapter: str | None = None) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in self.named_lora_parameters(adapter)}

    def load_lora_state_dict(
        self, state_dict: Mapping[str, torch.Tensor], adapter: str | None = None, strict: bool = True
    ) -> None:
        """Copy LoRA weights in (PEFT names, with or without ``base_model.model.``)."""
        name = self._resolve_adapter(adapter)
        own = dict(self.named_lora_parameters(name))
        given = {_strip_peft_prefix(k): check_lora_factor(v, k, source=f"LoRA state dict for {name!r}")
                 for k, v in state_dict.items()}
        missing = sorted(set(own) - set(given))
        unexpected = sorted(set(given) - set(own))
        wrong = [
            f"{k}: expected {tuple(own[k].shape)}, got {tuple(given[k].shape)}"
            for k in sorted(set(own) & set(given))
            if tuple(own[k].shape) != tuple(given[k].shape)
        ]
        problems = []
        if wrong:
            problems.append("shape mismatch: " + "; ".join(wrong[:5]))
        if strict and missing:
            problems.append("missing keys: " + ", ".join(missing[:5]))
        if strict and unexpected:
            problems.append("unexpected keys: " + ", ".join(unexpected[:5]))
        if problems:
            raise AdapterError(f"cannot load LoRA state dict into adapter {name!r}: " + " | ".join(problems))
        with torch.no_grad():
            for k, v in given.items():
                if k in own:
                    own[k].copy_(v.to(dtype=own[k].dtype, device=own[k].device))

    # ------------------------------------------------------------------ adapters

    @property
    def active_adapters(self) -> list[str]:
        return list(self._active)

    @property
    def active_adapter(self) -> str | None:
        return self._active[0] if self._active else None

    @property
    def adapters(self) -> dict[str, dict[str, LoraSpec]]:
        """Every adapter's LoRA hyper-parameters, by adapter name then module path."""
        return {k: dict(v) for k, v in self._adapters.items()}

    def add_adapter(self, name: str, specs: Mapping[str, LoraSpec], *, activate: bool = False) -> None:
        """Create a new adapter (fresh LoRA weights) on the given module paths.

        Paths may be linear sites no rule matched (an adapter trained elsewhere may target more
        layers than the rules did); they are tagged with a rule selecting exactly them, appended
        after the user's rules so first-match-wins still describes the model.
        """
        check_adapter_name(name)
        if name in self._adapters:
            raise AdapterError(f"adapter {name!r} already exists; delete it first or pick another name")
        self._tag_unmatched_sites(specs)
        known = {s.module_path for s in tagged_sites(self.graph_module)}
        unknown = sorted(set(specs) - known)
        if unknown:
            raise AdapterError(
                f"adapter {name!r} targets module paths that are not sites of this "
                f"model: {', '.join(unknown[:5])}"
            )
        self._adapters[name] = dict(specs)
        # create the weights once, through the same pass that inserts branches
        self._rebuild([name])
        self._rebuild(self._active)
        if activate:
            self.set_adapter(name)

    def _tag_unmatched_sites(self, specs: Mapping[str, LoraSpec]) -> None:
        import re

        from graphlora.rules import LoraRule
        from graphlora.sites import find_sites

        gm = self.graph_module
        tagged = {s.module_path for s in tagged_sites(gm)}
        untagged: dict[str, list] = {}
        for site in find_sites(gm):
            if site.module_path in specs and site.module_path not in tagged and meta.role(site.node) is None:
                untagged.setdefault(site.module_path, []).append(site)
        groups: dict[tuple[LoraSpec, str], list[str]] = {}
        for path, sites in untagged.items():
            groups.setdefault((specs[path], sites[0].spec.site_kind), []).append(path)
        rules = list(self.rules)
        for (spec, kind), paths in groups.items():
            rule = LoraRule(
                "|".join(re.escape(p) for p in paths),
                rank=spec.rank,
                alpha=spec.alpha,
                dropout=spec.dropout,
                use_rslora=spec.use_rslora,
                init=spec.init,
                site_kinds=(kind,),
                share_experts=spec.share_experts,
            )
            rules.append(rule)
            for path in paths:
                for site in untagged[path]:
                    meta.tag(site.node, "base", module_path=path, site=site.spec, rule=rule,
                             rule_index=len(rules) - 1)
        self.rules = tuple(rules)

    def load_adapter(self, adapter_dir, adapter_name: str = DEFAULT_ADAPTER, **kwargs: Any) -> "LoraModel":
        """Load a PEFT LoRA adapter directory as ``adapter_name`` (see :func:`graphlora.load_adapter`)."""
        from graphlora.checkpoint import load_adapter

        return load_adapter(self, adapter_dir, adapter_name=adapter_name, **kwargs)

    def set_adapter(self, names: str | Sequence[str]) -> None:
        """Make ``names`` the active adapter(s); their LoRA weights become the trainable ones."""
        names = [names] if isinstance(names, str) else list(names)
        for n in names:
            if n not in self._adapters:
                raise AdapterError(f"unknown adapter {n!r}; this model has {sorted(self._adapters)}")
        self._active = names
        self._rebuild(names)

    def delete_adapter(self, name: str) -> None:
        if name not in self._adapters:
            raise AdapterError(f"unknown adapter {name!r}; this model has {sorted(self._adapters)}")
        del self._adapters[name]
        adapter_store.delete_adapter_weights(self.graph_module, name)
        self._active = [a for a in self._active if a != name]
        self._rebuild(self._active)

    def disable_adapters(self) -> None:
        """Run the base model only (no branch in the graph) until :meth:`set_adapter`."""
        self._active = []
        self._rebuild([])

    @contextlib.contextmanager
    def disable_adapter(self):
        """Context manager, as in PEFT: the base model inside, the same adapters after."""
        previous = list(self._active)
        self.disable_adapters()
        try:
            yield self
        finally:
            self._active = previous
            self._rebuild(previous)

    def _rebuild(self, active: Sequence[str]) -> None:
        passes = [RemoveLoraPass()] + [
            InsertLoraPass(name, self._adapters[name], training=self.training) for name in active
        ]
        PassPipeline(passes)(self.graph_module)
        for p in self.graph_module.parameters():
            p.requires_grad_(False)
        for name in active:
            for p in self.lora_parameters(name):
                p.requires_grad_(True)

    def _resolve_adapter(self, adapter: str | None) -> str:
        if adapter is None:
            if self._active:
                return self._active[0]
            if DEFAULT_ADAPTER in self._adapters:
                return DEFAULT_ADAPTER
            if self._adapters:
                return next(iter(self._adapters))
            raise AdapterError("this model has no LoRA adapter")
        if adapter not in self._adapters:
            raise AdapterError(f"unknown adapter {adapter!r}; this model has {sorted(self._adapters)}")
        return adapter

    # ------------------------------------------------------------------ passes

    def run_passes(self, passes, *, record: bool | None = None) -> list[PassRecord]:
        """Run graph passes on this model's graph (recorded into ``pass_log`` like transform's)."""
        record = self._record_passes if record is None else record
        pipeline = PassPipeline(list(passes), record=record)
        pipeline(self.graph_module)
        self.pass_log.extend(pipeline.log)
        return pipeline.log

    # ------------------------------------------------------------------ saving

    def save_pretrained(
        self,
        save_directory,
        *,
        only_save_adapters: bool | None = None,
        save_adapters_separately: bool = True,
        max_shard_size: int | str = "5GB",
        adapter_name: str | None = None,
        selected_adapters: Sequence[str] | None = None,
        keep_quantized: bool = False,
        overwrite: bool = True,
        **transformers_options: Any,
    ):
        """Save in the formats people already load (see :mod:`graphlora.checkpoint.saving`).

        ``only_save_adapters=True``: a PEFT adapter directory. Otherwise with
        ``save_adapters_separately=True``: base weights (``model.safetensors``, original keys) plus
        the adapter files; with ``save_adapters_separately=False``: one merged model.

        Called the way transformers calls a model's ``save_pretrained`` (the Trainer's
        ``save_model`` and checkpoints pass ``is_main_process=`` and ``state_dict=``), it saves what
        ``PeftModel.save_pretrained`` saves: the PEFT adapter directory (training changed only the
        adapter), from this model's own LoRA weights; ``is_main_process=False`` saves nothing.
        """
        from graphlora.checkpoint import save_pretrained

        unknown = sorted(set(transformers_options) - _TRANSFORMERS_SAVE_OPTIONS)
        if unknown:
            raise InputError(f"save_pretrained() got unexpected keyword argument(s) {', '.join(unknown)}")
        if not transformers_options.get("is_main_process", True):
            return None
        if only_save_adapters is None:
            only_save_adapters = bool(transformers_options)
        return save_pretrained(
            self,
            save_directory,
            only_save_adapters=only_save_adapters,
            save_adapters_separately=save_adapters_separately,
            max_shard_size=max_shard_size,
            adapter_name=adapter_name,
            selected_adapters=selected_adapters,
            keep_quantized=keep_quantized,
            overwrite=overwrite,
        )

    # ------------------------------------------------------------------ merging

    def merge(self, adapters: Sequence[str] | None = None) -> fx.GraphModule:
        """A plain module computing ``W + scale * B @ A``, no branches.

        Merges the active adapters, or the named ``adapters``. The LoraModel itself is unchanged;
        unchanged weights are shared, not copied. A quantized base is dequantized into the merged
        float weight. It is called like the original model, as far as the traced graph allows
        (constants traced in, such as ``use_cache=False``, may be left out).
        """
        names = list(self._active) if adapters is None else [self._resolve_adapter(a) for a in adapters]
        _refuse_fsdp_modules(self.graph_module, "merge()")
        gm = share_storage_copy(self.graph_module)
        MergeLoraPass({a: self._adapters[a] for a in names})(gm)
        gm.graph.lint()
        gm.recompile()
        set_training_flags(gm, self.training)
        for p in gm.parameters():
            p.requires_grad_(False)
        return accept_natural_calls(gm, self._calls.signature)

    def merge_and_unload(self) -> fx.GraphModule:
        """PEFT's name for :meth:`merge`."""
        return self.merge()

    def __repr__(self) -> str:
        n_sites = len(self.sites)
        return (
            f"LoraModel(source={self.source.get('model_class', '?')}, sites={n_sites}, "
            f"adapters={sorted(self._adapters)}, active={self._active})"
        )


def _refuse_fsdp_modules(gm: fx.GraphModule, what: str) -> None:
    """FSDP2-sharded modules cannot be copied; say what to do instead of FSDP's assertion."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without distributed
        return
    if any(isinstance(m, FSDPModule) for m in gm.modules()):
        from graphlora.errors import DistributedError

        raise DistributedError(
            f"{what} needs full weights, but this model is sharded with FSDP2: use "
            "graphlora.distributed.save_on_rank0(model, dir, save_adapters_separately=False) for a "
            "merged save, or gather the weights first"
        )


def _strip_peft_prefix(key: str) -> str:
    return key[len("base_model.model."):] if key.startswith("base_model.model.") else key


def _explain_input_error(exc: Exception) -> Exception:
    """Turn torch.export's input-guard failures into an InputError saying what to do."""
    text = str(exc)
    markers = (
        "Expected input",
        "to be equal to",
        "Guard failed",
        "in_spec",
        "Trying to flatten user inputs",
        "keyword mismatch",
    )
    if isinstance(exc, (AssertionError, RuntimeError, ValueError, TypeError)) and any(
        m in text for m in markers
    ):
        return InputError(
            "the inputs do not fit the graph serving this call "
            f"({text.splitlines()[0] if text else type(exc).__name__})"
        )
    return exc


#: Keywords transformers passes to a model's save_pretrained (Trainer, push_to_hub): accepted, and
#: they select PEFT's layout; the weights always come from this model, in safetensors.
_TRANSFORMERS_SAVE_OPTIONS = frozenset(
    {"is_main_process", "state_dict", "safe_serialization", "save_function", "push_to_hub", "token",
     "variant", "save_peft_format"}
)

_SIGNED: dict[type, type] = {}


def model_class(template: nn.Module | None) -> type[LoraModel]:
    """The LoraModel class for a model made from ``template`` (its structure-only copy): one
    subclass per original model class, its ``forward`` signed like the original's (see
    :func:`graphlora.call_graphs.signed_class`); plain :class:`LoraModel` without one."""
    if template is None:
        return LoraModel
    key = type(template)
    if key not in _SIGNED:
        _SIGNED[key] = signed_class(LoraModel, template)
    return _SIGNED[key]


def _new_model(template: nn.Module | None) -> "LoraModel":
    return nn.Module.__new__(model_class(template))
