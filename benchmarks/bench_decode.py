"""Decode latency of ``LoraModel.generate`` vs transformers' ``generate()`` on the merged model.

A Llama built from a config (random weights), LoRA r16 on q/k/v/o with non-zero factors. The
peer is what a user ships without graphlora: the LoRA delta merged into the weights
(``save_pretrained(save_adapters_separately=False)`` loaded by ``LlamaForCausalLM.from_pretrained``),
generating with transformers' default cache; transformers with its static cache is printed too.
The QLoRA rows are graphlora with an NF4 base (group 64, every linear of the blocks, as
bitsandbytes quantizes them) with its defaults and with ``cache_dequantized_weights=True``,
against PEFT + bitsandbytes nf4 on the same weights (``BitsAndBytesConfig(load_in_4bit=True,
bnb_4bit_quant_type="nf4")``, the same LoRA factors, transformers' ``generate()``), when
bitsandbytes is installed.

Per-token decode latency at a context of C tokens: a greedy ``generate`` of ``1 + N`` new tokens
minus one of 1 new token (the prefill and the first token), divided by N, so the prompt's
prefill is not counted. Configurations interleaved, several rounds, medians and ratios; one torch
thread unless ``--threads``. Usage: ``python benchmarks/bench_decode.py [--rounds 5] [--new 16]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
import warnings

CONTEXTS = (32, 256)


def _base(layers: int, hidden: int, vocab: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(num_hidden_layers=layers, hidden_size=hidden, intermediate_size=int(hidden * 8 / 3) // 32 * 32,
                      num_attention_heads=hidden // 64, num_key_value_heads=max(1, hidden // 256), vocab_size=vocab,
                      max_position_embeddings=4096, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def _lora(base, cache: bool = False, **quant):
    import torch

    import graphlora
    from graphlora import LoraRule, QuantRule

    rules = [LoraRule(r".*(q|k|v|o)_proj", rank=16, alpha=32.0, **quant)]
    if quant:  # the MLP's linears too, as bitsandbytes quantizes every linear but lm_head
        rules.append(QuantRule(r".*(gate|up|down)_proj", **quant))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lm = graphlora.transform(base, rules, (torch.zeros(1, 16, dtype=torch.long),), progress=False)
    lm.cache_dequantized_weights = cache
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in lm.lora_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return lm.eval()


def _peft_bnb(base, lm):
    """PEFT + bitsandbytes nf4 on the same weights, with graphlora's LoRA factors (PEFT names)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base.save_pretrained(tmp)
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
        model = LlamaForCausalLM.from_pretrained(tmp, quantization_config=q, device_map="cpu", dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    own = dict(lm.lora_state_dict())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                key = name.replace("base_model.model.", "").replace(".default", "")
                p.copy_(own[key])
    return model.eval()


def _generate_s(model, ids, new: int, **options) -> float:
    import torch

    mask = torch.ones_like(ids)
    start = time.perf_counter()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                             pad_token_id=0, **options)
    elapsed = time.perf_counter() - start
    assert out.shape[1] == ids.shape[1] + new
    return elapsed


