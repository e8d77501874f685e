"""One graph per call structure: how a LoraModel serves every call of the original model.

``torch.export`` fixes a call's structure (see :mod:`graphlora.signature`): a graph traced with
``labels`` needs them, one traced without refuses them, ``output_hidden_states=True`` returns more.
Users call a model all these ways (the Trainer alone calls it with ``labels`` and
``num_items_in_batch`` to train and without the latter to evaluate), so a LoraModel keeps one graph
per structure and makes a missing one on the first call that needs it, as ``torch.compile``
recompiles on a guard failure:

1. The model's structure-only copy (:func:`graphlora.trace.structure_copy`, on the meta device)
   is traced for the call with fake tensors. No weight is needed: a QLoRA transform's freed float
   weights are not missed. The trace is kept (it holds no memory) to rebuild the graph from.
2. The trace is bound to the canonical graph's tensors by name: the same ``Parameter`` and buffer
   objects, and graphlora's own trees (adapters, quantized storage, scales, observers) as shared
   modules. Training, ``load_lora_state_dict`` and calibration statistics are seen by every graph.
3. The same passes as the canonical graph got make it its twin, recorded in the graph's
   ``pass_log``: :class:`~graphlora.passes.replicate.ReplicateSitesPass` (the rules' tags and the
   weights as the canonical graph computes them: the dequantize node on the stored codes, not a
   re-quantization), :class:`~graphlora.passes.insert_lora.InsertLoraPass` for each active adapter
   (the LoRA weights are found, never created), and
   :class:`~graphlora.passes.replicate.ReplicateQuantizersPass` (fake-quant and observers).

The canonical graph (``LoraModel.graph_module``, traced at ``transform``) stays the one passes,
``graph_text``, saving and export see; every other graph is derived from it and rebuilt from its
trace when the canonical graph changes (an adapter switch, calibration, ``run_passes``).
Mixed-adapter batches (``adapter_names=[...]``, as PEFT) are graphs of their own too: the branches
of every adapter named, each gated per batch row by an extra graph input.
"""

from __future__ import annotations

import dataclasses
import types
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
import torch.fx as fx
import torch.nn as nn

from graphlora import kv_cache, meta
from graphlora.errors import AdapterError, GraphloraError, InputError, TraceError
from graphlora.graph_utils import add_keyword_input, delete_tensor, fake_mode, get_tensor, is_own, share_storage_copy
from graphlora.passes.base import PassPipeline, PassRecord
from graphlora.passes.insert_lora import InsertLoraPass
from graphlora.passes.replicate import ReplicateQuantizersPass, ReplicateSitesPass
from graphlora.signature import CallForm, ForwardSignature, call_key, describe_call, guard_failure
from graphlora.trace import trace_structure
from graphlora.training_mode import set_training_flags

if TYPE_CHECKING:
    from graphlora.model import LoraModel

__all__ = ["BASE_ADAPTER", "GATE_INPUT", "CallGraph", "CallGraphs", "signed_class"]

#: PEFT's ``adapter_names`` entry for a row that runs the base model only.
BASE_ADAPTER = "__base__"
#: The input of a mixed-adapter graph holding the row gates, one row per adapter.
GATE_INPUT = "graphlora_adapter_gate"


