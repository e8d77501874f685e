"""Calls of the original model's ``forward``: how a call binds, which graph it needs, and whether a
traced graph accepts it.

``torch.export`` fixes the *structure* of a call: which arguments are given and how (positionally
or by keyword), the value of every non-tensor argument (``use_cache=False``, ``return_dict``,
``logits_to_keep=1``) and each tensor's dtype, rank and device. Sizes stay symbolic within the
ranges and relations the tracer proved. A model that serves every call its users make therefore
needs one graph per structure (:mod:`graphlora.call_graphs` keeps them); this module is the
vocabulary for that, shared by the tracer and the model:

* :class:`ForwardSignature` binds a call to the original ``forward`` by parameter name: an
  argument passed as its default is the same call as one leaving it out, ``**kwargs`` entries
  keep their own names, and ``use_cache`` defaults to ``False`` (a LoraModel trains; a KV cache
  is asked for explicitly).
* :func:`call_key` is the structure of a bound call, hashable: the key of its graph.
* :class:`CallForm` is how one traced graph is called (which names positionally, which by keyword).
* :func:`example_inputs` makes stand-in inputs to trace a call with: the call's dtypes and devices,
  contiguous, with sizes 0 and 1 replaced by sizes the call does not use, because ``torch.export``
  specialises every dimension that is 0 or 1 in its example.
* :func:`guard_failure` says why a traced graph does not accept a call (``None`` when it does),
  without running it.
"""

from __future__ import annotations

import enum
import inspect
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from graphlora import meta
from graphlora.errors import InputError

__all__ = [
    "CALL_DEFAULTS",
    "CallForm",
    "ForwardSignature",
    "call_key",
    "describe_call",
    "example_inputs",
    "guard_failure",
]

#: Arguments a LoraModel gives a value when the call does not (or passes None): training graphs
#: need no KV cache, and a cache is an object torch.export cannot return.
CALL_DEFAULTS: dict[str, Any] = {"use_cache": False}

_CONSTANT_TYPES = (bool, int, float, str, type(None), torch.dtype, torch.device, enum.Enum)

Bound = dict[str, Any]


class ForwardSignature:
    """The original model's ``forward`` signature, binding calls by parameter name."""

    def __init__(self, forward: Callable[..., Any], owner: str):
        self.owner = owner
        try:
            self.signature: inspect.Signature | None = inspect.signature(forward)
        except (TypeError, ValueError):  # builtins without a signature
            self.signature = None
        params = self.signature.parameters.values() if self.signature is not None else ()
        self.params = {p.name: p for p in params}
        kinds = {p.kind for p in self.params.values()}
        #: whether calls can be bound by name at all: ``*args`` cannot be passed by keyword
        self.binds = self.signature is not None and inspect.Parameter.VAR_POSITIONAL not in kinds
        self.positional_only = [n for n, p in self.params.items() if p.kind is p.POSITIONAL_ONLY]
        self.positional = [n for n, p in self.params.items()
                           if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]

    @classmethod
    def of(cls, model: torch.nn.Module) -> "ForwardSignature":
        return cls(model.forward, type(model).__name__)

    def bind(self, args: tuple, kwargs: Mapping[str, Any], *, what: str = "the call",
             defaults: bool = True) -> Bound:
        """``name -> value`` of the arguments a call gives, in signature order.

        Arguments passed as their default (``labels=None``) are left out, ``**kwargs`` entries
        appear under their own names, and (``defaults``) :data:`CALL_DEFAULTS` fill in what the
        call leaves open. Raises :class:`InputError` naming the argument when the call does not
        fit the signature.
        """
        if not self.binds:
            raise InputError(f"{self.owner}.forward cannot be bound by name (it takes *args)")
        try:
            arguments = self.signature.bind(*args, **kwargs).arguments
        except TypeError as exc:
            raise InputError(f"{what} do not fit {self.owner}.forward{_public(self.signature)}: {exc}") from None
        bound: Bound = {}
        for name, value in arguments.items():
            param = self.params[name]
            if param.kind is param.VAR_KEYWORD:  # by name: the order of a call's keywords is no structure
                bound.update({k: value[k] for k in sorted(value) if value[k] is not None})
            elif param.kind is param.POSITIONAL_ONLY or not _is_default(value, param.default):
                bound[name] = value
        for name, value in CALL_DEFAULTS.items():
            if defaults and name in self.params and bound.get(name) is None:
                bound[name] = value
        return bound

    def form(self, bound: Bound, positional_count: int | None = None, given: Mapping[str, Any] | None = None,
             keyword_order: Sequence[str] = ()) -> "CallForm":
        """How to call a graph traced for ``bound``: positional-only parameters positionally, and
        ``positional_count`` more (the example's own positional arguments, for the graph of
        ``transform``) while they are all given; everything else by keyword, those named in
        ``keyword_order`` first in that order (the example's). Values of :data:`CALL_DEFAULTS`
        the call did not give (``given``: the call bound without them) are baked into the graph
        rather than made inputs, so the graph is called as the call was made."""
        limit = len(self.positional_only) if positional_count is None else positional_count
        positional = []
        for name in self.positional[: max(limit, len(self.positional_only))]:
            if name not in bound:
                break
            positional.append(name)
        baked = {n: v for n, v in bound.items() if given is not None and n not in given and n in CALL_DEFAULTS}
        rest = [n for n in bound if n not in positional and n not in baked]
        first = [n for n in keyword_order if n in rest]
        keywords = tuple(first + [n for n in rest if n not in first])
        return CallForm(tuple(positional), keywords, tuple(baked.items()))


