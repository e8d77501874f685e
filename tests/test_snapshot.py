"""Graph snapshot assertions: graphlora.testing directly, and the pytest plugin through pytester."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from graphlora import testing
from graphlora.diff import graph_text
from graphlora.meta import tag
from graphlora.testing import GraphSnapshotError, assert_graph_snapshot

pytest_plugins = ["pytester"]

GOLDENS = Path(__file__).parent / "snapshots" / "diff"
LINEAR = torch.ops.aten.linear.default


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def exported_mlp(lora_rank: int | None = None) -> torch.fx.GraphModule:
    """The exported MLP, optionally with a LoRA branch inserted by hand on fc1."""
    gm = torch.export.export(MLP(), (torch.randn(2, 8),), strict=False).module()
    if lora_rank is not None:
        graph = gm.graph
        base = next(n for n in graph.nodes if n.target is LINEAR)
        gm.fc1.add_module("lora_A", nn.Linear(8, lora_rank, bias=False))
        gm.fc1.add_module("lora_B", nn.Linear(lora_rank, 16, bias=False))
        with graph.inserting_before(base.next):
            a = graph.call_function(LINEAR, (base.args[0], graph.get_attr("fc1.lora_A.weight")))
            b = graph.call_function(LINEAR, (a, graph.get_attr("fc1.lora_B.weight")))
            out = graph.call_function(torch.ops.aten.add.Tensor, (base, b))
        tag(a, "lora_a", module_path="fc1", adapter="default")
        tag(b, "lora_b", module_path="fc1", adapter="default")
        tag(out, "lora_add", module_path="fc1")
        base.replace_all_uses_with(out, delete_user_cb=lambda user: user is not out)
        gm.recompile()
    return gm


@pytest.fixture(autouse=True)
def _no_update_env(monkeypatch):
    monkeypatch.delenv(testing.UPDATE_ENV, raising=False)


def test_checked_in_golden_matches():
    # tests/snapshots/diff/mlp_lora.graph.txt pins the canonical text format itself
    assert_graph_snapshot(exported_mlp(lora_rank=2), "mlp_lora", snapshot_dir=GOLDENS)


def test_missing_golden_fails_with_instructions_and_creates_nothing(tmp_path):
    with pytest.raises(GraphSnapshotError) as info:
        assert_graph_snapshot(exported_mlp(), "mlp", snapshot_dir=tmp_path)
    message = str(info.value)
    assert "no golden file" in message and "--graphlora-update-snapshots" in message
    assert "GRAPHLORA_UPDATE_SNAPSHOTS=1" in message
    assert list(tmp_path.iterdir()) == []


def test_mismatch_fails_with_the_grouped_diff(tmp_path):
    assert_graph_snapshot(exported_mlp(), "mlp", snapshot_dir=tmp_path, update=True)
    golden = tmp_path / "mlp.graph.txt"
    assert golden.read_text() == graph_text(exported_mlp())
    assert_graph_snapshot(exported_mlp(), "mlp", snapshot_dir=tmp_path)  # passes
    with pytest.raises(AssertionError) as info:
        assert_graph_snapshot(exported_mlp(lora_rank=2), "mlp", snapshot_dir=tmp_path)
    message = str(info.value)
    assert "differs from" in message
    assert "\n  fc1: +lora_A.weight +lora_A +lora_B.weight +lora_B +lora_add; 1 user rewired\n" in message
    assert "+fc1/lora_a#0 = call_function aten.linear.default(%x, %fc1/lora_A.weight)" in message
    assert golden.read_text() == graph_text(exported_mlp())  # unchanged on failure


def test_env_var_rewrites_goldens(tmp_path, monkeypatch):
    monkeypatch.setattr(testing, "_sessions", [])  # keep this run's report free of tmp files
    assert_graph_snapshot(exported_mlp(), "nested/mlp", snapshot_dir=tmp_path, update=True)
    monkeypatch.setenv(testing.UPDATE_ENV, "1")
    assert testing.update_requested()
    assert_graph_snapshot(exported_mlp(lora_rank=2), "nested/mlp", snapshot_dir=tmp_path)
    monkeypatch.delenv(testing.UPDATE_ENV)
    assert_graph_snapshot(exported_mlp(lora_rank=2), "nested/mlp", snapshot_dir=tmp_path)
    assert "lora_a" in (tmp_path / "nested" / "mlp.graph.txt").read_text()


def test_windows_line_endings_in_goldens_are_accepted(tmp_path):
    golden = tmp_path / "mlp.graph.txt"
    golden.write_bytes(graph_text(exported_mlp()).replace("\n", "\r\n").encode())
    assert_graph_snapshot(exported_mlp(), "mlp", snapshot_dir=tmp_path)


@pytest.mark.parametrize("name", ["../escape", "a b", "", "/abs"])
def test_unsafe_snapshot_names_are_rejected(tmp_path, name):
    with pytest.raises(ValueError, match="invalid snapshot name"):
        assert_graph_snapshot(exported_mlp(), name, snapshot_dir=tmp_path)


# --------------------------------------------------------------------------------------------------
# the pytest plugin, as a user gets it
# --------------------------------------------------------------------------------------------------

USER_TEST = """
import torch, torch.nn as nn

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, {width})

    def forward(self, x):
        return torch.relu(self.proj(x))

def test_net(graph_snapshot):
    graph_snapshot(torch.fx.symbolic_trace(Net()))

def test_named(graph_snapshot):
    gm = torch.fx.symbolic_trace(Net())
    graph_snapshot(gm, "custom", snapshot_dir="goldens")
"""


def _plugin_args() -> list[str]:
    """Load the plugin explicitly only when it is not installed as a pytest11 entry point."""
    installed = any(ep.name == "graphlora" for ep in importlib.metadata.entry_points(group="pytest11"))
    return [] if installed else ["-p", "graphlora.pytest_plugin"]


def test_plugin_fixture_fails_then_updates_then_passes(pytester, monkeypatch):
    pytester.makepyfile(test_user=USER_TEST.format(width=3))
    args = _plugin_args()

    result = pytester.runpytest(*args)
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines(["*no golden file*--graphlora-update-snapshots*"])
    assert not (pytester.path / "snapshots").exists()

    result = pytester.runpytest(*args, "--graphlora-update-snapshots")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["*graphlora: wrote 2 graph snapshot(s)*"])
    golden = pytester.path / "snapshots" / "test_user.test_net.graph.txt"
    assert golden.read_text().startswith("# graphlora graph_text v1 fx\n")
    assert (pytester.path / "goldens" / "custom.graph.txt").is_file()
    assert not testing.update_requested()  # the inner session's option does not leak

    pytester.runpytest(*args).assert_outcomes(passed=2)

    pytester.makepyfile(test_user=USER_TEST.format(width=5))
    result = pytester.runpytest(*args)
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines(
        [
            "*differs from*",
            "*proj: ~Linear*",
            "*--- golden*",
            "*+++ actual*",
            "*-proj/Linear#0 = call_module proj[[]weight=f32[[]3,4], bias=f32[[]3]](%x)*",
        ]
    )

    monkeypatch.setenv(testing.UPDATE_ENV, "1")
    pytester.runpytest(*args).assert_outcomes(passed=2)
    assert "proj[weight=f32[5,4], bias=f32[5]]" in golden.read_text()


def test_plugin_registers_its_option(pytester):
    result = pytester.runpytest(*_plugin_args(), "--help")
    result.stdout.fnmatch_lines(["*--graphlora-update-snapshots*"])
