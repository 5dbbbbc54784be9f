"""TensorRT engine from the exported ONNX graph (needs a CUDA GPU and the ``tensorrt`` package).

Install with ``pip install '.[gpu]'`` on a GPU machine. The engine keeps the ONNX
interface (IMAGE uint8 -> PROBS, CODE) with one optimization profile for batch 1..max.
"""

from __future__ import annotations

import time
from pathlib import Path

from dlheir.errors import UserError
from dlheir.export.onnx_export import INPUT_NAME, onnx_signature


def _require_tensorrt():
    try:
        import tensorrt as trt  # noqa: F401
    except ImportError as exc:
        raise UserError("TensorRT export needs the 'tensorrt' package and a CUDA GPU: pip install '.[gpu]' on a GPU machine") from exc
    import torch

    if not torch.cuda.is_available():
        raise UserError("TensorRT export needs a CUDA GPU; none is visible here (torch.cuda.is_available() is False)")
    return trt


def build_engine(onnx_path: Path | str, out_path: Path | str, fp16: bool = True, max_batch: int = 64) -> dict:
    """Build and serialize an engine; returns build facts (seconds, precision, profile)."""
    trt = _require_tensorrt()
    size, bits = onnx_signature(onnx_path)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(Path(onnx_path).read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise UserError(f"TensorRT cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    opt = min(max_batch, 32)
    profile.set_shape(INPUT_NAME, (1, size, size, 3), (opt, size, size, 3), (max_batch, size, size, 3))
    config.add_optimization_profile(profile)
    t0 = time.perf_counter()
    engine = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - t0
    if engine is None:
        raise UserError("TensorRT engine build failed (see the TensorRT log above)")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_bytes(bytes(engine))
    return {"engine": str(out_path), "build_seconds": seconds, "fp16": fp16, "max_batch": max_batch,
            "image_size": size, "bits": bits}
