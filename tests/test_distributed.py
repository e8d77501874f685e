"""graphlora under torch.distributed: DDP, FSDP2 per block, calibration across ranks, rank-0 saves.

Single-process tests cover the pieces that need no process group (block discovery, the graph
split FSDP runs, no-op paths, errors). The multi-process tests start ONE 2-rank gloo job on CPU
(``torch.multiprocessing``, spawn, file-store rendezvous so no port can be taken by someone
else) that runs every scenario in turn; each scenario writes its measurements per rank to JSON
and the tests below assert on them. One job instead of one per test keeps the suite's cost to
one interpreter start and one model trace per rank. A scenario that fails stops the job (the
ranks could no longer agree on collectives); its traceback is reported by every later test.
"""

from __future__ import annotations

import copy
import datetime
import json
import os
import time
import traceback
import types
from pathlib import Path

import pytest
import torch
from torch import nn

import graphlora
from graphlora import DistributedError, LoraRule, QuantRule
from graphlora import collectives
from graphlora import distributed as gd
from graphlora.distributed import fsdp as gd_fsdp
from graphlora.distributed import saving as gd_saving
from graphlora.distributed import split as gd_split
from toy_models import Stack, canonical_execution

JOB_TIMEOUT = 240  # seconds for the whole 2-rank job (~25 s on 2 idle CPU cores, ~60 s under load)
WORLD = 2
TOL = 1e-5  # float32 agreement with the single-process reference (measured: ~1e-8)


# =============================================================================================
# models


def llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128,
    )


