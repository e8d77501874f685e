"""Saving a LoraModel (adapters only, base + adapters, merged) and loading adapters back.

Hand-written modules only (no transformers, no PEFT): the layouts on disk, reloading into the
original nn.Module with load_state_dict, atomicity under injected failures, multi-adapter
layouts, and every check load_adapter makes before it touches the model. The interop with the
real PEFT and transformers lives in test_peft_interop.py.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file

import graphlora
from graphlora import AdapterError, GraphloraError, InputError, LoraRule, LoraSpec
from graphlora.io import atomic
from graphlora.checkpoint import resolve_adapter_dir
from toy_models import MLP, AllSpellings, Conv1D, SharedWeight

X = torch.randn(4, 8, generator=torch.Generator().manual_seed(3))
RULES = [
    LoraRule(r"layers\.0", rank=2, alpha=4.0),
    LoraRule(r"layers\.1", rank=4, alpha=2.0, use_rslora=True),
]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread: on the 2-core CI machine, shared with other jobs, two OpenMP threads
    fighting a busy core make each forward ~30x slower. Restored after the module."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


class ConvNet(nn.Module):
    """Two transformers-style Conv1D layers: weights stored (in, out), PEFT's fan_in_fan_out."""

    def __init__(self):
        super().__init__()
        self.c_fc = Conv1D(16, 8)
        self.c_proj = Conv1D(4, 16)

    def forward(self, x):
        return self.c_proj(torch.tanh(self.c_fc(x)))