def _is_default(value: Any, default: Any) -> bool:
    if default is inspect.Parameter.empty:
        return False
    if value is default:
        return True
    return (type(value) is type(default) and isinstance(value, _CONSTANT_TYPES)
            and not isinstance(value, torch.Tensor) and value == default)


def _public(sig: inspect.Signature) -> inspect.Signature:
    params = [p for p in sig.parameters.values() if p.name != "self"]
    return sig.replace(parameters=params)


@dataclass(frozen=True)
class CallForm:
    """The call structure of one traced graph: argument names passed positionally, then by
    keyword, and the ``(name, value)`` pairs baked into the graph (given to the model while
    tracing, not inputs of the graph). ``state`` pairs an argument name with the
    :class:`graphlora.kv_cache.CacheLayout` of the cache object it carries: the graph takes the
    cache's tensors there and updates them in place."""

    positional: tuple[str, ...]
    keywords: tuple[str, ...]
    baked: tuple[tuple[str, Any], ...] = ()
    state: tuple[tuple[str, Any], ...] = ()

    @property
    def names(self) -> tuple[str, ...]:
        return self.positional + self.keywords

    def arrange(self, bound: Bound) -> tuple[tuple, dict[str, Any]]:
        """``(args, kwargs)`` to call the graph with (``bound`` has :attr:`names`; baked ones are
        left out)."""
        return tuple(bound[n] for n in self.positional), {k: bound[k] for k in self.keywords}


def call_key(bound: Bound) -> tuple:
    """The structure of a bound call: argument names, each tensor's dtype, rank and device, every
    other value itself. Calls with equal keys can share a graph (sizes permitting)."""
    return tuple((name, _kind(name, value)) for name, value in bound.items())


def _kind(name: str, value: Any) -> tuple:
    if isinstance(value, torch.Tensor):
        return ("tensor", value.dtype, value.dim(), value.device)
    if isinstance(value, _CONSTANT_TYPES):
        return ("constant", type(value), value)
    if isinstance(value, (list, tuple, dict)):
        leaves, spec = pytree.tree_flatten(value)
        return ("tree", str(spec), tuple(_kind(name, leaf) for leaf in leaves))
    raise InputError(
        f"argument {name!r} is a {type(value).__name__}, which cannot be an input of a traced "
        "graph (torch.export takes tensors, numbers, strings, None and lists, tuples and dicts of "
        "them)"
    )


