"""Peak memory of QLoRA on a 1B-parameter Llama: graphlora from a checkpoint (meta model),
graphlora from the float model, PEFT + bitsandbytes NF4, all on CPU.

The model has TinyLlama-1.1B's shape (hidden 2048, 22 layers, intermediate 5632, 32 heads, 4 KV
heads, vocabulary 32000) with random weights, written once as a sharded bfloat16 safetensors
checkpoint by transformers' ``save_pretrained`` (cached in ``--workdir``). Every configuration runs
in a fresh subprocess, one at a time, rounds interleaved; each reports

* ``load_peak_gib``: the peak resident set size (``VmHWM``, what ``ru_maxrss`` reports) from
  process start through loading the checkpoint and making the QLoRA model;
* ``steady_gib``: the RSS after that, freed memory returned to the system (``malloc_trim``);
* ``step_peak_gib``: the peak RSS during one training step (forward, backward, AdamW step on the
  LoRA factors; batch 1 x 128 tokens), the peak reset to the RSS right before it;
* ``process_peak_gib``: ``ru_maxrss`` at the end (the larger of the two phases);
* ``load_s`` / ``step_s``: wall times.

Rules in every configuration: NF4 (block 64, fp16 scales, no double quantization, as
bitsandbytes' defaults) on every linear layer of the blocks, LoRA rank 16 (alpha 32) on
``q_proj``/``v_proj``; ``lm_head`` and embeddings stay float32; compute in float32.

Usage: ``python benchmarks/bench_qlora_memory.py [--workdir /tmp/graphlora-qlora-1b]
[--rounds 1] [--bnb-python /work/venvs/bnb/bin/python] [--only graphlora_meta ...]``.
The PEFT + bitsandbytes configuration runs in ``--bnb-python`` (a venv with bitsandbytes
0.50+, whose CPU backend quantizes and runs NF4); the graphlora ones too when it exists, so all
three share one interpreter.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CONFIGS = ("graphlora_meta", "graphlora_float", "peft_bnb")
SHAPE = dict(hidden_size=2048, num_hidden_layers=22, intermediate_size=5632, num_attention_heads=32,
             num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048)
SHARD = "1GB"
SEQ = 128
DEFAULT_BNB_PYTHON = "/work/venvs/bnb/bin/python"
GIB = 2**30


# ------------------------------------------------------------------------------ the checkpoint


def ensure_checkpoint(workdir: Path) -> Path:
    """The bf16 checkpoint, written once (random weights, seed 0) and reused."""
    path = workdir / "llama-1b-bf16"
    if (path / "model.safetensors.index.json").is_file():
        return path
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(1)
    torch.manual_seed(0)
    tmp = workdir / "llama-1b-bf16.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    config = LlamaConfig(**SHAPE, tie_word_embeddings=False, dtype="bfloat16")
    model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(tmp, max_shard_size=SHARD)
    del model
    tmp.rename(path)
    return path


# ------------------------------------------------------------------------------ one configuration


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _trim() -> None:
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def _reset_peak() -> None:
    _trim()
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # VmHWM := current RSS


def _graphlora_rules():
    from graphlora import LoraRule, QuantRule

    return [LoraRule(r".*\.(q|v)_proj", rank=16, alpha=32.0, weight_qtype="nf4", group_size=64),
            QuantRule(r".*\.(k|o|gate|up|down)_proj", weight_qtype="nf4", group_size=64)]


def _load(config: str, checkpoint: Path):
    """(model to train, its LoRA parameters, versions) for one configuration."""
    import torch

    example = (torch.zeros(1, 16, dtype=torch.long),)
    if config == "graphlora_meta":
        import graphlora

        lm = graphlora.from_pretrained(checkpoint, _graphlora_rules(), example, dtype=torch.float32, progress=False)
        return lm, list(lm.lora_parameters()), {"graphlora": graphlora.__version__, "graphlora_path": graphlora.__file__}
    if config == "graphlora_float":
        import graphlora
        from transformers import LlamaForCausalLM

        model = LlamaForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
        lm = graphlora.transform(model, _graphlora_rules(), example, progress=False)
        del model  # the LoraModel holds what it needs; the float weights it quantized are gone
        return lm, list(lm.lora_parameters()), {"graphlora": graphlora.__version__, "graphlora_path": graphlora.__file__}
    if config == "peft_bnb":
        import bitsandbytes
        import peft
        from transformers import BitsAndBytesConfig, LlamaForCausalLM

        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
        model = LlamaForCausalLM.from_pretrained(checkpoint, quantization_config=quant, dtype=torch.float32,
                                                 device_map="cpu")
        model.config.use_cache = False
        lora = peft.LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
        pm = peft.get_peft_model(model, lora)
        params = [p for p in pm.parameters() if p.requires_grad]
        return pm, params, {"peft": peft.__version__, "bitsandbytes": bitsandbytes.__version__}
    raise SystemExit(f"unknown configuration {config!r}")


def child(config: str, checkpoint: Path) -> dict:
    import torch
    import transformers

    torch.set_num_threads(1)
    base_kb = _status_kb("VmRSS")
    start = time.perf_counter()
    model, params, versions = _load(config, checkpoint)
    load_s = time.perf_counter() - start
    load_peak_kb = _status_kb("VmHWM")
    _trim()
    steady_kb = _status_kb("VmRSS")
    model.train()
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(1, SHAPE["vocab_size"], (1, SEQ), generator=torch.Generator().manual_seed(0))
    _reset_peak()
    start = time.perf_counter()
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    step_s = time.perf_counter() - start
    step_peak_kb = _status_kb("VmHWM")
    import resource

    maxrss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "config": config, "import_gib": base_kb * 1024 / GIB, "load_peak_gib": load_peak_kb * 1024 / GIB,
        "steady_gib": steady_kb * 1024 / GIB, "step_peak_gib": step_peak_kb * 1024 / GIB,
        "process_peak_gib": maxrss_kb * 1024 / GIB, "load_s": load_s, "step_s": step_s, "loss": float(loss),
        "trainable": sum(p.numel() for p in params), "torch": torch.__version__,
        "transformers": transformers.__version__, **versions,
    }


# ------------------------------------------------------------------------------ the driver


def _python_for(config: str, bnb_python: str) -> str:
    if os.path.exists(bnb_python):
        return bnb_python
    if config == "peft_bnb":
        raise SystemExit(f"PEFT + bitsandbytes needs --bnb-python (a venv with bitsandbytes); {bnb_python} is missing")
    return sys.executable


def run(workdir: str | os.PathLike = "/tmp/graphlora-qlora-1b", rounds: int = 1,
        bnb_python: str = DEFAULT_BNB_PYTHON, only: tuple[str, ...] = CONFIGS) -> dict:
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    checkpoint = ensure_checkpoint(work)
    write_s = time.perf_counter() - start
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    runs: dict[str, list[dict]] = {c: [] for c in only}
    for _ in range(rounds):
        for config in only:
            cmd = [_python_for(config, bnb_python), str(Path(__file__).resolve()), "--child", config,
                   "--checkpoint", str(checkpoint)]
            done = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"{config} failed:\n{done.stderr[-3000:]}")
            row = json.loads(done.stdout.strip().splitlines()[-1])
            runs[config].append(row)
            print(json.dumps(row), flush=True)
    keys = ("load_peak_gib", "steady_gib", "step_peak_gib", "process_peak_gib", "load_s", "step_s")
    result: dict = {"rounds": rounds, "checkpoint": str(checkpoint), "shard": SHARD, "seq": SEQ,
                    "checkpoint_gib": sum(p.stat().st_size for p in checkpoint.glob("*.safetensors")) / GIB,
                    "checkpoint_write_s": write_s, "configs": list(only)}
    for config, rows in runs.items():
        for key in keys:
            result[f"{config}_{key}"] = statistics.median(r[key] for r in rows)
        result[f"{config}_versions"] = {k: v for k, v in rows[0].items() if k in
                                        ("torch", "transformers", "graphlora", "peft", "bitsandbytes")}
    if "peft_bnb" in runs:
        for config in runs:
            for key in ("load_peak_gib", "step_peak_gib", "process_peak_gib"):
                result[f"{config}_over_peft_{key}"] = result[f"{config}_{key}"] / result[f"peft_bnb_{key}"]
    return result


def table(r: dict) -> str:
    lines = ["| | load + transform peak GiB | RSS after load GiB | training step peak GiB | process peak GiB | load s | step s |",
             "|---|---|---|---|---|---|---|"]
    for config in r["configs"]:
        lines.append(f"| {config.replace('_', ' ')} | {r[config + '_load_peak_gib']:.2f} | {r[config + '_steady_gib']:.2f} | "
                     f"{r[config + '_step_peak_gib']:.2f} | {r[config + '_process_peak_gib']:.2f} | "
                     f"{r[config + '_load_s']:.1f} | {r[config + '_step_s']:.1f} |")
    if "peft_bnb" in r["configs"]:
        lines.append("")
        lines.append("Over PEFT + bitsandbytes: " + "; ".join(
            f"{c.replace('_', ' ')} load {r[c + '_over_peft_load_peak_gib']:.2f}, step {r[c + '_over_peft_step_peak_gib']:.2f}, "
            f"process {r[c + '_over_peft_process_peak_gib']:.2f}" for c in r["configs"] if c != "peft_bnb"))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/graphlora-qlora-1b")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--bnb-python", default=DEFAULT_BNB_PYTHON)
    parser.add_argument("--only", nargs="*", choices=CONFIGS, default=list(CONFIGS))
    parser.add_argument("--child", choices=CONFIGS, help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, Path(args.checkpoint))))
        return
    result = run(args.workdir, args.rounds, args.bnb_python, tuple(args.only))
    print(table(result))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
