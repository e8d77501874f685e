"""GPTQ in one pass over the depth: the block-wise schedule against the wave schedule.

The wave schedule runs the whole graph from its input up to each dependency wave's sites (what
GPTQPass did before block-wise calibration); the block-wise schedule caches each block's inputs
and runs each block only a few times. Both must quantize every weight identically up to float
noise, and the block-wise one must do work linear in the depth.
"""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import graphlora
from graphlora import QuantRule
from graphlora.block_split import find_transformer_blocks
from graphlora.errors import QuantizationError
from graphlora.graph_utils import share_storage_copy
from graphlora.passes.base import PassPipeline
from graphlora.passes.gptq import GPTQPass
from graphlora.passes.match_rules import MatchRulesPass
from graphlora.passes.sequential import WeightSolution, calibrate_sequentially
from graphlora.passes.weights import groups_by_weight
from graphlora.quant import calibrate_weight
from graphlora.sites import tagged_sites
from graphlora.trace import trace
from toy_models import Block, Stack


class Flat(nn.Module):
    """No repeated blocks: no module with integer-named children."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 32)
        self.b = nn.Linear(32, 32)
        self.c = nn.Linear(32, 4)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


def _stack_data(n: int = 4, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(4, 4, generator=g)
    return [(torch.randn(16, 4, generator=g) @ mix,) for _ in range(n)]


def _gptq(gm, rules, data, **options) -> tuple[torch.fx.GraphModule, GPTQPass]:
    gptq = GPTQPass(data, storage="packed", progress=False, **options)
    gm = PassPipeline([MatchRulesPass(rules), gptq])(gm)
    return gm, gptq


def _quantized_tensors(gm) -> dict[str, torch.Tensor]:
    return {k: v for k, v in gm.named_buffers() if k.startswith("graphlora_quant.weight.")}


def _assert_same_quantization(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Codes equal (a flip or two allowed for float noise), scales equal to float precision."""
    assert a.keys() == b.keys() and a
    for k in a:
        if a[k].dtype.is_floating_point:
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=0, msg=k)
        else:
            assert (a[k] != b[k]).float().mean().item() <= 1e-3, k


def _both_schedules(model, args, kwargs, rules, data):
    gm = trace(model, args, kwargs)
    waves, wave_pass = _gptq(share_storage_copy(gm), rules, data, schedule="waves")
    blocks, block_pass = _gptq(share_storage_copy(gm), rules, data, schedule="auto")
    assert wave_pass.schedule_used.kind == "waves"
    assert block_pass.schedule_used.kind == "blocks"
    assert block_pass.schedule_used.blocks == find_transformer_blocks(gm)
    assert block_pass.quantized and sorted(block_pass.quantized) == sorted(wave_pass.quantized)
    return _quantized_tensors(waves), _quantized_tensors(blocks), block_pass


@pytest.mark.slow
def test_llama_block_schedule_equals_wave_schedule():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=128)).eval()
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(0, 128, (2, 16), generator=g), "use_cache": False} for _ in range(3)]
    rules = [QuantRule(r".*_proj|lm_head", weight_qtype="int4", group_size=32, weight_calibration="gptq")]
    waves, blocks, used = _both_schedules(model, (), data[0], rules, data)
    _assert_same_quantization(waves, blocks)
    assert len(waves) == 2 * (2 * 7 + 1)  # codes and scales of 7 projections per layer and the head
    assert [label for label, _ in used.seconds] == ["<root>", "model.layers.0", "model.layers.1", "<root>"]


@pytest.mark.slow
def test_minilm_shaped_bert_block_schedule_equals_wave_schedule():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    # MiniLM-L6's architecture (BERT, post-norm, GELU MLP of 4x width), narrower and 3 layers deep
    config = BertConfig(num_hidden_layers=3, hidden_size=64, intermediate_size=256, num_attention_heads=4,
                        vocab_size=256, max_position_embeddings=64)
    model = BertModel(config).eval()
    g = torch.Generator().manual_seed(0)
    data = []
    for _ in range(3):
        mask = torch.ones(2, 16, dtype=torch.long)
        mask[1, 10:] = 0  # padding: the extended attention mask crosses every block boundary
        data.append({"input_ids": torch.randint(0, 256, (2, 16), generator=g), "attention_mask": mask})
    rules = [QuantRule(r"encoder.*(query|key|value|dense)|pooler\.dense", weight_qtype="int4", group_size=32,
                       weight_calibration="gptq")]
    waves, blocks, used = _both_schedules(model, (), data[0], rules, data)
    _assert_same_quantization(waves, blocks)
    assert len(waves) == 2 * (3 * 6 + 1)
    assert used.schedule_used.blocks == [f"encoder.layer.{i}" for i in range(3)]