def describe_call(bound: Bound) -> str:
    """A short readable form of a bound call for messages: ``input_ids=<long[2x8]>, use_cache=False``."""

    def one(value: Any) -> str:
        if isinstance(value, torch.Tensor):
            dtype = str(value.dtype).replace("torch.", "")
            return f"<{dtype}[{'x'.join(str(s) for s in value.shape)}]>"
        if isinstance(value, (list, tuple)):
            return "[" + ", ".join(one(v) for v in value) + "]"
        if isinstance(value, dict):
            return "{" + ", ".join(f"{k}: {one(v)}" for k, v in value.items()) + "}"
        return repr(value)

    return ", ".join(f"{name}={one(value)}" for name, value in bound.items())


def example_inputs(bound: Bound, *, remap: bool = True, factory: Callable[..., torch.Tensor] | None = None) -> Bound:
    """Stand-ins for the tensors of ``bound`` to trace with: same dtype and device, contiguous,
    made by ``factory(shape, dtype=, device=)`` (default ``torch.zeros``; ``torch.empty`` under a
    fake mode allocates nothing). With ``remap`` every size 0 or 1 becomes a size no tensor of the
    call has, the same new size for the same old one, so that the trace keeps those dimensions
    symbolic; non-tensor values are kept."""
    make = factory or torch.zeros
    leaves = [v for v in pytree.tree_leaves(list(bound.values())) if isinstance(v, torch.Tensor)]
    taken = {int(s) for t in leaves for s in t.shape}
    fresh: dict[int, int] = {}

    def size(n: int) -> int:
        if not remap or n > 1:
            return n
        if n not in fresh:
            candidate = 2
            while candidate in taken or candidate in fresh.values():
                candidate += 1
            fresh[n] = candidate
        return fresh[n]

    def stand_in(value: Any) -> Any:
        if not isinstance(value, torch.Tensor):
            return value
        return make(tuple(size(int(s)) for s in value.shape), dtype=value.dtype, device=value.device)

    return {name: pytree.tree_map(stand_in, value) for name, value in bound.items()}


def guard_failure(gm: fx.GraphModule, args: tuple, kwargs: Mapping[str, Any]) -> str | None:
    """Why ``gm`` (traced by :func:`graphlora.trace`) does not accept ``(args, kwargs)``, or None.

    Checks each input against its placeholder: tensor rank and dtype, static sizes, symbolic sizes
    within the ranges the tracer proved and equal where the graph shares a symbol, then the
    graph's own relational guards (``_guards_fn``). Nothing of the model runs.
    """
    in_spec = getattr(gm, "_in_spec", None)
    if in_spec is None:
        return None
    try:
        from torch.fx._pytree import tree_flatten_spec

        flat = tree_flatten_spec((tuple(args), dict(kwargs)), in_spec)
    except Exception as exc:  # a structure the graph was not traced with
        return f"the call's structure differs from the graph's ({type(exc).__name__}: {exc})"
    plan = _input_plan(gm)
    if len(flat) != len(plan):
        return f"the graph takes {len(plan)} inputs, the call gives {len(flat)}"
    ranges = gm.meta.get(meta.RANGES_KEY, {})
    sizes: dict[str, int] = {}
    for expected, value in zip(plan, flat):
        if expected is not None:
            problem = _tensor_problem(expected, value, ranges, sizes)
            if problem:
                return problem
    guards = gm._modules.get("_guards_fn")
    if guards is not None:
        try:
            guards(*flat)
        except AssertionError as exc:
            return str(exc).strip().splitlines()[0] if str(exc).strip() else "a guard of the graph failed"
    return None


def _input_plan(gm: fx.GraphModule) -> list[tuple[str, torch.dtype, tuple] | None]:
    """Per placeholder of ``gm``: ``(name, dtype, sizes)`` of a tensor input, each size an int or
    its symbol's name; None for other inputs. Kept with the graph's code (the symbols' names
    cost a sympy print each: a decode step checks its guards once per token)."""
    cached = gm.__dict__.get("_graphlora_input_plan")
    if cached is not None and cached[0] is gm._code:
        return cached[1]
    plan = []
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            plan.append(None)
            continue
        plan.append((node.name, val.dtype, tuple(s if isinstance(s, int) else str(s.node.expr) for s in val.shape)))
    gm.__dict__["_graphlora_input_plan"] = (gm._code, plan)
    return plan


