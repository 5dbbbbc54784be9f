"""The Triton model repository, generated for one backend from the committed templates.

``model_repository/`` (package data ``dlheir.model_repository``) holds templates only: one
``config.pbtxt`` per model, with ``model.py`` beside it for the python-backend models.
:func:`prepare_repository` writes a complete repository for a chosen backend behind the one
public ensemble name (``dlheir.contract.PUBLIC_MODEL``):

=============  ===========================================================================
backend        models
=============  ===========================================================================
onnx-cpu       ``dlheir_preprocess``, ``dlheir_onnx_cpu`` (python backend, ONNX Runtime), ``dlheir``
onnx-gpu       ``dlheir_preprocess``, ``dlheir_onnx`` (onnxruntime_onnx, KIND_GPU), ``dlheir``
tensorrt       ``dlheir_preprocess``, ``dlheir_trt`` (tensorrt_plan), ``dlheir``
=============  ===========================================================================

Each export installed into an existing repository becomes version N+1 of the network model
(version 1 is never overwritten; Triton serves the newest, older ones stay for a rollback);
installing the same file again adds nothing. S, N and the model's fingerprint
(``contract.model_fingerprint`` of the ONNX graph; for an engine, of the ONNX it was built
from) are written as config parameters on the network model and on the ensemble, so a client
reads them from the model it calls. Settings edited in a generated repository (e.g.
``max_pixels``) are kept when it is generated again; shapes, parameters and the ensemble's
step are rewritten.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from dlheir import paths
from dlheir.contract import (
    BITS_PARAM, CODE, FINGERPRINT_PARAM, IMAGE, IMAGE_SIZE_PARAM, MAX_PIXELS_PARAM, PROBS, PUBLIC_MODEL, code_bytes,
    model_fingerprint,
)
from dlheir.errors import UserError

PREPROCESS = "dlheir_preprocess"


@dataclass(frozen=True)
class Backend:
    """How one backend runs the network: its model name, model file and Triton backend."""

    name: str
    model: str  # the network model, the ensemble's second step
    filename: str  # the file in each version folder
    triton_backend: str  # the Triton backend that must be present to load it
    python: bool  # a python-backend model: model.py is copied beside the file


BACKENDS = {
    "onnx-cpu": Backend("onnx-cpu", "dlheir_onnx_cpu", "model.onnx", "python", True),
    "onnx-gpu": Backend("onnx-gpu", "dlheir_onnx", "model.onnx", "onnxruntime", False),
    "tensorrt": Backend("tensorrt", "dlheir_trt", "model.plan", "tensorrt", False),
}
TEMPLATES = (PREPROCESS, PUBLIC_MODEL, *(b.model for b in BACKENDS.values()))


@dataclass(frozen=True)
class Repository:
    """A generated (or checked) repository: what to load and which model it serves."""

    path: Path
    backend: str
    network: str
    image_size: int
    bits: int
    fingerprint: str
    version: int  # the network model's newest version (the one Triton serves)
    new_version: bool = False  # prepare_repository added that version

    @property
    def models(self) -> tuple[str, ...]:
        """The models to load, in dependency order."""
        return (PREPROCESS, self.network, PUBLIC_MODEL)

    def describe(self) -> str:
        return (f"{self.network} version {self.version} ({'new' if self.new_version else 'unchanged'}) in "
                f"{self.path}: fingerprint {self.fingerprint}, {self.image_size} px, {self.bits} bits, "
                f"served as '{PUBLIC_MODEL}'")


def backend_spec(name: str) -> Backend:
    try:
        return BACKENDS[name]
    except KeyError:
        raise UserError(f"unknown backend {name!r}: one of {', '.join(BACKENDS)}") from None


# --- where things are -----------------------------------------------------------------
def templates_dir() -> Path:
    """The committed templates: package data of a regular install, the source tree's otherwise."""
    import dlheir

    here = Path(dlheir.__file__).resolve().parent
    for candidate in (here / "model_repository", here.parent / "model_repository"):
        if (candidate / PUBLIC_MODEL / "config.pbtxt").is_file():
            return candidate
    raise UserError(f"the model repository templates are missing from {here} (a broken install?)")


def default_repository() -> Path:
    """The repository ``dlheir export onnx`` installs into and ``dlheir triton start`` serves."""
    return paths.state_dir() / "model_repository"


def exports_dir() -> Path:
    """Default folder of ``dlheir export onnx`` / ``export tensorrt`` outputs."""
    return paths.state_dir() / "exports"


def record_export(onnx_path: Path | str) -> None:
    """Remember ``onnx_path`` as the latest export (what ``triton start`` serves by default)."""
    exports_dir().mkdir(parents=True, exist_ok=True)
    (exports_dir() / "latest").write_text(str(Path(onnx_path).resolve()))


def latest_export() -> Path:
    """The ONNX file of the latest ``dlheir export onnx``; UserError when there is none."""
    record = exports_dir() / "latest"
    if record.is_file():
        path = Path(record.read_text().strip())
        if path.is_file():
            return path
        raise UserError(f"the latest export {path} is gone: run 'dlheir export onnx' again, or give --onnx")
    raise UserError("no ONNX export yet: run 'dlheir export onnx --checkpoint RUN_DIR/model.pt' first, "
                    "or give --onnx")


