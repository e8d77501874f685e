"""Golden snapshots of every built-in pass on two reference models, and diffs that stay local.

The goldens under tests/snapshots/passes/ were reviewed by eye once; a torch upgrade or a change
to a pass shows up here as a readable graph diff. Rewrite them with
``pytest --graphlora-update-snapshots`` and review the file diff.
"""

import pytest
import torch

import graphlora
from graphlora import LoraRule, QuantRule
from graphlora.graph_utils import share_storage_copy
from graphlora.passes.gptq import GPTQPass
from graphlora.passes.insert_lora import RemoveLoraPass
from graphlora.passes.merge_lora import MergeLoraPass
from toy_models import MLP, ids, tiny_llama

SNAPSHOTS = "passes"


def _slug(name: str) -> str:
    return name.replace("[", "-").replace("]", "")


def _mlp():
    torch.manual_seed(0)
    return MLP(dims=(8, 16, 16, 4)).eval(), (torch.randn(4, 8),), {}


def _llama():
    torch.manual_seed(0)
    return tiny_llama(layers=2), (ids(vocab=128),), {"use_cache": False}


MODELS = {"mlp": (_mlp, r"layers\.[01]"), "llama": (_llama, r".*\.(q_proj|v_proj|down_proj)")}


@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_each_builtin_pass_golden(model_name, graph_snapshot):
    build, targets = MODELS[model_name]
    model, args, kwargs = build()
    rules = [LoraRule(targets, rank=2, weight_qtype="int4", group_size=8, act_qtype="uint8",
                      lora_act_qtype="int8", lora_weight_qtype="int8")]
    lm = graphlora.transform(model, rules, args, kwargs, record=True)
    graphlora.calibrate(lm, [(args, kwargs)], progress=False)
    seen = []
    for record in lm.pass_log:
        assert record.after is not None
        graph_snapshot(record.after, f"{SNAPSHOTS}/{model_name}.{len(seen):02d}.{_slug(record.name)}")
        seen.append(record.name)
    assert seen == [
        "MatchRulesPass",
        "QuantizeWeightsPass[packed]",
        "InsertLoraPass[default]",
        "InsertObserversPass[all]",
        "FreezeObserversPass",
        "QuantizeLoraWeightsPass",
    ]
    merged = share_storage_copy(lm.graph_module)
    MergeLoraPass(lm.adapters)(merged)
    merged.recompile()
    graph_snapshot(merged, f"{SNAPSHOTS}/{model_name}.{len(seen):02d}.MergeLoraPass")
    removed = share_storage_copy(lm.graph_module)
    RemoveLoraPass()(removed)
    graph_snapshot(removed, f"{SNAPSHOTS}/{model_name}.{len(seen) + 1:02d}.RemoveLoraPass")


def test_gptq_and_float_storage_goldens(graph_snapshot):
    model, args, _ = _mlp()
    flow = graphlora.qw_lora(model, [LoraRule(r"layers\.[01]", rank=2, weight_qtype="int4", group_size=8)], args, record=True)
    flow.quantize_base(method="gptq", calibration_data=[args, (torch.randn(4, 8),)], progress=False)
    names = [r.name for r in flow.model.pass_log]
    assert names[-3:] == ["RetagRulesPass", "QuantizeWeightsPass[float]", "GPTQPass"]
    for r in flow.model.pass_log[-3:]:
        graph_snapshot(r.after, f"{SNAPSHOTS}/mlp.qw.{_slug(r.name)}")


def _transform(rules):
    model, args, kwargs = _llama()
    torch.manual_seed(1)
    return graphlora.transform(model, rules, args, kwargs)


def test_changed_rank_names_only_the_changed_paths():
    base = [LoraRule(r".*layers\.1\.self_attn\.q_proj", rank=4), LoraRule(r".*\.(q_proj|v_proj)", rank=2)]
    before = _transform(base)
    after = _transform([LoraRule(r".*layers\.1\.self_attn\.q_proj", rank=8), base[1]])
    d = graphlora.diff(before, after)
    assert set(d.by_module_path()) == {"model.layers.1.self_attn.q_proj"}
    assert "model.layers.1.self_attn.q_proj" in str(d)


def test_extra_rule_names_only_the_new_paths():
    rules = [LoraRule(r".*\.q_proj", rank=2)]
    before = _transform(rules)
    after = _transform(rules + [LoraRule(r".*layers\.0\.mlp\.down_proj", rank=2)])
    d = graphlora.diff(before, after)
    assert set(d.by_module_path()) == {"model.layers.0.mlp.down_proj"}
    assert d.summary.startswith("+")
