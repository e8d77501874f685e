"""QLoRA of a model built on the meta device, its weights read (and quantized) from a checkpoint.

The reference is the same rules applied to the float model transformers loads from the same
checkpoint (``from_pretrained``): the meta path must give the same codes, scales, LoRA
initialisation, outputs and gradients, bit for bit, without the float model in memory.
"""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

import graphlora
from graphlora import LoraRule
from graphlora.errors import CheckpointMismatchError

pytestmark = pytest.mark.slow

NF4 = [LoraRule(r".*(q|v)_proj", rank=8, weight_qtype="nf4", group_size=64),
       LoraRule(r".*_proj", rank=4, weight_qtype="int8")]
EXAMPLE = (torch.zeros(2, 16, dtype=torch.long),)


def _llama(**kw):
    return LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=256, max_position_embeddings=128, pad_token_id=0, **kw)


def _qwen2(**kw):
    return Qwen2Config(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=256, max_position_embeddings=128, **kw)


def _save(tmp_path, cls, config, name="ckpt", dtype=torch.float32, **save_kw):
    torch.manual_seed(0)
    model = cls(config).to(dtype)
    with torch.no_grad():  # norms away from 1 so a norm left at its init would show
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    path = tmp_path / name
    model.save_pretrained(path, **save_kw)
    return path


def _meta(config):
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _pair(path, cls, config, rules=NF4):
    """(transform of the float model from_pretrained loads, transform of a meta model + checkpoint)."""
    torch.manual_seed(1)
    ref = graphlora.transform(cls.from_pretrained(path).eval(), rules, EXAMPLE, progress=False)
    torch.manual_seed(1)
    ours = graphlora.transform(_meta(config), rules, EXAMPLE, checkpoint=path, progress=False)
    return ref, ours


def _assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key
        assert sb[key].device.type == "cpu", key


def _train_step_grads(lm, ids):
    lm.train()
    lm.zero_grad()
    lm(ids, labels=ids).loss.backward()
    return {n: p.grad.clone() for n, p in lm.named_lora_parameters()}


def test_meta_model_from_checkpoint_equals_transform_of_the_loaded_float_model(tmp_path):
    config = _llama()
    path = _save(tmp_path, LlamaForCausalLM, config)
    ref, ours = _pair(path, LlamaForCausalLM, config)
    assert "LoadCheckpointPass" in [p.name for p in ours.pass_log]
    _assert_same_state(ref, ours)  # codes, scales, norms, embeddings, LoRA init: bit-identical
    codes = [k for k in ours.state_dict() if "graphlora_quant" in k]
    assert any(k.endswith("packed") for k in codes) and codes
    ids = torch.randint(1, 256, (3, 11))
    with torch.no_grad():
        assert torch.equal(ref(ids).logits, ours(ids).logits)
    g_ref, g_ours = _train_step_grads(ref, ids), _train_step_grads(ours, ids)
    assert g_ref.keys() == g_ours.keys() and g_ref
    for name in g_ref:
        assert torch.equal(g_ref[name], g_ours[name]), name
    # and the float path itself is transformers' model with the quantized weights: the base output
    # with LoRA B at zero is the float model run on dequantized weights (independent of graphlora's
    # meta path); ref == ours above makes it hold for the meta path too
    assert ours.memory_report()["bits_per_quantized_param"] < 9


