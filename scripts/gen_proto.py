"""Generate memlm/v1/*_pb2*.py from proto/ (grpcio-tools), or check that the checked-in code is current.

    python scripts/gen_proto.py          # regenerate
    python scripts/gen_proto.py --check  # exit 1 when memlm/v1 differs from what proto/ generates (CI)
"""
from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc
import grpc_tools

ROOT = Path(__file__).resolve().parents[1]
PROTO_DIR = ROOT / "proto"
GENERATED = ("memlm_pb2.py", "memlm_pb2.pyi", "memlm_pb2_grpc.py")


def generate(out_dir: Path) -> None:
    protos = sorted(str(p.relative_to(PROTO_DIR)) for p in PROTO_DIR.rglob("*.proto"))
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTO_DIR}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if the checked-in code is stale")
    opts = parser.parse_args()
    if not opts.check:
        generate(ROOT)
        print(f"generated {', '.join(GENERATED)} in {ROOT / 'memlm' / 'v1'}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        stale = [
            name
            for name in GENERATED
            if not (ROOT / "memlm/v1" / name).is_file()
            or not filecmp.cmp(Path(tmp) / "memlm/v1" / name, ROOT / "memlm/v1" / name, shallow=False)
        ]
    if stale:
        print(f"stale generated code: {', '.join(stale)}; run `python scripts/gen_proto.py`", file=sys.stderr)
        return 1
    print("generated code is current")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