def _randomize(lm, adapter=None, seed=1, std=0.2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in lm.named_lora_parameters(adapter):
            p.copy_(torch.randn(p.shape, generator=g) * std)


def _mlp():
    torch.manual_seed(0)
    return MLP().eval()


@pytest.fixture(scope="module")
def mlp():
    return _mlp()


@pytest.fixture(scope="module")
def lora(mlp):
    lm = graphlora.transform(mlp, RULES, (X,))
    _randomize(lm)
    return lm


@pytest.fixture(scope="module")
def saves(lora, tmp_path_factory):
    root = tmp_path_factory.mktemp("saves")
    lora.save_pretrained(root / "adapters", only_save_adapters=True)
    lora.save_pretrained(root / "separate")
    lora.save_pretrained(root / "merged", save_adapters_separately=False)
    return root


def _tree(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under root."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _stray(parent: Path) -> list[str]:
    return [name for name in os.listdir(parent) if ".graphlora-" in name]


# ------------------------------------------------------------------------------ layouts


def test_adapters_only_is_a_peft_adapter(lora, saves):
    root = saves / "adapters"
    assert sorted(os.listdir(root)) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((root / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    assert config["target_modules"] == ["layers.0", "layers.1"]
    assert config["bias"] == "none" and config["lora_dropout"] == 0.0
    assert config["fan_in_fan_out"] is False
    assert "base_model_name_or_path" not in config or config["base_model_name_or_path"] is None
    with safe_open(str(root / "adapter_model.safetensors"), "pt") as fh:
        assert fh.metadata() == {"format": "pt"}
        shapes = {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}
    assert shapes == {
        "base_model.model.layers.0.lora_A.weight": (2, 8),
        "base_model.model.layers.0.lora_B.weight": (32, 2),
        "base_model.model.layers.1.lora_A.weight": (4, 32),
        "base_model.model.layers.1.lora_B.weight": (32, 4),
    }
    tensors = load_file(str(root / "adapter_model.safetensors"))
    for key, value in lora.lora_state_dict().items():
        assert torch.equal(tensors["base_model.model." + key], value)


def test_mixed_rslora_keeps_every_scale_exact(lora, saves):
    """PEFT has one use_rslora flag per adapter: a module that differs gets an alpha that gives
    PEFT's formula the same scale."""
    adapter = graphlora.io.read_adapter(saves / "adapters")
    for path, spec in lora.adapters["default"].items():
        assert adapter.modules[path].rank == spec.rank
        assert adapter.modules[path].scale == pytest.approx(spec.scale, rel=1e-12)


def test_base_and_adapters_separately_reload_into_the_original_module(mlp, lora, saves):
    root = saves / "separate"
    assert sorted(os.listdir(root)) == ["adapters", "model.safetensors"]  # no config.json
    state = load_file(str(root / "model.safetensors"))
    assert sorted(state) == sorted(mlp.state_dict())
    fresh = MLP().eval()
    fresh.load_state_dict(state)
    with lora.disable_adapter():
        torch.testing.assert_close(fresh(X), lora(X), rtol=0, atol=0)
    # the graphlora way back: the top directory resolves to its adapters/ subdirectory
    again = graphlora.load_adapter(fresh, root, example_args=(X,))
    torch.testing.assert_close(again(X), lora(X), rtol=0, atol=1e-6)
    loaded = again.adapters["default"]
    assert {p: (s.rank, s.scale) for p, s in loaded.items()} == {
        p: (s.rank, pytest.approx(s.scale)) for p, s in lora.adapters["default"].items()
    }


def test_merged_reloads_into_the_original_module(mlp, lora, saves):
    root = saves / "merged"
    assert os.listdir(root) == ["model.safetensors"]
    state = load_file(str(root / "model.safetensors"))
    assert sorted(state) == sorted(mlp.state_dict())
    fresh = MLP().eval()
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh(X), lora(X), rtol=0, atol=1e-5)
    assert not torch.equal(state["layers.0.weight"], mlp.layers[0].weight)


def test_conv1d_sites_are_fan_in_fan_out_and_merge_transposed(tmp_path):
    model = ConvNet().eval()
    x = torch.randn(2, 3, 8)
    lm = graphlora.transform(model, [LoraRule(".*", rank=2)], (x,))
    _randomize(lm)
    lm.save_pretrained(tmp_path / "a", only_save_adapters=True)
    lm.save_pretrained(tmp_path / "m", save_adapters_separately=False)
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is True
    fresh = ConvNet().eval()
    fresh.load_state_dict(load_file(str(tmp_path / "m" / "model.safetensors")))
    torch.testing.assert_close(fresh(x), lm(x), rtol=0, atol=1e-5)
    again = graphlora.load_adapter(model, tmp_path / "a", example_args=(x,))
    assert [s.fan_in_fan_out for s in again.sites] == [True, True]
    torch.testing.assert_close(again(x), lm(x), rtol=0, atol=1e-6)


def test_sharded_base(lora, mlp, tmp_path):
    result = lora.save_pretrained(tmp_path / "s", max_shard_size=1500)
    index = json.loads((tmp_path / "s" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all(s in result.files for s in shards)
    assert "model.safetensors" not in os.listdir(tmp_path / "s")
    state = graphlora.io.load_state_dict(tmp_path / "s")
    fresh = MLP().eval()
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh(X), mlp(X), rtol=0, atol=0)


def test_tied_weight_merge_is_saved_untied_with_a_warning(tmp_path):
    model = SharedWeight().eval()
    ids = torch.randint(0, 20, (2, 5))
    lm = graphlora.transform(model, [LoraRule("head", rank=2)], (ids,))
    _randomize(lm)
    with pytest.warns(graphlora.GraphloraWarning, match="head.weight were tied"):
        lm.save_pretrained(tmp_path, save_adapters_separately=False)
    state = load_file(str(tmp_path / "model.safetensors"))
    assert sorted(state) == sorted(model.state_dict())
    assert torch.equal(state["embed.weight"], model.embed.weight)  # the embedding is not merged
    assert not torch.equal(state["head.weight"], model.embed.weight)


def test_bare_parameter_sites_round_trip_in_graphlora_with_a_peft_warning(tmp_path):
    model = AllSpellings().eval()
    x = torch.randn(2, 3, 8)
    lm = graphlora.transform(model, [LoraRule(".*", rank=2)], (x,))
    _randomize(lm)
    with pytest.warns(graphlora.GraphloraWarning, match="raw.*bare parameters"):
        lm.save_pretrained(tmp_path, only_save_adapters=True)
    again = graphlora.load_adapter(model, tmp_path, example_args=(x,))
    torch.testing.assert_close(again(x), lm(x), rtol=0, atol=1e-6)


def test_quantized_base_is_saved_dequantized(tmp_path):
    """QLoRA: int4 LoRA sites and an int8 site without LoRA. Both base layouts hold the float
    weights the model computes with, so the float module reloaded from them reproduces it."""
    model = MLP(dims=(8, 64, 64, 4)).eval()
    rules = [
        LoraRule(r"layers\.[01]", rank=2, weight_qtype="int4", group_size=32),
        graphlora.QuantRule(r"layers\.2", weight_qtype="int8"),
    ]
    lm = graphlora.transform(model, rules, (X,))
    assert [s.weight_qtype for s in lm.sites] == ["int4", "int4", "int8"]
    _randomize(lm, std=0.1)
    lm.save_pretrained(tmp_path / "separate")
    lm.save_pretrained(tmp_path / "merged", save_adapters_separately=False)
    base = MLP(dims=(8, 64, 64, 4)).eval()
    base.load_state_dict(load_file(str(tmp_path / "separate" / "model.safetensors")))
    with lm.disable_adapter():
        torch.testing.assert_close(base(X), lm(X), rtol=0, atol=1e-6)
    assert not torch.equal(base.layers[2].weight, model.layers[2].weight)  # on the int8 grid
    again = graphlora.load_adapter(base, tmp_path / "separate", example_args=(X,))
    torch.testing.assert_close(again(X), lm(X), rtol=0, atol=1e-6)
    merged = MLP(dims=(8, 64, 64, 4)).eval()
    merged.load_state_dict(load_file(str(tmp_path / "merged" / "model.safetensors")))
    torch.testing.assert_close(merged(X), lm(X), rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------ atomicity


@pytest.mark.parametrize("stage", ["file:written", "dir:written", "dir:synced", "dir:old_moved"])
def test_failure_mid_save_keeps_previous_save(lora, tmp_path, monkeypatch, stage):
    target = tmp_path / "ckpt"
    lora.save_pretrained(target)
    (target / "tokenizer.json").write_text("{}")
    before = _tree(target)

    def fail(at):
        if at == stage:
            raise OSError(f"injected failure at {at}")

    monkeypatch.setattr(atomic, "_fail_at", fail)
    for options in ({"save_adapters_separately": False}, {"only_save_adapters": True}):
        with pytest.raises(OSError, match="injected"):
            lora.save_pretrained(target, **options)
        assert _tree(target) == before
        assert _stray(tmp_path) == []
    monkeypatch.setattr(atomic, "_fail_at", None)
    torch.testing.assert_close(lora(X), lora(X))  # the model is unharmed


def test_resave_replaces_our_files_and_keeps_others(lora, tmp_path):
    target = tmp_path / "ckpt"
    lora.save_pretrained(target)
    (target / "tokenizer.json").write_text("{}")
    (target / "README.md").write_text("notes")
    result = lora.save_pretrained(target, only_save_adapters=True)
    assert sorted(os.listdir(target)) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors", "tokenizer.json"
    ]
    assert result.files == ("adapter_config.json", "adapter_model.safetensors")
    with pytest.raises(FileExistsError):
        lora.save_pretrained(target, overwrite=False)


# ------------------------------------------------------------------------------ several adapters


@pytest.fixture()
def two_adapters(mlp):
    lm = graphlora.transform(mlp, RULES, (X,))
    _randomize(lm, seed=1)
    lm.add_adapter("other", {"layers.1": LoraSpec(rank=3, alpha=6.0)})
    _randomize(lm, "other", seed=2)
    return lm


def test_peft_layout_for_selected_adapters(two_adapters, tmp_path):
    lm = two_adapters
    result = lm.save_pretrained(tmp_path, only_save_adapters=True, selected_adapters=["default", "other"])
    assert result.adapters == {"default": "", "other": "other"}
    assert sorted(result.files) == [
        "adapter_config.json", "adapter_model.safetensors",
        "other/adapter_config.json", "other/adapter_model.safetensors",
    ]
    # PEFT semantics: the top directory is what is read unless told otherwise
    assert resolve_adapter_dir(tmp_path, "other") == tmp_path
    assert resolve_adapter_dir(tmp_path, "other", subfolder="other") == tmp_path / "other"
    fresh = graphlora.load_adapter(_mlp(), tmp_path, example_args=(X,))
    graphlora.load_adapter(fresh, tmp_path, adapter_name="other", subfolder="other")
    assert fresh.active_adapters == ["default"]  # like PEFT's load_adapter: not activated
    for name in ("default", "other"):
        lm.set_adapter(name)
        fresh.set_adapter(name)
        torch.testing.assert_close(fresh(X), lm(X), rtol=0, atol=1e-6)
    fresh.disable_adapters()
    torch.testing.assert_close(fresh(X), _mlp()(X), rtol=0, atol=0)
    fresh.set_adapter(["default", "other"])
    lm.set_adapter(["default", "other"])
    torch.testing.assert_close(fresh(X), lm(X), rtol=0, atol=1e-6)


def test_subdirectory_is_found_when_the_top_holds_no_adapter(two_adapters, tmp_path):
    two_adapters.save_pretrained(tmp_path, only_save_adapters=True, selected_adapters=["other"])
    assert os.listdir(tmp_path) == ["other"]
    lm = graphlora.load_adapter(_mlp(), tmp_path, adapter_name="other", example_args=(X,))
    assert lm.active_adapters == ["other"] and set(lm.adapters["other"]) == {"layers.1"}


def test_which_adapter_is_saved(two_adapters, tmp_path):
    lm = two_adapters
    lm.save_pretrained(tmp_path / "active", only_save_adapters=True)
    assert json.loads((tmp_path / "active" / "adapter_config.json").read_text())["target_modules"] == [
        "layers.0", "layers.1"
    ]
    lm.save_pretrained(tmp_path / "named", only_save_adapters=True, adapter_name="other")
    assert json.loads((tmp_path / "named" / "adapter_config.json").read_text())["target_modules"] == [
        "layers.1"
    ]
    lm.set_adapter(["default", "other"])
    with pytest.raises(AdapterError, match="2 adapters are active"):
        lm.save_pretrained(tmp_path / "x", only_save_adapters=True)
    # a merged save folds what the model computes: both active adapters
    lm.save_pretrained(tmp_path / "both", save_adapters_separately=False)
    fresh = _mlp()
    fresh.load_state_dict(load_file(str(tmp_path / "both" / "model.safetensors")))
    torch.testing.assert_close(fresh(X), lm(X), rtol=0, atol=1e-5)
    # ... or the one named, leaving the model's active adapters as they were
    lm.save_pretrained(tmp_path / "one", save_adapters_separately=False, adapter_name="other")
    assert lm.active_adapters == ["default", "other"]
    fresh.load_state_dict(load_file(str(tmp_path / "one" / "model.safetensors")))
    lm.set_adapter("other")
    torch.testing.assert_close(fresh(X), lm(X), rtol=0, atol=1e-5)


def test_loading_replaces_an_adapter_of_the_same_name(lora, saves, mlp):
    lm = graphlora.transform(mlp, [LoraRule(r"layers\.0", rank=8)], (X,))
    graphlora.load_adapter(lm, saves / "adapters")  # "default" exists and is active: replaced
    assert lm.active_adapters == ["default"]
    assert lm.adapters["default"]["layers.0"].rank == 2
    torch.testing.assert_close(lm(X), lora(X), rtol=0, atol=1e-6)


def test_adapter_on_linear_sites_no_rule_matched(lora, saves, mlp):
    lm = graphlora.transform(mlp, [LoraRule(r"layers\.2", rank=2)], (X,))
    graphlora.load_adapter(lm, saves / "adapters", adapter_name="loaded", activate=True)
    assert lm.active_adapters == ["loaded"]
    torch.testing.assert_close(lm(X), lora(X), rtol=0, atol=1e-6)
    sites = {s.module_path: s for s in lm.sites}
    assert set(sites) == {"layers.0", "layers.1", "layers.2"}
    # the sites the adapter brought are described by a rule appended after the user's rules
    assert sites["layers.2"].rule_index == 0 and sites["layers.0"].rule_index >= 1
    assert lm.rules[sites["layers.0"].rule_index] == sites["layers.0"].rule
    lm.set_adapter("default")
    with lm.disable_adapter():
        torch.testing.assert_close(lm(X), mlp(X), rtol=0, atol=0)


# ------------------------------------------------------------------------------ errors


def test_save_option_errors(lora, tmp_path):
    with pytest.raises(InputError, match="contradicts"):
        lora.save_pretrained(tmp_path, only_save_adapters=True, save_adapters_separately=False)
    with pytest.raises(InputError, match="keep_quantized=True applies to saves with a base"):
        lora.save_pretrained(tmp_path, only_save_adapters=True, keep_quantized=True)
    with pytest.raises(AdapterError, match="unknown adapter 'nope'"):
        lora.save_pretrained(tmp_path, only_save_adapters=True, adapter_name="nope")
    with pytest.raises(InputError, match="not both"):
        lora.save_pretrained(tmp_path, adapter_name="default", selected_adapters=["default"])
    with pytest.raises(InputError, match="LoraModel"):
        graphlora.checkpoint.save_pretrained(MLP(), tmp_path)
    assert not tmp_path.joinpath("adapter_config.json").exists() and _stray(tmp_path.parent) == []


def test_plain_model_needs_example_inputs(saves):
    with pytest.raises(InputError, match="example_args"):
        graphlora.load_adapter(_mlp(), saves / "adapters")
    with pytest.raises(InputError, match="LoraModel or a torch.nn.Module"):
        graphlora.load_adapter(object(), saves / "adapters", example_args=(X,))


def test_missing_and_unsupported_files(lora, saves, tmp_path):
    with pytest.raises(AdapterError, match="does not exist"):
        graphlora.load_adapter(lora, tmp_path / "nowhere")
    with pytest.raises(AdapterError, match="full model checkpoint"):
        graphlora.load_adapter(lora, saves / "merged")
    bad = tmp_path / "bad"
    lora.save_pretrained(bad, only_save_adapters=True)
    config = json.loads((bad / "adapter_config.json").read_text())
    for changes, needle in (({"peft_type": "IA3"}, "'IA3' is unsupported"), ({"use_dora": True}, "no lora_magnitude_vector")):
        (bad / "adapter_config.json").write_text(json.dumps({**config, **changes}))
        with pytest.raises(AdapterError, match=needle):
            graphlora.load_adapter(lora, bad, adapter_name="x")
    (bad / "adapter_model.safetensors").unlink()
    (bad / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterError, match="adapter weights are missing"):
        graphlora.load_adapter(lora, bad, adapter_name="x")
    assert sorted(lora.adapters) == ["default"]


def test_adapter_that_does_not_fit_the_model(saves, tmp_path):
    wide = graphlora.transform(MLP(dims=(8, 16, 32, 4)).eval(), [LoraRule(".*", rank=2)], (X,))
    before = {k: v.clone() for k, v in wide.lora_state_dict().items()}
    with pytest.raises(AdapterError) as info:
        graphlora.load_adapter(wide, saves / "adapters")
    message = str(info.value)
    assert "layers.0.lora_B.weight: expected [16, 2], found [32, 2]" in message
    assert "layers.1.lora_A.weight: expected [4, 16], found [4, 32]" in message
    # nothing changed
    assert sorted(wide.adapters) == ["default"]
    for k, v in wide.lora_state_dict().items():
        assert torch.equal(v, before[k])

    # a target that is not a linear layer of the model, with the nearest name suggested
    other = tmp_path / "other"
    lm = graphlora.transform(_mlp(), [LoraRule(".*", rank=2)], (X,))
    lm.save_pretrained(other, only_save_adapters=True)
    config = json.loads((other / "adapter_config.json").read_text())
    tensors = load_file(str(other / "adapter_model.safetensors"))
    renamed = {k.replace("layers.0", "layer.0"): v for k, v in tensors.items()}
    from safetensors.torch import save_file

    save_file(renamed, str(other / "adapter_model.safetensors"), metadata={"format": "pt"})
    config["target_modules"] = sorted(t.replace("layers.0", "layer.0") for t in config["target_modules"])
    (other / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterError, match=r"not sites of this model .*: layer\.0 \(closest site: 'layers\.0'\)"):
        graphlora.load_adapter(lm, other, adapter_name="x")
    assert sorted(lm.adapters) == ["default"]
