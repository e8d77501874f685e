"""Per-token cost of graphlora's KV-cache decoder export vs the full-recompute export, same run.

A Llama-shaped causal LM with random weights (no download) and LoRA on q/v, int4 base (group 32)
with the LoRA as a branch, exported twice: ``kv_cache=True`` (one decoder step with
past/present key-values, :mod:`graphlora.onnx.decoder`) and ``kv_cache=False`` (``input_ids ->
logits``, every token recomputes the whole sequence). Both run in plain onnxruntime, one thread,
accuracy level 0. At each context length (32, 256 tokens) a "token" is: with the cache, one
decoder step against a past of that length; without, one forward over context + 1 tokens.
Prefill is the cache model's prompt step. Rounds are interleaved (every model in every round) and
medians quoted. Greedy agreement: 24 new tokens from graphlora.onnx.generate equal the
LoraModel's own generate().

``python benchmarks/bench_decoder_onnx.py [--hidden 256 --layers 4 --rounds 5]``
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def build(hidden: int, layers: int, vocab: int):
    import transformers

    import graphlora

    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 3,
                                      num_hidden_layers=layers, num_attention_heads=max(hidden // 64, 2),
                                      num_key_value_heads=max(hidden // 128, 1), vocab_size=vocab,
                                      max_position_embeddings=1024)
    base = transformers.LlamaForCausalLM(config).eval()
    rule = graphlora.LoraRule(r".*(q|v)_proj", rank=8, weight_qtype="int4", group_size=32)
    lm = graphlora.transform(base, rule, (), {"input_ids": torch.randint(0, vocab, (2, 8))})
    with torch.no_grad():
        for p in lm.lora_parameters():
            p.normal_(0, 0.05)
    return lm, sum(p.numel() for p in base.parameters())


def cache_feeds(sess, batch: int, past_len: int, token: int):
    feeds = {"input_ids": np.full((batch, 1), token, np.int64),
             "attention_mask": np.ones((batch, past_len + 1), np.int64),
             "position_ids": np.full((batch, 1), past_len, np.int64)}
    for item in sess.get_inputs():
        if item.name.startswith("past_key_values."):
            feeds[item.name] = np.random.RandomState(0).randn(
                batch, item.shape[1], past_len, item.shape[3]).astype(np.float32)
    return feeds


def prefill_feeds(sess, prompt: np.ndarray):
    feeds = {"input_ids": prompt, "attention_mask": np.ones_like(prompt),
             "position_ids": np.arange(prompt.shape[1])[None].repeat(prompt.shape[0], 0)}
    for item in sess.get_inputs():
        if item.name.startswith("past_key_values."):
            feeds[item.name] = np.zeros((prompt.shape[0], item.shape[1], 0, item.shape[3]), np.float32)
    return feeds


def timed(fn, repeat: int) -> float:
    fn()  # warm
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat * 1e3


def run(hidden: int = 256, layers: int = 4, vocab: int = 2048, rounds: int = 5, contexts=(32, 256)) -> dict:
    import graphlora
    from graphlora.onnx import InferenceSession, export_onnx, generate

    torch.set_num_threads(1)
    lm, params = build(hidden, layers, vocab)
    out: dict = {"params": params, "hidden": hidden, "layers": layers, "vocab": vocab}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        cached = export_onnx(lm, Path(tmp) / "decoder.onnx", lora="branch", kv_cache=True)
        out["export_s_cache"] = time.perf_counter() - t0
        full = export_onnx(lm, Path(tmp) / "full.onnx", (), {"input_ids": torch.randint(0, vocab, (2, 8))},
                           lora="branch", kv_cache=False)
        out["size_mb_cache"] = cached.path.stat().st_size / 2**20
        out["size_mb_full"] = full.path.stat().st_size / 2**20
        s_cache = InferenceSession(cached.path, "cpu", accuracy_level=0, intra_op_num_threads=1)
        s_full = InferenceSession(full.path, "cpu", accuracy_level=0, intra_op_num_threads=1)
        rng = np.random.RandomState(1)
        samples: dict[str, list[float]] = {}
        for _ in range(rounds):
            for ctx in contexts:
                step = cache_feeds(s_cache, 1, ctx, 5)
                samples.setdefault(f"cache_ms_token@{ctx}", []).append(timed(lambda: s_cache.run(["logits"], step), 20))
                seq = {"input_ids": rng.randint(0, vocab, (1, ctx + 1)).astype(np.int64)}
                samples.setdefault(f"full_ms_token@{ctx}", []).append(timed(lambda: s_full.run(None, seq), 5))
                prompt = prefill_feeds(s_cache, rng.randint(0, vocab, (1, ctx)).astype(np.int64))
                samples.setdefault(f"prefill_ms@{ctx}", []).append(timed(lambda: s_cache.run(["logits"], prompt), 3))
        for key, values in samples.items():
            out[key] = statistics.median(values)
        for ctx in contexts:
            out[f"full_over_cache@{ctx}"] = out[f"full_ms_token@{ctx}"] / out[f"cache_ms_token@{ctx}"]
        prompt = torch.randint(0, vocab, (3, 12), generator=torch.Generator().manual_seed(2))
        got = generate(s_cache, prompt, 24, progress=False)
        with torch.no_grad():
            want = lm.generate(input_ids=prompt, max_new_tokens=24, min_new_tokens=24, do_sample=False,
                               eos_token_id=None, pad_token_id=0).numpy()
        out["greedy_rows_equal"] = f"{int((got == want).all(axis=1).sum())}/{len(prompt)}"
    out["versions"] = {"graphlora": graphlora.__version__, "torch": torch.__version__,
                       "onnxruntime": __import__("onnxruntime").__version__}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    result = run(args.hidden, args.layers, args.vocab, args.rounds)
    print(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
