"""Trace an ``nn.Module`` into a ``torch.fx.GraphModule`` that graphlora passes can rewrite.

``torch.export`` (non-strict) is the default because it traces Hugging Face transformers models
that ``torch.fx.symbolic_trace`` cannot; the graph it gives is ATen-level, carries fake-tensor
shapes in ``node.meta["val"]`` and module paths in ``node.meta["nn_module_stack"]``.

Two properties every caller relies on:

* The original model is never mutated. The traced module gets *new* ``nn.Parameter`` objects that
  share storage with the original (no copy, so an 8B model does not double in memory), frozen.
  Passes replace tensors, they never write into them in place.
* Batch and sequence dimensions stay dynamic by default, so a model traced with a 2 x 8 example
  runs on any batch the user trains with.
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

from graphlora import meta
from graphlora.errors import InputError, TraceError
from graphlora.sites import functionalize_linear_modules

TraceMethod = Literal["export", "symbolic"]


def trace(
    model: nn.Module,
    example_args: tuple = (),
    example_kwargs: dict[str, Any] | None = None,
    *,
    method: TraceMethod = "export",
    dynamic: bool = True,
) -> fx.GraphModule:
    """Trace ``model`` into a GraphModule with frozen parameters sharing the model's storage.

    ``method="export"`` needs example inputs (they may live on the ``meta`` device together with
    the model). ``method="symbolic"`` uses ``torch.fx.symbolic_trace`` and needs none; its linear
    modules are rewritten to ``F.linear`` calls so every pass sees one spelling of a module call.
    With ``dynamic=True`` every tensor dimension of the example inputs is traced as dynamic where
    the model allows it; a model that refuses is traced with static shapes and a warning.
    """
    if not isinstance(model, nn.Module):
        raise TraceError(f"trace() needs a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(example_args, tuple):
        example_args = (example_args,)
    example_kwargs = dict(example_kwargs or {})
    if method == "export":
        gm = _trace_export(model, example_args, example_kwargs, dynamic)
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


def _trace_export(model: nn.Module, args: tuple, kwargs: dict, dynamic: bool) -> fx.GraphModule:
    if not args and not kwargs:
        raise TraceError(
            f"tracing {type(model).__name__} with torch.export needs example inputs: pass "
            "example_args=(...) or example_kwargs={...}, or use method='symbolic'"
        )
    _check_inputs_fit_signature(model, args, kwargs)
    exported = None
    errors: list[str] = []
    with _eval_mode(model):
        attempts = [True, False] if dynamic else [False]
        for use_dynamic in attempts:
            shapes = auto_dynamic_shapes(model.forward, args, kwargs) if use_dynamic else None
            try:
                exported = torch.export.export(
                    model, args, kwargs, dynamic_shapes=shapes, strict=False
                )
                break
            except Exception as exc:  # torch raises many unrelated types here
                errors.append(f"{type(exc).__name__}: {_first_line(exc)}")
                if not use_dynamic:
                    _raise_if_inputs_do_not_fit(model, args, kwargs)
                    raise TraceError(_export_failure_message(model, errors)) from exc
    if dynamic and len(errors) == 1:
        warnings.warn(
            f"{type(model).__name__} could not be traced with dynamic shapes ({errors[0]}); "
            "traced with static shapes, so inputs must have the example's shapes",
            stacklevel=3,
        )
    gm = exported.module()
    _freeze_parameters(gm)
    gm.meta[meta.STATE_KEYS_KEY] = list(model.state_dict().keys())
    gm.meta[meta.CALL_SPEC_KEY] = CallSpec.from_example(model, args, kwargs)
    gm.meta[meta.DYNAMIC_KEY] = dynamic and len(errors) == 0
    return gm


def _check_inputs_fit_signature(model: nn.Module, args: tuple, kwargs: dict) -> None:
    try:
        sig = inspect.signature(model.forward)
    except (TypeError, ValueError):  # builtins without a signature: let export decide
        return
    try:
        sig.bind(*args, **kwargs)
    except TypeError as exc:
        raise InputError(
            f"example inputs do not fit {type(model).__name__}.forward{sig}: {exc}"
        ) from None


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


class CallSpec:
    """How the traced graph must be called, and how to get there from a natural call.

    ``torch.export`` fixes the call structure: arguments passed positionally at trace time must be
    positional, keyword ones keywords, and non-tensor values (``use_cache=False``) are baked in.
    Users call models both ways, so a call is re-bound to the model's own signature and re-shaped
    into the traced structure; baked-in constants may be omitted and are checked when given.
    """

    def __init__(
        self,
        signature: inspect.Signature | None,
        positional: list[str],
        keywords: list[str],
        constants: dict[str, Any],
        tensors: dict[str, tuple[torch.dtype, tuple[int, ...]]] | None = None,
    ):
        self.signature = signature
        self.positional = positional
        self.keywords = keywords
        self.constants = constants
        #: dtype and shape of every tensor input of the example, by argument name (``#i`` for
        #: positional arguments without a name): calls are checked against them.
        self.tensors = dict(tensors or {})

    @classmethod
    def from_example(cls, model: nn.Module, args: tuple, kwargs: dict) -> "CallSpec":
        try:
            sig = inspect.signature(model.forward)
        except (TypeError, ValueError):
            sig = None
        names = [
            p.name
            for p in (sig.parameters.values() if sig else [])
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
        positional = names[: len(args)] if len(names) >= len(args) else []
        constants = {k: v for k, v in kwargs.items() if isinstance(v, (bool, int, float, str, type(None)))}
        tensors = {
            name: (value.dtype, tuple(value.shape))
            for name, value in [*_arg_names(args, positional), *kwargs.items()]
            if isinstance(value, torch.Tensor)
        }
        return cls(sig, positional, list(kwargs), constants, tensors)

    def check(self, args: tuple, kwargs: dict) -> None:
        """Refuse a call whose tensor inputs are not tensors, or not of the traced rank (both
        would fail deep inside the graph with an IndexError or AttributeError)."""
        for name, value in [*_arg_names(args, self.positional), *kwargs.items()]:
            traced = self.tensors.get(name)
            if traced is None:
                continue
            dtype, shape = traced
            what = f"a {_dtype(dtype)} tensor of shape {list(shape)}"
            if not isinstance(value, torch.Tensor):
                raise InputError(
                    f"argument {name} must be a torch.Tensor (the graph was traced with {what}), got "
                    f"{type(value).__name__}; convert it, e.g. torch.as_tensor(...)"
                )
            if value.dim() != len(shape):
                raise InputError(
                    f"argument {name} has {value.dim()} dimension(s), shape {list(value.shape)}; the graph "
                    f"was traced with {what}, and a traced graph keeps the rank of every input"
                )

    def explain_failure(self, args: tuple, kwargs: dict) -> InputError | None:
        """After the graph failed on a call: an InputError naming a tensor input whose dtype
        differs from the traced one (the likely cause), or None."""
        for name, value in [*_arg_names(args, self.positional), *kwargs.items()]:
            traced = self.tensors.get(name)
            if traced is not None and isinstance(value, torch.Tensor) and value.dtype != traced[0]:
                return InputError(
                    f"argument {name} is {_dtype(value.dtype)} but the graph was traced with "
                    f"{_dtype(traced[0])}, and running it failed; cast the input "
                    f"(e.g. x.to(torch.{_dtype(traced[0])})) or trace with an example of this dtype"
                )
        return None

    def normalize(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        for name, traced in self.constants.items():
            given = kwargs.get(name, traced)
            if given != traced:
                raise InputError(
                    f"{name}={given!r} differs from the value the graph was traced with "
                    f"({name}={traced!r}); Python constants are fixed at trace time: transform "
                    f"again with example_kwargs={{..., {name!r}: {given!r}}}"
                )
        if self.signature is None or (
            len(args) == len(self.positional) and set(kwargs) <= set(self.keywords)
        ):
            merged = {**self.constants, **kwargs}
            self.check(args, kwargs)
            return args, {k: merged[k] for k in self.keywords if k in merged}
        try:
            bound = self.signature.bind(*args, **kwargs).arguments
        except TypeError as exc:
            raise InputError(f"the inputs do not fit the model's forward{self.signature}: {exc}") from None
        extra = sorted(set(bound) - set(self.positional) - set(self.keywords))
        if extra:
            raise InputError(
                f"argument(s) {', '.join(extra)} were not given when the graph was traced; "
                "transform again with example inputs that include them"
            )
        missing = [n for n in self.positional if n not in bound]
        if missing:
            raise InputError(f"missing argument(s) {', '.join(missing)} the graph was traced with")
        new_args = tuple(bound[n] for n in self.positional)
        new_kwargs = {}
        for k in self.keywords:
            if k in bound:
                new_kwargs[k] = bound[k]
            elif k in self.constants:
                new_kwargs[k] = self.constants[k]
        self.check(new_args, new_kwargs)
        return new_args, new_kwargs


def _arg_names(args: tuple, names: list[str]) -> list[tuple[str, Any]]:
    return [(names[i] if i < len(names) else f"#{i}", value) for i, value in enumerate(args)]


def _dtype(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def accept_natural_calls(gm: fx.GraphModule) -> fx.GraphModule:
    """Let ``gm`` be called like the model it was traced from: every call goes through its
    :class:`CallSpec` (a forward pre-hook), so ``merged(ids)`` works for a graph traced with
    ``use_cache=False`` and keywords may be given positionally and vice versa. Graphs without a
    call spec (symbolic traces) are left as they are."""
    if gm.meta.get(meta.CALL_SPEC_KEY) is not None:
        gm.register_forward_pre_hook(_normalize_call, with_kwargs=True)
    return gm


def _normalize_call(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    return module.meta[meta.CALL_SPEC_KEY].normalize(args, kwargs)


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
