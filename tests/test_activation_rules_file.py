"""``[[activations]]`` tables in rules files: whole-graph activation placement written down next to
the site rules, read back to equal ActivationRules, with errors naming the file, rule and field."""

from __future__ import annotations

import pytest

from graphlora import ActivationRule, LoraRule, QuantRule
from graphlora.errors import RuleError
from graphlora.rules_file import dump_rules, load_activation_rules, load_rules, parse_activation_rules, parse_rules

TEXT = r"""
[[rules]]
module_path = '.*query'
weight_qtype = "int8"

[[activations]]
tensor = '.*attention\.self\.add'
qtype = "none"

[[activations]]
kinds = ["add", "linear"]
qtype = "uint16"

[[activations]]
calibration = "mse"
"""


def test_activation_tables_read_as_rules_in_order_and_site_rules_are_unchanged(tmp_path):
    path = tmp_path / "rules.toml"
    path.write_text(TEXT)
    assert load_rules(path) == [QuantRule(".*query", weight_qtype="int8")]
    assert load_activation_rules(path) == [
        ActivationRule(tensor=r".*attention\.self\.add", qtype=None),
        ActivationRule(kinds=("add", "linear"), qtype="uint16"),
        ActivationRule(calibration="mse"),
    ]


def test_a_file_without_activation_tables_has_none():
    assert parse_activation_rules("[[rules]]\nmodule_path = '.*'\nrank = 2\n") == []


@pytest.mark.parametrize("fmt", ["toml", "json"])
def test_dump_and_parse_round_trip(fmt):
    rules = [LoraRule(".*value", rank=4), QuantRule(".*dense", weight_qtype="int4", group_size=32)]
    activations = [ActivationRule(r".*self", kinds=("softmax",), qtype="uint16", calibration="percentile",
                                  percentile=99.9),
                   ActivationRule(tensor=r".*\.add", qtype=None),
                   ActivationRule(qtype="int8", symmetric=True, grid="restricted")]
    text = dump_rules(rules, fmt, activations=activations)
    assert parse_rules(text, fmt=fmt) == rules
    assert parse_activation_rules(text, fmt=fmt) == activations
    # without activations the text is what it always was: no activations key at all
    assert "activations" not in dump_rules(rules, fmt)


@pytest.mark.parametrize("table, message", [
    ("kind = ['add']", r"activation rule #0: unknown field 'kind' \(did you mean 'kinds'\?\)"),
    ("kinds = 'add'", "activation rule #0: field 'kinds' must be a list of op kinds"),
    ("kinds = ['conv']", "activation rule #0 .*kinds must be a non-empty tuple"),
    ("qtype = 'int4'", "activation rule #0 .*cannot be used for activations"),
    ("percentile = 'high'", "activation rule #0: field 'percentile' must be a number"),
    ("calibration = 'kl'", "calibration must be one of"),
])
def test_bad_activation_tables_name_file_rule_and_field(table, message):
    text = f"[[rules]]\nmodule_path = '.*'\nrank = 2\n\n[[activations]]\n{table}\n"
    with pytest.raises(RuleError, match=message) as info:
        parse_activation_rules(text, source="my.toml")
    assert str(info.value).startswith("my.toml: ")


def test_unknown_top_level_key_is_still_refused():
    with pytest.raises(RuleError, match=r"unknown top-level key 'activation' \(did you mean 'activations'\?\)"):
        parse_rules("[[rules]]\nmodule_path = '.*'\nrank = 2\n[[activation]]\nqtype = 'uint8'\n")
    with pytest.raises(RuleError, match="'activations' must be a list of tables"):
        parse_activation_rules('{"rules": [{"module_path": ".*", "rank": 2}], "activations": 3}', fmt="json")