# --- configs --------------------------------------------------------------------------
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


def _write(path: Path, config, header: str = "") -> None:
    from google.protobuf import text_format

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(header + text_format.MessageToString(config))
    tmp.replace(path)


def _header(path: Path) -> str:
    return "".join(line for line in path.read_text().splitlines(keepends=True) if line.startswith("#"))


def _wanted_dims(image_size: int, bits: int) -> dict[str, list[int]]:
    return {IMAGE: [image_size, image_size, 3], PROBS: [bits], CODE: [code_bytes(bits)]}


def _set_dims(config, image_size: int, bits: int) -> None:
    wanted = _wanted_dims(image_size, bits)
    for tensor in [*config.input, *config.output]:
        if tensor.name in wanted:
            del tensor.dims[:]
            tensor.dims.extend(wanted[tensor.name])


def _set_params(config, **params) -> None:
    for key, value in params.items():
        config.parameters[key].string_value = str(value)


def _param(config, key: str) -> str | None:
    return config.parameters[key].string_value if key in config.parameters else None


def _install_file(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    shutil.copyfile(source, tmp)
    tmp.replace(target)


def _versions(model_dir: Path) -> list[int]:
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())


def prepare_repository(dest: Path | str, onnx_path: Path | str, backend: str = "onnx-cpu",
                       engine_path: Path | str | None = None, max_pixels: int | None = None,
                       preprocess_instances: int | None = None,
                       dynamic_batching: bool | None = None) -> Repository:
    """Write (or update) a complete model repository at ``dest`` serving ``onnx_path`` with ``backend``.

    ``engine_path`` (backend ``tensorrt``): an engine built by ``dlheir export tensorrt`` from
    ``onnx_path``. ``max_pixels``, ``preprocess_instances`` and ``dynamic_batching`` change
    ``dlheir_preprocess``'s settings (None keeps the template's or the existing config's).
    """
    from dlheir.contract import onnx_signature

    spec = backend_spec(backend)
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise UserError(f"ONNX file not found: {onnx_path} (run 'dlheir export onnx' first)")
    size, bits = onnx_signature(onnx_path)
    fingerprint = model_fingerprint(onnx_path)
    source = onnx_path
    if spec.name == "tensorrt":
        from dlheir.export.tensorrt_export import copy_engine, engine_fingerprint

        if engine_path is None:
            raise UserError("backend tensorrt needs an engine: build it with 'dlheir export tensorrt' on the GPU host")
        source = Path(engine_path)
        built_from = engine_fingerprint(source)
        if built_from != fingerprint:
            raise UserError(f"{source} was built from the ONNX with fingerprint {built_from}, not from {onnx_path} "
                            f"({fingerprint}): build it again with 'dlheir export tensorrt --onnx {onnx_path}'")
    templates = templates_dir()
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)

    # the network model: a new version, unless the newest already holds this very file
    net_dir = dest / spec.model
    versions = _versions(net_dir)
    newest = net_dir / str(versions[-1]) / spec.filename if versions else None
    if newest is not None and newest.is_file() and model_fingerprint(newest) == model_fingerprint(source):
        version, new = versions[-1], False
    else:
        version, new = (versions[-1] if versions else 0) + 1, True
        if spec.name == "tensorrt":
            copy_engine(source, net_dir / str(version) / spec.filename)
        else:
            _install_file(source, net_dir / str(version) / spec.filename)
    if spec.python:
        _install_file(templates / spec.model / "model.py", net_dir / str(version) / "model.py")
    _install_file(templates / PREPROCESS / "model.py", dest / PREPROCESS / "1" / "model.py")
    (dest / PUBLIC_MODEL / "1").mkdir(parents=True, exist_ok=True)  # Triton wants a version folder

    identity = {FINGERPRINT_PARAM: fingerprint, IMAGE_SIZE_PARAM: size, BITS_PARAM: bits}
    for model in (PREPROCESS, spec.model, PUBLIC_MODEL):
        target = dest / model / "config.pbtxt"
        base = target if target.is_file() else templates / model / "config.pbtxt"
        config = _parse(base)
        _set_dims(config, size, bits)
        if model == PREPROCESS:
            _set_params(config, **{IMAGE_SIZE_PARAM: size})
            if max_pixels is not None:
                _set_params(config, **{MAX_PIXELS_PARAM: max_pixels})
            if preprocess_instances is not None:
                del config.instance_group[1:]
                config.instance_group[0].count = preprocess_instances
            if dynamic_batching is True and not config.HasField("dynamic_batching"):
                config.dynamic_batching.max_queue_delay_microseconds = 500
            elif dynamic_batching is False:
                config.ClearField("dynamic_batching")
        else:
            _set_params(config, **identity)
        if model == PUBLIC_MODEL:
            config.ensemble_scheduling.step[-1].model_name = spec.model
        _write(target, config, _header(base))
    return Repository(dest, spec.name, spec.model, size, bits, fingerprint, version, new)


