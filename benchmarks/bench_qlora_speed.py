"""QLoRA forward speed: graphlora (nf4 and int4 bases) vs PEFT + bitsandbytes nf4 vs the fp32 model.

A Llama built from a config (random weights), every linear of the decoder blocks (q, k, v, o,
gate, up, down) with LoRA r16 (non-zero factors) on a 4-bit base of group 64; ``lm_head`` stays
float, as bitsandbytes leaves it. The peer is what a QLoRA user runs without graphlora: the same
weights loaded by ``from_pretrained(quantization_config=BitsAndBytesConfig(load_in_4bit=True,
bnb_4bit_quant_type="nf4"))`` with PEFT's ``LoraConfig`` on the same modules; the fp32 row is the
transformers model itself. Forward in eval mode under ``torch.no_grad()`` at 1 x 1, 1 x 16 and
4 x 512 tokens; configurations interleaved (each leads a round), medians and ratios, one torch
thread. graphlora runs with its defaults unless ``--cache`` (the opt-in dequantized-weight cache,
:attr:`graphlora.LoraModel.cache_dequantized_weights`) is given; both are printed with ``--both``.

Usage: ``python benchmarks/bench_qlora_speed.py [--rounds 5] [--prefill-rounds 3] [--profile]``
(needs ``bitsandbytes`` >= 0.48 for its CPU backend; without it the PEFT row is skipped).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
import warnings

SHAPES = ((1, 1), (1, 16), (4, 512))
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _base(layers: int, hidden: int, vocab: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(num_hidden_layers=layers, hidden_size=hidden, intermediate_size=int(hidden * 8 / 3) // 32 * 32,
                      num_attention_heads=hidden // 64, num_key_value_heads=max(1, hidden // 256), vocab_size=vocab,
                      max_position_embeddings=4096, pad_token_id=0, use_cache=False)
    return LlamaForCausalLM(cfg).eval()


def _factors(params) -> None:
    import torch

    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02)


def graphlora_model(base, qtype: str, cache: bool = False):
    import torch

    import graphlora
    from graphlora import LoraRule

    rule = LoraRule(r".*\.(" + "|".join(TARGETS) + ")", rank=16, alpha=32.0, weight_qtype=qtype, group_size=64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lm = graphlora.transform(base, [rule], (torch.zeros(1, 16, dtype=torch.long),), progress=False)
    _factors(lm.lora_parameters())
    lm.cache_dequantized_weights = cache
    return lm.eval()


def peft_bnb_model(base):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base.save_pretrained(tmp)
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
        model = LlamaForCausalLM.from_pretrained(tmp, quantization_config=q, device_map="cpu", dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, lora_dropout=0.0))
    _factors(p for n, p in model.named_parameters() if "lora_" in n)
    return model.eval()


def _forward_s(model, ids) -> float:
    import torch

    start = time.perf_counter()
    with torch.no_grad():
        model(input_ids=ids)
    return time.perf_counter() - start


def systems(base, cache: str = "off") -> dict:
    out = {"fp32": base}
    for qtype in ("nf4", "int4"):
        if cache in ("off", "both"):
            out[f"graphlora_{qtype}"] = graphlora_model(base, qtype)
        if cache in ("on", "both"):
            out[f"graphlora_{qtype}_cached"] = graphlora_model(base, qtype, cache=True)
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return out
    out["peft_bnb_nf4"] = peft_bnb_model(base)
    return out


def run(rounds: int = 5, prefill_rounds: int = 3, layers: int = 12, hidden: int = 768, vocab: int = 32000,
        threads: int = 1, cache: str = "both", shapes=SHAPES) -> dict:
    import torch

    torch.set_num_threads(threads)
    base = _base(layers, hidden, vocab)
    models = systems(base, cache)
    gen = torch.Generator().manual_seed(3)
    inputs = {s: torch.randint(1, vocab, s, generator=gen) for s in shapes}
    for ids in inputs.values():  # warm-up (and graphlora's first call per shape)
        for model in models.values():
            _forward_s(model, ids)
    samples: dict = {(name, s): [] for name in models for s in shapes}
    order = list(models.items())
    for r in range(rounds):
        for s, ids in inputs.items():
            if s[0] * s[1] >= 1024 and r >= prefill_rounds:
                continue
            for name, model in order[r % len(order):] + order[:r % len(order)]:
                samples[(name, s)].append(_forward_s(model, ids))
    params = sum(p.numel() for p in base.parameters())
    result: dict = {
        "shape": f"Llama {layers} layers x {hidden}, vocab {vocab} ({params / 1e6:.0f}M parameters); LoRA r16 on "
                 f"{', '.join(TARGETS)}; 4-bit base, group 64; eval, no_grad; {threads} torch thread(s)",
        "rounds": rounds, "prefill_rounds": prefill_rounds, "load": os.getloadavg()[0], "systems": list(models),
        "shapes": [f"{b}x{t}" for b, t in shapes],
    }
    for (name, (b, t)), values in samples.items():
        result[f"{name}_ms_{b}x{t}"] = 1000 * statistics.median(values)
    for b, t in shapes:
        for name in models:
            for peer in ("peft_bnb_nf4", "fp32"):
                if peer in models and name != peer:
                    result[f"{name}_over_{peer}_{b}x{t}"] = result[f"{name}_ms_{b}x{t}"] / result[f"{peer}_ms_{b}x{t}"]
    return result


def profile(qtype: str = "nf4", shape=(1, 16), layers: int = 12, hidden: int = 768, vocab: int = 32000,
            cache: bool = False, rows: int = 12) -> str:
    """torch.profiler's table of where one graphlora forward spends its time."""
    import torch
    from torch.profiler import ProfilerActivity, profile as torch_profile

    torch.set_num_threads(1)
    model = graphlora_model(_base(layers, hidden, vocab), qtype, cache)
    ids = torch.randint(1, vocab, shape)
    _forward_s(model, ids)
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        _forward_s(model, ids)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--prefill-rounds", type=int, default=3)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache", choices=("off", "on", "both"), default="both")
    parser.add_argument("--profile", choices=("nf4", "int4"), help="print the profile of one forward instead")
    parser.add_argument("--profile-shape", default="1x16")
    args = parser.parse_args()
    if args.profile:
        b, t = (int(v) for v in args.profile_shape.split("x"))
        print(profile(args.profile, (b, t), args.layers, args.hidden, args.vocab, cache=args.cache == "on"))
        return
    r = run(args.rounds, args.prefill_rounds, args.layers, args.hidden, args.vocab, args.threads, args.cache)
    print(f"{r['shape']}; medians of {r['rounds']} rounds ({r['prefill_rounds']} at 4x512; load {r['load']:.1f})")
    print(f"{'ms per forward':28s} " + " ".join(f"{s:>10s}" for s in r["shapes"]))
    for name in r["systems"]:
        print(f"{name:28s} " + " ".join(f"{r[f'{name}_ms_{s}']:10.2f}" for s in r["shapes"]))
    for peer in ("peft_bnb_nf4", "fp32"):
        for name in r["systems"]:
            if name.startswith("graphlora") and f"{name}_over_{peer}_{r['shapes'][0]}" in r:
                print(f"{name + ' / ' + peer:44s} " + " ".join(f"{r[f'{name}_over_{peer}_{s}']:6.2f}" for s in r["shapes"]))
    print(json.dumps(r))


if __name__ == "__main__":
    main()
