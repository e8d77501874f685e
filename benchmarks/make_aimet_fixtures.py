"""Make the AIMET fixtures of tests/fixtures/aimet/ with aimet-torch itself, and check that AIMET's
``QuantizationSimModel.load_encodings`` accepts the encodings file graphlora writes.

Needs its own venv with aimet-torch (not a graphlora dependency; see docs/qw-lora.md):

    python3 -m venv /work/venvs/aimet
    /work/venvs/aimet/bin/pip install torch==2.14.1 torchvision==0.29.1   # a pair that imports
    /work/venvs/aimet/bin/pip install aimet-torch==2.42.0 transformers
    PYTHONPATH=$PWD /work/venvs/aimet/bin/python benchmarks/make_aimet_fixtures.py [--check-only]

The model is a one-layer BERT from a config (hidden 32, intermediate 64, random weights, seed 0),
so every AIMET file stays small; its weights are saved beside the files, so tests rebuild exactly
the model AIMET quantized. AIMET quantizes it the way a QW-LoRA user would: int4 symmetric blocks
of 16 on query, key, intermediate and output dense (``set_blockwise_quantization_for_weights``),
int8 symmetric per channel on value, uint8 asymmetric per tensor on the attention output dense,
AIMET's default 8-bit asymmetric activations, min-max calibration. Then it exports every file
layout AIMET writes:

* ``sim.export`` with encoding version 0.6.1 and 1.0.0: ``sim_export_<v>.encodings`` (parameters
  by torch name, activations by ONNX tensor name), ``sim_export_torch.encodings`` (the 0.6.1
  dict by torch module name that ``load_encodings`` reads; the same for both versions) and
  ``sim_export.onnx``;
* ``sim.onnx.export`` with 0.6.1, 1.0.0 and 2.0.0: ``onnx_export_<v>.encodings`` (every name an
  ONNX tensor's: weights are the transposed ``<param>_0`` MatMul inputs) and ``onnx_export.onnx``.

ONNX files are stored without their weights and with only the ``name_scopes`` node metadata
(graph, initializer shapes and module scopes: what mapping names needs). ``reference.safetensors`` holds what AIMET's quantizers hold after calibration —
each weight quantizer's scale and offset in the parameter's own layout, its quantize-dequantize
of the weight, each activation quantizer's scale and offset — read from the quantizers, not from
any file, so tests compare graphlora's reading of each file with AIMET's own numbers.

The check (also run after making): graphlora reads every file (bit-exact against the
reference), writes the AIMET torch file of the same encodings and of encodings graphlora computed
itself, and a fresh QuantizationSimModel loads each with ``load_encodings(strict=True)``; the
script prints how many quantizers were set and whether their scales and offsets are AIMET's.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
FIXTURES = HERE.parent / "tests" / "fixtures" / "aimet"
CONFIG = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
              vocab_size=64, max_position_embeddings=32, type_vocab_size=1)
BLOCK = 16
BLOCKED = ("attention.self.query", "attention.self.key", "intermediate.dense", "output.dense")
PER_CHANNEL = ("attention.self.value",)
PER_TENSOR_ASYM = ("attention.output.dense",)


class Encoder(torch.nn.Module):
    """BERT returning its last hidden state from positional (input_ids, attention_mask), the call
    AIMET's QuantizationSimModel and export trace."""

    def __init__(self, bert):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids, attention_mask):
        return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def build_model(weights: Path | None = None) -> Encoder:
    import transformers

    torch.manual_seed(0)
    bert = transformers.BertModel(transformers.BertConfig(**CONFIG), add_pooling_layer=False)
    model = Encoder(bert).eval()
    with torch.no_grad():  # non-zero biases: the ONNX exporters would otherwise share one constant
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0.0, 0.02)
    if weights is not None:
        from safetensors.torch import load_file

        model.load_state_dict(load_file(weights))
    return model


def batches(n: int = 4, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, CONFIG["vocab_size"], (2, 12), generator=g)
        out.append((ids, torch.ones_like(ids)))
    return out


def _kind(name: str) -> str | None:
    for suffix, kind in [(s, "block") for s in BLOCKED] + [(s, "channel") for s in PER_CHANNEL] + [
            (s, "tensor_asym") for s in PER_TENSOR_ASYM]:
        if name.endswith("layer.0." + suffix):
            return kind
    return None


def make_sim(model: Encoder):
    from aimet_torch.common.defs import QuantScheme
    from aimet_torch.quantization.affine import QuantizeDequantize
    from aimet_torch.quantsim import QuantizationSimModel
    from aimet_torch.quantsim.config_utils import set_blockwise_quantization_for_weights

    example = batches(1)[0]
    sim = QuantizationSimModel(model, example, quant_scheme=QuantScheme.min_max,
                               default_param_bw=4, default_output_bw=8)
    set_blockwise_quantization_for_weights(
        sim, lambda m: isinstance(m, torch.nn.Linear) and _kind(_name_of(sim, m)) == "block",
        bitwidth=4, symmetric=True, block_size=BLOCK)
    for name, qmodule in sim.named_qmodules():
        kind = _kind(name)
        if kind == "channel":
            out = qmodule.weight.shape[0]
            qmodule.param_quantizers["weight"] = QuantizeDequantize((out, 1), 8, True)
        elif kind == "tensor_asym":
            qmodule.param_quantizers["weight"] = QuantizeDequantize((1, 1), 8, False)
    return sim


