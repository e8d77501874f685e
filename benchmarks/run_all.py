"""Run every peer benchmark in one go and rewrite docs/benchmarks.md with the measured table.

Each benchmark compares graphlora with its peer (PEFT, onnxruntime's quantization tools) in the
same run and reports ratios. Usage: ``python benchmarks/run_all.py [--only NAME ...]``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
DOC = HERE.parent / "docs" / "benchmarks.md"
RAW = HERE.parent / "docs" / "benchmarks.json"


def machine() -> dict:
    import onnxruntime
    import torch
    import transformers

    cpu = platform.processor() or ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "transformers": transformers.__version__,
        "load_before": os.getloadavg()[0],
    }


def benchmarks() -> dict:
    import bench_decode
    import bench_decoder_onnx
    import bench_full_integer
    import bench_fusion
    import bench_gptq_depth
    import bench_grad_checkpointing
    import bench_loftq
    import bench_lora_train
    import bench_onnx
    import bench_quant
    import bench_qlora_memory
    import bench_qlora_speed
    import bench_qw_lora
    import bench_trace_8b
    import bench_transform_memory

    return {
        "lora_train": bench_lora_train.run,
        "trace_8b": bench_trace_8b.run,
        "quant": bench_quant.run,
        # with AdaRound and the QWA-LoRA rows (about 30 minutes; the script's default leaves both out)
        "qw_lora": lambda: bench_qw_lora.run(methods=bench_qw_lora.METHODS, qwa=True),
        # the MiniLM vs llmcompressor part runs in GRAPHLORA_GPTQ_PEER_PYTHON when set (its own venv)
        "gptq_depth": bench_gptq_depth.run,
        # with the QW-LoRA model (100 distillation steps, as in `make demo`) beside the int4 rows
        "onnx": lambda: bench_onnx.run(qwlora_steps=100),
        "grad_checkpointing": bench_grad_checkpointing.run,
        "decode": bench_decode.run,
        # each configuration in a fresh subprocess; PEFT + bitsandbytes in GRAPHLORA_BNB_PYTHON's venv
        "qlora_memory": lambda: bench_qlora_memory.run(
            bnb_python=os.environ.get("GRAPHLORA_BNB_PYTHON", bench_qlora_memory.DEFAULT_BNB_PYTHON)),
        # PEFT + bitsandbytes rows only where bitsandbytes (>= 0.48, CPU backend) is installed
        "qlora_speed": bench_qlora_speed.run,
        "decoder_onnx": bench_decoder_onnx.run,
        "fusion": bench_fusion.run,
        # AIMET's rows run aimet_minilm.py in GRAPHLORA_AIMET_PYTHON's venv when that is set
        "full_integer": bench_full_integer.run,
        "loftq": bench_loftq.run,
        "transform_memory": bench_transform_memory.run,
    }


def bench_contexts() -> tuple:
    import bench_decode

    return bench_decode.CONTEXTS


def _f(x, digits=3):
    return "n/a" if x is None else f"{x:.{digits}f}"


def _table(header: list[str], rows) -> list[str]:
    """A markdown table (header, separator, one line per row of cells) and a blank line."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines + [""]


