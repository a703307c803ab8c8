"""Regenerate ``control_pb2.py`` and ``control_pb2_grpc.py`` from ``control.proto``.

    python -m plait.runtime.control.gen_proto            # rewrite the checked-in modules
    python -m plait.runtime.control.gen_proto --check    # exit 1 if they are stale

As for the snapshot daemon's proto (:mod:`plait.runtime.snapshot.transport.gen_proto`):
the modules are checked in, and protoc sees the proto under its package path, so
regenerating is byte-identical wherever the repository is checked out.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from plait.runtime.snapshot.transport.gen_proto import generate_from

__all__ = ["PROTO", "GENERATED", "generate"]

HERE = Path(__file__).resolve().parent
PROTO = HERE / "control.proto"
VIRTUAL_DIR = "plait/runtime/control"
GENERATED = ("control_pb2.py", "control_pb2_grpc.py")


def generate(out_dir: Path) -> list[Path]:
    return generate_from(PROTO, VIRTUAL_DIR, GENERATED, out_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m plait.runtime.control.gen_proto", description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="only compare with the checked-in modules")
    args = parser.parse_args(argv)
    if not args.check:
        for path in generate(HERE):
            print(f"wrote {path}")
        return 0
    with tempfile.TemporaryDirectory(prefix="plait-gen-") as tmp:
        stale = [p.name for p in generate(Path(tmp)) if p.read_bytes() != (HERE / p.name).read_bytes()]
    if stale:
        print(f"stale: {', '.join(stale)}; run python -m plait.runtime.control.gen_proto", file=sys.stderr)
        return 1
    print("generated modules are current")
    return 0


if __name__ == "__main__":
    sys.exit(main())