def run(rounds: int = 5, new: int = 16, layers: int = 12, hidden: int = 768, vocab: int = 32000,
        threads: int = 1, qlora: bool = True) -> dict:
    import torch
    from transformers import LlamaForCausalLM

    torch.set_num_threads(threads)
    base = _base(layers, hidden, vocab)
    lm = _lora(base)
    with tempfile.TemporaryDirectory() as tmp:
        lm.save_pretrained(tmp, save_adapters_separately=False)
        merged = LlamaForCausalLM.from_pretrained(tmp).eval()
    systems = {
        "graphlora_lora": (lm, {}),
        "transformers_merged": (merged, {}),
        "transformers_merged_static": (merged, {"cache_implementation": "static"}),
    }
    if qlora:
        systems["graphlora_qlora_nf4"] = (_lora(base, weight_qtype="nf4", group_size=64), {})
        systems["graphlora_qlora_nf4_cached"] = (_lora(base, cache=True, weight_qtype="nf4", group_size=64), {})
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            pass
        else:
            systems["peft_bnb_nf4"] = (_peft_bnb(base, systems["graphlora_qlora_nf4"][0]), {})
    gen = torch.Generator().manual_seed(3)
    prompts = {c: torch.randint(1, vocab, (1, c), generator=gen) for c in CONTEXTS}
    equal = {}
    for c, ids in prompts.items():  # warm-up: traces graphlora's prefill and decode graphs once
        outs = {}
        for name, (model, options) in systems.items():
            _generate_s(model, ids, 2, **options)
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                outs[name] = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                                            do_sample=False, pad_token_id=0, **options)
        equal[c] = bool(torch.equal(outs["graphlora_lora"], outs["transformers_merged"]))
    samples: dict = {(name, c): [] for name in systems for c in CONTEXTS}
    order = list(systems.items())
    for r in range(rounds):
        for c, ids in prompts.items():
            for name, (model, options) in order[r % len(order):] + order[:r % len(order)]:  # each leads a round
                full = _generate_s(model, ids, new + 1, **options)
                first = _generate_s(model, ids, 1, **options)
                samples[(name, c)].append((full - first) / new)
    params = sum(p.numel() for p in base.parameters())
    result: dict = {
        "shape": f"Llama {layers} layers x {hidden}, vocab {vocab} ({params / 1e6:.0f}M parameters); batch 1; "
                 f"LoRA r16 on q,k,v,o_proj; {new} decode steps; {threads} torch thread(s)",
        "rounds": rounds, "load": os.getloadavg()[0], "greedy_tokens_equal": equal,
    }
    for (name, c), values in samples.items():
        result[f"{name}_ms_per_token_{c}"] = 1000 * statistics.median(values)
    for c in CONTEXTS:
        peer = result[f"transformers_merged_ms_per_token_{c}"]
        result[f"lora_ratio_{c}"] = result[f"graphlora_lora_ms_per_token_{c}"] / peer
        if qlora:
            result[f"qlora_ratio_{c}"] = result[f"graphlora_qlora_nf4_ms_per_token_{c}"] / peer
            if "peft_bnb_nf4" in systems:
                bnb = result[f"peft_bnb_nf4_ms_per_token_{c}"]
                for name in ("graphlora_qlora_nf4", "graphlora_qlora_nf4_cached"):
                    result[f"{name}_over_peft_bnb_{c}"] = result[f"{name}_ms_per_token_{c}"] / bnb
    result["systems"] = list(systems)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--new", type=int, default=16)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-qlora", action="store_true")
    args = parser.parse_args()
    result = run(rounds=args.rounds, new=args.new, layers=args.layers, hidden=args.hidden, vocab=args.vocab,
                 threads=args.threads, qlora=not args.no_qlora)
    print(f"{result['shape']}; medians of {result['rounds']} rounds (load {result['load']:.1f})")
    print(f"greedy tokens equal to transformers on the merged model: {result['greedy_tokens_equal']}")
    print(f"{'ms per decoded token':32s} " + " ".join(f"{'context ' + str(c):>12s}" for c in CONTEXTS))
    for name in result["systems"]:
        print(f"{name:32s} " + " ".join(f"{result[f'{name}_ms_per_token_{c}']:12.2f}" for c in CONTEXTS))
    for kind in ("lora", "qlora"):
        if f"{kind}_ratio_32" in result:
            print(f"{kind} / transformers merged (goal <= 1.0): "
                  + ", ".join(f"context {c}: {result[f'{kind}_ratio_{c}']:.2f}" for c in CONTEXTS))
    for name in ("graphlora_qlora_nf4", "graphlora_qlora_nf4_cached"):
        if f"{name}_over_peft_bnb_32" in result:
            print(f"{name} / PEFT + bitsandbytes nf4 (goal <= 1.0): "
                  + ", ".join(f"context {c}: {result[f'{name}_over_peft_bnb_{c}']:.2f}" for c in CONTEXTS))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