def render(m: dict, results: dict) -> str:
    out = [
        "# Benchmarks",
        "",
        "Measured by `benchmarks/run_all.py` (`make bench`), which rewrites this file. Every",
        "comparison runs graphlora and its peer in the same process, one after the other.",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['torch_threads']} threads), "
        f"onnxruntime {m['onnxruntime']}, transformers {m['transformers']}, Python {m['python']}. "
        f"Date: {m['date']}. Load average before the run: {m['load_before']:.2f}.",
        "",
    ]
    when = {k: v["measured"] for k, v in results.items() if isinstance(v, dict) and "measured" in v}
    if len(set(when.values())) > 1:  # `--only` re-runs keep the other benchmarks' earlier results
        out += ["Measured at: " + "; ".join(f"{k} {v}" for k, v in when.items()) + ".", ""]
    r = results.get("lora_train")
    if r and "error" not in r:
        out += [
            "## LoRA training step vs PEFT (MiniLM, rank 16 on query|key|value|dense, batch 16 x 64)",
            "",
            "| | graphlora | PEFT | ratio (goal <= 0.9) |",
            "|---|---|---|---|",
            f"| eager, s/step | {_f(r['graphlora_eager_s'])} | {_f(r['peft_eager_s'])} | **{_f(r['ratio_eager'], 2)}** |",
        ]
        if "ratio_compiled" in r:
            out.append(f"| torch.compile, s/step | {_f(r['graphlora_compiled_s'])} | {_f(r['peft_compiled_s'])} | **{_f(r['ratio_compiled'], 2)}** |")
        out.append("")
        if "gpt2_ratio_eager" in r:
            out += [
                "GPT-2 (`GPT2LMHeadModel` from a config: 4 layers, width 256, 256-byte vocabulary; `Conv1D` "
                "sites), rank 16 on c_attn|c_proj|c_fc (PEFT with `fan_in_fan_out`), batch 16 x 64 bytes, "
                "next-token loss, in the same run:",
                "",
                "| | graphlora | PEFT | ratio (goal <= 0.9) |",
                "|---|---|---|---|",
                f"| eager, s/step | {_f(r['gpt2_graphlora_eager_s'])} | {_f(r['gpt2_peft_eager_s'])} | **{_f(r['gpt2_ratio_eager'], 2)}** |",
                f"| eager, execution fusion off | {_f(r['gpt2_graphlora_unfused_eager_s'])} | {_f(r['gpt2_peft_eager_s'])} | {_f(r['gpt2_ratio_eager_unfused'], 2)} |",
                "",
            ]
    r = results.get("grad_checkpointing")
    if r and "error" not in r:
        out += [
            f"## Activation checkpointing, one LoRA training step ({r['shape']})",
            "",
            "Peak RSS of a forward + backward over the RSS before it, bytes autograd saves for backward,",
            f"step time; each configuration in a fresh process, medians of {r['rounds']} interleaved rounds.",
            "",
            "| | peak RSS MB | saved MB | s/step |",
            "|---|---|---|---|",
        ]
        for config in ("graphlora", "graphlora_checkpointed", "peft", "peft_checkpointed"):
            out.append(f"| {config.replace('_', ' ')} | {_f(r[config + '_peak_mb'], 1)} | "
                       f"{_f(r[config + '_saved_mb'], 1)} | {_f(r[config + '_step_s'])} |")
        out += [
            "",
            f"Checkpointed / plain: graphlora peak **{_f(r['graphlora_checkpointed_over_plain_peak_mb'], 2)}**, "
            f"time {_f(r['graphlora_checkpointed_over_plain_step_s'], 2)}; PEFT peak "
            f"{_f(r['peft_checkpointed_over_plain_peak_mb'], 2)}, time {_f(r['peft_checkpointed_over_plain_step_s'], 2)}. "
            f"graphlora / PEFT, both checkpointed: peak {_f(r['graphlora_over_peft_checkpointed_peak_mb'], 2)}.",
            "",
        ]
    r = results.get("decode")
    if r and "error" not in r:
        contexts = bench_contexts()
        out += [
            f"## Decode latency of `generate()` ({r['shape']})",
            "",
            "Milliseconds per decoded token (a greedy generate of 1 + N new tokens minus one of 1, over N),",
            f"medians of {r['rounds']} interleaved rounds; the peer is transformers' `generate()` on the",
            "merged model (default cache; with `cache_implementation=\"static\"` on the next row).",
            "",
            "| | " + " | ".join(f"context {c}" for c in contexts) + " |",
            "|---|" + "---|" * len(contexts),
        ]
        for name in r["systems"]:
            out.append(f"| {name.replace('_', ' ')} | "
                       + " | ".join(_f(r[f"{name}_ms_per_token_{c}"], 2) for c in contexts) + " |")
        out += ["", "graphlora LoRA / transformers merged (goal <= 1.0): "
                + ", ".join(f"context {c} **{_f(r[f'lora_ratio_{c}'], 2)}**" for c in contexts) + ".", ""]
        for name in ("graphlora_qlora_nf4", "graphlora_qlora_nf4_cached"):
            if f"{name}_over_peft_bnb_{contexts[0]}" in r:
                out += [f"{name.replace('_', ' ')} / PEFT + bitsandbytes nf4 (goal <= 1.0): "
                        + ", ".join(f"context {c} **{_f(r[f'{name}_over_peft_bnb_{c}'], 2)}**" for c in contexts)
                        + ".", ""]
    r = results.get("qlora_memory")
    if r and "error" not in r:
        import bench_qlora_memory

        out += [
            "## QLoRA peak memory, 1B-parameter Llama from a sharded bf16 checkpoint (TinyLlama's shape)",
            "",
            f"NF4 g64 on every block linear, LoRA r16 on q,v, float32 compute; one training step of batch 1 x "
            f"{r['seq']}; each configuration in a fresh process (`benchmarks/bench_qlora_memory.py`), medians of "
            f"{r['rounds']} round(s).",
            "",
            bench_qlora_memory.table(r),
            "",
        ]
    r = results.get("fusion")
    if r and "error" not in r:
        out += [
            f"## Execution fusion vs the canonical graph ({r['shape']})",
            "",
            "`fused_execution=True` (each fused site and sibling group picks its form per call from the",
            "tokens it is given) against `False` (the canonical graph op for op), the same LoraModel",
            "switched between the two; eval forward under `no_grad` and a training step (forward +",
            f"backward); medians of at least {r['rounds']} interleaved rounds (more for cheap sizes). Goal: ratio <= 1.0 at every size.",
            "",
            "| batch x tokens | forward fused ms | forward canonical ms | ratio | step fused ms | step canonical ms | ratio |",
            "|---|---|---|---|---|---|---|",
        ]
        for size, row in r["forward"].items():
            step = r["train"].get(size)
            cells = [_f(row["fused_ms"], 1), _f(row["canonical_ms"], 1), f"**{_f(row['ratio'], 2)}**"]
            cells += ([_f(step["fused_ms"], 1), _f(step["canonical_ms"], 1), f"**{_f(step['ratio'], 2)}**"]
                      if step else ["", "", ""])
            out.append(f"| {size.replace('x', ' x ')} | " + " | ".join(cells) + " |")
        out.append("")
    r = results.get("trace_8b")
    if r and "error" not in r:
        out += [
            "## Trace + transform a Llama-3-8B-shaped model on the meta device",
            "",
            f"{r['sites']} linear sites, {r['nodes']} graph nodes. torch.export: {_f(r['torch_export_s'], 2)} s; "
            f"graphlora passes: **{_f(r['graphlora_passes_s'], 2)} s** (goal <= 1 s) "
            f"({', '.join(f'{k} {v:.2f} s' for k, v in r['passes_by_name_s'].items())}).",
            "",
        ]
        if "diff_s" in r:
            out += [
                f"Graph diff on that graph: `graph_text` {_f(r['graph_text_traced_s'], 2)} s (traced), "
                f"{_f(r['graph_text_transformed_s'], 2)} s (transformed); `diff` {_f(r['diff_s'], 2)} s "
                f"({r['diff_summary']}).",
                "",
            ]
    r = results.get("quant")
    if r and "error" not in r:
        out += [
            "## Weight quantization of MiniLM (held-out cosine of mean-pooled embeddings to fp32)",
            "",
        ]
        out += _table(
            ["qtype", "group", "method", "cosine", "bits/param", "time s", "QLoRA fwd / fp32 fwd"],
            ([row["qtype"], row["group"] or "channel", row["method"], _f(row["cosine"], 4), _f(row["bits_per_param"], 3),
              _f(row["transform_s"], 1), _f(row["forward_ratio_vs_fp32"], 2)] for row in r["rows"]),
        )
    r = results.get("qw_lora")
    if r and "error" not in r:
        out += render_qw_lora(r)
    r = results.get("full_integer")
    if r and "error" not in r:
        out += render_full_integer(r)
    r = results.get("loftq")
    if r and "error" not in r:
        out += [f"## LoftQ init vs the default init on QLoRA MiniLM (LoRA r{r['rank']} on the 36 encoder linears)",
                "",
                f"`benchmarks/bench_loftq.py`: the same {r['steps']} distillation steps (lr {r['lr']}) after either "
                f"init; LoftQ with {r['loftq_iter']} iterations; held-out cosine of mean-pooled embeddings to fp32.",
                ""]
        out += _table(["base", "init", "cosine at step 0", f"cosine after {r['steps']} steps", "transform s", "train s"],
                      ([f"{row['qtype']} g{row['group']}", row["init"], _f(row["cosine_start"], 4),
                        f"**{_f(row['cosine_trained'], 4)}**", _f(row["transform_s"], 1), _f(row["train_s"], 1)]
                       for row in r["rows"]))
    r = results.get("transform_memory")
    if r and "error" not in r:
        import bench_transform_memory

        out += ["## Transform peak over the loaded float model (issue 16)", "",
                "`benchmarks/bench_transform_memory.py`: a Llama from a `LlamaConfig` "
                f"({r['shape']['hidden_size']} hidden, {r['shape']['num_hidden_layers']} layers), each qtype "
                "in a fresh subprocess; goal: peak <= loaded model + 10% of its parameter bytes.", "",
                bench_transform_memory.table(r), ""]
    r = results.get("gptq_depth")
    if r and "error" not in r:
        out += render_gptq_depth(r)
    r = results.get("qlora_speed")
    if r and "error" not in r:
        out += render_qlora_speed(r)
    r = results.get("onnx")
    if r and "error" not in r:
        out += ["## ONNX export vs onnxruntime's own quantization tools (MiniLM, batch 8 x 64)", ""]
        out += r.get("markdown", ["```", json.dumps(r, indent=2), "```"])
        out.append("")
    r = results.get("decoder_onnx")
    if r and "error" not in r:
        out += render_decoder_onnx(r)
    errors = {k: v["error"] for k, v in results.items() if isinstance(v, dict) and "error" in v}
    if errors:
        out += ["## Benchmarks that failed in this run", ""]
        out += [f"- {k}: `{v}`" for k, v in errors.items()]
        out.append("")
    return "\n".join(out)


