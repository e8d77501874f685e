"""Weight quantization on the real MiniLM: quality, size and speed of each format and method.

For int4 g32/g64, nf4 g64 and int8 per-channel, with absmax, mse and gptq (where defined):
held-out cosine of mean-pooled embeddings to fp32, bits per quantized parameter, the time the
method takes, and the QLoRA forward time (packed storage, dequantized on the fly) relative to
the fp32 forward.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

CONFIGS = [
    ("int4", 32, "absmax"), ("int4", 32, "mse"), ("int4", 32, "gptq"),
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


def run(configs=CONFIGS, calib_sentences: int = 256) -> dict:
    import graphlora
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
        lm = graphlora.transform(model, [rule], example_kwargs=calib[0], calibration_data=calib if method == "gptq" else None, progress=False)
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
    argparse.ArgumentParser(description=__doc__).parse_args()
    print(json.dumps(run(), indent=2))
