"""Trace an ``nn.Module`` into a ``torch.fx.GraphModule`` that graphlora passes can rewrite.

``torch.export`` (non-strict) is the default because it traces Hugging Face transformers models
that ``torch.fx.symbolic_trace`` cannot; the graph it gives is ATen-level, carries fake-tensor
shapes in ``node.meta["val"]`` and module paths in ``node.meta["nn_module_stack"]``.

Two properties every caller relies on:

* The original model is never mutated. The traced module gets *new* ``nn.Parameter`` objects that
  share storage with the original (no copy, so an 8B model does not double in memory), frozen.
  Passes replace tensors, they never write into them in place.
* Batch and sequence dimensions stay dynamic by default, so a model traced with a 2 x 8 example
  runs on any batch the user trains with. Sizes 0 and 1 in the example are not specialised
  either (see :func:`export_call`), unless the model branches on them.

A graph fixes its call's structure (which arguments, non-tensor values); :func:`structure_copy`
and :func:`trace_structure` trace another call of the same model later, from a copy that holds no
weights (see :mod:`graphlora.call_graphs`).
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import warnings
from typing import Any, Literal

import torch
import torch.fx as fx
import torch.nn as nn

from graphlora import kv_cache, meta
from graphlora.errors import InputError, TraceError
from graphlora.signature import CallForm, ForwardSignature, call_key, example_inputs, guard_failure
from graphlora.sites import functionalize_linear_modules

TraceMethod = Literal["export", "symbolic"]


def trace(
    model: nn.Module,
    example_args: tuple = (),
    example_kwargs: dict[str, Any] | None = None,
    *,
    method: TraceMethod = "export",
    dynamic: bool = True,
    spares: list[fx.GraphModule] | None = None,
) -> fx.GraphModule:
    """Trace ``model`` into a GraphModule with frozen parameters sharing the model's storage.

    ``method="export"`` needs example inputs (they may live on the ``meta`` device together with
    the model). ``method="symbolic"`` uses ``torch.fx.symbolic_trace`` and needs none; its linear
    modules are rewritten to ``F.linear`` calls so every pass sees one spelling of a module call.
    With ``dynamic=True`` every tensor dimension of the example inputs is traced as dynamic where
    the model allows it; a model that refuses is traced with static shapes and a warning.
    Arguments are bound to ``forward`` by name (see :class:`graphlora.signature.ForwardSignature`:
    ``use_cache`` is ``False`` unless the example says otherwise). ``spares``, when given,
    collects traces of the same call made along the way that serve other sizes (a model that
    branches on a size of 1 needs one graph for it and one for the rest), their tensors on the
    meta device.
    """
    if not isinstance(model, nn.Module):
        raise TraceError(f"trace() needs a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(example_args, tuple):
        example_args = (example_args,)
    example_kwargs = dict(example_kwargs or {})
    if method == "export":
        gm = _trace_export(model, example_args, example_kwargs, dynamic, spares)
    elif method == "symbolic":
        gm = _trace_symbolic(model, example_args, example_kwargs)
    else:
        raise TraceError(f"unknown trace method {method!r}; use 'export' or 'symbolic'")
    gm.meta[meta.TRACE_KEY] = {
        "method": method,
        "model_class": type(model).__module__ + "." + type(model).__qualname__,
    }
    return gm


# --------------------------------------------------------------------------- torch.export


def trace_meta(
    model: nn.Module,
    example_args: tuple = (),
    example_kwargs: dict[str, Any] | None = None,
    *,
    device: torch.device | str = "cpu",
    dynamic: bool = True,
    spares: list[fx.GraphModule] | None = None,
) -> fx.GraphModule:
    """:func:`trace` (export) of a model whose ``meta`` tensors stand for tensors on ``device``.

    Tracing the meta tensors themselves would bake ``device="meta"`` into every tensor the
    model creates in forward (positions, masks), so they are traced as fake tensors on
    ``device`` instead; the GraphModule holds those fakes until real values are put in their
    place (:class:`graphlora.passes.load_checkpoint.LoadCheckpointPass`). Real tensors of the
    model are traced as they are.
    """
    if not isinstance(example_args, tuple):
        example_args = (example_args,)
    gm = _trace_export(model, example_args, dict(example_kwargs or {}), dynamic, spares, device=device)
    gm.meta[meta.TRACE_KEY] = {
        "method": "export",
        "model_class": type(model).__module__ + "." + type(model).__qualname__,
    }
    return gm


def _trace_export(model: nn.Module, args: tuple, kwargs: dict, dynamic: bool,
                  spares: list[fx.GraphModule] | None = None,
                  device: torch.device | str | None = None) -> fx.GraphModule:
    if not args and not kwargs:
        raise TraceError(
            f"tracing {type(model).__name__} with torch.export needs example inputs: pass "
            "example_args=(...) or example_kwargs={...}, or use method='symbolic'"
        )
    signature = ForwardSignature.of(model)
    if signature.binds:
        bound = signature.bind(args, kwargs, what="the example inputs")
        given = signature.bind(args, kwargs, what="the example inputs", defaults=False)
        form = signature.form(bound, positional_count=len(args), given=given, keyword_order=list(kwargs))
    else:  # *args forwards: trace the example as it is given
        bound = {f"*{i}": a for i, a in enumerate(args)} | dict(kwargs)
        form = CallForm(tuple(f"*{i}" for i in range(len(args))), tuple(kwargs))
    with _eval_mode(model), _meta_as_fake(model, device) as factory:
        gm = export_call(model, bound, form, dynamic=dynamic, check_eagerly=factory is None,
                         factory=factory, spares=spares)
    gm.meta[meta.STATE_KEYS_KEY] = list(model.state_dict().keys())
    return gm


def export_call(
    model: nn.Module,
    bound: dict[str, Any],
    form: CallForm,
    *,
    dynamic: bool = True,
    factory=None,
    check_eagerly: bool = False,
    spares: list[fx.GraphModule] | None = None,
) -> fx.GraphModule:
    """Export ``model`` for the call ``bound`` (called as ``form`` arranges it).

    The example is a stand-in for the call (:func:`graphlora.signature.example_inputs`): sizes 0
    and 1 are replaced so that they stay symbolic, and sizes are traced "size-oblivious" (a
    symbolic size may be 0 or 1 at run time unless the model branches on it). When the graph
    does not accept the call itself (the model needs a size to be 1), the call's exact sizes are
    traced instead; when dynamic sizes cannot be traced at all, static ones with a warning.
    ``check_eagerly``: on failure, run ``model`` on the call to tell bad inputs from a tracer
    problem (only for a model with real tensors). ``spares`` collects the dynamic traces that
    did not accept the call: they serve its structure at other sizes (tensors moved to meta).
    """
    remaps = any(int(n) <= 1 for t in _tensors_of(bound) for n in t.shape)
    plans = [(True, True)] + ([(False, True)] if remaps else []) + [(False, False)] if dynamic else [(False, False)]
    if form.state and dynamic:
        # a call with a KV cache: attention branches on "one query or many" (decode or prefill),
        # and a mask's broadcast dimension of 1 must stay 1, so sizes of 1 are the call's own
        # and the others dynamic, not size-oblivious (a batch of 1 gets graphs of its own)
        plans = [(False, True), (False, False)]
    errors: list[str] = []
    export_errors: list[str] = []
    actual_args, actual_kwargs = form.arrange(bound)
    for remap, use_dynamic in plans:
        args, kwargs = form.arrange(example_inputs(bound, remap=remap, factory=factory))
        oblivious = _size_oblivious() if not form.state else _quiet_specialization()
        try:
            with _traced_forward(model, form), oblivious:
                shapes = auto_dynamic_shapes(model.forward, args, kwargs) if use_dynamic else None
                exported = torch.export.export(model, args, kwargs, dynamic_shapes=shapes, strict=False)
        except Exception as exc:  # torch raises many unrelated types here
            export_errors.append(f"{type(exc).__name__}: {_first_line(exc)}")
            errors.append(export_errors[-1])
            if not use_dynamic:
                if check_eagerly:
                    _raise_if_inputs_do_not_fit(model, actual_args, actual_kwargs)
                raise TraceError(_export_failure_message(model, export_errors)) from exc
            continue
        gm = exported.module()
        gm.meta[meta.RANGES_KEY] = _ranges(exported)
        problem = guard_failure(gm, actual_args, actual_kwargs)
        if problem is not None:
            errors.append(f"the graph traced does not accept the call: {problem}")
            if use_dynamic:
                if spares is not None:
                    spares.append(_spare(gm, form, bound))
                continue
            raise TraceError(f"torch.export traced {type(model).__name__}, but the graph does not "
                             f"accept the example it was traced with: {problem}")
        if dynamic and not use_dynamic:
            warnings.warn(
                f"{type(model).__name__} could not be traced with dynamic shapes ({export_errors[0]}); "
                "traced with static shapes, so inputs must have the example's shapes",
                stacklevel=4,
            )
        _freeze_parameters(gm)
        gm.meta[meta.CALL_FORM_KEY] = form
        gm.meta[meta.CALL_KEY] = call_key(bound)
        gm.meta[meta.DYNAMIC_KEY] = use_dynamic
        return gm
    raise TraceError(_export_failure_message(model, errors))  # pragma: no cover - the static plan ends the loop


def _spare(gm: fx.GraphModule, form: CallForm, bound: dict[str, Any]) -> fx.GraphModule:
    """A trace kept for other sizes: its real tensors replaced by meta ones (bound before use)."""
    from torch._subclasses.fake_tensor import is_fake

    for module in gm.modules():
        for table in (module._parameters, module._buffers):
            for name, t in list(table.items()):
                if t is not None and not is_fake(t):
                    meta_t = torch.empty_like(t, device="meta")
                    table[name] = nn.Parameter(meta_t, requires_grad=False) if isinstance(t, nn.Parameter) else meta_t
    gm.meta[meta.CALL_FORM_KEY] = form
    gm.meta[meta.CALL_KEY] = call_key(bound)
    return gm


def _tensors_of(bound: dict[str, Any]) -> list[torch.Tensor]:
    import torch.utils._pytree as pytree

    return [t for t in pytree.tree_leaves(list(bound.values())) if isinstance(t, torch.Tensor)]


def _ranges(exported) -> dict[str, tuple[int, int | None]]:
    """``symbol -> (low, high)`` of the graph's symbolic sizes (high None: unbounded)."""
    import sympy

    def finite(value) -> int | None:
        return int(value) if isinstance(value, (int, sympy.Integer)) else None

    return {str(symbol): (finite(b.lower) or 0, finite(b.upper)) for symbol, b in exported.range_constraints.items()}