def llama_lora(**rule_options) -> graphlora.LoraModel:
    """The 2-layer Llama, LoRA on every projection, with non-zero B so every factor gets a
    gradient from the first step (the same on every rank: fixed seeds)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config())
    ids = torch.randint(0, 128, (2, 8))
    lm = graphlora.transform(model, [LoraRule(r".*_proj", rank=4, **rule_options)], (ids,), {"use_cache": False})
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, p in lm.named_lora_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return lm


def lm_loss(model, ids):
    out = model(ids, use_cache=False)
    logits = out.logits if hasattr(out, "logits") else out[0]
    return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def global_batch(step: int) -> torch.Tensor:
    """The batch of one step over all ranks; rank r trains on rows [2r, 2r + 2)."""
    return torch.randint(0, 128, (2 * WORLD, 8), generator=torch.Generator().manual_seed(100 + step))


def local_batch(step: int, rank: int) -> torch.Tensor:
    return global_batch(step)[2 * rank : 2 * rank + 2]


def stack_lora(**kw) -> graphlora.LoraModel:
    torch.manual_seed(0)
    model = Stack(**kw)
    lm = graphlora.transform(model, [LoraRule(r"blocks\.\d+\.(up|down)|head", rank=2)], (torch.randn(5, 4),))
    with torch.no_grad():
        for _, p in lm.named_lora_parameters():
            p.normal_(0, 0.2)
    return lm


# =============================================================================================
# single-process tests


@pytest.fixture(scope="module")
def llama():
    """One traced Llama LoraModel for the single-process tests that only run it forward."""
    return llama_lora()


def test_find_transformer_blocks_llama_and_pattern(llama):
    lm = llama
    assert gd.find_transformer_blocks(lm) == ["model.layers.0", "model.layers.1"]
    assert gd.find_transformer_blocks(lm, r"model\.layers\.1") == ["model.layers.1"]
    # the adapter tree mirrors the block paths but is never taken for blocks
    assert not any(b.startswith("graphlora_") for b in gd.find_transformer_blocks(lm, r".*layers\.\d+"))


def test_find_transformer_blocks_outermost_only():
    lm = stack_lora()
    assert gd.find_transformer_blocks(lm) == ["blocks.0", "blocks.1", "blocks.2"]


def _run_split(lm, blocks, x):
    """Run a model through the split graphs without FSDP (the code path FSDP hooks into)."""
    gm = lm.graph_module
    containers = gd_fsdp._adapter_containers(gm, blocks)
    split = gd_split.split_graph(gm.graph, blocks, containers)
    for c in {c for cs in containers.values() for c in cs}:
        gm.get_submodule(c).__dict__["forward"] = gd_split.noop_forward
    try:
        for b, graph in split.blocks.items():
            gm.get_submodule(b).__dict__["forward"] = types.MethodType(gd_split._compile(graph, b), gm)
        return gd_split._compile(split.root, "root")(gm, *x)
    finally:
        for b in blocks:
            gm.get_submodule(b).__dict__.pop("forward", None)
        for c in {c for cs in containers.values() for c in cs}:
            gm.get_submodule(c).__dict__.pop("forward", None)


def test_split_graph_computes_what_the_flat_graph_computes(llama):
    lm = llama
    ids = torch.randint(0, 128, (2, 8))
    blocks = gd.find_transformer_blocks(lm)
    # the split runs the canonical graph (FSDP shards it as traced); single-process execution
    # fuses sibling linears (q/k/v as one GEMM), which sums in another order: compare like with like
    with canonical_execution(lm):
        expected = lm(ids, use_cache=False).logits
    out = _run_split(lm, blocks, (ids, False))
    torch.testing.assert_close(out.logits, expected, rtol=0, atol=0)
    # each block is one call in the root graph, with the block's LoRA reads inside it
    containers = gd_fsdp._adapter_containers(lm.graph_module, blocks)
    split = gd_split.split_graph(lm.graph_module.graph, blocks, containers)
    calls = [n.target for n in split.root.nodes if n.op == "call_module"]
    assert [c for c in calls if c in blocks] == blocks
    assert not any(str(n.target).startswith("model.layers.") for n in split.root.nodes if n.op == "get_attr")
    inside = {str(n.target) for n in split.blocks["model.layers.1"].nodes if n.op == "get_attr"}
    assert "graphlora_adapters.default.model.layers.1.self_attn.q_proj.lora_A.weight" in inside
    assert all(t.startswith(("model.layers.1.", "graphlora_adapters.default.model.layers.1.")) for t in inside)


def test_split_graph_gradients_match():
    lm = stack_lora()
    lm.fused_execution = False  # the canonical graph, which the split runs (see above)
    x = torch.randn(5, 4)
    lm(x).square().sum().backward()
    ref = {k: p.grad.clone() for k, p in lm.named_lora_parameters()}
    lm.zero_grad()
    _run_split(lm, gd.find_transformer_blocks(lm), (x,)).square().sum().backward()
    for k, p in lm.named_lora_parameters():
        torch.testing.assert_close(p.grad, ref[k], rtol=0, atol=0)


def _split(lm, blocks):
    return gd_split.split_graph(lm.graph_module.graph, blocks, gd_fsdp._adapter_containers(lm.graph_module, blocks))


def test_split_refuses_a_block_weight_used_outside_the_block():
    lm = stack_lora(tie=True)
    blocks = gd.find_transformer_blocks(lm)
    with pytest.raises(DistributedError, match=r"blocks\.0\.down\.weight belongs to block 'blocks\.0'"):
        _split(lm, blocks)
    _split(lm, blocks[1:])  # without that block the rest splits


def test_split_refuses_interleaved_blocks():
    lm = stack_lora(inline=True)
    with pytest.raises(DistributedError, match="interleaved"):
        _split(lm, gd.find_transformer_blocks(lm))
    with pytest.raises(DistributedError, match="no graph node runs in block"):
        _split(lm, ["no.such.block"])


def test_split_moves_root_code_that_reads_a_block_after_its_call():
    """Root code placed between a block's operations (e.g. by a hook) that reads the block's
    values runs after the block's call; the block does not depend on it, so that is exact."""
    from torch import fx

    g = fx.Graph()
    x = g.placeholder("x")
    a = g.call_function(torch.relu, (x,))
    r = g.call_function(torch.neg, (a,))
    b = g.call_function(torch.sigmoid, (a,))
    g.output((b, r))
    for node, path in ((a, "blk"), (r, "other"), (b, "blk")):
        node.meta["nn_module_stack"] = {path: (path, "M")}
    split = gd_split.split_graph(g, ["blk"], {})
    assert [n.op for n in split.root.nodes] == ["placeholder", "call_module", "call_function", "call_function", "call_function", "output"]
    root = nn.Module()
    root.blk = nn.Module()
    root.blk.forward = types.MethodType(gd_split._compile(split.blocks["blk"], "blk"), root)
    t = torch.randn(5)
    out = gd_split._compile(split.root, "root")(root, t)
    torch.testing.assert_close(out[0], torch.sigmoid(torch.relu(t)))
    torch.testing.assert_close(out[1], -torch.relu(t))


def test_split_puts_unattributed_nodes_between_a_blocks_nodes_into_the_block():
    from torch import fx

    g = fx.Graph()
    x = g.placeholder("x")
    a = g.call_function(torch.relu, (x,))
    c = g.call_function(torch.neg, (a,))  # no module path (e.g. code in the parent's forward)
    b = g.call_function(torch.sigmoid, (c,))
    g.output(b)
    a.meta["nn_module_stack"] = b.meta["nn_module_stack"] = {"blk": ("blk", "M")}
    split = gd_split.split_graph(g, ["blk"], {})
    assert [n.target for n in split.blocks["blk"].nodes if n.op == "call_function"] == [torch.relu, torch.neg, torch.sigmoid]


