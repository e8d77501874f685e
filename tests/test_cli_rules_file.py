"""Rules files (graphlora.rules_file): TOML/JSON layouts, validation messages, round trips."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from graphlora import LoraRule, QuantRule, RuleError
from graphlora.rules_file import dump_rules, load_rules, parse_rules, rules_from_data, save_rules

TOML = r"""
# first match wins
[[rules]]
module_path = '.*attention\.self\.(query|value)'
rank = 8
alpha = 16
weight_qtype = "nf4"
group_size = 64

[[rules]]
module_path = '.*\.dense'
weight_qtype = "int8"
act_qtype = "int8"
"""

EXPECTED = [
    LoraRule(r".*attention\.self\.(query|value)", rank=8, alpha=16.0, weight_qtype="nf4", group_size=64),
    QuantRule(r".*\.dense", weight_qtype="int8", act_qtype="int8"),
]


def test_toml_tables_become_lora_and_quant_rules():
    rules = parse_rules(TOML, source="rules.toml")
    assert rules == EXPECTED
    assert [type(r) for r in rules] == [LoraRule, QuantRule]
    assert isinstance(rules[0].alpha, float)  # integers are accepted where the field is a float


def test_json_list_and_object_layouts_are_the_same_rules():
    tables = [{"module_path": r.module_path, **{k: v for k, v in r.to_dict().items() if v is not None}} for r in EXPECTED]
    assert parse_rules(json.dumps(tables), fmt="json") == EXPECTED
    assert parse_rules(json.dumps({"rules": tables}), fmt="json") == EXPECTED
    # JSON null means "the default None"
    assert parse_rules('[{"rank": 2, "alpha": null}]', fmt="json") == [LoraRule(rank=2)]


def test_module_path_defaults_to_everything_like_the_dataclass():
    assert parse_rules("[[rules]]\nrank = 4\n") == [LoraRule(".*", rank=4)]


def test_files_by_suffix_or_sniffed(tmp_path):
    (tmp_path / "r.toml").write_text(TOML)
    (tmp_path / "r.json").write_text(json.dumps({"rules": [{"module_path": "x", "rank": 2}]}))
    (tmp_path / "r.rules").write_text('[{"module_path": "x", "rank": 2}]')
    (tmp_path / "t.rules").write_text(TOML)
    assert load_rules(tmp_path / "r.toml") == EXPECTED
    assert load_rules(tmp_path / "r.json") == load_rules(tmp_path / "r.rules") == [LoraRule("x", rank=2)]
    assert load_rules(tmp_path / "t.rules") == EXPECTED


@pytest.mark.parametrize(
    ("text", "fmt", "message"),
    [
        ("[[rules]]\nmodule_path = 'x'\nrnak = 4", "toml", "r: rule #0: unknown field 'rnak' (did you mean 'rank'?)"),
        ("[[rules]]\nweight_symetric = true", "toml", "unknown field 'weight_symetric' (did you mean 'weight_symmetric'?)"),
        ("[[rules]]\nbanana = 1", "toml", "r: rule #0: unknown field 'banana'"),
        ("[[rules]]\nrank = 2\n[[rules]]\ndropout = 0.1", "toml", "r: rule #1: field 'dropout' is a LoRA field, but the rule has no 'rank'"),
        ("[[rules]]\nrank = 0", "toml", "r: rule #0 LoraRule(module_path='.*', rank=0): rank must be an int >= 1, got 0"),
        ("[[rules]]\nrank = 2.5", "toml", "r: rule #0: field 'rank' must be an integer, got float 2.5"),
        ("[[rules]]\nrank = true", "toml", "r: rule #0: field 'rank' must be an integer, got bool True"),
        ("[[rules]]\ngroup_size = '32'", "toml", "field 'group_size' must be an integer, got str '32'"),
        ("[[rules]]\nweight_symmetric = 1", "toml", "field 'weight_symmetric' must be a boolean, got int 1"),
        ("[[rules]]\nmodule_path = 3", "toml", "field 'module_path' must be a string, got int 3"),
        ("[[rules]]\nmodule_path = '('", "toml", "module_path is not a valid regular expression"),
        ("[[rules]]\nact_qtype = 'int4'", "toml", "act_qtype: qtype 'int4' cannot be used for activations"),
        ("[[rules]]\nweight_calibration = 'magic'", "toml", "weight_calibration must be one of"),
        ("rules = []", "toml", "r: the rules list is empty"),
        ("title = 'x'", "toml", "r: unknown top-level key 'title'"),
        ("", "toml", "r: no rules: expected [[rules]] tables"),
        ("rules = 3", "toml", "r: 'rules' must be a list of tables, got int"),
        ("rules = [1]", "toml", "r: rule #0: a rule must be a table of fields, got int"),
        ('[{"rank": null}]', "json", "r: rule #0: field 'rank' cannot be null/None; give a value"),
        ('[{"dropout": null, "rank": 2}]', "json", "field 'dropout' cannot be null/None; leave it out"),
        ("{", "json", "r: not valid JSON"),
        ("[[rules]", "toml", "r: not valid TOML"),
    ],
)
def test_validation_errors_name_the_file_the_rule_and_the_field(text, fmt, message):
    with pytest.raises(RuleError) as info:
        parse_rules(text, fmt=fmt, source="r")
    assert message in str(info.value)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(RuleError, match="rules file does not exist"):
        load_rules(tmp_path / "none.toml")
    with pytest.raises(RuleError, match="is a directory"):
        load_rules(tmp_path)


def test_rules_from_data_takes_parsed_objects():
    assert rules_from_data({"rules": [{"rank": 3}]}) == [LoraRule(rank=3)]


def test_save_rules_writes_atomically_in_the_suffix_format(tmp_path):
    save_rules(EXPECTED, tmp_path / "out.toml")
    save_rules(EXPECTED, tmp_path / "out.json")
    assert (tmp_path / "out.toml").read_text().startswith("[[rules]]\nmodule_path = '.*attention")
    assert json.loads((tmp_path / "out.json").read_text())["rules"][1] == {
        "module_path": r".*\.dense", "weight_qtype": "int8", "act_qtype": "int8"}
    assert load_rules(tmp_path / "out.toml") == load_rules(tmp_path / "out.json") == EXPECTED
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json", "out.toml"]  # no temporary files left


_paths = st.sampled_from([".*", r".*\.q_proj", "fc1|fc2", r"it's\.(a|b)", 'say "hi"', r"layer\.\d+"])
_quant_fields = {
    "weight_qtype": st.sampled_from([None, "int4", "uint4", "int8", "nf4"]),
    "group_size": st.sampled_from([None, 16, 32]),
    "weight_symmetric": st.sampled_from([None, True, False]),
    "weight_calibration": st.sampled_from(["absmax", "minmax", "mse"]),
    "act_qtype": st.sampled_from([None, "int8", "int16"]),
    "act_percentile": st.floats(min_value=0.5, max_value=100.0),
    "lora_act_qtype": st.sampled_from([None, "uint8"]),
}
_lora_fields = {
    "rank": st.integers(1, 64),
    "alpha": st.one_of(st.none(), st.floats(min_value=0.01, max_value=1e4)),
    "dropout": st.floats(min_value=0.0, max_value=0.9),
    "init": st.sampled_from(["kaiming", "gaussian"]),
    "use_rslora": st.booleans(),
}
_rules = st.lists(
    st.one_of(
        st.builds(QuantRule, _paths, **_quant_fields),
        st.builds(LoraRule, _paths, **_quant_fields, **_lora_fields),
    ),
    min_size=1,
    max_size=4,
)


@settings(max_examples=60, deadline=None)
@given(_rules, st.sampled_from(["toml", "json"]))
def test_dump_then_parse_round_trips(rules, fmt):
    assert parse_rules(dump_rules(rules, fmt), fmt=fmt) == rules
