"""DoRA (``LoraRule(use_dora=True)``, PEFT's ``use_dora=True``) on linear sites.

Expected values come from a hand-written DoRA formula on the model's own weights, from the
original model, or from real PEFT; never from graphlora's DoRA code.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from test_onnx_fixtures import rel_err
from toy_models import canonical_execution, ids, tiny_llama

import graphlora
from graphlora import LoraRule
from graphlora.errors import ExportError, PassError

ATOL = 1e-5


def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 8, bias=False)).eval()


def _perturb(lm, seed: int = 1, std: float = 0.3) -> None:
    """Non-zero B, a random A and a magnitude away from the row norms (what training does)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in lm.named_lora_parameters():
            noise = torch.randn(p.shape, generator=g) * std
            p.copy_(p * (1 + noise) if "magnitude" in name else noise)


def _dora_reference(x, w, bias, a, b, scale, m):
    """DoRA written out from the paper/PEFT docs: (m / ||W + s B A||_row) * (x (W + s B A)^T) + bias."""
    full = w + scale * b @ a
    norm = torch.sqrt((full * full).sum(dim=1))
    y = (x @ full.t()) * (m / norm)
    return y if bias is None else y + bias


def _factors(lm, path):
    sd = lm.lora_state_dict()
    return (sd[f"{path}.lora_A.weight"], sd[f"{path}.lora_B.weight"],
            sd[f"{path}.lora_magnitude_vector.weight"])


def test_fresh_dora_model_equals_original_and_magnitude_is_row_norms():
    model = _mlp()
    x = torch.randn(5, 16)
    lm = graphlora.transform(model, [LoraRule("0|2", rank=3, use_dora=True)], (x,))
    torch.testing.assert_close(lm(x), model(x), atol=ATOL, rtol=0)
    for path in ("0", "2"):
        _, _, m = _factors(lm, path)
        expected = model.get_submodule(path).weight.detach().pow(2).sum(1).sqrt()
        torch.testing.assert_close(m, expected)


@pytest.mark.parametrize("fused", [True, False])
def test_random_factors_match_closed_form(fused):
    model = _mlp()
    x = torch.randn(7, 16)
    lm = graphlora.transform(model, [LoraRule("0|2", rank=3, alpha=6, use_dora=True)], (x,))
    _perturb(lm)
    lm.fused_execution = fused
    h = torch.relu(_dora_reference(x, model[0].weight.detach(), model[0].bias.detach(),
                                   *_factors(lm, "0")[:2], 2.0, _factors(lm, "0")[2]))
    a, b, m = _factors(lm, "2")
    expected = _dora_reference(h, model[2].weight.detach(), None, a, b, 2.0, m)
    torch.testing.assert_close(lm(x), expected, atol=ATOL, rtol=0)


def test_merge_equals_unmerged():
    model = _mlp()
    x = torch.randn(6, 16)
    lm = graphlora.transform(model, [LoraRule("0|2", rank=2, use_dora=True)], (x,))
    _perturb(lm)
    with canonical_execution(lm):
        y = lm(x)
    merged = lm.merge()
    torch.testing.assert_close(merged(x), y, atol=ATOL, rtol=0)
    a, b, m = _factors(lm, "0")
    w = model[0].weight.detach()
    full = w + b @ a
    expected = (m / torch.sqrt((full * full).sum(1)))[:, None] * full
    torch.testing.assert_close(merged.get_submodule("0").weight, expected, atol=ATOL, rtol=0)


def test_backward_trains_a_b_and_magnitude_only():
    model = _mlp()
    x = torch.randn(6, 16)
    lm = graphlora.transform(model, [LoraRule("0", rank=2, use_dora=True)], (x,))
    _perturb(lm)
    lm.train()
    lm(x).square().sum().backward()
    trainable = {n for n, p in lm.named_parameters() if p.requires_grad}
    assert len(trainable) == 3 and all(("lora_A" in n or "lora_B" in n or "lora_magnitude_vector" in n)
                                       for n in trainable)
    for name, p in lm.named_lora_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("qtype", ["int4", "nf4"])
