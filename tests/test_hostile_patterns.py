"""Regular expressions from files cannot hang the process (issue 17, class 5).

``(a|aa)+`` fully matched against ``"aaaa...a.lin"`` backtracks exponentially (Fibonacci(n) ways
to split n a's): at 60 characters Python's ``re`` would run for days. graphlora matches rule and adapter-config patterns with a time
bound; each test here has a hard timeout far below what an unbounded match would take, and checks
the error names the file and the pattern.
"""

from __future__ import annotations

import json
import time

import pytest
import torch
import torch.nn as nn

import graphlora
from graphlora import ActivationRule, FileFormatError, LoraRule, QuantRule, RuleError
from graphlora import patterns
from graphlora.io.peft_format import parse_lora_key, read_adapter
from graphlora.rules_file import load_rules

pytestmark = pytest.mark.timeout(60)

EVIL = "(a|aa)+"
LONG = "a" * 60


class Deep(nn.Module):
    """A model whose module path is ``aaaa...a.lin``: the string the evil pattern chokes on."""

    def __init__(self):
        super().__init__()
        self.add_module(LONG, nn.Sequential())
        getattr(self, LONG).add_module("lin", nn.Linear(4, 4))

    def forward(self, x):
        return getattr(self, LONG).lin(x)


def test_a_rules_file_pattern_is_matched_with_a_time_bound(tmp_path):
    path = tmp_path / "rules.toml"
    path.write_text(f"[[rules]]\nmodule_path = '{EVIL}'\nrank = 2\n")
    rules = load_rules(path)
    start = time.perf_counter()
    with pytest.raises(RuleError) as info:
        graphlora.transform(Deep(), rules, (torch.randn(2, 4),))
    assert time.perf_counter() - start < 30
    message = str(info.value)
    assert str(path) in message and repr(EVIL) in message and "backtracks catastrophically" in message


@pytest.fixture
def quick(monkeypatch):
    """A shorter per-match bound, so the tests below spend less time waiting for it (the test
    above runs with the real one)."""
    monkeypatch.setattr(patterns, "MATCH_TIMEOUT", 0.05)


def test_a_rule_from_python_is_bounded_too(quick):
    with pytest.raises(RuleError, match="backtracks catastrophically"):
        graphlora.transform(Deep(), [LoraRule(EVIL, rank=2)], (torch.randn(2, 4),))


def _adapter_with_evil_path(tmp_path, **config):
    """A PEFT adapter whose weights name the module ``aaaa...a.lin`` and whose config holds
    ``config``."""
    from safetensors.torch import save_file

    root = tmp_path / "ad"
    root.mkdir()
    cfg = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": [f"{LONG}.lin"], **config}
    (root / "adapter_config.json").write_text(json.dumps(cfg))
    prefix = f"base_model.model.{LONG}.lin"
    save_file({f"{prefix}.lora_A.weight": torch.zeros(2, 4), f"{prefix}.lora_B.weight": torch.zeros(4, 2)},
              str(root / "adapter_model.safetensors"), metadata={"format": "pt"})
    return root


@pytest.mark.parametrize(
    "config, field",
    [
        ({"target_modules": EVIL}, "'target_modules'"),
        ({"rank_pattern": {EVIL: 2}}, "pattern key"),
        ({"alpha_pattern": {EVIL: 8}}, "pattern key"),
        ({"exclude_modules": EVIL}, "'exclude_modules'"),
        ({"layers_to_transform": [0], "layers_pattern": EVIL, "target_modules": ["lin"]}, "'layers_pattern'"),
    ],
)
def test_adapter_config_patterns_are_matched_with_a_time_bound(tmp_path, quick, config, field):
    root = _adapter_with_evil_path(tmp_path, **config)
    start = time.perf_counter()
    with pytest.raises(FileFormatError) as info:
        read_adapter(root)
    assert time.perf_counter() - start < 30
    message = str(info.value)
    assert "adapter_config.json" in message and field in message and EVIL in message


def test_the_budget_bounds_many_slow_patterns_together(monkeypatch):
    """Each match under the per-match bound but the sum over a file above the total: refused."""
    clock = iter(x * 0.6 for x in range(10_000))
    monkeypatch.setattr(patterns.time, "perf_counter", lambda: next(clock))
    matcher = patterns.PatternSet("adapter_config.json", error=FileFormatError)
    slow = matcher.compile("layers", "'target_modules'")
    with pytest.raises(FileFormatError, match=r"adapter_config\.json: matching their patterns .* more than 10 s in all"):
        for i in range(100):
            slow.fullmatch(f"layers.{i}")


def test_patterns_that_do_not_compile_or_are_huge_are_refused():
    matcher = patterns.PatternSet("f.json", error=FileFormatError)
    for bad, needle in [("(" * 10_000 + ")" * 10_000, "nested too deeply"), ("a{4294967296}", "too"),
                        ("x" * (patterns.MAX_PATTERN_LENGTH + 1), "characters long"), ("[", "not a valid")]:
        with pytest.raises(FileFormatError, match=needle):
            matcher.compile(bad, "'target_modules'")


def test_hostile_tensor_keys_are_parsed_in_linear_time():
    key = "base_model.model." + ".lora_A.x" * 200_000 + ".weight"
    start = time.perf_counter()
    path, factor, adapter = parse_lora_key(key)  # an adapter named "x" after the last lora_A
    assert factor == "A" and adapter == "x" and len(path) > 1_000_000
    assert parse_lora_key("base_model.model.m.lora_A.weight") == ("m", "A", None)
    assert parse_lora_key("m.lora_B.adapter.weight") == ("m", "B", "adapter")
    assert parse_lora_key("lora_A.weight") is None and parse_lora_key("m.lora_C.weight") is None
    assert time.perf_counter() - start < 5


def test_activation_rule_patterns_are_bounded_too(quick):
    """Whole-graph activation rules match module paths and tensor names through the same bound."""
    lm = graphlora.transform(Deep(), [QuantRule(r".*lin", weight_qtype="int8")], (torch.randn(2, 4),),
                             progress=False)
    for rule in (ActivationRule(EVIL, kinds=("linear",)), ActivationRule(tensor=EVIL, kinds=("linear",))):
        with pytest.raises(RuleError, match="backtracks catastrophically"):
            graphlora.calibrate(lm, [torch.randn(2, 4)], activations=[rule], progress=False)
