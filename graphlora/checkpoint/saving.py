"""Saving a :class:`~graphlora.model.LoraModel` in the layouts Hugging Face users load.

Three save options, as in the Kithara guide:

``only_save_adapters=True``
    A PEFT adapter directory: ``adapter_config.json`` + ``adapter_model.safetensors``. Loadable by
    ``peft.PeftModel.from_pretrained(base, dir)``, transformers' ``model.load_adapter(dir)`` and
    :func:`graphlora.load_adapter`.
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
format in ``graphlora_quantized.safetensors``, which transformers refuses rather than loading it
as random weights, read back by :func:`graphlora.load_quantized`; a merged save re-quantizes the
merged weights with each site's rule) — see :mod:`graphlora.checkpoint.quantized`.

Every save is all-or-nothing: the directory is built under a hidden staging name next to the
target and renamed into place (:func:`graphlora.io.atomic.atomic_directory`), so an error half-way
leaves an earlier save untouched. Files graphlora does not write (tokenizer files, a README) are
carried over into the new directory.
"""

from __future__ import annotations

import copy
import json
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn as nn

from graphlora import meta
from graphlora.checkpoint.adapter_state import active_as, adapter_layout, adapter_payload
from graphlora.checkpoint.layout import (
    ADAPTERS_SUBDIR,
    CONFIG_NAME,
    QUANT_CONFIG_NAME,
    QUANT_WEIGHTS_NAME,
    is_weights_file,
)
from graphlora.checkpoint.quantized import (
    QUANT_METHOD,
    quantized_state,
    requantize_merged,
    transformers_quantization_config,
)
from graphlora.errors import GraphloraWarning, InputError
from graphlora.graph_utils import is_own
from graphlora.io.atomic import atomic_directory, atomic_write
from graphlora.io.peft_config import ADAPTER_CONFIG_NAME
from graphlora.io.peft_format import ADAPTER_FILES, LoraModule, write_adapter
from graphlora.io.safetensors_io import SAFE_WEIGHTS_NAME, write_state_dict
from graphlora.model import LoraModel
from graphlora.passes.weights import dequant_node
from graphlora.sites import tagged_sites

__all__ = ["SaveResult", "save_pretrained"]

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
            name = SAFE_WEIGHTS_NAME if self.quantization is None else QUANT_WEIGHTS_NAME
            write_state_dict(self.state, root, max_shard_size=max_shard_size, weights_name=name)
        if self.quantization is not None:
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
    adapters = {dirs[name]: adapter_payload(model, name, on_original_base=mode == "adapters") for name in layout}
    state = config = quantization = None
    if mode == "separate":
        if keep_quantized:
            state, quantization = quantized_state(model.graph_module, model.rules)
        else:
            state = _original_keys(model, model.base_state_dict(), what="base")
        untied = _drop_tied(model, state)
        config = _export_config(model, untied, quantized=keep_quantized, why=_QUANTIZED_TIE)
    elif keep_quantized:
        raise InputError("keep_quantized=True applies to saves with a base model; this one saves adapters only")
    return _Plan(state=state, config=config, adapters=adapters, adapter_dirs=dirs, quantization=quantization)


def _plan_merged(model: LoraModel, adapter_name: str | None, keep_quantized: bool = False) -> _Plan:
    names = model.active_adapters if adapter_name is None else [adapter_name]
    with active_as(model, names):
        merged = model.merge()
    if keep_quantized:
        requantize_merged(merged)
        state, quantization = quantized_state(merged, model.rules)
        untied = _drop_tied(model, state)
        return _Plan(state=state, config=_export_config(model, untied, quantized=True), adapters={},
                     adapter_dirs={}, quantization=quantization)
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
    untied = list(dict.fromkeys(untied + _drop_tied(model, state)))
    return _Plan(state=state, config=_export_config(model, untied), adapters={}, adapter_dirs={})


def _drop_tied(model: LoraModel, state: dict[str, torch.Tensor]) -> list[str]:
    """Leave tied weights out of ``state`` as transformers' ``save_pretrained`` does: a key the
    model ties to another (``lm_head.weight`` to ``model.embed_tokens.weight``) is dropped when it
    holds the same values, since ``from_pretrained`` ties it again (a Gemma-2-2B head is ~1 GB).
    Returns the tied keys whose values differ from what they are tied to (a merged LoRA on the
    head, a quantized head read off its grid): those are kept, and the config must untie them."""
    differing = []
    for key, source in model.source.get("tied_weights", {}).items():
        if key not in state or source not in state:
            continue
        if _same_values(state[key], state[source]):
            del state[key]
        else:
            differing.append(key)
    return differing


