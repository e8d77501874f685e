"""A small onnxruntime session helper: the right provider, the right fusions, said out loud.

Why not plain ``onnxruntime.InferenceSession``:

* **Provider choice.** ``providers="auto"`` takes ``CUDAExecutionProvider`` only when onnxruntime
  has it *and* a CUDA device exists, otherwise the CPU, and logs which and why (onnxruntime-gpu
  without a GPU, a CPU-only build, a CUDA session that failed to start). onnxruntime's own
  fallback prints to stdout and forgets ``disabled_optimizers``; this one does neither.
* **4-bit accuracy.** The fused ``MatMulNBits`` that onnxruntime builds from a blocked
  ``DequantizeLinear -> MatMul`` quantizes activations to int8 by default; ``accuracy_level``
  sets ``session.qdq_matmulnbits_accuracy_level`` (0/1 = float activations, 4 = int8).
* **Fusion blockers.** ``MatMulAddFusion`` turns ``DequantizeLinear -> MatMul -> Add`` with 2-D
  activations into ``Gemm``, and the 4-bit weight then stays a ``DequantizeLinear`` feeding a
  float Gemm — a Linear's bias and the LoRA branch's Add hit exactly this. It is disabled by
  default (``disable_matmul_add_fusion=False`` restores onnxruntime's behaviour).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from graphlora.errors import MissingDependencyError

log = logging.getLogger("graphlora.onnx")

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"

#: onnxruntime graph transformers that block graphlora's QDQ fusions (see the module docstring)
FUSION_BLOCKERS = ("MatMulAddFusion",)


def _ort():
    try:
        import onnxruntime
    except ImportError as exc:  # pragma: no cover - the venv has it
        raise MissingDependencyError(
            "running ONNX models needs onnxruntime: pip install onnxruntime (or onnxruntime-gpu)"
        ) from exc
    return onnxruntime


def cuda_device_count() -> int:
    """Number of CUDA devices the driver reports (0 without a driver or GPU)."""
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.device_count()
    except (ImportError, RuntimeError):  # pragma: no cover - broken torch installs
        log.debug("torch could not count CUDA devices; asking the driver")
    import ctypes

    for lib in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            cuda = ctypes.CDLL(lib)
        except OSError:
            continue
        count = ctypes.c_int(0)
        try:
            if cuda.cuInit(0) == 0 and cuda.cuDeviceGetCount(ctypes.byref(count)) == 0:
                return int(count.value)
        except (AttributeError, OSError):  # pragma: no cover - a driver without these symbols
            return 0
        return 0
    return 0


@dataclass(frozen=True)
class ProviderChoice:
    """Which providers a session asked for and why."""

    providers: tuple[str, ...]
    reason: str


def choose_providers(providers: str | Sequence[Any] = "auto") -> ProviderChoice:
    """Resolve ``"auto"`` / ``"cuda"`` / ``"cpu"`` or pass an explicit list through."""
    ort = _ort()
    available = ort.get_available_providers()
    if not isinstance(providers, str):
        return ProviderChoice(tuple(providers), "providers given explicitly")
    choice = providers.lower()
    if choice == "cpu":
        return ProviderChoice((CPU,), "CPU requested")
    if choice not in ("auto", "cuda"):
        raise ValueError(f"providers must be 'auto', 'cuda', 'cpu' or a list, not {providers!r}")
    if CUDA not in available:
        return ProviderChoice(
            (CPU,), f"onnxruntime {ort.__version__} has no {CUDA} (a CPU-only build; install "
                    "onnxruntime-gpu for CUDA)")
    devices = cuda_device_count()
    if devices == 0:
        return ProviderChoice((CPU,), "onnxruntime-gpu is installed but no CUDA device was found")
    return ProviderChoice((CUDA, CPU), f"onnxruntime-gpu with {devices} CUDA device(s)")


def session_options(
    *,
    accuracy_level: int | None = None,
    optimized_model_path: str | os.PathLike | None = None,
    intra_op_num_threads: int | None = None,
    sess_options=None,
):
    """``SessionOptions`` with graphlora's settings applied (a given object is modified)."""
    ort = _ort()
    so = sess_options if sess_options is not None else ort.SessionOptions()
    if accuracy_level is not None:
        if int(accuracy_level) not in (0, 1, 2, 3, 4):
            raise ValueError(f"accuracy_level must be 0..4, got {accuracy_level!r}")
        so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(int(accuracy_level)))
    if optimized_model_path is not None:
        so.optimized_model_filepath = os.fspath(optimized_model_path)
    if intra_op_num_threads is not None:
        so.intra_op_num_threads = int(intra_op_num_threads)
    return so


