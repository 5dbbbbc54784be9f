"""The Triton model repository: configs are committed, model files and shapes come from export.

``install_onnx`` puts an exported graph where each model needs it and writes S (image
size) and N (bits) into every config, read from the graph itself, so no number is
edited by hand. ``check_repository`` verifies they agree before the server starts.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from dlheir.codes import code_bytes
from dlheir.errors import UserError

CPU_MODELS = ("dlheir_preprocess", "dlheir_onnx_cpu", "dlheir")  # what `dlheir triton start` loads
ONNX_MODELS = ("dlheir_onnx_cpu", "dlheir_onnx")  # models that read <model>/1/model.onnx
ALL_CONFIGS = ("dlheir_preprocess", "dlheir_onnx_cpu", "dlheir", "dlheir_onnx", "dlheir_onnx_ensemble",
               "dlheir_trt", "dlheir_trt_ensemble")


def _parse(path: Path):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    try:
        return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
    except text_format.ParseError as exc:
        raise UserError(f"{path}: not a valid Triton model config: {exc}") from exc


def load_config(repo: Path | str, model: str):
    path = Path(repo) / model / "config.pbtxt"
    if not path.is_file():
        raise UserError(f"model config not found: {path}")
    return _parse(path)


def _write(path: Path, config) -> None:
    from google.protobuf import text_format

    header = "".join(line for line in path.read_text().splitlines(keepends=True) if line.startswith("#"))
    path.write_text(header + text_format.MessageToString(config))


def _set_dims(config, image_size: int, bits: int) -> None:
    wanted = {"IMAGE": [image_size, image_size, 3], "PROBS": [bits], "CODE": [code_bytes(bits)]}
    for tensor in [*config.input, *config.output]:
        if tensor.name in wanted:
            del tensor.dims[:]
            tensor.dims.extend(wanted[tensor.name])
    if "image_size" in config.parameters:
        config.parameters["image_size"].string_value = str(image_size)


def install_onnx(onnx_path: Path | str, repo: Path | str) -> list[str]:
    """Copy the graph into every ONNX model of ``repo`` and write S and N into all configs."""
    from dlheir.export.onnx_export import onnx_signature

    onnx_path, repo = Path(onnx_path).resolve(), Path(repo)
    size, bits = onnx_signature(onnx_path)
    lines = []
    for model in ONNX_MODELS:
        target = (repo / model / "1" / "model.onnx").resolve()
        if (repo / model).is_dir() and target != onnx_path:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(onnx_path, target)
            lines.append(f"copied to {target}")
    for model in ALL_CONFIGS:
        path = repo / model / "config.pbtxt"
        if path.is_file():
            config = _parse(path)
            before = config.SerializeToString(deterministic=True)
            _set_dims(config, size, bits)
            if config.SerializeToString(deterministic=True) != before:  # keep committed files untouched otherwise
                _write(path, config)
    lines.append(f"configs in {repo} set to image size {size}, {bits} bits")
    return lines


def check_repository(repo: Path | str) -> tuple[int, int]:
    """(S, N) of the CPU models; a clear error when the model file is missing or configs disagree."""
    from dlheir.export.onnx_export import onnx_signature

    repo = Path(repo)
    onnx_file = repo / "dlheir_onnx_cpu" / "1" / "model.onnx"
    if not onnx_file.is_file():
        raise UserError(f"{onnx_file} is missing: run 'dlheir export onnx --checkpoint RUN_DIR/model.pt' first")
    size, bits = onnx_signature(onnx_file)
    for model in CPU_MODELS:
        config = load_config(repo, model)
        for tensor in [*config.input, *config.output]:
            want = {"IMAGE": [size, size, 3], "PROBS": [bits], "CODE": [code_bytes(bits)]}.get(tensor.name)
            if want is not None and list(tensor.dims) != want:
                raise UserError(
                    f"{repo / model / 'config.pbtxt'}: {tensor.name} dims {list(tensor.dims)} do not match "
                    f"the model ({want}); run 'dlheir export onnx' again to rewrite the configs"
                )
    max_pixels(repo)
    return size, bits


def max_pixels(repo: Path | str) -> int:
    """dlheir_preprocess's pixel limit (its ``max_pixels`` parameter; 0 = Pillow's own limit only)."""
    from dlheir.preprocess import DEFAULT_MAX_PIXELS

    config = load_config(repo, "dlheir_preprocess")
    if "max_pixels" not in config.parameters:
        return DEFAULT_MAX_PIXELS
    value = config.parameters["max_pixels"].string_value
    if not value.isdigit():
        raise UserError(f"{Path(repo) / 'dlheir_preprocess' / 'config.pbtxt'}: max_pixels must be a whole number "
                        f"of pixels (0 for Pillow's own limit only), not {value!r}")
    return int(value)
