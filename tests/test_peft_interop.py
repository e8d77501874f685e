"""graphlora <-> PEFT / transformers with the real libraries.

The pretrained MiniLM sentence encoder (nn.Linear sites) on real sentences, and GPT-2 from a small
config (transformers Conv1D sites, PEFT's fan_in_fan_out): adapters saved by graphlora load in
PEFT and with transformers' load_adapter; adapters saved by PEFT load in graphlora; merged and
base + adapters saves load with from_pretrained; rank/alpha patterns survive a round trip. Every
comparison is on the model outputs, max abs diff <= 1e-5.

graphlora's side runs its canonical graph (``fused_execution = False``): op for op what PEFT
computes. The default execution fuses each linear with its LoRA branch (one GEMM with the
effective weight) and q/k/v into one GEMM; that reorders float sums, which six BERT layers amplify
to ~3e-5 on outputs of magnitude ~6, so it is held to a bound relative to the output instead
(test_fused_execution_agrees_with_peft).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

import graphlora
from graphlora import LoraRule, meta
from toy_models import canonical_execution
from toy_models import ids

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

ATOL = 1e-5
MINILM_RULES = [
    LoraRule(r"encoder\.layer\.\d+\.attention\.self\.query", rank=4, alpha=8.0),
    LoraRule(r"encoder\.layer\.\d+\.attention\.self\.value", rank=8, alpha=4.0),
    LoraRule(r"encoder\.layer\.[0-2]\.output\.dense", rank=2, alpha=2.0, use_rslora=True),
]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread: on the 2-core CI machine, shared with other jobs, two OpenMP threads
    fighting a busy core make each forward ~30x slower. Restored after the module."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _randomize(named_params, seed: int, std: float = 0.05) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in named_params:
            p.copy_(torch.randn(p.shape, generator=g) * std)


def _hidden(out) -> torch.Tensor:
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def _close(a, b) -> None:
    torch.testing.assert_close(_hidden(a), _hidden(b), rtol=0, atol=ATOL)


def _close_to_scale(a, b) -> None:
    """Within 1e-5 of ``b``'s largest value: for outputs computed with the LoRA delta folded into
    the weight, whose rounding differs from the unmerged sum. PEFT's own ``merge_and_unload`` on
    this MiniLM moves the output by 3.3e-5 (max |output| ~6), so an absolute 1e-5 would fail PEFT."""
    a, b = _hidden(a), _hidden(b)
    assert (a - b).abs().max().item() <= 1e-5 * b.abs().max().item()


# ------------------------------------------------------------------------------ MiniLM fixtures


@pytest.fixture(scope="module")
def batch(minilm, sentences):
    _, tokenizer = minilm
    enc = tokenizer(sentences[:3], padding=True, truncation=True, max_length=24, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


@pytest.fixture(scope="module")
def base(minilm):
    """A fresh copy of the pretrained encoder per use: PEFT and transformers modify in place."""
    model, _ = minilm
    return lambda: copy.deepcopy(model).eval()


@pytest.fixture(scope="module")
def lora(minilm, batch):
    model, _ = minilm
    lm = graphlora.transform(
        model, MINILM_RULES, (batch["input_ids"],), {"attention_mask": batch["attention_mask"]}
    )
    _randomize(lm.named_lora_parameters(), seed=1)
    return lm


@pytest.fixture(scope="module")
def expected(lora, batch):
    with torch.no_grad(), canonical_execution(lora):
        return lora(batch["input_ids"], attention_mask=batch["attention_mask"])


@pytest.fixture(scope="module")
def saves(lora, tmp_path_factory):
    root = tmp_path_factory.mktemp("minilm")
    lora.save_pretrained(root / "adapters", only_save_adapters=True)
    lora.save_pretrained(root / "separate")
    lora.save_pretrained(root / "merged", save_adapters_separately=False)
    return root


def _graphlora_load(model, path, batch, **kw):
    return graphlora.load_adapter(
        model, path, example_args=(batch["input_ids"],),
        example_kwargs={"attention_mask": batch["attention_mask"]}, **kw,
    )


def _run_graphlora(lm, batch):
    with torch.no_grad(), canonical_execution(lm):
        return lm(batch["input_ids"], attention_mask=batch["attention_mask"])


def _run_hf(model, batch):
    with torch.no_grad():
        return model(**batch)


# ------------------------------------------------------------------------------ graphlora -> HF


def test_adapter_config_describes_the_rules(saves, lora):
    config = json.loads((saves / "adapters" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["bias"] == "none"
    assert config["target_modules"] == sorted(lora.adapters["default"])
    assert config["base_model_name_or_path"] == lora.source["name_or_path"]
    assert config["task_type"] == "FEATURE_EXTRACTION"
    assert config["fan_in_fan_out"] is False


def test_peft_loads_graphlora_adapter(saves, base, batch, expected, lora):
    model = peft.PeftModel.from_pretrained(base(), saves / "adapters").eval()
    _close(_run_hf(model, batch), expected)
    # every module got its own rank and scale (rank_pattern / alpha_pattern, rsLoRA folded)
    for path, spec in lora.adapters["default"].items():
        layer = model.base_model.model.get_submodule(path)
        assert layer.r["default"] == spec.rank
        assert layer.scaling["default"] == pytest.approx(spec.scale)


def test_fused_execution_agrees_with_peft(saves, base, batch, lora):
    """The default (fused) execution against PEFT: within 1e-5 of the output's largest value."""
    model = peft.PeftModel.from_pretrained(base(), saves / "adapters").eval()
    with torch.no_grad():
        fused = lora(batch["input_ids"], attention_mask=batch["attention_mask"])
    _close_to_scale(fused, _run_hf(model, batch))