def keep_version(dest: Path | str, version: int, backend: str = "onnx-cpu") -> str:
    """Serve version ``version`` of the network model beside the newest one, as a model of its own,
    ``NETWORK_vVERSION`` (it takes warped pixels: TritonHasher preprocesses the images for it with
    dlheir.preprocess), so that collections still holding that model's codes can be searched, e.g.
    while ``dlheir owner reindex`` moves them to the new one. Returns the model's name."""
    spec = backend_spec(backend)
    if not spec.python:
        raise UserError(f"--keep-version serves an older version with the python backends only, not {backend}")
    dest = Path(dest)
    source = dest / spec.model / str(version) / spec.filename
    if not source.is_file():
        raise UserError(f"{dest / spec.model} has no version {version} to keep (versions: "
                        f"{', '.join(map(str, _versions(dest / spec.model))) or 'none'})")
    from dlheir.contract import onnx_signature

    size, bits = onnx_signature(source)
    name = f"{spec.model}_v{version}"
    _install_file(source, dest / name / "1" / spec.filename)
    _install_file(templates_dir() / spec.model / "model.py", dest / name / "1" / "model.py")
    template = templates_dir() / spec.model / "config.pbtxt"
    config = _parse(template)
    config.name = name
    _set_dims(config, size, bits)
    _set_params(config, **{FINGERPRINT_PARAM: model_fingerprint(source), IMAGE_SIZE_PARAM: size, BITS_PARAM: bits})
    _write(dest / name / "config.pbtxt", config, _header(template))
    return name


def check_repository(repo: Path | str) -> Repository:
    """What a repository serves, read from its ensemble; a clear error when its newest network
    version is missing or its configs disagree with it. Checks ``max_pixels`` too."""
    repo = Path(repo)
    ensemble = load_config(repo, PUBLIC_MODEL)
    network = ensemble.ensemble_scheduling.step[-1].model_name if ensemble.ensemble_scheduling.step else ""
    spec = next((b for b in BACKENDS.values() if b.model == network), None)
    if spec is None:
        raise UserError(f"{repo / PUBLIC_MODEL / 'config.pbtxt'}: its last step runs {network!r}, not one of "
                        f"{', '.join(b.model for b in BACKENDS.values())}: generate the repository with "
                        "'dlheir triton start' or dlheir.triton.repository.prepare_repository")
    config = load_config(repo, network)
    versions = _versions(repo / network)
    model_file = repo / network / str(versions[-1]) / spec.filename if versions else None
    if model_file is None or not model_file.is_file():
        raise UserError(f"{repo / network} has no version with a {spec.filename}: run 'dlheir export onnx "
                        "--checkpoint RUN_DIR/model.pt' first")
    try:
        size, bits = int(_param(config, IMAGE_SIZE_PARAM)), int(_param(config, BITS_PARAM))
    except (TypeError, ValueError):
        raise UserError(f"{repo / network / 'config.pbtxt'} has no {IMAGE_SIZE_PARAM}/{BITS_PARAM} parameters: "
                        "generate the repository again ('dlheir export onnx' or 'dlheir triton start')") from None
    fingerprint = _param(config, FINGERPRINT_PARAM) or ""
    if spec.filename == "model.onnx":
        from dlheir.contract import onnx_signature

        if onnx_signature(model_file) != (size, bits) or model_fingerprint(model_file) != fingerprint:
            raise UserError(f"{repo / network / 'config.pbtxt'} does not describe {model_file}: generate the "
                            "repository again ('dlheir export onnx' or 'dlheir triton start')")
    wanted = _wanted_dims(size, bits)
    for model, cfg in ((PREPROCESS, load_config(repo, PREPROCESS)), (network, config), (PUBLIC_MODEL, ensemble)):
        for tensor in [*cfg.input, *cfg.output]:
            if tensor.name in wanted and list(tensor.dims) != wanted[tensor.name]:
                raise UserError(f"{repo / model / 'config.pbtxt'}: {tensor.name} dims {list(tensor.dims)} do not "
                                f"match the model ({wanted[tensor.name]}); generate the repository again")
        if model != PREPROCESS and _param(cfg, FINGERPRINT_PARAM) != fingerprint:
            raise UserError(f"{repo / model / 'config.pbtxt'}: fingerprint {_param(cfg, FINGERPRINT_PARAM)} is not "
                            f"the served model's ({fingerprint}); generate the repository again")
    max_pixels(repo)
    return Repository(repo, spec.name, network, size, bits, fingerprint, versions[-1])


def max_pixels(repo: Path | str) -> int:
    """dlheir_preprocess's pixel limit (its ``max_pixels`` parameter; 0 = Pillow's own limit only)."""
    from dlheir.preprocess import DEFAULT_MAX_PIXELS

    config = load_config(repo, PREPROCESS)
    value = _param(config, MAX_PIXELS_PARAM)
    if value is None:
        return DEFAULT_MAX_PIXELS
    if not value.isdigit():
        raise UserError(f"{Path(repo) / PREPROCESS / 'config.pbtxt'}: max_pixels must be a whole number "
                        f"of pixels (0 for Pillow's own limit only), not {value!r}")
    return int(value)