@dataclass(eq=False)
class CallGraph:
    """One graph of a LoraModel and the calls it serves.

    ``key`` is the call structure (:func:`graphlora.signature.call_key`, plus the adapters of a
    mixed batch), ``call`` a readable example of it. ``graph_module`` is the graph that runs,
    ``pass_log`` what built it (graph texts with ``record=True``, for :func:`graphlora.diff`).
    """

    key: tuple
    call: str
    form: CallForm
    trace: fx.GraphModule | None = None  # None: the canonical graph, traced by transform()
    adapters: tuple[str, ...] | None = None  # a mixed batch's adapters, in gate order
    graph_module: fx.GraphModule | None = None
    pass_log: list[PassRecord] = field(default_factory=list)
    built_from: Any = None  # the canonical graph's code this graph was built from
    _executables: dict = field(default_factory=dict, repr=False)

    @property
    def canonical(self) -> bool:
        return self.trace is None

    def guards(self, canonical: fx.GraphModule) -> fx.GraphModule:
        """The traced graph whose guards say which sizes this graph accepts."""
        return canonical if self.trace is None else self.trace

    def executable(self, gm: fx.GraphModule, kind: str, make: Callable[[fx.GraphModule], Any]) -> Any:
        """A cached execution copy of ``gm`` (rebuilt when ``gm`` is recompiled)."""
        cached = self._executables.get(kind)
        if cached is None or cached[0] is not gm._code:
            cached = (gm._code, make(gm))
            self._executables[kind] = cached
        return cached[1]

    def __repr__(self) -> str:
        where = "transform()" if self.canonical else "derived"
        mixed = f", adapters={list(self.adapters)}" if self.adapters is not None else ""
        return f"CallGraph({self.call}{mixed}; {where})"


