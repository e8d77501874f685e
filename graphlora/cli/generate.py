"""``graphlora generate``: greedy tokens from an exported KV-cache decoder with plain onnxruntime.

For users who deploy without onnxruntime-genai: the directory ``graphlora.onnx.write_genai``
writes (or a decoder ``.onnx`` file ``export_onnx`` wrote) runs token by token with its cache
(:func:`graphlora.onnx.generate`). A prompt is text when the directory holds tokenizer files,
or token ids given with ``--ids``; eos and pad come from ``genai_config.json`` when present.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from graphlora.cli.app import subcommand, wrap_help
from graphlora.errors import InputError
from graphlora.onnx.genai import CONFIG_NAME, MODEL_NAME


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("decoder", help="a directory from write_genai, or a decoder .onnx file")
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="text, tokenized with the directory's tokenizer")
    prompt.add_argument("--ids", help="comma-separated token ids of one prompt, e.g. 1,15,27")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--json", action="store_true", help="print {\"ids\": [...], \"text\": ...} as JSON")
    parser.add_argument("--providers", default="cpu", help="onnxruntime providers: cpu (default), auto or cuda")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _paths(decoder: str) -> tuple[Path, Path | None]:
    path = Path(decoder)
    if path.is_dir():
        model = path / MODEL_NAME
        if not model.is_file():
            raise InputError(f"{path} holds no {MODEL_NAME}: give a directory written by write_genai or an .onnx file")
        return model, path
    if not path.is_file():
        raise InputError(f"{path} does not exist (expected a decoder directory or .onnx file)")
    return path, path.parent


def _prompt_ids(args: argparse.Namespace, directory: Path | None):
    import numpy as np

    if args.ids is not None:
        try:
            ids = [int(t) for t in args.ids.split(",") if t.strip()]
        except ValueError:
            raise InputError(f"--ids must be comma-separated integers, got {args.ids!r}") from None
        if not ids or min(ids) < 0:
            raise InputError(f"--ids needs at least one non-negative token id, got {args.ids!r}")
        return np.asarray([ids], dtype=np.int64), None
    from graphlora.model_source import load_tokenizer

    tokenizer = load_tokenizer(directory) if directory is not None else None
    if tokenizer is None:
        raise InputError(f"--prompt needs tokenizer files next to the decoder ({directory}); pass --ids instead")
    return np.asarray([tokenizer(args.prompt)["input_ids"]], dtype=np.int64), tokenizer


def _special_tokens(directory: Path | None) -> tuple[object, object]:
    config = directory / CONFIG_NAME if directory is not None else None
    if config is None or not config.is_file():
        return None, None
    from graphlora.io.json_file import read_json

    model = read_json(config, what="onnxruntime-genai config").get("model", {})
    return model.get("eos_token_id"), model.get("pad_token_id")


@subcommand(
    "generate",
    help="greedy tokens from an exported KV-cache decoder, with plain onnxruntime",
    arguments=_arguments,
    description=wrap_help(
        "Run DECODER (a directory from graphlora.onnx.write_genai, or a decoder .onnx from export_onnx "
        "on a causal LM) greedily with its KV cache: one token of compute per new token. The prompt is "
        "--prompt TEXT (the directory's tokenizer) or --ids 1,15,27; eos and pad come from "
        "genai_config.json when the directory has one. Prints the new text (or ids).",
    ),
)
def run(args: argparse.Namespace) -> int:
    from graphlora.onnx.greedy import generate

    if args.max_new_tokens < 1:
        raise InputError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    model, directory = _paths(args.decoder)
    ids, tokenizer = _prompt_ids(args, directory)
    eos, pad = _special_tokens(directory)
    out = generate(str(model), ids, args.max_new_tokens, eos_token_id=eos, pad_token_id=pad,
                   providers=args.providers, progress=not args.no_progress)
    new = [int(t) for t in out[0, ids.shape[1]:]]
    text = tokenizer.decode(new, skip_special_tokens=True) if tokenizer is not None else None
    if args.json:
        print(json.dumps({"ids": new, "text": text}))
    else:
        print(text if text is not None else " ".join(map(str, new)))
    return 0