def test_stack_block_schedule_equals_wave_schedule_float_storage():
    model = Stack(depth=3, dim=32).eval()
    data = _stack_data()
    rules = [QuantRule(".*", weight_qtype="int4", group_size=16, weight_calibration="gptq")]
    gm = trace(model, data[0], method="symbolic")
    results = {}
    for schedule in ("waves", "blocks"):
        gptq = GPTQPass(data, storage="float", progress=False, schedule=schedule)
        out = PassPipeline([MatchRulesPass(rules), gptq])(share_storage_copy(gm))
        results[schedule] = {k: v.detach().clone() for k, v in out.named_parameters()}
        assert gptq.schedule_used.kind == schedule
    assert results["waves"].keys() == results["blocks"].keys()
    for k in results["waves"]:
        torch.testing.assert_close(results["blocks"][k], results["waves"][k], rtol=1e-6, atol=0)
    # the model itself is untouched: its weights were substituted only inside the pass
    assert torch.equal(dict(gm.named_parameters())["blocks.0.up.weight"], model.blocks[0].up.weight)


class _MatmulCount(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.addmm.default, torch.ops.aten.mm.default, torch.ops.aten.bmm.default):
            self.count += 1
        return func(*args, **(kwargs or {}))


def _matmuls(depth: int, schedule: str) -> int:
    torch.manual_seed(0)
    model = Stack(depth=depth, dim=16).eval()
    data = _stack_data(n=2)
    gm = trace(model, data[0], method="symbolic")  # the blocks are found in symbolic traces too
    counter = _MatmulCount()
    gptq = GPTQPass(data, progress=False, schedule=schedule)
    MatchRulesPass([QuantRule(r"blocks.*", weight_qtype="int4", group_size=16, weight_calibration="gptq")])(gm)
    with counter:  # only the pass: tracing is not counted
        gptq(gm)
    return counter.count


def test_block_schedule_work_grows_linearly_with_depth():
    """Matrix products run by the pass (forwards, Hessians, GPTQ's updates): the block-wise
    schedule does the same work per block at any depth; the wave schedule re-runs the blocks
    before each wave, so its work per block grows with the depth."""
    blocks = {d: _matmuls(d, "auto") for d in (1, 2, 3)}
    waves = {d: _matmuls(d, "waves") for d in (1, 2, 3)}
    assert blocks[3] - blocks[2] == blocks[2] - blocks[1] > 0  # the same work for every added block
    assert waves[3] - waves[2] >= 1.3 * (waves[2] - waves[1])  # more work for each added block
    assert blocks[3] < waves[3]


def test_no_blocks_falls_back_to_waves_and_says_why(caplog):
    model = Flat().eval()
    data = _stack_data()
    rules = [QuantRule(".*", weight_qtype="int4", group_size=16, weight_calibration="gptq")]
    with caplog.at_level(logging.INFO, logger="graphlora.gptq"):
        _, gptq = _gptq(trace(model, data[0]), rules, data)
    assert gptq.schedule_used.kind == "waves"
    assert "no repeated blocks" in str(gptq.schedule_used)
    assert "GPTQ on 3 weights: wave schedule (the graph has no repeated blocks" in caplog.text
    with pytest.raises(graphlora.GraphloraError, match="block-wise calibration is not possible: the graph has no repeated blocks"):
        _gptq(trace(model, data[0]), rules, data, schedule="blocks")
    with pytest.raises(graphlora.GraphloraError, match="not modules of the traced graph"):
        _gptq(trace(model, data[0]), rules, data, blocks=["no.such.block"])
    with pytest.raises(graphlora.GraphloraError, match="unknown calibration schedule"):
        _gptq(trace(model, data[0]), rules, data, schedule="fast")


def test_bad_block_pattern_is_an_input_error_naming_the_caller():
    data = _stack_data(n=2)
    rules = [QuantRule(r"blocks.*", weight_qtype="int4", group_size=16, weight_calibration="gptq")]
    gm = trace(Stack(depth=2, dim=32).eval(), data[0], method="symbolic")
    with pytest.raises(graphlora.InputError, match=r"GPTQ blocks: pattern is not a valid regular expression"):
        _gptq(gm, rules, data, blocks="blocks.(")
    _, gptq = _gptq(gm, rules, data, blocks=r"blocks\.1")
    assert gptq.schedule_used.blocks == ["blocks.1"]


