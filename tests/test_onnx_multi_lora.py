"""Run-time multi-LoRA on ``lora="inputs"`` exports is never silently mixed: adapters with other
target sets and ranks than the exported one run exactly as their own merged model (transformers
with ``W + scale * B @ A`` written into its weights), partial ones are zero-filled, impossible ones
refused."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from test_onnx_fixtures import randomize_lora, rel_err
from toy_models import ids, tiny_llama

import graphlora
from graphlora.adapters import lora_param_name
from graphlora.errors import AdapterError
from graphlora.graph_utils import get_tensor
from graphlora.onnx import InferenceSession, export_onnx, read_adapter, write_adapter

pytestmark = pytest.mark.slow  # each export of a transformers model takes seconds

ALL = r".*(q|k|v|o|gate|up|down)_proj"


def merged_reference(lm, base, adapter: str, input_ids) -> np.ndarray:
    """The adapter's own merged model, computed with transformers on a copy of the base."""
    model = copy.deepcopy(base)
    gm = lm.graph_module
    with torch.no_grad():
        for path, spec in lm.adapters[adapter].items():
            a = get_tensor(gm, lora_param_name(adapter, path, "lora_A")).float()
            b = get_tensor(gm, lora_param_name(adapter, path, "lora_B")).float()
            model.get_submodule(path).weight += spec.scale * (b @ a)
        return model(input_ids=input_ids, use_cache=False).logits.numpy()


@pytest.fixture(scope="module")
def llama_inputs(tmp_path_factory):
    torch.manual_seed(0)
    base = tiny_llama(layers=1)
    x = ids(2, 12, 128)
    lm = graphlora.transform(base, graphlora.LoraRule(ALL, rank=16), (), {"input_ids": x})
    randomize_lora(lm, seed=1)
    qv = [p for p in lm.adapters["default"] if p.endswith(("q_proj", "v_proj"))]
    lm.add_adapter("qv", {p: graphlora.LoraSpec(rank=4, alpha=8.0) for p in qv})
    lm.set_adapter("qv")
    randomize_lora(lm, seed=2)
    lm.set_adapter("default")
    path = tmp_path_factory.mktemp("multi") / "m.onnx"
    export = export_onnx(lm, path, (), {"input_ids": x}, lora="inputs", kv_cache=False)
    return base, lm, path, export


def test_exported_adapter_is_the_default(llama_inputs):
    base, lm, path, _ = llama_inputs
    x = ids(2, 9, 128, seed=3)
    got = InferenceSession(path, "cpu").run(None, {"input_ids": x.numpy()})[0]
    assert rel_err(got, merged_reference(lm, base, "default", x)) < 1e-4


def test_partial_lower_rank_adapter_runs_as_its_own_merged_model(llama_inputs, tmp_path):
    """A q/v-only rank-4 adapter on an export with rank-16 LoRA on every projection: the other
    sites run with no LoRA (zero-filled), not with the exported adapter's."""
    base, lm, path, _ = llama_inputs
    x = ids(2, 9, 128, seed=4)
    want = merged_reference(lm, base, "qv", x)
    loose = write_adapter(lm, tmp_path / "qv_loose.onnx_adapter", adapter="qv")  # as the LoraModel has it
    assert len(read_adapter(loose)) == 4
    sess = InferenceSession(path, "cpu")
    assert rel_err(sess.run_with_adapter(None, {"input_ids": x.numpy()}, loose)[0], want) < 1e-4
    # written for the model: complete, so plain onnxruntime runs it right as well
    fitted = write_adapter(lm, tmp_path / "qv.onnx_adapter", adapter="qv", model=path)
    tensors = read_adapter(fitted)
    assert len(tensors) == 14
    assert not tensors["model.layers.0.mlp.up_proj.lora_A"].any()
    assert tensors["model.layers.0.self_attn.q_proj.lora_A"].shape == (64, 16)
    adapter = ort.LoraAdapter()
    adapter.Load(str(fitted))
    options = ort.RunOptions()
    options.add_active_adapter(adapter)
    plain = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert rel_err(plain.run(None, {"input_ids": x.numpy()}, options)[0], want) < 1e-4
    # and the default is back without an adapter
    assert rel_err(plain.run(None, {"input_ids": x.numpy()})[0], merged_reference(lm, base, "default", x)) < 1e-4


def test_rank_dimension_is_not_frozen(llama_inputs):
    _, _, path, export = llama_inputs
    model = onnx.load(path)
    rank_dims = {d.dim_param for v in model.graph.value_info for d in v.type.tensor_type.shape.dim
                 if d.dim_param.endswith(".rank")}
    assert "model.layers.0.self_attn.q_proj.rank" in rank_dims
    assert all(item.shape in ((64, 16), (16, 64), (16, 32), (128, 16), (16, 128)) for item in export.lora_inputs)


def test_impossible_adapters_are_refused_naming_the_sites(llama_inputs, tmp_path):
    _, _, path, _ = llama_inputs
    site = "model.layers.0.self_attn.v_proj"
    big = {f"{site}.lora_A": np.ones((64, 32), np.float32), f"{site}.lora_B": np.ones((32, 32), np.float32)}
    with pytest.raises(AdapterError, match=rf"rank exceeds the exported rank at: {site} \(rank 32 > 16\)"):
        write_adapter(big, tmp_path / "big.onnx_adapter", model=path)
    with pytest.raises(AdapterError, match="does not take: model.layers.0.lm_head.lora_A"):
        write_adapter({"model.layers.0.lm_head.lora_A": np.ones((64, 2), np.float32)},
                      tmp_path / "x.onnx_adapter", model=path)
    with pytest.raises(AdapterError, match=f"only one of lora_A/lora_B at: {site}"):
        write_adapter({f"{site}.lora_A": np.ones((64, 2), np.float32)}, tmp_path / "h.onnx_adapter", model=path)
    with pytest.raises(AdapterError, match=f"do not fit the model at: {site}"):
        write_adapter({f"{site}.lora_A": np.ones((48, 2), np.float32), f"{site}.lora_B": np.ones((2, 32), np.float32)},
                      tmp_path / "w.onnx_adapter", model=path)
    loose = write_adapter(big, tmp_path / "loose.onnx_adapter")  # no model: written as given
    with pytest.raises(AdapterError, match="rank exceeds"):
        InferenceSession(path, "cpu").run_with_adapter(None, {"input_ids": np.zeros((1, 3), np.int64)}, loose)


def test_lora_rank_option_and_default_max_rank(tmp_path):
    torch.manual_seed(0)
    base = tiny_llama(layers=1)
    x = ids(2, 6, 128)
    lm = graphlora.transform(base, graphlora.LoraRule(r".*q_proj", rank=2), (), {"input_ids": x})
    randomize_lora(lm, seed=5)
    lm.add_adapter("wide", {p: graphlora.LoraSpec(rank=6, alpha=6.0) for p in lm.adapters["default"]})
    default = export_onnx(lm, tmp_path / "d.onnx", (), {"input_ids": x}, lora="inputs", kv_cache=False)
    assert {i.shape for i in default.lora_inputs} == {(64, 6), (6, 64)}  # the widest adapter's rank
    fixed = export_onnx(lm, tmp_path / "f.onnx", (), {"input_ids": x}, lora="inputs", lora_rank=8, kv_cache=False)
    assert {i.shape for i in fixed.lora_inputs} == {(64, 8), (8, 64)}
    got = InferenceSession(fixed.path, "cpu").run(None, {"input_ids": x.numpy()})[0]
    assert rel_err(got, merged_reference(lm, base, "default", x)) < 1e-4
