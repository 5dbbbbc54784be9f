"""NVIDIA's ``perf_analyzer``: installed from PyPI wheels into one folder, and run on real images.

The ``tritonclient`` 2.34.0 wheel carries a working ``perf_analyzer`` binary (later wheels and
PyPI's ``perf-analyzer`` package do not). It needs ``libcudart.so.12`` (from the
``nvidia-cuda-runtime-cu12`` wheel, even for a CPU server) and Debian's ``libb64-0d``.
``install(DEST)`` (``make perf-analyzer``, DEST = ``.venv/perf_analyzer``) puts the binary in
``DEST/bin``, both libraries in ``DEST/lib`` (libb64 taken from the system when present, else
from ``apt-get download`` without root) and a wrapper ``DEST/perf_analyzer`` that sets
``LD_LIBRARY_PATH``. ``measure`` runs it against a Triton model with real encoded images as
input data and returns its figures parsed from its CSV report.
"""

from __future__ import annotations

import base64
import csv
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from dlheir.errors import UserError

TRITONCLIENT_WHEEL = "tritonclient==2.34.0"  # the last wheel with a working perf_analyzer binary
CUDART_WHEEL = "nvidia-cuda-runtime-cu12>=12,<13"
LIBB64 = "libb64.so.0d"
ENV = "DLHEIR_PERF_ANALYZER"  # path of a perf_analyzer (or wrapper) to use instead
INSTALL_HINT = "make perf-analyzer (installs NVIDIA's perf_analyzer into .venv/perf_analyzer)"
WRAPPER = """#!/bin/sh
# perf_analyzer from the tritonclient 2.34.0 wheel, with the libraries it needs beside it
here="$(dirname "$(readlink -f "$0")")"
LD_LIBRARY_PATH="$here/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" exec "$here/bin/perf_analyzer" "$@"
"""


def default_dir() -> Path:
    """``perf_analyzer`` inside the running virtualenv (``.venv/perf_analyzer`` for the project's)."""
    return Path(sys.prefix) / "perf_analyzer"


def find() -> Path | None:
    """The perf_analyzer to run: ``$DLHEIR_PERF_ANALYZER``, the installed wrapper, or one on PATH."""
    for candidate in (os.environ.get(ENV), default_dir() / "perf_analyzer", shutil.which("perf_analyzer")):
        if candidate and os.access(candidate, os.X_OK) and Path(candidate).is_file():
            return Path(candidate)
    return None


def _system_has_libb64() -> bool:
    try:
        out = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    return LIBB64 in out


def _libb64_from_apt(lib_dir: Path, work: Path) -> None:
    """``apt-get download`` (no root needed) and unpack libb64's shared library into ``lib_dir``."""
    try:
        subprocess.run(["apt-get", "download", "libb64-0d"], cwd=work, check=True, capture_output=True, timeout=300)
        (deb,) = work.glob("libb64-0d_*.deb")
        subprocess.run(["dpkg-deb", "-x", str(deb), str(work / "deb")], check=True, capture_output=True, timeout=60)
        (so,) = (work / "deb").rglob(LIBB64)
    except (OSError, ValueError, subprocess.SubprocessError):
        raise UserError(f"perf_analyzer needs Debian's libb64-0d ({LIBB64}) and it could not be downloaded "
                        "here: install it (sudo apt-get install libb64-0d) and run this again") from None
    shutil.copy2(so, lib_dir / LIBB64)


def _extract(wheel: Path, member_suffix: str, dest: Path) -> Path:
    with zipfile.ZipFile(wheel) as zf:
        names = [n for n in zf.namelist() if n.endswith(member_suffix)]
        if not names:
            raise UserError(f"{wheel.name} has no {member_suffix}")
        target = dest / Path(names[0]).name
        target.write_bytes(zf.read(names[0]))
    return target


def install(dest: Path | str | None = None) -> Path:
    """Install perf_analyzer into ``dest`` (default ``default_dir()``) and check that it starts; returns the wrapper."""
    dest = Path(dest) if dest else default_dir()
    bin_dir, lib_dir = dest / "bin", dest / "lib"
    bin_dir.mkdir(parents=True, exist_ok=True)
    lib_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                        "--dest", str(work), TRITONCLIENT_WHEEL, CUDART_WHEEL], check=True, timeout=600)
        (tc,) = work.glob("tritonclient-*.whl")
        (rt,) = work.glob("nvidia_cuda_runtime_cu12-*.whl")
        exe = _extract(tc, "data/bin/perf_analyzer", bin_dir)
        exe.chmod(0o755)
        _extract(rt, "lib/libcudart.so.12", lib_dir)
        if not _system_has_libb64() and not (lib_dir / LIBB64).exists():
            _libb64_from_apt(lib_dir, work)
    wrapper = dest / "perf_analyzer"
    wrapper.write_text(WRAPPER)
    wrapper.chmod(0o755)
    out = subprocess.run([str(wrapper), "-h"], capture_output=True, text=True, timeout=60)
    if "measurement-interval" not in out.stdout + out.stderr:  # it did not start (a library missing)
        raise UserError(f"{wrapper} does not run: {(out.stderr or out.stdout).strip()[-300:]}")
    return wrapper


