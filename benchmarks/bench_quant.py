"""Weight quantization on the real MiniLM: quality, size and speed of each format and method.

For int4 g32/g64, nf4 g64 and int8 per-channel, with absmax, mse and gptq (where defined):
held-out cosine of mean-pooled embeddings to fp32, bits per quantized parameter, the time the
method takes, and the QLoRA forward time (packed storage, dequantized on the fly) relative to
the fp32 forward.

``--grids`` compares the two symmetric integer grids instead (``full``: every code, AIMET's;
``restricted``: without the most negative code) for each integer weight qtype and method, and for
symmetric int8/int16 activations at the linear layers' inputs: the measurement behind
``graphlora.quant.DEFAULT_GRIDS``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

CONFIGS = [
    ("int4", 32, "absmax"), ("int4", 32, "mse"), ("int4", 32, "gptq"), ("int4", 32, "seqmse"),
    ("int4", 32, "adaround"),
    ("int4", 64, "absmax"), ("int4", 64, "mse"), ("int4", 64, "gptq"),
    ("nf4", 64, "absmax"), ("nf4", 64, "gptq"),
    ("int8", None, "absmax"), ("int8", None, "mse"), ("int8", None, "gptq"),
]


def _forward_time(model, batch, repeats=10):
    times = []
    with torch.no_grad():
        for i in range(repeats + 2):
            t = time.perf_counter()
            model(**batch)
            if i >= 2:
                times.append(time.perf_counter() - t)
    return statistics.median(times)


GRID_CONFIGS = [
    ("int4", 32, "absmax"), ("int4", 32, "mse"), ("int4", 32, "gptq"),
    ("int4", 64, "absmax"), ("int4", 64, "mse"),
    ("int4", None, "absmax"), ("int4", None, "mse"),
    ("int8", None, "absmax"), ("int8", None, "mse"), ("int8", None, "gptq"),
]
GRID_ACT_CONFIGS = [("int8", "minmax"), ("int8", "percentile"), ("int8", "mse"), ("int16", "minmax")]


def run_grids(configs=GRID_CONFIGS, act_configs=GRID_ACT_CONFIGS, calib_sentences: int = 256) -> dict:
    """Held-out cosine of each weight (and activation) configuration on both symmetric grids,
    interleaved (full, then restricted, per configuration) in one process."""
    import graphlora
    from graphlora.recipes import ENCODER_LINEARS, batches, heldout_cosine, load_minilm, reference_embeddings, text_splits

    model, tok = load_minilm()
    texts = text_splits()
    held = batches(tok, texts.heldout, 64)
    ref = reference_embeddings(model, held)
    calib = batches(tok, texts.train[:calib_sentences], 32)
    rows = []
    for qtype, group, method in configs:
        row = {"qtype": qtype, "group": group, "method": method}
        for grid in ("full", "restricted"):
            rule = graphlora.QuantRule(ENCODER_LINEARS, weight_qtype=qtype, group_size=group,
                                       weight_calibration=method, weight_grid=grid)
            lm = graphlora.transform(model, [rule], example_kwargs=calib[0],
                                     calibration_data=calib if method == "gptq" else None, progress=False)
            row[grid] = heldout_cosine(lm, held, ref)
        row["better"] = "full" if row["full"] >= row["restricted"] else "restricted"
        rows.append(row)
        print(json.dumps(row), flush=True)
    act_rows = []
    for qtype, calibration in act_configs:
        row = {"act_qtype": qtype, "calibration": calibration}
        for grid in ("full", "restricted"):
            rule = graphlora.QuantRule(ENCODER_LINEARS, act_qtype=qtype, act_symmetric=True,
                                       act_calibration=calibration, act_grid=grid)
            lm = graphlora.transform(model, [rule], example_kwargs=calib[0], progress=False)
            graphlora.calibrate(lm, calib, progress=False)
            row[grid] = heldout_cosine(lm, held, ref)
        row["better"] = "full" if row["full"] >= row["restricted"] else "restricted"
        act_rows.append(row)
        print(json.dumps(row), flush=True)
    return {"weight_rows": rows, "activation_rows": act_rows, "threads": torch.get_num_threads()}


def run(configs=CONFIGS, calib_sentences: int = 256) -> dict:
    import graphlora
    from graphlora.quant import weight_method
    from graphlora.recipes import ENCODER_LINEARS, batches, heldout_cosine, load_minilm, reference_embeddings, text_splits

    model, tok = load_minilm()
    texts = text_splits()
    held = batches(tok, texts.heldout, 64)
    ref = reference_embeddings(model, held)
    calib = batches(tok, texts.train[:calib_sentences], 32)
    timing_batch = dict(tok(texts.heldout[:8], padding="max_length", max_length=64, truncation=True, return_tensors="pt"))
    fp32_time = _forward_time(model, timing_batch)
    rows = []
    for qtype, group, method in configs:
        rule = graphlora.QuantRule(ENCODER_LINEARS, weight_qtype=qtype, group_size=group, weight_calibration=method)
        t0 = time.perf_counter()
        needs_data = weight_method(method).needs_data
        lm = graphlora.transform(model, [rule], example_kwargs=calib[0], calibration_data=calib if needs_data else None, progress=False)
        seconds = time.perf_counter() - t0
        rows.append({
            "qtype": qtype, "group": group, "method": method,
            "cosine": heldout_cosine(lm, held, ref),
            "bits_per_param": lm.memory_report()["bits_per_quantized_param"],
            "transform_s": seconds,
            "forward_ratio_vs_fp32": _forward_time(lm, timing_batch) / fp32_time,
        })
        print(json.dumps(rows[-1]))
    return {"fp32_forward_s_batch8x64": fp32_time, "rows": rows, "threads": torch.get_num_threads()}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--grids", action="store_true", help="compare the full and restricted grids")
    ap.add_argument("--methods", nargs="+", help="only the int4 b32 rows of these weight methods")
    args = ap.parse_args()
    if args.grids:
        result = run_grids()
    elif args.methods:
        result = run([c for c in CONFIGS if c[:2] == ("int4", 32) and c[2] in args.methods])
    else:
        result = run()
    print(json.dumps(result, indent=2))
