"""Activation checkpointing: memory of one LoRA training step with and without it, graphlora and
PEFT + transformers' own gradient checkpointing, on a Llama built from a config.

Every configuration runs in a fresh subprocess (so one's freed memory cannot hide another's
peak), configurations interleaved over several rounds; medians are printed. Per step:

* ``peak_mb``: the peak resident set size during one forward + backward over the RSS right
  before it (Linux: ``/proc/self/clear_refs`` resets the peak, ``malloc_trim`` first returns
  freed memory, so the step's own allocations show);
* ``saved_mb``: the bytes autograd keeps for backward (distinct storages packed by
  ``saved_tensors_hooks``), the quantity checkpointing trades for recomputation;
* ``step_s``: the median time of a forward + backward.

Usage: ``python benchmarks/bench_grad_checkpointing.py [--rounds 3] [--seq 512] [--batch 4]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

CONFIGS = ("graphlora", "graphlora_checkpointed", "peft", "peft_checkpointed")


def _model(layers: int, hidden: int, vocab: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(num_hidden_layers=layers, hidden_size=hidden, intermediate_size=int(hidden * 8 / 3) // 32 * 32,
                      num_attention_heads=hidden // 64, num_key_value_heads=max(1, hidden // 256),
                      vocab_size=vocab, max_position_embeddings=4096)
    return LlamaForCausalLM(cfg).eval()


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> None:
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc
        pass
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # reset VmHWM, the peak RSS, to the current RSS


def measure(config: str, layers: int, hidden: int, vocab: int, seq: int, batch: int, steps: int) -> dict:
    """One configuration in this process (called in a fresh subprocess by :func:`run`)."""
    import torch

    torch.manual_seed(0)
    model = _model(layers, hidden, vocab)
    x = torch.randint(0, vocab, (batch, seq))
    checkpointed = config.endswith("_checkpointed")
    if config.startswith("graphlora"):
        import graphlora

        lm = graphlora.transform(model, [graphlora.LoraRule(r".*(q|v)_proj", rank=16, alpha=16.0)],
                                 (x[:2, :16],), progress=False)
        if checkpointed:
            lm.gradient_checkpointing_enable()
    else:
        import peft

        if checkpointed:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        lm = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                                        lora_dropout=0.0))
    lm.train()

    def step() -> None:
        lm.zero_grad(set_to_none=True)
        loss = lm(input_ids=x, labels=x, use_cache=False).loss
        loss.backward()

    step()  # warm-up: graphs, fused and checkpointed copies, first allocations
    saved: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    _reset_peak()
    before = _rss_kb("VmRSS")
    step()
    peak = _rss_kb("VmHWM")
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {"peak_mb": (peak - before) / 1024, "saved_mb": sum(saved.values()) / 2**20,
            "step_s": statistics.median(times)}


def run(rounds: int = 3, layers: int = 8, hidden: int = 512, vocab: int = 8000, seq: int = 512, batch: int = 4,
        steps: int = 3) -> dict:
    """Every configuration in fresh subprocesses, interleaved over ``rounds``; medians and ratios."""
    samples: dict[str, list[dict]] = {c: [] for c in CONFIGS}
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    for _ in range(rounds):
        for config in CONFIGS:
            args = [sys.executable, __file__, "--one", config, "--layers", str(layers), "--hidden", str(hidden),
                    "--vocab", str(vocab), "--seq", str(seq), "--batch", str(batch), "--steps", str(steps)]
            done = subprocess.run(args, capture_output=True, text=True, env=env, check=True)
            samples[config].append(json.loads(done.stdout.strip().splitlines()[-1]))
    result: dict = {"shape": f"Llama {layers} layers x {hidden}, vocab {vocab}; batch {batch} x {seq} tokens; "
                             "LoRA r16 on q_proj, v_proj", "rounds": rounds, "load": os.getloadavg()[0]}
    for config, runs in samples.items():
        for key in ("peak_mb", "saved_mb", "step_s"):
            result[f"{config}_{key}"] = statistics.median(r[key] for r in runs)
    for lib in ("graphlora", "peft"):
        for key in ("peak_mb", "saved_mb", "step_s"):
            result[f"{lib}_checkpointed_over_plain_{key}"] = result[f"{lib}_checkpointed_{key}"] / result[f"{lib}_{key}"]
    result["graphlora_over_peft_checkpointed_peak_mb"] = result["graphlora_checkpointed_peak_mb"] / result["peft_checkpointed_peak_mb"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--one", choices=CONFIGS, help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    shape = dict(layers=args.layers, hidden=args.hidden, vocab=args.vocab, seq=args.seq, batch=args.batch)
    if args.one:
        print(json.dumps(measure(args.one, steps=args.steps, **shape)))
        return
    result = run(rounds=args.rounds, steps=args.steps, **shape)
    print(f"{result['shape']}; medians of {result['rounds']} rounds (load {result['load']:.1f})")
    print(f"{'':24s} {'peak RSS MB':>12s} {'saved MB':>10s} {'s/step':>8s}")
    for config in CONFIGS:
        print(f"{config:24s} {result[config + '_peak_mb']:12.1f} {result[config + '_saved_mb']:10.1f} "
              f"{result[config + '_step_s']:8.3f}")
    for lib in ("graphlora", "peft"):
        print(f"{lib}: checkpointed / plain  peak {result[lib + '_checkpointed_over_plain_peak_mb']:.2f}, "
              f"saved {result[lib + '_checkpointed_over_plain_saved_mb']:.2f}, "
              f"time {result[lib + '_checkpointed_over_plain_step_s']:.2f}")
    print(f"graphlora / PEFT, both checkpointed: peak {result['graphlora_over_peft_checkpointed_peak_mb']:.2f}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
