"""AIMET's encodings files, both ways, against files aimet-torch 2.42 wrote itself.

``tests/fixtures/aimet`` was made by ``benchmarks/make_aimet_fixtures.py`` (in a venv with
aimet-torch): a one-layer BERT, its weights, every file layout AIMET exports for it, AIMET's ONNX
graphs (without weights) and ``reference.safetensors`` — the scales, offsets and
quantize-dequantized weights AIMET's quantizers hold, read from the quantizers rather than from
any file. Every expected number here comes from that reference or from AIMET's own files.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

import graphlora
from graphlora.errors import FileFormatError
from graphlora.io.aimet_format import read_aimet_file

FIXTURES = Path(__file__).parent / "fixtures" / "aimet"
WEIGHTS = [f"bert.encoder.layer.0.{m}.weight" for m in (
    "attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
    "intermediate.dense", "output.dense")]
FILES = {  # file -> the ONNX model AIMET exported with it (None: names are torch names)
    "sim_export_0.6.1.encodings": "sim_export.onnx",
    "sim_export_1.0.0.encodings": "sim_export.onnx",
    "sim_export_torch.encodings": None,
    "onnx_export_0.6.1.encodings": "onnx_export.onnx",
    "onnx_export_1.0.0.encodings": "onnx_export.onnx",
    "onnx_export_2.0.0.encodings": "onnx_export.onnx",
}


class Encoder(torch.nn.Module):
    """The module AIMET quantized: BERT's last hidden state from (input_ids, attention_mask)."""

    def __init__(self, bert):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids, attention_mask):
        return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