def _tensor_problem(expected: tuple[str, torch.dtype, tuple], value: Any, ranges: Mapping[str, tuple],
                    sizes: dict[str, int]) -> str | None:
    name, dtype, shape = expected
    if not isinstance(value, torch.Tensor):
        return f"{name} must be a tensor, got {type(value).__name__}"
    if value.dim() != len(shape):
        return f"{name} must have {len(shape)} dimensions, got shape {tuple(value.shape)}"
    if value.dtype != dtype:
        return f"{name} must be {dtype}, got {value.dtype}"
    for i, (want, got) in enumerate(zip(shape, value.shape)):
        if isinstance(want, int):
            if want != got:
                return f"{name}.shape[{i}] is {got}; the graph was traced with exactly {want}"
            continue
        symbol = want
        if symbol in ranges:
            low, high = ranges[symbol]
            if got < low or (high is not None and got > high):
                upper = "" if high is None else f" and <= {high}"
                return f"{name}.shape[{i}] is {got}; the graph needs >= {low}{upper}"
        if symbol in sizes and sizes[symbol] != got:
            return f"{name}.shape[{i}] is {got} but must equal another input's size {sizes[symbol]}"
        sizes.setdefault(symbol, got)
    return None


def accept_natural_calls(gm: fx.GraphModule, signature: ForwardSignature | None) -> fx.GraphModule:
    """Let a single graph (``merge()``'s) be called like the model it was traced from.

    Every call is bound to the original ``forward`` by name and arranged into the graph's
    :class:`CallForm` (a forward pre-hook): keywords may be given positionally and back, and
    values baked in at trace time (``use_cache=False``) may be left out or passed again. A call
    this one graph cannot serve (another value for a baked constant, an argument it was not traced
    with, an input its guards refuse) raises :class:`InputError` naming the argument; the graph is
    never run with inputs it was not traced for. Graphs without a call form (symbolic traces)
    are left as they are.
    """
    form = gm.meta.get(meta.CALL_FORM_KEY)
    if signature is None or not signature.binds or form is None:
        return gm
    baked = dict(form.baked)
    # constants the example passed are inputs the graph guards on: a call giving another value
    # is refused by name here rather than by the guard's message
    baked.update({name: kind[2] for name, kind in gm.meta.get(meta.CALL_KEY, ()) if kind[0] == "constant"})

    def normalize(module: fx.GraphModule, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        bound = signature.bind(args, kwargs, what="the inputs")
        for name, value in bound.items():
            if name in baked and not _same_constant(value, baked[name]):
                raise InputError(
                    f"{name}={value!r} differs from the value the graph was traced with "
                    f"({name}={baked[name]!r}); a merged model is one graph with its Python constants "
                    f"fixed: call the LoraModel instead, or transform with {name}={value!r} in the example"
                )
        extra = [n for n in bound if n not in form.names and n not in baked]
        if extra:
            raise InputError(
                f"argument(s) {', '.join(extra)} were not given when the graph was traced; a merged model "
                "is one graph: call the LoraModel, or transform with example inputs that include them"
            )
        missing = [n for n in form.names if n not in bound]
        if missing:
            raise InputError(f"missing argument(s) {', '.join(missing)} the graph was traced with")
        call_args, call_kwargs = form.arrange(bound)
        problem = guard_failure(module, call_args, call_kwargs)
        if problem is not None:
            raise InputError(f"the merged graph cannot take this call: {problem}")
        return call_args, call_kwargs

    gm.register_forward_pre_hook(normalize, with_kwargs=True)
    return gm


def _same_constant(a: Any, b: Any) -> bool:
    try:
        return type(a) is type(b) and bool(a == b)
    except Exception:
        return False