def _same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    same_view = a.device == b.device and a.data_ptr() == b.data_ptr() and a.stride() == b.stride()
    return same_view or torch.equal(a, b)


def _add_dequantized_weights(gm: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Quantized sites the merge did not touch (no LoRA, or an inactive adapter's) still read
    packed storage, and their parameter is gone from the state dict (or, tied to another
    reader, holds that reader's float values): evaluate the dequantized float weight each site
    computes with, so the merged checkpoint is a complete float model of what ran."""
    for site in tagged_sites(gm):
        name = site.spec.weight_name
        if name not in state or dequant_node(site) is not None:
            state[name] = site.param_value().detach()


def _original_keys(model: LoraModel, state: dict[str, torch.Tensor], *, what: str) -> dict[str, torch.Tensor]:
    """Restrict ``state`` to the original model's state-dict keys, in the original order, so the
    file loads into the original class (strict ``load_state_dict``, ``from_pretrained``)."""
    order = model.graph_module.meta.get(meta.STATE_KEYS_KEY)
    if not order:
        return {k: v for k, v in state.items() if not is_own(k)}
    missing = [k for k in order if k not in state]
    if missing:
        warnings.warn(
            f"the {what} save lacks {len(missing)} tensor(s) of the original state dict that the "
            f"traced graph does not hold: {', '.join(missing[:5])}",
            GraphloraWarning,
            stacklevel=4,
        )
    return {k: state[k] for k in order if k in state}


# --------------------------------------------------------------------------- config.json


_MERGED_TIE = "LoRA changed them, not the weights they are tied to"
_QUANTIZED_TIE = "the base computes with other values for them than for the weights they are tied to"


def _export_config(model: LoraModel, untied: list[str], *, quantized: bool = False,
                   why: str = _MERGED_TIE) -> Any | None:
    """A copy of the transformers config to write next to base weights (``None`` when the model
    did not come from transformers). A merged weight that was tied to another (a LoRA'd
    ``lm_head`` tied to the embedding) no longer equals it, so the copy unties them. A
    keep-quantized save declares itself in ``quantization_config`` (so transformers refuses to
    load it as a float model); a float save drops that declaration, which a config read from a
    keep-quantized directory carries."""
    config = model.source.get("config")
    if untied:
        _warn_untied(untied, why, has_config=config is not None)
    if config is None or not hasattr(config, "to_json_string"):
        return None
    config = copy.deepcopy(config)
    model_class = model.source.get("model_class")
    if model_class:
        config.architectures = [model_class]
    if untied and getattr(config, "tie_word_embeddings", False):
        config.tie_word_embeddings = False
    if quantized:
        config.quantization_config = transformers_quantization_config()
    elif _quant_method(config) == QUANT_METHOD:
        del config.quantization_config
    return config


def _quant_method(config: Any) -> str | None:
    declared = getattr(config, "quantization_config", None)
    if isinstance(declared, dict):
        return declared.get("quant_method")
    return getattr(declared, "quant_method", None)


def _warn_untied(untied: list[str], why: str, *, has_config: bool) -> None:
    consequence = (
        "config.json is written with tie_word_embeddings=false"
        if has_config
        else "loading this file into the original module class, which ties them again, loses the difference"
    )
    warnings.warn(
        f"weight(s) {', '.join(untied)} were tied to other weights, but {why}; the save stores "
        f"them separately ({consequence})",
        GraphloraWarning,
        stacklevel=5,
    )


def _write_config(config: Any, path: Path) -> None:
    with atomic_write(path, "w") as fh:
        fh.write(config.to_json_string(use_diff=True))


# --------------------------------------------------------------------------- directory contents


def _not_ours(target: Path) -> Callable[[str], bool]:
    """``keep`` predicate for :func:`atomic_directory`: carry over every top-level entry of an
    earlier directory except what a graphlora save writes (weights, config, adapter files and
    adapter subdirectories), so a save never mixes with a stale one but keeps tokenizer files."""

    def keep(name: str) -> bool:
        if name in ADAPTER_FILES or name in (CONFIG_NAME, QUANT_CONFIG_NAME) or is_weights_file(name):
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