class CallGraphs:
    """The graphs of one LoraModel, by call structure (see the module docstring)."""

    def __init__(self, model: "LoraModel", template: nn.Module | None, traces: Sequence[fx.GraphModule] = ()):
        gm = model.graph_module
        self.model = model
        self.template = template
        self.signature = ForwardSignature(template.forward, type(template).__name__) if template is not None else None
        form = gm.meta.get(meta.CALL_FORM_KEY)
        self.canonical = CallGraph(gm.meta.get(meta.CALL_KEY, ()), "the call traced by transform()", form)
        self._graphs: list[CallGraph] = [self.canonical]
        self._traces: dict[tuple, list[fx.GraphModule]] = {}
        for trace in traces:  # traces made along with the canonical one, for other sizes
            self._traces.setdefault(trace.meta[meta.CALL_KEY], []).append(trace)
        self._aliases = _aliases(template) if template is not None else {}
        self._layouts: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # KV cache -> its CacheLayout

    @property
    def graphs(self) -> list[CallGraph]:
        """Every graph made so far, the canonical one first."""
        self.canonical.graph_module = self.model.graph_module
        return list(self._graphs)

    # ------------------------------------------------------------------ dispatch

    def dispatch(self, args: tuple, kwargs: dict) -> tuple[CallGraph, tuple, dict, Callable[[Any], Any]]:
        """The graph serving ``model(*args, **kwargs)`` (made if missing), the call as it takes it,
        and what turns the graph's output into the model's (a KV cache object put back)."""
        model = self.model
        gm = model.graph_module
        self.canonical.graph_module = gm
        names = kwargs.pop("adapter_names", None) if not self._takes("adapter_names") else None
        if self.signature is None or not self.signature.binds or self.canonical.form is None:
            if names is not None:
                raise InputError("adapter_names needs a model traced with torch.export (method='export')")
            return self.canonical, args, kwargs, _same  # a symbolic trace: called as it is
        bound = self.signature.bind(args, kwargs, what="the inputs")
        adapters, gate = self._gate(names, bound) if names is not None else (None, None)
        bound, state, finish = self._cache_state(bound)
        key = call_key(bound)
        if state:  # the cache's layout is part of the call's structure
            cache_name, layout = state[0]
            key = tuple((n, ("cache", layout.key, kind) if n == cache_name else kind) for n, kind in key)
        if "forward" in gm.__dict__ and (adapters is not None or key != self.canonical.key):
            raise GraphloraError(
                "this model runs block by block (FSDP): it serves only the call it was traced with "
                f"({describe_call(bound)} is another); call it as traced"
            )
        entry = self._find(key, bound, adapters, state)
        if gate is not None:
            bound = {**bound, GATE_INPUT: gate}
        call_args, call_kwargs = entry.form.arrange(bound)
        return entry, call_args, call_kwargs, finish

    def graph_for(self, args: tuple, kwargs: dict) -> fx.GraphModule:
        entry, _, _, _ = self.dispatch(args, dict(kwargs))
        return entry.graph_module

    def _cache_state(self, bound: dict) -> tuple[dict, tuple, Callable[[Any], Any]]:
        """A call with a KV cache object: the call with the cache's tensors in its place, the
        ``(name, layout)`` of the state, and what puts the cache object back into the output."""
        name, cache = kv_cache.find_cache(bound)
        if cache is None:
            return bound, (), _same
        layout = self._layouts.get(cache)  # generate() passes the same cache object every step
        if layout is None or not layout.fits(cache):
            model = self.model
            layout = kv_cache.layout_of(cache, model.config, model.dtype, model.device, _rows(bound))
            self._layouts[cache] = layout
        bound = {**bound, name: layout.state(cache)}
        return bound, ((name, layout),), lambda output: kv_cache.restore(output, cache)

    def _takes(self, name: str) -> bool:
        return self.signature is not None and name in self.signature.params

    def _find(self, key: tuple, bound: dict, adapters: tuple[str, ...] | None, state: tuple = ()) -> CallGraph:
        canonical = self.model.graph_module
        full_key = key if adapters is None else key + ((GATE_INPUT, adapters),)
        problem = None
        for entry in self._graphs:
            if entry.key != full_key:
                continue
            traced = entry.guards(canonical)
            problem = guard_failure(traced, *traced.meta[meta.CALL_FORM_KEY].arrange(bound))
            if problem is None:
                self._ready(entry)
                return entry
        trace = self._trace_for(key, bound, state)
        form = trace.meta[meta.CALL_FORM_KEY]
        if adapters is not None:
            form = CallForm(form.positional, form.keywords + (GATE_INPUT,), form.baked)
        entry = CallGraph(full_key, describe_call(bound), form, trace=trace, adapters=adapters)
        self._ready(entry)
        self._graphs.append(entry)
        return entry

    def _trace_for(self, key: tuple, bound: dict, state: tuple = ()) -> fx.GraphModule:
        """A trace for ``bound``'s structure whose guards accept it: kept, or new."""
        for trace in self._traces.get(key, []):
            if guard_failure(trace, *trace.meta[meta.CALL_FORM_KEY].arrange(bound)) is None:
                return trace
        canonical = self.model.graph_module

        def like(name: str) -> torch.Tensor | None:
            return _lookup(canonical, name, self._aliases)

        spares: list[fx.GraphModule] = []
        try:
            form = dataclasses.replace(self.signature.form(bound), state=state)
            trace = trace_structure(self.template, bound, form, like=like,
                                    device=_device_of(canonical), spares=spares)
        except TraceError as exc:
            mismatch = self._input_mismatch(bound)
            if mismatch is not None:
                raise InputError(mismatch) from exc
            raise TraceError(self._failure(bound, key, exc)) from exc
        self._traces.setdefault(key, []).extend([trace, *spares])
        return trace

    def derived_graph(self, module: nn.Module, bound: dict, call: str) -> fx.GraphModule:
        """A graph of ``module`` -- a view of the template with another ``forward`` (the ONNX
        decoder step, which takes its KV cache as tensors) -- for the call ``bound``, traced and
        built like every other graph of the model; not kept among the model's graphs."""
        canonical = self.model.graph_module
        form = ForwardSignature(module.forward, type(module).__name__).form(bound)
        trace = trace_structure(module, bound, form, like=lambda name: _lookup(canonical, name, self._aliases),
                                device=_device_of(canonical))
        entry = CallGraph(call_key(bound), call, form, trace=trace)
        self._build(entry)
        return entry.graph_module

    def explain_failure(self, args: tuple, kwargs: dict) -> InputError | None:
        """After a graph failed on a call: an InputError naming the input that differs in kind or
        dtype from the traced call (the likely cause), or None."""
        if self.signature is None or not self.signature.binds:
            return None
        kwargs = {k: v for k, v in kwargs.items() if k != "adapter_names" or self._takes(k)}
        try:
            bound = self.signature.bind(args, kwargs)
        except InputError:
            return None
        mismatch = self._input_mismatch(bound)
        return InputError(mismatch) if mismatch is not None else None

    def _input_mismatch(self, bound: dict) -> str | None:
        """After tracing a call failed: the argument that was a tensor in the traced call and is
        now no tensor, or a tensor of another dtype (the likely cause, in the user's terms), or None."""
        for name, kind in self.canonical.key:
            if kind[0] != "tensor" or name not in bound:
                continue
            dtype, dim = _dtype_name(kind[1]), kind[2]
            value = bound[name]
            if not isinstance(value, torch.Tensor):
                return (f"argument {name} must be a torch.Tensor (the graph was traced with a {dtype} tensor "
                        f"of {dim} dimension(s)), got {type(value).__name__}; convert it, e.g. torch.as_tensor(...)")
            if value.dtype != kind[1]:
                return (f"argument {name} is {_dtype_name(value.dtype)} but the graph was traced with {dtype}, "
                        f"and the model cannot run it; cast the input (e.g. {name}.to(torch.{dtype})) or "
                        "transform with an example of this dtype")
        return None

    def _failure(self, bound: dict, key: tuple, exc: Exception) -> str:
        """Which arguments make this call different from the traced one, and why tracing failed."""
        theirs = dict(self.canonical.key)
        differing = [f"{name}={_short(bound[name])}" for name, kind in key if theirs.get(name) != kind]
        owner = type(self.template).__name__
        reason = str(exc)
        if bound.get("use_cache") is True and not isinstance(bound.get(kv_cache.CACHE_ARGUMENT), tuple):
            reason = ("use_cache=True without past_key_values makes the model create and return a KV cache "
                      "object (DynamicCache), which a traced graph cannot return; a LoraModel call defaults "
                      "to use_cache=False, generate() passes a static cache (past_key_values="
                      f"transformers.StaticCache(...)) ({reason})")
        where = f" with {', '.join(differing)}" if differing else ""
        return f"cannot make a graph for {owner}.forward{where}: {reason}"

    # ------------------------------------------------------------------ building

    def _ready(self, entry: CallGraph) -> None:
        canonical = self.model.graph_module
        if entry.canonical:
            entry.graph_module = canonical
            return
        if entry.graph_module is None or entry.built_from is not canonical._code:
            self._build(entry)

    def _build(self, entry: CallGraph) -> None:
        """Bind a copy of the entry's trace to the canonical graph's tensors and run the passes."""
        model = self.model
        canonical = model.graph_module
        gm = share_storage_copy(entry.trace)
        bound_names = _bind(gm, canonical, self._aliases)
        gated = entry.adapters is not None
        if gated:
            add_keyword_input(gm, GATE_INPUT, _gate_value(gm, len(entry.adapters)))
        active = list(entry.adapters) if gated else model.active_adapters
        passes = [ReplicateSitesPass(canonical, model.rules)]
        passes += [
            InsertLoraPass(name, model._adapters[name], training=model.training,
                           gate=(GATE_INPUT, i) if gated else None)
            for i, name in enumerate(active)
        ]
        passes.append(ReplicateQuantizersPass(canonical))
        pipeline = PassPipeline(passes, record=model._record_passes)
        pipeline(gm)
        set_training_flags(gm, model.training)
        _drop_stand_ins(gm, bound_names, entry.call)
        entry.graph_module = gm
        entry.pass_log = pipeline.log
        entry.built_from = canonical._code
        entry._executables.clear()

    def training_changed(self, before: Any, mode: bool) -> None:
        """The canonical graph's train flags flipped (its code changed from ``before``): flip every
        derived graph built from ``before`` too, instead of rebuilding them."""
        after = self.model.graph_module._code
        for entry in self._graphs:
            if entry.canonical or entry.graph_module is None or entry.built_from is not before:
                continue
            set_training_flags(entry.graph_module, mode)
            entry.built_from = after

    def clear(self) -> None:
        """Forget every derived graph and trace (tensors moved to another device or dtype)."""
        self._graphs = [self.canonical]
        self._traces = {}
        self.canonical._executables.clear()

    # ------------------------------------------------------------------ mixed-adapter batches

    def _gate(self, names: Any, bound: dict) -> tuple[tuple[str, ...] | None, torch.Tensor | None]:
        """The adapters a mixed batch uses (None: an ordinary call serves it) and its row gates."""
        model = self.model
        if isinstance(names, str) or not isinstance(names, Sequence):
            raise InputError(f"adapter_names must be a list with one adapter name per batch row, got {names!r}")
        rows = _rows(bound)
        if len(names) != rows:
            raise InputError(f"adapter_names has {len(names)} names for a batch of {rows} rows")
        unknown = sorted({n for n in names if n != BASE_ADAPTER and n not in model._adapters})
        if unknown:
            raise AdapterError(f"adapter_names: unknown adapter(s) {', '.join(map(repr, unknown))}; this model "
                               f"has {sorted(model._adapters)} (and {BASE_ADAPTER!r} for the base model)")
        used = sorted(set(names))
        if used == model.active_adapters or (used == [BASE_ADAPTER] and not model.active_adapters):
            return None, None
        if any(meta.role(n) in ("fake_quant", "observer") for n in model.graph_module.graph.nodes):
            raise InputError("adapter_names: mixed-adapter batches of a model with quantized activations are "
                             "not supported (each adapter would need encodings of its own); run one "
                             "adapter at a time with set_adapter()")
        adapters = tuple(n for n in used if n != BASE_ADAPTER)
        gate = torch.zeros(len(adapters), rows, device=_first_tensor(bound).device)
        for row, name in enumerate(names):
            if name != BASE_ADAPTER:
                gate[adapters.index(name), row] = 1.0
        return adapters, gate


