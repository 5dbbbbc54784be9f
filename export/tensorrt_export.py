"""TensorRT engine from the exported ONNX graph (needs a CUDA GPU and the ``tensorrt`` package).

Install with ``pip install '.[gpu]'`` on a GPU machine. The engine keeps the ONNX
interface (IMAGE uint8 -> PROBS, CODE) with one optimization profile for batch 1..max.
Beside each engine, ``ENGINE.json`` records what it was built from: the fingerprint of the
ONNX graph (``contract.model_fingerprint``), S and N. That fingerprint is the engine's: codes
from the engine are codes of that model, and the Triton repository exposes it.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from dlheir.errors import UserError
from dlheir.export.onnx_export import INPUT_NAME, OUTPUT_CODE, OUTPUT_PROBS, onnx_signature


def _require_tensorrt():
    try:
        import tensorrt as trt  # noqa: F401
    except ImportError as exc:
        raise UserError("TensorRT export needs the 'tensorrt' package and a CUDA GPU: pip install '.[gpu]' on a GPU machine") from exc
    import torch

    if not torch.cuda.is_available():
        raise UserError("TensorRT export needs a CUDA GPU; none is visible here (torch.cuda.is_available() is False)")
    return trt


def _facts_path(plan_path: Path | str) -> Path:
    plan_path = Path(plan_path)
    return plan_path.with_name(plan_path.name + ".json")


def write_engine_facts(plan_path: Path | str, onnx_path: Path | str, **facts) -> dict:
    """Record beside ``plan_path`` the fingerprint, S and N of the ONNX graph it was built from."""
    from dlheir.contract import model_fingerprint

    size, bits = onnx_signature(onnx_path)
    facts = {"fingerprint": model_fingerprint(onnx_path), "image_size": size, "bits": bits,
             "onnx": str(Path(onnx_path).resolve()), **facts}
    _facts_path(plan_path).write_text(json.dumps(facts, indent=2))
    return facts


def engine_fingerprint(plan_path: Path | str) -> str:
    """The fingerprint of the ONNX graph an engine was built from (its ``ENGINE.json``)."""
    plan_path = Path(plan_path)
    if not plan_path.is_file():
        raise UserError(f"TensorRT engine not found: {plan_path} (build it with 'dlheir export tensorrt' on the GPU host)")
    try:
        return str(json.loads(_facts_path(plan_path).read_text())["fingerprint"])
    except (OSError, ValueError, KeyError):
        raise UserError(f"{plan_path} has no {_facts_path(plan_path).name} naming the ONNX it was built from: "
                        "build it again with 'dlheir export tensorrt'") from None


def copy_engine(plan_path: Path | str, target: Path | str) -> None:
    """Copy an engine and its facts file (the facts last: a target without them is refused)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(plan_path, target)
    shutil.copyfile(_facts_path(plan_path), _facts_path(target))


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
    facts = write_engine_facts(out_path, onnx_path, fp16=fp16, max_batch=max_batch)
    return {"engine": str(out_path), "build_seconds": seconds, **facts}


