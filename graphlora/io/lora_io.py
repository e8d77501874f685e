"""Save a :class:`~graphlora.LoraModel` in the layouts Hugging Face users load, and load PEFT LoRA
adapters (saved by graphlora or by PEFT itself) back into graphlora.

This module is the bridge between the model side (graphs, linear sites, named adapters) and the
file formats of :mod:`graphlora.io` (which know nothing of graphs). Three save options, as in the
Kithara guide:

``only_save_adapters=True``
    A PEFT adapter directory: ``adapter_config.json`` + ``adapter_model.safetensors``. Loadable by
    ``peft.PeftModel.from_pretrained(base, dir)``, transformers' ``model.load_adapter(dir)`` and
    :func:`load_adapter`.
``save_adapters_separately=True`` (the default)
    The base weights under the original model's state-dict keys (``model.safetensors``, sharded
    with ``model.safetensors.index.json`` past ``max_shard_size``), ``config.json`` when the model
    came from transformers, and the adapter in the subdirectory ``adapters/``. Keeping the adapter
    out of the top level matters: transformers' ``from_pretrained`` loads an
    ``adapter_config.json`` it finds next to ``config.json`` automatically, which would make
    "load the base, then add the adapter" apply it twice.
``save_adapters_separately=False``
    One merged model, ``W + scale * B @ A`` under the original keys (plus ``config.json``):
    an ordinary checkpoint for ``AutoModel.from_pretrained`` or ``module.load_state_dict``.

A quantized base is saved dequantized (the float weights the model computes with) in both base
layouts, so any library loads it. ``keep_quantized=True`` keeps its codes instead (graphlora's own
format, read back by :func:`graphlora.load_quantized`; a merged save re-quantizes the merged
weights with each site's rule) — see :mod:`graphlora.io.quantized_checkpoint`.

Every save is all-or-nothing: the directory is built under a hidden staging name next to the
target and renamed into place (:func:`graphlora.io.atomic.atomic_directory`), so an error half-way
leaves an earlier save untouched. Files graphlora does not write (tokenizer files, a README) are
carried over into the new directory.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import json
import os
import re
import warnings
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn as nn

from graphlora import meta
from graphlora.adapters import DEFAULT_ADAPTER, LoraSpec
from graphlora.errors import AdapterError, GraphloraWarning, InputError
from graphlora.io.atomic import atomic_directory, atomic_write
from graphlora.io.peft_format import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_FILES,
    LoraAdapter,
    LoraModule,
    check_adapter_shapes,
    lora_keys,
    read_adapter,
    write_adapter,
)
from graphlora.io.safetensors_io import SAFE_WEIGHTS_NAME, write_state_dict
from graphlora.model import LoraModel
from graphlora.passes.insert_lora import param_features
from graphlora.sites import LinearSite, find_linear_sites, tagged_sites
from graphlora.trace import TraceMethod

__all__ = [
    "ADAPTERS_SUBDIR",
    "CONFIG_NAME",
    "SaveResult",
    "adapter_layout",
    "load_adapter",
    "resolve_adapter_dir",
    "save_pretrained",
]

#: Where the base+adapters layout puts the adapter (PEFT layout inside it).
ADAPTERS_SUBDIR = "adapters"
#: transformers' model config file.
CONFIG_NAME = "config.json"
#: Suffix :meth:`LoraModel.merge` gives a merged copy of a weight that other readers still use.
MERGED_SUFFIX = "__merged"

SaveMode = Literal["adapters", "separate", "merged"]


@dataclass(frozen=True)
class SaveResult:
    """What a save wrote: the directory, the option used, every file written (relative paths,
    sorted) and where each adapter went (adapter name -> directory relative to the save)."""

    directory: Path
    mode: SaveMode
    files: tuple[str, ...]
    adapters: dict[str, str]


# =============================================================================================
# saving


def save_pretrained(
    model: LoraModel,
    save_directory: str | os.PathLike[str],
    *,
    only_save_adapters: bool = False,
    save_adapters_separately: bool = True,
    max_shard_size: int | str = "5GB",
    adapter_name: str | None = None,
    selected_adapters: Sequence[str] | None = None,
    keep_quantized: bool = False,
    overwrite: bool = True,
) -> SaveResult:
    """Save ``model`` as a PEFT adapter, as base + adapter, or merged (see the module docstring).

    Which adapter: the active one by default (an error if several are active), ``adapter_name``
    to pick another. ``selected_adapters=[...]`` saves several in PEFT's layout: ``"default"`` at
    the top of the adapter directory, every other adapter in a subdirectory named after it. A
    merged save folds the active adapters (or ``adapter_name``) into the weights.
    ``overwrite=False`` refuses to replace an existing directory.
    """
    if not isinstance(model, LoraModel):
        raise InputError(
            f"save_pretrained() needs a graphlora LoraModel, got {type(model).__name__}; "
            "build one with graphlora.transform()"
        )
    mode = _save_mode(only_save_adapters, save_adapters_separately, adapter_name, selected_adapters)
    target = Path(save_directory)
    if mode == "merged":
        plan = _plan_merged(model, adapter_name, keep_quantized)
    else:
        plan = _plan_adapters(model, mode, adapter_name, selected_adapters, keep_quantized)
    with atomic_directory(target, overwrite=overwrite, keep=_not_ours(target)) as staging:
        plan.write(staging, max_shard_size)
        files = _relative_files(staging)
    return SaveResult(directory=target, mode=mode, files=files, adapters=plan.adapter_dirs)


def _save_mode(
    only_save_adapters: bool,
    save_adapters_separately: bool,
    adapter_name: str | None,
    selected_adapters: Sequence[str] | None,
) -> SaveMode:
    """Turn the three Kithara flags into one mode, refusing combinations that contradict."""
    if adapter_name is not None and selected_adapters is not None:
        raise InputError("pass either adapter_name or selected_adapters, not both")
    if only_save_adapters and not save_adapters_separately:
        raise InputError(
            "only_save_adapters=True saves no base model, so save_adapters_separately=False (a merged "
            "save) contradicts it; drop one of the two"
        )
    if only_save_adapters:
        return "adapters"
    if save_adapters_separately:
        return "separate"
    if selected_adapters is not None:
        raise InputError(
            "selected_adapters chooses adapters to save as files; a merged save folds the active "
            "adapters into the weights (set them with model.set_adapter([...]) or pass adapter_name)"
        )
    return "merged"


@dataclass
class _Plan:
    """Everything to write, gathered before the staging directory exists (so a bad option or an
    unknown adapter fails without touching the disk)."""

    state: dict[str, torch.Tensor] | None
    config: Any | None
    adapters: dict[str, tuple[list[LoraModule], dict[str, Any]]]  # subdir -> (modules, options)
    adapter_dirs: dict[str, str]
    quantization: dict[str, Any] | None = None  # keep_quantized: encodings and rules

    def write(self, root: Path, max_shard_size: int | str) -> None:
        if self.state is not None:
            write_state_dict(self.state, root, max_shard_size=max_shard_size)
        if self.quantization is not None:
            from graphlora.io.quantized_checkpoint import QUANT_CONFIG_NAME

            with atomic_write(root / QUANT_CONFIG_NAME, "w", encoding="utf-8") as f:
                json.dump(self.quantization, f, indent=2)
        if self.config is not None:
            _write_config(self.config, root / CONFIG_NAME)
        for subdir, (modules, options) in self.adapters.items():
            where = root / subdir if subdir else root
            where.mkdir(parents=True, exist_ok=True)
            write_adapter(where, modules, **options)


def _plan_adapters(
    model: LoraModel,
    mode: SaveMode,
    adapter_name: str | None,
    selected_adapters: Sequence[str] | None,
    keep_quantized: bool = False,
) -> _Plan:
    layout = adapter_layout(model, adapter_name, selected_adapters)
    prefix = "" if mode == "adapters" else ADAPTERS_SUBDIR
    dirs = {name: "/".join(p for p in (prefix, sub) if p) for name, sub in layout.items()}
    adapters = {dirs[name]: _adapter_payload(model, name) for name in layout}
    state = config = quantization = None
    if mode == "separate":
        if keep_quantized:
            from graphlora.io.quantized_checkpoint import quantized_state

            state, quantization = quantized_state(model.graph_module, model.rules)
        else:
            state = _original_keys(model, model.base_state_dict(), what="base")
        config = _export_config(model, untied=[])
    elif keep_quantized:
        raise InputError("keep_quantized=True applies to saves with a base model; this one saves adapters only")
    return _Plan(state=state, config=config, adapters=adapters, adapter_dirs=dirs, quantization=quantization)


def _plan_merged(model: LoraModel, adapter_name: str | None, keep_quantized: bool = False) -> _Plan:
    names = model.active_adapters if adapter_name is None else [adapter_name]
    with _active_as(model, names):
        merged = model.merge()
    if keep_quantized:
        from graphlora.io.quantized_checkpoint import quantized_state, requantize_merged

        requantize_merged(merged)
        state, quantization = quantized_state(merged, model.rules)
        return _Plan(state=state, config=_export_config(model, []), adapters={}, adapter_dirs={},
                     quantization=quantization)
    raw = merged.state_dict()
    state = {k: v for k, v in raw.items() if not k.endswith(MERGED_SUFFIX)}
    untied = []
    for key, value in raw.items():
        if key.endswith(MERGED_SUFFIX):
            original = key[: -len(MERGED_SUFFIX)]
            state[original] = value
            untied.append(original)
    _add_dequantized_weights(merged, state)
    state = _original_keys(model, state, what="merged")
    return _Plan(state=state, config=_export_config(model, untied), adapters={}, adapter_dirs={})


def _add_dequantized_weights(gm: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Quantized sites the merge did not touch (no LoRA, or an inactive adapter's) still read
    packed storage, and their parameter is gone from the state dict: evaluate their dequantized
    float weight so the merged checkpoint is a complete float model."""
    for site in tagged_sites(gm):
        name = site.spec.weight_name
        if name not in state:
            state[name] = site.param_value().detach()


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
    if not name or name in (".", "..") or "/" in name or "\\" in name:
        raise AdapterError(f"adapter name {name!r} cannot be used as a directory name")


