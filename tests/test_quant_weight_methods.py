"""The weight-calibration registry: what each method is, and what stands in for it without data."""

import pytest
import torch

import graphlora
from graphlora.quant import weight_methods as wm


def test_the_methods_rules_can_name():
    # seqmse and adaround: issue 18 (AIMET's data-driven weight methods)
    assert wm.weight_method_names() == ("absmax", "minmax", "mse", "gptq", "seqmse", "adaround")
    assert [wm.weight_method(n).needs_data for n in wm.weight_method_names()] == [
        False, False, False, True, True, True]


@pytest.mark.parametrize(
    "name, symmetric, expected",
    [
        ("gptq", True, "mse"),  # needs data: its stand-in
        ("gptq", False, "mse"),  # mse fits either grid
        ("absmax", False, "minmax"),  # absmax cannot make an asymmetric grid
        ("minmax", True, "absmax"),
        ("mse", True, "mse"),
        ("minmax", False, "minmax"),
        (None, True, "absmax"),
        ("nonsense", False, "minmax"),
    ],
)
def test_data_free_stand_ins(name, symmetric, expected):
    assert wm.data_free_method(name, symmetric) == expected


def test_unknown_method_names_the_known_ones():
    with pytest.raises(graphlora.QuantizationError, match="known methods: absmax, minmax, mse, gptq, seqmse, adaround"):
        wm.weight_method("omniquant")
    with pytest.raises(graphlora.RuleError, match="weight_calibration must be one of"):
        rule = graphlora.QuantRule(".*", weight_qtype="int8", weight_calibration="omniquant")
        graphlora.transform(torch.nn.Linear(8, 8), [rule], (torch.randn(2, 8),))


def test_a_rule_reports_whether_it_needs_data():
    assert graphlora.QuantRule(weight_qtype="int4", weight_calibration="gptq").needs_calibration_data
    assert not graphlora.QuantRule(weight_calibration="gptq").needs_calibration_data  # no weight quantization
    assert not graphlora.QuantRule(weight_qtype="int4", weight_calibration="mse").needs_calibration_data


def test_a_stand_in_must_be_registered():
    with pytest.raises(graphlora.QuantizationError, match="stand-in 'missing' is not registered"):
        wm.register_weight_method(wm.WeightMethod("x", True, None, "missing", "test"))
    assert "x" not in wm.weight_method_names()