def test_progress_bar_counts_blocks(capsys):
    data = _stack_data(n=2)
    rules = [QuantRule(r"blocks.*", weight_qtype="int4", group_size=16, weight_calibration="gptq")]
    gptq = GPTQPass(data, progress=True)
    PassPipeline([MatchRulesPass(rules), gptq])(trace(Stack(depth=3, dim=32).eval(), data[0], method="symbolic"))
    err = capsys.readouterr().err
    assert "GPTQ blocks" in err and "0/3" in err  # a tick per block (the root segment has none)
    assert [label for label, _ in gptq.seconds] == ["<root>", "blocks.0", "blocks.1", "blocks.2"]


class _RecordInputs:
    """A toy data-driven method: keeps every input it is shown, quantizes round-to-nearest."""

    def __init__(self):
        self.seen: dict[str, list[torch.Tensor]] = {}
        self.reductions = 0

    def collector(self, name, in_features):
        method = self

        class Keep:
            def add(self, x):
                method.seen.setdefault(name, []).append(x.clone())

        return Keep()

    def reduce(self, collectors):
        self.reductions += 1

    def solve(self, name, sites, collected):
        w = sites[0].param_value()
        enc = calibrate_weight(w, "int4", axis=0, block_size=16)
        return WeightSolution(enc, enc.quantize(w))


def test_engine_shows_each_site_the_inputs_of_the_model_quantized_so_far():
    """What makes a method sequential: a site's inputs are computed with every weight before it
    already quantized, which is what the final quantized model computes at that site."""
    model = Stack(depth=3, dim=32).eval()
    data = _stack_data(n=3)
    gm = trace(model, data[0], method="symbolic")
    MatchRulesPass([QuantRule(r"blocks.*|head", weight_qtype="int4", weight_calibration="gptq")])(gm)
    groups = groups_by_weight(tagged_sites(gm))
    method = _RecordInputs()
    result = calibrate_sequentially(gm, groups, data, method, progress=False)
    assert result.schedule.kind == "blocks"
    assert list(result.solutions) == list(groups)  # dependency order: up, down of each block, head
    assert method.reductions == len(groups)  # one wave per weight here
    # the graph was not changed by the engine: it still computes the float model
    torch.testing.assert_close(gm(*data[0]), model(*data[0]))
    # the quantized model, with every weight replaced by its solution
    quantized = Stack(depth=3, dim=32).eval()
    quantized.load_state_dict(model.state_dict())
    with torch.no_grad():
        for name, sol in result.solutions.items():
            quantized.get_parameter(name).copy_(sol.encoding.dequantize(sol.codes))
    inputs: dict[str, list[torch.Tensor]] = {}
    hooks = [quantized.get_submodule(name.rpartition(".")[0]).register_forward_pre_hook(
        lambda m, args, name=name: inputs.setdefault(name, []).append(args[0].clone())) for name in groups]
    with torch.no_grad():
        for batch in data:
            quantized(*batch)
    for h in hooks:
        h.remove()
    for name in groups:
        assert len(method.seen[name]) == len(data)
        for got, want in zip(method.seen[name], inputs[name]):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_weight_tied_across_blocks_falls_back_to_waves():
    """A module called in two blocks (ALBERT's sharing): its weight needs the inputs of both,
    so no single block can quantize it; the wave schedule does."""

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(Block(4) for _ in range(2))
            self.layers[1].up = self.layers[0].up

        def forward(self, x):
            for layer in self.layers:
                x = layer(x)
            return x

    data = _stack_data()
    # only the tied weight: with the others too no order exists (each waits for the other's output)
    rules = [QuantRule(r"layers\.\d\.up", weight_qtype="int4", group_size=4, weight_calibration="gptq")]
    gm = trace(Tied().eval(), data[0])
    waves, wave_pass = _gptq(share_storage_copy(gm), rules, data, schedule="waves")
    blocks, block_pass = _gptq(share_storage_copy(gm), rules, data)
    assert block_pass.schedule_used.kind == "waves"
    assert "is used in several segments (layers.0, layers.1)" in str(block_pass.schedule_used)
    assert len(block_pass.quantized) == 1
    _assert_same_quantization(_quantized_tensors(waves), _quantized_tensors(blocks))


def test_weight_used_before_and_after_the_blocks_falls_back_to_waves():
    class Around(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)
            self.layers = nn.ModuleList(Block(4) for _ in range(2))

        def forward(self, x):
            h = self.proj(x)
            for layer in self.layers:
                h = layer(h)
            return self.proj(h)

    data = _stack_data()
    rules = [QuantRule(r"proj", weight_qtype="int4", group_size=4, weight_calibration="gptq")]
    _, gptq = _gptq(trace(Around().eval(), data[0]), rules, data)
    assert gptq.schedule_used.kind == "waves"
    assert "proj.weight is used in several segments" in str(gptq.schedule_used)
    assert gptq.quantized == ["proj.weight"]
