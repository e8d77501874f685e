"""The ``graphlora`` command line: inspect / transform / export / demo, run in-process through
``graphlora.cli.main`` (exit codes, one-line errors) and once as real processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch

from graphlora import cli

REPO = Path(__file__).resolve().parents[1]
WORDS = (
    "[PAD] [UNK] [CLS] [SEP] [MASK] the a quick brown fox jumps over lazy dog graph lora applies "
    "and quantization as compiler passes traced graphs . , to of is"
).split()

RULES_TOML = r"""
[[rules]]
module_path = '.*attention\.self\.(query|value)'
rank = 4
alpha = 8.0

[[rules]]
module_path = '.*intermediate\.dense'
weight_qtype = "int8"

[[rules]]
module_path = '.*decoder.*'
rank = 2
"""


def _tiny_bert(directory: Path, *, tokenizer: bool) -> Path:
    """A 2-layer BERT (hidden 32) saved with save_pretrained, plus an offline WordPiece tokenizer."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    torch.manual_seed(0)
    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                        vocab_size=len(WORDS), max_position_embeddings=64)
    BertModel(config).save_pretrained(directory)
    if tokenizer:
        vocab = directory.parent / f"{directory.name}-vocab.txt"
        vocab.write_text("\n".join(WORDS) + "\n")
        BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    return _tiny_bert(tmp_path_factory.mktemp("models") / "bert", tokenizer=True)


@pytest.fixture(scope="module")
def bert_no_tokenizer(tmp_path_factory) -> Path:
    return _tiny_bert(tmp_path_factory.mktemp("models") / "bert-bare", tokenizer=False)


@pytest.fixture
def rules_file(tmp_path) -> Path:
    path = tmp_path / "rules.toml"
    path.write_text(RULES_TOML)
    return path


def _write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


def _snapshot(directory: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns) for p in directory.rglob("*")}


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err, "expected an error on stderr"
    return err[-1]


# ---------------------------------------------------------------------------------------- inspect


def test_inspect_transformers_dir_reports_sites_rules_and_counts_without_writing(bert_dir, rules_file, capsys):
    before = _snapshot(bert_dir)
    assert cli.main(["inspect", str(bert_dir), "--rules", str(rules_file), "--all"]) == 0
    out = capsys.readouterr().out
    assert "(tokenized example sentences)" in out
    assert "rule #0 LoraRule(" in out and ": 4 sites" in out
    assert "encoder.layer.1.attention.self.value" in out and "rank 4" in out and "alpha 8" in out
    assert "rule #1 QuantRule(" in out and "weight=int8" in out
    assert "rule #2 LoraRule(module_path='.*decoder.*', rank=2): 0 sites" in out
    assert "unused rules: #2" in out
    assert "linear sites: 13 (6 matched, 7 left untouched)" in out
    assert "untouched: pooler.dense" in out
    assert "LoRA adds 1,024 trainable" in out  # 4 sites x rank 4 x (32 + 32)
    assert _snapshot(bert_dir) == before  # nothing written