@contextlib.contextmanager
def _traced_forward(model: nn.Module, form: CallForm):
    """While tracing, give ``model.forward`` the signature of the graph to make: the form's
    baked values passed by the function itself (``use_cache=False`` without making it an input),
    and each keyword that arrives through ``**kwargs`` (``num_items_in_batch``,
    ``output_hidden_states``) named (torch.export mismatches dynamic-shape specs of ``**kwargs``
    entries). The module, and so every module path, stays the same."""
    try:
        signature = inspect.signature(model.forward)
    except (TypeError, ValueError):
        signature = None
    baked = dict(form.baked)
    state = dict(form.state)
    params = list(signature.parameters.values()) if signature is not None else []
    var_keyword = any(p.kind is p.VAR_KEYWORD for p in params)
    extra = [n for n in form.keywords if n not in signature.parameters] if var_keyword else []
    if not extra and not baked and not state:
        yield
        return
    original = model.forward
    had_own = "forward" in model.__dict__

    def forward(*args, **kwargs):
        if not state:
            return original(*args, **kwargs, **baked)
        # a KV cache arrives as its tensors: the model gets a cache object around them and the
        # graph returns no object (see graphlora.kv_cache)
        kwargs = {k: state[k].rebuild(v) if k in state else v for k, v in kwargs.items()}
        return kv_cache.strip(original(*args, **kwargs, **baked))

    kept = [p for p in params if p.name not in baked and (p.kind is not p.VAR_KEYWORD or not extra)]
    if extra:
        kept += [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY) for n in extra]
    forward.__signature__ = signature.replace(parameters=_ordered(kept))
    model.forward = forward
    try:
        yield
    finally:
        if had_own:
            model.forward = original
        else:
            del model.forward


