"""Sharded safetensors checkpoints in the transformers layout, and their validation."""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch

from graphlora.errors import AdapterError, FileFormatError
from graphlora.io import atomic
from graphlora.io.safetensors_io import (
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    load_state_dict,
    parse_size,
    plan_shards,
    read_safetensors,
    save_state_dict,
    write_safetensors,
)

transformers = pytest.importorskip("transformers")


def tiny_bert():
    torch.manual_seed(0)
    config = transformers.BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=100
    )
    return transformers.BertModel(config).eval()


def assert_same(a: dict, b: dict) -> None:
    assert list(a) == list(b) or sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k


# ---------------------------------------------------------------------------------------------
# sizes


@pytest.mark.parametrize(
    "text, expected",
    [
        ("5GB", 5 * 10**9),
        ("500MB", 500 * 10**6),
        ("10KB", 10_000),
        ("10kB", 10_000),
        ("2GiB", 2 * 2**30),
        ("3MiB", 3 * 2**20),
        ("4KiB", 4096),
        ("5Mb", 625_000),  # lower-case b: bits, as in transformers
        (" 7MB ", 7 * 10**6),
        (123, 123),
    ],
)
def test_parse_size_matches_transformers(text, expected):
    assert parse_size(text) == expected
    if isinstance(text, str) and text == text.strip():
        from transformers.utils.hub import convert_file_size_to_int

        assert convert_file_size_to_int(text) == expected


@pytest.mark.parametrize("bad", ["5", "GB", "1.5GB", "5TB", "-1KB", "0MB", 0, -5, 1.5, True])
def test_parse_size_rejects(bad):
    with pytest.raises((ValueError, TypeError)):
        parse_size(bad)


def test_plan_shards_matches_huggingface_greedy_split():
    # huggingface_hub.split_state_dict_into_shards_factory: an oversized tensor is emitted as its
    # own shard at once while the current shard keeps filling.
    plan = plan_shards({"a": 6, "b": 6, "c": 2, "d": 12, "e": 2, "f": 2}, 10)
    assert plan == {
        "model-00001-of-00004.safetensors": ["a"],
        "model-00002-of-00004.safetensors": ["d"],
        "model-00003-of-00004.safetensors": ["b", "c", "e"],
        "model-00004-of-00004.safetensors": ["f"],
    }
    from huggingface_hub import split_torch_state_dict_into_shards

    sd = {k: torch.zeros(n) for k, n in {"a": 6, "b": 6, "c": 2, "d": 12, "e": 2, "f": 2}.items()}
    split = split_torch_state_dict_into_shards(sd, max_shard_size=40)
    assert split.filename_to_tensors == plan_shards({k: 4 * v.numel() for k, v in sd.items()}, 40)
    assert plan_shards({"a": 1, "b": 2}, "1KB") == {SAFE_WEIGHTS_NAME: ["a", "b"]}


# ---------------------------------------------------------------------------------------------
# round trips through transformers


def test_sharded_bert_loads_with_automodel(tmp_path):
    model = tiny_bert()
    sd = model.state_dict()
    out = tmp_path / "bert"
    out.mkdir()
    model.config.to_json_file(out / "config.json")
    saved = save_state_dict(sd, out, max_shard_size="20KB")
    assert saved.is_sharded and len(saved.files) >= 3
    names = sorted(os.listdir(out))
    assert "config.json" in names and SAFE_WEIGHTS_INDEX_NAME in names
    n = len(saved.files)
    assert [f for f in names if f.startswith("model-")] == [
        f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)
    ]
    index = json.loads((out / SAFE_WEIGHTS_INDEX_NAME).read_text())
    assert set(index) == {"metadata", "weight_map"}
    assert index["metadata"] == {"total_size": sum(t.numel() * t.element_size() for t in sd.values())}
    assert set(index["weight_map"]) == set(sd)
    for f in saved.files:
        tensors, meta = read_safetensors(out / f)
        assert meta == {"format": "pt"}
        data = sum(t.numel() * t.element_size() for t in tensors.values())
        assert data <= 20_000 or len(tensors) == 1
        assert all(index["weight_map"][k] == f for k in tensors)

    loaded = transformers.AutoModel.from_pretrained(out)
    assert type(loaded).__name__ == "BertModel"
    assert_same(loaded.state_dict(), sd)
    assert_same(load_state_dict(out), sd)
    assert_same(load_state_dict(out / SAFE_WEIGHTS_INDEX_NAME), sd)


