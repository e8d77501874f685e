"""LoRA initialisations that start from the base weight: PiSSA, OLoRA (the base becomes the
residual) and LoftQ (base codes and factors chosen together), checked against real PEFT, against
the original model, and through saving."""

from __future__ import annotations

import copy

import pytest
import torch
from toy_models import ids, tiny_llama

import graphlora
from graphlora import LoraRule
from graphlora.errors import AdapterError, RuleError

TARGETS = r".*\.(q_proj|v_proj|down_proj)"
PEFT_TARGETS = ["q_proj", "v_proj", "down_proj"]
ATOL = 1e-5


def _inputs():
    return {"input_ids": ids(2, 6, vocab=128)}


@pytest.fixture(scope="module")
def base():
    torch.manual_seed(0)
    return tiny_llama()


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def _perturb(lm, std=0.05, seed=5):
    """Stand-in for training: move every factor, so B @ A differs from its start."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in lm.named_parameters():
            if ".lora_" in name:
                p.add_(std * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("init", ["pissa", "olora", "pissa_niter_4"])
def test_a_fresh_model_computes_the_original_function(base, init):
    inputs = _inputs()
    original = base.model.layers[0].self_attn.q_proj.weight.detach().clone()
    lm = graphlora.transform(base, [LoraRule(TARGETS, rank=4, alpha=8, init=init)], (), inputs)
    torch.testing.assert_close(_logits(lm, inputs), _logits(base, inputs), atol=ATOL, rtol=0)
    # the factors are not B = 0: the adapter holds the weight's leading subspace
    state = lm.lora_state_dict()
    assert float(state["model.layers.0.self_attn.q_proj.lora_B.weight"].abs().max()) > 0.01
    # the graph computes with the residual, and the caller's model keeps its own weight (the
    # residual replaced the graph's tensor, not the storage it shared with theirs)
    assert not torch.equal(lm.base_state_dict()["model.layers.0.self_attn.q_proj.weight"], original)
    assert torch.equal(base.model.layers[0].self_attn.q_proj.weight, original)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_factors_and_residual_equal_peft(base, init):
    from peft import LoraConfig, get_peft_model

    inputs = _inputs()
    peft = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=PEFT_TARGETS,
                                                          init_lora_weights=init))
    lm = graphlora.transform(copy.deepcopy(base), [LoraRule(TARGETS, rank=4, alpha=8, init=init)], (), inputs)
    ours = lm.lora_state_dict()
    residual = lm.base_state_dict()
    for path in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        layer = peft.get_submodule(f"base_model.model.{path}")
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        # singular/QR vectors are defined up to sign: compare the products, and the residual
        torch.testing.assert_close(ours[f"{path}.lora_B.weight"] @ ours[f"{path}.lora_A.weight"], b @ a,
                                   atol=ATOL, rtol=0)
        torch.testing.assert_close(residual[f"{path}.weight"], layer.base_layer.weight, atol=ATOL, rtol=0)
    torch.testing.assert_close(_logits(lm, inputs), _logits(peft, inputs), atol=ATOL, rtol=0)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_an_adapter_saved_alone_is_a_plain_lora_on_the_original_model(base, init, tmp_path):
    """PEFT users load an adapter file onto the original model: the save turns the trained
    factors into a rank-2r LoRA relative to the original weight (PEFT's conversion)."""
    import json

    from peft import PeftModel

    inputs = _inputs()
    lm = graphlora.transform(copy.deepcopy(base), [LoraRule(TARGETS, rank=4, alpha=8, init=init)], (), inputs)
    _perturb(lm)
    want = _logits(lm, inputs)
    lm.save_pretrained(tmp_path, only_save_adapters=True)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["init_lora_weights"]) == (8, 16, True)
    peft = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    torch.testing.assert_close(_logits(peft, inputs), want, atol=ATOL, rtol=0)
    again = graphlora.load_adapter(copy.deepcopy(base), tmp_path, example_kwargs=inputs)
    torch.testing.assert_close(_logits(again, inputs), want, atol=ATOL, rtol=0)