@pytest.fixture(scope="module")
def tiny():
    meta = json.loads((FIXTURES / "model.json").read_text())
    bert = transformers.BertModel(transformers.BertConfig(**meta["bert_config"]), add_pooling_layer=False)
    model = Encoder(bert).eval()
    model.load_state_dict(load_file(FIXTURES / "model.safetensors"))
    ids = torch.randint(0, meta["bert_config"]["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(1))
    lm = graphlora.transform(model, [graphlora.QuantRule(r"bert\.encoder\..*")], (ids, torch.ones_like(ids)),
                             progress=False)
    return model, lm, load_file(FIXTURES / "reference.safetensors")


def _load(lm, fname):
    onnx_name = FILES[fname]
    return graphlora.load_aimet_encodings(lm, FIXTURES / fname,
                                          onnx_model=None if onnx_name is None else FIXTURES / onnx_name)


@pytest.mark.parametrize("fname", list(FILES))
def test_every_aimet_layout_reads_bit_exact(tiny, fname):
    model, lm, ref = tiny
    result = _load(lm, fname)
    assert sorted(result.weights()) == sorted(WEIGHTS)
    params = dict(model.named_parameters())
    for name in WEIGHTS:
        enc = result.encodings[name]
        scale, offset = ref[f"{name}.scale"], ref[f"{name}.offset"]
        assert enc.scale.dtype == torch.float32
        assert torch.equal(enc.scale.reshape(scale.shape), scale), name  # bit for bit
        zp = enc.zero_point if enc.zero_point is not None else torch.zeros(enc.scale.shape, dtype=torch.int32)
        assert torch.equal((-zp).reshape(offset.shape).to(torch.int32), offset), name
        # AIMET's own quantize-dequantize of the weight, from its quantizer
        assert torch.equal(enc.dequantize(enc.quantize(params[name].detach())), ref[f"{name}.qdq"]), name
    granularity = {n: result.encodings[n].granularity for n in WEIGHTS}
    assert granularity[WEIGHTS[2]] == "PER_CHANNEL" and granularity[WEIGHTS[3]] == "PER_TENSOR"
    assert {granularity[n] for n in (WEIGHTS[0], WEIGHTS[1], WEIGHTS[4], WEIGHTS[5])} == {"PER_BLOCK"}
    assert result.encodings[WEIGHTS[5]].block_size == 16
    assert all(result.encodings[n].grid == "full" for n in WEIGHTS)  # AIMET's symmetric grid


@pytest.mark.parametrize("fname", list(FILES))
def test_module_outputs_read_as_aimet_calibrated_them(tiny, fname):
    _, lm, ref = tiny
    result = _load(lm, fname)
    outputs = {k: v for k, v in result.encodings.items() if k.endswith(".output")}
    assert "bert.encoder.layer.0.attention.self.query.output" in outputs
    assert "bert.encoder.layer.0.intermediate.intermediate_act_fn.output" in outputs
    checked = 0
    for name, enc in outputs.items():
        key = name[: -len(".output")] + ".output.0"
        if f"{key}.scale" not in ref:
            # 2.0.0 also lists encodings AIMET derives for outputs it does not quantize itself: an
            # embedding's lookup carries its int4 table's grid
            assert fname.startswith("onnx_export") and ".embeddings." in name, name
            continue
        assert torch.equal(enc.scale.reshape(1), ref[f"{key}.scale"]), name
        assert int(enc.zero_point) == -int(ref[f"{key}.offset"]), name
        checked += 1
    assert checked >= 9
    # nothing is dropped silently: what was not taken is listed with a reason
    assert result.skipped and all(isinstance(r, str) and r for r in result.skipped.values())


def test_torch_file_has_module_inputs_too(tiny):
    _, lm, ref = tiny
    result = _load(lm, "sim_export_torch.encodings")
    enc = result.encodings["bert.encoder.layer.0.output.LayerNorm.input"]
    assert torch.equal(enc.scale.reshape(1), ref["bert.encoder.layer.0.output.LayerNorm.input.0.scale"])


def test_onnx_named_weights_need_the_onnx_model(tiny):
    _, lm, _ = tiny
    for fname in ("onnx_export_1.0.0.encodings", "onnx_export_2.0.0.encodings", "onnx_export_0.6.1.encodings"):
        with pytest.raises(FileFormatError, match=r"attention\.self\.query\.weight_0.*onnx_model"):
            graphlora.load_aimet_encodings(lm, FIXTURES / fname)


def _edited(tmp_path, fname, edit):
    data = json.loads((FIXTURES / fname).read_text())
    edit(data)
    path = tmp_path / fname
    path.write_text(json.dumps(data))
    return path


def _entry(data, name):
    section = data.get("encodings") or data["param_encodings"]
    return next(e for e in section if e["name"] == name)


def test_transposed_block_scales_are_refused(tiny, tmp_path):
    """2.0.0 states y_scale's shape: scales laid out (out, blocks) on the (in, out) MatMul weight
    are the transposed layout, and refused."""
    _, lm, _ = tiny

    def transpose(data):
        e = _entry(data, "bert.encoder.layer.0.intermediate.dense.weight_0")
        e["y_scale"] = [list(r) for r in zip(*e["y_scale"])]

    path = _edited(tmp_path, "onnx_export_2.0.0.encodings", transpose)
    with pytest.raises(FileFormatError, match=r"intermediate\.dense\.weight_0.*y_scale of shape \(64, 2\)"):
        graphlora.load_aimet_encodings(lm, path, onnx_model=FIXTURES / "onnx_export.onnx")


def test_per_channel_on_the_wrong_axis_is_refused(tiny, tmp_path):
    _, lm, _ = tiny

    def wrong_axis(data):
        _entry(data, "bert.encoder.layer.0.attention.self.value.weight_0")["axis"] = 0

    path = _edited(tmp_path, "onnx_export_2.0.0.encodings", wrong_axis)
    with pytest.raises(FileFormatError, match=r"value\.weight_0.*axis 0.*axis 1"):
        graphlora.load_aimet_encodings(lm, path, onnx_model=FIXTURES / "onnx_export.onnx")


def test_ambiguous_counts_are_refused(tiny, tmp_path):
    """Scales that fit neither the weight's channels nor blocks dividing its inputs."""
    _, lm, _ = tiny

    def per_input_channel(data):  # 32 scales for intermediate.dense (64 out, 32 in)
        e = _entry(data, "bert.encoder.layer.0.intermediate.dense.weight")
        e.update(enc_type="PER_CHANNEL", scale=e["scale"][:32], offset=e["offset"][:32])
        e.pop("block_size")

    path = _edited(tmp_path, "sim_export_1.0.0.encodings", per_input_channel)
    with pytest.raises(FileFormatError, match=r"intermediate\.dense\.weight.*32 scales.*cannot be proven"):
        graphlora.load_aimet_encodings(lm, path, onnx_model=FIXTURES / "sim_export.onnx")

    def odd_blocks(data):  # 0.6.1 has no block size: 3 per channel would be blocks of 32 / 3
        name = "bert.encoder.layer.0.intermediate.dense.weight"
        entries = data["param_encodings"][name]
        data["param_encodings"][name] = (entries * 2)[: 64 * 3]

    path = _edited(tmp_path, "sim_export_torch.encodings", odd_blocks)
    with pytest.raises(FileFormatError, match=r"intermediate\.dense\.weight.*192 scales.*blocks dividing"):
        graphlora.load_aimet_encodings(lm, path)


def test_dims_that_contradict_the_weight_are_refused(tiny, tmp_path):
    """An ONNX initializer whose dims are not the weight read as (in, out)."""
    import onnx

    _, lm, _ = tiny
    model = onnx.load(str(FIXTURES / "onnx_export.onnx"), load_external_data=False)
    init = next(i for i in model.graph.initializer if i.name.endswith("intermediate.dense.weight_0"))
    init.dims[:] = list(reversed(init.dims))  # (64, 32): the torch orientation under a MatMul
    path = tmp_path / "onnx_export.onnx"
    onnx.save(model, str(path))
    with pytest.raises(FileFormatError, match=r"intermediate\.dense\.weight_0.*dims \(64, 32\)"):
        graphlora.load_aimet_encodings(lm, FIXTURES / "onnx_export_1.0.0.encodings", onnx_model=path)


def test_unsupported_aimet_features_are_refused(tmp_path):
    def lpbq(data):
        _entry(data, "bert.encoder.layer.0.attention.self.query.weight")["per_block_int_scale"] = [1] * 64

    path = _edited(tmp_path, "sim_export_1.0.0.encodings", lpbq)
    with pytest.raises(FileFormatError, match=r"query\.weight.*LPBQ"):
        read_aimet_file(path)

    def symmetric_with_zero_point(data):
        _entry(data, "bert.encoder.layer.0.attention.self.query.weight")["offset"][0] = -7

    path = _edited(tmp_path, "sim_export_1.0.0.encodings", symmetric_with_zero_point)
    with pytest.raises(FileFormatError, match=r"query\.weight.*offset must be -8"):
        read_aimet_file(path)


def test_graphlora_reader_points_aimet_files_to_the_aimet_reader():
    for fname in ("sim_export_1.0.0.encodings", "onnx_export_2.0.0.encodings", "sim_export_torch.encodings"):
        with pytest.raises(FileFormatError, match="load_aimet_encodings"):
            graphlora.load_encodings(FIXTURES / fname)


def test_written_file_is_what_aimet_writes(tiny, tmp_path):
    """graphlora's file of AIMET's own encodings has AIMET's bytes for every weight entry; an
    activation's ``max`` may move by a few float32 ulps, so that AIMET's reader — which keeps
    only min and max — recomputes exactly the scale graphlora holds."""
    _, lm, _ = tiny
    read = _load(lm, "sim_export_torch.encodings")
    path = tmp_path / "graphlora_torch.encodings"
    skipped = graphlora.save_aimet_encodings(read.encodings, path)
    assert skipped == {}
    ours, aimets = json.loads(path.read_text()), json.loads((FIXTURES / "sim_export_torch.encodings").read_text())
    assert set(ours["param_encodings"]) == set(WEIGHTS)
    for name in WEIGHTS:
        assert ours["param_encodings"][name] == aimets["param_encodings"][name], name
    assert set(ours["activation_encodings"]) <= set(aimets["activation_encodings"])
    for module, slots in ours["activation_encodings"].items():
        for io, entries in slots.items():
            theirs = aimets["activation_encodings"][module][io]["0"]
            mine = entries["0"]
            assert {k: v for k, v in mine.items() if k != "max"} == {k: v for k, v in theirs.items() if k != "max"}
            assert abs(mine["max"] - theirs["max"]) <= 8 * torch.finfo(torch.float32).eps * abs(theirs["max"])
    # AIMET's reading of each entry: scale = (max - min) / steps in float32; bit-exact where some
    # float32 max gives it (not every float32 scale is reachable), else the nearest
    exact = total = 0
    for entries in [*ours["param_encodings"].values(),
                    *(e["0"] for slots in ours["activation_encodings"].values() for e in slots.values())]:
        for e in entries if isinstance(entries, list) else [entries]:
            lo, hi = torch.tensor(e["min"]), torch.tensor(e["max"])
            theirs, mine = (hi - lo) / (2 ** e["bitwidth"] - 1), torch.tensor(e["scale"])
            ulps = abs(int(theirs.view(torch.int32)) - int(mine.view(torch.int32)))
            assert ulps <= 1, e
            exact += ulps == 0
            total += 1
    assert exact >= 0.9 * total


def test_written_file_leaves_out_what_aimet_cannot_hold(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 16))
    rule = graphlora.LoraRule(r"\d", rank=2, weight_qtype="int4", group_size=8, act_qtype="int8",
                              lora_weight_qtype="int8", lora_act_qtype="int8")
    x = torch.randn(4, 16)
    lm = graphlora.transform(model, [rule], (x,), progress=False)
    graphlora.calibrate(lm, [(torch.randn(4, 16),)], progress=False)
    path = tmp_path / "enc.json"
    with pytest.warns(graphlora.GraphloraWarning, match="left out"):
        skipped = graphlora.save_aimet_encodings(lm, path)
    assert skipped and all(".lora_" in k for k in skipped)
    doc = json.loads(path.read_text())
    assert set(doc["param_encodings"]) == {"0.weight", "2.weight"}
    assert len(doc["param_encodings"]["0.weight"]) == 16 * 2  # (out, in / 8) blocks
    assert doc["activation_encodings"]["0"]["input"]["0"]["bitwidth"] == 8


def test_loaded_weights_drive_qw_lora_step_1(tiny):
    """QW-LoRA step 1 applies AIMET's encodings: every weight lands on AIMET's grid."""
    model, _, ref = tiny
    rule = graphlora.LoraRule(r"bert\.encoder\.layer\.0\.(attention\.(self\.(query|key|value)|output\.dense)|intermediate\.dense|output\.dense)",
                              rank=2, weight_qtype="int4", group_size=16)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    flow = graphlora.qw_lora(copy.deepcopy(model), [rule], example_args=(ids, torch.ones_like(ids)), progress=False)
    aimet = graphlora.load_aimet_encodings(flow.model, FIXTURES / "onnx_export_2.0.0.encodings",
                                           onnx_model=FIXTURES / "onnx_export.onnx")
    flow.quantize_base(encodings=aimet.weights(), progress=False)
    base = flow.model.base_state_dict()
    for name in WEIGHTS:
        assert torch.equal(base[name], ref[f"{name}.qdq"]), name
