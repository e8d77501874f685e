"""The ONNX comparison of ``bench_onnx.py`` on ``CUDAExecutionProvider``, when a GPU is present.

Runs exactly the same models and measurements as :mod:`bench_onnx` with ``providers="cuda"``
when onnxruntime-gpu and a CUDA device are both available; otherwise prints ``no GPU`` (and the
reason: a CPU-only onnxruntime build, or onnxruntime-gpu without a device) and returns
``{"status": "no GPU", ...}`` without running anything.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def run(**kwargs) -> dict:
    from graphlora.onnx import choose_providers

    choice = choose_providers("cuda")
    if "CUDAExecutionProvider" not in choice.providers:
        return {"status": "no GPU", "reason": choice.reason}
    import bench_onnx

    result = bench_onnx.run(providers="cuda", **kwargs)
    if "CUDAExecutionProvider" not in result["providers"]:
        result["status"] = "CUDA requested but sessions ran on " + ", ".join(result["providers"])
    else:
        result["status"] = "ok"
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args(argv)
    r = run(rounds=args.rounds)
    if r["status"] == "no GPU":
        print(f"no GPU: {r['reason']}")
    else:
        print("\n".join(r.get("markdown", [])))
    print(json.dumps({k: v for k, v in r.items() if k != "markdown"}, indent=2))
    return 0


if __name__ == "__main__":
    here = Path(__file__).resolve().parent
    sys.path[:0] = [str(here), str(here.parent)]
    sys.exit(main())
