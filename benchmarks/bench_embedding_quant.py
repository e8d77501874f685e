"""MiniLM's int4 ONNX export with and without its embeddings quantized: file size and held-out
cosine (torch and onnxruntime) against the fp32 model.

    python benchmarks/bench_embedding_quant.py

The linears are int4 symmetric in blocks of 32 either way; the second row adds an ``embedding``
rule (word, position and token-type tables, int4 per row in blocks of 32). 256 held-out sentences.
"""

from __future__ import annotations

import json
import os
import tempfile

import torch

LINEARS = r".*(query|key|value|dense)"
EMBEDDINGS = r"embeddings\.(word|position|token_type)_embeddings"


def run(sentences: int = 256) -> list[dict]:
    import graphlora
    from graphlora import QuantRule
    from graphlora.onnx import export_onnx
    from graphlora.recipes import batches, heldout_cosine, load_minilm, reference_embeddings, text_splits

    from bench_full_integer import onnx_file_cosine

    torch.set_num_threads(1)
    model, tokenizer = load_minilm()
    held = batches(tokenizer, text_splits().heldout[:sentences], 32)
    reference = reference_embeddings(model, held)
    linears = QuantRule(LINEARS, weight_qtype="int4", group_size=32)
    tables = QuantRule(EMBEDDINGS, weight_qtype="int4", group_size=32, site_kinds=("embedding",))
    rows = []
    for name, rules in (("linears int4", [linears]), ("linears + embeddings int4", [linears, tables])):
        lm = graphlora.transform(model, rules, (), dict(held[0]), progress=False)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "model.onnx")
            export_onnx(lm, path, (), dict(held[0]), lora="merged")
            size = sum(os.path.getsize(os.path.join(tmp, f)) for f in os.listdir(tmp))
            rows.append({"rules": name, "sites": len(lm.sites), "torch_cosine": heldout_cosine(lm, held, reference),
                         "onnx_mib": size / 2**20, "onnx_cosine": onnx_file_cosine(path, held, reference)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    run()