def render_qw_lora(r: dict) -> list[str]:
    """QW-LoRA on MiniLM: step 1 per grid and per weight method, step 2 from the best, step 3 rows."""
    if "method_rows" not in r:  # the shape before the grid / method / placement rows
        return ["## QW-LoRA on MiniLM (int4 symmetric g32 base on all encoder linears, LoRA rank 16)", "",
                *_table(["stage", "held-out cosine to fp32", "time s"], [
                    ["step 1: " + r["step1_method"] + " base", _f(r["cos_step1"], 4), _f(r["step1_s"], 1)],
                    [f"step 2: {r['steps']} steps, lr {r['lr']}", _f(r["cos_step2"], 4), _f(r["step2_train_s"], 1)],
                    ["step 3: int8 activations", _f(r["cos_step3_int8_act"], 4), _f(r["step3_s"], 1)]])]
    out = [f"## QW-LoRA on MiniLM (int4 symmetric b32 base on the 36 encoder linears, LoRA rank {r['rank']})",
           "",
           f"`benchmarks/bench_qw_lora.py`, {r['threads']} torch thread(s), load {r['load_before']:.2f} before and "
           f"{r['load_after']:.2f} after; {r['calibration_sentences']} calibration sentences (the training split), "
           "held-out cosine of mean-pooled embeddings to fp32 (the held-out split is never trained or calibrated "
           "on); MiniLM with eager attention. Goals: step 2 >= 0.995 within 5 minutes of training, step 3 "
           "(int8 activations at the linears) >= 0.99.",
           ""]
    if r.get("grid_rows"):
        rows = [["absmax (round to nearest)", "default (full)", _f(r["cos_rtn_absmax"], 4)]]
        rows += [["mse", row["grid"], _f(row["cosine"], 4)] for row in r["grid_rows"]]
        out += ["Step 1 per symmetric grid (full: int4 -8..7; restricted: -7..7):", ""]
        out += _table(["method", "grid", "step-1 cosine"], rows)
    best = r["step1_method"]
    out += ["Step 1 per weight method (default grid):", ""]
    out += _table(["method", "step-1 cosine", "calibration s"],
                  ([f"**{row['method']}**" if row["method"] == best else row["method"], _f(row["cosine"], 4),
                    _f(row["calibrate_s"], 1)] for row in r["method_rows"]))
    rows = [[f"step 1: {best}", _f(r["cos_step1"], 4), ""],
            [f"step 2: LoRA distillation, {r['steps']} steps, lr {r['lr']}, batch {r['batch_size']} "
             f"(best validation at step {r['best_step']})", f"**{_f(r['cos_step2'], 4)}** (goal >= 0.995)",
             _f(r["step2_train_s"], 1)]]
    for row in r["step3_rows"]:
        cosine = _f(row["cosine"], 4)
        if row["placement"] == "linears":
            cosine = f"**{cosine}** (goal >= 0.99)"
        rows.append([f"step 3: {row['description']} ({row['encodings']} encodings)", cosine, _f(row["calibrate_s"], 1)])
    o = r.get("step3_onnx")
    if o:
        rows.append([f"step 3 ({o['act_calibration']}) exported as ONNX QDQ, onnxruntime: LoRA as a branch / merged",
                     f"{_f(o['branch'], 4)} / {_f(o['merged'], 4)}", ""])
    out += [f"Steps 2 and 3 from {best} (each step-3 row calibrates its own copy of the trained model):", ""]
    out += _table(["stage", "held-out cosine to fp32", "time s"], rows)
    q = r.get("qwa")
    if q:
        out += [f"QWA-LoRA, the same recipe (int8 activations at the linears, {q['act_calibration']}, calibrated in "
                "step 1 and frozen; LoRA trains against them):", ""]
        out += _table(["stage", "held-out cosine to fp32", "time s"], [
            [f"step 1: {q['method']} base + int8 activations", _f(q["cos_step1"], 4), _f(q["step1_s"], 1)],
            [f"step 2: {r['steps']} steps, lr {r['lr']} (best validation at step {q['best_step']})",
             _f(q["cos_step2"], 4), _f(q["step2_train_s"], 1)],
            ["step 3: LoRA tensors int8", f"**{_f(q['cos_step3'], 4)}** (goal >= 0.99)", _f(q["step3_s"], 1)],
            *([["step 3 exported as ONNX QDQ, onnxruntime: LoRA as a branch / merged",
                f"{_f(q['onnx']['branch'], 4)} / {_f(q['onnx']['merged'], 4)}", ""]] if q.get("onnx") else [])])
    return out


