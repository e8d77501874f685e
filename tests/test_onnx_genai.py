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
