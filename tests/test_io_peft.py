"""The PEFT LoRA adapter format: interop with real PEFT in both directions, and validation."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import warnings

import pytest
import torch
from torch import nn

from graphlora.errors import AdapterError, FileFormatError, GraphloraWarning
from graphlora.io import atomic
from graphlora.io.peft_config import (
    _CONFIG_DEFAULTS,
    _UNSUPPORTED_FIELDS,
    _VARIANT_INITS,
    ADAPTER_CONFIG_NAME,
    LoraModuleSpec,
    build_adapter_config,
    peft_selects,
    resolve_pattern,
)
from graphlora.io.peft_format import (
    ADAPTER_WEIGHTS_NAME,
    LoraModule,
    check_adapter_shapes,
    check_shapes,
    lora_keys,
    lora_shapes,
    parse_lora_key,
    peft_lora_keys,
    read_adapter,
    save_adapter,
)

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def tiny_bert():
    torch.manual_seed(0)
    config = transformers.BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=100
    )
    return transformers.BertModel(config).eval()


def tiny_gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=50, n_positions=16, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2Model(config).eval()


def peft_layer(peft_model, path):
    return peft_model.base_model.model.get_submodule(path)


def random_modules(model, paths, ranks=None, alphas=None, fan_in_fan_out=False, use_rslora=False):
    """LoraModules with random non-zero factors sized for ``model``'s layers."""
    gen = torch.Generator().manual_seed(1)
    mods = []
    for path in paths:
        layer = model.get_submodule(path)
        w = layer.weight
        in_f, out_f = (w.shape[0], w.shape[1]) if fan_in_fan_out else (w.shape[1], w.shape[0])
        r = (ranks or {}).get(path, 4)
        alpha = (alphas or {}).get(path, 8)
        a_shape, b_shape = lora_shapes(r, in_f, out_f)
        mods.append(
            LoraModule(
                path=path,
                rank=r,
                alpha=alpha,
                lora_A=torch.randn(a_shape, generator=gen),
                lora_B=torch.randn(b_shape, generator=gen),
                fan_in_fan_out=fan_in_fan_out,
                use_rslora=use_rslora,
            )
        )
    return mods


BERT_QV = [f"encoder.layer.{i}.attention.self.{n}" for i in range(2) for n in ("query", "value")]