def render_full_integer(r: dict) -> list[str]:
    """Full-integer MiniLM: each placement's held-out cosine per weight recipe, AIMET's beside."""
    recipes = {"w8": "W8 per channel", "w4b32": "W4 symmetric b32"}
    present = [k for k in recipes if f"{k}_weights_only_cosine" in r]
    out = ["## Full-integer MiniLM: every op output quantized (held-out cosine of mean-pooled embeddings to fp32)",
           "",
           f"`benchmarks/bench_full_integer.py`: calibration on {r['calibration_sentences']} training sentences, "
           "weights on the 36 encoder linears; the attention-mask add stays float in every graphlora row. "
           "AIMET: `aimet_minilm.py` (its default config: every module's output, symmetric per-tensor "
           "weights on every module, min-max) on the same data.",
           ""]
    rows = [["weights only", *(_f(r[f"{k}_weights_only_cosine"], 4) for k in present), ""]]
    names = dict.fromkeys(row["placement"] for row in r["rows"])
    for name in names:
        cells = {row["recipe"]: row for row in r["rows"] if row["placement"] == name}
        first = next(iter(cells.values()))
        rows.append([f"graphlora: {first['description']}",
                     *(_f(cells[k]["cosine"], 4) if k in cells else "" for k in present),
                     first["activation_encodings"]])
    a = r.get("aimet") or {}
    if "error" in a:
        rows.append([f"AIMET: {a['error']}", *([""] * len(present)), ""])
    elif a:
        aimet_keys = {"w8": "w8a8", "w4b32": "w4b32a8"}
        rows.append([f"AIMET {a.get('aimet_torch', '')} default config",
                     *(_f(a[aimet_keys[k]]["cosine"], 4) if aimet_keys[k] in a else "" for k in present),
                     f"{a.get('w8a8', {}).get('quantizers', '')} quantizers"])
    out += _table(["placement", *(recipes[k] for k in present), "activation encodings"], rows)
    o = r.get("onnx")
    if o:
        out += [f"Exported as ONNX QDQ ({o['recipe']}, `{o['placement']}`): onnxruntime cosine "
                f"{_f(o['onnxruntime_cosine'], 4)} (PyTorch {_f(o['pytorch_cosine'], 4)}).", ""]
    return out


