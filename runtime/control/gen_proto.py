"""Regenerate ``control_pb2.py`` and ``control_pb2_grpc.py`` from ``control.proto``.

    python -m plait.runtime.control.gen_proto            # rewrite the checked-in modules
    python -m plait.runtime.control.gen_proto --check    # exit 1 if they are stale

As for the snapshot daemon's proto (:mod:`plait.runtime.snapshot.transport.gen_proto`):
the modules are checked in, and protoc sees the proto under its package path, so
regenerating is byte-identical wherever the repository is checked out.
"""

from __future__ import annotations

import sys
from pathlib import Path

from plait.runtime.snapshot.transport.gen_proto import generate_from, run

__all__ = ["PROTO", "GENERATED", "generate"]

HERE = Path(__file__).resolve().parent
PROTO = HERE / "control.proto"
VIRTUAL_DIR = "plait/runtime/control"
GENERATED = ("control_pb2.py", "control_pb2_grpc.py")


def generate(out_dir: Path) -> list[Path]:
    return generate_from(PROTO, VIRTUAL_DIR, GENERATED, out_dir)


def main(argv: list[str] | None = None) -> int:
    return run(argv, module="plait.runtime.control.gen_proto", description=__doc__.split("\n")[0], generate=generate,
               here=HERE)


if __name__ == "__main__":
    sys.exit(main())
