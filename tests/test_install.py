"""The package installs and runs outside the repository.

* A wheel of the working tree, installed NON-editable into a fresh virtualenv, runs
  ``dlheir demo`` from a temporary folder: everything the demo needs (the Triton model
  templates included) must be inside the wheel. The new virtualenv reuses the already
  installed dependencies through a ``.pth`` line (nothing is downloaded); the repository's
  editable ``dlheir`` is not on its path.
* The ``triton-models`` extra is enough for Triton's python-backend models: their code and the
  dlheir modules they import load in a virtualenv that holds only that extra's packages.
* The container command of the README and docs/ installs exactly that extra.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest

from docs_pages import doc_text
from helpers import REPO_ROOT

pytestmark = pytest.mark.slow
EXTRA = "triton-models"


def _copy_tree(dest: Path) -> Path:
    """The working tree as git sees it (tracked and untracked, not ignored): what a user's checkout has."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO_ROOT,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = REPO_ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


def _venv(path: Path) -> tuple[Path, Path]:
    """A fresh virtualenv without pip: (its python, its site-packages)."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True, timeout=120)
    python = path / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    return python, Path(site)


def _pip(*args: str, timeout: float = 600) -> None:
    subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", *args], check=True, timeout=timeout,
                   capture_output=True)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("wheel")
    src = _copy_tree(work / "src")
    _pip("wheel", "--no-deps", "--no-build-isolation", "-w", str(work / "dist"), str(src))
    (whl,) = (work / "dist").glob("dlheir-*.whl")
    return whl


def test_wheel_installed_non_editable_runs_the_demo_from_elsewhere(wheel, tmp_path, digits_small):
    python, site = _venv(tmp_path / "venv")
    # reuse the project's installed dependencies without downloading: their folder goes on the
    # path after the new venv's own (a plain path line: .pth files inside it, the editable
    # dlheir's among them, are not processed)
    (site / "zz_reuse_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _pip("--python", str(python), "install", "--no-deps", "--no-index", str(wheel))
    run_dir, home, state = tmp_path / "elsewhere", tmp_path / "home", tmp_path / "state"
    run_dir.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(DLHEIR_HOME=str(home), DLHEIR_STATE=str(state), PATH=f"{python.parent}:{env.get('PATH', '')}")
    where = subprocess.run([str(python), "-c", "import dlheir; print(dlheir.__file__)"], cwd=run_dir, env=env,
                           capture_output=True, text=True, check=True).stdout.strip()
    assert Path(where).is_relative_to(tmp_path / "venv"), f"dlheir imported from {where}, not the new venv"

    # the whole demo pipeline at its smallest: 36 real digit images in 3 classes, 32 px, two epochs
    # (the bundled digits' 1797 images take minutes on a busy 2-core machine). Interrupted (Ctrl-C)
    # once its first epoch is saved, then run again: it resumes there and ends with its picture.
    command = [str(python.parent / "dlheir"), "demo", "--data", str(digits_small), "--epochs", "2",
               "--image-size", "32", "--work-dir", str(run_dir / "demo")]
    first = subprocess.Popen(command, cwd=run_dir, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                             text=True)
    try:
        said = []
        for line in first.stdout:  # ends when the demo does
            said.append(line)
            if line.startswith("epoch 1/2:"):
                first.send_signal(signal.SIGINT)
                break
        assert first.wait(timeout=120) == 130, said
    finally:
        first.kill()
    assert any("Ctrl-C is safe" in line for line in said), said
    demo = subprocess.run(command, cwd=run_dir, env=env, capture_output=True, text=True, timeout=900)
    assert demo.returncode == 0, (demo.stdout[-3000:], demo.stderr[-3000:])
    assert "resuming" in demo.stdout and "after epoch 1/2" in demo.stdout, demo.stdout[:2000]
    assert "epoch 1/2:" not in demo.stdout and "epoch 2/2:" in demo.stdout, demo.stdout[:2000]
    assert "about" in demo.stderr and "left" in demo.stderr  # progress, timed lines without a terminal
    picture = run_dir / "demo" / "demo.png"
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"picture: {picture}" in demo.stdout
    assert "next:" in demo.stdout.splitlines()[-1], demo.stdout[-500:]


def _extra_requirements() -> list[str]:
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    return project["optional-dependencies"][EXTRA]


def _closure(requirements: list[str]) -> set[str]:
    """The installed distributions these requirements pull in, transitively, with the extras they
    name (``tritonclient[grpc,http]`` brings what its http extra needs, as pip would)."""
    from packaging.requirements import Requirement

    seen: set[tuple[str, str]] = set()
    todo = [(r.name, extra) for r in map(Requirement, requirements) for extra in ("", *r.extras)]
    while todo:
        name, extra = todo.pop()
        key = name.lower().replace("_", "-")
        if (key, extra) in seen:
            continue
        seen.add((key, extra))
        for req in md.requires(name) or []:
            r = Requirement(req)
            if r.marker is None or r.marker.evaluate({"extra": extra}):
                if extra and r.marker is None:
                    continue  # the base requirements: followed under extra ""
                todo.extend((r.name, e) for e in ("", *r.extras))
    return {key for key, _ in seen}


def _link_distributions(names: set[str], dest: Path) -> None:
    """Symlink the top-level files and folders of the installed distributions ``names`` into ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in names:
        dist = md.distribution(name)
        for f in dist.files or []:
            top = f.parts[0]
            src = Path(dist.locate_file(top))
            if top.endswith(".pth") or top == ".." or not src.exists() or (dest / top).exists():
                continue
            (dest / top).symlink_to(src)


