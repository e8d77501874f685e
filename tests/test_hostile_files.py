"""Hostile files (issue 17, classes 1 and 9): no reader runs code from a file, and every broken
file — nesting bombs, wrong JSON types, not UTF-8, a directory where a file belongs, truncated
onnxruntime adapters, a 0-byte .onnx — is a GraphloraError naming the file, raised quickly.

Class 1 proves the payload did not run: each armed file is first loaded with the plain,
pickle-based loader in a child process, which must create the marker; graphlora's readers must
then refuse the file and the marker must not exist.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import graphlora
from graphlora import AdapterError, FileFormatError, GraphloraError, LoraRule, RuleError, UnsafeFileError
from graphlora import cli
from graphlora.io.peft_format import read_adapter
from graphlora.io.safetensors_io import load_state_dict, save_state_dict
from graphlora.rules_file import load_rules
from hostile import armed_pickle, armed_pt2, marker_code
from toy_models import MLP

pytestmark = pytest.mark.timeout(120)

X = torch.randn(2, 8)


@pytest.fixture(scope="module")
def armed(tmp_path_factory):
    """An armed .pt2, an armed adapter_model.bin and an armed pytorch_model.bin directory, and
    the proof (from a child process running the plain loaders) that each payload is live."""
    root = tmp_path_factory.mktemp("armed")
    marker = root / "MARKER"
    pt2 = armed_pt2(root / "golden.pt2", marker)
    adapter = root / "adapter"
    lm = graphlora.transform(MLP(), [LoraRule(r"layers\.[01]", rank=2)], (X,))
    lm.save_pretrained(adapter, only_save_adapters=True)
    (adapter / "adapter_model.safetensors").unlink()
    (adapter / "adapter_model.bin").write_bytes(armed_pickle(marker))
    model_dir = root / "hf_model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    (model_dir / "pytorch_model.bin").write_bytes(armed_pickle(marker))
    # the payloads are live: the plain loaders run them (they only write the marker)
    for load in (
        lambda: torch.export.load(str(pt2)),
        lambda: torch.load(adapter / "adapter_model.bin", weights_only=False),
        lambda: torch.load(model_dir / "pytorch_model.bin", weights_only=False),
    ):
        try:
            load()
        except Exception:  # the archive is broken after the payload ran: expected
            pass
        assert marker.exists()
        marker.unlink()
    return {"marker": marker, "pt2": pt2, "adapter": adapter, "model_dir": model_dir, "root": root}


def test_pt2_archive_is_refused_and_its_payload_does_not_run(armed, tmp_path, capsys):
    marker, pt2 = armed["marker"], armed["pt2"]
    for read in (graphlora.read_graph_text, graphlora.graph_text, lambda p: graphlora.graph_text(str(p))):
        with pytest.raises(UnsafeFileError, match="allow_pickle=True"):
            read(pt2)
    with pytest.raises(UnsafeFileError):
        graphlora.diff(pt2, pt2)
    with pytest.raises(UnsafeFileError):
        graphlora.save_graph_text(pt2, tmp_path / "out.graph.txt")
    assert cli.main(["diff", str(pt2), str(pt2)]) == 2
    assert cli.main(["graph-text", str(pt2)]) == 2
    assert "--allow-pickle" in capsys.readouterr().err
    assert not marker.exists()
    assert not (tmp_path / "out.graph.txt").exists()


def test_content_sniffing_never_selects_the_pickle_reader(armed, tmp_path):
    """A .pt2 archive named like a graph text (or with no suffix) is refused even with the
    opt-in: only a file named *.pt2 is read as one."""
    marker = armed["marker"]
    for name in ("golden.graph.txt", "golden.onnx.txt", "golden"):
        disguised = tmp_path / name
        shutil.copy(armed["pt2"], disguised)
        for allow in (False, True):
            with pytest.raises(UnsafeFileError, match="zip archive"):
                graphlora.read_graph_text(disguised, allow_pickle=allow)
        with pytest.raises(UnsafeFileError):
            graphlora.graph_text(str(disguised))
    assert not marker.exists()


def test_pickled_adapter_weights_are_refused_and_weights_only_stops_the_payload(armed):
    marker, adapter = armed["marker"], armed["adapter"]
    model = graphlora.transform(MLP(), [LoraRule(r"layers\.[01]", rank=2)], (X,))
    with pytest.raises(UnsafeFileError, match="allow_pickle=True"):
        read_adapter(adapter)
    with pytest.raises(UnsafeFileError):
        graphlora.load_adapter(model, adapter, adapter_name="other")
    with pytest.raises(UnsafeFileError):
        model.load_adapter(adapter, "other")
    # the opt-in still reads with torch's weights-only unpickler, which refuses the payload
    with pytest.raises(FileFormatError, match="cannot be read as a PyTorch state dict"):
        read_adapter(adapter, allow_pickle=True)
    assert not marker.exists()
    assert model.adapters.keys() == {"default"}


def test_pickled_model_directory_is_refused(armed, capsys):
    from graphlora.model_source import load_model

    with pytest.raises(UnsafeFileError, match="pickled"):
        load_model(str(armed["model_dir"]))
    rules = armed["root"] / "rules.toml"
    rules.write_text("[[rules]]\nrank = 2\n")
    assert cli.main(["inspect", str(armed["model_dir"]), "--rules", str(rules)]) == 2
    assert "allow-pickle" in capsys.readouterr().err
    assert not armed["marker"].exists()


def test_code_runs_only_from_a_module_attr_model_by_design(tmp_path):
    """The one input that executes code by design (docs/security.md): a MODEL module:attr."""
    from graphlora.model_source import load_model

    marker = tmp_path / "MARKER"
    (tmp_path / "models.py").write_text(
        marker_code(marker) + "\nimport torch\ndef make():\n    return torch.nn.Linear(2, 2), (torch.randn(2, 2),)\n"
    )
    load_model(f"{tmp_path / 'models.py'}:make")
    assert marker.exists()


# --------------------------------------------------------------------------- broken files (class 9)

BOMB = "[" * 100_000 + "]" * 100_000


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """One adapter and one keep_quantized save, copied by the fixtures below (transforming takes
    a second; copying a directory does not)."""
    root = tmp_path_factory.mktemp("saved")
    lm = graphlora.transform(MLP(), [LoraRule(r"layers\.[01]", rank=2)], (X,))
    lm.save_pretrained(root / "ad", only_save_adapters=True)
    lm = graphlora.transform(MLP(), [LoraRule(r"layers\.[01]", rank=2, weight_qtype="int8")], (X,))
    lm.save_pretrained(root / "q", keep_quantized=True)
    return root


@pytest.fixture
def adapter_dir(saved, tmp_path):
    return Path(shutil.copytree(saved / "ad", tmp_path / "ad"))


@pytest.fixture
def quant_dir(saved, tmp_path):
    return Path(shutil.copytree(saved / "q", tmp_path / "q"))


def test_json_nesting_bombs_in_every_json_and_toml_the_library_reads(adapter_dir, quant_dir, tmp_path):
    (adapter_dir / "adapter_config.json").write_text(BOMB)
    with pytest.raises(FileFormatError, match=r"adapter_config\.json.*nested too deeply"):
        read_adapter(adapter_dir)

    save_state_dict({"a": torch.ones(4), "b": torch.ones(4)}, tmp_path / "ckpt", max_shard_size=16)
    (tmp_path / "ckpt" / "model.safetensors.index.json").write_text('{"weight_map": ' + BOMB + "}")
    with pytest.raises(FileFormatError, match=r"index\.json.*nested too deeply"):
        load_state_dict(tmp_path / "ckpt")

    (tmp_path / "enc.json").write_text('{"param_encodings": ' + BOMB + "}")
    with pytest.raises(FileFormatError, match=r"enc\.json.*nested too deeply"):
        graphlora.load_encodings(tmp_path / "enc.json")

    (tmp_path / "rules.json").write_text('{"rules": ' + BOMB + "}")
    with pytest.raises(RuleError, match=r"rules\.json.*nested too deeply"):
        load_rules(tmp_path / "rules.json")
    (tmp_path / "rules.toml").write_text("x = " + BOMB)
    with pytest.raises(RuleError, match=r"rules\.toml.*nested too deeply"):
        load_rules(tmp_path / "rules.toml")

    quant = quant_dir
    (quant / "graphlora_quantization.json").write_text(BOMB)
    with pytest.raises(FileFormatError, match=r"graphlora_quantization\.json.*nested too deeply"):
        graphlora.load_quantized(MLP(), quant, (X,))


def test_numbers_too_long_to_convert_are_file_errors(adapter_dir, tmp_path):
    (adapter_dir / "adapter_config.json").write_text('{"peft_type": "LORA", "r": ' + "9" * 5000 + "}")
    with pytest.raises(FileFormatError, match="not valid JSON"):
        read_adapter(adapter_dir)
    (tmp_path / "r.toml").write_text("[[rules]]\nrank = " + "9" * 5000 + "\n")
    with pytest.raises(RuleError, match="not valid TOML"):
        load_rules(tmp_path / "r.toml")


@pytest.mark.parametrize(
    "entry, needle",
    [
        ({"name": "w", "enc_type": "PER_TENSOR", "bw": "8", "scale": [0.1]}, "'bw' must be an integer"),
        ({"name": "w", "enc_type": "PER_TENSOR", "bw": 8, "scale": "0.1"}, "'scale' must be a list"),
        ({"name": "w", "enc_type": "PER_TENSOR", "bw": 8, "scale": [[0.1]]}, "list of numbers"),
        ({"name": "w", "enc_type": "PER_TENSOR", "bw": 8, "scale": [float("nan")]}, "must be finite"),
        ({"name": "w", "enc_type": "PER_TENSOR", "bw": 8, "scale": [1e400]}, "must be finite"),
        ({"name": "w", "enc_type": "PER_TENSOR", "bw": 8, "scale": [0.1], "offset": [0.5]}, "list of integers"),
        ({"name": "w", "enc_type": 3, "bw": 8, "scale": [0.1]}, "'enc_type' must be a string"),
        ({"name": "w", "enc_type": "PER_ROW", "bw": 8, "scale": [0.1]}, "'enc_type' must be one of"),
        ({"name": "w", "enc_type": "PER_TENSOR", "bw": 999, "scale": [0.1]}, "bit width"),
        ({"name": "w", "enc_type": "PER_CHANNEL", "bw": 8, "scale": [0.1, 0.2],
          "graphlora": {"qtype": "int8", "axis": 0, "shape": [3, 4]}}, "does not fit shape"),
        ({"name": "w", "enc_type": "PER_TENSOR", "bw": 8, "scale": [0.1], "graphlora": []}, "'graphlora' must be an object"),
        ({"name": "w", "enc_type": "PER_TENSOR", "bw": 8, "scale": [0.1], "graphlora": {"shape": [-1]}}, "outside"),
        ({"name": "w", "enc_type": "PER_BLOCK", "bw": 4, "scale": [0.1], "block_size": 0,
          "graphlora": {"qtype": "int4", "axis": 0, "shape": [2, 4]}}, "'block_size' must be a positive int"),
        ({"name": "w", "enc_type": "PER_CHANNEL", "bw": 8, "scale": [0.1, 0.2, 0.3],
          "offset": [1, 2], "graphlora": {"qtype": "uint8", "axis": 0, "shape": [3, 4]}}, "inconsistent encoding"),
        ({"name": "w", "dtype": "INT", "enc_type": "PER_TENSOR", "bw": 8, "scale": [0.1], "offset": [10**30]},
         "inconsistent encoding"),
    ],
)
def test_wrong_types_in_an_encodings_file_name_the_entry_and_field(tmp_path, entry, needle):
    path = tmp_path / "enc.json"
    path.write_text(json.dumps({"version": "1.0.0", "param_encodings": [entry]}).replace("Infinity", "1e400"))
    with pytest.raises(FileFormatError, match=r"param_encodings\[0\] \(w\)") as info:
        graphlora.load_encodings(path)
    assert needle in str(info.value)


@pytest.mark.parametrize(
    "edit, needle",
    [
        (lambda c: [], "expected a JSON object"),
        (lambda c: {**c, "version": "1"}, "'version' must be an integer"),
        (lambda c: {**c, "version": 7}, "version 7 is not supported"),
        (lambda c: {**c, "rules": {"rank": 2}}, "'rules' must be a list"),
        (lambda c: {**c, "weights": []}, "'weights' must be an object"),
        (lambda c: {**c, "weights": {k: {**v, "scale": "x"} for k, v in c["weights"].items()}}, "'scale' must be a list"),
        (lambda c: {**c, "weights": {k: {**v, "graphlora": {**v["graphlora"], "shape": [32, 9]}}
                                     for k, v in c["weights"].items()}}, "the encoding is for shape"),
    ],
)
def test_wrong_types_in_a_quantized_checkpoint_config(quant_dir, edit, needle):
    path = quant_dir / "graphlora_quantization.json"
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    with pytest.raises(FileFormatError, match="graphlora_quantization.json") as info:
        graphlora.load_quantized(MLP(), quant_dir, (X,))
    assert needle in str(info.value)


@pytest.mark.parametrize(
    "changes, needle",
    [
        ({"r": 2.5}, "'r' must be a positive int"),
        ({"lora_alpha": "16"}, "'lora_alpha' must be a number"),
        ({"lora_alpha": True}, "'lora_alpha' must be a number"),
        ({"rank_pattern": ["x"]}, "'rank_pattern' must be an object"),
        ({"rank_pattern": {"layers.0": "2"}}, "must be a positive number"),
        ({"target_modules": {"a": 1}}, "'target_modules' must be null"),
        ({"target_parameters": "experts.down_proj"}, "'target_parameters' must be null or a list"),
        ({"exclude_modules": 3}, "'exclude_modules' must be null"),
        ({"layers_pattern": [1]}, "'layers_pattern' must be null"),
        ({"layers_to_transform": "0"}, "'layers_to_transform' must be null"),
        ({"use_rslora": "yes"}, "'use_rslora' must be true or false"),
        ({"lora_dropout": "0.1"}, "'lora_dropout' must be a number"),
    ],
)
def test_wrong_types_in_an_adapter_config(adapter_dir, changes, needle):
    path = adapter_dir / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    with pytest.raises(FileFormatError, match=r"adapter_config\.json") as info:
        read_adapter(adapter_dir)
    assert needle in str(info.value)


def test_non_utf8_files_and_directories_where_a_file_belongs(adapter_dir, tmp_path, quant_dir):
    for bad in (b'{"peft_type": "\xff\xfe"}', b"\x80" * 10):
        (adapter_dir / "adapter_config.json").write_bytes(bad)
        with pytest.raises(FileFormatError, match="not UTF-8"):
            read_adapter(adapter_dir)
    (adapter_dir / "adapter_config.json").unlink()
    (adapter_dir / "adapter_config.json").mkdir()
    with pytest.raises(FileFormatError, match="is a directory"):
        read_adapter(adapter_dir)

    (tmp_path / "enc.json").write_bytes(b"\xff\xfe{}")
    with pytest.raises(FileFormatError, match="not UTF-8"):
        graphlora.load_encodings(tmp_path / "enc.json")
    (tmp_path / "enc_dir").mkdir()
    with pytest.raises(FileFormatError, match="is a directory"):
        graphlora.load_encodings(tmp_path / "enc_dir")

    config = quant_dir / "graphlora_quantization.json"
    config.write_bytes(b"\xc3\x28")
    with pytest.raises(FileFormatError, match="not UTF-8"):
        graphlora.load_quantized(MLP(), quant_dir, (X,))
    config.unlink()
    config.mkdir()
    with pytest.raises(FileFormatError, match="is a directory"):
        graphlora.load_quantized(MLP(), quant_dir, (X,))

    (tmp_path / "r.json").write_bytes(b"\xff")
    with pytest.raises(RuleError, match="cannot read rules file"):
        load_rules(tmp_path / "r.json")
    for name in ("g.graph.txt", "g.onnx"):
        (tmp_path / name).mkdir()
        with pytest.raises(FileFormatError, match="no such file"):
            graphlora.read_graph_text(tmp_path / name)
    (tmp_path / "bad.graph.txt").write_bytes(b"# graphlora graph_text v1\n\xff")
    with pytest.raises(FileFormatError, match="not UTF-8"):
        graphlora.read_graph_text(tmp_path / "bad.graph.txt")


def test_truncated_and_foreign_onnxruntime_adapter_files(tmp_path):
    from graphlora.onnx.adapters import load_adapter, read_adapter as read_ort, write_adapter

    path = write_adapter({"x.lora_A": np.ones((4, 2), np.float32), "x.lora_B": np.ones((2, 4), np.float32)},
                         tmp_path / "a.onnx_adapter")
    data = path.read_bytes()
    for size in (0, 1, 8, 16, len(data) // 2):
        cut = tmp_path / f"cut{size}.onnx_adapter"
        cut.write_bytes(data[:size])
        for read in (read_ort, load_adapter):
            with pytest.raises(FileFormatError, match=f"cut{size}.onnx_adapter"):
                read(cut)
    garbage = tmp_path / "g.onnx_adapter"
    garbage.write_bytes(os.urandom(300))
    with pytest.raises(FileFormatError, match="not a readable onnxruntime adapter"):
        read_ort(garbage)
    nan = write_adapter({"x.lora_A": np.full((4, 2), np.nan, np.float32)}, tmp_path / "nan.onnx_adapter")
    with pytest.raises(FileFormatError, match="NaN/Inf"):
        load_adapter(nan)


def test_empty_or_truncated_onnx_is_not_an_empty_graph(tmp_path):
    empty = tmp_path / "model.onnx"
    empty.write_bytes(b"")
    with pytest.raises(FileFormatError, match="empty file"):
        graphlora.read_graph_text(empty)
    with pytest.raises(FileFormatError):
        graphlora.graph_text(empty)
    (tmp_path / "junk.onnx").write_bytes(b"\x08")  # parses as a ModelProto with only a field tag
    with pytest.raises(FileFormatError, match="not an ONNX model|not a readable ONNX model"):
        graphlora.read_graph_text(tmp_path / "junk.onnx")


def test_every_failure_above_is_a_graphlora_error():
    for cls in (UnsafeFileError, FileFormatError, RuleError, AdapterError):
        assert issubclass(cls, GraphloraError)
    assert issubclass(UnsafeFileError, FileFormatError)
