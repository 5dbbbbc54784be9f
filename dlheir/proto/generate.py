"""Regenerate the gRPC stubs: ``python -m dlheir.proto.generate [OUT_DIR]``.

The stubs are committed; ``tests/test_cloud_server.py`` regenerates them into a
temporary folder and fails if they differ from the committed ones.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTO = "dlheir_cloud.proto"


def generate(out_dir: Path | str = HERE) -> list[Path]:
    from grpc_tools import protoc

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rc = protoc.main(["protoc", f"-I{HERE}", f"--python_out={out_dir}", f"--pyi_out={out_dir}",
                      f"--grpc_python_out={out_dir}", str(HERE / PROTO)])
    if rc != 0:
        raise RuntimeError(f"protoc failed with {rc}")
    grpc_file = out_dir / "dlheir_cloud_pb2_grpc.py"
    # make the generated import package-relative
    text = grpc_file.read_text()
    grpc_file.write_text(re.sub(r"^import dlheir_cloud_pb2 as", "from . import dlheir_cloud_pb2 as", text, flags=re.M))
    return sorted(out_dir.glob("dlheir_cloud_pb2*"))


if __name__ == "__main__":
    for path in generate(sys.argv[1] if len(sys.argv) > 1 else HERE):
        print(path)