def _adapter_payload(model: LoraModel, name: str) -> tuple[list[LoraModule], dict[str, Any]]:
    """The PEFT modules of one adapter and the ``write_adapter`` options for it."""
    specs = model.adapters[name]
    if not specs:
        raise AdapterError(f"adapter {name!r} has no LoRA modules to save")
    weights = model.lora_state_dict(name)
    layouts = {s.module_path: s.fan_in_fan_out for s in model.sites}
    use_rslora = _most_common([spec.use_rslora for spec in specs.values()])
    modules = []
    for path, spec in specs.items():
        a_key, b_key = lora_keys(path)
        modules.append(
            LoraModule(
                path=path,
                rank=spec.rank,
                alpha=_peft_alpha(spec, use_rslora),
                lora_A=weights[a_key],
                lora_B=weights[b_key],
                fan_in_fan_out=layouts.get(path, False),
                use_rslora=use_rslora,
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


def _peft_alpha(spec: LoraSpec, use_rslora: bool) -> float:
    """The alpha that gives PEFT this module's scale under the adapter-wide rsLoRA flag.

    PEFT has one ``use_rslora`` per adapter; graphlora rules may mix. A module whose flag differs
    keeps its exact scale by rescaling alpha (alpha/sqrt(r) == (alpha*sqrt(r)/r)), written as an
    ``alpha_pattern`` entry.
    """
    if spec.use_rslora == use_rslora:
        return spec.alpha
    return spec.scale * (spec.rank ** 0.5 if use_rslora else spec.rank)


def _adapter_dropout(name: str, specs: Mapping[str, LoraSpec]) -> float:
    """PEFT has one ``lora_dropout`` per adapter: the most common value (dropout does not change
    inference, so a mismatch only affects further training, and is reported)."""
    values = [spec.dropout for spec in specs.values()]
    chosen = _most_common(values)
    if len(set(values)) > 1:
        warnings.warn(
            f"adapter {name!r} uses different LoRA dropouts per module ({sorted(set(values))}); PEFT "
            f"stores one, so lora_dropout={chosen} is written",
            GraphloraWarning,
            stacklevel=4,
        )
    return float(chosen)


def _most_common(values: list[Any]) -> Any:
    counts = Counter(values)
    best = max(counts.values())
    return next(v for v in values if counts[v] == best)


def _module_names(model: LoraModel) -> set[str]:
    """Module names of the base model as far as the graph keeps them (modules owning tensors),
    without graphlora's own containers; used to keep PEFT's suffix matching exact."""
    return {
        name
        for name, _ in model.graph_module.named_modules()
        if name and not name.startswith("graphlora_")
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


def _original_keys(model: LoraModel, state: dict[str, torch.Tensor], *, what: str) -> dict[str, torch.Tensor]:
    """Restrict ``state`` to the original model's state-dict keys, in the original order, so the
    file loads into the original class (strict ``load_state_dict``, ``from_pretrained``)."""
    order = model.graph_module.meta.get("graphlora_state_keys")
    if not order:
        return {k: v for k, v in state.items() if not k.startswith("graphlora_")}
    missing = [k for k in order if k not in state]
    if missing:
        warnings.warn(
            f"the {what} save lacks {len(missing)} tensor(s) of the original state dict that the "
            f"traced graph does not hold: {', '.join(missing[:5])}",
            GraphloraWarning,
            stacklevel=4,
        )
    return {k: state[k] for k in order if k in state}


@contextlib.contextmanager
def _active_as(model: LoraModel, names: Sequence[str]) -> Iterator[None]:
    """Temporarily make ``names`` the active adapters (the graph is rebuilt, then restored)."""
    previous = model.active_adapters
    if list(names) == previous:
        yield
        return
    _set_active(model, names)
    try:
        yield
    finally:
        _set_active(model, previous)


def _set_active(model: LoraModel, names: Sequence[str]) -> None:
    if names:
        model.set_adapter(list(names))
    else:
        model.disable_adapters()


# --------------------------------------------------------------------------- config.json


def _export_config(model: LoraModel, untied: list[str]) -> Any | None:
    """A copy of the transformers config to write next to base weights (``None`` when the model
    did not come from transformers). A merged weight that was tied to another (a LoRA'd
    ``lm_head`` tied to the embedding) no longer equals it, so the copy unties them."""
    config = model.source.get("config")
    if untied:
        _warn_untied(untied, has_config=config is not None)
    if config is None or not hasattr(config, "to_json_string"):
        return None
    config = copy.deepcopy(config)
    model_class = model.source.get("model_class")
    if model_class:
        config.architectures = [model_class]
    if untied and getattr(config, "tie_word_embeddings", False):
        config.tie_word_embeddings = False
    return config


def _warn_untied(untied: list[str], *, has_config: bool) -> None:
    consequence = (
        "config.json is written with tie_word_embeddings=false"
        if has_config
        else "loading this file into the original module class, which ties them again, loses the merge"
    )
    warnings.warn(
        f"merged weight(s) {', '.join(untied)} were tied to other weights that LoRA did not change; "
        f"the merged save stores them separately ({consequence})",
        GraphloraWarning,
        stacklevel=5,
    )


def _write_config(config: Any, path: Path) -> None:
    with atomic_write(path, "w") as fh:
        fh.write(config.to_json_string(use_diff=True))


# --------------------------------------------------------------------------- directory contents


_WEIGHT_FILE = re.compile(
    rf"{re.escape(SAFE_WEIGHTS_NAME[: -len('.safetensors')])}(-\d{{5}}-of-\d{{5}})?\.safetensors"
    rf"|{re.escape(SAFE_WEIGHTS_NAME)}\.index\.json"
)


def _not_ours(target: Path):
    """``keep`` predicate for :func:`atomic_directory`: carry over every top-level entry of an
    earlier directory except what a graphlora save writes (weights, config, adapter files and
    adapter subdirectories), so a save never mixes with a stale one but keeps tokenizer files."""

    def keep(name: str) -> bool:
        if name in ADAPTER_FILES or name == CONFIG_NAME or _WEIGHT_FILE.fullmatch(name):
            return False
        entry = target / name
        if entry.is_dir() and (name == ADAPTERS_SUBDIR or (entry / ADAPTER_CONFIG_NAME).is_file()):
            return False
        return True

    return keep


def _relative_files(root: Path) -> tuple[str, ...]:
    return tuple(
        sorted(
            str(Path(dirpath, f).relative_to(root)).replace(os.sep, "/")
            for dirpath, _, files in os.walk(root)
            for f in files
        )
    )


# =============================================================================================
# loading


def resolve_adapter_dir(
    adapter_dir: str | os.PathLike[str], adapter_name: str | None = None, subfolder: str | None = None
) -> Path:
    """The directory holding ``adapter_config.json`` for a load.

    ``adapter_dir`` (joined with ``subfolder``) if it holds an adapter, as PEFT reads it; else, so
    every graphlora save loads from its top directory, ``<dir>/<adapter_name>`` (PEFT's layout for
    a non-default adapter), ``<dir>/adapters`` and ``<dir>/adapters/<adapter_name>`` (the
    base+adapters layout). When none holds an adapter, ``adapter_dir`` itself, so the reader's
    "missing file" error names it.
    """
    root = Path(adapter_dir)
    if subfolder:
        root = root / subfolder
    candidates = [root]
    if adapter_name:
        candidates.append(root / adapter_name)
    candidates.append(root / ADAPTERS_SUBDIR)
    if adapter_name:
        candidates.append(root / ADAPTERS_SUBDIR / adapter_name)
    for candidate in candidates:
        if (candidate / ADAPTER_CONFIG_NAME).is_file():
            return candidate
    return root


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
) -> LoraModel:
    """Load a PEFT LoRA adapter (saved by graphlora or PEFT) as ``adapter_name``; return the model.

    ``model`` is a :class:`LoraModel` (changed in place and returned) or a plain ``nn.Module``,
    which is traced with ``example_args``/``example_kwargs`` (required then) and gets LoRA on
    exactly the adapter's target modules, with its ranks and alphas. Target modules may be any
    linear layer of the graph, also ones no rule of the LoraModel matched. An existing adapter of
    the same name is replaced. ``activate``: ``None`` activates the loaded adapter when the model
    had none active or it replaces an active one (PEFT's ``load_adapter`` leaves others active),
    ``True``/``False`` force it.

    Everything is checked before the model changes: the files (:func:`read_adapter`: missing
    files, ``peft_type``, DoRA and other variants, corrupt weights), that every target is a linear
    layer of the model, and every factor's shape (the first offending keys with expected shapes).
    """
    path = resolve_adapter_dir(adapter_dir, adapter_name, subfolder)
    _refuse_model_checkpoint(path)
    adapter = read_adapter(path)
    if not isinstance(model, LoraModel):
        model = _trace_for_adapter(model, example_args, example_kwargs, method, path)
        activate = True if activate is None else activate
    sites = _sites_by_path(model)
    _check_fit(adapter, sites, path)
    _install(model, adapter, adapter_name, sites, activate)
    return model


def _refuse_model_checkpoint(path: Path) -> None:
    """A merged save (or any model checkpoint) is not an adapter: say so instead of "file missing"."""
    if (path / ADAPTER_CONFIG_NAME).is_file() or not path.is_dir():
        return
    weights = sorted(name for name in os.listdir(path) if _WEIGHT_FILE.fullmatch(name))
    if weights:
        raise AdapterError(
            f"{path} holds a full model checkpoint ({weights[0]}) but no {ADAPTER_CONFIG_NAME}: it is "
            "not an adapter (a merged save has the LoRA folded into its weights). Load it with "
            "from_pretrained / load_state_dict, or point load_adapter at an adapter directory"
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
    from graphlora.pipeline import transform  # pipeline imports the model; keep imports one-way

    return transform(model, [], tuple(example_args or ()), dict(example_kwargs or {}), method=method)


def _sites_by_path(model: LoraModel) -> dict[str, list[LinearSite]]:
    """Every linear site of the graph by module path: the tagged ones (a rule matched them), then
    the untagged ones, which a loaded adapter may also target."""
    gm = model.graph_module
    by_path: dict[str, list[LinearSite]] = {}
    for site in tagged_sites(gm):
        by_path.setdefault(site.module_path, []).append(site)
    tagged = set(by_path)
    for site in find_linear_sites(gm):
        if site.module_path not in tagged and meta.role(site.node) is None:
            by_path.setdefault(site.module_path, []).append(site)
    return by_path


def _check_fit(adapter: LoraAdapter, sites: Mapping[str, list[LinearSite]], path: Path) -> None:
    """Every adapter module must be a linear site of the graph with the factor shapes PEFT would
    build for it (lora_A (r, in), lora_B (out, r) in the weight's stored orientation)."""
    unknown = [p for p in adapter.modules if p not in sites]
    if unknown:
        raise AdapterError(
            f"adapter {str(path)!r} targets {len(unknown)} module(s) that are not linear layers of this "
            f"model: {', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}"
            f"{_suggestion(unknown[0], sites)}. Was it trained on a different model?"
        )
    expected = {p: param_features(sites[p][0]) for p in adapter.modules}
    check_adapter_shapes(adapter, expected)


def _suggestion(path: str, sites: Mapping[str, Any]) -> str:
    close = difflib.get_close_matches(path, list(sites), n=1, cutoff=0.6)
    if close:
        return f" (closest linear layer: {close[0]!r})"
    examples = ", ".join(list(sites)[:3])
    return f" (its linear layers are e.g. {examples})" if examples else " (it has no linear layers)"


def _install(
    model: LoraModel,
    adapter: LoraAdapter,
    name: str,
    sites: Mapping[str, list[LinearSite]],
    activate: bool | None,
) -> None:
    """Create the adapter on the model (tagging untagged sites first) and copy its weights in."""
    specs = {
        p: LoraSpec(rank=m.rank, alpha=float(m.alpha), dropout=adapter.lora_dropout, use_rslora=m.use_rslora)
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
        model.load_lora_state_dict(weights, adapter=name)
    except BaseException:
        model.delete_adapter(name)
        raise
    _set_active(model, _next_active(previous, name, activate))


def _next_active(previous: list[str], name: str, activate: bool | None) -> list[str]:
    """Active adapters after loading ``name``: like PEFT's ``set_adapter(name)`` when activating
    a new one, the previous set otherwise (minus ``name`` when told not to activate it)."""
    if activate is None:
        activate = name in previous or not previous
    if not activate:
        return [a for a in previous if a != name]
    return previous if name in previous else [name]