def _model_templates() -> list[Path]:
    """The python-backend model files of the repository (where the package keeps its templates)."""
    found = sorted(p for p in (REPO_ROOT / "model_repository").rglob("model.py"))
    found += sorted(p for p in (REPO_ROOT / "dlheir").rglob("model.py") if "model_repository" in p.parts)
    return found


def test_triton_models_extra_is_enough_for_the_python_backend_models(wheel, tmp_path):
    closure = _closure(_extra_requirements())
    assert "torch" not in closure and "onnxruntime" in closure
    python, site = _venv(tmp_path / "venv")
    _pip("--python", str(python), "install", "--no-deps", "--no-index", str(wheel))
    _link_distributions(closure, tmp_path / "deps")
    (site / "zz_extra_deps.pth").write_text(str(tmp_path / "deps") + "\n")
    # Triton's python backend provides triton_python_backend_utils at run time; pytriton ships the file
    utils = md.distribution("nvidia-pytriton").locate_file("pytriton/tritonserver/backends/python")
    backend = tmp_path / "backend"
    backend.mkdir()
    shutil.copy(Path(utils) / "triton_python_backend_utils.py", backend)
    models = _model_templates()
    assert len(models) >= 2, models
    code = (
        "import importlib.util, sys\n"
        "for i, path in enumerate(sys.argv[1:]):\n"
        "    spec = importlib.util.spec_from_file_location(f'triton_model_{i}', path)\n"
        "    module = importlib.util.module_from_spec(spec)\n"
        "    spec.loader.exec_module(module)\n"
        "    assert hasattr(module, 'TritonPythonModel'), path\n"
        "import dlheir\n"
        "print(dlheir.__file__)\n"
        "print(sorted(m.split('.')[0] for m in sys.modules if m.split('.')[0] in ('torch', 'grpc', 'faiss', 'sklearn', 'matplotlib')))\n"
        "try:\n"
        "    import torch\n"
        "except ImportError:\n"
        "    print('no torch')\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PYTHONPATH"] = str(backend)
    out = subprocess.run([str(python), "-c", code, *map(str, models)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    where, heavy, torch_line = out.stdout.strip().splitlines()[-3:]
    assert Path(where).is_relative_to(tmp_path / "venv")
    assert heavy == "[]", heavy
    assert torch_line == "no torch"  # the venv really holds only the extra


def test_readme_container_command_installs_exactly_the_extra():
    lines = [ln for ln in doc_text().splitlines() if "pip install --no-deps" in ln and "onnxruntime" in ln]
    assert lines, "neither the README nor docs/ has a container command installing the triton-models extra"
    for line in lines:
        quoted = re.findall(r"'([^']+)'", line.split("pip install --no-deps", 1)[1])
        assert sorted(quoted) == sorted(_extra_requirements()), line


# --- the light (base) install: serve and query without PyTorch --------------------------------------
TRAIN_ONLY = {"torch", "torchvision", "scikit-learn"}


def _base_requirements() -> list[str]:
    return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]


def test_base_install_serves_and_queries_without_torch(wheel, tmp_path, served_model, digits_small):
    """A virtualenv holding the wheel and only the base dependencies (no torch, torchvision or
    scikit-learn, not even transitively) runs the whole serving flow with the real binaries:
    Triton from an existing export, the cloud server, owner init / create-collection / upload,
    user keygen, grant and search; a training command answers with one line naming the extra."""
    closure = _closure(_base_requirements())
    assert not closure & TRAIN_ONLY, sorted(closure & TRAIN_ONLY)
    python, site = _venv(tmp_path / "venv")
    _pip("--python", str(python), "install", "--no-deps", "--no-index", str(wheel))
    _link_distributions(closure, tmp_path / "deps")
    (site / "zz_base_deps.pth").write_text(str(tmp_path / "deps") + "\n")
    from dlheir.procs import free_port

    home, state, work = tmp_path / "home", tmp_path / "state", tmp_path / "work"
    work.mkdir()
    home.mkdir(mode=0o700)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV") and not k.startswith("DLHEIR_")}
    grpc_port, server_port = free_port(), free_port()
    env.update(DLHEIR_HOME=str(home), DLHEIR_STATE=str(state), PATH=f"{python.parent}:{env.get('PATH', '')}",
               DLHEIR_SERVER=f"127.0.0.1:{server_port}", DLHEIR_TRITON=f"127.0.0.1:{grpc_port}",
               DLHEIR_ADMIN_TOKEN_FILE=str(tmp_path / "cloud" / "admin.token"), DLHEIR_COLLECTION="digits")
    dlheir = str(python.parent / "dlheir")

    def run(*args: str, ok: bool = True) -> subprocess.CompletedProcess:
        out = subprocess.run([dlheir, *args], cwd=work, env=env, capture_output=True, text=True, timeout=300)
        if ok:
            assert out.returncode == 0, (args, out.stdout[-2000:], out.stderr[-2000:])
        return out

    probe = subprocess.run([str(python), "-c", "import importlib.util as u; import dlheir; "
                            "print(dlheir.__file__); print([m for m in ('torch', 'torchvision', 'sklearn') if u.find_spec(m)])"],
                           cwd=work, env=env, capture_output=True, text=True, check=True).stdout.split()
    assert Path(probe[0]).is_relative_to(tmp_path / "venv") and probe[1] == "[]", probe

    # the training side says what to install, in one line, without a traceback
    for args in (["train"], ["export", "onnx", "--checkpoint", str(served_model["checkpoint"])], ["demo"]):
        out = run(*args, ok=False)
        assert out.returncode == 2 and "pip install 'dlheir[train]'" in out.stderr, (args, out.stderr)
        assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr

    run("triton", "start", "--onnx", str(served_model["onnx"]), "--grpc-port", str(grpc_port),
        "--http-port", str(free_port()), "--metrics-port", str(free_port()))
    try:
        run("server", "start", "--data-dir", str(tmp_path / "cloud"), "--port", str(server_port))
        try:
            run("owner", "init")
            run("owner", "create-collection", "digits")
            upload = run("owner", "upload", str(digits_small))
            run("user", "keygen")
            run("owner", "grant", "--user", "alice")
            query = sorted(digits_small.rglob("*.png"))[0]
            found = run("user", "search", str(query), "-k", "3", "--out", str(work / "found"), "--json")
            import json

            hits = json.loads(found.stdout)["results"]
            assert hits and hits[0]["distance"] == 0, (upload.stdout, found.stdout)
            originals = {p.read_bytes() for p in digits_small.rglob("*.png")}
            for hit in hits:  # every result decrypts to one of the uploaded files, byte for byte
                assert (work / "found" / Path(hit["file"]).name).read_bytes() in originals, hit
        finally:
            run("server", "stop", "--data-dir", str(tmp_path / "cloud"), ok=False)
    finally:
        run("triton", "stop", ok=False)
