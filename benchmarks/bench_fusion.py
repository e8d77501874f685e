"""Execution fusion vs the canonical graph: ``fused_execution=True`` against ``False``.

One LoraModel of a Llama built from a config (random weights; LoRA r16 on every projection, so
q/k/v and gate/up are sibling groups), switched between ``fused_execution=True`` (LoRA branches
as ``graphlora::lora_linear``, sibling projections as one GEMM) and ``False`` (the canonical
graph, op for op). Both run the same parameters; the switch only picks the executable, so rounds
interleave the two. Sizes go from one token (decode-like) to 16 x 512 tokens (a training batch);
each size is timed as an eval forward under ``no_grad`` and as a training step (forward +
backward, LoRA gradients only). Medians of at least ``--rounds`` rounds (more for the cheap sizes,
about 4 s of each system), one torch thread unless ``--threads``. Usage: ``python benchmarks/bench_fusion.py [--rounds 3] [--layers 4]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings

SIZES = ((1, 1), (1, 16), (1, 128), (4, 128), (4, 512), (16, 512))
TRAIN_SIZES = ((1, 16), (4, 128), (16, 512))


def build(layers: int = 4, hidden: int = 768, vocab: int = 8000):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import graphlora
    from graphlora import LoraRule

    torch.manual_seed(0)
    cfg = LlamaConfig(num_hidden_layers=layers, hidden_size=hidden, intermediate_size=int(hidden * 8 / 3) // 32 * 32,
                      num_attention_heads=hidden // 64, num_key_value_heads=max(1, hidden // 256),
                      vocab_size=vocab, max_position_embeddings=1024, pad_token_id=0)
    base = LlamaForCausalLM(cfg).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lm = graphlora.transform(base, [LoraRule(r".*_proj", rank=16, alpha=32.0)],
                                 (torch.zeros(2, 16, dtype=torch.long),))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in lm.lora_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return lm


def _forward_s(lm, ids) -> float:
    import torch

    lm.eval()
    with torch.no_grad():
        start = time.perf_counter()
        lm(input_ids=ids)
        return time.perf_counter() - start


def _train_s(lm, ids) -> float:
    lm.train()
    start = time.perf_counter()
    out = lm(input_ids=ids, labels=ids)
    out.loss.backward()
    elapsed = time.perf_counter() - start
    lm.zero_grad(set_to_none=True)
    return elapsed


def run(rounds: int = 3, layers: int = 4, threads: int = 1) -> dict:
    import torch

    torch.set_num_threads(threads)
    lm = build(layers)
    gen = torch.Generator().manual_seed(2)
    results: dict = {"forward": {}, "train": {}}
    for kind, sizes, timer in (("forward", SIZES, _forward_s), ("train", TRAIN_SIZES, _train_s)):
        for batch, seq in sizes:
            ids = torch.randint(3, lm.config.vocab_size, (batch, seq), generator=gen)
            times: dict[bool, list[float]] = {True: [], False: []}
            first = 0.0
            for fused in (True, False):  # warm-up: each executable built and run once
                lm.fused_execution = fused
                timer(lm, ids)
                first = max(first, timer(lm, ids))
            # a noisy shared machine: cheap sizes get more rounds (about 4 s of each system)
            n = max(rounds, min(61, int(4.0 / max(first, 1e-3))))
            for r in range(n):
                for fused in ((True, False) if r % 2 == 0 else (False, True)):
                    lm.fused_execution = fused
                    times[fused].append(timer(lm, ids))
            row = {"fused_ms": 1e3 * statistics.median(times[True]),
                   "canonical_ms": 1e3 * statistics.median(times[False]), "rounds": n}
            row["ratio"] = row["fused_ms"] / row["canonical_ms"]
            results[kind][f"{batch}x{seq}"] = row
            print(f"{kind:8s} {batch:3d} x {seq:4d}: fused {row['fused_ms']:9.2f} ms  canonical "
                  f"{row['canonical_ms']:9.2f} ms  ratio {row['ratio']:.3f}  ({n} rounds)", flush=True)
    lm.fused_execution = True
    params = sum(p.numel() for p in lm.parameters())
    results["rounds"] = rounds
    results["shape"] = (f"Llama {layers} layers x 768, vocab {lm.config.vocab_size}, {params / 1e6:.0f}M parameters; "
                        f"LoRA r16 on every projection; {threads} torch thread(s)")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    print(json.dumps(run(args.rounds, args.layers, args.threads), indent=2))


if __name__ == "__main__":
    main()
