"""`dlheir check gpu`: everything that runs without a GPU, on real runtimes, codes and files.

The GPU-only parts (TensorRT build, CUDA runtimes, FAISS on the GPU) are the same loops with
other runtimes plugged in; here they must say why they cannot run instead of crashing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import SMALL_SIZE, margined_model
from dlheir import check


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.skipif(_cuda(), reason="this machine has a CUDA GPU: the no-GPU path cannot be seen here")
def test_without_gpu_one_line_and_exit_2(tmp_path):
    out = subprocess.run([sys.executable, "-m", "dlheir", "check", "gpu", "--out-dir", str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path,
                         env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert out.returncode == 2, out
    assert out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("dlheir: error: no CUDA GPU visible here")
    assert not (tmp_path / "out").exists()  # nothing trained or written before the check


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A small model, its ONNX graph at SMALL_SIZE, and a function giving the graph at any size."""
    from dlheir.export.onnx_export import export_onnx

    model = margined_model()
    work = tmp_path_factory.mktemp("check_gpu")
    cache: dict[int, Path] = {}

    def onnx_for(size: int) -> Path:
        if size not in cache:
            cache[size] = export_onnx(model, work / f"m{size}.onnx", size)
        return cache[size]

    return model, onnx_for


def test_code_comparison_on_real_codes(tiny, digits_small):
    """ONNX Runtime CPU vs PyTorch CPU of the same model: (nearly) every bit equal, same metrics; and
    the comparison sees a runtime whose bits are all wrong."""
    from dlheir.export.tensorrt_export import compare_codes

    model, onnx_for = tiny
    ort_run = check.onnxruntime_runner(onnx_for, "CPUExecutionProvider")(SMALL_SIZE)
    torch_run = check.pytorch_runner(model, "cpu")(SMALL_SIZE)

    def ort_codes(px):
        return ort_run(px)[1]

    def torch_codes(px):
        return torch_run(px)[1]

    same = compare_codes(ort_codes, torch_codes, SMALL_SIZE, model.bits, str(digits_small),
                         names=("onnxruntime", "pytorch"))
    assert same["images"] == 36 and same["bits"] == model.bits
    assert same["bit_agreement"] >= 0.999, same
    assert abs(same["onnxruntime"]["mAP"] - same["pytorch"]["mAP"]) < 0.02
    assert set(same["pytorch"]) == {"P@20", "P@40", "P@60", "P@80", "P@100", "mAP"}

    inverted = compare_codes(ort_codes, lambda px: ~ort_codes(px), SMALL_SIZE, model.bits, str(digits_small),
                             names=("onnxruntime", "inverted"))
    assert inverted["bit_agreement"] == 0.0 and inverted["codes_differing"] == 1.0


def test_throughput_loop_cpu_backends_and_unavailable_ones(tiny):
    model, onnx_for = tiny
    runners = {
        "pytorch-cpu": check.pytorch_runner(model, "cpu"),
        "onnxruntime-cpu": check.onnxruntime_runner(onnx_for, "CPUExecutionProvider"),
        "onnxruntime-cuda": check.onnxruntime_runner(onnx_for, "CUDAExecutionProvider"),
        "tensorrt": check.tensorrt_runner(lambda size: Path("/nonexistent.plan")),
    }
    rows = check.measure_throughput(runners, [SMALL_SIZE], [1, 2], repeats=2, warmup=1)
    ok = [r for r in rows if r["status"] == "ok"]
    assert {(r["backend"], r["batch"]) for r in ok} == {(b, n) for b in ("pytorch-cpu", "onnxruntime-cpu") for n in (1, 2)}
    assert all(r["images_per_s"] > 0 and r["n"] == 2 for r in ok)
    bad = {r["backend"]: r for r in rows if r["status"] != "ok"}
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        assert bad["onnxruntime-cuda"]["status"] == "skipped"
        assert "onnxruntime-gpu" in bad["onnxruntime-cuda"]["reason"]
    assert bad["tensorrt"]["status"] in ("skipped", "failed") and bad["tensorrt"]["reason"]