# --------------------------------------------------------------------------- helpers


def _aliases(template: nn.Module) -> dict[str, list[str]]:
    """Every name of each tied tensor (``lm_head.weight`` and ``transformer.wte.weight``): two
    traces may read a tied tensor under different names."""
    names: dict[int, list[str]] = {}
    for name, t in list(template.named_parameters(remove_duplicate=False)) + list(
        template.named_buffers(remove_duplicate=False)
    ):
        names.setdefault(id(t), []).append(name)
    return {name: group for group in names.values() if len(group) > 1 for name in group}


def _lookup(canonical: fx.GraphModule, name: str, aliases: dict[str, list[str]]) -> torch.Tensor | None:
    """The canonical graph's tensor of ``name``, or of a name tied to it; None when it has none."""
    for candidate in [name, *aliases.get(name, ())]:
        try:
            return get_tensor(canonical, candidate)
        except AttributeError:
            continue
    return None


def _bind(gm: fx.GraphModule, canonical: fx.GraphModule, aliases: dict[str, list[str]]) -> set[str]:
    """Give a fresh trace the canonical graph's tensors of the same names (the same objects) and
    its graphlora-owned trees; returns the names bound. Tensors the canonical graph lacks stay
    stand-ins until the passes stop reading them (:func:`_drop_stand_ins`)."""
    for name, module in canonical._modules.items():
        if is_own(name):
            gm._modules[name] = module
    tensors = list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False))
    bound: set[str] = set()
    for name, t in tensors:
        if is_own(name) or not _is_stand_in(t):  # constants the trace made are its own, real tensors
            continue
        real = _lookup(canonical, name, aliases)
        if real is None:
            continue
        bound.add(name)
        head, _, leaf = name.rpartition(".")
        owner = gm.get_submodule(head) if head else gm
        if isinstance(real, nn.Parameter):
            owner._buffers.pop(leaf, None)
            owner._parameters[leaf] = real
        else:
            owner._parameters.pop(leaf, None)
            owner._buffers[leaf] = real
    return bound


