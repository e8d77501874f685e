"""graph_text / diff on FX graphs: canonical text, local node ids, grouping by module path.

LoRA insertion and weight quantization are simulated by hand with FX graph surgery (the real passes
live elsewhere), so these tests pin the diff machinery alone. Run as a script, this file prints the
graph text of a LoRA'd Llama: the cross-process stability test compares two such runs.
"""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from graphlora.diff import GraphDiff, diff, graph_text, read_graph_text, save_graph_text
from graphlora.errors import FileFormatError, InputError
from graphlora.meta import tag

REPO = Path(__file__).resolve().parents[1]
LINEAR = torch.ops.aten.linear.default
Q0 = "model.layers.0.self_attn.q_proj"
V0 = "model.layers.0.self_attn.v_proj"
Q1 = "model.layers.1.self_attn.q_proj"


class MLP(nn.Module):
    def __init__(self, hidden: int = 16):
        super().__init__()
        self.fc1 = nn.Linear(8, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, 4)
        self.register_buffer("scale", torch.ones(4))

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x))) * self.scale


def export_mlp(hidden: int = 16) -> torch.fx.GraphModule:
    return torch.export.export(MLP(hidden), (torch.randn(2, 8),), strict=False).module()


def export_llama() -> torch.fx.GraphModule:
    """A fresh copy of the exported 2-layer Llama (exported once per process: exports are slow)."""
    global _LLAMA
    if _LLAMA is None:
        _LLAMA = _export_llama()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch's pytree deprecation, raised by deepcopy
        return copy.deepcopy(_LLAMA)


_LLAMA: torch.fx.GraphModule | None = None


def _export_llama() -> torch.fx.GraphModule:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        num_hidden_layers=2,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 128, (1, 8))
    seq = torch.export.Dim("seq", min=2, max=64)
    program = torch.export.export(
        model,
        (),
        {"input_ids": ids, "use_cache": False},
        dynamic_shapes={"input_ids": {1: seq}, "use_cache": None},
        strict=False,
    )
    return program.module()


