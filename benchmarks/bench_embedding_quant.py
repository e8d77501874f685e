"""MiniLM's int4 ONNX export with and without its embeddings quantized: file size and held-out
cosine (torch and onnxruntime) against the fp32 model.

    python benchmarks/bench_embedding_quant.py

The linears are int4 symmetric in blocks of 32 either way; the second row adds an ``embedding``
rule (word, position and token-type tables, int4 per row in blocks of 32). 256 held-out sentences.
"""
import os, tempfile, time, torch
torch.set_num_threads(1)
import graphlora
from graphlora import LoraRule, QuantRule
from graphlora.recipes import load_minilm, text_splits, batches, reference_embeddings, heldout_cosine, embed
from graphlora.onnx import InferenceSession, export_onnx
import numpy as np
model, tok = load_minilm()
split = text_splits()
ev = batches(tok, split.heldout[:256], 32)
ref = reference_embeddings(model, ev)
ex = ev[0]
linears = QuantRule(r".*(query|key|value|dense)", weight_qtype="int4", group_size=32)
emb = QuantRule(r"embeddings\.(word|position|token_type)_embeddings", weight_qtype="int4", group_size=32, site_kinds=("embedding",))
for name, rules in [("linears int4", [linears]), ("linears + embeddings int4", [linears, emb])]:
    lm = graphlora.transform(model, rules, (), dict(ex), progress=False)
    cos = heldout_cosine(lm, ev, ref)
    d = tempfile.mkdtemp(); p = os.path.join(d, "m.onnx")
    export_onnx(lm, p, (), dict(ex), lora="merged")
    size = sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d))
    s = InferenceSession(p, "cpu")
    outs = []
    for b in ev:
        feed = {i.name: b[i.name].numpy() for i in s.get_inputs()}
        h = torch.from_numpy(s.run(None, feed)[0]); m = b["attention_mask"][..., None].float()
        outs.append((h * m).sum(1) / m.sum(1))
    ocos = float(np.mean([torch.nn.functional.cosine_similarity(o, r).mean().item() for o, r in zip(outs, ref)]))
    print(f"{name}: sites {len(lm.sites)}, torch cosine {cos:.4f}, ONNX {size/2**20:.1f} MiB, ONNX cosine {ocos:.4f}", flush=True)