def _name_of(sim, module) -> str:
    for name, m in sim.model.named_modules():
        if m is module:
            return name
    raise KeyError(module)


def _strip_weights(src: Path, dst: Path) -> None:
    """Copy an ONNX model without its initializer data (graph + shapes only)."""
    import onnx

    model = onnx.load(str(src))
    for node in model.graph.node:  # keep the module scopes; stack traces and fx text are bulk
        keep = [p for p in node.metadata_props if p.key == "pkg.torch.onnx.name_scopes"]
        del node.metadata_props[:]
        node.metadata_props.extend(keep)
    with tempfile.TemporaryDirectory() as tmp:
        onnx.save_model(model, os.path.join(tmp, "m.onnx"), save_as_external_data=True,
                        all_tensors_to_one_file=True, location="weights.data", size_threshold=0)
        shutil.copy(os.path.join(tmp, "m.onnx"), dst)


def reference(sim, model: Encoder) -> dict[str, torch.Tensor]:
    """AIMET's own numbers, read from its quantizers."""
    ref: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, qmodule in sim.named_qmodules():
            for pname, q in qmodule.param_quantizers.items():
                if q is None or not q.is_initialized():
                    continue
                key = f"{name}.{pname}"
                ref[f"{key}.scale"] = q.get_scale().detach().clone().contiguous()
                ref[f"{key}.offset"] = q.get_offset().detach().clone().to(torch.int32).contiguous()
                ref[f"{key}.qdq"] = q(getattr(qmodule, pname)).dequantize().detach().clone().contiguous()
            for io, quantizers in (("input", qmodule.input_quantizers), ("output", qmodule.output_quantizers)):
                for i, q in enumerate(quantizers):
                    if q is None or not q.is_initialized():
                        continue
                    ref[f"{name}.{io}.{i}.scale"] = q.get_scale().detach().clone().reshape(-1).contiguous()
                    ref[f"{name}.{io}.{i}.offset"] = q.get_offset().detach().clone().to(torch.int32).reshape(-1).contiguous()
    return ref


def make(out: Path) -> None:
    import aimet_torch
    from aimet_torch.common import quantsim as aimet_quantsim
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    model = build_model()
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, out / "model.safetensors")
    (out / "model.json").write_text(json.dumps({"bert_config": CONFIG, "block_size": BLOCK}, indent=2) + "\n")
    sim = make_sim(model)
    data = batches()
    sim.compute_encodings(lambda m, _: [m(*b) for b in data], None)
    example = data[0]
    save_file(reference(sim, model), out / "reference.safetensors")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for version in ("0.6.1", "1.0.0"):
            aimet_quantsim.encoding_version = version
            sim.export(str(tmp), f"sim_export_{version}", example)
            shutil.copy(tmp / f"sim_export_{version}.encodings", out)
        # the torch file is the same for both versions (0.6.1 layout), but for its version field
        shutil.copy(tmp / "sim_export_1.0.0_torch.encodings", out / "sim_export_torch.encodings")
        _strip_weights(tmp / "sim_export_1.0.0.onnx", out / "sim_export.onnx")
        for version in ("0.6.1", "1.0.0", "2.0.0"):
            f = tmp / f"onnx_export_{version}.onnx"
            sim.onnx.export(example, str(f), encoding_version=version)
            shutil.copy(tmp / f"onnx_export_{version}.encodings", out)
        _strip_weights(tmp / "onnx_export_2.0.0.onnx", out / "onnx_export.onnx")
    print(f"aimet-torch {aimet_torch.__version__}, torch {torch.__version__}: wrote "
          + ", ".join(sorted(p.name for p in out.iterdir())))