def test_sharded_checkpoint_equals_unsharded(tmp_path):
    config = _qwen2()
    whole = _save(tmp_path, Qwen2ForCausalLM, config, "whole")
    shards = _save(tmp_path, Qwen2ForCausalLM, config, "shards", max_shard_size="40KB")
    index = json.loads((shards / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    torch.manual_seed(1)
    a = graphlora.from_pretrained(whole, NF4, EXAMPLE, progress=False)
    torch.manual_seed(1)
    b = graphlora.from_pretrained(shards, NF4, EXAMPLE, progress=False)
    _assert_same_state(a, b)
    ids = torch.randint(1, 256, (2, 9))
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)
        float_logits = Qwen2ForCausalLM.from_pretrained(whole).eval()(ids).logits
    # int8/nf4 base vs float: close, not equal (proves the weights are the checkpoint's)
    assert (a(ids).logits - float_logits).abs().max() < 0.5 * float_logits.abs().max()


def test_tied_embeddings_stay_one_tensor_and_a_quantized_lm_head_keeps_the_float_embedding(tmp_path):
    config = _llama(tie_word_embeddings=True)
    path = _save(tmp_path, LlamaForCausalLM, config, max_shard_size="60KB")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert "lm_head.weight" not in index["weight_map"]  # transformers leaves the tied copy out
    ref, ours = _pair(path, LlamaForCausalLM, config)
    _assert_same_state(ref, ours)
    gm = ours.graph_module
    assert gm.get_parameter("lm_head.weight") is gm.get_parameter("model.embed_tokens.weight")
    rules = NF4 + [LoraRule("lm_head", rank=4, weight_qtype="nf4", group_size=64)]
    ref, ours = _pair(path, LlamaForCausalLM, config, rules)
    _assert_same_state(ref, ours)
    ids = torch.randint(1, 256, (2, 7))
    with torch.no_grad():
        assert torch.equal(ref(ids).logits, ours(ids).logits)


def test_bad_checkpoints_are_refused_naming_the_tensor_and_file(tmp_path):
    config = _llama()
    path = _save(tmp_path, LlamaForCausalLM, config)
    file = path / "model.safetensors"
    tensors = load_file(file)

    def variant(name, change):
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text((path / "config.json").read_text())
        t = dict(tensors)
        change(t)
        save_file(t, d / "model.safetensors", metadata={"format": "pt"})
        return d

    key = "model.layers.1.mlp.down_proj.weight"
    missing = variant("missing", lambda t: t.pop(key))
    with pytest.raises(CheckpointMismatchError, match=rf"{key}") as err:
        graphlora.from_pretrained(missing, NF4, EXAMPLE, progress=False)
    assert str(missing) in str(err.value)
    shape = variant("shape", lambda t: t.update({key: t[key][:, :64].contiguous()}))
    with pytest.raises(CheckpointMismatchError, match=rf"{key}.*model.safetensors.*float32 \[64, 64\].*\[64, 128\]"):
        graphlora.from_pretrained(shape, NF4, EXAMPLE, progress=False)
    kind = variant("dtype", lambda t: t.update({key: t[key].to(torch.int32)}))
    with pytest.raises(CheckpointMismatchError, match=rf"{key}.*int32"):
        graphlora.from_pretrained(kind, NF4, EXAMPLE, progress=False)
    truncated = variant("truncated", lambda t: None)
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(graphlora.FileFormatError, match="model.safetensors"):
        graphlora.from_pretrained(truncated, NF4, EXAMPLE, progress=False)
    with pytest.raises(graphlora.InputError, match="checkpoint="):
        graphlora.transform(_meta(config), NF4, EXAMPLE, progress=False)


def test_a_bfloat16_checkpoint_is_cast_to_the_model_dtype_as_from_pretrained_does(tmp_path, capsys):
    config = _llama()
    path = _save(tmp_path, LlamaForCausalLM, config, dtype=torch.bfloat16)
    torch.manual_seed(1)
    ref = graphlora.transform(LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), NF4, EXAMPLE,
                              progress=False)
    torch.manual_seed(1)
    ours = graphlora.from_pretrained(path, NF4, EXAMPLE, dtype=torch.float32, progress=False)
    _assert_same_state(ref, ours)
    assert "loading checkpoint" not in capsys.readouterr().err  # progress=False: no bar


def test_load_quantized_into_a_meta_model_equals_into_a_real_model(tmp_path):
    config = _llama(tie_word_embeddings=True)
    path = _save(tmp_path, LlamaForCausalLM, config)
    torch.manual_seed(1)
    lm = graphlora.from_pretrained(path, NF4, EXAMPLE, progress=False)
    with torch.no_grad():
        for p in lm.lora_parameters():
            p.add_(0.01)
    lm.save_pretrained(tmp_path / "q", keep_quantized=True)
    real = graphlora.load_quantized(LlamaForCausalLM(config).eval(), tmp_path / "q", EXAMPLE, progress=False)
    meta = graphlora.load_quantized(_meta(config), tmp_path / "q", EXAMPLE, progress=False)
    _assert_same_state(real, meta)
    ids = torch.randint(1, 256, (2, 10))
    with torch.no_grad():
        assert torch.equal(real(ids).logits, meta(ids).logits)
        assert torch.equal(lm(ids).logits, meta(ids).logits)
    assert torch.equal(_train_step_grads(real, ids)[next(iter(dict(real.named_lora_parameters())))],
                       _train_step_grads(meta, ids)[next(iter(dict(real.named_lora_parameters())))])


def test_a_training_step_remakes_dequantized_weights_in_backward_with_the_same_gradients(monkeypatch):
    """autograd keeps a recipe, not the float weight, for each dequantized weight it saves; the
    gradients are those of the graph that keeps the weights (the same ops on the same codes)."""
    import graphlora.model as model_module

    torch.manual_seed(0)
    lm = graphlora.transform(LlamaForCausalLM(_llama()).eval(), NF4, EXAMPLE, progress=False)
    with torch.no_grad():
        for p in lm.lora_parameters():
            p.add_(0.01)
    ids = torch.randint(1, 256, (2, 12))  # 24 rows: no activation has a weight's shape
    shapes = {(s.out_features, s.in_features) for s in lm.sites}
    shapes |= {(b, a) for a, b in shapes}
    saved = []  # (is a weight's shape, kept as a recipe)
    hooks = torch.autograd.graph.saved_tensors_hooks

    class Watching(hooks):
        def __init__(self, pack, unpack):
            def watch(t):
                packed = pack(t)
                saved.append((tuple(t.shape) in shapes, not isinstance(packed, torch.Tensor)))
                return packed

            super().__init__(watch, unpack)

    monkeypatch.setattr(torch.autograd.graph, "saved_tensors_hooks", Watching)
    recomputed = _train_step_grads(lm, ids)
    weights = [recipe for weight_shaped, recipe in saved if weight_shaped]
    assert len(weights) >= 8 and all(weights)  # every dequantized weight autograd saves is remade
    monkeypatch.setattr(model_module, "has_quantized_weights", lambda gm: False)
    kept = _train_step_grads(lm, ids)
    assert recomputed.keys() == kept.keys()
    for name in kept:
        assert torch.equal(recomputed[name], kept[name]), name