def test_inspect_json_is_machine_readable(bert_dir, rules_file, capsys):
    assert cli.main(["inspect", str(bert_dir), "--rules", str(rules_file), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [r["sites"] for r in report["rules"]][2] == []
    assert report["unused_rules"] == [2]
    queries = [s for s in report["sites"] if s["module_path"].endswith("query")]
    assert queries[0] == {
        "module_path": "encoder.layer.0.attention.self.query", "in_features": 32, "out_features": 32,
        "uses": 1, "rule_index": 0, "lora": True, "rank": 4, "alpha": 8.0, "weight_qtype": None,
        "group_size": None, "act_qtype": None, "lora_weight_qtype": None, "lora_act_qtype": None,
        "lora_parameters": 256,
    }
    assert report["parameters"]["lora"] == 1024
    assert report["parameters"]["quantized"] == 2 * 32 * 64
    assert report["parameters"]["model"] == sum(p.numel() for p in _load(bert_dir).parameters())


def _load(directory: Path):
    from transformers import AutoModel

    return AutoModel.from_pretrained(directory)


def test_inspect_without_tokenizer_uses_input_ids_2x8(bert_no_tokenizer, rules_file, capsys):
    assert cli.main(["inspect", str(bert_no_tokenizer), "--rules", str(rules_file)]) == 0
    out = capsys.readouterr().out
    assert "input_ids (2, 8)" in out and "example inputs: input_ids[2,8]" in out


def test_inspect_rank_too_large_and_strict_are_errors(bert_dir, tmp_path, rules_file, capsys):
    big = _write(tmp_path / "big.toml", """
        [[rules]]
        module_path = '.*query'
        rank = 40
    """)
    assert cli.main(["inspect", str(bert_dir), "--rules", str(big)]) == 2
    captured = capsys.readouterr()
    assert "problem: rule #0: rank 40 is larger than" in captured.out
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and "big.toml" in err[0] and "rank <= 32" in err[0] and "and 1 more" in err[0]

    assert cli.main(["inspect", str(bert_dir), "--rules", str(rules_file), "--strict"]) == 2
    assert "1 rule(s) matched no linear site: #2 (--strict)" in _error_line(capsys)


FACTORY = """
    import torch
    import torch.nn as nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.up = nn.Linear(8, 16)
            self.down = nn.Linear(16, 4)

        def forward(self, x, scale=1.0):
            return self.down(torch.relu(self.up(x))) * scale

    def model_and_args():
        return Net(), (torch.randn(2, 8),)

    def model_args_kwargs():
        return Net(), (torch.randn(2, 8),), {"scale": 2.0}

    def model_and_kwargs():
        return Net(), {"x": torch.randn(2, 8)}

    def model_only():
        return Net()

    instance = Net()

    def not_a_model():
        return 42

    def broken():
        raise RuntimeError("no weights here")
"""


@pytest.fixture
def factory(tmp_path) -> Path:
    return _write(tmp_path / "toy_factories.py", FACTORY)


@pytest.fixture
def mlp_rules(tmp_path) -> Path:
    return _write(tmp_path / "mlp.json", '[{"module_path": "up", "rank": 2}, {"module_path": "down", "weight_qtype": "int8"}]')


@pytest.mark.parametrize("attr", ["model_and_args", "model_args_kwargs", "model_and_kwargs"])
def test_inspect_factory_file(factory, mlp_rules, attr, capsys):
    assert cli.main(["inspect", f"{factory}:{attr}", "--rules", str(mlp_rules), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [(s["module_path"], s["rule_index"]) for s in report["sites"]] == [("up", 0), ("down", 1)]
    assert report["parameters"]["lora"] == 2 * (8 + 16)


def test_inspect_factory_module_from_current_directory(factory, mlp_rules, monkeypatch, capsys):
    monkeypatch.chdir(factory.parent)
    monkeypatch.delitem(sys.modules, "toy_factories", raising=False)
    assert cli.main(["inspect", "toy_factories:model_and_args", "--rules", "mlp.json"]) == 0
    assert "Net from toy_factories:model_and_args" in capsys.readouterr().out
    assert str(factory.parent) not in sys.path  # the current directory is importable only while loading
    sys.modules.pop("toy_factories", None)


def test_symbolic_trace_needs_no_example_inputs(factory, mlp_rules, capsys):
    assert cli.main(["inspect", f"{factory}:instance", "--rules", str(mlp_rules), "--method", "symbolic"]) == 0
    assert "example inputs: none" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ("{factory}:model_only", "needs example inputs"),
        ("{factory}:not_a_model", "must return an nn.Module, (model, example_args)"),
        ("{factory}:broken", "the factory raised RuntimeError: no weights here"),
        ("{factory}:missing", "has no attribute 'missing'"),
        ("no_such_module_xyz:make", "no module named 'no_such_module_xyz'"),
        ("{tmp}/nowhere", "neither a directory nor module:attr"),
        ("{tmp}/mlp.json", "is a file; expected a transformers model directory"),
        ("{tmp}", "no config.json, so not a transformers model directory"),
    ],
)
def test_model_errors_are_one_line(factory, mlp_rules, tmp_path, model, message, capsys):
    spec = model.format(factory=factory, tmp=tmp_path)
    assert cli.main(["inspect", spec, "--rules", str(mlp_rules)]) == 2
    line = _error_line(capsys)
    assert line.startswith("graphlora inspect: error: ") and message in line


def test_verbose_adds_the_traceback(factory, mlp_rules, capsys):
    assert cli.main(["inspect", f"{factory}:broken", "--rules", str(mlp_rules), "--verbose"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "RuntimeError: no weights here" in err


# ------------------------------------------------------------------------------ rules-file errors


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        ("typo.toml", "[[rules]]\nmodule_path = 'x'\nrnak = 4\n", ["typo.toml: rule #0: unknown field 'rnak' (did you mean 'rank'?)"]),
        ("second.toml", "[[rules]]\nrank = 2\n[[rules]]\nweight_qtype = 'int3'\n",
         ["second.toml: rule #1", "weight_qtype", "unknown qtype 'int3'"]),
        ("type.json", '[{"module_path": "x", "rank": "8"}]', ["type.json: rule #0: field 'rank' must be an integer, got str '8'"]),
        ("lora.json", '{"rules": [{"module_path": "x", "alpha": 8}]}', ["lora.json: rule #0: field 'alpha' is a LoRA field", "rank"]),
        ("top.toml", "[[rule]]\nrank = 2\n", ["top.toml: unknown top-level key 'rule' (did you mean 'rules'?)"]),
        ("syntax.toml", "[[rules]\n", ["syntax.toml: not valid TOML"]),
        ("syntax.json", "[{]", ["syntax.json: not valid JSON", "line 1"]),
    ],
)
def test_rules_file_errors_name_file_rule_and_field(bert_dir, tmp_path, name, text, expected, capsys):
    path = tmp_path / name
    path.write_text(text)
    assert cli.main(["inspect", str(bert_dir), "--rules", str(path)]) == 2
    line = _error_line(capsys)
    for piece in expected:
        assert piece in line


def test_missing_rules_file(bert_dir, tmp_path, capsys):
    assert cli.main(["transform", str(bert_dir), "--rules", str(tmp_path / "nope.toml"), "--graph-text", "g"]) == 2
    assert "nope.toml: rules file does not exist" in _error_line(capsys)


# -------------------------------------------------------------------------------------- transform


@pytest.mark.parametrize(
    ("mode", "files"),
    [
        ("adapters", {"adapter_config.json", "adapter_model.safetensors"}),
        ("separate", {"config.json", "model.safetensors", "adapters/adapter_config.json", "adapters/adapter_model.safetensors"}),
        ("merged", {"config.json", "model.safetensors"}),
    ],
)
def test_transform_saves_in_each_mode(bert_dir, rules_file, tmp_path, mode, files, capsys):
    out = tmp_path / "out"
    graph = tmp_path / "model.graph.txt"
    argv = ["transform", str(bert_dir), "--rules", str(rules_file), "--out", str(out), "--save", mode, "--no-progress"]
    if mode == "adapters":
        argv += ["--graph-text", str(graph)]
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    assert "4 linear site(s) matched" not in captured.out  # 6: four LoRA sites and two int8 ones
    assert "6 linear site(s) matched (2 with quantized weights); trainable LoRA parameters: 1,024" in captured.out
    assert f"saved ({mode}) to {out}" in captured.out
    assert "graphlora transform: warning: 1 rule(s) matched no linear site: rule #2" in captured.err
    written = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    assert written == files
    if mode == "adapters":
        config = json.loads((out / "adapter_config.json").read_text())
        assert config["r"] == 4 and config["lora_alpha"] == 8
        assert graph.read_text().startswith("# graphlora graph_text v1 fx")
        assert "role=lora_a" in graph.read_text()
    if mode == "merged":  # a fresh LoRA (B = 0) merges to the int8-rounded base: still loads
        merged = _load(out)
        assert set(merged.state_dict()) == set(_load(bert_dir).state_dict())


def test_transform_needs_something_to_write(bert_dir, rules_file, capsys):
    assert cli.main(["transform", str(bert_dir), "--rules", str(rules_file)]) == 2
    assert "nothing to write" in _error_line(capsys)


def test_transform_writes_encodings_and_warns_about_uncalibrated_activations(bert_dir, tmp_path, capsys):
    rules = _write(tmp_path / "act.toml", """
        [[rules]]
        module_path = '.*query'
        rank = 2
        weight_qtype = "int4"
        group_size = 16
        act_qtype = "int8"
    """)
    enc = tmp_path / "enc.json"
    assert cli.main(["transform", str(bert_dir), "--rules", str(rules), "--encodings", str(enc), "--no-progress"]) == 0
    assert "activation encodings are not calibrated" in capsys.readouterr().err
    names = [e["name"] for e in json.loads(enc.read_text())["param_encodings"]]
    assert names == ["encoder.layer.0.attention.self.query.weight", "encoder.layer.1.attention.self.query.weight"]


def test_transform_calibrates_with_a_text_file(bert_dir, tmp_path, capsys):
    rules = _write(tmp_path / "gptq.toml", """
        [[rules]]
        module_path = '.*query'
        rank = 2
        weight_qtype = "int4"
        group_size = 16
        weight_calibration = "gptq"
        act_qtype = "int8"
    """)
    text = tmp_path / "calib.txt"
    text.write_text("\n".join(["the quick brown fox", "", "the lazy dog jumps over the fox"] * 3 + ["graph"]))
    enc = tmp_path / "enc.json"
    argv = ["transform", str(bert_dir), "--rules", str(rules), "--encodings", str(enc), "--no-progress"]
    assert cli.main(argv) == 2
    assert "rule #0 uses weight_calibration='gptq'" in _error_line(capsys)
    assert cli.main(argv + ["--calibrate-with", str(text)]) == 0
    data = json.loads(enc.read_text())
    assert [e["name"] for e in data["activation_encodings"]] == [
        "encoder.layer.0.attention.self.query.input", "encoder.layer.1.attention.self.query.input"]


def test_transform_places_whole_graph_activations_from_the_rules_file(bert_dir, tmp_path, capsys):
    rules = _write(tmp_path / "full_integer.toml", """
        [[rules]]
        module_path = '.*dense'
        weight_qtype = "int8"

        [[activations]]
        tensor = '.*attention\\.self\\.add'
        qtype = "none"

        [[activations]]
        kinds = ["norm"]
        qtype = "uint16"

        [[activations]]
        kinds = ["add"]
    """)
    text = tmp_path / "calib.txt"
    text.write_text("the quick brown fox\nthe lazy dog jumps over the fox\n")
    enc = tmp_path / "enc.json"
    argv = ["transform", str(bert_dir), "--rules", str(rules), "--encodings", str(enc), "--no-progress"]
    assert cli.main(argv) == 2
    assert "[[activations]] tables" in _error_line(capsys) and not enc.exists()
    assert cli.main(argv + ["--calibrate-with", str(text)]) == 0
    acts = {e["name"]: e for e in json.loads(enc.read_text())["activation_encodings"]}
    # 2 layers: per layer 2 LayerNorms and 2 residual adds; before them the embeddings' LayerNorm
    # and 2 adds; the attention-mask add of each layer stays float
    assert len(acts) == 2 * 4 + 3
    assert acts["encoder.layer.1.output.LayerNorm.output"]["bw"] == 16
    assert acts["encoder.layer.0.output.add"]["bw"] == 8
    assert not any(name.endswith("attention.self.add") for name in acts)


def test_calibrate_with_needs_a_tokenizer(factory, mlp_rules, tmp_path, capsys):
    text = tmp_path / "calib.txt"
    text.write_text("hello\n")
    argv = ["transform", f"{factory}:model_and_args", "--rules", str(mlp_rules), "--graph-text",
            str(tmp_path / "g.txt"), "--calibrate-with", str(text)]
    assert cli.main(argv) == 2
    assert "--calibrate-with needs a tokenizer" in _error_line(capsys)


# ----------------------------------------------------------------------------------------- export


def test_export_onnx_runs_in_onnxruntime(bert_dir, tmp_path, capsys):
    import onnxruntime as ort
    from transformers import AutoTokenizer

    rules = _write(tmp_path / "qlora.toml", """
        [[rules]]
        module_path = '.*attention\\.self\\.(query|value)'
        rank = 4
        weight_qtype = "int4"
        group_size = 16
    """)
    onnx_path = tmp_path / "model.onnx"
    graph = tmp_path / "model.graph.txt"
    argv = ["export", str(bert_dir), "--rules", str(rules), "--out", str(onnx_path), "--lora", "branch",
            "--graph-text", str(graph), "--no-progress"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert f"exported {onnx_path} (opset 21; lora branch; inputs input_ids, token_type_ids, attention_mask; 4 quantized weight(s))" in out
    assert graph.read_text().startswith("# graphlora graph_text v1 onnx")
    assert "DequantizeLinear" in graph.read_text()

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    batch = AutoTokenizer.from_pretrained(bert_dir)(["the lazy dog", "a quick brown fox jumps over the dog"],
                                                    padding=True, return_tensors="np")
    (hidden, *_) = session.run(None, {i.name: batch[i.name] for i in session.get_inputs()})
    with torch.no_grad():
        expected = _load(bert_dir).eval()(**{k: torch.from_numpy(v) for k, v in batch.items()}).last_hidden_state
    # int4 weights on 4 layers; fresh LoRA adds nothing
    assert hidden.shape == tuple(expected.shape)
    assert torch.nn.functional.cosine_similarity(torch.from_numpy(hidden).flatten(), expected.flatten(), dim=0) > 0.99


def test_export_requires_calibration_for_activation_rules(bert_dir, tmp_path, capsys):
    rules = _write(tmp_path / "act.json", '[{"module_path": ".*query", "weight_qtype": "int8", "act_qtype": "int8"}]')
    argv = ["export", str(bert_dir), "--rules", str(rules), "--out", str(tmp_path / "m.onnx"), "--no-progress"]
    assert cli.main(argv) == 2
    assert "pass --calibrate-with TEXTFILE" in _error_line(capsys)
    assert not (tmp_path / "m.onnx").exists()


def test_export_without_the_onnx_module_is_a_clean_error(factory, mlp_rules, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "graphlora.onnx.export", None)  # import fails as if the file were missing
    argv = ["export", f"{factory}:model_and_args", "--rules", str(mlp_rules), "--out", str(tmp_path / "m.onnx")]
    assert cli.main(argv) == 2
    assert "ONNX export is not available" in _error_line(capsys)


# ------------------------------------------------------------------------------------------- demo


def test_demo_calls_run_demo_with_the_given_options(monkeypatch, tmp_path, capsys):
    calls = []
    fake = types.ModuleType("graphlora.demo")
    fake.run_demo = lambda **kwargs: calls.append(kwargs) or {"cosine": 0.99, "out": kwargs.get("out_dir")}
    monkeypatch.setitem(sys.modules, "graphlora.demo", fake)
    assert cli.main(["demo", "--out", str(tmp_path), "--steps", "3", "--no-progress"]) == 0
    assert calls == [{"progress": False, "out_dir": str(tmp_path), "steps": 3}]
    assert capsys.readouterr().out == f"cosine: 0.99\nout: {tmp_path}\n"
    assert cli.main(["demo"]) == 0
    assert calls[-1] == {"progress": True}  # the demo's own defaults for --out and --steps

    fake.format_table = lambda result: "TABLE"
    assert cli.main(["demo"]) == 0
    assert capsys.readouterr().out.endswith("TABLE\n")


def test_demo_missing_module_is_a_clean_error(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "graphlora.demo", None)
    assert cli.main(["demo"]) == 2
    assert "the demo is not available" in _error_line(capsys)


# ------------------------------------------------------------------------------ real processes


def _env() -> dict[str, str]:
    return dict(os.environ, HF_HUB_OFFLINE="1",
                PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))


def test_python_dash_m_help_lists_every_subcommand():
    proc = subprocess.run([sys.executable, "-m", "graphlora", "--help"], env=_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    for name in ("inspect", "transform", "export", "diff", "graph-text", "demo"):
        assert name in proc.stdout


def test_console_script_exit_codes(factory, mlp_rules, tmp_path):
    script = Path(sys.executable).with_name("graphlora")
    if not script.exists():
        pytest.skip("the graphlora console script is not installed (pip install -e .)")
    ok = subprocess.run([str(script), "inspect", f"{factory}:model_and_args", "--rules", str(mlp_rules)],
                        env=_env(), capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "rule #0 LoraRule(module_path='up', rank=2): 1 site" in ok.stdout
    bad = subprocess.run([str(script), "inspect", f"{factory}:broken", "--rules", str(mlp_rules)],
                         env=_env(), capture_output=True, text=True)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        f"graphlora inspect: error: MODEL '{factory}:broken': the factory raised RuntimeError: no weights here"]
