"""Saving a quantized base *as it is stored* (``keep_quantized=True``) and loading it back.

A QLoRA base is int4/nf4 codes plus scales; saving it dequantized (the default, so any library
can load it) multiplies its size by 8. With ``keep_quantized=True`` the checkpoint keeps the
codes. Layout, next to the usual files of the chosen save mode:

``graphlora_quantized.safetensors``
    (sharded like ``model.safetensors``, with its own index) every float tensor of the base under
    its original key, and for each quantized weight its stored codes under
    ``<original key>.qcodes`` (packed two per byte for 4-bit qtypes, channel-major; see
    :mod:`graphlora.quant.encoding`).
``graphlora_quantization.json``
    ``{"format": "graphlora-quantized", "version": 1, "rules": [...], "weights": {key:
    encoding}}`` — the rules the model was transformed with and, per quantized weight, its
    encoding in the encodings-file schema (scale, offset, qtype, axis, shape, block size).
``config.json`` (models from transformers)
    the model's config with ``quantization_config = {"quant_method": "graphlora", ...}``, the
    key the Hugging Face ecosystem reads to know a checkpoint is pre-quantized and by what.

Such a checkpoint is graphlora's own format: transformers cannot put codes into a float model.
It must also not *seem* to load. Had the tensors been named ``model.safetensors``, transformers'
``from_pretrained`` (which only warns about an unknown ``quant_method`` and skips it) would load
the float tensors, report the quantized weights as missing and initialise them at random. Under
their own file name it finds no checkpoint and raises, after logging "Unknown quantization type,
got graphlora"; ``AutoConfig.from_pretrained`` still reads the config, so the architecture can be
built from it (``AutoModelForCausalLM.from_config``) and handed to :func:`load_quantized`, which
rebuilds the LoraModel — trace, rules, then the saved codes installed exactly, without
re-quantizing anything.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx

from graphlora import meta
from graphlora.checkpoint.layout import ADAPTERS_SUBDIR, QUANT_CONFIG_NAME, QUANT_WEIGHTS_NAME
from graphlora.checkpoint.loading import load_adapter
from graphlora.errors import FileFormatError, QuantizationError, first_few
from graphlora.graph_utils import is_own
from graphlora.io.encodings_file import encoding_from_entry
from graphlora.io.json_file import expect, read_json
from graphlora.io.peft_config import ADAPTER_CONFIG_NAME
from graphlora.io.safetensors_io import SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, load_state_dict
from graphlora.model import LoraModel
from graphlora.passes.quantize_weights import QuantizeWeightsPass, install_encoding
from graphlora.passes.weights import groups_by_weight
from graphlora.meta_buffers import meta_buffer_values
from graphlora.passes.load_checkpoint import LoadCheckpointPass, StateDictSource
from graphlora.pipeline import build_lora_model
from graphlora.quant import Encoding
from graphlora.rules import QuantRule
from graphlora.rules_file import dump_rules, rules_from_data
from graphlora.sites import tagged_sites

__all__ = [
    "CODES_SUFFIX",
    "QUANT_CONFIG_NAME",
    "QUANT_METHOD",
    "QUANT_WEIGHTS_NAME",
    "load_quantized",
    "quantized_state",
    "requantize_merged",
    "transformers_quantization_config",
]

CODES_SUFFIX = ".qcodes"
FORMAT = "graphlora-quantized"
#: ``quantization_config.quant_method`` in the ``config.json`` of a keep-quantized save.
QUANT_METHOD = "graphlora"


def transformers_quantization_config() -> dict[str, Any]:
    """The ``quantization_config`` a keep-quantized save writes into ``config.json``: it names
    the method (``graphlora``, unknown to transformers, which then refuses to guess) and says
    where the encodings are and what loads them."""
    return {
        "quant_method": QUANT_METHOD,
        "format": FORMAT,
        "version": 1,
        "encodings": QUANT_CONFIG_NAME,
        "weights": QUANT_WEIGHTS_NAME,
        "load_with": "graphlora.load_quantized",
    }


def quantized_state(
    gm: fx.GraphModule, rules: Sequence[QuantRule]
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, config) for a keep-quantized save of the base held by graph module ``gm``.

    Float tensors keep their original keys; each quantized weight contributes its codes; the
    config holds the encodings and the ``rules`` the model was transformed with.
    """
    tensors = {k: v for k, v in gm.state_dict().items() if not is_own(k)}
    weights: dict[str, Any] = {}
    for node in gm.graph.nodes:
        info = meta.info(node)
        if info.get("role") != "dequant" or "encoding" not in info:
            continue
        name = info["tensor"]
        encoding: Encoding = info["encoding"]
        storage = gm.get_buffer(node.args[0].target)
        tensors[name + CODES_SUFFIX] = storage.detach().contiguous()
        weights[name] = encoding.to_dict(name)
    config = {
        "format": FORMAT,
        "version": 1,
        "rules": json.loads(dump_rules(rules, "json"))["rules"] if rules else [],
        "weights": weights,
    }
    return tensors, config


