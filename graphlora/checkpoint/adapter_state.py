"""A LoraModel's adapters as checkpoint content: which adapter a save writes to which
subdirectory, the PEFT modules and config options each one becomes, and switching the active
adapters around a save or a load.

PEFT's format has one ``use_rslora`` and one ``lora_dropout`` per adapter where graphlora rules
may set them per module, and it can only target modules: the payload keeps every module's exact
scale and reports what PEFT cannot represent.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from graphlora.adapters import DEFAULT_ADAPTER, LoraSpec, initial_factors
from graphlora.dora import MAGNITUDE
from graphlora.errors import AdapterError, GraphloraWarning, InputError
from graphlora.graph_utils import is_own
from graphlora.io.peft_config import most_common
from graphlora.io.peft_format import LoraModule, lora_keys
from graphlora.io.peft_keys import wrapper_paths
from graphlora.lora_init import is_base_init
from graphlora.model import LoraModel
from graphlora.scaling import alpha_for_scale
from graphlora.sites import tagged_sites

__all__ = ["active_as", "adapter_layout", "adapter_payload", "set_active"]


def adapter_layout(
    model: LoraModel, adapter_name: str | None = None, selected_adapters: Sequence[str] | None = None
) -> dict[str, str]:
    """Adapter name -> subdirectory ("" = the adapter directory itself) for a save.

    One adapter (``adapter_name``, else the active one) goes to the top. ``selected_adapters``
    follows PEFT's ``save_pretrained(selected_adapters=...)``: ``"default"`` at the top, every
    other adapter in a subdirectory of its own name.
    """
    known = model.adapters
    if selected_adapters is not None:
        names = [selected_adapters] if isinstance(selected_adapters, str) else list(selected_adapters)
        if not names:
            raise InputError("selected_adapters is empty; name at least one adapter")
        for name in names:
            _check_adapter_name(name, known)
        return {name: "" if name == DEFAULT_ADAPTER else name for name in dict.fromkeys(names)}
    if adapter_name is not None:
        _check_adapter_name(adapter_name, known)
        return {adapter_name: ""}
    active = model.active_adapters
    if len(active) > 1:
        raise AdapterError(
            f"{len(active)} adapters are active ({', '.join(active)}); a PEFT adapter file holds one. "
            "Pass adapter_name='...' to save one, or selected_adapters=[...] to save several"
        )
    if not known:
        raise AdapterError("this model has no LoRA adapter to save; use a LoRA rule in transform()")
    name = active[0] if active else (DEFAULT_ADAPTER if DEFAULT_ADAPTER in known else next(iter(known)))
    return {name: ""}


def _check_adapter_name(name: str, known: Mapping[str, Any]) -> None:
    if name not in known:
        raise AdapterError(f"unknown adapter {name!r}; this model has {sorted(known)}")
    # a known adapter's name passed graphlora.validate.check_adapter_name when it was created,
    # which keeps it a valid directory name


def adapter_payload(model: LoraModel, name: str, *, on_original_base: bool = False
                    ) -> tuple[list[LoraModule], dict[str, Any]]:
    """The PEFT modules of one adapter and the ``write_adapter`` options for it.

    ``on_original_base``: the adapter is saved without a base model, so whoever loads it puts it on
    the *original* model. A site whose init changed the base (PiSSA, OLoRA) is then written as a
    plain LoRA of twice the rank relative to the original weight (PEFT's conversion with
    ``path_initial_model_for_weight_conversion``); LoftQ's base is not the original one plus a
    low-rank term, so such a save is refused.
    """
    specs = model.adapters[name]
    if not specs:
        raise AdapterError(f"adapter {name!r} has no LoRA modules to save")
    weights = model.lora_state_dict(name)
    layouts = {s.module_path: s.fan_in_fan_out for s in model.sites}
    embeddings = {s.module_path for s in model.sites if s.kind == "embedding"}
    num_experts = {s.module_path: s.spec.num_experts for s in tagged_sites(model.graph_module)}
    wrappers = parameter_wrapper_paths(model, [s.module_path for s in model.sites
                                               if s.kind == "experts" and s.module_path in specs])
    use_rslora = most_common([spec.use_rslora for spec in specs.values()])
    modules = []
    for path, spec in specs.items():
        a_key, b_key = lora_keys(path)
        magnitude = weights[f"{path}.{MAGNITUDE}.weight"] if spec.use_dora else None
        rank, alpha, lora_a, lora_b = spec.rank, _peft_alpha(spec, use_rslora), weights[a_key], weights[b_key]
        if spec.share_experts:  # PEFT's layout has a pair per expert: each gets the shared one
            experts = num_experts[path]
            lora_a, lora_b = lora_a.repeat(experts, 1), lora_b.repeat_interleave(experts, dim=1)
        if on_original_base and is_base_init(spec.init):
            rank, lora_a, lora_b = _on_original_base(model, name, path, spec, lora_a, lora_b)
            alpha = alpha_for_scale(spec.scale, rank, use_rslora)
        modules.append(
            LoraModule(
                path=path,
                rank=rank,
                alpha=alpha,
                lora_A=lora_a,
                lora_B=lora_b,
                fan_in_fan_out=layouts.get(path, False),
                use_rslora=use_rslora,
                magnitude=magnitude,
                embedding=path in embeddings,
                peft_path=wrappers.get(path),
            )
        )
    _warn_unloadable_by_peft(model, specs)
    options = dict(
        lora_dropout=_adapter_dropout(name, specs),
        use_rslora=use_rslora,
        base_model_name_or_path=model.source.get("name_or_path"),
        task_type=model.source.get("task_type"),
        module_names=_module_names(model) | set(specs),
    )
    return modules, options


def parameter_wrapper_paths(model: LoraModel, parameters: Sequence[str]) -> dict[str, str]:
    """PEFT's key path for each targeted stacked parameter (``<module>.<param>``): its module,
    plus one ``.base_layer`` per parameter of that module targeted after it (in the module's
    definition order: :func:`graphlora.io.peft_keys.wrapper_paths`)."""
    by_owner: dict[str, list[str]] = {}
    for path in dict.fromkeys(parameters):
        owner, _, name = path.rpartition(".")
        by_owner.setdefault(owner, []).append(name)
    out = {}
    for owner, names in by_owner.items():
        order = list(model.graph_module.get_submodule(owner)._parameters)
        chosen = wrapper_paths(owner, [n for n in order if n in names])
        out.update({f"{owner}.{name}": key_path for name, key_path in chosen.items()})
    return out


def _on_original_base(model: LoraModel, name: str, path: str, spec: LoraSpec, lora_a: torch.Tensor,
                      lora_b: torch.Tensor) -> tuple[int, torch.Tensor, torch.Tensor]:
    """``(2r, [A; A0], [B, -B0])``: the residual base is ``W - s B0 A0``, so
    ``residual + s B A = W + s [B, -B0] [A; A0]`` exactly, at the same scale."""
    where = f"adapter {name!r} at {path!r} (init={spec.init!r})"
    if spec.init == "loftq":
        raise AdapterError(
            f"{where}: LoftQ's base is its own quantized weight, not the original plus a low-rank "
            "term, so an adapter without it is wrong on the original model; save base + adapters "
            "(save_adapters_separately=True), whose base is LoftQ's"
        )
    initial = initial_factors(model.graph_module, name, path)
    if initial is None:
        raise AdapterError(
            f"{where}: the factors this init started from are not in the model (it was loaded from "
            "files), so the adapter cannot be turned into one for the original base; save base + "
            "adapters (save_adapters_separately=True) instead"
        )
    a0, b0 = (t.to(lora_a.dtype) for t in initial)
    return 2 * spec.rank, torch.cat([lora_a, a0], dim=0), torch.cat([lora_b, -b0], dim=1)


def _peft_alpha(spec: LoraSpec, use_rslora: bool) -> float:
    """The alpha that gives PEFT this module's scale under the adapter-wide rsLoRA flag: its own
    alpha when the flags agree (the config keeps what the user wrote), else the rescaled one,
    which the config writes as an ``alpha_pattern`` entry."""
    if spec.use_rslora == use_rslora:
        return spec.alpha
    return alpha_for_scale(spec.scale, spec.rank, use_rslora)


def _adapter_dropout(name: str, specs: Mapping[str, LoraSpec]) -> float:
    """PEFT has one ``lora_dropout`` per adapter: the most common value (dropout does not change
    inference, so a mismatch only affects further training, and is reported)."""
    values = [spec.dropout for spec in specs.values()]
    chosen = most_common(values)
    if len(set(values)) > 1:
        warnings.warn(
            f"adapter {name!r} uses different LoRA dropouts per module ({sorted(set(values))}); PEFT "
            f"stores one, so lora_dropout={chosen} is written",
            GraphloraWarning,
            stacklevel=4,
        )
    return float(chosen)


def _module_names(model: LoraModel) -> set[str]:
    """Module names of the base model as far as the graph keeps them (modules owning tensors),
    without graphlora's own containers; used to keep PEFT's suffix matching exact."""
    return {
        name
        for name, _ in model.graph_module.named_modules()
        if name and not is_own(name)
    }


def _warn_unloadable_by_peft(model: LoraModel, specs: Mapping[str, LoraSpec]) -> None:
    """Sites on bare parameters (``x @ self.w``) have no module PEFT could wrap."""
    modules = _module_names(model)
    bare = sorted(p for p in specs if p not in modules)
    if bare:
        warnings.warn(
            f"LoRA on {', '.join(bare[:5])}: these sites are bare parameters, not modules; PEFT cannot "
            "load LoRA weights for them (graphlora.load_adapter can)",
            GraphloraWarning,
            stacklevel=4,
        )


@contextlib.contextmanager
def active_as(model: LoraModel, names: Sequence[str]) -> Iterator[None]:
    """Temporarily make ``names`` the active adapters (the graph is rebuilt, then restored)."""
    previous = model.active_adapters
    if list(names) == previous:
        yield
        return
    set_active(model, names)
    try:
        yield
    finally:
        set_active(model, previous)


def set_active(model: LoraModel, names: Sequence[str]) -> None:
    """Make exactly ``names`` the active adapters; an empty list runs the base model only."""
    if names:
        model.set_adapter(list(names))
    else:
        model.disable_adapters()