def test_transformers_load_adapter_reads_graphlora_adapter(saves, base, batch, expected):
    model = base()
    model.load_adapter(str(saves / "adapters"))
    _close(_run_hf(model, batch), expected)


def test_merged_save_loads_with_from_pretrained(saves, batch, expected):
    config = json.loads((saves / "merged" / "config.json").read_text())
    assert config["architectures"] == ["BertModel"]
    model = transformers.AutoModel.from_pretrained(saves / "merged").eval()
    _close_to_scale(_run_hf(model, batch), expected)


def test_base_and_adapters_reload(saves, minilm, batch, expected):
    root = saves / "separate"
    assert sorted(p.name for p in root.iterdir()) == ["adapters", "config.json", "model.safetensors"]
    reloaded = transformers.AutoModel.from_pretrained(root).eval()
    _close(_run_hf(reloaded, batch), _run_hf(minilm[0], batch))  # the base, untouched
    with_peft = peft.PeftModel.from_pretrained(reloaded, root / "adapters").eval()
    _close(_run_hf(with_peft, batch), expected)


# ------------------------------------------------------------------------------ HF -> graphlora


@pytest.fixture(scope="module")
def peft_adapter(base, tmp_path_factory, batch):
    """An adapter made and saved by PEFT itself, B non-zero, and PEFT's output with it."""
    config = peft.LoraConfig(
        r=4, lora_alpha=16, target_modules=["query", "value", "intermediate.dense"], lora_dropout=0.1
    )
    model = peft.get_peft_model(base(), config).eval()
    _randomize(((n, p) for n, p in model.named_parameters() if "lora_" in n), seed=2)
    path = tmp_path_factory.mktemp("peft") / "adapter"
    model.save_pretrained(path)
    return path, _run_hf(model, batch)


def test_graphlora_loads_peft_adapter_then_its_own_on_sites_no_rule_matched(
    peft_adapter, base, batch, saves, expected, minilm
):
    """PEFT's adapter into a plain model (traced for it), then graphlora's own adapter as a second
    one: its `output.dense` targets are linear layers no rule of this LoraModel matched. Both can
    be switched to and disabled, as in PEFT."""
    path, reference = peft_adapter
    lm = _graphlora_load(base(), path, batch)
    assert lm.active_adapters == ["default"] and len(lm.adapters["default"]) == 18
    _close(_run_graphlora(lm, batch), reference)
    graphlora.load_adapter(lm, saves / "adapters", adapter_name="ours")
    assert lm.active_adapters == ["default"]  # loading a second adapter does not switch to it
    lm.set_adapter("ours")
    _close(_run_graphlora(lm, batch), expected)
    lm.set_adapter("default")
    _close(_run_graphlora(lm, batch), reference)
    with lm.disable_adapter():
        _close(_run_graphlora(lm, batch), _run_hf(minilm[0], batch))
    lm.disable_adapters()
    _close(_run_graphlora(lm, batch), _run_hf(minilm[0], batch))