def render_gptq_depth(r: dict) -> list[str]:
    """The GPTQ-vs-depth table and the MiniLM comparison with llmcompressor."""
    out = [
        "## GPTQ time vs depth (Llama, hidden 384, MLP 1024, int4 g32 on every projection)",
        "",
        f"4 calibration batches of 8 x 64 tokens, {r['threads']} torch thread(s), medians of "
        f"{r['depth'][0]['rounds'] if r['depth'] else 0} interleaved rounds. Wave schedule: the whole "
        "graph per dependency wave (GPTQ before the block-wise engine); blocks: one pass over the depth.",
        "",
    ]
    out += _table(
        ["layers", "waves s", "blocks s", "waves s/layer", "blocks s/layer", "waves / blocks"],
        ([row["layers"], _f(row["waves_s"], 1), _f(row["blocks_s"], 1), _f(row["waves_s_per_layer"], 2),
          f"**{_f(row['blocks_s_per_layer'], 2)}**", _f(row["ratio_waves_over_blocks"], 2)] for row in r["depth"]),
    )
    p = r.get("minilm")
    if p:
        out += [
            f"MiniLM, int4 symmetric g{p['group_size']} GPTQ on every encoder linear, {p['calibration']}, "
            f"medians of {p['rounds']} interleaved rounds (held-out cosine of mean-pooled embeddings to fp32):",
            "",
            "| | time s | cosine |",
            "|---|---|---|",
            f"| graphlora `transform` (GPTQ pass {_f(p['graphlora_gptq_pass_s'], 1)} s) | {_f(p['graphlora_s'], 1)} | "
            f"{_f(p['graphlora_cosine'], 4)} |",
        ]
        if p.get("llmcompressor_s") is not None:
            out.append(f"| llmcompressor `oneshot` + `GPTQModifier` | {_f(p['llmcompressor_s'], 1)} | "
                       f"{_f(p['llmcompressor_cosine'], 4)} |")
            out.append(f"| ratio graphlora / llmcompressor | **{_f(p['ratio_graphlora_over_llmcompressor'], 2)}** | |")
        else:
            out.append(f"| llmcompressor | {p['llmcompressor_error']} | |")
        if "graphlora_waves_gptq_pass_s" in p:
            out.append(f"| graphlora, wave schedule (GPTQ pass, once) | {_f(p['graphlora_waves_gptq_pass_s'], 1)} | "
                       f"{_f(p['graphlora_waves_cosine'], 4)} |")
        out.append("")
    return out