class EngineRunner:
    """A deserialized engine with its execution context, reused across calls (timing loops, comparisons).

    Buffers are torch CUDA tensors (torch is a dependency already), so no pycuda is needed.
    """

    def __init__(self, plan_path: Path | str) -> None:
        import torch

        trt = _require_tensorrt()
        self.engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(Path(plan_path).read_bytes())
        if self.engine is None:
            raise UserError(f"cannot deserialize TensorRT engine {plan_path} (built for another GPU or TensorRT version?)")
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream()
        self.dtypes = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16,
                       trt.DataType.UINT8: torch.uint8, trt.DataType.INT32: torch.int32}
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]

    def __call__(self, pixels, batch_size: int = 64):
        """uint8 pixels [N, S, S, 3] -> (probs float32 [N, bits], codes uint8 [N, ceil(bits/8)]) as numpy."""
        import numpy as np
        import torch

        results: dict[str, list] = {name: [] for name in self.outputs}
        for start in range(0, len(pixels), batch_size):
            x = torch.from_numpy(np.ascontiguousarray(pixels[start : start + batch_size])).cuda()
            self.context.set_input_shape(INPUT_NAME, tuple(x.shape))
            self.context.set_tensor_address(INPUT_NAME, x.data_ptr())
            bufs = {}
            for name in self.outputs:
                shape = tuple(self.context.get_tensor_shape(name))
                bufs[name] = torch.empty(shape, dtype=self.dtypes[self.engine.get_tensor_dtype(name)], device="cuda")
                self.context.set_tensor_address(name, bufs[name].data_ptr())
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise UserError("TensorRT execution failed")
            self.stream.synchronize()
            for name in self.outputs:
                results[name].append(bufs[name].cpu().numpy())
        return np.concatenate(results[OUTPUT_PROBS]).astype(np.float32), np.concatenate(results[OUTPUT_CODE]).astype(np.uint8)


def run_engine(plan_path: Path | str, pixels, batch_size: int = 64):
    """Run a serialized engine on uint8 pixels [N, S, S, 3] on the GPU; returns (probs, codes) as numpy."""
    return EngineRunner(plan_path)(pixels, batch_size)


def compare_codes(reference, candidate, image_size: int, bits: int, data: str = "digits", seed: int = 0,
                  names: tuple[str, str] = ("onnx_fp32", "tensorrt")) -> dict:
    """Codes of two runtimes of one model on the same images: bit agreement, and P@k/mAP from each.

    ``reference`` and ``candidate`` map uint8 pixels [N, S, S, 3] to packed codes. Database = train
    split, queries = query split of ``data`` (image folder or 'digits'), as in ``dlheir evaluate``.
    Reports the fraction of differing (and equal) bits, the fraction of images whose code differs
    at all, and P@k/mAP computed from each runtime's codes.
    """
    import numpy as np

    from dlheir.codes import unpack_bits
    from dlheir.export import metrics
    from dlheir.export.data import resolve_data, split_dataset
    from dlheir.export.train import load_pixels

    database, queries, _ = split_dataset(resolve_data(data, image_size), seed=seed)
    db_px, q_px = load_pixels(database, image_size), load_pixels(queries, image_size)
    codes = {name: {"db": fn(db_px), "q": fn(q_px)} for name, fn in zip(names, (reference, candidate))}
    a, b = (unpack_bits(np.concatenate([codes[n]["db"], codes[n]["q"]]), bits) for n in names)
    ids = np.array([r.id for r in database])
    db_labels, q_labels = np.array([r.label for r in database]), np.array([r.label for r in queries])
    disagreement = float((a != b).mean())
    return {
        "bits": bits, "image_size": image_size, "images": int(len(a)),
        "bit_disagreement": disagreement, "bit_agreement": 1.0 - disagreement,
        "codes_differing": float((a != b).any(axis=1).mean()),
        **{n: metrics.retrieval_metrics(codes[n]["q"], q_labels, codes[n]["db"], db_labels, ids) for n in names},
    }


def compare_fp16_fp32(plan_path: Path | str, onnx_path: Path | str, data: str = "digits",
                      seed: int = 0, batch_size: int = 64) -> dict:
    """Bit agreement of the (FP16) engine's codes with the FP32 ONNX Runtime codes, and P@k/mAP of both
    (``compare_codes`` on ``data``'s splits)."""
    import numpy as np
    import onnxruntime as ort

    size, bits = onnx_signature(onnx_path)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    engine = EngineRunner(plan_path)

    def onnx_codes(px):
        return np.concatenate([session.run([OUTPUT_CODE], {INPUT_NAME: px[i : i + batch_size]})[0]
                               for i in range(0, len(px), batch_size)])

    return compare_codes(onnx_codes, lambda px: engine(px, batch_size)[1], size, bits, data, seed)