def test_no_process_group_paths(tmp_path):
    from graphlora.quant.observers import MinMaxObserver

    obs = MinMaxObserver("x")
    obs.observe(torch.tensor([1.0, -2.0]))
    gd.sync_stats([obs])  # no process group: nothing to reduce, nothing changes
    assert float(obs.min_val) == -2.0 and int(obs.count) == 2
    lm = stack_lora()
    with pytest.raises(DistributedError, match="init_process_group"):
        gd.shard_lora_model(lm)
    with pytest.raises(DistributedError, match="init_process_group"):
        gd.wrap_ddp(lm)
    with pytest.raises(DistributedError, match="LoraModel"):
        gd.unwrap_model(nn.Linear(2, 2))
    result = gd.save_on_rank0(lm, tmp_path / "a", only_save_adapters=True)
    assert "adapter_model.safetensors" in result.files
    assert set(gd.gather_lora_state_dict(lm)) == set(lm.lora_state_dict())


def test_sync_stats_inputs():
    from graphlora.quant.observers import HistogramObserver, MinMaxObserver

    # checked even without a process group, so mistakes show up in single-process runs
    with pytest.raises(DistributedError, match="state_tensors"):
        gd.sync_stats([object()])
    # a module: its observer submodules, each once, in module order
    holder = nn.Module()
    holder.a = MinMaxObserver("a")
    holder.b = nn.Sequential(HistogramObserver("b", bins=16))
    holder.c = holder.a
    assert [o.name for o in collectives._stat_objects(holder)] == ["a", "b"]
    assert [o.name for o in collectives._stat_objects({"x": holder.a, "y": holder.a})] == ["a"]
    assert collectives._reduce_plan(holder.b.get_submodule("0")) == [
        {"exponent": "max", "min_val": "min", "max_val": "max", "count": "sum"}, {"hist": "sum"}
    ]


def test_docs_training_script_compiles_and_uses_this_api():
    """docs/distributed.md's torchrun script (run by hand with torchrun on 2 CPU ranks, DDP and
    FSDP, LoRA and QLoRA) must at least stay valid Python calling functions that exist."""
    import ast
    import re as _re

    text = (Path(__file__).parent.parent / "docs" / "distributed.md").read_text()
    script = _re.search(r"```python file=train_lora_distributed\.py\n(.*?)```", text, _re.DOTALL).group(1)
    tree = ast.parse(script)
    used = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "gd"}
    assert used == {"wrap_ddp", "shard_lora_model", "find_transformer_blocks", "save_on_rank0"}
    assert all(hasattr(gd, name) for name in used)


# =============================================================================================
# the 2-rank job


def _init(rank: int, init_file: str) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    torch.set_num_threads(1)  # two ranks on two cores
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
        timeout=datetime.timedelta(seconds=120),  # a broken scenario fails, not hangs
    )


def _max_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b), sorted(set(a) ^ set(b))
    return max(float((a[k].detach().float() - b[k].detach().float()).abs().max()) for k in a)


def _full(t):
    return t.full_tensor() if gd_saving._is_dtensor(t) else t


def _train_reference(ref, steps: int, lr: float):
    """Single process, the concatenated batch: grads of step 0 and the final LoRA weights."""
    opt = torch.optim.SGD(list(ref.lora_parameters()), lr=lr)
    grads0 = None
    for step in range(steps):
        lm_loss(ref, global_batch(step)).backward()
        if step == 0:
            grads0 = {k: p.grad.clone() for k, p in ref.named_lora_parameters()}
        opt.step()
        opt.zero_grad()
    return grads0, ref.lora_state_dict()


def _train(model, lora, rank: int, steps: int, lr: float):
    opt = torch.optim.SGD(list(lora.lora_parameters()), lr=lr)
    grads0 = None
    for step in range(steps):
        lm_loss(model, local_batch(step, rank)).backward()
        if step == 0:
            grads0 = {k: _full(p.grad).clone() for k, p in lora.named_lora_parameters()}
            frozen_grads = [n for n, p in lora.named_parameters() if not p.requires_grad and p.grad is not None]
        opt.step()
        opt.zero_grad()
    return grads0, frozen_grads


def scenario_observers(rank: int, out: Path) -> dict:
    """sync_stats on observers and Hessian accumulators with different data on each rank."""
    from graphlora.quant.gptq import HessianAccumulator
    from graphlora.quant.observers import HistogramObserver, MinMaxObserver

    def make():
        return [
            MinMaxObserver("minmax"),
            HistogramObserver("percentile", mode="percentile", percentile=99.0, bins=256),
            HistogramObserver("mse", mode="mse", bins=256, candidates=20),
        ], HessianAccumulator(6, name="h")

    def data(r):  # rank 1's values are ~8x larger: the histograms must agree on a wider range
        g = torch.Generator().manual_seed(10 + r)
        return [torch.randn(50, 6, generator=g) * (1 + 7 * r) + r for _ in range(3)]

    observers, hess = make()
    for x in data(rank):
        for o in observers:
            o.observe(x)
        hess.add(x)
    gd.sync_stats(observers + [observers[0], hess])  # the repeat must not be reduced twice
    result = {
        "encodings": [[float(e.scale), float(e.zero_point)] for e in (o.compute_encoding("uint8") for o in observers)],
        "hessian_n": int(hess.n),
    }
    if rank == 0:
        ref_obs, ref_hess = make()
        for r in range(WORLD):
            for x in data(r):
                for o in ref_obs:
                    o.observe(x)
                ref_hess.add(x)
        result["reference"] = [[float(e.scale), float(e.zero_point)] for e in (o.compute_encoding("uint8") for o in ref_obs)]
        result["state_equal"] = all(
            torch.equal(a.state_tensors()[k], b.state_tensors()[k]) for a, b in zip(observers, ref_obs) for k in a.state_tensors()
        )
        result["hessian_diff"] = float((hess.xtx - ref_hess.xtx).abs().max() / ref_hess.xtx.abs().max())
        result["reference_n"] = int(ref_hess.n)
    # ranks holding different observers fail together instead of hanging
    extra = [MinMaxObserver("extra")] if rank == 0 else []
    try:
        gd.sync_stats([MinMaxObserver("m")] + extra)
        result["mismatch_error"] = None
    except DistributedError as exc:
        result["mismatch_error"] = str(exc)
    return result