def _check_config(config: Any, path: Path) -> dict[str, Any]:
    """The ``weights`` entries of a quantization config whose top level has the right shape."""
    where = str(path)
    if not isinstance(config, dict):
        raise FileFormatError(f"{where}: expected a JSON object, got {type(config).__name__}")
    if config.get("format") != FORMAT:
        raise FileFormatError(f"{where}: format is {config.get('format')!r}, expected {FORMAT!r}")
    version = expect(config, "version", "int", where)
    if version != 1:
        raise FileFormatError(f"{where}: version {version} is not supported (this graphlora reads version 1)")
    expect(config, "rules", "list", where)
    return expect(config, "weights", "object", where)


def _describe(t: torch.Tensor) -> str:
    return f"{str(t.dtype).removeprefix('torch.')} {list(t.shape)}"


def requantize_merged(gm: fx.GraphModule) -> None:
    """Quantize a merged graph's weights again, each with its site's rule (packed storage).

    Merging moved the weights off their grid, so encodings are recomputed with the rule's
    round-to-nearest method (a method that needs data, GPTQ, gives way to its registered
    data-free stand-in, ``mse``).
    """
    for site in tagged_sites(gm):
        rule = site.rule
        if rule is not None and rule.needs_calibration_data:
            stand_in = rule.weight_method.data_free
            meta.tag(site.node, "base", rule=dataclasses.replace(rule, weight_calibration=stand_in))
    QuantizeWeightsPass(storage="packed")(gm)
    gm.graph.lint()
    gm.recompile()


def _weights_name(root: Path) -> str:
    """The tensors' file name: ``graphlora_quantized.safetensors``, or ``model.safetensors`` in
    a save written before keep-quantized saves had a file name of their own."""
    old = (root / SAFE_WEIGHTS_NAME).is_file() or (root / SAFE_WEIGHTS_INDEX_NAME).is_file()
    new = (root / QUANT_WEIGHTS_NAME).is_file() or (root / f"{QUANT_WEIGHTS_NAME}.index.json").is_file()
    return SAFE_WEIGHTS_NAME if old and not new else QUANT_WEIGHTS_NAME


