"""`graphlora diff A B`: exit 0 when identical, 1 when different, 2 on error (one line)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
import torch
import torch.nn as nn
from onnx import TensorProto, helper

from graphlora import cli
from graphlora.diff import save_graph_text

REPO = Path(__file__).resolve().parents[1]


class Net(nn.Module):
    def __init__(self, width: int = 16):
        super().__init__()
        self.fc1 = nn.Linear(8, width)
        self.fc2 = nn.Linear(width, 4)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def _program(width: int = 16) -> torch.export.ExportedProgram:
    return torch.export.export(Net(width), (torch.randn(2, 8),), strict=False)


def _onnx(path: Path, out_features: int) -> Path:
    x = helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, out_features])
    w = helper.make_tensor("proj.weight", TensorProto.FLOAT, [4, out_features], [0.0] * (4 * out_features))
    node = helper.make_node("MatMul", ["X", "proj.weight"], ["Y"], name="/proj/MatMul")
    model = helper.make_model(helper.make_graph([node], "g", [x], [y], [w]))
    onnx.save(model, path)
    return path


@pytest.fixture
def texts(tmp_path):
    a = save_graph_text(_program(16), tmp_path / "a.graph.txt")
    b = save_graph_text(_program(16), tmp_path / "b.graph.txt")
    c = save_graph_text(_program(32), tmp_path / "c.graph.txt")
    return a, b, c


def test_identical_graph_texts_exit_0(texts, capsys):
    a, b, _ = texts
    assert cli.main(["diff", str(a), str(b)]) == 0
    assert capsys.readouterr().out == "no differences\n"


def test_different_graph_texts_exit_1_and_print_the_diff(texts, capsys):
    a, _, c = texts
    assert cli.main(["diff", str(a), str(c)]) == 1
    out = capsys.readouterr().out
    assert out.startswith("+0 nodes, -0 nodes, ~")
    assert "\n  fc1: ~weight ~bias ~linear\n" in out
    assert "-fc1/weight = get_attr fc1.weight :: param f32[16,8]" in out
    assert "+fc1/weight = get_attr fc1.weight :: param f32[32,8]" in out

    assert cli.main(["diff", "--summary", str(a), str(c)]) == 1
    summary = capsys.readouterr().out
    assert "fc1: ~weight" in summary and "--- before" not in summary
    assert cli.main(["diff", "-q", str(a), str(c)]) == 1
    assert capsys.readouterr().out == ""


def test_pt2_and_onnx_files(tmp_path, capsys):
    torch.export.save(_program(16), tmp_path / "a.pt2")
    torch.export.save(_program(16), tmp_path / "b.pt2")
    torch.export.save(_program(32), tmp_path / "c.pt2")
    # .pt2 archives are unpickled when read: only with --allow-pickle (docs/security.md)
    assert cli.main(["diff", "--allow-pickle", str(tmp_path / "a.pt2"), str(tmp_path / "b.pt2")]) == 0
    assert cli.main(["diff", "--allow-pickle", str(tmp_path / "a.pt2"), str(tmp_path / "c.pt2")]) == 1
    # a saved graph text and the .pt2 it came from are the same graph
    save_graph_text(tmp_path / "a.pt2", tmp_path / "a.graph.txt", allow_pickle=True)
    assert cli.main(["diff", "--allow-pickle", str(tmp_path / "a.graph.txt"), str(tmp_path / "b.pt2")]) == 0

    one, two = _onnx(tmp_path / "one.onnx", 3), _onnx(tmp_path / "two.onnx", 5)
    capsys.readouterr()
    assert cli.main(["diff", str(one), str(one)]) == 0
    assert cli.main(["diff", str(one), str(two)]) == 1
    assert "proj: ~weight ~MatMul" in capsys.readouterr().out


def test_graph_text_subcommand_writes_a_saved_graph(tmp_path, capsys):
    onnx_path = _onnx(tmp_path / "m.onnx", 3)
    assert cli.main(["graph-text", str(onnx_path), "-o", str(tmp_path / "m.graph.txt")]) == 0
    assert cli.main(["diff", str(onnx_path), str(tmp_path / "m.graph.txt")]) == 0
    capsys.readouterr()
    assert cli.main(["graph-text", str(onnx_path)]) == 0
    assert capsys.readouterr().out.startswith("# graphlora graph_text v1 onnx\n")


@pytest.mark.parametrize("content", [None, b"not a graph\n", b"\x00\x01garbage"])
def test_errors_exit_2_with_one_line(tmp_path, texts, capsys, content):
    bad = tmp_path / ("bad.txt" if content and content.startswith(b"not") else "bad.bin")
    if content is not None:
        bad.write_bytes(content)
    assert cli.main(["diff", str(texts[0]), str(bad)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("graphlora diff: error: ") and str(bad) in lines[0]


def test_verbose_shows_the_traceback(tmp_path, capsys):
    assert cli.main(["diff", "--verbose", str(tmp_path / "a.onnx"), str(tmp_path / "b.onnx")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "FileFormatError" in err


def test_usage_errors_and_help(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["diff", "only-one"])
    assert info.value.code == 2
    assert cli.main([]) == 2  # no subcommand: help on stderr
    assert "diff" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        cli.main(["diff", "--help"])
    assert info.value.code == 0
    assert "*.graph.txt" in capsys.readouterr().out


def test_subcommands_are_registered_by_one_decorated_function(monkeypatch, capsys):
    monkeypatch.setattr(cli.app, "_SUBCOMMANDS", dict(cli.app._SUBCOMMANDS))

    def arguments(parser):
        parser.add_argument("--times", type=int, default=1)

    @cli.subcommand("hello", help="say hello", arguments=arguments)
    def hello(args):
        print("hello " * args.times)
        return 0

    assert cli.main(["hello", "--times", "2"]) == 0
    assert capsys.readouterr().out.strip() == "hello hello"
    with pytest.raises(ValueError, match="registered twice"):
        cli.subcommand("hello", help="again")(hello)


def test_python_dash_m_graphlora(texts):
    a, b, c = texts
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    same = subprocess.run([sys.executable, "-m", "graphlora", "diff", str(a), str(b)], env=env, capture_output=True)
    assert same.returncode == 0, same.stderr.decode()
    differ = subprocess.run([sys.executable, "-m", "graphlora", "diff", str(a), str(c)], env=env, capture_output=True)
    assert differ.returncode == 1 and b"fc1: ~weight" in differ.stdout