def scenario_calibrate(rank: int, out: Path) -> dict:
    """graphlora.calibrate under a process group: every rank ends with the encodings one process
    computes from all ranks' batches."""
    calibrate = getattr(graphlora, "calibrate", None)
    if calibrate is None:
        return {"skipped": "graphlora.calibrate does not exist yet"}

    def build():
        torch.manual_seed(0)
        model = Stack()
        return graphlora.transform(model, [LoraRule(r"blocks\.\d+\.(up|down)", rank=2, act_qtype="uint8"), QuantRule("head", act_qtype="uint8", act_calibration="percentile", act_percentile=99.0)], (torch.randn(5, 4),))

    def batches(r):
        g = torch.Generator().manual_seed(20 + r)
        return [(torch.randn(6, 4, generator=g) * (1 + 3 * r),) for _ in range(2)]

    def encodings(lm, batch_list):
        encs = calibrate(lm, batch_list, progress=False)
        return {k: [e.scale.flatten().tolist(), e.zero_point.flatten().tolist()] for k, e in sorted(encs.items())}

    lm = build()
    result = {"encodings": encodings(lm, batches(rank))}
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(5))
    result["output"] = lm(x).flatten().tolist()
    if rank == 0:
        # the reference must not see a process group: calibrate reduces whenever one exists
        with _no_process_group():
            ref = build()
            result["reference"] = encodings(ref, batches(0) + batches(1))
            result["reference_output"] = ref(x).flatten().tolist()
    return result


class _no_process_group:
    def __enter__(self):
        self._saved = torch.distributed.is_initialized
        torch.distributed.is_initialized = lambda: False

    def __exit__(self, *exc):
        torch.distributed.is_initialized = self._saved


def scenario_ddp(rank: int, out: Path) -> dict:
    """DDP: only LoRA factors are bucketed; training equals one process on the concatenated batch."""
    lm = llama_lora()
    ref = copy.deepcopy(lm) if rank == 0 else None
    initial = {k: v.clone() for k, v in lm.lora_state_dict().items()}
    ddp = gd.wrap_ddp(lm)
    buckets = gd.ddp_bucket_parameter_names(ddp)
    grads0, frozen_grads = _train(ddp, lm, rank, steps=2, lr=0.5)
    final = lm.lora_state_dict()
    result = {
        "bucketed": sorted(n for b in buckets for n in b),
        "lora_names": sorted(f"graph_module.{n}" for n, _ in lm.graph_module.named_parameters() if n.startswith("graphlora_adapters.")),
        "frozen_grads": frozen_grads,
        "n_frozen": sum(1 for p in lm.parameters() if not p.requires_grad),
    }
    saved = gd.save_on_rank0(ddp, out / "ddp_adapter", only_save_adapters=True)
    result["saved_files"] = list(saved.files)
    torch.save(final, out / f"ddp_final.{rank}.pt")
    if rank == 0:
        ref_grads0, ref_final = _train_reference(ref, steps=2, lr=0.5)
        result["grad_diff"] = _max_diff(grads0, ref_grads0)
        result["param_diff"] = _max_diff(final, ref_final)
        result["param_change"] = _max_diff(final, initial)
    return result


