"""Regenerate the Python stubs for client/weir/v1 in place (`make proto`); `--check` fails if they are stale."""

from __future__ import annotations

import argparse
import filecmp
import pathlib
import shutil
import sys
import tempfile

from grpc_tools import protoc

ROOT = pathlib.Path(__file__).resolve().parent.parent
# The contract ships inside the client distribution: the import path weir/v1 is also the .proto path.
PROTO_ROOT = ROOT / "client"
PACKAGE = PROTO_ROOT / "weir" / "v1"


def generate(out_dir: pathlib.Path) -> None:
    """Run protoc (from grpcio-tools) over every .proto file, writing *_pb2.py, *_pb2.pyi and *_pb2_grpc.py."""
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PACKAGE.glob("*.proto"))
    include = pathlib.Path(protoc.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if the checked-in stubs are not current")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(tmp)
        generate(out)
        generated = sorted((out / "weir" / "v1").glob("*_pb2*.py*"))
        stale = [
            g.name
            for g in generated
            if not (PACKAGE / g.name).exists() or not filecmp.cmp(g, PACKAGE / g.name, shallow=False)
        ]
        if args.check:
            if stale:
                print(f"generated stubs are stale: {', '.join(stale)}; run `make proto`", file=sys.stderr)
                return 1
            print("stubs are current")
            return 0
        for g in generated:
            shutil.copy(g, PACKAGE / g.name)
        print(f"wrote {len(generated)} files to {PACKAGE.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