def _is_stand_in(t: torch.Tensor) -> bool:
    """A tensor of a trace standing in for one to bind: fake, or meta (traces kept from transform)."""
    from torch._subclasses.fake_tensor import is_fake

    return is_fake(t) or t.device.type == "meta"


def _drop_stand_ins(gm: fx.GraphModule, bound: set[str], call: str) -> None:
    """Delete the stand-ins nothing was bound to and the graph no longer reads; one it still
    reads is a tensor this LoraModel does not hold, so the call cannot run."""
    from torch._subclasses.fake_tensor import is_fake

    read = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    for name, t in list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False)):
        if name in bound or is_own(name) or not _is_stand_in(t):
            continue
        if name in read:
            raise TraceError(
                f"the graph for the call {call} reads {name!r}, which this LoraModel does not hold "
                "(the canonical graph never needed it, or a pass freed it): it cannot serve this call"
            )
        delete_tensor(gm, name)
    for module in gm.modules():
        for attr, value in vars(module).items():
            if isinstance(value, torch.Tensor) and is_fake(value):
                raise TraceError(f"the graph for the call {call} holds a constant {attr!r} created on the "
                                 "fake tensors of the trace; this call cannot be served")


def _gate_value(gm: fx.GraphModule, count: int) -> torch.Tensor | None:
    """Fake value of the gate input: ``(adapters, batch)``, batch the first input's leading size."""
    mode = fake_mode(gm)
    for node in gm.graph.nodes:
        val = node.meta.get("val") if node.op == "placeholder" else None
        if isinstance(val, torch.Tensor) and val.dim() >= 1 and mode is not None:
            with mode:
                return torch.empty((count, val.shape[0]), dtype=torch.float32, device=val.device)
    return None


