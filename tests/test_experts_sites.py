"""LoRA on the stacked expert weights of a mixture of experts (``site_kinds=("experts",)``),
against PEFT's ``target_parameters`` (``lora.ParamWrapper``), on transformers' Mixtral with both
of its CPU expert implementations: ``grouped_mm`` (tokens sorted by expert, one grouped GEMM) and
``batched_mm`` (``bmm`` of each token's gathered expert weight).

Expected values come from the original model, from the weight PEFT's layout describes written
out here (``W_e + s B_e A_e`` per expert), or from real PEFT; never from graphlora's code.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from test_onnx_fixtures import rel_err
from toy_models import canonical_execution, fill_peft_factors, ids

import graphlora
from graphlora import LoraRule
from graphlora.errors import ExportError, RuleError

ATOL = 1e-5
EXPERTS, RANK = 4, 2
IMPLEMENTATIONS = ["grouped_mm", "batched_mm"]


def _mixtral(implementation: str, seed: int = 0):
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    config = MixtralConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=64, num_local_experts=EXPERTS,
                           num_experts_per_tok=2, experts_implementation=implementation)
    return MixtralForCausalLM(config).eval()


def _inputs(seed: int = 0):
    return {"input_ids": ids(2, 6, vocab=64, seed=seed)}


RULES = [LoraRule(r".*experts\.(gate_up_proj|down_proj)", rank=RANK, alpha=4, site_kinds=("experts",)),
         LoraRule(r".*q_proj", rank=RANK, alpha=4)]


def _perturb(lm, seed: int = 1, std: float = 0.1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in lm.named_lora_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


def _with_deltas_written_out(model, lm, scale: float):
    """The model with each expert's weight replaced by ``W_e + s B_e A_e``, ``A_e`` being rows
    ``e*r .. e*r+r-1`` of the stored A and ``B_e`` the columns ``j*E + e`` of the stored B (PEFT's
    ParamWrapper layout), and q_proj by ``W + s B A``."""
    ref = copy.deepcopy(model)
    sd = lm.lora_state_dict()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            a, b = sd.get(f"{name}.lora_A.weight"), sd.get(f"{name}.lora_B.weight")
            path = name.rpartition(".")[0]
            if a is None and f"{path}.lora_A.weight" in sd and name.endswith("weight"):
                p.add_(sd[f"{path}.lora_B.weight"] @ sd[f"{path}.lora_A.weight"] * scale)
            elif a is not None:
                for e in range(EXPERTS):
                    a_e = a[e * RANK:(e + 1) * RANK]
                    b_e = b[:, [j * EXPERTS + e for j in range(RANK)]]
                    p[e] += b_e @ a_e * scale  # Mixtral's experts are (E, out, in)
    return ref


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_sites_closed_form_fresh_model_and_merge(implementation):
    model = _mixtral(implementation)
    lm = graphlora.transform(copy.deepcopy(model), RULES, (), _inputs())
    experts = [s for s in lm.sites if s.kind == "experts"]
    assert [(s.module_path, s.in_features, s.out_features) for s in experts[:2]] == [
        ("model.layers.0.mlp.experts.gate_up_proj", 32, 96), ("model.layers.0.mlp.experts.down_proj", 48, 32)]
    assert tuple(lm.lora_state_dict()["model.layers.0.mlp.experts.gate_up_proj.lora_A.weight"].shape) == (
        RANK * EXPERTS, 32)
    inputs = _inputs(seed=2)
    with torch.no_grad():
        torch.testing.assert_close(lm(**inputs).logits, model(**inputs).logits, atol=ATOL, rtol=0)
        _perturb(lm)
        got = lm(**inputs).logits
        want = _with_deltas_written_out(model, lm, scale=2.0)(**inputs).logits
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
        with canonical_execution(lm):
            merged = lm.merge()(**inputs)
    merged = merged.logits if hasattr(merged, "logits") else merged["logits"]
    torch.testing.assert_close(merged, got, atol=1e-4, rtol=0)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_adapters_load_in_peft_and_peft_adapters_load_here(tmp_path, implementation):
    from peft import LoraConfig, PeftModel, get_peft_model

    model = _mixtral(implementation)
    inputs = _inputs(seed=3)
    lm = graphlora.transform(copy.deepcopy(model), RULES, (), inputs)
    _perturb(lm)
    with torch.no_grad():
        want = lm(**inputs).logits
    lm.save_pretrained(tmp_path / "ours", only_save_adapters=True)
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["target_parameters"] == [f"model.layers.{i}.mlp.experts.{n}" for i in (0, 1)
                                           for n in ("down_proj", "gate_up_proj")]
    assert config["target_modules"] == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    peft = PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(peft(**inputs).logits, want, atol=ATOL, rtol=0)

    theirs = get_peft_model(copy.deepcopy(model), LoraConfig(
        r=RANK, lora_alpha=3, target_modules=["v_proj"], target_parameters=["experts.down_proj"]))
    fill_peft_factors(theirs, seed=4, std=0.1)
    with torch.no_grad():
        want = theirs(**inputs).logits
    theirs.save_pretrained(tmp_path / "peft")
    loaded = graphlora.load_adapter(copy.deepcopy(model), tmp_path / "peft", example_kwargs=inputs)
    assert sorted(s.module_path for s in loaded.sites if s.kind == "experts") == [
        "model.layers.0.mlp.experts.down_proj", "model.layers.1.mlp.experts.down_proj"]
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, want, atol=ATOL, rtol=0)


def test_two_parameters_of_one_module_keep_peft_s_nesting(tmp_path):
    """PEFT wraps a module's targeted parameters one inside the other, the first defined innermost:
    ``experts.base_layer.lora_A`` is gate_up_proj's, ``experts.lora_A`` down_proj's."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file

    model = _mixtral("grouped_mm")
    inputs = _inputs(seed=5)
    theirs = get_peft_model(copy.deepcopy(model), LoraConfig(
        r=RANK, lora_alpha=RANK, target_modules=[], target_parameters=["experts.gate_up_proj", "experts.down_proj"]))
    fill_peft_factors(theirs, seed=6, std=0.1)
    with torch.no_grad():
        want = theirs(**inputs).logits
    theirs.save_pretrained(tmp_path)
    keys = load_file(tmp_path / "adapter_model.safetensors")
    inner = "base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.weight"
    assert tuple(keys[inner].shape) == (RANK * EXPERTS, 32)  # gate_up_proj's input is the hidden size
    loaded = graphlora.load_adapter(copy.deepcopy(model), tmp_path, example_kwargs=inputs)
    torch.testing.assert_close(loaded.lora_state_dict()["model.layers.0.mlp.experts.gate_up_proj.lora_A.weight"],
                               keys[inner])
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, want, atol=ATOL, rtol=0)