def _stack_path(node: torch.fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    return next(reversed(stack.values()))[0] if stack else ""


def _base_linear(gm: torch.fx.GraphModule, path: str) -> torch.fx.Node:
    return next(n for n in gm.graph.nodes if n.target is LINEAR and _stack_path(n) == path)


def add_lora(gm: torch.fx.GraphModule, path: str, rank: int, alpha: float = 8.0) -> torch.fx.GraphModule:
    """Insert ``base(x) + (x @ A.T @ B.T) * alpha / rank`` at ``path``, tagged like the real pass."""
    graph = gm.graph
    base = _base_linear(gm, path)
    x = base.args[0]
    out_features, in_features = gm.get_submodule(path).weight.shape
    owner = gm.get_submodule(path)
    owner.add_module("lora_A", nn.Linear(in_features, rank, bias=False))
    owner.add_module("lora_B", nn.Linear(rank, out_features, bias=False))
    with graph.inserting_before(base.next):
        a_w = graph.get_attr(f"{path}.lora_A.weight")
        b_w = graph.get_attr(f"{path}.lora_B.weight")
        a = tag(graph.call_function(LINEAR, (x, a_w)), "lora_a", module_path=path, adapter="default")
        b = tag(graph.call_function(LINEAR, (a, b_w)), "lora_b", module_path=path, adapter="default")
        scaled = tag(
            graph.call_function(torch.ops.aten.mul.Tensor, (b, alpha / rank)), "lora_scale", module_path=path
        )
        out = tag(graph.call_function(torch.ops.aten.add.Tensor, (base, scaled)), "lora_add", module_path=path)
    base.replace_all_uses_with(out, delete_user_cb=lambda user: user is not out)
    tag(base, "base", module_path=path)
    graph.lint()
    gm.recompile()
    return gm


def quantize_weight(gm: torch.fx.GraphModule, path: str, block_size: int = 32) -> torch.fx.GraphModule:
    """Store ``path.weight`` as packed uint8 and dequantize it in the graph, as the QLoRA pass will."""
    graph = gm.graph
    base = _base_linear(gm, path)
    owner = gm.get_submodule(path)
    out_features, in_features = owner.weight.shape
    del owner.weight
    owner.register_buffer("weight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8))
    with graph.inserting_before(base):
        dq = graph.call_function(torch.ops.aten.to.dtype, (base.args[1], torch.float32))
    tag(dq, "dequant", module_path=path, qtype="int4", block_size=block_size, axis=None, tensor=f"{path}.weight")
    base.args = (base.args[0], dq, *base.args[2:])
    graph.lint()
    gm.recompile()
    return gm


@pytest.fixture(scope="module")
def llama_text() -> str:
    return graph_text(export_llama())


def _lora_llama(ranks: dict[str, int]) -> torch.fx.GraphModule:
    gm = export_llama()
    for path, rank in ranks.items():
        add_lora(gm, path, rank)
    return gm


# --------------------------------------------------------------------------------------------------


def test_graph_text_lines_for_an_exported_mlp():
    text = graph_text(export_mlp())
    lines = text.splitlines()
    assert lines[0] == "# graphlora graph_text v1 fx"
    assert "x = placeholder :: f32[2,8]" in lines
    assert "fc1/weight = get_attr fc1.weight :: param f32[16,8]" in lines
    assert "scale = get_attr scale :: buffer f32[4]" in lines
    assert "fc1/linear#0 = call_function aten.linear.default(%x, %fc1/weight, %fc1/bias) :: f32[2,16]" in lines
    assert "act/gelu#0 = call_function aten.gelu.default(%fc1/linear#0) :: f32[2,16]" in lines
    assert "mul#0 = call_function aten.mul.Tensor(%fc2/linear#0, %scale) :: f32[2,4]" in lines
    assert lines[-1] == "output = output((%mul#0,))"
    assert "0x" not in text


def test_graph_text_of_symbolic_trace_uses_call_module_paths():
    text = graph_text(torch.fx.symbolic_trace(MLP()))
    assert "fc1/Linear#0 = call_module fc1[weight=f32[16,8], bias=f32[16]](%x)" in text
    assert "mul#0 = call_function operator.mul(%fc2/Linear#0, %scale)" in text


def test_symbolic_sizes_are_renumbered_and_texts_match_across_exports(llama_text):
    # torch numbers symbols by history (s70, s72, ...): a second export in this process must still
    # give the same text, with sizes renumbered from s0.
    assert "input_ids = placeholder :: i64[1,s0]" in llama_text
    assert not re.search(r"\bs[1-9]\d*\b", llama_text)
    assert graph_text(_export_llama()) == llama_text


def test_identical_graphs_have_an_empty_diff(llama_text):
    d = diff(llama_text, llama_text)
    assert not d
    assert (d.added, d.removed, d.changed) == ([], [], [])
    assert str(d) == "no differences" and d.summary == "no differences"


def test_lora_diff_names_exactly_the_changed_module_paths(llama_text):
    d = diff(llama_text, _lora_llama({Q0: 4, V0: 4}))
    assert isinstance(d, GraphDiff) and d
    assert list(d.by_module_path()) == [Q0, V0]
    assert not d.removed
    added_roles = sorted(c.role for c in d.added if c.module_path == Q0 and c.role)
    assert added_roles == ["lora_a", "lora_add", "lora_b", "lora_scale"]
    assert {c.id for c in d.added if c.module_path == Q0} >= {
        f"{Q0}/lora_a#0",
        f"{Q0}/lora_b#0",
        f"{Q0}/lora_A.weight",
        f"{Q0}/lora_B.weight",
    }
    # the base linear is re-tagged; its consumer in self_attn is rewired to the LoRA sum, and that
    # is reported under q_proj (what caused it), not as a change of self_attn
    rewired = [c for c in d.changed if c.rewired]
    assert {c.module_path for c in rewired} == {"model.layers.0.self_attn"}
    assert {c.caused_by for c in rewired} == {(Q0,), (V0,)}
    assert {c.id for c in d.changed if not c.rewired} == {f"{Q0}/linear#0", f"{V0}/linear#0"}
    grouped = d.grouped()
    assert grouped[0] == (
        f"{Q0}: +lora_A.weight +lora_B.weight +lora_A +lora_B +lora_scale +lora_add ~linear; 1 user rewired"
    )
    assert d.summary == (
        "+12 nodes (lora_a 2, lora_b 2, lora_scale 2, lora_add 2, other 4), -0 nodes, ~4 changed (2 rewired)"
    )
    text = str(d)
    assert text.startswith(d.summary + "\n  " + grouped[0])
    assert "--- before\n+++ after\n@@" in text
    assert f"+{Q0}/lora_a#0 = call_function aten.linear.default(%model.layers.0.input_layernorm/mul#1, " in text


def test_inserting_nodes_does_not_rename_nodes_elsewhere(llama_text):
    after = graph_text(_lora_llama({Q0: 4}))
    before_lines = set(llama_text.splitlines())
    changed_lines = [line for line in after.splitlines() if line not in before_lines]
    # every new or changed line belongs to q_proj, except the single rewired user in self_attn
    outside = [line for line in changed_lines if not line.startswith(Q0 + "/")]
    assert len(outside) == 1 and outside[0].startswith("model.layers.0.self_attn/view#0 = ")
    assert f"%{Q0}/lora_add#0" in outside[0]


def test_changing_one_site_changes_only_that_path():
    d = diff(_lora_llama({Q0: 4, Q1: 4}), _lora_llama({Q0: 4, Q1: 8}))
    assert list(d.by_module_path()) == [Q1]
    assert not d.added and not d.removed
    # the factor shapes and the scale alpha / rank
    assert {c.id for c in d.changed} == {f"{Q1}/lora_A.weight", f"{Q1}/lora_B.weight", f"{Q1}/lora_scale#0"}
    assert d.grouped() == [f"{Q1}: ~lora_A.weight ~lora_B.weight ~lora_scale"]
    assert f"-{Q1}/lora_A.weight = get_attr {Q1}.lora_A.weight :: param f32[4,64]" in str(d)
    assert f"+{Q1}/lora_A.weight = get_attr {Q1}.lora_A.weight :: param f32[8,64]" in str(d)


def test_diff_of_recorded_texts_matches_diff_of_graphs():
    gm = export_mlp()
    before_text = graph_text(gm)  # what the pipeline records before a pass
    add_lora(gm, "fc1", 2)
    from_texts = diff(before_text, graph_text(gm))
    from_graphs = diff(before_text, gm)
    assert str(from_texts) == str(from_graphs)
    assert list(from_texts.by_module_path()) == ["fc1"]


def test_removing_a_node_does_not_report_its_later_siblings_as_changed():
    # occurrence indices shift when a node of the same kind goes away in the same module path;
    # the diff aligns such groups by content, so only the removal (and its rewired user) shows
    def chain(constants):
        graph = torch.fx.Graph()
        h = graph.placeholder("x")
        for c in constants:
            h = graph.call_function(torch.add, (h, c))
            h.meta["nn_module_stack"] = {"blk": ("blk", nn.Module)}
        graph.output(h)
        return torch.fx.GraphModule(nn.Module(), graph)

    d = diff(chain([1, 2, 3, 4]), chain([1, 3, 4]))
    assert [c.before for c in d.removed] == ["blk/add#1 = call_function torch.add(%blk/add#0, 2)"]
    assert not d.added
    assert [(c.id, c.rewired, c.caused_by) for c in d.changed] == [("blk/add#1", True, ("blk",))]
    assert d.grouped() == ["blk: -add; 1 user rewired"]


def test_quantized_weight_is_summarised_with_its_qtype():
    before = export_llama()
    after = quantize_weight(_lora_llama({Q0: 4}), Q0, block_size=32)
    d = diff(before, after)
    assert list(d.by_module_path()) == [Q0]
    line = d.grouped()[0]
    assert line.startswith(f"{Q0}: +lora_A.weight +lora_B.weight +lora_A +lora_B +lora_scale +lora_add ~linear;")
    assert "weight float32 -> int4[g32]" in line
    text = graph_text(after)
    assert f"{Q0}/weight = get_attr {Q0}.weight :: buffer u8[64,32]" in text
    assert "role=dequant axis" not in text  # None-valued metadata is left out
    assert f"# role=dequant block_size=32 qtype=int4 tensor={Q0}.weight" in text


def test_lora_model_like_objects_and_exported_programs(tmp_path):
    gm = export_mlp()

    class LoraModelLike:
        graph_module = gm

    assert graph_text(LoraModelLike()) == graph_text(gm)
    program = torch.export.export(MLP(), (torch.randn(2, 8),), strict=False)
    assert graph_text(program) == graph_text(gm)
    torch.export.save(program, tmp_path / "mlp.pt2")
    # .pt2 archives are unpickled when read: only with the explicit opt-in (docs/security.md)
    assert read_graph_text(tmp_path / "mlp.pt2", allow_pickle=True) == graph_text(gm)
    assert graph_text(str(tmp_path / "mlp.pt2"), allow_pickle=True) == graph_text(gm)


def test_save_graph_text_is_atomic(tmp_path, monkeypatch):
    gm = export_mlp()
    path = save_graph_text(gm, tmp_path / "sub" / "mlp.graph.txt")
    assert read_graph_text(path) == graph_text(gm)
    add_lora(gm, "fc2", 2)

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        save_graph_text(gm, path)
    monkeypatch.undo()
    assert "lora_a" not in path.read_text()  # the old file is intact
    assert [p.name for p in path.parent.iterdir()] == ["mlp.graph.txt"]  # no temp file left behind


def test_bad_inputs_raise_graphlora_errors(tmp_path):
    with pytest.raises(InputError, match="torch.export.export"):
        graph_text(MLP())
    with pytest.raises(FileFormatError, match="no such file"):
        read_graph_text(tmp_path / "missing.graph.txt")
    (tmp_path / "notes.txt").write_text("hello\n")
    with pytest.raises(FileFormatError, match="not a graph text"):
        read_graph_text(tmp_path / "notes.txt")


def test_module_paths_from_older_nn_module_stack_spellings():
    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.dense = nn.Linear(4, 4)

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = nn.ModuleList([Layer()])

    root = nn.Module()
    root.encoder = Encoder()
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    spellings = [
        "L['self'].encoder.layer[0].dense",
        "L__self___encoder_layer_0_dense",
        "getattr(L['self'].encoder.layer, '0').dense",
        "encoder.layer.0.dense",
    ]
    h = graph.call_function(torch.add, (x, graph.get_attr("encoder.layer.0.dense.bias")))
    for raw in spellings:
        h = graph.call_function(torch.relu, (h,))
        h.meta["nn_module_stack"] = {"L__self__": ("", object), raw: (raw, nn.Linear)}
    graph.output(h)
    # flattened names (L__self___encoder_layer_0_dense) are resolved against the module's own names
    text = graph_text(torch.fx.GraphModule(root, graph))
    for n in range(4):
        assert f"encoder.layer.0.dense/relu#{n} = call_function torch.relu(" in text


@pytest.mark.slow
def test_graph_text_is_identical_across_processes(llama_text):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    procs = [
        subprocess.Popen(
            [sys.executable, __file__],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=dict(env, PYTHONHASHSEED=seed),
            cwd=str(REPO),
        )
        for seed in ("1", "2")
    ]
    outputs = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err.decode()[-2000:]
        outputs.append(out)
    assert outputs[0] == outputs[1]
    # and the same as in this process, where other exports ran before (different symbol history)
    assert outputs[0].decode() == graph_text(_lora_llama({Q0: 4, V0: 2}))
    assert llama_text.splitlines()[1] in outputs[0].decode().splitlines()


if __name__ == "__main__":
    warnings.filterwarnings("ignore")
    sys.stdout.write(graph_text(_lora_llama({Q0: 4, V0: 2})))