def _rows(bound: dict) -> int:
    tensor = _first_tensor(bound)
    if tensor.dim() == 0:
        raise InputError("adapter_names needs a batched input (its first dimension is the batch)")
    return int(tensor.shape[0])


def _first_tensor(bound: dict) -> torch.Tensor:
    for value in bound.values():
        if isinstance(value, torch.Tensor):
            return value
    raise InputError("adapter_names needs a tensor input whose first dimension is the batch")


def _device_of(gm: fx.GraphModule) -> torch.device:
    for t in list(gm.parameters()) + list(gm.buffers()):
        return t.device
    return torch.device("cpu")


def _same(output: Any) -> Any:
    return output


def _short(value: Any) -> str:
    return describe_call({"_": value})[2:]


# --------------------------------------------------------------------------- the user's signature


def signed_class(base: type, template: nn.Module) -> type:
    """A subclass of ``base`` whose ``forward`` has the signature of ``template``'s forward.

    Tools read a model's signature from its class (the Trainer's label names, its unused-column
    removal, ``generate``'s argument checks), so each LoraModel's class carries the signature of
    the model it was made from, as ``torch.fx.GraphModule`` gives each instance a class of its
    own. For a transformers model it is also a ``PreTrainedModel`` (see :func:`_pretrained_base`).
    """
    import inspect

    try:
        signature = inspect.signature(template.forward)
    except (TypeError, ValueError):
        return base
    self_param = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    params = list(signature.parameters.values())
    if params and params[0].kind is inspect.Parameter.POSITIONAL_ONLY:
        self_param = self_param.replace(kind=inspect.Parameter.POSITIONAL_ONLY)

    def forward(self, *args, **kwargs):
        return base.forward(self, *args, **kwargs)

    forward.__signature__ = signature.replace(parameters=[self_param, *params])
    forward.__doc__ = base.forward.__doc__
    forward.__qualname__ = f"{base.__qualname__}.forward"
    namespace = {"forward": forward, "__module__": base.__module__, "__qualname__": base.__qualname__,
                 "__doc__": base.__doc__, "_signed_from": type(template)}
    return types.new_class(base.__name__, (base, *_pretrained_base(template)), exec_body=lambda ns: ns.update(namespace))


def _pretrained_base(template: nn.Module) -> tuple[type, ...]:
    """transformers' ``PreTrainedModel`` when the original model is one (found in its class
    hierarchy, so graphlora imports no transformers): the Trainer saves a model with its
    ``save_pretrained`` only if it is a ``PreTrainedModel`` (or a ``PeftModel``), and a LoraModel
    stands in for the model it was made from. Its own methods come first (``base`` precedes)."""
    bases = []
    for name in ("PreTrainedModel", "GenerationMixin"):  # generate() is transformers' (graphlora.generation)
        for cls in type(template).__mro__:
            if cls.__name__ == name and cls.__module__.startswith("transformers."):
                bases.append(cls)
                break
    return tuple(bases)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
