"""Size and time of each install variant, each into a fresh virtualenv (``make install-sizes``).

Variants: the base install (``pip install .``: cloud server, owner and user clients, Triton) and the
full one (``pip install '.[train]'``: training, evaluation, export and the network benchmarks too).
Each is a non-editable install of this checkout into a new ``python3 -m venv`` in a temporary folder,
with pip's cache as it is on this machine (a first install on an empty cache also downloads). Prints
a table and writes results/install_sizes.json. Standalone: it imports nothing of dlheir.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VARIANTS = {"base": ".", "train": ".[train]"}


def folder_bytes(path: Path) -> int:
    return sum(p.lstat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def measure(variant: str, spec: str, work: Path) -> dict:
    venv = work / variant
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    empty = folder_bytes(venv)
    start = time.perf_counter()
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "--disable-pip-version-check", spec],
                   cwd=REPO, check=True)
    seconds = time.perf_counter() - start
    size = folder_bytes(venv) - empty
    listed = subprocess.run([str(venv / "bin" / "pip"), "list", "--format", "json"], capture_output=True, text=True,
                            check=True).stdout
    names = {p["name"].lower() for p in json.loads(listed)}
    shutil.rmtree(venv)
    return {"variant": variant, "pip_install": f"pip install '{spec}'", "seconds": round(seconds, 1),
            "size_mb": round(size / 2**20), "packages": len(names), "torch": "torch" in names}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated (default: base,train)")
    parser.add_argument("--out", default="results/install_sizes.json")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="dlheir-install-") as tmp:
        for variant in args.variants.split(","):
            rows.append(measure(variant, VARIANTS[variant], Path(tmp)))
            row = rows[-1]
            print(f"{row['variant']:>6}: {row['pip_install']:<26} {row['seconds']:>7.1f} s {row['size_mb']:>6} MB "
                  f"{row['packages']:>4} packages, torch: {'yes' if row['torch'] else 'no'}", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"python": sys.version.split()[0], "rows": rows}, indent=2))
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
