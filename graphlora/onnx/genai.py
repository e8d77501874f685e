"""An export directory that onnxruntime-genai runs: ``onnxruntime_genai.Model(directory)``.

onnxruntime-genai reads a decoder with the KV-cache layout of :mod:`graphlora.onnx.decoder` when
``genai_config.json`` names its file, inputs, outputs and cache geometry; its tokenizer reads
transformers' tokenizer files from the same directory. :func:`write_genai` writes all three::

    directory/
        model.onnx            the decoder step (export_onnx(..., kv_cache=True))
        genai_config.json     model type, token ids, context length, cache geometry, I/O names
        tokenizer.json ...    tokenizer.save_pretrained(directory), when a tokenizer is given

Past and present differ in length here (the present is the past plus the new tokens), so the
config sets ``past_present_share_buffer: false``. The session's provider follows
:func:`graphlora.onnx.runtime.choose_providers`: CUDA when usable, CPU otherwise.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from graphlora.errors import ExportError
from graphlora.io.atomic import atomic_directory, atomic_write

__all__ = ["genai_config", "write_genai"]

CONFIG_NAME = "genai_config.json"
MODEL_NAME = "model.onnx"


def genai_config(model: Any, *, filename: str = MODEL_NAME, providers: Any = "auto",
                 context_length: int | None = None) -> dict[str, Any]:
    """The ``genai_config.json`` contents for ``model``'s decoder export (a dict)."""
    from graphlora.onnx.decoder import decoder_layout
    from graphlora.onnx.runtime import CUDA, choose_providers

    config = model.config
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    layout = decoder_layout(config)
    hidden = getattr(text, "hidden_size", None) or getattr(text, "n_embd", None)
    heads = getattr(text, "num_attention_heads", None) or getattr(text, "n_head", None)
    length = context_length or getattr(text, "max_position_embeddings", None) or getattr(text, "n_positions", None)
    if not (hidden and heads and length):
        raise ExportError(f"{type(config).__name__} does not say hidden size, heads and context length; "
                          "pass context_length= (and a config with hidden_size/num_attention_heads)")
    eos = text.eos_token_id if text.eos_token_id is not None else 0
    pad = text.pad_token_id if getattr(text, "pad_token_id", None) is not None else (
        eos[0] if isinstance(eos, list) else eos)
    cuda = CUDA in choose_providers(providers).providers
    return {
        "model": {
            "bos_token_id": text.bos_token_id if text.bos_token_id is not None else 0,
            "eos_token_id": eos,
            "pad_token_id": pad,
            "context_length": int(length),
            "vocab_size": layout.vocab,
            "type": getattr(text, "model_type", "llama"),
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai",
                                    "provider_options": [{"cuda": {}}] if cuda else []},
                "filename": filename,
                "head_size": layout.head_dim,
                "hidden_size": int(hidden),
                "num_attention_heads": int(heads),
                "num_hidden_layers": layout.layers,
                "num_key_value_heads": layout.kv_heads,
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           "position_ids": "position_ids", "past_key_names": "past_key_values.%d.key",
                           "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
            },
        },
        "search": {"do_sample": False, "num_beams": 1, "num_return_sequences": 1, "max_length": int(length),
                   "min_length": 0, "past_present_share_buffer": False, "repetition_penalty": 1.0,
                   "temperature": 1.0, "top_k": 1, "top_p": 1.0, "early_stopping": True,
                   "length_penalty": 1.0, "no_repeat_ngram_size": 0, "diversity_penalty": 0.0},
    }


def write_genai(model: Any, directory: str | os.PathLike, *, lora: str = "merged", tokenizer: Any = None,
                providers: Any = "auto", context_length: int | None = None, **export_options: Any):
    """Export ``model`` (a causal-LM LoraModel) into ``directory`` for onnxruntime-genai: the
    decoder, ``genai_config.json`` and, with ``tokenizer``, its files. Returns the
    :class:`~graphlora.onnx.OnnxExport` of the decoder."""
    from graphlora.onnx.decoder import is_causal_lm
    from graphlora.onnx.export import export_onnx

    if not is_causal_lm(model):
        raise ExportError(f"onnxruntime-genai runs causal LMs; got {type(model).__name__}")
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ExportError(f"{directory} is a file; give a directory for the onnxruntime-genai export")
    config = genai_config(model, providers=providers, context_length=context_length)
    # the decoder, its config and the tokenizer land together or not at all; other files a user
    # keeps in the directory are carried over
    with atomic_directory(directory, overwrite=True, keep=lambda name: True) as staging:
        result = export_onnx(model, staging / MODEL_NAME, lora=lora, kv_cache=True, **export_options)
        with atomic_write(staging / CONFIG_NAME, "w", encoding="utf-8") as fh:
            fh.write(json.dumps(config, indent=2))
        if tokenizer is not None:
            tokenizer.save_pretrained(os.fspath(staging))
    external = result.external_data
    return dataclasses.replace(result, path=directory / MODEL_NAME,
                               external_data=None if external is None else directory / external.name)