def render_qlora_speed(r: dict) -> list[str]:
    """QLoRA forward latency per shape, and the ratios to PEFT + bitsandbytes and to fp32."""
    out = [f"## QLoRA forward vs PEFT + bitsandbytes nf4 ({r['shape']})", "",
           f"Milliseconds per forward, medians of {r['rounds']} interleaved rounds ({r['prefill_rounds']} at "
           "4x512); `cached` is `cache_dequantized_weights=True`.", ""]
    out += _table(["ms"] + r["shapes"], ([name.replace("_", " ")] + [_f(r[f"{name}_ms_{s}"], 1) for s in r["shapes"]]
                                        for name in r["systems"]))
    rows = [(f"{name.replace('_', ' ')} / {peer.replace('_', ' ')}", [_f(r[f"{name}_over_{peer}_{s}"], 2) for s in r["shapes"]])
            for peer in ("peft_bnb_nf4", "fp32") for name in r["systems"]
            if name.startswith("graphlora") and f"{name}_over_{peer}_{r['shapes'][0]}" in r]
    out += _table(["ratio"] + r["shapes"], ([label] + cells for label, cells in rows))
    return out


def render_decoder_onnx(r: dict) -> list[str]:
    """KV-cache decoder export vs the full-recompute export (bench_decoder_onnx.py)."""
    out = [
        f"## ONNX decoder with a KV cache vs full recompute (Llama {r['layers']} layers x {r['hidden']}, "
        f"vocab {r['vocab']}, {r['params'] / 1e6:.1f}M parameters, random weights)",
        "",
        "int4 g32 base on q/v_proj with LoRA r8 as a branch; plain onnxruntime, 1 thread, accuracy level 0; "
        "batch 1; medians of interleaved rounds. `python benchmarks/bench_decoder_onnx.py`.",
        "",
        "| context | KV-cache decoder ms/token | full recompute ms/token | ratio full / cache | prefill ms |",
        "|---|---|---|---|---|",
    ]
    for ctx in (32, 256):
        out.append(f"| {ctx} | **{_f(r[f'cache_ms_token@{ctx}'], 2)}** | {_f(r[f'full_ms_token@{ctx}'], 2)} | "
                   f"{_f(r[f'full_over_cache@{ctx}'], 1)} | {_f(r[f'prefill_ms@{ctx}'], 1)} |")
    out += ["", f"File size: {_f(r['size_mb_cache'], 1)} MB (decoder) vs {_f(r['size_mb_full'], 1)} MB (plain export). "
            f"Greedy tokens (3 prompts x 24) equal to the LoraModel's `generate()`: {r['greedy_rows_equal']}. "
            "The onnxruntime-genai model builder comparison is not measured yet.", ""]
    return out


