"""Regenerate the committed gRPC stubs from proto/kvblend.proto: `python -m proto.build`.

The stubs (`proto/kvblend_pb2.py`, `.pyi`, `proto/kvblend_pb2_grpc.py`) are committed so that an
install needs no code generation; a test checks they match the .proto.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO = "proto/kvblend.proto"
OUTPUTS = ("proto/kvblend_pb2.py", "proto/kvblend_pb2.pyi", "proto/kvblend_pb2_grpc.py")


def build(out_dir: Path = ROOT) -> list[Path]:
    """Write the stubs under `out_dir` (as `proto/...`); returns their paths."""
    from grpc_tools import protoc

    (out_dir / "proto").mkdir(parents=True, exist_ok=True)
    # -I at the repository root makes the generated gRPC module import `from proto import kvblend_pb2`.
    status = protoc.main(["grpc_tools.protoc", f"-I{ROOT}", f"--python_out={out_dir}", f"--pyi_out={out_dir}",
                          f"--grpc_python_out={out_dir}", str(ROOT / PROTO)])
    if status != 0:
        raise RuntimeError(f"protoc failed on {PROTO} (exit status {status})")
    return [out_dir / name for name in OUTPUTS]


def main() -> int:
    for path in build():
        print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
