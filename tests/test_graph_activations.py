"""Whole-graph activation quantization: ActivationRules place encodings on the outputs of every op
of chosen kinds; calibrated with the existing observers; exported as QDQ onnxruntime runs."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import transformers
from test_onnx_fixtures import INT8_SATURATES

import graphlora
from graphlora import ActivationRule
from graphlora.errors import RuleError
from graphlora.op_kinds import graph_ops

LAYERS = 2


@pytest.fixture(scope="module")
def bert():
    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=2,
                                     intermediate_size=64, vocab_size=64, max_position_embeddings=32,
                                     attn_implementation="eager")
    model = transformers.BertModel(config, add_pooling_layer=False).eval()
    ids = torch.randint(0, 64, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # padding: the attention-mask add carries float32's lowest value
    return model, {"input_ids": ids, "attention_mask": mask}


def _lm(bert, rules=None):
    model, batch = bert
    rules = rules or [graphlora.QuantRule(r"encoder\..*", weight_qtype="int8")]
    return graphlora.transform(model, rules, example_kwargs=batch, progress=False)


def test_graph_ops_finds_every_kind_with_module_names(bert):
    ops = graph_ops(_lm(bert).graph_module)
    kinds = collections.Counter(op.kind for op in ops)
    # BERT, from its structure: 6 linears, 2 residual adds + 1 mask add, 2 LayerNorms, 1 GELU,
    # 1 softmax, 2 attention products per layer; 3 embeddings, 2 adds and a LayerNorm before them
    assert kinds == {"linear": 6 * LAYERS, "add": 3 * LAYERS + 2, "norm": 2 * LAYERS + 1,
                     "activation": LAYERS, "softmax": LAYERS, "matmul": 2 * LAYERS, "embedding": 3}
    names = [op.tensor for op in ops]
    assert len(set(names)) == len(names)
    for name in ("embeddings.word_embeddings.output", "embeddings.LayerNorm.output",
                 "encoder.layer.0.attention.self.query.output", "encoder.layer.0.attention.self.matmul",
                 "encoder.layer.0.attention.self.softmax", "encoder.layer.0.attention.self.matmul_1",
                 "encoder.layer.0.attention.output.add", "encoder.layer.0.intermediate.intermediate_act_fn.output",
                 "encoder.layer.1.output.LayerNorm.output", "embeddings.add_1"):
        assert name in names, name


def test_lora_site_output_is_after_the_lora_add(bert):
    lm = _lm(bert, [graphlora.LoraRule(r"encoder\.layer\.0\.attention\.self\.query", rank=2)])
    (op,) = [o for o in graph_ops(lm.graph_module) if o.tensor == "encoder.layer.0.attention.self.query.output"]
    assert graphlora.meta.role(op.node) == "lora_add"


def test_calibrated_everywhere_first_match_wins_and_none_excludes(bert):
    lm = _lm(bert)
    rules = [
        ActivationRule(tensor=r".*attention\.self\.add", qtype=None),   # the mask add stays float
        ActivationRule(r".*attention\.self", kinds=("softmax",), qtype="uint16", calibration="percentile"),
        ActivationRule(),                                                 # everything else: uint8
    ]
    enc = graphlora.calibrate(lm, [bert[1]], activations=rules, progress=False)
    ops = graph_ops(lm.graph_module)
    expected = {op.tensor for op in ops} - {f"encoder.layer.{i}.attention.self.add" for i in range(LAYERS)}
    assert set(enc) == expected
    assert enc["encoder.layer.0.attention.self.softmax"].qtype.name == "uint16"
    assert enc["encoder.layer.0.output.LayerNorm.output"].qtype.name == "uint8"
    assert set(lm.encodings()) >= expected
    fq = [n for n in lm.graph_module.graph.nodes if graphlora.meta.role(n) == "fake_quant"]
    assert len(fq) == len(expected)
    # calibrating again adds nothing twice
    with pytest.raises(graphlora.CalibrationError, match="nothing to calibrate"):
        graphlora.calibrate(lm, [bert[1]], activations=rules, progress=False)


def test_whole_graph_qdq_runs_in_onnxruntime(bert, tmp_path):
    lm = _lm(bert)
    batch = bert[1]
    rules = [ActivationRule(tensor=r".*attention\.self\.add", qtype=None), ActivationRule()]
    enc = graphlora.calibrate(lm, [batch], activations=rules, progress=False)
    path = tmp_path / "full_integer.onnx"
    graphlora.export_onnx(lm, path, example_kwargs=batch)
    proto = onnx.load(path)
    q = [n for n in proto.graph.node if n.op_type == "QuantizeLinear"]
    assert len(q) == len(enc)  # one QuantizeLinear per activation encoding
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {i.name: batch[i.name].numpy() for i in sess.get_inputs()}
    theirs = sess.run(None, feeds)[0]
    ours = lm(**batch).last_hidden_state.detach().numpy()
    # a rounding boundary may fall differently in onnxruntime's float kernels: a few codes flip,
    # by one step of the LayerNorm output's scale
    step = float(enc["encoder.layer.1.output.LayerNorm.output"].scale)
    assert np.abs(theirs - ours).max() <= 2 * step
    # onnxruntime's int8 GEMM saturates on CPUs without VNNI, flipping more codes (6% measured on one)
    assert np.mean(np.abs(theirs - ours) > 1e-5) < (0.15 if INT8_SATURATES else 0.02)


def test_bad_activation_rules_are_refused(bert):
    lm = _lm(bert)
    for rule, message in [
        (ActivationRule(kinds=("conv",)), "kinds must be"),
        (ActivationRule(kinds="norm"), "kinds must be"),
        (ActivationRule(qtype="int4"), "cannot be used for activations"),
        (ActivationRule(tensor="(unclosed"), "tensor is not a valid regular expression"),
        (ActivationRule(calibration="kl"), "calibration must be one of"),
        (ActivationRule(grid="restricted"), "symmetric=True"),
    ]:
        with pytest.raises(RuleError, match=message):
            graphlora.calibrate(lm, [bert[1]], activations=[rule], progress=False)


def test_another_call_structure_refuses_whole_graph_encodings_it_cannot_carry(bert):
    """A whole-graph encoding sits between ops no other graph can name yet: a call of another
    structure must refuse, naming the tensor, never run without the encodings."""
    model, batch = bert
    lm = _lm(bert)
    graphlora.calibrate(lm, [batch], activations=[ActivationRule(qtype="int8", symmetric=True)], progress=False)
    with torch.no_grad():
        lm(**batch)  # the traced call is served
        with pytest.raises(graphlora.GraphloraError, match="activation encoding of .* cannot be carried"):
            lm(**batch, token_type_ids=torch.zeros_like(batch["input_ids"]))
