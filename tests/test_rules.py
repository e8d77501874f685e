"""Rule semantics (Qwix): fullmatch, first match wins, unmatched untouched; every validation error."""

import re
import warnings

import pytest
import torch

import graphlora
from graphlora import LoraRule, QuantRule, RuleError
from toy_models import MLP, ids, tiny_bert, tiny_gpt2, tiny_llama


def _x():
    return (torch.randn(4, 8),)


def test_first_match_wins_and_fullmatch():
    rules = [
        LoraRule(r"layers\.0", rank=2, alpha=4.0),
        LoraRule(r"layers\.\d", rank=3),
        LoraRule(r"layers", rank=5),  # fullmatch: "layers" matches no site path
    ]
    with pytest.warns(graphlora.GraphloraWarning, match="rule #2"):
        lm = graphlora.transform(MLP(), rules, _x())
    got = {s.module_path: (s.rule_index, s.rule.rank) for s in lm.sites}
    assert got == {"layers.0": (0, 2), "layers.1": (1, 3), "layers.2": (1, 3)}
    assert lm.adapters["default"]["layers.0"].scale == 2.0


def test_unmatched_sites_are_untouched():
    lm = graphlora.transform(MLP(), [LoraRule(r"layers\.1", rank=2)], _x())
    names = {n for n, _ in lm.named_lora_parameters()}
    assert names == {"layers.1.lora_A.weight", "layers.1.lora_B.weight"}


def test_strict_raises_for_unused_rules():
    with pytest.raises(RuleError, match=r"matched no linear site: rule #1 .*strict"):
        graphlora.transform(MLP(), [LoraRule(".*", rank=2), LoraRule("nothing", rank=2)], _x(), strict=True)


def test_rank_toggle_targets_query_value_projections():
    bert = graphlora.transform(tiny_bert(), 4, (ids(),))
    assert sorted({s.module_path for s in bert.sites}) == sorted(
        f"encoder.layer.{i}.attention.self.{n}" for i in range(2) for n in ("query", "value")
    )
    assert all(s.rule.rank == 4 and s.rule.lora_alpha == 4 for s in bert.sites)
    llama = graphlora.transform(tiny_llama(), 8, (ids(vocab=128),), {"use_cache": False})
    assert sorted({s.module_path for s in llama.sites}) == sorted(
        f"model.layers.{i}.self_attn.{n}" for i in range(2) for n in ("q_proj", "v_proj")
    )
    gpt2 = graphlora.transform(tiny_gpt2(), 2, (ids(),), {"use_cache": False})
    assert sorted({s.module_path for s in gpt2.sites}) == ["h.0.attn.c_attn", "h.1.attn.c_attn"]
    assert all(s.fan_in_fan_out for s in gpt2.sites)


@pytest.mark.parametrize(
    "rule, message",
    [
        (LoraRule(rank=0), "rank must be an int >= 1"),
        (LoraRule(rank=2, alpha=0), "alpha must be > 0"),
        (LoraRule(rank=2, alpha=-1.0), "alpha must be > 0"),
        (LoraRule(rank=2, dropout=1.0), r"dropout must be in \[0, 1\)"),
        (LoraRule(rank=2, dropout=-0.1), r"dropout must be in \[0, 1\)"),
        (LoraRule("layers.(", rank=2), "not a valid regular expression"),
        (LoraRule(rank=2, init="xavier"), "init must be one of"),
        (LoraRule(rank=2, weight_qtype="int3"), "weight_qtype"),
        (QuantRule(act_qtype="nf4"), "act_qtype"),
        (QuantRule(weight_calibration="magic"), "weight_calibration"),
    ],
)
def test_validation_errors_name_the_rule(rule, message):
    with pytest.raises(RuleError, match=message) as info:
        graphlora.transform(MLP(), [LoraRule("nothing", rank=1), rule], _x())
    assert "rule #1" in str(info.value)


def test_rank_larger_than_layer():
    with pytest.raises(RuleError, match=r"rank 9 is larger than the matched site 'layers.2'.*rank <= 4"):
        graphlora.transform(MLP(), [LoraRule(r"layers\.2", rank=9)], _x())


def test_bad_rules_argument():
    with pytest.raises(RuleError):
        graphlora.transform(MLP(), "layers", _x())
    with pytest.raises(RuleError):
        graphlora.transform(MLP(), 0, _x())