def test_backward_reaches_the_factors_only_and_equals_peft():
    from peft import LoraConfig, get_peft_model

    model = _mixtral("grouped_mm")
    inputs = _inputs(seed=7)
    lm = graphlora.transform(copy.deepcopy(model), RULES[:1], (), inputs)
    _perturb(lm)
    peft = get_peft_model(copy.deepcopy(model), LoraConfig(
        r=RANK, lora_alpha=4, target_modules=[], target_parameters=["experts.gate_up_proj", "experts.down_proj"]))
    ours = lm.lora_state_dict()
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_" in name:
                owner = name.removeprefix("base_model.model.").split(".lora_")[0]
                param = "gate_up_proj" if owner.endswith(".base_layer") else "down_proj"
                owner = owner.removesuffix(".base_layer")
                p.copy_(ours[f"{owner}.{param}.{'lora_A' if '.lora_A.' in name else 'lora_B'}.weight"])
    lm(**inputs).logits.square().mean().backward()
    peft(**inputs).logits.square().mean().backward()
    assert {id(p) for p in lm.parameters() if p.requires_grad} == {id(p) for _, p in lm.named_lora_parameters()}
    grads = {}
    for name, p in peft.named_parameters():
        if "lora_" in name:
            owner = name.removeprefix("base_model.model.").split(".lora_")[0]
            param = "gate_up_proj" if owner.endswith(".base_layer") else "down_proj"
            grads[f"{owner.removesuffix('.base_layer')}.{param}.{'lora_A' if '.lora_A.' in name else 'lora_B'}.weight"] = p.grad
    for name, p in lm.named_lora_parameters():
        torch.testing.assert_close(p.grad, grads[name], atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("mode", ["merged", "branch"])
def test_onnx_export_matches_torch(tmp_path, implementation, mode):
    from graphlora.onnx import InferenceSession, export_onnx

    lm = graphlora.transform(_mixtral(implementation), RULES, (), _inputs())
    _perturb(lm)
    path = tmp_path / "m.onnx"
    export_onnx(lm, path, (), _inputs(), lora=mode, kv_cache=False)
    inputs = _inputs(seed=8)
    got = InferenceSession(path, "cpu", accuracy_level=0).run(None, {"input_ids": inputs["input_ids"].numpy()})[0]
    with canonical_execution(lm), torch.no_grad():
        want = lm(**inputs).logits
    assert rel_err(got, want.numpy()) < 1e-4  # test_onnx_export's float bound


def test_what_experts_sites_do_not_support_is_refused(tmp_path):
    from graphlora.onnx import export_onnx

    with pytest.raises(RuleError, match="LoRA dropout cannot apply to stacked expert weights"):
        graphlora.transform(_mixtral("grouped_mm"), [LoraRule(".*experts.*", rank=2, dropout=0.1,
                                                             site_kinds=("experts",))], (), _inputs())
    with pytest.raises(RuleError, match="weight_qtype is not supported on experts sites"):
        graphlora.transform(_mixtral("grouped_mm"), [LoraRule(".*experts.*", rank=2, weight_qtype="int8",
                                                             site_kinds=("experts",))], (), _inputs())
    lm = graphlora.transform(_mixtral("grouped_mm"), RULES[:1], (), _inputs())
    with pytest.raises(ExportError, match="is a site of kind 'experts'"):
        export_onnx(lm, tmp_path / "m.onnx", (), _inputs(), lora="inputs", kv_cache=False)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_one_pair_shared_by_every_expert(tmp_path, implementation):
    from peft import PeftModel

    model = _mixtral(implementation)
    rule = LoraRule(r".*experts\.(gate_up_proj|down_proj)", rank=RANK, alpha=4, site_kinds=("experts",),
                    share_experts=True)
    lm = graphlora.transform(copy.deepcopy(model), [rule], (), _inputs())
    sd = lm.lora_state_dict()
    assert sd["model.layers.0.mlp.experts.down_proj.lora_A.weight"].shape == (RANK, 48)
    _perturb(lm)
    sd = lm.lora_state_dict()
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if f"{name}.lora_A.weight" in sd:  # the same B A on every expert's (out, in) weight
                p += sd[f"{name}.lora_B.weight"] @ sd[f"{name}.lora_A.weight"] * 2.0
    inputs = _inputs(seed=9)
    with torch.no_grad():
        want = lm(**inputs).logits
        torch.testing.assert_close(want, ref(**inputs).logits, atol=ATOL, rtol=0)
        merged = lm.merge()(**inputs)
    merged = merged.logits if hasattr(merged, "logits") else merged["logits"]
    torch.testing.assert_close(merged, want, atol=1e-4, rtol=0)
    lm.save_pretrained(tmp_path, only_save_adapters=True)  # written as PEFT's pair per expert
    peft = PeftModel.from_pretrained(copy.deepcopy(model), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(peft(**inputs).logits, want, atol=ATOL, rtol=0)
    from graphlora.onnx import InferenceSession, export_onnx

    export_onnx(lm, tmp_path / "m.onnx", (), _inputs(), lora="branch", kv_cache=False)
    got = InferenceSession(tmp_path / "m.onnx", "cpu", accuracy_level=0).run(
        None, {"input_ids": inputs["input_ids"].numpy()})[0]
    assert rel_err(got, want.numpy()) < 1e-4