def input_data(images: list[bytes], path: Path | str) -> Path:
    """perf_analyzer's ``--input-data`` JSON: one step per encoded image, as a b64 BYTES ``IMAGE_BYTES``.

    For a BYTES input, ``b64`` holds the serialized tensor: each element prefixed with its length
    (4 bytes, little-endian), as Triton's wire format has it; perf_analyzer repeats the step's one
    element to fill a batch.
    """
    from dlheir.contract import IMAGE_BYTES

    steps = [{IMAGE_BYTES: {"b64": base64.b64encode(struct.pack("<I", len(b)) + b).decode("ascii"), "shape": [1]}}
             for b in images]
    path = Path(path)
    path.write_text(json.dumps({"data": steps}))
    return path


def parse_csv(text: str) -> list[dict]:
    """Rows of perf_analyzer's ``-f`` CSV report: concurrency, inferences/s, latency percentiles (ms)."""
    rows = []
    for rec in csv.DictReader(text.splitlines()):
        def ms(key: str) -> float | None:
            return float(rec[key]) / 1e3 if rec.get(key) not in (None, "") else None  # reported in microseconds

        rows.append({"concurrency": int(rec["Concurrency"]), "infer_per_s": float(rec["Inferences/Second"]),
                     "p50_ms": ms("p50 latency"), "p90_ms": ms("p90 latency"), "p99_ms": ms("p99 latency")})
    return rows


def measure(exe: Path | str, url: str, model: str, images: list[bytes], batch: int, concurrency: list[int],
            measurement_ms: int = 3000, stability_percent: int = 25, timeout: float = 300) -> dict:
    """Run perf_analyzer (gRPC) on ``model`` with ``images`` as input data, once per concurrency level.

    Returns its rows (``infer_per_s`` counts inferences, i.e. images: each request carries
    ``batch`` of them); a level that fails gives ``error`` in its row, and ``error`` at the top
    when none ran. The stability threshold is looser than perf_analyzer's 10 % because this
    project's machines are shared; it is recorded with the figures.
    """
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = input_data(images, Path(tmp) / "input.json")
        for level in concurrency:
            report = Path(tmp) / f"report_{level}.csv"
            cmd = [str(exe), "-m", model, "-u", url, "-i", "grpc", "-b", str(batch),
                   "--concurrency-range", f"{level}:{level}", "--input-data", str(data),
                   "--measurement-interval", str(measurement_ms), "--stability-percentage", str(stability_percent),
                   "-f", str(report)]
            try:
                out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
            except subprocess.TimeoutExpired:
                rows.append({"concurrency": level, "error": f"perf_analyzer did not finish within {timeout:.0f} s"})
                continue
            parsed = parse_csv(report.read_text()) if out.returncode == 0 and report.exists() else []
            if not parsed:
                why = " ".join((out.stderr or out.stdout).split())[-400:] or f"exit code {out.returncode}"
                rows.append({"concurrency": level, "error": why})
                continue
            rows.extend(parsed)
    result = {"model": model, "batch": batch, "measurement_ms": measurement_ms,
              "stability_percent": stability_percent, "images": len(images), "rows": rows}
    if rows and all("error" in r for r in rows):
        result["error"] = rows[0]["error"]
    return result


def main(argv: list[str] | None = None) -> int:
    """``python -m dlheir.benchmarks.perf_analyzer install [DEST]`` (what ``make perf-analyzer`` runs)."""
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] != "install":
        print("usage: python -m dlheir.benchmarks.perf_analyzer install [DEST]", file=sys.stderr)
        return 2
    try:
        wrapper = install(args[1] if len(args) > 1 else None)
    except (UserError, subprocess.SubprocessError) as exc:
        print(f"perf_analyzer: error: {exc}", file=sys.stderr)
        return 1
    print(f"perf_analyzer installed: {wrapper}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