def test_base_and_adapters_save_the_residual_base(base, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    inputs = _inputs()
    lm = graphlora.transform(copy.deepcopy(base), [LoraRule(TARGETS, rank=4, alpha=8, init="pissa")], (), inputs)
    _perturb(lm)
    want = _logits(lm, inputs)
    result = lm.save_pretrained(tmp_path)
    residual_model = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    adapter_dir = tmp_path / result.adapters["default"]
    peft = PeftModel.from_pretrained(residual_model, adapter_dir).eval()
    torch.testing.assert_close(_logits(peft, inputs), want, atol=ATOL, rtol=0)


@pytest.mark.slow  # six transforms
@pytest.mark.parametrize("qtype", ["int4", "nf4"])
def test_loftq_brings_the_quantized_base_closer_to_the_float_weight(base, qtype):
    inputs = _inputs()
    path = "model.layers.0.mlp.down_proj"
    float_w = base.get_submodule(path).weight.detach()

    def error(init, iters=1):
        rule = LoraRule(TARGETS, rank=8, alpha=8, weight_qtype=qtype, group_size=32, init=init, loftq_iter=iters)
        lm = graphlora.transform(copy.deepcopy(base), [rule], (), inputs)
        state = lm.lora_state_dict()
        approx = lm.base_state_dict()[f"{path}.weight"].float()
        if init == "loftq":
            approx = approx + state[f"{path}.lora_B.weight"] @ state[f"{path}.lora_A.weight"]
        return float(torch.linalg.matrix_norm(float_w - approx))

    plain = error("kaiming")  # B = 0: the quantized base alone
    errors = [error("loftq", n) for n in (1, 2, 4)]
    assert errors[0] < plain
    assert errors[1] <= errors[0] + 1e-6 and errors[2] <= errors[1] + 1e-6


def test_a_loftq_adapter_alone_is_refused_without_writing(base, tmp_path):
    inputs = _inputs()
    rule = LoraRule(TARGETS, rank=4, alpha=8, weight_qtype="int4", group_size=32, init="loftq", loftq_iter=2)
    lm = graphlora.transform(copy.deepcopy(base), [rule], (), inputs)
    with pytest.raises(AdapterError, match="LoftQ's base .* save base \\+ adapters"):
        lm.save_pretrained(tmp_path / "alone", only_save_adapters=True)
    assert not (tmp_path / "alone").exists()


@pytest.mark.parametrize("rule, message", [
    (LoraRule(TARGETS, rank=4, init="svd"), "init must be one of"),
    (LoraRule(TARGETS, rank=4, init="pissa_niter_0"), "init must be one of"),
    (LoraRule(TARGETS, rank=4, init="loftq"), "set weight_qtype"),
    (LoraRule(TARGETS, rank=4, init="loftq", weight_qtype="int4", loftq_iter=0), "loftq_iter must be"),
    (LoraRule(TARGETS, rank=4, init="loftq", weight_qtype="int4", weight_calibration="gptq"), "data-driven"),
])
def test_bad_init_rules_are_refused(base, rule, message):
    with pytest.raises(RuleError, match=message):
        graphlora.transform(copy.deepcopy(base), [rule], (), _inputs())


def test_a_rank_above_the_weight_is_refused_naming_the_site(base):
    with pytest.raises(RuleError, match=r"rank 80 is larger than the matched site 'model\.layers\.0\.self_attn\.q_proj'"):
        graphlora.transform(copy.deepcopy(base), [LoraRule(r".*q_proj", rank=80, init="pissa")], (), _inputs())


def _peft_loftq_with(quantize_dequantize):
    """PEFT's own ``loftq_init``, run on the CPU with its bitsandbytes NF4 round trip replaced by
    ``quantize_dequantize``. PEFT 0.21 moves the weight to "cuda" (or "xpu") unconditionally and
    quantizes with bitsandbytes, so on a CPU-only machine its function runs only with those two
    swapped; everything else (the alternation, the SVD split, the last residual) is PEFT's code."""
    import inspect
    import types

    import peft.utils.loftq_utils as loftq_utils

    source = inspect.getsource(loftq_utils.loftq_init)
    device = 'compute_device = "xpu" if is_xpu_available() else "cuda"'
    assert device in source, "PEFT's loftq_init changed: update this test's adaptation"
    source = source.replace(device, 'compute_device = "cpu"').replace("import bitsandbytes as bnb", "pass")

    class Params4bit:
        def __init__(self, data, **kwargs):
            self.data, self.quant_state = data, None

        def to(self, device):
            return self

    fake_bnb = types.SimpleNamespace(nn=types.SimpleNamespace(Params4bit=Params4bit),
                                     functional=types.SimpleNamespace(
                                         dequantize_4bit=lambda data, state: quantize_dequantize(data)))
    namespace = dict(vars(loftq_utils), bnb=fake_bnb, is_bnb_available=lambda: True,
                     is_bnb_4bit_available=lambda: True)
    exec(compile(source, loftq_utils.__file__, "exec"), namespace)
    return namespace["loftq_init"]


@pytest.mark.parametrize("iterations", [1, 3])
def test_loftq_is_peft_s_algorithm_given_the_same_quantizer(iterations):
    from graphlora.quant import calibrate_weight

    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 48, bias=False)
    model = torch.nn.Sequential(layer).eval()
    rule = LoraRule("0", rank=4, alpha=4, weight_qtype="nf4", group_size=64, init="loftq", loftq_iter=iterations)
    lm = graphlora.transform(model, [rule], (torch.randn(2, 64),))

    def nf4_round_trip(w):  # the rule's quantizer: NF4, blocks of 64, fp16 absmax
        encoding = calibrate_weight(w, "nf4", block_size=64, scale_dtype=torch.float16)
        return encoding.dequantize(encoding.quantize(w), torch.float32)

    q, lora_a, lora_b = _peft_loftq_with(nf4_round_trip)(layer.weight.detach(), num_bits=4, reduced_rank=4,
                                                         num_iter=iterations)
    from graphlora.sites import tagged_sites

    base = tagged_sites(lm.graph_module)[0].param_value()
    factors = lm.lora_state_dict()
    torch.testing.assert_close(base, q, atol=1e-6, rtol=0)
    torch.testing.assert_close(factors["0.lora_B.weight"] @ factors["0.lora_A.weight"], lora_b @ lora_a,
                               atol=1e-5, rtol=0)
