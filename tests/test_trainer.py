"""The Hugging Face Trainer with default TrainingArguments trains, evaluates and saves a LoraModel
(no remove_unused_columns=False, label_names, accepts_loss_kwargs or Trainer subclass), with
gradient checkpointing, and its save_model directory loads in PEFT."""

from __future__ import annotations

import inspect

import pytest
import torch

import graphlora
from graphlora import LoraRule
from graphlora.data import pydoc_sentences, split
from toy_models import canonical_execution

SEQ = 32


def _encode(sentence: str) -> dict:
    """Bytes as token ids (vocab 256): real text without a tokenizer. ``text`` is a column the
    model does not take: the Trainer must drop it by the model's signature."""
    data = list(sentence.encode()[:SEQ])
    mask = [1] * len(data) + [0] * (SEQ - len(data))
    ids = torch.tensor(data + [0] * (SEQ - len(data)))
    mask = torch.tensor(mask)
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100), "text": sentence}


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        num_hidden_layers=2, hidden_size=48, intermediate_size=96, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=256, max_position_embeddings=64, pad_token_id=0)).eval()


@pytest.mark.slow
def test_trainer_trains_with_gradient_checkpointing_evaluates_and_saves_a_peft_adapter(tmp_path):
    import peft
    from transformers import PreTrainedModel, Trainer, TrainingArguments

    model = _llama()
    lm = graphlora.transform(model, [LoraRule(r".*(q|v)_proj", rank=8, alpha=16.0)], (torch.zeros(2, SEQ, dtype=torch.long),))
    train, held = split(pydoc_sentences()[:80], heldout=0.2)
    args = TrainingArguments(output_dir=str(tmp_path / "run"), learning_rate=3e-3, num_train_epochs=1,
                             per_device_train_batch_size=8, per_device_eval_batch_size=8,
                             gradient_checkpointing=True)
    trainer = Trainer(model=lm, args=args, train_dataset=[_encode(s) for s in train],
                      eval_dataset=[_encode(s) for s in held])
    assert trainer.label_names == ["labels"] and trainer.model_accepts_loss_kwargs
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    assert after < before, (before, after)
    assert lm.is_gradient_checkpointing  # the training argument reached the model

    out = tmp_path / "adapter"
    trainer.save_model(str(out))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in out.iterdir()}
    assert isinstance(lm, PreTrainedModel)

    batch = [_encode(s) for s in held[:4]]
    x = torch.stack([b["input_ids"] for b in batch])
    mask = torch.stack([b["attention_mask"] for b in batch])
    lm.eval()
    with torch.no_grad(), canonical_execution(lm):
        ours = lm(x, attention_mask=mask).logits
    loaded = peft.PeftModel.from_pretrained(model, str(out)).eval()
    with torch.no_grad():
        theirs = loaded(input_ids=x, attention_mask=mask, use_cache=False).logits
    keep = mask.bool()
    torch.testing.assert_close(ours[keep], theirs[keep], rtol=0, atol=1e-5)


def test_the_attributes_transformers_reads():
    from transformers import GenerationConfig

    model = _llama()
    lm = graphlora.transform(model, [LoraRule(r".*q_proj", rank=2)], (torch.zeros(2, 8, dtype=torch.long),))
    assert lm.config is model.config
    assert lm.device == torch.device("cpu") and lm.dtype == torch.float32
    assert isinstance(lm.generation_config, GenerationConfig)
    assert lm.main_input_name == "input_ids" and lm.loss_type == model.loss_type
    assert lm.can_generate() is True and callable(lm.generate)  # generate() over a static KV cache
    assert lm.warnings_issued == {} and lm.supports_gradient_checkpointing
    assert lm._get_name() == "LlamaForCausalLM"
    assert inspect.signature(type(lm).forward).parameters.keys() == inspect.signature(type(model).forward).parameters.keys()
    emb = lm.get_input_embeddings()
    assert emb.weight is lm.graph_module.get_parameter("model.embed_tokens.weight")
    ids = torch.tensor([[3, 5]])
    assert torch.equal(emb(ids), model.get_input_embeddings()(ids))
    assert lm.get_output_embeddings().weight is lm.graph_module.get_parameter("lm_head.weight")
    assert lm.save_pretrained("unused", is_main_process=False) is None
    with pytest.raises(graphlora.InputError, match="unexpected keyword argument"):
        lm.save_pretrained("unused", nonsense=True)
