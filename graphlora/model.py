"""``LoraModel``: the ``nn.Module`` users hold after :func:`graphlora.transform`.

It owns the transformed GraphModule, the rules, and the LoRA hyper-parameters of every adapter.
The graph always holds the branches of the *active* adapters only; switching or disabling
adapters removes and re-inserts branches (a pair of graph passes), so what runs is exactly what
:func:`graphlora.graph_text` shows. Only LoRA parameters require grad.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

import torch
import torch.fx as fx
import torch.nn as nn

from graphlora import meta
from graphlora import adapters as adapter_store
from graphlora.adapters import DEFAULT_ADAPTER, LoraSpec, peft_name
from graphlora.errors import AdapterError, InputError
from graphlora.graph_utils import is_own, share_storage_copy
from graphlora.passes.base import PassPipeline, PassRecord
from graphlora.passes.insert_lora import InsertLoraPass, RemoveLoraPass
from graphlora.passes.merge_lora import MergeLoraPass
from graphlora.passes.weights import dequant_node
from graphlora.rules import QuantRule

if TYPE_CHECKING:
    from graphlora.quant import Encoding
from graphlora.sites import tagged_sites
from graphlora.trace import accept_natural_calls
from graphlora.training_mode import set_module_flags, set_training_flags
from graphlora.validate import check_adapter_name, check_lora_factor


@dataclass(frozen=True)
class MatchedSite:
    """A linear site a rule matched: where it is, its shape, and the rule that won."""

    module_path: str
    kind: str
    in_features: int
    out_features: int
    weight_name: str
    use_index: int
    rule_index: int
    rule: QuantRule
    fan_in_fan_out: bool  # the parameter is stored (in, out), like transformers' Conv1D
    weight_qtype: str | None = None  # how the base weight is stored now (None: float)


class LoraModel(nn.Module):
    """A traced model with LoRA branches (and quantization) inserted by graph passes."""

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
    ):
        super().__init__()
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
        self.train(training)

    # ------------------------------------------------------------------ running

    def forward(self, *args, **kwargs):
        call = self.graph_module.meta.get(meta.CALL_SPEC_KEY)
        if call is not None:
            args, kwargs = call.normalize(args, kwargs)
        try:
            return self._executable()(*args, **kwargs)
        except Exception as exc:
            explained = _explain_input_error(exc)
            if explained is exc and call is not None:
                explained = call.explain_failure(args, kwargs) or exc
            if explained is exc:
                raise
            raise explained from exc

    def _executable(self) -> fx.GraphModule:
        """The module forward runs: the canonical graph, or its execution-fused copy.

        With ``fused_execution`` (the default) a linear site and its LoRA branch run as one
        ``graphlora::lora_linear`` op with a low-rank backward (:mod:`graphlora.passes.fuse_lora`),
        and linear ops that read the same input — query, key and value — as one GEMM
        (:mod:`graphlora.passes.fuse_siblings`). The result equals the canonical graph's up to
        float summation order. The fused copy shares every tensor and submodule
        with :attr:`graph_module` and is rebuilt whenever that graph is recompiled, so the
        canonical graph stays what passes, ``graph_text``, saving and export see.
        """
        gm = self.graph_module
        if not self.fused_execution or "forward" in gm.__dict__:  # e.g. FSDP's block-wise forward
            return gm
        cache = self.__dict__.get("_fused")
        if cache is None or cache[0] is not gm._code:
            from graphlora.passes.fuse_siblings import fused_copy

            cache = (gm._code, fused_copy(gm))
            self.__dict__["_fused"] = cache  # not a submodule: no duplicate state-dict entries
        return cache[1]

    def train(self, mode: bool = True) -> "LoraModel":
        """Switch dropout (base and LoRA) in the graph; exported graphs refuse ``train()``."""
        set_module_flags(self, mode)
        set_training_flags(self.graph_module, mode)
        return self

    # ------------------------------------------------------------------ sites and parameters

    @property
    def sites(self) -> list[MatchedSite]:
        out = []
        for site in tagged_sites(self.graph_module):
            info = meta.info(site.node)
            s = site.spec
            out.append(
                MatchedSite(
                    module_path=s.module_path,
                    kind=s.kind,
                    in_features=s.in_features,
                    out_features=s.out_features,
                    weight_name=s.weight_name,
                    use_index=s.use_index,
                    rule_index=info["rule_index"],
                    rule=info["rule"],
                    fan_in_fan_out=s.param_layout == "in_out",
                    weight_qtype=info.get("weight_qtype")
                    or (info["weight_encoding"].qtype.name if "weight_encoding" in info else None),
                )
            )
        return out

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

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, all) parameter counts; a quantized weight counts its original elements."""
        trainable = 0
        total = 0
        seen: set[int] = set()
        for _, p in self.named_parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            total += p.numel()
            if p.requires_grad:
                trainable += p.numel()
        # quantized base weights are buffers now: count the parameters they encode
        total += int(self.memory_report()["quantized_params"])
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        pct = 100 * trainable / total if total else 0.0
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {pct:.4f}")

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
                f"adapter {name!r} targets module paths that are not linear sites of this "
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
        from graphlora.sites import find_linear_sites

        gm = self.graph_module
        tagged = {s.module_path for s in tagged_sites(gm)}
        untagged: dict[str, list] = {}
        for site in find_linear_sites(gm):
            if site.module_path in specs and site.module_path not in tagged and meta.role(site.node) is None:
                untagged.setdefault(site.module_path, []).append(site)
        groups: dict[LoraSpec, list[str]] = {}
        for path in untagged:
            groups.setdefault(specs[path], []).append(path)
        rules = list(self.rules)
        for spec, paths in groups.items():
            rule = LoraRule(
                "|".join(re.escape(p) for p in paths),
                rank=spec.rank,
                alpha=spec.alpha,
                dropout=spec.dropout,
                use_rslora=spec.use_rslora,
                init=spec.init,
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

    # ------------------------------------------------------------------ quantization

    def encodings(self) -> dict[str, "Encoding"]:
        """Every quantization encoding in the model, by tensor name.

        Base weights by parameter name (``encoder.layer.0.attention.self.query.weight``),
        activations as ``<site>.input`` / ``<site>.lora_A.output``, LoRA weights as
        ``<site>.lora_A.weight``.
        """
        found: dict[str, Any] = {}
        for node in self.graph_module.graph.nodes:
            info = meta.info(node)
            if info.get("role") in ("dequant", "fake_quant") and "encoding" in info:
                found[info["tensor"]] = info["encoding"]
            elif info.get("role") == "base" and "weight_encoding" in info:
                found[info["site"].weight_name] = info["weight_encoding"]
        return found

    def memory_report(self) -> dict[str, float]:
        """Bytes held by the base weights (quantized and float) and by LoRA, and bits per
        quantized parameter (codes plus scales and zero points)."""
        gm = self.graph_module
        lora_ids = {id(p) for a in self._adapters for p in self.lora_parameters(a)}
        quant_bytes = sum(
            b.numel() * b.element_size()
            for n, b in gm.named_buffers()
            if n.startswith("graphlora_quant.weight.")
        )
        quantized_params = sum(
            int(torch.Size(info["encoding"].shape).numel())
            for node in gm.graph.nodes
            for info in [meta.info(node)]
            if info.get("role") == "dequant"
        )
        float_bytes = 0
        lora_bytes = 0
        seen: set[int] = set()
        for _, p in gm.named_parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            nbytes = p.numel() * p.element_size()
            if id(p) in lora_ids:
                lora_bytes += nbytes
            else:
                float_bytes += nbytes
        return {
            "base_bytes": float(float_bytes + quant_bytes),
            "float_base_bytes": float(float_bytes),
            "quantized_weight_bytes": float(quant_bytes),
            "quantized_params": float(quantized_params),
            "bits_per_quantized_param": (8.0 * quant_bytes / quantized_params) if quantized_params else 0.0,
            "lora_bytes": float(lora_bytes),
        }

    # ------------------------------------------------------------------ base weights

    def base_state_dict(self) -> dict[str, torch.Tensor]:
        """The base model's tensors under the original model's state-dict keys.

        Weights a quantization pass replaced are evaluated through their dequantize nodes, so
        the result has the float weights the base computes with (on the quantization grid) —
        also when the float parameter is still there for another reader (a quantized
        ``lm_head`` tied to the embedding).
        """
        gm = self.graph_module
        state = {
            k: v
            for k, v in gm.state_dict().items()
            if not is_own(k)
        }
        for site in tagged_sites(gm):
            name = site.spec.weight_name
            if name not in state or dequant_node(site) is not None:
                state[name] = site.param_value().detach()
        order = gm.meta.get(meta.STATE_KEYS_KEY)
        if order:
            state = {k: state[k] for k in order if k in state} | {
                k: v for k, v in state.items() if k not in set(order)
            }
        return state

    # ------------------------------------------------------------------ saving

    def save_pretrained(
        self,
        save_directory,
        *,
        only_save_adapters: bool = False,
        save_adapters_separately: bool = True,
        max_shard_size: int | str = "5GB",
        adapter_name: str | None = None,
        selected_adapters: Sequence[str] | None = None,
        keep_quantized: bool = False,
        overwrite: bool = True,
    ):
        """Save in the formats people already load (see :mod:`graphlora.checkpoint.saving`).

        ``only_save_adapters=True``: a PEFT adapter directory. Otherwise with
        ``save_adapters_separately=True``: base weights (``model.safetensors``, original keys) plus
        the adapter files; with ``save_adapters_separately=False``: one merged model.
        """
        from graphlora.checkpoint import save_pretrained

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
        return accept_natural_calls(gm)

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
            "the inputs do not fit the traced graph "
            f"({text.splitlines()[0] if text else type(exc).__name__}). The graph was traced with "
            "the example inputs given to transform(): call it with the same arguments (names and "
            "structure), and shapes within the traced dynamic ranges (dimensions of size 0/1 in "
            "the example are specialised; trace with sizes >= 2)."
        )
    return exc
