"""The session helper (provider choice, CUDA fallback, accuracy level) and run-time LoRA switching
with onnxruntime adapters."""

from __future__ import annotations

import logging
import warnings

import numpy as np
import onnxruntime as ort
import pytest
import torch
from test_onnx_fixtures import quantize_weights, randomize_lora, rel_err
from toy_models import MLP

import graphlora
from graphlora.errors import AdapterError
from graphlora.onnx import (
    InferenceSession,
    choose_providers,
    export_onnx,
    quantized_kernels,
    read_adapter,
    runtime,
    write_adapter,
)


@pytest.fixture(scope="module")
def int4_model(tmp_path_factory):
    torch.manual_seed(0)
    lm = graphlora.transform(MLP((64, 64, 8)).eval(), graphlora.LoraRule(".*", rank=4),
                             (torch.randn(2, 64),))
    quantize_weights(randomize_lora(lm), "int4", 32)
    path = tmp_path_factory.mktemp("rt") / "m.onnx"
    export_onnx(lm, path, (torch.randn(2, 64),), lora="merged")
    return path


def test_cpu_build_picks_cpu_and_says_why(monkeypatch):
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    choice = choose_providers("auto")
    assert choice.providers == ("CPUExecutionProvider",)
    assert "no CUDAExecutionProvider" in choice.reason


def test_gpu_package_without_gpu_picks_cpu(monkeypatch):
    monkeypatch.setattr(ort, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(runtime, "cuda_device_count", lambda: 0)
    choice = choose_providers("auto")
    assert choice.providers == ("CPUExecutionProvider",)
    assert "no CUDA device" in choice.reason


def test_gpu_present_prefers_cuda(monkeypatch):
    monkeypatch.setattr(ort, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(runtime, "cuda_device_count", lambda: 2)
    assert choose_providers("auto").providers == ("CUDAExecutionProvider", "CPUExecutionProvider")


def test_cuda_session_failure_falls_back_to_cpu_keeping_fusions(int4_model, monkeypatch, caplog, tmp_path):
    """onnxruntime-gpu claims CUDA, a device is 'present', but the CUDA session cannot start:
    the helper retries on CPU with the same options (MatMulAddFusion still disabled)."""
    monkeypatch.setattr(ort, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(runtime, "cuda_device_count", lambda: 1)
    original = ort.InferenceSession._create_inference_session

    def create(self, providers, provider_options, disabled_optimizers=None):
        if any("CUDA" in (p[0] if isinstance(p, tuple) else p) for p in providers or []):
            raise RuntimeError("CUDA failure 100: no CUDA-capable device is detected")
        return original(self, providers, provider_options, disabled_optimizers)

    monkeypatch.setattr(ort.InferenceSession, "_create_inference_session", create)
    opt_path = tmp_path / "opt.onnx"
    with caplog.at_level(logging.INFO, logger="graphlora.onnx"):
        sess = InferenceSession(int4_model, "cuda", accuracy_level=0, optimized_model_path=opt_path)
    assert sess.providers_used == ["CPUExecutionProvider"]
    assert "fell back to CPU" in sess.provider_reason
    assert any("fell back to CPU" in r.getMessage() for r in caplog.records)
    import onnx

    assert quantized_kernels(onnx.load(opt_path))["MatMulNBits"] == 2
    out = sess.run(None, {"x": np.random.randn(3, 64).astype(np.float32)})[0]
    assert out.shape == (3, 8)


def test_cuda_requested_but_not_used_is_reported(int4_model, monkeypatch):
    """A CPU-only onnxruntime that is told CUDA exists silently runs on CPU: we say so."""
    monkeypatch.setattr(runtime, "choose_providers", lambda p: runtime.ProviderChoice(
        ("CUDAExecutionProvider", "CPUExecutionProvider"), "test"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # onnxruntime warns that CUDA is not available
        sess = InferenceSession(int4_model, "auto")
    assert sess.providers_used == ["CPUExecutionProvider"]
    assert "did not use it" in sess.provider_reason or "fell back" in sess.provider_reason


def test_accuracy_level_is_set_and_changes_numerics(int4_model):
    x = {"x": np.random.RandomState(0).randn(4, 64).astype(np.float32)}
    exact = InferenceSession(int4_model, "cpu", accuracy_level=0)
    fast = InferenceSession(int4_model, "cpu", accuracy_level=4)
    key = "session.qdq_matmulnbits_accuracy_level"
    assert exact.get_session_options().get_session_config_entry(key) == "0"
    assert fast.get_session_options().get_session_config_entry(key) == "4"
    a, b = exact.run(None, x)[0], fast.run(None, x)[0]
    assert a.shape == b.shape and np.isfinite(b).all()
    with pytest.raises(ValueError, match="accuracy_level"):
        InferenceSession(int4_model, "cpu", accuracy_level=7)


# ----------------------------------------------------------------------------- adapters
@pytest.fixture(scope="module")
def two_adapters(tmp_path_factory):
    torch.manual_seed(0)
    lm = graphlora.transform(MLP((32, 48, 8)).eval(), graphlora.LoraRule(".*", rank=4),
                             (torch.randn(2, 32),))
    randomize_lora(lm, seed=1)
    lm.add_adapter("other", {p: graphlora.LoraSpec(rank=8, alpha=4.0) for p in lm.adapters["default"]})
    lm.set_adapter("other")
    randomize_lora(lm, seed=2)  # the active adapter's weights
    lm.set_adapter("default")
    path = tmp_path_factory.mktemp("adapters") / "m.onnx"
    export_onnx(lm, path, (torch.randn(2, 32),), lora="inputs")
    return lm, path


def test_inputs_mode_runs_exported_adapter_by_default(two_adapters):
    lm, path = two_adapters
    x = torch.randn(5, 32)
    sess = InferenceSession(path, "cpu")
    assert [i.name for i in sess.get_inputs()] == ["x"]  # LoRA weights are overridable initializers
    assert rel_err(sess.run(None, {"x": x.numpy()})[0], lm(x).detach()) < 1e-4


def test_adapter_switch_without_reexport(two_adapters, tmp_path):
    lm, path = two_adapters
    x = torch.randn(5, 32)
    file = write_adapter(lm, tmp_path / "other.onnx_adapter", adapter="other")
    stored = read_adapter(file)
    assert stored["layers.0.lora_A"].shape == (32, 8)  # a different rank than the exported one
    sess = InferenceSession(path, "cpu")
    got = sess.run_with_adapter(None, {"x": x.numpy()}, file)[0]
    lm.set_adapter("other")
    try:
        want = lm(x).detach()
    finally:
        lm.set_adapter("default")
    assert rel_err(got, want) < 1e-4
    # the plain onnxruntime way, as documented
    adapter = ort.LoraAdapter()
    adapter.Load(str(file))
    options = ort.RunOptions()
    options.add_active_adapter(adapter)
    assert rel_err(sess.run(None, {"x": x.numpy()}, options)[0], want) < 1e-4
    # and back to the exported adapter
    assert rel_err(sess.run(None, {"x": x.numpy()})[0], lm(x).detach()) < 1e-4


def test_missing_adapter_file(two_adapters, tmp_path):
    _, path = two_adapters
    sess = InferenceSession(path, "cpu")
    with pytest.raises(AdapterError, match="no onnxruntime adapter file"):
        sess.run_with_adapter(None, {"x": np.zeros((1, 32), np.float32)}, tmp_path / "none")