def test_resave_unsharded_removes_stale_shards_and_keeps_config(tmp_path):
    model = tiny_bert()
    sd = model.state_dict()
    save_state_dict(sd, tmp_path / "m", max_shard_size="20KB")
    model.config.to_json_file(tmp_path / "m" / "config.json")  # written after the first save
    saved = save_state_dict(sd, tmp_path / "m")
    assert not saved.is_sharded
    assert sorted(os.listdir(tmp_path / "m")) == ["config.json", SAFE_WEIGHTS_NAME]
    assert_same(transformers.AutoModel.from_pretrained(tmp_path / "m").state_dict(), sd)
    assert_same(load_state_dict(tmp_path / "m" / SAFE_WEIGHTS_NAME), sd)


def test_failed_save_leaves_previous_checkpoint(tmp_path, monkeypatch):
    sd = {"w": torch.arange(6.0).reshape(2, 3)}
    save_state_dict(sd, tmp_path / "m")
    before = (tmp_path / "m" / SAFE_WEIGHTS_NAME).read_bytes()

    def boom(stage):
        if stage == "dir:synced":
            raise RuntimeError("disk full")

    monkeypatch.setattr(atomic, "_fail_at", boom)
    with pytest.raises(RuntimeError):
        save_state_dict({"w": torch.zeros(2, 3), "v": torch.ones(4)}, tmp_path / "m", max_shard_size=16)
    assert os.listdir(tmp_path) == ["m"]
    assert os.listdir(tmp_path / "m") == [SAFE_WEIGHTS_NAME]
    assert (tmp_path / "m" / SAFE_WEIGHTS_NAME).read_bytes() == before


def test_tied_weights_clone_and_dedupe_load_in_gpt2(tmp_path):
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50, n_positions=16)
    model = transformers.GPT2LMHeadModel(config).eval()
    sd = model.state_dict()
    assert sd["lm_head.weight"].data_ptr() == sd["transformer.wte.weight"].data_ptr()

    cloned = save_state_dict(sd, tmp_path / "clone")
    assert cloned.dropped == {}
    assert "lm_head.weight" in load_state_dict(tmp_path / "clone")

    deduped = save_state_dict(sd, tmp_path / "dedupe", shared="dedupe")
    assert deduped.dropped == {"lm_head.weight": "transformer.wte.weight"}
    assert "lm_head.weight" not in load_state_dict(tmp_path / "dedupe")

    for sub in ("clone", "dedupe"):
        config.to_json_file(tmp_path / sub / "config.json")
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / sub)
        assert_same(loaded.state_dict(), sd)
        assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()


def test_dedupe_respects_drop_preference_and_clones_partial_views(tmp_path):
    base = torch.arange(12.0).reshape(3, 4)
    sd = {"first": base, "second": base, "rows": base[1:], "cols": base[:, 1:]}
    saved = save_state_dict(sd, tmp_path / "m", shared="dedupe", drop=["first"])
    assert saved.dropped == {"first": "second"}
    loaded = load_state_dict(tmp_path / "m")
    assert sorted(loaded) == ["cols", "rows", "second"]
    for k in loaded:
        assert torch.equal(loaded[k], sd[k])


def test_non_contiguous_and_aliased_tensors_are_saved(tmp_path):
    w = torch.arange(12.0).reshape(3, 4)
    sd = {"t": w.t(), "same": w, "alias": w, "slice": w[:, ::2], "bf16": torch.ones(3, dtype=torch.bfloat16)}
    write_safetensors(sd, tmp_path / "x.safetensors")
    loaded, meta = read_safetensors(tmp_path / "x.safetensors")
    assert meta == {"format": "pt"}
    for k in sd:
        assert torch.equal(loaded[k], sd[k]) and loaded[k].dtype == sd[k].dtype


def test_rejects_non_tensors_and_meta(tmp_path):
    with pytest.raises(TypeError, match="'x'"):
        save_state_dict({"x": 3}, tmp_path / "m")
    with pytest.raises(ValueError, match="meta"):
        save_state_dict({"x": torch.empty(2, device="meta")}, tmp_path / "m")
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# validation on load


