"""Numbers, names, partial loads and bad arguments (issue 17, classes 6, 7, 8 and 9).

Every value the loaders read and the API takes is checked where it enters: non-finite or
float32-overflowing alphas, NaN/Inf or non-float LoRA factors, adapter names that cannot be module
attributes or directory names, files that would load only part of a model, and the arguments that
used to end in a raw IndexError, RuntimeError or shutil.Error.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch

import graphlora
from graphlora import (
    AdapterError,
    FileFormatError,
    InputError,
    LoraRule,
    QuantizationError,
    RuleError,
    SaveError,
)
from graphlora.io.peft_format import read_adapter
from graphlora.rules_file import parse_rules
from toy_models import MLP

pytestmark = pytest.mark.timeout(120)

X = torch.randn(2, 8)
RULES = [LoraRule(r"layers\.[01]", rank=2)]


@pytest.fixture(scope="module")
def lm():
    return graphlora.transform(MLP(), RULES, (X,))


@pytest.fixture(scope="module")
def saved(lm, tmp_path_factory):
    root = tmp_path_factory.mktemp("saved") / "ad"
    with torch.no_grad():
        for p in lm.lora_parameters():
            p.normal_()
    lm.save_pretrained(root, only_save_adapters=True)
    return root


@pytest.fixture
def adapter_dir(saved, tmp_path):
    return Path(shutil.copytree(saved, tmp_path / "ad"))


def edit_config(directory: Path, **changes) -> None:
    path = directory / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}).replace("NaN", "NaN"))


def edit_weights(directory: Path, fn) -> None:
    from safetensors.torch import load_file, save_file

    path = directory / "adapter_model.safetensors"
    tensors = fn(dict(load_file(str(path))))
    save_file(tensors, str(path), metadata={"format": "pt"})


# --------------------------------------------------------------------------- class 6: numbers


@pytest.mark.parametrize("alpha", [float("nan"), float("inf"), -float("inf"), 1e308, 10**400])
def test_non_finite_or_overflowing_alpha_in_an_adapter_config(adapter_dir, alpha):
    path = adapter_dir / "adapter_config.json"
    config = json.loads(path.read_text())
    config["lora_alpha"] = alpha
    path.write_text(json.dumps(config))  # json writes NaN / Infinity, as Python's json reads them
    with pytest.raises(FileFormatError, match=r"adapter_config\.json: 'lora_alpha'"):
        read_adapter(adapter_dir)


def test_non_finite_alpha_pattern_entry(adapter_dir):
    edit_config(adapter_dir, alpha_pattern={"layers.0": float("inf")})
    with pytest.raises(FileFormatError, match="'alpha_pattern' entry 'layers.0'"):
        read_adapter(adapter_dir)


@pytest.mark.parametrize("alpha", [float("inf"), float("nan"), 1e308, -1.0, "4"])
def test_non_finite_or_overflowing_alpha_in_a_rule(alpha):
    with pytest.raises(RuleError, match="alpha"):
        graphlora.transform(MLP(), [LoraRule(".*", rank=2, alpha=alpha)], (X,))


def test_infinite_alpha_in_a_rules_file_names_the_file():
    with pytest.raises(RuleError, match=r"rules\.toml: rule #0 .*alpha must be finite"):
        parse_rules("[[rules]]\nrank = 2\nalpha = inf\n", source="rules.toml")


@pytest.mark.parametrize(
    "value, needle",
    [
        (lambda t: torch.full_like(t, float("nan")), "NaN/Inf"),
        (lambda t: torch.full_like(t, float("inf")), "NaN/Inf"),
        (lambda t: t.to(torch.int32), "dtype int32"),
        (lambda t: t > 0, "dtype bool"),
        (lambda t: t.to(torch.complex64), "dtype complex64"),
    ],
)
def test_bad_lora_factors_in_an_adapter_file(lm, adapter_dir, value, needle):
    key = "base_model.model.layers.0.lora_A.weight"
    edit_weights(adapter_dir, lambda t: {**t, key: value(t[key])})
    with pytest.raises(FileFormatError, match=rf"adapter_model\.safetensors: {key}.*{needle}"):
        read_adapter(adapter_dir)
    with pytest.raises(FileFormatError):
        graphlora.load_adapter(lm, adapter_dir, adapter_name="other")
    assert list(lm.adapters) == ["default"]  # nothing half-installed


def test_half_precision_factors_are_fine(adapter_dir):
    edit_weights(adapter_dir, lambda t: {k: v.half() for k, v in t.items()})
    assert read_adapter(adapter_dir).modules["layers.0"].lora_A.dtype == torch.float16


def test_bad_factors_through_the_api(lm):
    state = lm.lora_state_dict()
    key = next(iter(state))
    for bad, needle in [(torch.full_like(state[key], float("nan")), "NaN/Inf"),
                        (state[key].to(torch.int64), "dtype int64"), (state[key].tolist(), "not a tensor")]:
        with pytest.raises(AdapterError, match=needle):
            lm.load_lora_state_dict({**state, key: bad})
    assert torch.equal(lm.lora_state_dict()[key], state[key])


def test_training_hyper_parameters_are_checked(lm):
    loss = lambda model, batch: model(batch).sum()  # noqa: E731
    for kwargs, needle in [({"lr": float("nan")}, "lr must be finite"), ({"lr": -1.0}, "lr must be > 0"),
                           ({"eval_every": 0}, "eval_every must be >= 1"), ({"steps": 2.5}, "steps must be an int"),
                           ({"grad_clip": float("inf")}, "grad_clip must be finite")]:
        with pytest.raises(InputError, match=needle):
            graphlora.train_lora(lm, [X], loss, **{"steps": 1, "progress": False, **kwargs})


# --------------------------------------------------------------------------- class 7: names

BAD_NAMES = ["a.b", "a\0b", "a/b", "a\\b", "..", ".", "", " ", "x" * 101, "CON", "lpt1", "train", "forward",
             "-x", "a b", 3]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_adapter_names_are_refused_everywhere(lm, saved, name):
    with pytest.raises(AdapterError, match="adapter_name|adapter name"):
        graphlora.transform(MLP(), RULES, (X,), adapter_name=name)
    with pytest.raises(AdapterError, match="adapter name"):
        lm.add_adapter(name, {"layers.0": graphlora.LoraSpec(rank=2, alpha=2.0)})
    with pytest.raises(AdapterError, match="adapter name"):
        graphlora.load_adapter(lm, saved, adapter_name=name)
    assert list(lm.adapters) == ["default"]


@pytest.mark.parametrize("name", ["legal_v2", "fr-FR", "ä", "x" * 100])
def test_good_adapter_names_save_and_load(lm, tmp_path, name):
    model = graphlora.transform(MLP(), RULES, (X,), adapter_name=name)
    assert sum(p.numel() for p in model.lora_parameters()) > 0  # "a.b" used to give zero parameters
    model.save_pretrained(tmp_path / "out", selected_adapters=[name])
    loaded = graphlora.load_adapter(MLP(), tmp_path / "out", adapter_name=name, example_args=(X,))
    assert loaded.active_adapter == name


# --------------------------------------------------------------------------- class 8: partial loads


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    root = tmp_path_factory.mktemp("q") / "q"
    model = graphlora.transform(MLP(), [LoraRule(r"layers\.0", rank=2, weight_qtype="int8")], (X,))
    model.save_pretrained(root, keep_quantized=True)
    return root


def test_load_quantized_refuses_a_checkpoint_missing_a_float_tensor(quantized, tmp_path):
    from safetensors.torch import load_file, save_file

    root = Path(shutil.copytree(quantized, tmp_path / "q"))
    tensors = load_file(str(root / "graphlora_quantized.safetensors"))
    del tensors["layers.2.bias"]
    save_file(tensors, str(root / "graphlora_quantized.safetensors"), metadata={"format": "pt"})
    with pytest.raises(FileFormatError, match=r"lacks 1 tensor\(s\) of this model: layers\.2\.bias"):
        graphlora.load_quantized(MLP(), root, (X,))
    tensors["layers.2.bias"] = torch.zeros(3)  # the model's is (4,)
    save_file(tensors, str(root / "graphlora_quantized.safetensors"), metadata={"format": "pt"})
    with pytest.raises(FileFormatError, match=r"another shape or dtype.*layers\.2\.bias"):
        graphlora.load_quantized(MLP(), root, (X,))


def test_load_quantized_round_trips_complete_checkpoints(quantized):
    model = graphlora.load_quantized(MLP(), quantized, (X,))
    assert torch.isfinite(model(X)).all()


def test_quantize_base_with_encodings_for_only_some_weights_is_refused(tmp_path):
    rules = [LoraRule(r"layers\.[01]", rank=2, weight_qtype="int8")]
    source = graphlora.qw_lora(MLP(), rules, (X,))
    encodings = source.quantize_base(progress=False)
    partial = {k: v for k, v in encodings.items() if k.startswith("layers.0")}
    workflow = graphlora.qw_lora(MLP(), rules, (X,))
    with pytest.raises(QuantizationError, match=r"lack 1 weight\(s\) the rules quantize: layers\.1\.weight"):
        workflow.quantize_base(encodings=partial, progress=False)
    assert workflow.model.encodings() == {}  # nothing was computed in its place
    graphlora.save_encodings(partial, tmp_path / "partial.json")
    with pytest.raises(QuantizationError, match="layers.1.weight"):
        workflow.quantize_base(encodings=tmp_path / "partial.json", progress=False)


# --------------------------------------------------------------------------- class 9: arguments


@pytest.mark.parametrize("size", [-1, 0, "abc", "1.5GB", 1.5, True, None, "-5GB"])
def test_bad_max_shard_size(lm, tmp_path, size):
    with pytest.raises(InputError, match="max_shard_size"):
        lm.save_pretrained(tmp_path / "out", max_shard_size=size)
    assert not (tmp_path / "out").exists() and os.listdir(tmp_path) == []


@pytest.mark.parametrize("where", [".", "", "..", "sub/..", "/"])
def test_save_paths_that_name_no_directory_of_their_own(lm, tmp_path, monkeypatch, where):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "keep.txt").write_text("mine")
    for call in (lambda: lm.save_pretrained(where), lambda: lm.save_pretrained(where, only_save_adapters=True),
                 lambda: graphlora.save_encodings(lm, where)):
        with pytest.raises(SaveError):
            call()
    assert os.getcwd() == str(tmp_path) and sorted(os.listdir(tmp_path)) == ["keep.txt"]


def test_saving_over_the_working_directory_or_a_file(lm, tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    with pytest.raises(SaveError, match="current working directory"):
        lm.save_pretrained(str(work))
    with pytest.raises(SaveError, match="current working directory"):
        lm.save_pretrained(str(tmp_path))
    (tmp_path / "afile").write_text("x")
    with pytest.raises(SaveError, match="not a directory") as info:
        lm.save_pretrained(tmp_path / "afile")
    assert isinstance(info.value, NotADirectoryError)  # also what plain-Python code catches
    assert (tmp_path / "afile").read_text() == "x" and os.getcwd() == str(work)
    with pytest.raises(SaveError, match="directory"):
        graphlora.save_encodings(lm, tmp_path)


@pytest.mark.parametrize(
    "call, needle",
    [
        (lambda m: m([[1.0] * 8] * 2), "argument x must be a torch.Tensor.*float32 tensor of 2 dimension.*got list"),
        (lambda m: m("hello"), "must be a torch.Tensor.*got str"),
        (lambda m: m(torch.randn(2, 8).double()), "x is float64 but the graph was traced with float32"),
        (lambda m: m(torch.ones(2, 8, dtype=torch.long)), "x is int64 but the graph was traced with float32"),
    ],
)
def test_forward_inputs_of_the_wrong_dtype_or_type(lm, call, needle):
    with pytest.raises(InputError, match=needle):
        call(lm)


@pytest.mark.parametrize("shape", [(8,), (2, 1, 8), (3, 5, 8)])
def test_inputs_of_another_rank_are_served_as_the_original_serves_them(shape):
    """An input of another rank is another call structure, which the original MLP accepts: it gets
    a graph of its own instead of an error (ranks are fixed per traced graph, not per model). The
    MLP works row by row, so the traced rank-2 graph on the rows is the reference."""
    lm = graphlora.transform(MLP(), RULES, (X,))
    with torch.no_grad():
        for p in lm.lora_parameters():
            p.normal_(std=0.1)
        x = torch.randn(shape)
        rows = lm(x.reshape(-1, 8))
        torch.testing.assert_close(lm(x), rows.reshape(*shape[:-1], rows.shape[-1]), rtol=1e-5, atol=1e-6)
    assert len(lm.call_graphs) == 2


def test_a_model_cast_after_transform_still_takes_inputs_of_its_dtype():
    model = graphlora.transform(MLP(), RULES, (X,)).to(torch.bfloat16)
    assert model(X.bfloat16()).dtype == torch.bfloat16


def test_negative_num_batches(tmp_path):
    model = graphlora.transform(MLP(), [LoraRule(r"layers\.0", rank=2, act_qtype="int8")], (X,))
    for bad in (-1, 1.5, "2"):
        with pytest.raises(InputError, match="num_batches"):
            graphlora.calibrate(model, [X], num_batches=bad, progress=False)
    assert model.encodings() == {}
    assert not any("observer" in n for n, _ in model.graph_module.named_modules())
    workflow = graphlora.qw_lora(MLP(), [LoraRule(r"layers\.0", rank=2, weight_qtype="int8",
                                                  weight_calibration="gptq")], (X,))
    with pytest.raises(InputError, match="num_batches"):
        workflow.quantize_base(calibration_data=[X], num_batches=-3, progress=False)
    assert math.isfinite(float(graphlora.calibrate(model, [X], num_batches=1, progress=False)
                               ["layers.0.input"].scale))


def test_transform_of_a_lora_model(lm):
    with pytest.raises(InputError, match="already transformed"):
        graphlora.transform(lm, 2, (X,))
    with pytest.raises(InputError, match="already transformed"):
        graphlora.transform(lm.graph_module, 2, (X,))