def scenario_fsdp(rank: int, out: Path) -> dict:
    """FSDP2 per block: LoRA factors sharded with their block, training equals one process,
    eval/train switches, adapter-only and merged saves from rank 0."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    lm = llama_lora()
    ref = copy.deepcopy(lm) if rank == 0 else None
    initial = {k: v.clone() for k, v in lm.lora_state_dict().items()}
    gd.shard_lora_model(lm)
    gm = lm.graph_module
    block0 = gm.get_submodule("model.layers.0")
    names = {id(p): n for n, p in gm.named_parameters()}
    state0 = fully_shard.state(block0)
    block0_params = sorted(names[id(fp.sharded_param)] for g in state0._fsdp_param_groups for fp in g.fsdp_params)
    root_state = fully_shard.state(lm)
    root_params = sorted(names.get(id(fp.sharded_param), "?") for g in root_state._fsdp_param_groups for fp in g.fsdp_params)
    result = {
        "is_fsdp": isinstance(lm, FSDPModule) and isinstance(block0, FSDPModule),
        "blocks": gd.sharded_blocks(lm),
        "block0_params": block0_params,
        "root_params": root_params,
        "lora_dtensor": all(gd_saving._is_dtensor(p) for p in lm.lora_parameters()),
        "local_rows": sorted({int(p.to_local().shape[0]) for p in lm.lora_parameters()}),
    }
    grads0, frozen_grads = _train(lm, lm, rank, steps=2, lr=0.5)
    result["frozen_grads"] = frozen_grads
    final = gd.gather_lora_state_dict(lm)
    # eval() changes the flat graph's flags: the split is rebuilt, results stay right
    lm.eval()
    with torch.no_grad():
        eval_logits = lm(global_batch(9), use_cache=False).logits
    lm.train()
    saved = gd.save_on_rank0(lm, out / "fsdp_adapter", only_save_adapters=True)
    merged = gd.save_on_rank0(lm, out / "fsdp_merged", save_adapters_separately=False)
    result["saved"] = [list(saved.files), list(merged.files)]
    # training goes on after a save
    lm_loss(lm, local_batch(0, rank)).backward()
    result["grads_after_save"] = all(p.grad is not None for p in lm.lora_parameters())
    if rank == 0:
        ref_grads0, ref_final = _train_reference(ref, steps=2, lr=0.5)
        result["grad_diff"] = _max_diff(grads0, ref_grads0)
        result["param_diff"] = _max_diff(final, ref_final)
        result["param_change"] = _max_diff(final, initial)
        ref.eval()
        with torch.no_grad():
            result["eval_diff"] = float((eval_logits - ref(global_batch(9), use_cache=False).logits).abs().max())
        torch.save({"lora": ref_final, "merged": ref.merge().state_dict()}, out / "fsdp_reference.pt")
    return result


def scenario_fsdp_qlora(rank: int, out: Path) -> dict:
    """FSDP2 over a QLoRA model: packed int4 base weights stay packed buffers, LoRA trains as in
    one process."""
    lm = llama_lora(weight_qtype="int4", group_size=32)
    ref = copy.deepcopy(lm) if rank == 0 else None
    packed_before = {n: (str(b.dtype), tuple(b.shape)) for n, b in lm.graph_module.named_buffers() if not b.dtype.is_floating_point}
    gd.shard_lora_model(lm)
    packed_after = {n: (str(b.dtype), tuple(b.shape)) for n, b in lm.graph_module.named_buffers() if not b.dtype.is_floating_point}
    grads0, _ = _train(lm, lm, rank, steps=2, lr=0.5)
    final = gd.gather_lora_state_dict(lm)
    saved = gd.save_on_rank0(lm, out / "qlora_separate")  # base (dequantized) + adapters/
    result = {
        "saved": list(saved.files),
        "n_packed": len(packed_before),
        "packed_unchanged": packed_before == packed_after,
        "packed_plain": all(not gd_saving._is_dtensor(b) for b in lm.graph_module.buffers()),
        "uint8": sorted({d for d, _ in packed_after.values()}),
    }
    if rank == 0:
        ref_grads0, ref_final = _train_reference(ref, steps=2, lr=0.5)
        result["grad_diff"] = _max_diff(grads0, ref_grads0)
        result["param_diff"] = _max_diff(final, ref_final)
        torch.save({"lora": ref_final, "base": ref.base_state_dict()}, out / "qlora_reference.pt")
    return result


def scenario_fsdp_calibrate(rank: int, out: Path) -> dict:
    """calibrate() on an FSDP-sharded model (observers inside the blocks' subgraphs), then a
    training step through the fake-quant graph; both as in one process."""
    calibrate = getattr(graphlora, "calibrate", None)
    if calibrate is None:
        return {"skipped": "graphlora.calibrate does not exist yet"}

    def build():
        torch.manual_seed(0)
        lm = graphlora.transform(Stack(), [LoraRule(r"blocks\.\d+\.(up|down)", rank=2, act_qtype="uint8")], (torch.randn(5, 4),))
        with torch.no_grad():
            for _, p in lm.named_lora_parameters():
                p.normal_(0, 0.2)
        return lm

    def batches(r):
        g = torch.Generator().manual_seed(30 + r)
        return [(torch.randn(6, 4, generator=g) * (1 + 3 * r),) for _ in range(2)]

    x = torch.randn(2 * WORLD, 4, generator=torch.Generator().manual_seed(7))
    lm = build()
    gd.shard_lora_model(lm, shard_frozen=False)  # frozen weights replicated, LoRA sharded
    encs = calibrate(lm, batches(rank), progress=False)
    lm.train()
    lm(x[2 * rank : 2 * rank + 2]).square().mean().backward()
    result = {
        "encodings": {k: [e.scale.flatten().tolist(), e.zero_point.flatten().tolist()] for k, e in sorted(encs.items())},
        "grads": {k: _full(p.grad).tolist() for k, p in lm.named_lora_parameters()},
        "frozen_plain": all(not gd_saving._is_dtensor(p) for p in lm.parameters() if not p.requires_grad),
        "lora_sharded": all(gd_saving._is_dtensor(p) for p in lm.lora_parameters()),
    }
    if rank == 0:
        with _no_process_group():
            ref = build()
            ref_encs = calibrate(ref, batches(0) + batches(1), progress=False)
        ref.train()
        ref(x).square().mean().backward()
        result["reference"] = {k: [e.scale.flatten().tolist(), e.zero_point.flatten().tolist()] for k, e in sorted(ref_encs.items())}
        result["grad_diff"] = _max_diff({k: torch.tensor(v) for k, v in result["grads"].items()}, {k: p.grad for k, p in ref.named_lora_parameters()})
    return result


def scenario_fsdp_adapters(rank: int, out: Path) -> dict:
    """Switching between adapters created before sharding trains the right factors, as in one
    process; an adapter created after sharding is refused on every rank."""
    from graphlora.adapters import LoraSpec

    def build():
        lm = stack_lora()
        specs = {f"blocks.{i}.{w}": LoraSpec(rank=3, alpha=3.0) for i in range(3) for w in ("up", "down")}
        lm.add_adapter("second", specs)
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for _, p in lm.named_lora_parameters("second"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        return lm

    def steps(model, xs):
        for name, x in zip(("default", "second", "default"), xs):
            model.set_adapter(name)
            opt = torch.optim.SGD(list(model.lora_parameters()), lr=0.3)
            model(x).square().mean().backward()
            opt.step()
            opt.zero_grad()

    xs = [torch.randn(2 * WORLD, 4, generator=torch.Generator().manual_seed(40 + i)) for i in range(3)]
    lm = build()
    ref = copy.deepcopy(lm) if rank == 0 else None
    gd.shard_lora_model(lm)
    steps(lm, [x[2 * rank : 2 * rank + 2] for x in xs])
    finals = {a: gd.gather_lora_state_dict(lm, a) for a in ("default", "second")}
    lm.add_adapter("late", {"blocks.0.up": LoraSpec(rank=2, alpha=2.0)}, activate=True)
    try:
        lm(xs[0][:2])
        result = {"late_error": None}
    except DistributedError as exc:
        result = {"late_error": str(exc)}
    if rank == 0:
        steps(ref, xs)
        result["param_diff"] = max(_max_diff(finals[a], ref.lora_state_dict(a)) for a in finals)
        result["changed"] = {a: _max_diff(finals[a], build().lora_state_dict(a)) for a in finals}
    return result


def scenario_gptq(rank: int, out: Path) -> dict:
    """GPTQ at transform time with each rank's calibration batches: the Hessians are summed
    across ranks, so every rank quantizes to the same codes, those of one process seeing all."""

    def build(batch_list):
        torch.manual_seed(0)
        rule = LoraRule(r"blocks\.\d+\.(up|down)", rank=2, weight_qtype="int4", group_size=16, weight_calibration="gptq")
        return graphlora.transform(Stack(), [rule], (torch.randn(5, 4),), calibration_data=batch_list, progress=False)

    def batches(r):
        g = torch.Generator().manual_seed(50 + r)
        return [(torch.randn(8, 4, generator=g) * (1 + r),) for _ in range(2)]

    def codes(lm):
        return {n: b.clone() for n, b in lm.graph_module.named_buffers() if not b.dtype.is_floating_point}

    mine = codes(build(batches(rank)))
    torch.save(mine, out / f"gptq.{rank}.pt")
    result = {"n": len(mine)}
    if rank == 0:
        with _no_process_group():
            ref = codes(build(batches(0) + batches(1)))
        result["same_keys"] = sorted(ref) == sorted(mine)
        result["equal_fraction"] = sum(int((mine[k] == ref[k]).sum()) for k in ref) / sum(v.numel() for v in ref.values())
    return result


SCENARIOS = ["observers", "calibrate", "gptq", "fsdp_calibrate", "fsdp_adapters", "ddp", "fsdp", "fsdp_qlora"]


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    """One rank of the job: run the scenarios in order, write each one's outcome, stop after the
    first failure on any rank (the ranks' collectives could no longer line up)."""
    _init(rank, init_file)
    out = Path(out_dir)
    try:
        for name in SCENARIOS:
            start = time.perf_counter()
            try:
                record = {"ok": True, "result": globals()[f"scenario_{name}"](rank, out)}
            except Exception:  # noqa: BLE001 - recorded for the parent process
                record = {"ok": False, "error": traceback.format_exc()}
            record["seconds"] = round(time.perf_counter() - start, 2)
            (out / f"{name}.{rank}.json").write_text(json.dumps(record, default=str))
            ok = torch.tensor([1 if record["ok"] else 0])
            torch.distributed.all_reduce(ok, op=torch.distributed.ReduceOp.MIN)
            if not int(ok):
                break
    finally:
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """Run the 2-rank job once; yield a function returning one scenario's per-rank records."""
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("dist")
    init_file = str(out / "rendezvous")
    ctx = mp.start_processes(_worker, args=(init_file, str(out)), nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + JOB_TIMEOUT
    failure = None
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                failure = f"the 2-rank job did not finish within {JOB_TIMEOUT} s"
                break
    except Exception as exc:  # noqa: BLE001 - a rank died outside a scenario
        failure = f"a rank failed: {exc}"
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()
                p.join(5)

    def records(name: str) -> list[dict]:
        got = []
        for rank in range(WORLD):
            path = out / f"{name}.{rank}.json"
            if not path.exists():
                earlier = [s for s in SCENARIOS[: SCENARIOS.index(name)] if not _all_ok(out, s)]
                why = f"scenario {earlier[0]!r} failed" if earlier else failure or "no output"
                pytest.fail(f"scenario {name!r} did not run on rank {rank}: {why}")
            rec = json.loads(path.read_text())
            if not rec["ok"]:
                pytest.fail(f"scenario {name!r} failed on rank {rank}:\n{rec['error']}")
            got.append(rec["result"])
        return got

    records.out = out
    yield records


def _all_ok(out: Path, name: str) -> bool:
    for rank in range(WORLD):
        path = out / f"{name}.{rank}.json"
        if not path.exists() or not json.loads(path.read_text())["ok"]:
            return False
    return True


@pytest.mark.multiprocess
@pytest.mark.timeout(JOB_TIMEOUT + 30)
def test_sync_stats_gives_every_rank_the_single_process_encodings(job):
    r0, r1 = job("observers")
    assert r0["encodings"] == r1["encodings"]  # identical on both ranks
    for (s, z), (rs, rz) in zip(r0["encodings"], r0["reference"]):
        assert s == rs and z == rz  # exactly what one process observing all data computes
    assert r0["state_equal"]  # min/max/count/histogram states are bit-identical
    assert r0["hessian_n"] == r0["reference_n"] == 300 and r0["hessian_diff"] < 1e-12
    for r in (r0, r1):
        assert r["mismatch_error"] and "ranks hold different statistics" in r["mismatch_error"]


@pytest.mark.multiprocess
@pytest.mark.timeout(JOB_TIMEOUT + 30)
def test_calibrate_across_ranks_equals_calibrating_on_all_data(job):
    r0, r1 = job("calibrate")
    if "skipped" in r0:
        pytest.skip(r0["skipped"])
    assert r0["encodings"] and r0["encodings"] == r1["encodings"]
    assert r0["encodings"] == r0["reference"]
    assert r0["output"] == r1["output"]
    torch.testing.assert_close(torch.tensor(r0["output"]), torch.tensor(r0["reference_output"]), rtol=0, atol=0)


@pytest.mark.multiprocess
@pytest.mark.timeout(JOB_TIMEOUT + 30)
def test_gptq_hessians_are_reduced_across_ranks(job):
    r0, _ = job("gptq")
    assert r0["n"] >= 6 and r0["same_keys"]
    a, b = (torch.load(job.out / f"gptq.{r}.pt") for r in range(WORLD))
    assert all(torch.equal(a[k], b[k]) for k in a)  # identical codes on both ranks
    assert r0["equal_fraction"] > 0.999  # one process on all data (float64 sums in another order)


@pytest.mark.multiprocess
@pytest.mark.timeout(JOB_TIMEOUT + 30)
def test_calibrate_on_an_fsdp_sharded_model_with_replicated_frozen_weights(job):
    r0, r1 = job("fsdp_calibrate")
    if "skipped" in r0:
        pytest.skip(r0["skipped"])
    assert len(r0["encodings"]) == 6 and r0["encodings"] == r1["encodings"] == r0["reference"]
    assert r0["grads"] == r1["grads"] and r0["grad_diff"] < TOL
    assert r0["frozen_plain"] and r0["lora_sharded"]  # shard_frozen=False


@pytest.mark.multiprocess
@pytest.mark.timeout(JOB_TIMEOUT + 30)
def test_fsdp_adapter_switching(job):
    r0, r1 = job("fsdp_adapters")
    assert r0["param_diff"] < TOL
    assert min(r0["changed"].values()) > 1e-3  # both adapters trained
    for r in (r0, r1):
        assert r["late_error"] and "created after shard_lora_model" in r["late_error"]


@pytest.mark.multiprocess
@pytest.mark.timeout(JOB_TIMEOUT + 30)
def test_ddp_buckets_only_lora_and_matches_single_process(job):
    r0, r1 = job("ddp")
    for r in (r0, r1):
        assert r["bucketed"] == r["lora_names"] and len(r["bucketed"]) == 2 * 7 * 2  # 7 projections x 2 layers x (A, B)
        assert r["frozen_grads"] == [] and r["n_frozen"] > 0
    assert r0["grad_diff"] < TOL and r0["param_diff"] < TOL
    assert r0["param_change"] > 1e-3  # training did move the weights
    finals = [torch.load(job.out / f"ddp_final.{r}.pt") for r in range(WORLD)]
    assert _max_diff(finals[0], finals[1]) == 0.0  # replicas stay identical
    from graphlora.io.peft_format import read_adapter

    adapter = read_adapter(job.out / "ddp_adapter")
    for path, module in adapter.modules.items():
        torch.testing.assert_close(module.lora_A, finals[0][f"{path}.lora_A.weight"], rtol=0, atol=0)
        torch.testing.assert_close(module.lora_B, finals[0][f"{path}.lora_B.weight"], rtol=0, atol=0)


@pytest.mark.multiprocess
@pytest.mark.timeout(JOB_TIMEOUT + 30)
def test_fsdp_shards_lora_with_its_block_and_matches_single_process(job):
    r0, r1 = job("fsdp")
    for r in (r0, r1):
        assert r["is_fsdp"] and r["blocks"] == ["model.layers.0", "model.layers.1"]
        assert r["lora_dtensor"] and r["local_rows"]  # sharded on dim 0
        # block 0's group: its base weights and its LoRA factors, nothing of block 1
        assert "graphlora_adapters.default.model.layers.0.self_attn.q_proj.lora_A.weight" in r["block0_params"]
        assert "model.layers.0.self_attn.q_proj.weight" in r["block0_params"]
        assert not any(".layers.1." in n for n in r["block0_params"])
        assert not any(".layers." in n for n in r["root_params"])  # root: embeddings, norm, head
        assert r["frozen_grads"] == [] and r["grads_after_save"]
    assert r0["grad_diff"] < TOL and r0["param_diff"] < TOL and r0["eval_diff"] < TOL
    assert r0["param_change"] > 1e-3


@pytest.mark.multiprocess
@pytest.mark.timeout(JOB_TIMEOUT + 30)
def test_fsdp_rank0_saves_load_back(job):
    r0, r1 = job("fsdp")
    assert r0["saved"] == r1["saved"]  # every rank sees rank 0's result
    reference = torch.load(job.out / "fsdp_reference.pt")
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM

    from graphlora.io.peft_format import read_adapter

    adapter = read_adapter(job.out / "fsdp_adapter")
    assert len(adapter.modules) == 14
    for path, module in adapter.modules.items():
        torch.testing.assert_close(module.lora_A, reference["lora"][f"{path}.lora_A.weight"], rtol=0, atol=TOL)
        torch.testing.assert_close(module.lora_B, reference["lora"][f"{path}.lora_B.weight"], rtol=0, atol=TOL)
    # the adapter loads into a fresh LoraModel
    lm = llama_lora()
    graphlora.load_adapter(lm, job.out / "fsdp_adapter", adapter_name="loaded", activate=True)
    loaded = lm.lora_state_dict("loaded")
    assert _max_diff(loaded, reference["lora"]) < TOL
    # the merged checkpoint loads into the original class, strictly
    merged = load_file(job.out / "fsdp_merged" / "model.safetensors")
    model = LlamaForCausalLM(llama_config())
    model.load_state_dict(merged, strict=True)
    ref_merged = reference["merged"]
    assert max(float((merged[k] - ref_merged[k]).abs().max()) for k in merged if k in ref_merged) < TOL


@pytest.mark.multiprocess
@pytest.mark.timeout(JOB_TIMEOUT + 30)
def test_fsdp_keeps_qlora_weights_packed_and_matches_single_process(job):
    r0, r1 = job("fsdp_qlora")
    for r in (r0, r1):
        assert r["n_packed"] >= 14 and r["packed_unchanged"] and r["packed_plain"]
        assert "torch.uint8" in r["uint8"]
    assert r0["grad_diff"] < TOL and r0["param_diff"] < TOL
    # the base + adapter layout from the sharded QLoRA model: dequantized base, PEFT adapter
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM

    from graphlora.io.peft_format import read_adapter

    assert r0["saved"] == r1["saved"] and "model.safetensors" in r0["saved"]
    reference = torch.load(job.out / "qlora_reference.pt")
    base = load_file(job.out / "qlora_separate" / "model.safetensors")
    LlamaForCausalLM(llama_config()).load_state_dict(base, strict=True)
    assert _max_diff(base, {k: reference["base"][k] for k in base}) == 0.0
    adapter = read_adapter(job.out / "qlora_separate" / "adapters")
    got = {f"{p}.lora_{w}.weight": getattr(m, f"lora_{w}") for p, m in adapter.modules.items() for w in "AB"}
    assert _max_diff(got, reference["lora"]) < TOL
