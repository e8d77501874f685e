"""KV-cache decoder export (``export_onnx`` on a causal LM) and greedy generation with plain
onnxruntime (``graphlora.onnx.generate``), against transformers: the merged model's own greedy
``generate()`` (float bases) or the LoraModel's (quantized bases), token for token."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
import torch
from test_onnx_fixtures import randomize_lora
from toy_models import ids, tiny_llama

import graphlora
from graphlora.adapters import lora_param_name
from graphlora.errors import InputError
from graphlora.graph_utils import get_tensor
from graphlora.onnx import InferenceSession, export_onnx, generate



def tiny_qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=128)
    return Qwen2ForCausalLM(cfg).eval()


def tiny_gpt2_lm():
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=128, n_positions=128,
                     bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()  # Conv1D projections, lm_head tied to the embedding


def merged_hf(lm, base):
    """transformers' model with each active LoRA delta written into its weight (Conv1D: (in, out))."""
    model = copy.deepcopy(base)
    gm = lm.graph_module
    with torch.no_grad():
        for name in lm.active_adapters:
            for path, spec in lm.adapters[name].items():
                a = get_tensor(gm, lora_param_name(name, path, "lora_A")).float()
                b = get_tensor(gm, lora_param_name(name, path, "lora_B")).float()
                weight = model.get_submodule(path).weight
                delta = spec.scale * (b @ a)
                weight += delta if weight.shape == delta.shape else delta.t()
    return model


def prompts(vocab: int = 128):
    prompt = ids(2, 6, vocab, seed=11)
    mask = torch.ones_like(prompt)
    mask[1, :2] = 0  # left padding, as generate() batches prompts
    return prompt, mask


def check_io(path, layers: int, kv_heads: int, head_dim: int):
    graph = onnx.load(path, load_external_data=False).graph
    shape = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
             for v in list(graph.input) + list(graph.output)}
    assert [v.name for v in graph.input][:3] == ["input_ids", "attention_mask", "position_ids"]
    assert shape["past_key_values.0.key"] == ["batch", kv_heads, "past_sequence_length", head_dim]
    assert shape[f"present.{layers - 1}.value"] == ["batch", kv_heads, "total_sequence_length", head_dim]
    assert shape["logits"][:2] == ["batch", "sequence"]
    assert [v.name for v in graph.output] == ["logits"] + [
        f"present.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]


@pytest.mark.slow  # each decoder export traces and exports a transformers model
@pytest.mark.parametrize("arch, lora", [("llama", "branch"), ("qwen2", "merged"), ("gpt2", "inputs")])
def test_float_decoder_greedy_equals_transformers_merged(arch, lora, tmp_path):
    """GQA (Llama, Qwen2 with q/k/v biases) and GPT-2 (Conv1D, tied lm_head), each LoRA mode."""
    torch.manual_seed(0)
    base = {"llama": tiny_llama, "qwen2": tiny_qwen2, "gpt2": tiny_gpt2_lm}[arch]()
    target = r".*c_attn" if arch == "gpt2" else r".*(q|v|down)_proj"
    lm = graphlora.transform(base, graphlora.LoraRule(target, rank=4), (), {"input_ids": ids(2, 8, 128)})
    randomize_lora(lm, std=0.2, seed=1)
    path = tmp_path / "decoder.onnx"
    export = export_onnx(lm, path, lora=lora)
    kv_heads, head_dim = (2, 32) if arch == "gpt2" else (2, 16)
    check_io(path, 2, kv_heads, head_dim)
    assert export.inputs[3] == "past_key_values.0.key"
    prompt, mask = prompts()
    reference = merged_hf(lm, base)
    eos = base.config.eos_token_id
    with torch.no_grad():
        want = reference.generate(input_ids=prompt, attention_mask=mask, max_new_tokens=10, do_sample=False,
                                  pad_token_id=eos).numpy()
    got = generate(path, prompt, 10, attention_mask=mask, eos_token_id=eos, progress=False)
    np.testing.assert_array_equal(got, want)


@pytest.mark.slow
@pytest.mark.parametrize("qtype, lora", [("int4", "branch"), ("int8", "inputs")])
def test_quantized_base_decoder_greedy_equals_lora_model(qtype, lora, tmp_path):
    """A quantized base with its LoRA as a branch: what the LoraModel's generate() computes. (A
    merged export re-quantizes base + delta, which no PyTorch graph of the model computes.)"""
    torch.manual_seed(0)
    base = tiny_llama()
    rule = graphlora.LoraRule(r".*_proj", rank=4, weight_qtype=qtype, group_size=32)
    lm = graphlora.transform(base, rule, (), {"input_ids": ids(2, 8, 128)})
    randomize_lora(lm, std=0.2, seed=2)
    path = tmp_path / "q.onnx"
    export = export_onnx(lm, path, lora=lora)
    assert len(export.quantized_weights) == 14
    prompt, mask = prompts()
    eos = base.config.eos_token_id
    with torch.no_grad():
        want = lm.generate(input_ids=prompt, attention_mask=mask, max_new_tokens=10, do_sample=False,
                           pad_token_id=eos).numpy()
    sess = InferenceSession(path, "cpu", accuracy_level=0)
    got = generate(sess, prompt, 10, attention_mask=mask, eos_token_id=eos, progress=False)
    np.testing.assert_array_equal(got, want)


def test_generate_refuses_a_model_without_cache(tmp_path):
    from toy_models import MLP

    lm = graphlora.transform(MLP((8, 16, 4)).eval(), graphlora.LoraRule(".*", rank=2), (torch.randn(2, 8),))
    assert export_onnx(lm, tmp_path / "mlp.onnx", (torch.randn(2, 8),)).inputs == ["x"]  # not a causal LM
    with pytest.raises(InputError, match="not a KV-cache decoder"):
        generate(tmp_path / "mlp.onnx", np.zeros((1, 3), np.int64), 2, progress=False)