def test_rank_and_alpha_patterns_round_trip_through_peft(saves, base, batch, expected, lora, tmp_path):
    """graphlora (3 rules, 3 ranks) -> PEFT -> saved by PEFT -> graphlora: same specs, outputs."""
    model = peft.PeftModel.from_pretrained(base(), saves / "adapters").eval()
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert set(saved["rank_pattern"].values()) | {saved["r"]} == {2, 4, 8}
    graphlora.load_adapter(lora, tmp_path, adapter_name="round_trip", activate=True)
    try:
        ours = lora.adapters["default"]
        theirs = lora.adapters["round_trip"]
        assert {p: s.rank for p, s in theirs.items()} == {p: s.rank for p, s in ours.items()}
        for p in ours:
            assert theirs[p].scale == pytest.approx(ours[p].scale)
        _close(_run_graphlora(lora, batch), expected)
    finally:
        lora.delete_adapter("round_trip")
        lora.set_adapter("default")


# ------------------------------------------------------------------------------ GPT-2 (Conv1D)


@pytest.fixture(scope="module")
def gpt2():
    cfg = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=64, bos_token_id=0, eos_token_id=0
    )
    torch.manual_seed(0)
    model = transformers.GPT2Model(cfg).eval()
    x = ids()
    lm = graphlora.transform(
        model,
        [LoraRule(r".*attn\.c_attn", rank=4, alpha=8.0), LoraRule(r".*mlp\.c_(fc|proj)", rank=2)],
        (x,),
        {"use_cache": False},
    )
    _randomize(lm.named_lora_parameters(), seed=3, std=0.2)
    with torch.no_grad(), canonical_execution(lm):
        out = lm(x, use_cache=False)
    return model, lm, x, out


def test_gpt2_conv1d_adapter_in_peft_and_back(gpt2, tmp_path):
    model, lm, x, expected = gpt2
    lm.save_pretrained(tmp_path / "a", only_save_adapters=True)
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is True and config["rank_pattern"]
    with torch.no_grad():
        peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "a").eval()
        _close(peft_model(x, use_cache=False), expected)
    back = graphlora.load_adapter(
        copy.deepcopy(model), tmp_path / "a", example_args=(x,), example_kwargs={"use_cache": False}
    )
    with torch.no_grad(), canonical_execution(back):
        _close(back(x, use_cache=False), expected)


def test_gpt2_merged_sharded_save_loads_with_from_pretrained(gpt2, tmp_path):
    model, lm, x, expected = gpt2
    result = lm.save_pretrained(tmp_path, save_adapters_separately=False, max_shard_size="40KB")
    assert "model.safetensors.index.json" in result.files and len(result.files) > 3
    merged = transformers.AutoModel.from_pretrained(tmp_path).eval()
    assert type(merged).__name__ == "GPT2Model"
    with torch.no_grad():
        _close(merged(x, use_cache=False), expected)


def test_merged_lora_on_a_tied_lm_head_unties_it_in_config(tmp_path):
    """LoRA on an lm_head tied to the embeddings: the merged head differs from the embedding, so
    the checkpoint must not be re-tied by from_pretrained."""
    from toy_models import tiny_llama

    model = tiny_llama(layers=1, tie=True)
    x = ids(vocab=128)
    lm = graphlora.transform(model, [LoraRule(r"lm_head|.*q_proj", rank=4, alpha=8.0)], (x,), {"use_cache": False})
    _randomize(lm.named_lora_parameters(), seed=4, std=0.1)
    with torch.no_grad(), canonical_execution(lm):
        expected = lm(x, use_cache=False).logits
    with pytest.warns(graphlora.GraphloraWarning, match="tie_word_embeddings=false"):
        lm.save_pretrained(tmp_path, save_adapters_separately=False)
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert merged.config.tie_word_embeddings is False
    with torch.no_grad():
        torch.testing.assert_close(merged(x, use_cache=False).logits, expected, rtol=0, atol=ATOL)