class InferenceSession(_ort().InferenceSession):
    """``onnxruntime.InferenceSession`` with provider selection, accuracy level and fusion fixes.

    ``providers``: ``"auto"`` (CUDA when usable, else CPU), ``"cuda"`` (the same, but a failure
    to use CUDA is logged as a warning), ``"cpu"`` or an explicit onnxruntime list.
    ``providers_used`` lists what the session actually runs on; ``provider_reason`` says why.
    ``disabled_optimizers`` defaults to :data:`FUSION_BLOCKERS`.
    """

    def __init__(
        self,
        path: str | os.PathLike | bytes,
        providers: str | Sequence[Any] = "auto",
        *,
        accuracy_level: int | None = None,
        sess_options=None,
        optimized_model_path: str | os.PathLike | None = None,
        intra_op_num_threads: int | None = None,
        disable_matmul_add_fusion: bool = True,
        disabled_optimizers: Sequence[str] | None = None,
        provider_options: Sequence[dict] | None = None,
    ) -> None:
        choice = choose_providers(providers)
        so = session_options(accuracy_level=accuracy_level, optimized_model_path=optimized_model_path,
                             intra_op_num_threads=intra_op_num_threads, sess_options=sess_options)
        disabled = list(disabled_optimizers) if disabled_optimizers is not None else (
            list(FUSION_BLOCKERS) if disable_matmul_add_fusion else [])
        self.provider_reason = choice.reason
        wanted = list(choice.providers)
        warn = isinstance(providers, str) and providers.lower() == "cuda"
        try:
            super().__init__(path, so, providers=wanted, provider_options=provider_options,
                             disabled_optimizers=disabled or None, enable_fallback=0)
        except Exception as exc:
            if CUDA not in wanted:
                raise
            self.provider_reason = (f"{CUDA} failed to start ({_first_line(exc)}); "
                                    "fell back to CPU")
            (log.warning if warn else log.info)("graphlora.onnx: %s", self.provider_reason)
            wanted = [CPU]
            super().__init__(path, so, providers=wanted, disabled_optimizers=disabled or None,
                             enable_fallback=0)
        used = self.get_providers()
        if CUDA in wanted and CUDA not in used:
            self.provider_reason = f"{CUDA} was requested but onnxruntime did not use it; running on CPU"
            (log.warning if warn else log.info)("graphlora.onnx: %s", self.provider_reason)
        log.info("graphlora.onnx: session on %s (%s)", ", ".join(used), self.provider_reason)

    @property
    def providers_used(self) -> list[str]:
        return list(self.get_providers())

    def run_with_adapter(self, output_names, feeds: dict, adapter, run_options=None):
        """Run with an onnxruntime LoRA adapter (a path or a loaded ``onnxruntime.LoraAdapter``)
        active; see :func:`graphlora.onnx.write_adapter`. A file is conformed to this model's
        LoRA sites first (absent sites zero, lower ranks padded) or refused with an
        ``AdapterError``: never run mixed with the exported adapter."""
        from graphlora.onnx.adapters import load_adapter

        ort = _ort()
        options = run_options if run_options is not None else ort.RunOptions()
        model = self if self.get_modelmeta().custom_metadata_map.get("graphlora.lora_inputs") else None
        loaded = load_adapter(adapter, model)  # RunOptions does not own it: keep it alive for the run
        options.add_active_adapter(loaded)
        try:
            return self.run(output_names, feeds, options)
        finally:
            del loaded


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
