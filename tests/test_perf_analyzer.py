"""NVIDIA perf_analyzer through `dlheir bench hash`'s function, against a real Triton.

perf_analyzer is optional (``make perf-analyzer``); without it the run test skips and says so.
"""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest

from dlheir.benchmarks import perf_analyzer as pa
from dlheir.benchmarks.hash import perf_analyzer_figures
from dlheir.contract import IMAGE_BYTES, PUBLIC_MODEL


def _images(folder, n: int = 8) -> list[bytes]:
    return [p.read_bytes() for p in sorted(folder.rglob("*.png"))[:n]]


def test_input_data_is_the_bytes_tensor_wire_format(digits_small, tmp_path):
    """Each step's b64 is what tritonclient itself sends for a one-element BYTES tensor."""
    from tritonclient.utils import serialize_byte_tensor

    images = _images(digits_small, 3)
    steps = json.loads(pa.input_data(images, tmp_path / "in.json").read_text())["data"]
    assert len(steps) == 3
    for step, image in zip(steps, images):
        expected = serialize_byte_tensor(np.array([image], dtype=object)).item()
        assert base64.b64decode(step[IMAGE_BYTES]["b64"]) == expected
        assert step[IMAGE_BYTES]["shape"] == [1]


@pytest.mark.slow
@pytest.mark.skipif(pa.find() is None, reason=f"perf_analyzer is not installed: {pa.INSTALL_HINT}")
def test_bench_hash_runs_perf_analyzer_on_real_images(triton_server, digits_small):
    # a loose stability threshold: the figures must be parsed, this machine is shared
    out = perf_analyzer_figures(triton_server.grpc_url, PUBLIC_MODEL, _images(digits_small), 2, [1],
                                measurement_ms=2000, stability_percent=100)
    assert out["installed"] and "error" not in out and "error" not in out["rows"][0], out
    assert out["model"] == PUBLIC_MODEL and out["batch"] == 2 and out["images"] == 8
    (row,) = out["rows"]
    assert row["concurrency"] == 1
    assert row["infer_per_s"] > 0
    assert 0 < row["p50_ms"] <= row["p99_ms"]


def test_without_perf_analyzer_one_line_on_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv(pa.ENV, raising=False)
    monkeypatch.setattr(pa, "default_dir", lambda: tmp_path / "absent")
    out = perf_analyzer_figures("127.0.0.1:1", PUBLIC_MODEL, [b"x"], 1, [1])
    assert out == {"installed": False, "hint": pa.INSTALL_HINT}
    assert "make perf-analyzer" in pa.INSTALL_HINT