def _safetensors_keys(directory, name="model.safetensors") -> list[str]:
    from safetensors import safe_open

    with safe_open(str(directory / name), "pt") as f:
        return sorted(f.keys())


@pytest.mark.slow
def test_tied_lm_head_is_saved_once_like_transformers(tmp_path):
    """Llama with tie_word_embeddings: transformers' save_pretrained leaves lm_head.weight out
    (from_pretrained ties it again); graphlora's base, merged and keep-quantized saves do too
    when LoRA did not change the head, and from_pretrained loads them equal and tied."""
    from toy_models import tiny_llama

    model = tiny_llama(layers=1, tie=True)
    x = ids(vocab=128)
    model.save_pretrained(tmp_path / "hf")  # the peer's layout
    expected_keys = _safetensors_keys(tmp_path / "hf")
    assert "lm_head.weight" not in expected_keys
    lm = graphlora.transform(model, [LoraRule(r".*q_proj", rank=4, alpha=8.0)], (x,), {"use_cache": False})
    _randomize(lm.named_lora_parameters(), seed=5, std=0.1)

    lm.save_pretrained(tmp_path / "base")
    assert _safetensors_keys(tmp_path / "base") == expected_keys
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    assert base.lm_head.weight.data_ptr() == base.model.embed_tokens.weight.data_ptr()
    for key, value in model.state_dict().items():
        assert torch.equal(base.state_dict()[key], value), key

    lm.save_pretrained(tmp_path / "merged", save_adapters_separately=False)
    assert _safetensors_keys(tmp_path / "merged") == expected_keys
    assert json.loads((tmp_path / "merged" / "config.json").read_text()).get("tie_word_embeddings", True)
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert merged.lm_head.weight.data_ptr() == merged.model.embed_tokens.weight.data_ptr()
    with torch.no_grad(), canonical_execution(lm):
        torch.testing.assert_close(merged(x, use_cache=False).logits, lm(x).logits, rtol=0, atol=ATOL)

    int4 = graphlora.transform(model, [LoraRule(r".*q_proj", rank=4, weight_qtype="int4", group_size=32)],
                               (x,), {"use_cache": False})
    int4.save_pretrained(tmp_path / "q", keep_quantized=True)
    keys = _safetensors_keys(tmp_path / "q", "graphlora_quantized.safetensors")
    assert "lm_head.weight" not in keys and "model.embed_tokens.weight" in keys
    back = graphlora.load_quantized(tiny_llama(layers=1, tie=True), tmp_path / "q", (x,), {"use_cache": False})
    assert torch.equal(back(x).logits, int4(x).logits)


def test_quantized_tied_lm_head_is_saved_untied(tmp_path):
    """A quantized lm_head tied to the embedding computes with its grid values, the embedding
    with its float ones: the base save keeps both keys, unties them in config.json (with a
    warning), and from_pretrained reproduces the base the model computes with."""
    from toy_models import tiny_llama

    model = tiny_llama(layers=1, tie=True)
    x = ids(vocab=128)
    lm = graphlora.transform(model, [LoraRule(r"lm_head", rank=4, weight_qtype="int8")], (x,), {"use_cache": False})
    with pytest.warns(graphlora.GraphloraWarning, match="lm_head.weight were tied.*tie_word_embeddings=false"):
        lm.save_pretrained(tmp_path / "base")
    keys = _safetensors_keys(tmp_path / "base")
    assert "lm_head.weight" in keys and "model.embed_tokens.weight" in keys
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    assert base.config.tie_word_embeddings is False
    assert torch.equal(base.model.embed_tokens.weight, model.model.embed_tokens.weight)
    with torch.no_grad(), lm.disable_adapter(), canonical_execution(lm):
        torch.testing.assert_close(base(x, use_cache=False).logits, lm(x).logits, rtol=0, atol=ATOL)


def _bf16_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(num_hidden_layers=1, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=128)
    return LlamaForCausalLM(cfg).eval().to(torch.bfloat16)