def test_quantized_base_matches_closed_form_on_dequantized_weight(qtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 16)).eval()
    x = torch.randn(4, 64)
    lm = graphlora.transform(model, [LoraRule("0", rank=2, use_dora=True, weight_qtype=qtype,
                                              group_size=32)], (x,))
    w = lm.base_state_dict()["0.weight"].float()  # the dequantized weight the site computes with
    assert not torch.equal(w, model[0].weight)  # really quantized
    _, _, m0 = _factors(lm, "0")
    torch.testing.assert_close(m0, w.pow(2).sum(1).sqrt(), atol=1e-5, rtol=1e-5)
    _perturb(lm)
    a, b, m = _factors(lm, "0")
    expected = _dora_reference(x, w, model[0].bias.detach(), a, b, 1.0, m)
    torch.testing.assert_close(lm(x), expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(lm.merge()(x), expected, atol=ATOL, rtol=0)


def test_dropout_in_training_matches_peft():
    """PEFT rescales the base applied to the dropped-out input while training with dropout."""
    from peft import LoraConfig, get_peft_model

    model = _mlp()
    x = torch.randn(6, 16)
    lm = graphlora.transform(model, [LoraRule("0", rank=2, dropout=0.5, use_dora=True)], (x,))
    _perturb(lm)
    peft = get_peft_model(_mlp(), LoraConfig(r=2, lora_alpha=2, target_modules=["0"], use_dora=True,
                                             lora_dropout=0.5))
    result = peft.load_state_dict({f"base_model.model.{k.replace('.weight', '.default.weight')}": v
                                   for k, v in lm.lora_state_dict().items()}, strict=False)
    assert not result.unexpected_keys
    lm.train(); peft.train()
    torch.manual_seed(5); got = lm(x)
    torch.manual_seed(5); want = peft(x)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def _llama_inputs():
    return {"input_ids": ids(2, 6, vocab=128)}


def test_peft_dora_adapter_loads_and_matches(tmp_path):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = tiny_llama()
    peft = get_peft_model(tiny_llama_copy(base), LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_" in n:
                p.copy_(p * (1 + 0.2 * torch.randn(p.shape, generator=g)) if "magnitude" in n
                        else 0.1 * torch.randn(p.shape, generator=g))
    peft.save_pretrained(tmp_path)
    inputs = _llama_inputs()
    with torch.no_grad():
        want = peft(**inputs).logits
    lm = graphlora.load_adapter(base, tmp_path, example_kwargs=inputs)
    assert all(spec.use_dora for spec in lm.adapters["default"].values())
    with torch.no_grad():
        got = lm(**inputs).logits
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def tiny_llama_copy(model):
    import copy
    return copy.deepcopy(model)


def test_graphlora_dora_adapter_loads_in_peft(tmp_path):
    import json

    from peft import PeftModel
    from safetensors.torch import load_file

    torch.manual_seed(0)
    base = tiny_llama()
    inputs = _llama_inputs()
    lm = graphlora.transform(tiny_llama_copy(base), [LoraRule(r".*\.(q_proj|o_proj|up_proj)", rank=4,
                                                              alpha=4, use_dora=True)], (), inputs)
    _perturb(lm, std=0.1)
    with torch.no_grad():
        want = lm(**inputs).logits
    lm.save_pretrained(tmp_path, only_save_adapters=True)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["use_dora"] is True
    keys = load_file(tmp_path / "adapter_model.safetensors")
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector" in keys
    pristine = tiny_llama_copy(base)  # PeftModel wraps the modules of the model it is given
    peft = PeftModel.from_pretrained(base, tmp_path).eval()
    with torch.no_grad():
        got = peft(**inputs).logits
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    again = graphlora.load_adapter(pristine, tmp_path, example_kwargs=inputs)
    with torch.no_grad():
        torch.testing.assert_close(again(**inputs).logits, want, atol=ATOL, rtol=0)


def test_fused_execution_on_llama_computes_the_same():
    torch.manual_seed(0)
    inputs = _llama_inputs()
    lm = graphlora.transform(tiny_llama(), [LoraRule(r".*_proj", rank=2, use_dora=True)], (), inputs)
    _perturb(lm, std=0.1)
    with torch.no_grad():
        fused = lm(**inputs).logits
        with canonical_execution(lm):
            plain = lm(**inputs).logits
        merged = lm.merge()(**inputs)
    merged = merged.logits if hasattr(merged, "logits") else merged["logits"]
    torch.testing.assert_close(fused, plain, atol=ATOL, rtol=0)
    torch.testing.assert_close(merged, plain, atol=1e-4, rtol=0)


@pytest.mark.parametrize("mode", ["merged", "branch"])
def test_onnx_export_matches_torch(tmp_path, mode):
    from graphlora.onnx import InferenceSession, export_onnx

    model = _mlp()
    x = torch.randn(5, 16)
    lm = graphlora.transform(model, [LoraRule("0|2", rank=2, use_dora=True)], (x,))
    _perturb(lm)
    path = tmp_path / "m.onnx"
    export_onnx(lm, path, (x,), lora=mode)
    x2 = torch.randn(9, 16)
    got = InferenceSession(path, "cpu", accuracy_level=0).run(None, {"input": x2.numpy()})[0]
    with canonical_execution(lm), torch.no_grad():
        ref = lm(x2)
    assert rel_err(got, ref.numpy()) < 1e-4  # test_onnx_export's float bound


def test_onnx_inputs_mode_refuses_dora(tmp_path):
    from graphlora.onnx import export_onnx

    x = torch.randn(5, 16)
    lm = graphlora.transform(_mlp(), [LoraRule("0", rank=2, use_dora=True)], (x,))
    with pytest.raises(ExportError, match="DoRA"):
        export_onnx(lm, tmp_path / "m.onnx", (x,), lora="inputs")


def test_rules_file_accepts_use_dora(tmp_path):
    from graphlora.errors import RuleError

    path = tmp_path / "rules.toml"
    path.write_text('[[rules]]\nmodule_path = "0"\nrank = 2\nuse_dora = true\n')
    from graphlora.rules_file import load_rules

    rules = load_rules(path)
    assert rules[0].use_dora is True
    with pytest.raises(RuleError, match="use_dora"):
        graphlora.transform(_mlp(), [LoraRule("0", rank=2, use_dora="yes")], (torch.randn(2, 16),))


def test_merging_dora_with_a_second_adapter_at_one_site_is_refused():
    x = torch.randn(3, 16)
    lm = graphlora.transform(_mlp(), [LoraRule("0", rank=2, use_dora=True)], (x,))
    lm.add_adapter("other", {"0": graphlora.adapters.LoraSpec(rank=2, alpha=2)})
    with pytest.raises(PassError, match="DoRA"):
        lm.merge(["default", "other"])


def test_gpt2_conv1d_sites_match_peft_and_merge(tmp_path):
    """``Conv1D`` stores its weight (in, out) (PEFT's ``fan_in_fan_out``): the norm is still taken
    per output feature, and the adapter PEFT loads and the merged model compute graphlora's function."""
    import copy

    from peft import PeftModel
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=64,
                                      bos_token_id=0, eos_token_id=0)).eval()
    inputs = {"input_ids": ids(2, 6, vocab=100)}
    lm = graphlora.transform(copy.deepcopy(base), [LoraRule(r".*\.(c_attn|c_fc|c_proj)", rank=4, alpha=8,
                                                            use_dora=True)], (), inputs)
    with torch.no_grad():
        torch.testing.assert_close(lm(**inputs).logits, base(**inputs).logits, atol=ATOL, rtol=0)
    _perturb(lm, std=0.1)
    with torch.no_grad():
        want = lm(**inputs).logits
        assert float((want - base(**inputs).logits).abs().max()) > 0.05  # the adapter moved the output
    lm.save_pretrained(tmp_path, only_save_adapters=True)
    peft = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    merged = lm.merge()
    with torch.no_grad():
        torch.testing.assert_close(peft(**inputs).logits, want, atol=ATOL, rtol=0)
        torch.testing.assert_close(merged(**inputs).logits, want, atol=1e-4, rtol=0)