def section(m: dict, name: str, result: dict) -> str:
    """One benchmark's part of the page, between markers naming it, with its measuring time."""
    body = render(m, {name: result}).split("\n## ", 1)
    text = "## " + body[1].rstrip("\n") if len(body) > 1 else f"## {name}: nothing rendered"
    when = result.get("measured") if isinstance(result, dict) else None
    if when:
        text = text.replace("\n\n", f"\n\nMeasured {when}.\n\n", 1)
    return f"<!-- bench:{name} -->\n{text}\n<!-- /bench:{name} -->"


def splice_section(doc: str, name: str, block: str) -> str:
    """``doc`` with the section between ``name``'s markers replaced by ``block`` (appended when
    the page has no such section yet)."""
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    if start in doc and end in doc:
        head, rest = doc.split(start, 1)
        return head + block + rest.split(end, 1)[1]
    return doc + "\n\n" + block


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--only", nargs="*", help="names of benchmarks to run (default: all)")
    ap.add_argument("--no-write", action="store_true", help="print, do not rewrite docs/benchmarks.md")
    ap.add_argument("--render-only", action="store_true",
                    help="run nothing: render the --only sections (or the page) from docs/benchmarks.json")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    m = machine()
    results: dict = {}
    if RAW.exists() and args.only:
        results = json.loads(RAW.read_text()).get("results", {})
    if args.render_only:
        saved = json.loads(RAW.read_text())
        m, results = saved["machine"], saved["results"]
    for name, fn in benchmarks().items():
        if args.render_only or (args.only and name not in args.only):
            continue
        print(f"== {name}", flush=True)
        t = time.perf_counter()
        try:
            results[name] = fn()
            results[name]["measured"] = (
                f"{datetime.datetime.now():%Y-%m-%d %H:%M} (load {os.getloadavg()[0]:.2f} after)"
            )
        except Exception as exc:  # one broken benchmark must not hide the others
            traceback.print_exc()
            results[name] = {"error": f"{type(exc).__name__}: {exc}"}
        print(f"   {time.perf_counter() - t:.0f} s", flush=True)
    if args.only and DOC.exists():
        # a partial run replaces only its own sections: the rest of the page (results measured by
        # other scripts or runs, with their own dates) stays byte for byte
        text = DOC.read_text(encoding="utf-8").rstrip("\n")
        for name in args.only:
            if name in results:
                text = splice_section(text, name, section(m, name, results[name]))
    else:
        text = render(m, results)
    print(text)
    if not args.no_write:
        from graphlora.io.atomic import atomic_write

        with atomic_write(DOC, "w", encoding="utf-8") as f:
            f.write(text + "\n")
        if args.render_only:
            return 0
        with atomic_write(RAW, "w", encoding="utf-8") as f:
            f.write(json.dumps({"machine": m, "results": results}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