def _ordered(params: list[inspect.Parameter]) -> list[inspect.Parameter]:
    """Parameters in the order a signature requires (keyword-only after positional, ``**`` last)."""
    return sorted(params, key=lambda p: p.kind)


@contextlib.contextmanager
def _size_oblivious():
    """Trace sizes "size-oblivious": a symbolic size is not assumed to be >= 2, so a graph traced
    with a batch of 3 also runs a batch of 1 (unless the model itself branches on the size)."""
    from torch.fx.experimental import _config as fx_config

    with fx_config.patch(backed_size_oblivious=True):
        yield


@contextlib.contextmanager
def _quiet_specialization():
    """torch.export logs every dimension of 1 it keeps static; for a KV-cache call those are
    expected (one query, one mask head), so the log stays quiet."""
    import logging

    logger = logging.getLogger("torch._export.non_strict_utils")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def structure_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model``'s module tree with every parameter and buffer on the ``meta`` device.

    It holds no weights (an 8B model's copy costs kilobytes), so a model whose float weights a
    transform freed can still be traced for a new call (:func:`trace_structure`). The copy shares
    the original's ``config`` object.
    """
    memo: dict[int, Any] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)
    for b in model.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    config = getattr(model, "config", None)
    if config is not None:
        memo[id(config)] = config
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return copy.deepcopy(model, memo)


def trace_structure(
    template: nn.Module,
    bound: dict[str, Any],
    form: CallForm,
    *,
    like=None,
    device: torch.device | str = "cpu",
    dynamic: bool = True,
    spares: list[fx.GraphModule] | None = None,
) -> fx.GraphModule:
    """Trace a :func:`structure_copy` for the call ``bound`` without touching a real tensor.

    Parameters and buffers become fake tensors for the trace: the dtype and device of
    ``like(name)`` (the tensor that will be bound in their place) when it gives one, else the
    template's dtype on ``device``. The example inputs are fakes of the call's tensors. The
    GraphModule returned holds fake tensors: bind real ones before running it. ``spares`` as
    for :func:`export_call`.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    names: dict[int, str] = {}
    for name, t in list(template.named_parameters(remove_duplicate=False)) + list(
        template.named_buffers(remove_duplicate=False)
    ):
        names.setdefault(id(t), name)
    fakes: dict[int, torch.Tensor] = {}
    with mode:
        for module in template.modules():
            for table in (module._parameters, module._buffers):
                for t in table.values():
                    if t is None or id(t) in fakes:
                        continue
                    real = like(names[id(t)]) if like is not None else None
                    dtype = real.dtype if real is not None else t.dtype
                    where = real.device if real is not None else torch.device(device)
                    fake = torch.empty(t.shape, dtype=dtype, device=where)
                    fakes[id(t)] = nn.Parameter(fake, requires_grad=False) if isinstance(t, nn.Parameter) else fake

    def factory(shape, dtype, device):
        with mode:
            return torch.empty(shape, dtype=dtype, device=device)

    with _swapped_tensors(template, fakes), _eval_mode(template):
        gm = export_call(template, bound, form, dynamic=dynamic, factory=factory, spares=spares)
    gm.meta[meta.STATE_KEYS_KEY] = list(template.state_dict().keys())
    gm.meta[meta.TRACE_KEY] = {
        "method": "export",
        "model_class": type(template).__module__ + "." + type(template).__qualname__,
    }
    return gm


@contextlib.contextmanager
def _meta_as_fake(model: nn.Module, device: torch.device | str | None):
    """While the block runs, the model's meta tensors are fakes on ``device``; yields the factory
    of example inputs in the same fake mode (None, and nothing swapped, without meta tensors)."""
    metas = [t for m in model.modules() for table in (m._parameters, m._buffers) for t in table.values()
             if t is not None and t.device.type == "meta"]
    if device is None or not metas:
        yield None
        return
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fakes: dict[int, torch.Tensor] = {}
    with mode:
        for t in metas:
            if id(t) not in fakes:
                fake = torch.empty(t.shape, dtype=t.dtype, device=torch.device(device))
                fakes[id(t)] = nn.Parameter(fake, requires_grad=False) if isinstance(t, nn.Parameter) else fake

    def factory(shape, dtype, device):
        with mode:
            return torch.empty(shape, dtype=dtype, device=device)

    with _swapped_tensors(model, fakes):
        yield factory


@contextlib.contextmanager
def _swapped_tensors(module: nn.Module, replacement: dict[int, torch.Tensor]):
    """Put ``replacement[id(t)]`` in place of every parameter and buffer ``t`` while the block runs."""
    saved = []
    for m in module.modules():
        for table in (m._parameters, m._buffers):
            for name, t in list(table.items()):
                if t is not None and id(t) in replacement:
                    saved.append((table, name, t))
                    table[name] = replacement[id(t)]
    try:
        yield
    finally:
        for table, name, t in saved:
            table[name] = t


def _raise_if_inputs_do_not_fit(model: nn.Module, args: tuple, kwargs: dict) -> None:
    """Tell "your inputs are wrong" from "the tracer failed": run the model eagerly once.

    Only called after tracing failed, so the cost is paid on the error path alone (and a model
    on the meta device runs on fake data, allocating nothing).
    """
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    except Exception as exc:
        raise InputError(
            f"the example inputs do not fit {type(model).__name__}: running it on them raised "
            f"{type(exc).__name__}: {_first_line(exc)}"
        ) from exc


def auto_dynamic_shapes(forward, args: tuple, kwargs: dict, *, static_float_features: bool = False):
    """``Dim.AUTO`` for every dimension of every tensor input, keyed by parameter name.

    ``static_float_features`` keeps the last dimension of float inputs static (a feature
    dimension, which ONNX consumers expect fixed). None when the inputs do not bind to
    ``forward``'s signature.
    """
    from torch.export import Dim

    def spec(value):
        if isinstance(value, torch.Tensor):
            dims = range(value.dim())
            if static_float_features and value.is_floating_point():
                dims = range(value.dim() - 1)
            return {i: Dim.AUTO for i in dims} or None
        if isinstance(value, (list, tuple)):
            return type(value)(spec(v) for v in value)
        if isinstance(value, dict):
            return {k: spec(v) for k, v in value.items()}
        return None

    try:
        bound = inspect.signature(forward).bind(*args, **kwargs)
    except (TypeError, ValueError):
        return None
    return {name: spec(value) for name, value in bound.arguments.items()}


def _export_failure_message(model: nn.Module, errors: list[str]) -> str:
    name = type(model).__name__
    hints = ["check that the example inputs are what forward() expects"]
    if hasattr(model, "config") and getattr(model.config, "use_cache", False):
        hints.insert(0, "pass use_cache=False in example_kwargs (decoder models)")
    hints.append("or try method='symbolic' (torch.fx.symbolic_trace)")
    return (
        f"torch.export could not trace {name}: {errors[-1]}. Suggestions: " + "; ".join(hints)
    )


# --------------------------------------------------------------------------- symbolic_trace


def _trace_symbolic(model: nn.Module, args: tuple, kwargs: dict) -> fx.GraphModule:
    clone = _structural_copy(model)
    clone.eval()
    try:
        gm = fx.symbolic_trace(clone)
    except Exception as exc:
        raise TraceError(
            f"torch.fx.symbolic_trace could not trace {type(model).__name__}: "
            f"{type(exc).__name__}: {_first_line(exc)}. Suggestion: use method='export' with "
            "example inputs (it handles data-dependent Python control flow and transformers models)"
        ) from exc
    gm.train(model.training)
    _freeze_parameters(gm)
    gm.meta[meta.STATE_KEYS_KEY] = list(model.state_dict().keys())
    functionalize_linear_modules(gm)
    if args or kwargs:
        _propagate_example_shapes(gm, args, kwargs)
    return gm


def _structural_copy(model: nn.Module) -> nn.Module:
    """Deep-copy the module tree while sharing (not copying) parameter and buffer storage."""
    memo: dict[int, Any] = {}
    for p in model.parameters(recurse=True):
        memo[id(p)] = nn.Parameter(p.detach(), requires_grad=False)
    for b in model.buffers(recurse=True):
        memo[id(b)] = b.detach()
    return copy.deepcopy(model, memo)


def _propagate_example_shapes(gm: fx.GraphModule, args: tuple, kwargs: dict) -> None:
    """Record fake-tensor shapes in ``node.meta["val"]`` so symbolic graphs print shapes too."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    flat = list(args) + [kwargs[n.target] for n in placeholders[len(args):] if n.target in kwargs]
    if len(flat) != len(placeholders):
        return
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    try:
        fake_inputs = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in flat]
        FakeTensorProp(gm, mode).propagate_dont_convert_inputs(*fake_inputs)
    except Exception as exc:
        raise InputError(
            f"example inputs do not fit the symbolically traced {gm.__class__.__name__}: "
            f"{type(exc).__name__}: {_first_line(exc)}"
        ) from exc


# --------------------------------------------------------------------------- shared helpers


def _freeze_parameters(gm: nn.Module) -> None:
    """Give ``gm`` its own frozen Parameter objects (shared storage), keeping ties intact."""
    replacement: dict[int, nn.Parameter] = {}
    for module in gm.modules():
        for name, param in list(module._parameters.items()):
            if param is None:
                continue
            new = replacement.get(id(param))
            if new is None:
                new = nn.Parameter(param.detach(), requires_grad=False)
                replacement[id(param)] = new
            module._parameters[name] = new
        for name, buf in list(module._buffers.items()):
            if buf is not None:
                module._buffers[name] = buf.detach()


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    """Trace in eval mode; graphlora switches dropout per graph node afterwards (see model.py)."""
    states = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in states:
            m.training = training


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