def _missing(own: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> list[str]:
    """The model's tensors the file does not hold, except graphlora's own (installed from the
    codes) and tied aliases of a tensor it holds (a save leaves ``lm_head.weight`` out when it is
    the embedding, as transformers does)."""
    loaded = {(v.data_ptr(), tuple(v.shape)) for k, v in own.items() if k in state}
    return sorted(
        k for k, v in own.items()
        if k not in state and not is_own(k) and (v.data_ptr(), tuple(v.shape)) not in loaded
    )


def load_quantized(
    model: torch.nn.Module,
    directory: str | os.PathLike,
    example_args: tuple = (),
    example_kwargs: dict[str, Any] | None = None,
    **transform_kwargs: Any,
) -> LoraModel:
    """Rebuild a LoraModel from a ``keep_quantized=True`` save of ``directory``.

    ``model`` provides the architecture (its float weights are replaced by the saved ones);
    example inputs are needed for tracing as in :func:`graphlora.transform`. Adapters saved
    alongside (``adapters/``) are loaded too.
    """
    root = Path(directory)
    config_path = root / QUANT_CONFIG_NAME
    if not config_path.exists():
        raise FileFormatError(
            f"{root} has no {QUANT_CONFIG_NAME}: it is not a keep_quantized save "
            "(load float checkpoints with from_pretrained / load_state_dict)"
        )
    config = read_json(config_path, what="a graphlora quantization config")
    entries = _check_config(config, config_path)
    rules = rules_from_data({"rules": config["rules"]}, source=str(config_path))
    state = load_state_dict(root, weights_name=_weights_name(root))
    load = None
    if any(t.device.type == "meta" for t in list(model.parameters()) + list(model.buffers())):
        # a model built on meta: its float tensors come from the save, the codes' weights are left
        # to the codes below (they are never float in memory)
        floats = {k: v for k, v in state.items() if not k.endswith(CODES_SUFFIX)}
        load = LoadCheckpointPass(StateDictSource(floats, str(root)), quantize=False, skip=frozenset(entries),
                                  compute_buffers=meta_buffer_values(model),
                                  progress=transform_kwargs.get("progress", True))
    lm = build_lora_model(model, rules, example_args, example_kwargs, quantize_weights=False, load=load,
                          **transform_kwargs)
    gm = lm.graph_module
    groups = groups_by_weight(tagged_sites(gm))
    for name, entry in entries.items():
        if name not in groups:
            raise FileFormatError(f"{config_path}: quantized weight {name!r} is not a site of this model")
        key = name + CODES_SUFFIX
        if key not in state:
            raise FileFormatError(f"{root}: the codes of {name!r} ({key}) are missing")
        where = f"{config_path}: weights[{name!r}]"
        encoding = encoding_from_entry(entry, where)
        want = groups[name][0].spec.weight_shape
        if tuple(encoding.shape) != want:
            raise FileFormatError(f"{where}: the encoding is for shape {list(encoding.shape)}, the "
                                  f"model's weight has shape {list(want)}")
        try:
            codes = encoding.unpack(state.pop(key))
            install_encoding(gm, groups[name], encoding, "packed", codes=codes, method="loaded")
        except QuantizationError as exc:
            raise FileFormatError(f"{root}: the codes of {name!r} ({key}) do not fit its encoding: {exc}") from None
        groups = groups_by_weight(tagged_sites(gm))
    own = {k: v for k, v in gm.state_dict().items() if not is_own(k)}
    unexpected = sorted(k for k in state if k not in own)
    if unexpected:
        raise FileFormatError(f"{root}: tensors that do not belong to this model: {', '.join(unexpected[:5])}")
    missing = _missing(own, state)
    if missing:
        raise FileFormatError(
            f"{root}: the checkpoint lacks {len(missing)} tensor(s) of this model: {first_few(missing)}; "
            "a keep_quantized save holds every tensor of the base (saved from another model, or truncated?)"
        )
    wrong = [f"{k}: saved {_describe(state[k])}, model {_describe(own[k])}" for k in own
             if k in state and (state[k].shape != own[k].shape or state[k].dtype != own[k].dtype)]
    if wrong:
        raise FileFormatError(f"{root}: tensor(s) of another shape or dtype than the model's: {'; '.join(wrong[:5])}")
    with torch.no_grad():
        for k, v in state.items():
            own[k].copy_(v)
    gm.recompile()
    adapters = root / ADAPTERS_SUBDIR
    if (adapters / ADAPTER_CONFIG_NAME).exists():
        load_adapter(lm, adapters)
    return lm
