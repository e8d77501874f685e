"""Passes check what they promise (``ensures``) in production, not only in tests: a pass whose
rewrite left the graph short of its promise fails at that pass, with a PassError naming it."""

import pytest
import torch

import graphlora
from graphlora.passes.insert_lora import RemoveLoraPass
from graphlora.passes.quantize_weights import QuantizeWeightsPass
from graphlora.passes.observers import FreezeObserversPass, InsertObserversPass
from graphlora.sites import tagged_sites


def _mlp():
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))


def test_quantize_weights_ensures_every_quantized_site_reads_its_dequantization():
    x = torch.randn(4, 16)
    lm = graphlora.transform(_mlp(), [graphlora.QuantRule(r"\d", weight_qtype="int8")], (x,))
    gm = lm.graph_module
    weight = tagged_sites(gm)[0].spec.weight_name
    claimed = QuantizeWeightsPass(storage="packed")
    claimed.quantized = [weight]
    claimed.ensures(gm)  # the real graph keeps the promise
    site = tagged_sites(gm)[0]
    with gm.graph.inserting_before(site.node):  # a rewrite that forgot the dequantize
        site.replace_weight_input(gm.graph.get_attr("0.bias"))
    with pytest.raises(graphlora.PassError, match=r"QuantizeWeightsPass\[packed\]: quantized weights not read"):
        claimed.ensures(gm)


def test_remove_lora_ensures_no_branch_node_is_left():
    x = torch.randn(4, 16)
    lm = graphlora.transform(_mlp(), [graphlora.LoraRule(r"\d", rank=2)], (x,))
    with pytest.raises(graphlora.PassError, match="RemoveLoraPass left 12 LoRA node"):
        RemoveLoraPass().ensures(lm.graph_module)  # not run: two branches of six nodes each (A and B reads, A, scale, B, add) are still there
    RemoveLoraPass()(lm.graph_module)  # run: the promise holds


def test_freeze_observers_ensures_no_observer_is_left():
    x = torch.randn(4, 16)
    lm = graphlora.transform(_mlp(), [graphlora.QuantRule(r"\d", act_qtype="uint8")], (x,))
    InsertObserversPass()(lm.graph_module)
    with pytest.raises(graphlora.PassError, match=r"FreezeObserversPass left 2 observer"):
        FreezeObserversPass().ensures(lm.graph_module)