def load_with_peft(base, directory):
    """PeftModel.from_pretrained, failing on any warning PEFT emits."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = peft.PeftModel.from_pretrained(base, str(directory))
    # transformers' own deprecation notices are not about the adapter; anything else is.
    ours = [
        w for w in caught
        if "peft" in (w.filename or "") or not issubclass(w.category, (DeprecationWarning, FutureWarning))
    ]
    assert not ours, "PEFT warned: " + " | ".join(str(w.message) for w in ours)
    return model


# ---------------------------------------------------------------------------------------------
# the config file


def test_config_fields_match_peft_lora_config(tmp_path):
    peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"]).save_pretrained(tmp_path)
    theirs = json.loads((tmp_path / ADAPTER_CONFIG_NAME).read_text())
    ours = build_adapter_config([LoraModuleSpec("query", 4, 8), LoraModuleSpec("value", 4, 8)])
    assert set(ours) == set(theirs) == set(_CONFIG_DEFAULTS)
    differ = {k for k in theirs if ours[k] != theirs[k]}
    # target_modules: PEFT writes a set (any order), we write sorted; inference_mode: PEFT's
    # PeftModel.save_pretrained forces True, as we do.
    assert differ <= {"target_modules", "inference_mode"}
    assert sorted(theirs["target_modules"]) == ours["target_modules"]
    assert ours["peft_version"] == peft.__version__, "graphlora mirrors this PEFT release's LoraConfig"


def test_unsupported_field_list_covers_installed_peft_variants():
    variants = {f.name for f in dataclasses.fields(peft.LoraConfig) if f.metadata.get("is_lora_variant")}
    assert variants - {"use_dora"} <= set(_UNSUPPORTED_FIELDS)  # DoRA is supported: tests/test_dora.py
    init_field = next(f for f in dataclasses.fields(peft.LoraConfig) if f.name == "init_lora_weights")
    assert set(init_field.metadata.get("lora_variants", [])) <= set(_VARIANT_INITS)


def test_config_patterns_and_common_values():
    specs = [
        LoraModuleSpec("a.q", 4, 8),
        LoraModuleSpec("a.v", 4, 16),
        LoraModuleSpec("b.q", 8, 8),
        LoraModuleSpec("b.v", 4, 8.0),
    ]
    cfg = build_adapter_config(specs, lora_dropout=0.1, use_rslora=True, task_type="CAUSAL_LM",
                               base_model_name_or_path="org/model")
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8 and isinstance(cfg["lora_alpha"], int)
    assert cfg["rank_pattern"] == {r"^b\.q": 8}
    assert cfg["alpha_pattern"] == {r"^a\.v": 16}
    assert cfg["target_modules"] == ["a.q", "a.v", "b.q", "b.v"]
    assert cfg["lora_dropout"] == 0.1 and cfg["use_rslora"] is True
    assert cfg["peft_type"] == "LORA" and cfg["bias"] == "none" and cfg["use_dora"] is False
    assert cfg["modules_to_save"] is None and cfg["init_lora_weights"] is True
    assert cfg["base_model_name_or_path"] == "org/model" and cfg["task_type"] == "CAUSAL_LM"
    for s in specs:
        assert resolve_pattern(cfg["rank_pattern"], s.path, cfg["r"]) == s.rank
        assert resolve_pattern(cfg["alpha_pattern"], s.path, cfg["lora_alpha"]) == s.alpha


@pytest.mark.parametrize(
    "bad",
    [
        dict(modules=[]),
        dict(modules=[LoraModuleSpec("x", 0, 1)]),
        dict(modules=[LoraModuleSpec("x", 2, float("nan"))]),
        dict(modules=[LoraModuleSpec("x", 2, 1), LoraModuleSpec("x", 2, 1)]),
        dict(modules=[LoraModuleSpec(".x", 2, 1)]),
        dict(modules=[LoraModuleSpec("x", 2, 1)], lora_dropout=1.0),
        dict(modules=[LoraModuleSpec("x", 2, 1)], task_type="CLASSIFY"),
        dict(modules=[LoraModuleSpec("x", 2, 1)], init_lora_weights="pissa"),
        dict(modules=[LoraModuleSpec("x", 2, 1)], module_names=["y"]),
    ],
)
def test_config_builder_rejects(bad):
    with pytest.raises(ValueError):
        build_adapter_config(**bad)


@pytest.mark.parametrize(
    "path",
    ["encoder.layer.0.attention.self.query", "encoder.layer.10.attention.self.query", "layer.1.x", "h.0.attn.c_attn"],
)
def test_resolve_pattern_matches_peft_get_pattern_key(path):
    from peft.utils.other import get_pattern_key

    patterns = {
        r"^encoder\.layer\.1\.attention\.self\.query": 2,
        "query": 3,
        "layer.1.x": 5,
        r"^h\.0\.attn\.c_attn": 6,
    }
    expected = patterns.get(get_pattern_key(patterns.keys(), path), 99)
    assert resolve_pattern(patterns, path, 99) == expected


def test_exact_pattern_keys_select_one_module():
    from peft.utils.other import get_pattern_key

    names = ["encoder.layer.1.query", "encoder.layer.11.query", "x.encoder.layer.1.query", "encoder.layer.1Xquery"]
    cfg = build_adapter_config([LoraModuleSpec("encoder.layer.1.query", 2, 1)] +
                               [LoraModuleSpec(n, 4, 1) for n in names[1:]] + [LoraModuleSpec("z", 4, 1)])
    hits = [n for n in names if get_pattern_key(cfg["rank_pattern"].keys(), n) in cfg["rank_pattern"]]
    assert hits == ["encoder.layer.1.query"]


@pytest.mark.parametrize(
    "config, path, expected",
    [
        ({"target_modules": ["query"]}, "encoder.layer.0.attention.self.query", True),
        ({"target_modules": ["a.query"]}, "b.a.query", True),
        ({"target_modules": ["a.query"]}, "ba.query", False),
        ({"target_modules": "(?:a\\.q|b)"}, "a.q", True),
        ({"target_modules": "(?:a\\.q|b)"}, "x.a.q", False),
        ({"target_modules": ["q"], "exclude_modules": ["l.0.q"]}, "l.0.q", False),
        ({"target_modules": ["q"], "layers_to_transform": [1]}, "enc.layer.1.q", True),
        ({"target_modules": ["q"], "layers_to_transform": [1]}, "enc.layer.0.q", False),
        ({"target_modules": ["q"], "layers_to_transform": 0, "layers_pattern": "h"}, "t.h.0.attn.q", True),
    ],
)
def test_peft_selects_matches_peft(config, path, expected):
    from peft.tuners.tuners_utils import check_target_module_exists

    full = {"target_modules": None, "exclude_modules": None, "layers_to_transform": None,
            "layers_pattern": None, "modules_to_save": None, "target_parameters": None, **config}
    ns = type("Cfg", (), full)()
    assert bool(check_target_module_exists(ns, path)) is expected
    assert peft_selects(full, path) is expected


# ---------------------------------------------------------------------------------------------
# keys


def test_peft_selects_without_targets():
    assert peft_selects({"target_modules": None}, "q") is False


def test_key_helpers():
    path = "encoder.layer.0.attention.self.query"
    assert lora_keys(path) == (f"{path}.lora_A.weight", f"{path}.lora_B.weight")
    a, b = peft_lora_keys(path)
    assert a == f"base_model.model.{path}.lora_A.weight" and b == f"base_model.model.{path}.lora_B.weight"
    assert parse_lora_key(a) == (path, "A", None)
    assert parse_lora_key(b) == (path, "B", None)
    assert parse_lora_key(f"base_model.model.{path}.lora_B.default.weight") == (path, "B", "default")
    assert parse_lora_key(f"{path}.lora_A.weight") == (path, "A", None)
    assert parse_lora_key(f"{path}.lora_magnitude_vector.weight") is None
    assert parse_lora_key(f"{path}.lora_B.bias") is None
    assert lora_shapes(4, 32, 64) == ((4, 32), (64, 4))


# ---------------------------------------------------------------------------------------------
# PEFT -> graphlora


def test_read_adapter_saved_by_peft(tmp_path):
    base = tiny_bert()
    pm = peft.get_peft_model(
        base, peft.LoraConfig(r=4, lora_alpha=12, target_modules=["query", "value"], init_lora_weights=False)
    )
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p))
    pm.save_pretrained(tmp_path)
    adapter = read_adapter(tmp_path)
    assert sorted(adapter.modules) == sorted(BERT_QV)
    assert adapter.metadata == {"format": "pt"} and adapter.use_rslora is False
    for path, m in adapter.modules.items():
        layer = peft_layer(pm, path)
        assert torch.equal(m.lora_A, layer.lora_A["default"].weight)
        assert torch.equal(m.lora_B, layer.lora_B["default"].weight)
        assert not torch.all(m.lora_B == 0)
        assert m.rank == 4 and m.alpha == 12 and m.fan_in_fan_out is False
        assert m.scale == layer.scaling["default"]
        assert m.lora_A.shape == (4, 32) and m.lora_B.shape == (32, 4)


def test_read_peft_rank_pattern_and_rslora(tmp_path):
    base = tiny_bert()
    cfg = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["query", "value"], use_rslora=True,
        rank_pattern={"layer.1.attention.self.query": 6}, alpha_pattern={"value": 3},
    )
    pm = peft.get_peft_model(base, cfg)
    pm.save_pretrained(tmp_path)
    adapter = read_adapter(tmp_path)
    for path, m in adapter.modules.items():
        layer = peft_layer(pm, path)
        assert m.rank == layer.r["default"] == m.lora_A.shape[0]
        assert m.alpha == layer.lora_alpha["default"]
        assert math.isclose(m.scale, layer.scaling["default"])
    assert adapter.modules["encoder.layer.1.attention.self.query"].rank == 6
    assert adapter.modules["encoder.layer.0.attention.self.value"].alpha == 3


# ---------------------------------------------------------------------------------------------
# graphlora -> PEFT


def test_peft_loads_adapter_written_by_graphlora(tmp_path):
    base = tiny_bert()
    mods = random_modules(base, BERT_QV)
    names = [n for n, _ in base.named_modules()]
    save_adapter(tmp_path / "ad", mods, module_names=names, base_model_name_or_path="tiny-bert")
    assert sorted(os.listdir(tmp_path / "ad")) == [ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME]
    pm = load_with_peft(tiny_bert(), tmp_path / "ad")
    wrapped = sorted(n for n, m in pm.base_model.model.named_modules() if hasattr(m, "lora_A"))
    assert wrapped == sorted(BERT_QV)
    for m in mods:
        layer = peft_layer(pm, m.path)
        assert torch.equal(layer.lora_A["default"].weight, m.lora_A)
        assert torch.equal(layer.lora_B["default"].weight, m.lora_B)
        assert layer.scaling["default"] == m.scale
    # And back: graphlora reads its own file identically.
    again = read_adapter(tmp_path / "ad")
    for m in mods:
        assert torch.equal(again.modules[m.path].lora_A, m.lora_A)
        assert torch.equal(again.modules[m.path].lora_B, m.lora_B)


def test_transformers_load_adapter_reads_graphlora_adapter(tmp_path):
    base = tiny_bert()
    mods = random_modules(base, BERT_QV)
    save_adapter(tmp_path, mods)
    model = tiny_bert()
    model.load_adapter(str(tmp_path))
    layer = model.get_submodule(BERT_QV[0])
    (adapter_name,) = layer.lora_A.keys()
    assert torch.equal(layer.lora_A[adapter_name].weight, mods[0].lora_A)


def test_peft_builds_per_module_ranks_from_rank_pattern(tmp_path):
    base = tiny_bert()
    ranks = {BERT_QV[0]: 2, BERT_QV[3]: 7}
    alphas = {BERT_QV[1]: 5, BERT_QV[3]: 16}
    mods = random_modules(base, BERT_QV, ranks=ranks, alphas=alphas, use_rslora=True)
    config = save_adapter(tmp_path, mods, lora_dropout=0.05)
    assert config["r"] == 4 and len(config["rank_pattern"]) == 2 and len(config["alpha_pattern"]) == 2
    pm = load_with_peft(tiny_bert(), tmp_path)
    for m in mods:
        layer = peft_layer(pm, m.path)
        assert layer.r["default"] == m.rank == ranks.get(m.path, 4)
        assert layer.lora_alpha["default"] == m.alpha
        assert math.isclose(layer.scaling["default"], m.alpha / math.sqrt(m.rank))
        assert torch.equal(layer.lora_A["default"].weight, m.lora_A)
        assert torch.equal(layer.lora_B["default"].weight, m.lora_B)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x):
        return self.proj(x)


class Nested(nn.Module):
    """``inner.proj`` is a dotted suffix of ``outer.inner.proj``: PEFT's list matching would
    select both for target ``inner.proj``."""

    def __init__(self):
        super().__init__()
        self.inner = Block()
        self.outer = nn.Module()
        self.outer.inner = Block()

    def forward(self, x):
        return self.outer.inner(self.inner(x))


def test_full_paths_select_exactly_the_intended_modules(tmp_path):
    torch.manual_seed(0)
    model = Nested()
    mods = random_modules(model, ["inner.proj"])
    names = [n for n, _ in model.named_modules()]
    cfg = save_adapter(tmp_path, mods, module_names=names)
    assert isinstance(cfg["target_modules"], str)  # fell back to an exact regex
    pm = load_with_peft(Nested(), tmp_path)
    wrapped = sorted(n for n, m in pm.base_model.model.named_modules() if hasattr(m, "lora_A"))
    assert wrapped == ["inner.proj"]
    assert read_adapter(tmp_path).modules.keys() == {"inner.proj"}


def test_without_module_names_peft_suffix_matching_would_also_select_the_twin(tmp_path):
    # Why build_adapter_config takes module_names: the plain path list is a suffix match in PEFT.
    torch.manual_seed(0)
    save_adapter(tmp_path, random_modules(Nested(), ["inner.proj"]))
    with pytest.raises(AssertionError, match="missing adapter keys"):
        load_with_peft(Nested(), tmp_path)


def test_rank_pattern_does_not_leak_to_suffix_twin(tmp_path):
    torch.manual_seed(0)
    model = Nested()
    mods = random_modules(model, ["inner.proj", "outer.inner.proj"], ranks={"inner.proj": 2, "outer.inner.proj": 5},
                          alphas={"inner.proj": 3})
    cfg = save_adapter(tmp_path, mods, module_names=[n for n, _ in model.named_modules()])
    assert cfg["target_modules"] == ["inner.proj", "outer.inner.proj"]
    pm = load_with_peft(Nested(), tmp_path)
    for m in mods:
        layer = peft_layer(pm, m.path)
        assert layer.r["default"] == m.rank and layer.lora_alpha["default"] == m.alpha
        assert torch.equal(layer.lora_A["default"].weight, m.lora_A)


def test_gpt2_conv1d_fan_in_fan_out_both_directions(tmp_path):
    base = tiny_gpt2()
    paths = [f"h.{i}.attn.c_attn" for i in range(2)]
    mods = random_modules(base, paths, fan_in_fan_out=True)
    assert mods[0].lora_A.shape == (4, 32) and mods[0].lora_B.shape == (96, 4)  # (r, in), (out, r)
    cfg = save_adapter(tmp_path / "ours", mods)
    assert cfg["fan_in_fan_out"] is True
    pm = load_with_peft(tiny_gpt2(), tmp_path / "ours")
    for m in mods:
        layer = peft_layer(pm, m.path)
        assert layer.fan_in_fan_out
        assert torch.equal(layer.lora_A["default"].weight, m.lora_A)
        assert torch.equal(layer.lora_B["default"].weight, m.lora_B)
        # The merged delta lines up with Conv1D's (in, out) weight as (B @ A).T * scale.
        expected = (m.lora_B @ m.lora_A).T * m.scale
        assert torch.allclose(layer.get_delta_weight("default"), expected)

    pm.save_pretrained(tmp_path / "theirs")
    adapter = read_adapter(tmp_path / "theirs")
    assert adapter.fan_in_fan_out is True
    for m in mods:
        got = adapter.modules[m.path]
        assert got.fan_in_fan_out and torch.equal(got.lora_A, m.lora_A) and torch.equal(got.lora_B, m.lora_B)


# ---------------------------------------------------------------------------------------------
# saving is atomic and polite


def test_save_adapter_failure_keeps_previous_adapter(tmp_path, monkeypatch):
    base = tiny_bert()
    save_adapter(tmp_path / "ad", random_modules(base, BERT_QV[:2]))
    (tmp_path / "ad" / "README.md").write_text("mine")
    before = {n: (tmp_path / "ad" / n).read_bytes() for n in os.listdir(tmp_path / "ad")}
    for stage in atomic.DIRECTORY_STAGES[:-1]:
        def boom(seen, stage=stage):
            if seen == stage:
                raise OSError(f"injected at {seen}")

        monkeypatch.setattr(atomic, "_fail_at", boom)
        with pytest.raises(OSError, match="injected"):
            save_adapter(tmp_path / "ad", random_modules(base, BERT_QV, ranks={BERT_QV[0]: 3}))
        assert {n: (tmp_path / "ad" / n).read_bytes() for n in os.listdir(tmp_path / "ad")} == before
        assert os.listdir(tmp_path) == ["ad"]
    monkeypatch.setattr(atomic, "_fail_at", None)
    torch.save({}, tmp_path / "ad" / "adapter_model.bin")
    save_adapter(tmp_path / "ad", random_modules(base, BERT_QV))
    assert sorted(os.listdir(tmp_path / "ad")) == ["README.md", ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME]
    assert (tmp_path / "ad" / "README.md").read_text() == "mine"


# ---------------------------------------------------------------------------------------------
# validation errors


@pytest.fixture
def adapter_dir(tmp_path):
    save_adapter(tmp_path / "ad", random_modules(tiny_bert(), BERT_QV))
    return tmp_path / "ad"


def edit_config(directory, **changes):
    path = directory / ADAPTER_CONFIG_NAME
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


def edit_weights(directory, fn):
    from safetensors.torch import load_file, save_file

    path = directory / ADAPTER_WEIGHTS_NAME
    tensors = load_file(str(path))
    save_file(fn(dict(tensors)), str(path), metadata={"format": "pt"})


def test_missing_directory_and_files(tmp_path, adapter_dir):
    with pytest.raises(AdapterError, match="does not exist"):
        read_adapter(tmp_path / "nope")
    (adapter_dir / ADAPTER_WEIGHTS_NAME).unlink()
    with pytest.raises(AdapterError, match=rf"adapter_model\.safetensors.*adapter_model\.bin.*|weights are missing from {re.escape(str(adapter_dir))}"):
        read_adapter(adapter_dir)
    (adapter_dir / ADAPTER_CONFIG_NAME).unlink()
    with pytest.raises(AdapterError, match=rf"adapter_config\.json is missing from {re.escape(str(adapter_dir))}"):
        read_adapter(adapter_dir)


def test_model_directory_is_not_an_adapter(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(AdapterError, match="full model checkpoint"):
        read_adapter(tmp_path)


def test_legacy_bin_adapter(adapter_dir):
    from safetensors.torch import load_file

    tensors = load_file(str(adapter_dir / ADAPTER_WEIGHTS_NAME))
    (adapter_dir / ADAPTER_WEIGHTS_NAME).unlink()
    torch.save(tensors, adapter_dir / "adapter_model.bin")
    # a pickle is only read with the explicit opt-in (docs/security.md)
    adapter = read_adapter(adapter_dir, allow_pickle=True)
    assert sorted(adapter.modules) == sorted(BERT_QV)
    (adapter_dir / "adapter_model.bin").write_bytes(b"garbage")
    with pytest.raises(FileFormatError, match="adapter_model.bin"):
        read_adapter(adapter_dir, allow_pickle=True)


def test_wrong_peft_type(adapter_dir):
    edit_config(adapter_dir, peft_type="IA3")
    with pytest.raises(AdapterError, match="peft_type 'IA3' is unsupported"):
        read_adapter(adapter_dir)
    edit_config(adapter_dir, peft_type=None)
    with pytest.raises(FileFormatError, match="not a PEFT adapter config"):
        read_adapter(adapter_dir)


def test_dora_saved_by_peft_reads_its_magnitudes(tmp_path):
    pm = peft.get_peft_model(tiny_bert(), peft.LoraConfig(r=2, target_modules=["query"], use_dora=True))
    pm.save_pretrained(tmp_path)
    adapter = read_adapter(tmp_path)
    for path, module in adapter.modules.items():
        want = pm.get_submodule(path).lora_magnitude_vector["default"].weight.detach()
        torch.testing.assert_close(module.magnitude, want)


@pytest.mark.parametrize(
    "changes, needle",
    [
        ({"use_dora": True}, "no lora_magnitude_vector"),
        ({"use_qalora": True}, "QALoRA"),
        ({"lora_bias": True}, "lora_bias"),
        ({"layer_replication": [[0, 2], [1, 2]]}, "layer_replication"),
        ({"alora_invocation_tokens": [1, 2]}, "alora_invocation_tokens"),
        ({"use_bdlora": {"nblocks": 2}}, "use_bdlora"),
        ({"modules_to_save": ["classifier"]}, "modules_to_save"),
        ({"trainable_token_indices": [1]}, "trainable_token_indices"),
        ({"bias": "all"}, "bias='all'"),
        ({"bias": "lora_only"}, "bias='lora_only'"),
        ({"init_lora_weights": "pissa_niter_4"}, "modified"),
        ({"init_lora_weights": "loftq"}, "modified"),
        ({"init_lora_weights": "mica"}, "variant"),
    ],
)
def test_unsupported_config_features(adapter_dir, changes, needle):
    edit_config(adapter_dir, **changes)
    with pytest.raises(AdapterError, match=f"unsupported.*{re.escape(needle)}"):
        read_adapter(adapter_dir)


def test_harmless_config_values_are_accepted(adapter_dir):
    edit_config(adapter_dir, modules_to_save=[], init_lora_weights="gaussian", runtime_config={},
                target_parameters=[], megatron_core="megatron.core")
    assert len(read_adapter(adapter_dir).modules) == 4


def test_unknown_config_field_warns(adapter_dir):
    edit_config(adapter_dir, some_future_option=True, another_future_option=None)
    with pytest.warns(GraphloraWarning, match="some_future_option"):
        read_adapter(adapter_dir)


def test_invalid_config_json_and_types(adapter_dir):
    (adapter_dir / ADAPTER_CONFIG_NAME).write_text('{"peft_type": "LORA",')
    with pytest.raises(FileFormatError, match=r"adapter_config\.json is not valid JSON"):
        read_adapter(adapter_dir)
    (adapter_dir / ADAPTER_CONFIG_NAME).write_text('["LORA"]')
    with pytest.raises(FileFormatError, match="JSON object"):
        read_adapter(adapter_dir)
    (adapter_dir / ADAPTER_CONFIG_NAME).write_text(json.dumps({"peft_type": "LORA", "r": "4"}))
    with pytest.raises(FileFormatError, match="'r' must be a positive int"):
        read_adapter(adapter_dir)
    (adapter_dir / ADAPTER_CONFIG_NAME).write_text(json.dumps({"peft_type": "LORA", "rank_pattern": {"(": 2}}))
    with pytest.raises(FileFormatError, match="not a valid regex"):
        read_adapter(adapter_dir)


def test_truncated_adapter_weights(adapter_dir):
    path = adapter_dir / ADAPTER_WEIGHTS_NAME
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(FileFormatError, match=r"adapter_model\.safetensors.*truncated or corrupt"):
        read_adapter(adapter_dir)


def test_rank_in_config_disagrees_with_tensors(adapter_dir):
    edit_config(adapter_dir, r=8)
    with pytest.raises(AdapterError, match="has rank 4 but adapter_config.json gives it rank 8"):
        read_adapter(adapter_dir)


def test_weights_for_untargeted_module(adapter_dir):
    edit_config(adapter_dir, target_modules=["query"])
    with pytest.raises(AdapterError, match="target_modules.*does not select"):
        read_adapter(adapter_dir)


def test_missing_factor_and_bad_shapes(adapter_dir):
    a_key, b_key = peft_lora_keys(BERT_QV[0])

    def drop_b(t):
        del t[b_key]
        return t

    edit_weights(adapter_dir, drop_b)
    with pytest.raises(AdapterError, match="has no lora_B weight"):
        read_adapter(adapter_dir)

    def bad_rank(t):
        t[b_key] = torch.zeros(32, 3)
        return t

    edit_weights(adapter_dir, bad_rank)
    with pytest.raises(AdapterError, match=r"lora_A \[4, 32\] has rank 4 but lora_B \[32, 3\] has rank 3"):
        read_adapter(adapter_dir)

    def conv(t):  # a Conv2d's pair is read (whether it fits the model is load_adapter's check)
        t[a_key] = torch.zeros(4, 32, 3, 3)
        t[b_key] = torch.zeros(32, 4, 1, 1)
        return t

    edit_weights(adapter_dir, conv)
    assert tuple(read_adapter(adapter_dir).modules[BERT_QV[0]].lora_A.shape) == (4, 32, 3, 3)

    def bad_conv(t):
        t[b_key] = torch.zeros(32, 4, 3, 3)
        return t

    edit_weights(adapter_dir, bad_conv)
    with pytest.raises(AdapterError, match="lora_B is a 1x1 kernel"):
        read_adapter(adapter_dir)

    def three_d(t):
        t[a_key] = torch.zeros(4, 32, 2, 2, 2, 2)
        return t

    edit_weights(adapter_dir, three_d)
    with pytest.raises(AdapterError, match="expected 2-D factors"):
        read_adapter(adapter_dir)


@pytest.mark.parametrize(
    "suffix, needle",
    [
        (".lora_magnitude_vector", "DoRA magnitude"),
        (".lora_B.bias", "lora_B bias"),
        (".lora_embedding_A", "both lora_embedding_A/B keys"),
        (".modules_to_save.default.weight", "modules_to_save"),
        (".weight", "not a LoRA A/B weight"),
    ],
)
def test_unsupported_tensor_keys(adapter_dir, suffix, needle):
    def add(t):
        t[f"base_model.model.{BERT_QV[0]}{suffix}"] = torch.zeros(4)
        return t

    edit_weights(adapter_dir, add)
    with pytest.raises(AdapterError, match=needle):
        read_adapter(adapter_dir)


def test_adapter_name_in_keys(adapter_dir):
    def rename(t, name="default"):
        return {k.replace(".weight", f".{name}.weight") if ".lora_" in k else k: v for k, v in t.items()}

    edit_weights(adapter_dir, rename)
    assert sorted(read_adapter(adapter_dir).modules) == sorted(BERT_QV)

    def mixed(t):
        k = next(k for k in t if ".lora_A.default." in k)
        t[k.replace(".default.", ".other.")] = t.pop(k)
        return t

    edit_weights(adapter_dir, mixed)
    with pytest.raises(AdapterError, match="several adapters"):
        read_adapter(adapter_dir)


def test_shape_mismatch_message_names_keys_and_shapes(adapter_dir):
    adapter = read_adapter(adapter_dir)
    q0, v0, q1, v1 = BERT_QV
    check_adapter_shapes(adapter, {p: (32, 32) for p in BERT_QV})  # fits
    check_adapter_shapes(adapter, {p: (4, 32, 32) for p in BERT_QV})
    expected = {q0: (32, 32), v0: (16, 32), q1: (4, 32, 48), "encoder.layer.0.output.dense": (64, 32)}
    with pytest.raises(AdapterError) as info:
        check_adapter_shapes(adapter, expected)
    msg = str(info.value)
    assert f"{v0}.lora_A.weight: expected [4, 16], found [4, 32]" in msg
    assert f"{q1}.lora_B.weight: expected [48, 4], found [32, 4]" in msg
    assert "missing key(s): encoder.layer.0.output.dense.lora_A.weight" in msg
    assert f"unexpected key(s): {v1}.lora_A.weight, {v1}.lora_B.weight" in msg
    assert q0 not in msg


def test_check_shapes_limits_the_listing():
    expected = {f"k{i}": (2, 2) for i in range(9)}
    with pytest.raises(AdapterError, match=r"9 shape mismatch\(es\): k0: expected \[2, 2\], found \[3\].*and 6 more"):
        check_shapes(expected, {k: (3,) for k in expected}, limit=3)


# ---------------------------------------------------------------------------------------------
# property: the config selects exactly the chosen modules with exactly their ranks, under PEFT's
# own matching functions, whatever the module tree looks like

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_segment = st.sampled_from(["a", "b", "q", "0", "1", "10"])
_name = st.lists(_segment, min_size=1, max_size=4).map(".".join)


@settings(max_examples=80, deadline=None)
@given(data=st.data(), universe=st.lists(_name, min_size=1, max_size=12, unique=True))
def test_config_selects_exactly_the_chosen_modules(data, universe):
    from peft.tuners.tuners_utils import check_target_module_exists
    from peft.utils.other import get_pattern_key

    chosen = data.draw(st.lists(st.sampled_from(universe), min_size=1, unique=True))
    ranks = {p: data.draw(st.integers(1, 3)) for p in chosen}
    alphas = {p: data.draw(st.sampled_from([1, 2, 0.5])) for p in chosen}
    cfg = build_adapter_config(
        [LoraModuleSpec(p, ranks[p], alphas[p]) for p in chosen], module_names=universe
    )
    ns = peft.LoraConfig(**{k: v for k, v in cfg.items() if k not in ("peft_type", "peft_version")})
    for name in universe:
        assert bool(check_target_module_exists(ns, name)) is (name in chosen), name
        assert peft_selects(cfg, name) is (name in chosen)
    for p in chosen:
        r_key = get_pattern_key(ns.rank_pattern.keys(), p)
        a_key = get_pattern_key(ns.alpha_pattern.keys(), p)
        assert ns.rank_pattern.get(r_key, ns.r) == ranks[p]
        assert ns.alpha_pattern.get(a_key, ns.lora_alpha) == alphas[p]
