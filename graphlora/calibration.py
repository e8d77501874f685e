"""``graphlora.calibrate``: run data through a model and freeze activation encodings.

Calibration is three passes around a data loop: insert observers where rules ask for activation
(or LoRA-branch) quantization, run the batches without gradients, and replace each observer by
fake-quant with the encoding it computed. Under an initialised ``torch.distributed`` process group
the observers' statistics are reduced across ranks before freezing, so every rank ends with the
same encodings — the ones one process would get from all the data.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch

from graphlora import batches as batch_feed
from graphlora import meta
from graphlora.collectives import is_initialized, sync_stats
from graphlora.errors import CalibrationError
from graphlora.passes.graph_observers import InsertGraphObserversPass
from graphlora.passes.observers import (
    OBSERVER_ROOT,
    FreezeObserversPass,
    InsertObserversPass,
    QuantizeLoraWeightsPass,
    Targets,
    observer_modules,
    remove_fake_quant,
)
from graphlora.quant import Encoding
from graphlora.rules import ActivationRule, normalize_activation_rules
from graphlora.sites import tagged_sites
from graphlora.validate import check_count


def calibrate(
    model,
    batches: Iterable[Any],
    *,
    num_batches: int | None = None,
    targets: Targets = "all",
    recalibrate: bool = False,
    activations: ActivationRule | Sequence[ActivationRule] | None = None,
    progress: bool = True,
) -> dict[str, Encoding]:
    """Calibrate the activation encodings of ``model`` (a LoraModel) on ``batches``.

    ``batches``: an iterable of argument tuples, keyword dicts or tensors (a DataLoader works).
    ``targets``: ``"base"`` (site inputs), ``"lora"`` (LoRA branch activations and weights) or
    ``"all"``. ``activations``: :class:`~graphlora.ActivationRule` s placing encodings on the
    outputs of whole-graph ops (norms, activation functions, softmax, adds, matmuls,
    embeddings, linear layers) in addition to what the site rules ask; they count as base
    targets. Tensors that already have an encoding keep it unless ``recalibrate=True``.
    Returns the encodings computed by this call, by tensor name.
    """
    check_count(num_batches, "calibrate(num_batches=...)", optional=True)
    gm = model.graph_module
    if recalibrate:
        remove_fake_quant(gm, targets)
        gm.recompile()
    passes = []
    if activations is not None and targets in ("all", "base"):
        passes.append(InsertGraphObserversPass(normalize_activation_rules(activations)))
    insert = InsertObserversPass(targets)
    model.run_passes(passes + [insert])
    observers = observer_modules(gm)
    wants_lora_weights = targets in ("all", "lora") and any(
        s.rule is not None and s.rule.lora_weight_qtype for s in tagged_sites(gm)
    )
    lora_weights = QuantizeLoraWeightsPass() if wants_lora_weights else None
    if not observers and lora_weights is None:
        raise CalibrationError(
            f"nothing to calibrate for targets={targets!r}: no rule asks for activation "
            "quantization (act_qtype / lora_act_qtype) on a tensor without an encoding"
        )
    was_training = model.training
    model.eval()
    seen = 0
    try:
        if observers:
            with torch.no_grad():
                for batch in batch_feed.iterate(batches, num_batches=num_batches, progress=progress, desc="calibrating"):
                    batch_feed.call(model, batch)
                    seen += 1
            if seen == 0:
                raise CalibrationError(
                    "calibration got no batches: pass a non-empty iterable of inputs "
                    "(tuples of positional arguments or dicts of keyword arguments)"
                )
            _sync(observers)
        freeze = FreezeObserversPass()
        model.run_passes([freeze] + ([lora_weights] if lora_weights is not None else []))
    except BaseException:
        _drop_observers(gm)
        raise
    finally:
        model.train(was_training)
    result = dict(freeze.encodings)
    if lora_weights is not None:
        result.update(lora_weights.encodings)
    return result


def _drop_observers(gm) -> None:
    """On failure, leave the graph as it was before calibration (no observers behind)."""
    for node in [n for n in gm.graph.nodes if meta.role(n) == "observer"]:
        node.replace_all_uses_with(node.args[0])
        gm.graph.erase_node(node)
    gm._modules.pop(OBSERVER_ROOT, None)
    gm.recompile()


def _sync(observers) -> None:
    if is_initialized():
        sync_stats(observers)
