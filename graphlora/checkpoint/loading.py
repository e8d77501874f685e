"""Loading a PEFT LoRA adapter (saved by graphlora or by PEFT itself) into a LoraModel, or into a
plain module, which is traced first.

Everything is checked before the model changes — the files, that every target is a linear layer
of this model, every factor's shape — so a bad adapter leaves the model as it was.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from graphlora import meta
from graphlora.adapters import DEFAULT_ADAPTER, LoraSpec, factor_shapes
from graphlora.checkpoint.adapter_state import set_active
from graphlora.checkpoint.layout import is_weights_file, resolve_adapter_dir
from graphlora.dora import MAGNITUDE
from graphlora.errors import AdapterError, InputError
from graphlora.io.peft_config import ADAPTER_CONFIG_NAME
from graphlora.io.peft_format import (PEFT_KEY_PREFIX, LoraAdapter, check_adapter_shapes, lora_keys, parameter_owner,
                                      read_adapter)
from graphlora.io.peft_keys import wrapper_paths
from graphlora.model import LoraModel
from graphlora.passes.insert_lora import param_features
from graphlora.pipeline import transform
from graphlora.sites import LinearSite, find_sites, tagged_sites
from graphlora.trace import TraceMethod
from graphlora.validate import check_adapter_name

__all__ = ["load_adapter"]


def load_adapter(
    model: LoraModel | nn.Module,
    adapter_dir: str | os.PathLike[str],
    *,
    adapter_name: str = DEFAULT_ADAPTER,
    example_args: tuple | None = None,
    example_kwargs: dict[str, Any] | None = None,
    method: TraceMethod = "export",
    subfolder: str | None = None,
    activate: bool | None = None,
    allow_pickle: bool = False,
    autocast_adapter_dtype: bool = True,
) -> LoraModel:
    """Load a PEFT LoRA adapter (saved by graphlora or PEFT) as ``adapter_name``; return the model.

    ``model`` is a :class:`LoraModel` (changed in place and returned) or a plain ``nn.Module``,
    which is traced with ``example_args``/``example_kwargs`` (required then) and gets LoRA on
    exactly the adapter's target modules, with its ranks and alphas. Target modules may be any
    linear layer of the graph, also ones no rule of the LoraModel matched. An existing adapter of
    the same name is replaced. ``activate``: ``None`` activates the loaded adapter when the model
    had none active or it replaces an active one (PEFT's ``load_adapter`` leaves others active),
    ``True``/``False`` force it. ``autocast_adapter_dtype`` (PEFT's option): on a
    float16/bfloat16 base the factors are float32 (the file's values cast to them), as PEFT's
    ``PeftModel.from_pretrained`` loads them by default; ``False`` keeps the base's dtype.

    Everything is checked before the model changes: the adapter name, the files
    (:func:`read_adapter`: missing files, ``peft_type``, DoRA and other variants, corrupt,
    non-finite or non-float weights), that every target is a linear layer of the model, and every
    factor's shape (the first offending keys with expected shapes). A legacy pickled
    ``adapter_model.bin`` is only read with ``allow_pickle=True`` (docs/security.md).
    """
    check_adapter_name(adapter_name)
    path = resolve_adapter_dir(adapter_dir, adapter_name, subfolder)
    _refuse_model_checkpoint(path)
    adapter = read_adapter(path, allow_pickle=allow_pickle)
    if not isinstance(model, LoraModel):
        model = _trace_for_adapter(model, example_args, example_kwargs, method, path)
        activate = True if activate is None else activate
    sites = _sites_by_path(model)
    adapter = _name_parameters(adapter, model, path)
    _check_fit(adapter, sites, path)
    _install(model, adapter, adapter_name, sites, activate, autocast_adapter_dtype)
    return model


def _refuse_model_checkpoint(path: Path) -> None:
    """A merged save (or any model checkpoint) is not an adapter: say so instead of "file missing"."""
    if (path / ADAPTER_CONFIG_NAME).is_file() or not path.is_dir():
        return
    weights = sorted(name for name in os.listdir(path) if is_weights_file(name))
    if weights:
        raise AdapterError(
            f"{path} holds a full model checkpoint ({weights[0]}) but no {ADAPTER_CONFIG_NAME}: it is "
            "not an adapter (a merged save has the LoRA folded into its weights). Load it with "
            "from_pretrained / load_state_dict (graphlora.load_quantized for a keep_quantized save), "
            "or point load_adapter at an adapter directory"
        )


def _trace_for_adapter(
    model: nn.Module,
    example_args: tuple | None,
    example_kwargs: dict[str, Any] | None,
    method: TraceMethod,
    path: Path,
) -> LoraModel:
    """A LoraModel without adapters for a plain module; LoRA goes on the adapter's targets next."""
    if not isinstance(model, nn.Module):
        raise InputError(
            f"load_adapter() needs a LoraModel or a torch.nn.Module, got {type(model).__name__}"
        )
    if example_args is None and example_kwargs is None and method == "export":
        raise InputError(
            f"load_adapter({type(model).__name__}, {str(path)!r}): a plain model must be traced before "
            "LoRA can be added, and tracing needs example inputs. Pass example_args=(...) and/or "
            "example_kwargs={...} as you would to graphlora.transform(), or transform() the model "
            "first and load the adapter into the LoraModel"
        )
    return transform(model, [], tuple(example_args or ()), dict(example_kwargs or {}), method=method)


def _sites_by_path(model: LoraModel) -> dict[str, list[LinearSite]]:
    """Every linear site of the graph by module path: the tagged ones (a rule matched them), then
    the untagged ones, which a loaded adapter may also target."""
    gm = model.graph_module
    by_path: dict[str, list[LinearSite]] = {}
    for site in tagged_sites(gm):
        by_path.setdefault(site.module_path, []).append(site)
    tagged = set(by_path)
    for site in find_sites(gm):
        if site.module_path not in tagged and meta.role(site.node) is None:
            by_path.setdefault(site.module_path, []).append(site)
    return by_path


def _name_parameters(adapter: LoraAdapter, model: LoraModel, path: Path) -> LoraAdapter:
    """The adapter with each ``target_parameters`` module named by its parameter
    (``<module>.<param>``, the experts site's path) instead of PEFT's wrapper path."""
    wrapped = {p: m for p, m in adapter.modules.items() if m.peft_path}
    if not wrapped:
        return adapter
    targets = adapter.config.get("target_parameters") or []
    names: dict[str, str] = {}  # PEFT's key path -> the parameter's path
    for owner in dict.fromkeys(parameter_owner(p) for p in wrapped):
        try:
            order = list(model.graph_module.get_submodule(owner)._parameters)
        except AttributeError:
            raise AdapterError(f"adapter {str(path)!r}: target_parameters module {owner!r} is not a module "
                               "of this model") from None
        targeted = [n for n in order if any(f"{owner}.{n}" == t or f"{owner}.{n}".endswith("." + t) for t in targets)]
        names.update({key_path: f"{owner}.{name}" for name, key_path in wrapper_paths(owner, targeted).items()})
    modules = {}
    for p, m in adapter.modules.items():
        if m.peft_path:
            if p not in names:
                owner = parameter_owner(p)
                raise AdapterError(f"adapter {str(path)!r}: keys under {p!r} wrap more parameters of {owner!r} "
                                   f"than target_parameters selects ({targets})")
            p = names[p]
            m = dataclasses.replace(m, path=p)
        modules[p] = m
    return dataclasses.replace(adapter, modules=modules)


def _check_fit(adapter: LoraAdapter, sites: Mapping[str, list[LinearSite]], path: Path) -> None:
    """Every adapter module must be a site of the graph, of the kind its factors are for, with the
    factor shapes PEFT would build for it (:func:`graphlora.adapters.factor_shapes`)."""
    unknown = [p for p in adapter.modules if p not in sites]
    if unknown:
        raise AdapterError(
            f"adapter {str(path)!r} targets {len(unknown)} module(s) that are not sites of this model "
            f"(its linear layers, embeddings, convolutions, experts, einsums): "
            f"{', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}"
            f"{_suggestion(unknown[0], sites)}. Was it trained on a different model?"
        )
    expected = {p: factor_shapes(m.rank, *param_features(sites[p][0]), sites[p][0].spec.conv,
                                 sites[p][0].spec.num_experts)
                for p, m in adapter.modules.items()}
    for p, m in adapter.modules.items():
        kind = sites[p][0].spec.site_kind
        if m.embedding != (kind == "embedding"):
            held = "an embedding's factors (lora_embedding_A/B)" if m.embedding else "lora_A/lora_B"
            raise AdapterError(f"adapter {str(path)!r} holds {held} for {p!r}, which is a site of kind {kind!r} "
                               "in this model (PEFT writes lora_embedding_A/B for embeddings only)")
    check_adapter_shapes(adapter, expected)
    for p, table in adapter.embedding_tables.items():
        weight = sites[p][0].param_value()
        if tuple(table.shape) != tuple(weight.shape) or not torch.equal(table.to(weight.dtype), weight):
            raise AdapterError(
                f"adapter {str(path)!r} carries its own weight for the embedding {p!r} "
                f"({PEFT_KEY_PREFIX}{p}.base_layer.weight, {list(table.shape)}) and it differs from the "
                f"model's {list(weight.shape)}: PEFT would overwrite the model's embedding with it (a resized "
                "or trained vocabulary). graphlora never changes a base weight on load; load the adapter "
                "into the model it was trained on")


def _suggestion(path: str, sites: Mapping[str, Any]) -> str:
    close = difflib.get_close_matches(path, list(sites), n=1, cutoff=0.6)
    if close:
        return f" (closest site: {close[0]!r})"
    examples = ", ".join(list(sites)[:3])
    return f" (its sites are e.g. {examples})" if examples else " (it has no sites)"


def _install(
    model: LoraModel,
    adapter: LoraAdapter,
    name: str,
    sites: Mapping[str, list[LinearSite]],
    activate: bool | None,
    autocast_dtype: bool = True,
) -> None:
    """Create the adapter on the model (tagging untagged sites first) and copy its weights in."""
    specs = {
        p: LoraSpec(rank=m.rank, alpha=float(m.alpha), dropout=adapter.lora_dropout, use_rslora=m.use_rslora,
                    autocast_dtype=autocast_dtype, use_dora=m.magnitude is not None)
        for p, m in adapter.modules.items()
    }
    previous = model.active_adapters
    if name in model.adapters:
        model.delete_adapter(name)
    model.add_adapter(name, specs)
    try:
        weights = {}
        for p, m in adapter.modules.items():
            a_key, b_key = lora_keys(p)
            weights[a_key], weights[b_key] = m.lora_A, m.lora_B
            if m.magnitude is not None:
                weights[f"{p}.{MAGNITUDE}.weight"] = m.magnitude
        model.load_lora_state_dict(weights, adapter=name)
    except BaseException:
        model.delete_adapter(name)
        raise
    set_active(model, _next_active(previous, name, activate))


def _next_active(previous: list[str], name: str, activate: bool | None) -> list[str]:
    """Active adapters after loading ``name``: like PEFT's ``set_adapter(name)`` when activating
    a new one, the previous set otherwise (minus ``name`` when told not to activate it)."""
    if activate is None:
        activate = name in previous or not previous
    if not activate:
        return [a for a in previous if a != name]
    return previous if name in previous else [name]
