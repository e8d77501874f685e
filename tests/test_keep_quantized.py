"""keep_quantized=True: the base is saved as its codes and comes back bit-exactly."""

import json

import pytest
import torch

import graphlora
from graphlora import LoraRule
from toy_models import MLP, ids, tiny_llama


def _random_lora(lm, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lm.lora_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.mark.parametrize("qtype", ["int4", "nf4", "int8"])
def test_separate_save_keeps_codes_and_reloads_exactly(tmp_path, qtype):
    torch.manual_seed(0)
    model = tiny_llama()
    x = ids(vocab=128)
    rules = [LoraRule(r".*_proj", rank=4, weight_qtype=qtype, group_size=32 if qtype != "int8" else None)]
    lm = graphlora.transform(model, rules, (x,), {"use_cache": False})
    _random_lora(lm)
    lm.save_pretrained(tmp_path / "q", keep_quantized=True)
    lm.save_pretrained(tmp_path / "f")  # dequantized, for comparison
    quant_bytes = sum(p.stat().st_size for p in (tmp_path / "q").glob("*.safetensors"))
    float_bytes = sum(p.stat().st_size for p in (tmp_path / "f").glob("*.safetensors"))
    assert quant_bytes < float_bytes
    config = json.loads((tmp_path / "q" / "graphlora_quantization.json").read_text())
    assert set(config["weights"]) == {s.weight_name for s in lm.sites}

    fresh = tiny_llama()  # different random weights: everything must come from the files
    back = graphlora.load_quantized(fresh, tmp_path / "q", (x,), {"use_cache": False})
    assert torch.equal(back(x).logits, lm(x).logits)
    for name, buf in lm.graph_module.named_buffers():
        if name.startswith("graphlora_quant"):
            assert torch.equal(buf, back.graph_module.get_buffer(name)), name


def test_merged_keep_quantized_requantizes(tmp_path):
    torch.manual_seed(0)
    model = MLP(dims=(32, 64, 8)).eval()
    x = torch.randn(4, 32)
    lm = graphlora.transform(model, [LoraRule(".*", rank=4, weight_qtype="int4", group_size=16)], (x,))
    _random_lora(lm)
    lm.save_pretrained(tmp_path / "m", save_adapters_separately=False, keep_quantized=True)
    back = graphlora.load_quantized(MLP(dims=(32, 64, 8)).eval(), tmp_path / "m", (x,))
    assert not (tmp_path / "m" / "adapters").exists()
    # re-quantizing the merged weights costs at most a quantization step: close, not equal
    ref = lm(x)
    assert ((back(x) - ref).norm() / ref.norm()) < 0.1
    assert back.memory_report()["quantized_params"] == 32 * 64 + 64 * 8


def test_not_a_quantized_save(tmp_path):
    lm = graphlora.transform(MLP(), [LoraRule(".*", rank=2)], (torch.randn(2, 8),))
    lm.save_pretrained(tmp_path / "f")
    with pytest.raises(graphlora.FileFormatError, match="not a keep_quantized save"):
        graphlora.load_quantized(MLP(), tmp_path / "f", (torch.randn(2, 8),))
    with pytest.raises(graphlora.InputError, match="adapters only"):
        lm.save_pretrained(tmp_path / "a", only_save_adapters=True, keep_quantized=True)


@pytest.mark.slow
def test_transformers_refuses_a_keep_quantized_save_which_load_quantized_reads(tmp_path):
    """from_pretrained must not load the float tensors of a keep_quantized save and initialise
    every quantized weight at random: it finds no float checkpoint and raises. AutoConfig still
    reads the config (which declares quant_method "graphlora"), so the architecture can be built
    from it for load_quantized."""
    import transformers

    torch.manual_seed(0)
    x = ids(vocab=128)
    rules = [LoraRule(r".*_proj", rank=4, weight_qtype="nf4", group_size=32)]
    lm = graphlora.transform(tiny_llama(layers=1), rules, (x,), {"use_cache": False})
    _random_lora(lm)
    result = lm.save_pretrained(tmp_path / "q", keep_quantized=True, max_shard_size="40KB")
    assert not any(f.startswith("model") for f in result.files), result.files
    assert "graphlora_quantized.safetensors.index.json" in result.files
    with pytest.raises(OSError, match="no file named model.safetensors"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "q")

    config = transformers.AutoConfig.from_pretrained(tmp_path / "q")
    assert config.quantization_config["quant_method"] == "graphlora"
    assert config.quantization_config["load_with"] == "graphlora.load_quantized"
    fresh = transformers.AutoModelForCausalLM.from_config(config).eval()
    back = graphlora.load_quantized(fresh, tmp_path / "q", (x,), {"use_cache": False})
    assert torch.equal(back(x).logits, lm(x).logits)

    # a float save of the reloaded model is an ordinary checkpoint again: no graphlora
    # quantization_config, no stale quantized files, and from_pretrained loads it
    back.save_pretrained(tmp_path / "q")
    written = json.loads((tmp_path / "q" / "config.json").read_text())
    assert "quantization_config" not in written
    assert not list((tmp_path / "q").glob("graphlora_quant*"))
    float_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "q").eval()
    with back.disable_adapter(), torch.no_grad():
        torch.testing.assert_close(float_model(x).logits, back(x).logits, rtol=0, atol=1e-5)


def test_load_quantized_reads_saves_named_model_safetensors(tmp_path):
    """Keep-quantized saves written before they had a file name of their own still load."""
    x = torch.randn(4, 32)
    lm = graphlora.transform(MLP(dims=(32, 16)).eval(), [LoraRule(".*", rank=2, weight_qtype="int4",
                                                                  group_size=16)], (x,))
    lm.save_pretrained(tmp_path / "q", keep_quantized=True)
    (tmp_path / "q" / "graphlora_quantized.safetensors").rename(tmp_path / "q" / "model.safetensors")
    back = graphlora.load_quantized(MLP(dims=(32, 16)).eval(), tmp_path / "q", (x,))
    assert torch.equal(back(x), lm(x))
