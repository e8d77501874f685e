"""graphlora's ONNX exports vs onnxruntime's own quantization tools, same run, real MiniLM.

Every model starts from the same pretrained MiniLM-L6 and is run by onnxruntime on the same
batch (8 sentences x 64 tokens of held-out pydoc text); cosine is of mean-pooled embeddings
(mean of last_hidden_state over the attention mask) to the fp32 PyTorch model on held-out text.

* int8: graphlora (int8 per-channel weights, calibrated uint8 per-tensor activations, QDQ) vs
  ``quantize_static(QuantFormat.QDQ, per_channel=True)`` (same calibration sentences) and vs
  ``quantize_dynamic`` (int8 weights, dynamic activations).
* int4: graphlora (int4 symmetric, group 32, GPTQ on the calibration sentences by default,
  blocked DequantizeLinear fused into MatMulNBits) vs
  ``MatMulNBitsQuantizer(block_size=32, is_symmetric=True)`` (round-to-nearest), at the same
  accuracy level.
* QW-LoRA: the model of graphlora's QW-LoRA workflow exported with ``lora="branch"`` (hook:
  :func:`qw_lora_model`, opt-in because it trains).

Latency: median per batch over interleaved rounds (every model runs in every round, so load
changes hit all of them). ``python benchmarks/bench_onnx.py`` prints a table and JSON;
``benchmarks/run_all.py`` calls :func:`run`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ALL_LINEARS = ".*"
BATCH, SEQ = 8, 64


# ------------------------------------------------------------------------------------ data
def _data(tokenizer, n_calib: int, n_eval: int):
    from graphlora.data import pydoc_sentences, split

    train, held = split(pydoc_sentences(), heldout=0.2, seed=0)

    def batches(sentences):
        out = []
        for i in range(0, len(sentences) - BATCH + 1, BATCH):
            enc = tokenizer(sentences[i:i + BATCH], padding="max_length", truncation=True,
                            max_length=SEQ, return_tensors="pt")
            out.append({k: enc[k] for k in ("input_ids", "token_type_ids", "attention_mask") if k in enc})
        return out

    return batches(train[:n_calib]), batches(held[:n_eval])


def _pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    m = mask[..., None].astype(np.float64)
    return (hidden.astype(np.float64) * m).sum(1) / np.maximum(m.sum(1), 1e-9)


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def _feeds(batch) -> dict:
    return {k: v.numpy() for k, v in batch.items()}


def _size_mb(path: Path) -> float:
    total = path.stat().st_size
    for extra in path.parent.glob(path.name + "*.data"):
        total += extra.stat().st_size
    return total / 1e6


# ------------------------------------------------------------------------------------ models
def _graphlora_int8(model, calib, example, path, act_calibration: str):
    import graphlora
    from graphlora.onnx import export_onnx

    rule = graphlora.QuantRule(ALL_LINEARS, weight_qtype="int8", act_qtype="uint8",
                               act_calibration=act_calibration)
    lm = graphlora.transform(model, [rule], (), example, progress=False)
    graphlora.calibrate(lm, calib, progress=False)
    export_onnx(lm, path, (), example)
    return lm


def _graphlora_int4(model, example, path, method: str, calib):
    import graphlora
    from graphlora.onnx import export_onnx

    rule = graphlora.QuantRule(ALL_LINEARS, weight_qtype="int4", group_size=32,
                               weight_symmetric=True, weight_calibration=method)
    lm = graphlora.transform(model, [rule], (), example, progress=False,
                             calibration_data=calib if method == "gptq" else None)
    export_onnx(lm, path, (), example)
    return lm


def qw_lora_model(model, tokenizer, steps: int):
    """HOOK — the QW-LoRA model to export with ``lora="branch"``, or None to skip.

    The QW-LoRA workflow (``graphlora.workflows`` / ``graphlora.recipes.qw_lora_minilm``) is owned
    elsewhere; this calls its MiniLM recipe weight-only (int4 g32 base, LoRA rank 16, no activation
    quantization) so the export is directly comparable with the int4 rows. Returns None when
    ``steps == 0`` or the recipe is not available.
    """
    if steps <= 0:
        return None
    try:
        from graphlora.recipes import qw_lora_minilm
    except ImportError:
        return None
    result = qw_lora_minilm(steps=steps, act_qtype=None, progress=False, model=model,
                            tokenizer=tokenizer, method="gptq")
    return result["workflow"].model


def _ort_static(fp32: Path, out: Path, calib, op_types=None):
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([_feeds(b) for b in calib])

        def get_next(self):
            return next(self.it, None)

    pre = out.with_name(out.stem + "_pre.onnx")
    quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
    quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    op_types_to_quantize=op_types)


def _ort_dynamic(fp32: Path, out: Path):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(fp32), str(out), weight_type=QuantType.QInt8)


def _ort_nbits(fp32: Path, out: Path, accuracy_level: int):
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    q = MatMulNBitsQuantizer(onnx.load(str(fp32)), block_size=32, is_symmetric=True,
                             accuracy_level=accuracy_level)
    q.process()
    q.model.save_model_to_file(str(out), use_external_data_format=False)


# ------------------------------------------------------------------------------------ running
def _session(path: Path, providers, accuracy_level=None, threads=None):
    from graphlora.onnx import InferenceSession

    return InferenceSession(path, providers, accuracy_level=accuracy_level,
                            intra_op_num_threads=threads)


def _embed(sess, batches) -> np.ndarray:
    out = []
    for b in batches:
        hidden = sess.run(None, _feeds(b))[0]
        out.append(_pool(hidden, b["attention_mask"].numpy()))
    return np.concatenate(out)


def _latencies(sessions: dict, batch, rounds: int, per_round: int, warmup: int) -> dict:
    feeds = _feeds(batch)
    for s in sessions.values():
        for _ in range(warmup):
            s.run(None, feeds)
    times = {k: [] for k in sessions}
    for _ in range(rounds):
        for k, s in sessions.items():
            for _ in range(per_round):
                t = time.perf_counter()
                s.run(None, feeds)
                times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def run(
    providers: str = "cpu",
    n_calib: int = 128,
    n_eval: int = 256,
    rounds: int = 15,
    per_round: int = 4,
    warmup: int = 5,
    threads: int | None = None,
    int4_method: str = "gptq",
    act_calibration: str = "minmax",
    qwlora_steps: int = 0,
    workdir: str | None = None,
) -> dict:
    import onnxruntime as ort

    import graphlora
    from graphlora.onnx import (
        choose_providers,
        export_onnx,
        float_fallbacks,
        optimized_model,
        quantized_kernels,
    )
    from graphlora.recipes import load_minilm

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    choice = choose_providers(providers)
    model, tok = load_minilm()
    calib, held = _data(tok, n_calib, n_eval)
    example = calib[0]
    with torch.no_grad():
        ref = np.concatenate([_pool(model(**b).last_hidden_state.numpy(), b["attention_mask"].numpy())
                              for b in held])
    tmp = tempfile.TemporaryDirectory() if workdir is None else None
    root = Path(workdir or tmp.name)
    root.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    p = {k: root / f"{k}.onnx" for k in (
        "fp32", "ort_static_int8", "ort_static_int8_matmul", "ort_dynamic_int8", "graphlora_int8", "ort_int4_acc0",
        "ort_int4_acc4", "graphlora_int4", "graphlora_qwlora_branch")}

    def timed(name, fn, *a, **kw):
        t = time.perf_counter()
        out = fn(*a, **kw)
        timings[name] = time.perf_counter() - t
        return out

    plain = graphlora.transform(model, [graphlora.QuantRule(ALL_LINEARS)], (), example, progress=False)
    timed("export_fp32_s", export_onnx, plain, p["fp32"], (), example)
    timed("graphlora_int8_s", _graphlora_int8, model, calib, example, p["graphlora_int8"], act_calibration)
    timed("ort_static_int8_s", _ort_static, p["fp32"], p["ort_static_int8"], calib)
    timed("ort_static_int8_matmul_s", _ort_static, p["fp32"], p["ort_static_int8_matmul"], calib,
          ["MatMul", "Gemm"])
    timed("ort_dynamic_int8_s", _ort_dynamic, p["fp32"], p["ort_dynamic_int8"])
    timed("graphlora_int4_s", _graphlora_int4, model, example, p["graphlora_int4"], int4_method, calib)
    timed("ort_int4_acc0_s", _ort_nbits, p["fp32"], p["ort_int4_acc0"], 0)
    timed("ort_int4_acc4_s", _ort_nbits, p["fp32"], p["ort_int4_acc4"], 4)
    qw = timed("qwlora_s", qw_lora_model, model, tok, qwlora_steps)
    if qw is not None:
        export_onnx(qw, p["graphlora_qwlora_branch"], (), example, lora="branch")

    # sessions: (file, accuracy level)
    plan = {
        "fp32": ("fp32", None),
        "graphlora_int8": ("graphlora_int8", None),
        "ort_static_int8": ("ort_static_int8", None),
        "ort_static_int8_matmul": ("ort_static_int8_matmul", None),
        "ort_dynamic_int8": ("ort_dynamic_int8", None),
        "graphlora_int4_acc0": ("graphlora_int4", 0),
        "ort_int4_acc0": ("ort_int4_acc0", 0),
        "graphlora_int4_acc4": ("graphlora_int4", 4),
        "ort_int4_acc4": ("ort_int4_acc4", 4),
    }
    if qw is not None:
        plan["graphlora_qwlora_branch_acc0"] = ("graphlora_qwlora_branch", 0)
        plan["graphlora_qwlora_branch_acc4"] = ("graphlora_qwlora_branch", 4)
    sessions = {k: _session(p[f], choice.providers, acc, threads) for k, (f, acc) in plan.items()}
    used = sorted({prov for s in sessions.values() for prov in s.providers_used})
    cos = {k: float(_cosine(_embed(s, held), ref).mean()) for k, s in sessions.items()}
    load_before = os.getloadavg()[0]
    latency = _latencies(sessions, held[0], rounds, per_round, warmup)
    load_after = os.getloadavg()[0]
    size = {k: _size_mb(p[f]) for k, (f, _) in plan.items()}

    checks = {}
    for k in ("graphlora_int8", "graphlora_int4"):
        opt = optimized_model(p[k], providers=list(choice.providers))
        checks[k] = {"kernels": dict(quantized_kernels(opt)), "float_fallbacks": len(float_fallbacks(opt))}

    def ratio(a, b):
        return latency[a] / latency[b]

    result = {
        "providers": used,
        "provider_reason": choice.reason,
        "onnxruntime": ort.__version__,
        "batch": [BATCH, SEQ],
        "eval_sentences": len(held) * BATCH,
        "calibration_sentences": len(calib) * BATCH,
        "threads": threads,
        "load_before": load_before,
        "load_after": load_after,
        "latency_ms": latency,
        "cosine": cos,
        "size_mb": size,
        "ratios": {
            "int8_latency_vs_static_qdq": ratio("graphlora_int8", "ort_static_int8"),
            "int8_latency_vs_static_qdq_matmul_only": ratio("graphlora_int8", "ort_static_int8_matmul"),
            "int8_latency_vs_dynamic": ratio("graphlora_int8", "ort_dynamic_int8"),
            "int4_latency_vs_matmulnbits_acc0": ratio("graphlora_int4_acc0", "ort_int4_acc0"),
            "int4_latency_vs_matmulnbits_acc4": ratio("graphlora_int4_acc4", "ort_int4_acc4"),
            "int4_size_vs_matmulnbits": size["graphlora_int4_acc0"] / size["ort_int4_acc0"],
        },
        "optimized_graph": checks,
        "settings": {"int4_weight_calibration": int4_method, "act_calibration": act_calibration,
                     "qwlora_steps": qwlora_steps},
        "prepare_s": timings,
    }
    result["markdown"] = render(result)
    if tmp is not None:
        tmp.cleanup()
    return result


def render(r: dict) -> list[str]:
    lat, cos, size, rat = r["latency_ms"], r["cosine"], r["size_mb"], r["ratios"]
    rows = [
        ("fp32 (graphlora export)", "fp32", "", ""),
        ("**graphlora int8** (per-channel W, calibrated uint8 A, QDQ)", "graphlora_int8", "", ""),
        ("onnxruntime quantize_static (QDQ, per_channel)", "ort_static_int8",
         f"{rat['int8_latency_vs_static_qdq']:.2f} (goal <= 1.0)", ""),
        ("onnxruntime quantize_static, MatMul/Gemm only (the sites graphlora quantizes)",
         "ort_static_int8_matmul", f"{rat['int8_latency_vs_static_qdq_matmul_only']:.2f}", ""),
        ("onnxruntime quantize_dynamic (int8 W, dynamic A)", "ort_dynamic_int8",
         f"{rat['int8_latency_vs_dynamic']:.2f} (goal <= 1.0)", ""),
        ("**graphlora int4** g32 sym, accuracy_level 0", "graphlora_int4_acc0", "", ""),
        ("onnxruntime MatMulNBitsQuantizer g32 sym, accuracy_level 0", "ort_int4_acc0",
         f"{rat['int4_latency_vs_matmulnbits_acc0']:.2f} (goal <= 1.0)",
         f"{rat['int4_size_vs_matmulnbits']:.3f} (goal <= 1.0)"),
        ("**graphlora int4** g32 sym, accuracy_level 4", "graphlora_int4_acc4", "", ""),
        ("onnxruntime MatMulNBitsQuantizer g32 sym, accuracy_level 4", "ort_int4_acc4",
         f"{rat['int4_latency_vs_matmulnbits_acc4']:.2f} (goal <= 1.0)", ""),
    ]
    if "graphlora_qwlora_branch_acc0" in lat:
        rows += [("graphlora QW-LoRA, lora='branch', accuracy_level 0", "graphlora_qwlora_branch_acc0", "", ""),
                 ("graphlora QW-LoRA, lora='branch', accuracy_level 4", "graphlora_qwlora_branch_acc4", "", "")]
    header = (
        f"onnxruntime {r['onnxruntime']} on {', '.join(r['providers'])}; batch {r['batch'][0]} x "
        f"{r['batch'][1]} tokens; cosine of mean-pooled embeddings to fp32 PyTorch over "
        f"{r['eval_sentences']} held-out sentences; {r['calibration_sentences']} calibration "
        f"sentences; load average {r['load_before']:.2f} -> {r['load_after']:.2f}."
    )
    out = [
        header,
        "",
        "| model | latency ms | graphlora / peer latency | cosine to fp32 | file MB | graphlora / peer size |",
        "|---|---|---|---|---|---|",
    ]
    for label, key, lratio, sratio in rows:
        out.append(f"| {label} | {lat[key]:.1f} | {lratio} | {cos[key]:.4f} | {size[key]:.1f} | {sratio} |")
    out.append("")
    if "graphlora_qwlora_branch_acc0" not in lat:
        out.append("QW-LoRA row: skipped (pass `qwlora_steps` > 0 to train it in this run).")
    checks = r["optimized_graph"]
    out.append("Optimised graphs: " + "; ".join(
        f"{k}: {v['kernels']}, float fallbacks {v['float_fallbacks']}" for k, v in checks.items()))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--providers", default="cpu", help="cpu | auto | cuda")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--int4-method", default="gptq", help="absmax | minmax | mse | gptq")
    ap.add_argument("--act-calibration", default="minmax", help="minmax | percentile | mse")
    ap.add_argument("--qwlora-steps", type=int, default=0)
    ap.add_argument("--workdir", default=None, help="keep the .onnx files here")
    args = ap.parse_args(argv)
    r = run(args.providers, rounds=args.rounds, threads=args.threads, int4_method=args.int4_method,
            act_calibration=args.act_calibration, qwlora_steps=args.qwlora_steps, workdir=args.workdir)
    print("\n".join(r["markdown"]))
    print(json.dumps({k: v for k, v in r.items() if k != "markdown"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
