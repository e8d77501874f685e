"""Trace + transform a Llama-3-8B-shaped model on the meta device (no weights allocated).

32 layers, hidden 4096, intermediate 14336, 32 heads / 8 KV heads, vocab 128256: 224 linear
projections plus lm_head = 225 sites. Prints torch.export time and graphlora's pass time
separately (goal: passes <= 1 s), and what a per-pass graph diff costs on a graph this size
(``graph_text`` of the traced and transformed graphs, and their ``diff``).
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def run(rank: int = 16) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    import graphlora
    from graphlora.passes.base import PassPipeline
    from graphlora.pipeline import build_passes
    from graphlora.rules import normalize_rules

    cfg = LlamaConfig(num_hidden_layers=32, hidden_size=4096, intermediate_size=14336,
                      num_attention_heads=32, num_key_value_heads=8, vocab_size=128256)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    ids = torch.zeros(1, 16, dtype=torch.long, device="meta")
    t0 = time.perf_counter()
    gm = graphlora.trace(model, (ids,), {"use_cache": False})
    export_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    traced_text = graphlora.graph_text(gm)
    traced_text_s = time.perf_counter() - t0
    rules = normalize_rules([graphlora.LoraRule(r".*(_proj|lm_head)", rank=rank)])
    pipeline = PassPipeline(build_passes(rules, strict=False, adapter="default"))
    t0 = time.perf_counter()
    gm = pipeline(gm)
    pass_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    transformed_text = graphlora.graph_text(gm)
    text_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    changed = graphlora.diff(traced_text, transformed_text)
    diff_s = time.perf_counter() - t0
    sites = sum(1 for n in gm.graph.nodes if n.meta.get("graphlora", {}).get("role") == "base")
    t0 = time.perf_counter()
    lm = graphlora.transform(model, rules, (ids,), {"use_cache": False})
    transform_s = time.perf_counter() - t0
    return {
        "sites": sites,
        "nodes": len(gm.graph.nodes),
        "torch_export_s": export_s,
        "graphlora_passes_s": pass_s,
        "passes_by_name_s": {r.name: r.seconds for r in pipeline.log},
        "transform_total_s": transform_s,
        "graph_text_traced_s": traced_text_s,
        "graph_text_transformed_s": text_s,
        "diff_s": diff_s,
        "diff_summary": changed.summary,
        "lora_params": sum(p.numel() for p in lm.lora_parameters()),
    }


if __name__ == "__main__":
    argparse.ArgumentParser(description=__doc__).parse_args()
    print(json.dumps(run(), indent=2))
