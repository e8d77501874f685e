"""onnxruntime-genai as a deployment target: ``write_genai`` writes a directory that
``onnxruntime_genai.Model`` generates with, token for token as the LoraModel's ``generate()``."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from test_onnx_fixtures import randomize_lora
from toy_models import ids, tiny_llama

import graphlora
from graphlora.onnx import runtime
from graphlora.onnx.genai import genai_config, write_genai


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    lm = graphlora.transform(tiny_llama(), graphlora.LoraRule(r".*(q|v)_proj", rank=4, weight_qtype="int4",
                                                              group_size=32), (), {"input_ids": ids(2, 8, 128)})
    return randomize_lora(lm, std=0.2, seed=3)


@pytest.mark.slow  # the fixture transforms a transformers model
def test_config_names_cuda_only_when_usable(llama, monkeypatch):
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    cpu = genai_config(llama)
    assert cpu["model"]["decoder"]["session_options"]["provider_options"] == []
    decoder = cpu["model"]["decoder"]
    assert (decoder["num_hidden_layers"], decoder["num_key_value_heads"], decoder["head_size"]) == (2, 2, 16)
    assert cpu["search"]["past_present_share_buffer"] is False
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(runtime, "cuda_device_count", lambda: 1)
    assert genai_config(llama)["model"]["decoder"]["session_options"]["provider_options"] == [{"cuda": {}}]


@pytest.mark.slow  # a decoder export
def test_onnxruntime_genai_generates_the_lora_models_tokens(llama, tmp_path):
    og = pytest.importorskip("onnxruntime_genai")
    write_genai(llama, tmp_path / "genai", lora="branch")
    config = json.loads((tmp_path / "genai" / "genai_config.json").read_text())
    assert config["model"]["decoder"]["filename"] == "model.onnx"
    model = og.Model(str(tmp_path / "genai"))
    prompt = ids(1, 6, 128, seed=21)
    new = 10
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=prompt.shape[1] + new, min_length=prompt.shape[1] + new)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt.numpy().astype(np.int32))
    while not generator.is_done():
        generator.generate_next_token()
    got = np.asarray(generator.get_sequence(0), dtype=np.int64)
    with torch.no_grad():
        want = llama.generate(input_ids=prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                              pad_token_id=0)[0].numpy()
    np.testing.assert_array_equal(got, want)


@pytest.mark.slow  # a decoder export
def test_the_generate_command_runs_a_genai_directory_with_plain_onnxruntime(llama, tmp_path, capsys):
    """``graphlora generate DIR --ids ...`` prints the LoraModel's greedy new tokens; bad input is
    one line on stderr with exit status 2."""
    from graphlora import cli

    write_genai(llama, tmp_path / "genai", lora="branch")
    prompt = ids(1, 6, 128, seed=22)
    with torch.no_grad():
        want = llama.generate(input_ids=prompt, max_new_tokens=5, do_sample=False, pad_token_id=0,
                              eos_token_id=llama.config.eos_token_id)[0, 6:].tolist()
    argv = ["generate", str(tmp_path / "genai"), "--ids", ",".join(map(str, prompt[0].tolist())),
            "--max-new-tokens", "5", "--json", "--no-progress"]
    assert cli.main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == {"ids": want, "text": None}
    assert cli.main(["generate", str(tmp_path / "genai"), "--prompt", "hello", "--no-progress"]) == 2
    assert "tokenizer" in capsys.readouterr().err
    assert cli.main(["generate", str(tmp_path / "nowhere"), "--ids", "1,2"]) == 2
    assert "does not exist" in capsys.readouterr().err


def _trained_tokenizer(vocab: int):
    """A BPE tokenizer laid out as Llama's ``tokenizer.json`` is (SentencePiece's "▁" put in by
    the normalizer, no pre-tokenizer, byte fallback), trained here on Python's own English docs:
    trained on words split at "▁" so that, as in SentencePiece, no token has "▁" inside it."""
    import json as json_

    from pydoc_data.topics import topics
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import LlamaTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="always")
    bpe.train_from_iterator(list(topics.values())[:100],
                            trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<unk>", "<s>", "</s>"],
                                                limit_alphabet=60, show_progress=False))
    layout = json_.loads(bpe.to_str())
    layout["pre_tokenizer"] = None
    bpe = Tokenizer.from_str(json_.dumps(layout))
    bpe.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    bpe.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    return LlamaTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.mark.slow  # a decoder export
def test_a_real_tokenizer_serves_onnxruntime_genai_and_the_generate_command(llama, tmp_path, capsys):
    """With ``tokenizer=``, the directory's tokenizer files are what onnxruntime-genai's own
    tokenizer reads (same ids as transformers'), and ``graphlora generate --prompt`` turns text
    into the LoraModel's greedy tokens and back into text."""
    og = pytest.importorskip("onnxruntime_genai")
    from graphlora import cli

    tokenizer = _trained_tokenizer(llama.config.vocab_size)
    directory = tmp_path / "genai"
    write_genai(llama, directory, lora="branch", tokenizer=tokenizer)
    assert (directory / "tokenizer.json").is_file() and (directory / "tokenizer_config.json").is_file()
    model = og.Model(str(directory))
    genai_tokenizer = og.Tokenizer(model)
    for text in ("the class of an object", "Assignment statements bind names", "a lambda expression"):
        assert list(map(int, genai_tokenizer.encode(text))) == tokenizer(text)["input_ids"]

    text = "the class of an object"
    prompt = torch.tensor([tokenizer(text)["input_ids"]])
    with torch.no_grad():
        want = llama.generate(input_ids=prompt, max_new_tokens=5, do_sample=False, pad_token_id=0,
                              eos_token_id=llama.config.eos_token_id)[0, prompt.shape[1]:].tolist()
    assert cli.main(["generate", str(directory), "--prompt", text, "--max-new-tokens", "5", "--json",
                     "--no-progress"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == {"ids": want, "text": tokenizer.decode(want, skip_special_tokens=True)}