# ------------------------------------------------------------------------------------------ check
def check(out: Path) -> int:
    """graphlora reads AIMET's files; AIMET's loader reads graphlora's."""
    from safetensors.torch import load_file

    import graphlora

    model = build_model(out / "model.safetensors")
    ref = load_file(out / "reference.safetensors")
    example = batches(1)[0]
    lm = graphlora.transform(model, [graphlora.QuantRule(r"bert\.encoder\..*")],
                             example_kwargs=None, example_args=example, progress=False)
    failures = 0
    files = {
        "sim_export_0.6.1.encodings": "sim_export.onnx", "sim_export_1.0.0.encodings": "sim_export.onnx",
        "sim_export_torch.encodings": None,
        "onnx_export_0.6.1.encodings": "onnx_export.onnx", "onnx_export_1.0.0.encodings": "onnx_export.onnx",
        "onnx_export_2.0.0.encodings": "onnx_export.onnx",
    }
    read = {}
    for fname, onnx_name in files.items():
        result = graphlora.load_aimet_encodings(lm, out / fname,
                                                onnx_model=None if onnx_name is None else out / onnx_name)
        read[fname] = result
        exact = 0
        weights = [k for k in result.encodings if k.endswith(".weight")]
        for k in weights:
            enc = result.encodings[k]
            s_ref, o_ref = ref[f"{k}.scale"], ref[f"{k}.offset"]
            ok = torch.equal(enc.scale.reshape(s_ref.shape).float(), s_ref.float())
            zp = enc.zero_point if enc.zero_point is not None else torch.zeros(enc.scale.shape, dtype=torch.int32)
            ok &= torch.equal((-zp).reshape(o_ref.shape).to(torch.int32), o_ref)  # AIMET's offset = -zp
            w = dict(model.named_parameters())[k].detach()
            ok &= torch.equal(enc.dequantize(enc.quantize(w)), ref[f"{k}.qdq"])
            exact += bool(ok)
        acts = sorted(k for k in result.encodings if not k.endswith(".weight"))
        why = collections.Counter(r.split(" '")[0].split(" (")[0] for r in result.skipped.values())
        print(f"graphlora read {fname}: {exact}/{len(weights)} weight encodings bit-exact to AIMET's "
              f"quantizers, {len(acts)} activation encodings, {len(result.skipped)} entries skipped "
              f"({'; '.join(f'{n} {r}' for r, n in sorted(why.items()))})")
        failures += exact != len(weights)

    from aimet_torch.quantsim import QuantizationSimModel  # noqa: F401  (aimet must import)

    given = read["sim_export_torch.encodings"].encodings
    ours = {}
    for name, tensor in dict(model.named_parameters()).items():
        kind = _kind(name.rsplit(".", 1)[0]) if name.endswith(".weight") else None
        if kind == "block":
            ours[name] = graphlora.quant.calibrate_weight(tensor.detach(), "int4", method="mse", block_size=BLOCK)
        elif kind == "channel":
            ours[name] = graphlora.quant.calibrate_weight(tensor.detach(), "int8", method="mse")
        elif kind == "tensor_asym":
            ours[name] = graphlora.quant.calibrate_weight(tensor.detach(), "uint8", method="minmax", axis=None)
    for label, encodings in (("AIMET's encodings as graphlora read them", given),
                             ("encodings graphlora computed (mse weights)", ours)):
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "graphlora_torch.encodings"
            graphlora.save_aimet_encodings(encodings, path)
            sim = make_sim(build_model(out / "model.safetensors"))
            sim.load_encodings(str(path), strict=True, partial=True)
            set_params = 0
            elements = exact = offsets_ok = 0
            worst_ulp = 0
            for name, qmodule in sim.named_qmodules():
                q = qmodule.param_quantizers["weight"] if "weight" in qmodule.param_quantizers else None
                key = f"{name}.weight"
                if key not in encodings or q is None:
                    continue
                set_params += q.is_initialized()
                enc = encodings[key]
                zp = enc.zero_point if enc.zero_point is not None else torch.zeros(enc.scale.shape, dtype=torch.int32)
                theirs, mine = q.get_scale().reshape(-1).float(), enc.scale.reshape(-1).float()
                elements += mine.numel()
                exact += int((theirs == mine).sum())
                ulps = (theirs.view(torch.int32).long() - mine.view(torch.int32).long()).abs()
                worst_ulp = max(worst_ulp, int(ulps.max()))
                offsets_ok += torch.equal(q.get_offset().reshape(-1).to(torch.int32), (-zp).reshape(-1).to(torch.int32))
            acts = [k for k in encodings if not k.endswith(".weight")]
            act_set = sum(q is not None and q.is_initialized() for _, m in sim.named_qmodules()
                          for q in list(m.input_quantizers) + list(m.output_quantizers))
            print(f"AIMET load_encodings(strict=True) accepted graphlora's file of {label}: "
                  f"{set_params} weight quantizers set, offsets equal in {offsets_ok}; scales: "
                  f"{exact} of {elements} bit-exact, the rest within {worst_ulp} float32 ulp "
                  f"(AIMET's reader recomputes each scale as (max - min) / steps); "
                  f"{len(acts)} activation encodings written, {act_set} activation quantizers set")
            n_weights = len([k for k in encodings if k.endswith(".weight")])
            failures += set_params != n_weights or offsets_ok != n_weights or worst_ulp > 1
    return failures


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check-only", action="store_true", help="only check the existing fixtures")
    ap.add_argument("--out", type=Path, default=FIXTURES)
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not args.check_only:
        make(args.out)
    failures = check(args.out)
    print("OK" if not failures else f"{failures} check(s) failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