@pytest.mark.slow
@pytest.mark.parametrize("autocast", [True, False])
def test_bf16_llama_lora_dtype_matches_peft_autocast_adapter_dtype(tmp_path, autocast):
    """A bf16 Llama: LoRA factors are float32 by default (bf16 with autocast_adapter_dtype=False),
    as PEFT's get_peft_model makes them; forward equals PEFT's bit for bit (scale 1, so the
    scale's place in the branch does not round differently), the saved adapter holds that dtype,
    PEFT and graphlora load it back into it, and merging gives PEFT's merged weights."""
    from safetensors import safe_open

    model = _bf16_llama()
    x = ids(vocab=128)
    rules = [LoraRule(r".*(q_proj|v_proj)", rank=4, alpha=4.0)]
    lm = graphlora.transform(model, rules, (x,), {"use_cache": False}, autocast_adapter_dtype=autocast)
    want = torch.float32 if autocast else torch.bfloat16
    assert {p.dtype for p in lm.lora_parameters()} == {want}
    _randomize(lm.named_lora_parameters(), seed=2, std=0.1)
    lm.save_pretrained(tmp_path, only_save_adapters=True)
    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {want}

    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path,
                                                autocast_adapter_dtype=autocast).eval()
    assert {p.dtype for n, p in peft_model.named_parameters() if "lora_" in n} == {want}
    with torch.no_grad():
        expected = peft_model(input_ids=x, use_cache=False).logits
        with canonical_execution(lm):
            got = lm(x).logits
    assert got.dtype == torch.bfloat16 and torch.equal(got, expected)
    # the fused execution: q and v cast their shared input once, so their A matrices still fuse
    casts = [n for n in lm._executable().graph.nodes if meta.role(n) == "lora_cast_in"]
    assert len(casts) == (1 if autocast else 0)
    with torch.no_grad():
        fused = lm(x).logits
    assert (fused.float() - expected.float()).abs().max() <= 1e-2 * expected.float().abs().max()

    again = graphlora.load_adapter(model, tmp_path, example_args=(x,), example_kwargs={"use_cache": False},
                                   autocast_adapter_dtype=autocast)
    assert {p.dtype for p in again.lora_parameters()} == {want}
    with torch.no_grad(), canonical_execution(again):
        assert torch.equal(again(x).logits, got)

    merged = lm.merge().state_dict()
    peft_merged = peft_model.merge_and_unload().state_dict()
    for key in ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.v_proj.weight"):
        assert merged[key].dtype == torch.bfloat16
        if autocast:  # both fold the float32 delta into the bf16 weight, rounding once
            assert torch.equal(merged[key], peft_merged[key]), key
        else:  # PEFT rounds B @ A to bf16 before adding, graphlora adds the float32 product
            torch.testing.assert_close(merged[key], peft_merged[key], rtol=0, atol=2e-2)


@pytest.mark.slow
def test_bf16_llama_trains_float32_factors():
    """Gradients reach the float32 factors through the casts, and an optimizer step keeps
    updates that factors stored in bf16 (8 significant bits) would round away."""
    model = _bf16_llama()
    x = ids(vocab=128)
    lm = graphlora.transform(model, [LoraRule(r".*_proj", rank=4)], (x,), {"use_cache": False})
    _randomize(lm.named_lora_parameters(), seed=3, std=0.1)
    lm.train()
    before = {n: p.detach().clone() for n, p in lm.named_lora_parameters()}
    optimizer = torch.optim.SGD(lm.lora_parameters(), lr=1e-3)
    lm(x).logits.float().logsumexp(-1).mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in lm.lora_parameters())
    optimizer.step()
    kept = lost = 0
    for name, p in lm.named_lora_parameters():
        moved = p.detach() != before[name]
        in_bf16 = p.detach().bfloat16() != before[name].bfloat16()
        kept += int(moved.sum())
        lost += int((moved & ~in_bf16).sum())
    assert kept > 0.9 * sum(p.numel() for p in lm.lora_parameters())
    assert lost > 0.5 * kept  # most of these updates do not survive a bf16 store
