"""``graphlora.train_lora``: a plain training loop for LoRA parameters, for users without one.

Any loop works on a LoraModel (it is an ``nn.Module`` whose only trainable parameters are the
LoRA weights); this one adds what recovery training needs: a validation metric checked every
``eval_every`` steps *including before the first step*, and the best adapter kept. So training
can only improve on the starting point as measured on held-out data — it never undoes a good
quantized base.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch

from graphlora.errors import InputError
from graphlora.validate import check_count, check_finite


@dataclass
class TrainResult:
    steps: int
    losses: list[float] = field(default_factory=list)
    evals: list[tuple[int, float]] = field(default_factory=list)  # (step, metric)
    best_step: int = 0
    best_metric: float | None = None


def train_lora(
    model,
    batches: Iterable[Any],
    loss_fn: Callable[[Any, Any], torch.Tensor],
    *,
    steps: int,
    lr: float = 1e-4,
    weight_decay: float = 0.0,
    warmup_steps: int = 0,
    schedule: str = "cosine",
    grad_clip: float | None = 1.0,
    eval_fn: Callable[[Any], float] | None = None,
    eval_every: int = 50,
    higher_is_better: bool = True,
    keep_best: bool = True,
    train_mode: bool = True,
    progress: bool = True,
) -> TrainResult:
    """Train the active LoRA parameters of ``model`` for ``steps`` optimizer steps.

    ``loss_fn(model, batch) -> scalar tensor`` gets the model and one batch (cycled if the
    iterable runs out). ``eval_fn(model) -> float`` is called under ``torch.no_grad`` in eval mode
    at step 0, every ``eval_every`` steps and at the end; with ``keep_best`` the LoRA weights of
    the best evaluation are restored at the end. AdamW with linear warmup then cosine (or
    ``"constant"``) learning rate. ``train_mode=False`` trains with the model in eval mode (no
    dropout), which suits distillation from a teacher.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise InputError("train_lora: the model has no trainable (LoRA) parameters")
    check_count(steps, "train_lora: steps")
    check_count(warmup_steps, "train_lora: warmup_steps")
    check_count(eval_every, "train_lora: eval_every", minimum=1)
    if check_finite(lr, "train_lora: lr") <= 0:
        raise InputError(f"train_lora: lr must be > 0, got {lr!r}")
    if check_finite(weight_decay, "train_lora: weight_decay") < 0:
        raise InputError(f"train_lora: weight_decay must be >= 0, got {weight_decay!r}")
    if grad_clip is not None and check_finite(grad_clip, "train_lora: grad_clip") < 0:
        raise InputError(f"train_lora: grad_clip must be >= 0 or None, got {grad_clip!r}")
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(schedule, warmup_steps, steps))
    result = TrainResult(steps=steps)
    best_state = None

    def evaluate(step: int) -> None:
        nonlocal best_state
        if eval_fn is None:
            return
        model.eval()
        with torch.no_grad():
            metric = float(eval_fn(model))
        model.train(train_mode)
        result.evals.append((step, metric))
        better = result.best_metric is None or (
            metric > result.best_metric if higher_is_better else metric < result.best_metric
        )
        if better:
            result.best_metric, result.best_step = metric, step
            if keep_best:
                best_state = [p.detach().clone() for p in params]

    evaluate(0)
    data = _cycle(batches)
    model.train(train_mode)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc="training LoRA", leave=False)
    for step in range(1, steps + 1):
        batch = next(data)
        loss = loss_fn(model, batch)
        if not torch.isfinite(loss):
            raise InputError(f"train_lora: loss became {loss.item()} at step {step}; lower lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        opt.step()
        sched.step()
        result.losses.append(loss.item())
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4g}")
        if eval_fn is not None and (step % eval_every == 0 or step == steps):
            evaluate(step)
    if bar is not None:
        bar.close()
    model.eval()
    if keep_best and best_state is not None:
        with torch.no_grad():
            for p, v in zip(params, best_state):
                p.copy_(v)
    return result


def _schedule(kind: str, warmup: int, total: int):
    if kind not in ("cosine", "constant"):
        raise InputError(f"train_lora: schedule must be 'cosine' or 'constant', got {kind!r}")

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if kind == "constant" or total <= warmup:
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _cycle(batches: Iterable[Any]):
    cached = []
    for b in batches:
        cached.append(b)
        yield b
    if not cached:
        raise InputError("train_lora: no training batches")
    yield from itertools.cycle(cached)
