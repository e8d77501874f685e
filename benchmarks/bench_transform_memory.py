"""Peak memory of ``graphlora.transform`` (QLoRA) over the loaded float model, on CPU.

A Llama with ~100M parameters (hidden 768, 12 layers, intermediate 2048, 12 heads, vocabulary
32000; float32, random weights from a ``LlamaConfig``) is built in a fresh subprocess; then

* ``model_mib``: the RSS after building it (gc + ``malloc_trim``) minus the RSS before;
* ``param_mib``: the float model's parameter bytes;
* ``peak_over_mib``: the peak RSS during ``transform`` (``VmHWM``, reset to the current RSS right
  before it) minus the RSS of the loaded model, and ``peak_over_ratio`` that over ``param_mib``.

Rules: NF4 (or int4), block 64, on every linear layer of the blocks, LoRA rank 16 on
``q_proj``/``v_proj``. Issue 16's goal: the peak at most 10% of the float model over it.

Usage: ``python benchmarks/bench_transform_memory.py [--qtype nf4 int4]``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
from bench_qlora_memory import _reset_peak, _status_kb, _trim  # noqa: E402

SHAPE = dict(hidden_size=768, num_hidden_layers=12, intermediate_size=2048, num_attention_heads=12,
             num_key_value_heads=12, vocab_size=32000, max_position_embeddings=512)
MIB = 2**20


def _rules(qtype: str) -> list:
    from graphlora import LoraRule, QuantRule

    return [LoraRule(r".*\.(q|v)_proj", rank=16, alpha=32.0, weight_qtype=qtype, group_size=64),
            QuantRule(r".*\.(k|o|gate|up|down)_proj", weight_qtype=qtype, group_size=64)]


def child(qtype: str, shape: dict) -> dict:
    """One measurement in this (fresh) process."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import graphlora

    torch.set_num_threads(1)
    torch.manual_seed(0)
    _trim()
    before_kb = _status_kb("VmRSS")
    model = LlamaForCausalLM(LlamaConfig(**shape, tie_word_embeddings=False)).eval()
    _trim()
    loaded_kb = _status_kb("VmRSS")
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    example = {"input_ids": torch.zeros(1, 16, dtype=torch.long)}
    _reset_peak()
    start_kb = _status_kb("VmRSS")
    start = time.perf_counter()
    lm = graphlora.transform(model, _rules(qtype), example_kwargs=example, progress=False)
    seconds = time.perf_counter() - start
    peak_kb = _status_kb("VmHWM")
    del model
    _trim()
    after_kb = _status_kb("VmRSS")
    with torch.no_grad():
        logits = lm(input_ids=torch.arange(1, 9).unsqueeze(0)).logits
    return {
        "qtype": qtype, "params_m": param_bytes / 4 / 1e6,
        "param_mib": param_bytes / MIB, "model_mib": (loaded_kb - before_kb) / 1024,
        "loaded_mib": loaded_kb / 1024, "start_mib": start_kb / 1024, "peak_mib": peak_kb / 1024,
        "peak_over_mib": (peak_kb - loaded_kb) / 1024, "peak_over_ratio": (peak_kb - loaded_kb) * 1024 / param_bytes,
        "after_mib": after_kb / 1024, "transform_s": seconds, "logit_sum": float(logits.double().sum()),
    }


def measure(qtype: str, shape: dict | None = None) -> dict:
    """:func:`child` in a fresh subprocess (so no other allocation is in the peak)."""
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", qtype, "--shape", json.dumps(shape or SHAPE)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{qtype} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(qtypes: tuple[str, ...] = ("nf4", "int4")) -> dict:
    rows = []
    for qtype in qtypes:
        row = measure(qtype)
        print(json.dumps(row), flush=True)
        rows.append(row)
    return {"shape": SHAPE, "rows": rows, "load": os.getloadavg()[0]}


def table(r: dict) -> str:
    lines = ["| qtype | float params MiB | loaded model RSS MiB | transform peak over it MiB | ratio to params | RSS after (model dropped) MiB | transform s |",
             "|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        lines.append(f"| {row['qtype']} | {row['param_mib']:.0f} | {row['model_mib']:.0f} | "
                     f"{row['peak_over_mib']:.0f} | {row['peak_over_ratio']:.3f} | {row['after_mib']:.0f} | {row['transform_s']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--qtype", nargs="*", default=["nf4", "int4"])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--shape", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, json.loads(args.shape))))
        return
    result = run(tuple(args.qtype))
    print(table(result))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