@pytest.fixture
def sharded(tmp_path):
    sd = {f"w{i}": torch.full((64,), float(i)) for i in range(6)}
    saved = save_state_dict(sd, tmp_path / "m", max_shard_size=600)  # two 256-byte tensors per shard
    assert len(saved.files) == 3
    return tmp_path / "m", saved


def test_truncated_shard_names_the_file(sharded):
    root, saved = sharded
    shard = root / saved.files[2]
    data = shard.read_bytes()
    shard.write_bytes(data[:-10])
    with pytest.raises(FileFormatError, match=saved.files[2]):
        load_state_dict(root)


def test_garbage_and_empty_file_name_the_file(tmp_path):
    for content in (b"", b"\x00" * 3, b"not a safetensors file at all"):
        bad = tmp_path / "bad.safetensors"
        bad.write_bytes(content)
        with pytest.raises(FileFormatError, match="bad.safetensors"):
            read_safetensors(bad)


def test_missing_shard_names_the_file(sharded):
    root, saved = sharded
    (root / saved.files[1]).unlink()
    with pytest.raises(FileFormatError, match=saved.files[1]):
        load_state_dict(root)


def test_invalid_index_json(sharded):
    root, _ = sharded
    (root / SAFE_WEIGHTS_INDEX_NAME).write_text('{"weight_map": {"w0": ')
    with pytest.raises(FileFormatError, match=r"index\.json is not valid JSON \(line 1"):
        load_state_dict(root)
    (root / SAFE_WEIGHTS_INDEX_NAME).write_text('{"metadata": {}}')
    with pytest.raises(FileFormatError, match="weight_map"):
        load_state_dict(root)


def test_index_key_missing_from_shard(sharded):
    root, saved = sharded
    index = json.loads((root / SAFE_WEIGHTS_INDEX_NAME).read_text())
    index["weight_map"]["ghost"] = saved.files[0]
    (root / SAFE_WEIGHTS_INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(FileFormatError, match=rf"{saved.files[0]} lacks 1 tensor.*'ghost'"):
        load_state_dict(root)


def test_index_and_shards_disagree(sharded):
    root, saved = sharded
    index = json.loads((root / SAFE_WEIGHTS_INDEX_NAME).read_text())
    del index["weight_map"]["w3"]
    (root / SAFE_WEIGHTS_INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(FileFormatError, match=rf"{saved.files[1]} holds tensor.*'w3'"):
        load_state_dict(root)


def test_index_path_traversal_is_refused(sharded):
    root, _ = sharded
    (root / SAFE_WEIGHTS_INDEX_NAME).write_text(json.dumps({"weight_map": {"w0": "../evil.safetensors"}}))
    with pytest.raises(FileFormatError, match="plain file name"):
        load_state_dict(root)


def test_empty_directory_and_foreign_format(tmp_path):
    with pytest.raises(AdapterError, match="no weights"):
        load_state_dict(tmp_path)
    from safetensors.torch import save_file

    save_file({"x": torch.ones(1)}, str(tmp_path / "tf.safetensors"), metadata={"format": "tf"})
    with pytest.raises(FileFormatError, match="'tf'"):
        read_safetensors(tmp_path / "tf.safetensors")


# ---------------------------------------------------------------------------------------------
# properties against the reference implementations

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(1, 64), min_size=1, max_size=12), limit=st.integers(1, 100))
def test_plan_shards_equals_huggingface_split(sizes, limit):
    from huggingface_hub import split_torch_state_dict_into_shards

    sd = {f"t{i}": torch.zeros(n, dtype=torch.uint8) for i, n in enumerate(sizes)}
    split = split_torch_state_dict_into_shards(sd, max_shard_size=limit)
    assert plan_shards({k: v.numel() for k, v in sd.items()}, limit) == split.filename_to_tensors


@settings(max_examples=60, deadline=None)
@given(
    number=st.integers(1, 10**4),
    unit=st.sampled_from(["GB", "MB", "KB", "GiB", "MiB", "KiB", "gb", "Mb", "kB", "kib", "mib"]),
)
def test_parse_size_equals_transformers(number, unit):
    from transformers.utils.hub import convert_file_size_to_int

    assert parse_size(f"{number}{unit}") == convert_file_size_to_int(f"{number}{unit}")
