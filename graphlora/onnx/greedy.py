"""Greedy generation with an exported KV-cache decoder and plain onnxruntime.

For users without onnxruntime-genai: :func:`generate` runs a model written by
``export_onnx(..., kv_cache=True)`` (:mod:`graphlora.onnx.decoder`) as transformers' greedy
``generate`` runs the PyTorch model: the prompt once with an empty past, then one token per step
against the cache the previous step returned, so a new token costs one token of compute, not the
whole sequence again. Left-padded batches work as in transformers (positions count only the
real tokens; padding is masked). A row that produced ``eos_token_id`` continues with
``pad_token_id`` until every row has finished or ``max_new_tokens`` are made.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from graphlora.errors import InputError

__all__ = ["generate"]

_ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


def _session(session_or_path: Any, providers: Any):
    if isinstance(session_or_path, (str, os.PathLike)):
        from graphlora.onnx.runtime import InferenceSession

        return InferenceSession(session_or_path, providers, accuracy_level=0)
    if not hasattr(session_or_path, "run") or not hasattr(session_or_path, "get_inputs"):
        raise InputError(f"generate needs an onnxruntime session or the path of an exported decoder, "
                         f"got {type(session_or_path).__name__}")
    return session_or_path


def _past_inputs(session) -> list[tuple[str, int, int, Any]]:
    """``(name, kv_heads, head_dim, dtype)`` of each past key/value input, in the session's order."""
    names = [i.name for i in session.get_inputs()]
    missing = [n for n in ("input_ids", "attention_mask", "position_ids") if n not in names]
    past = [i for i in session.get_inputs() if i.name.startswith("past_key_values.")]
    if missing or not past:
        raise InputError(f"the model is not a KV-cache decoder (inputs {names}); export it with "
                         "graphlora.export_onnx(model, path, kv_cache=True)")
    out = []
    for item in past:
        heads, head_dim = item.shape[1], item.shape[3]
        if not isinstance(heads, int) or not isinstance(head_dim, int):
            raise InputError(f"{item.name} has no static heads/head_dim ({item.shape})")
        out.append((item.name, heads, head_dim, _ORT_DTYPES.get(item.type, np.float32)))
    return out


def generate(
    session_or_path: Any,
    input_ids: Any,
    max_new_tokens: int = 32,
    *,
    attention_mask: Any = None,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    providers: Any = "cpu",
    progress: bool = True,
) -> np.ndarray:
    """Greedy tokens from an exported decoder: ``(batch, prompt + new)`` int64, prompt first.

    ``session_or_path``: an ``onnxruntime.InferenceSession`` (or graphlora's) or a model path
    (then a :class:`graphlora.onnx.InferenceSession` at accuracy level 0 on ``providers``).
    ``input_ids``/``attention_mask``: numpy arrays or torch tensors, left padding allowed.
    """
    session = _session(session_or_path, providers)
    past_inputs = _past_inputs(session)
    ids = np.asarray(input_ids.cpu() if hasattr(input_ids, "cpu") else input_ids).astype(np.int64)
    if ids.ndim != 2 or ids.shape[1] == 0:
        raise InputError(f"input_ids must be (batch, sequence) with at least one token, got shape {ids.shape}")
    mask = (np.ones_like(ids) if attention_mask is None else
            np.asarray(attention_mask.cpu() if hasattr(attention_mask, "cpu") else attention_mask).astype(np.int64))
    if mask.shape != ids.shape:
        raise InputError(f"attention_mask has shape {mask.shape}, input_ids {ids.shape}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise InputError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    eos = set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))
    if eos and pad_token_id is None:
        pad_token_id = min(eos)
    batch = ids.shape[0]
    feeds: dict[str, np.ndarray] = {
        name: np.zeros((batch, heads, 0, head_dim), dtype) for name, heads, head_dim, dtype in past_inputs
    }
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    step_ids, step_pos = ids, np.where(mask == 0, 1, positions)
    output_names = [o.name for o in session.get_outputs()]
    present = {f"present.{name[len('past_key_values.'):]}": name for name, *_ in past_inputs}
    tokens = [ids]
    done = np.zeros(batch, dtype=bool)
    steps = range(max_new_tokens)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc="generate", leave=False)
    for _ in steps:
        feeds.update(input_ids=step_ids, attention_mask=mask, position_ids=step_pos)
        outputs = dict(zip(output_names, session.run(output_names, feeds)))
        new = outputs["logits"][:, -1].argmax(-1).astype(np.int64)
        if pad_token_id is not None:
            new = np.where(done, pad_token_id, new)
        tokens.append(new[:, None])
        done |= np.isin(new, list(eos)) if eos else False
        for out_name, in_name in present.items():
            feeds[in_name] = outputs[out_name]
        mask = np.concatenate([mask, np.ones((batch, 1), np.int64)], axis=1)
        step_ids = new[:, None]
        step_pos = step_pos[:, -1:] + 1
        if eos and done.all():
            break
    return np.concatenate(tokens, axis=1)