def test_a_failing_part_is_recorded_not_raised():
    out = check.run_part("broken", lambda: 1 / 0)
    assert out["status"] == "failed" and out["reason"].startswith("ZeroDivisionError")
    assert check.run_part("fine", lambda: {"x": 1})["x"] == 1
    assert check.run_part("absent", lambda: (_ for _ in ()).throw(check.Unavailable("no widget")))["reason"] == "no widget"


def test_faiss_search_cpu_and_gpu_rows():
    import faiss

    rows = check.faiss_search([1000, 3000], bits=48, queries=5, k=10, repeats=1)
    cpu = [r for r in rows if r["device"] == "cpu"]
    assert [r["codes"] for r in cpu] == [1000, 3000] and all(r["queries_per_s"] > 0 for r in cpu)
    gpu = [r for r in rows if r["device"] == "gpu"]
    assert len(gpu) == 2
    if not hasattr(faiss, "GpuIndexBinaryFlat") or faiss.get_num_gpus() == 0:
        assert all(r["status"] == "skipped" and "GPU" in r["reason"] for r in gpu)
    else:
        assert all(r["same_distances"] for r in gpu)


def test_report_json_and_plot_from_a_results_dict(tmp_path):
    results = {
        "gpu": {"name": "Test GPU 80GB"},
        "model": {"checkpoint": "runs/train/model.pt", "bits": 48, "image_size": 64},
        "engine": {"status": "ok", "build_seconds": 41.25, "fp16": True, "max_batch": 64, "image_size": 64,
                   "bits": 48, "engine": "x.plan"},
        "compare": {"status": "ok", "bits": 48, "image_size": 64, "images": 1797, "bit_disagreement": 0.0012,
                    "bit_agreement": 0.9988, "codes_differing": 0.031,
                    "onnx_fp32": {"P@20": 0.99, "mAP": 0.993}, "tensorrt": {"P@20": 0.985, "mAP": 0.991}},
        "throughput": {"status": "ok", "tensorrt_via": {"224": "engine directly (no --triton-url given)"}, "rows": [
            {"backend": "pytorch-cuda", "size": 224, "batch": 1, "status": "ok", "images_per_s": 150.0,
             "p50_ms": 6.6, "p99_ms": 7.0},
            {"backend": "pytorch-cuda", "size": 224, "batch": 8, "status": "ok", "images_per_s": 900.0,
             "p50_ms": 8.8, "p99_ms": 9.1},
            {"backend": "tensorrt", "size": 224, "batch": 8, "status": "ok", "images_per_s": 4321.5,
             "p50_ms": 1.8, "p99_ms": 2.0},
            {"backend": "onnxruntime-cuda", "size": 224, "status": "skipped",
             "reason": "this onnxruntime build has no CUDAExecutionProvider"}]},
        "faiss": {"status": "ok", "queries": 100, "k": 100, "rows": [
            {"device": "cpu", "codes": 1000000, "status": "ok", "batch_ms": 80.0, "queries_per_s": 1250.0},
            {"device": "gpu", "codes": 1000000, "status": "skipped", "reason": "this faiss build has no GPU support"}]},
    }
    text = check.report(results)
    assert "Test GPU 80GB" in text
    assert "built in 41.2 s" in text
    assert "99.8800% of bits equal" in text and "3.10% of codes differ" in text
    assert "4321.5" in text and "onnxruntime-cuda 224 px: skipped (this onnxruntime build has no CUDAExecutionProvider)" in text
    assert "tensorrt at 224 px measured via engine directly" in text
    assert "faiss gpu 1000000 codes: skipped (this faiss build has no GPU support)" in text

    json_path, png = check.write_outputs(results, tmp_path / "out")
    saved = json.loads(json_path.read_text())
    assert saved["throughput"]["rows"][2]["images_per_s"] == 4321.5
    assert saved["compare"]["bit_agreement"] == 0.9988 and "machine" in saved
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000

    failed = {**results, "throughput": {"status": "failed", "reason": "RuntimeError: CUDA out of memory"}}
    assert "throughput: failed (RuntimeError: CUDA out of memory)" in check.report(failed)
    check.write_outputs(failed, tmp_path / "out2")  # a plot with no throughput rows still works
