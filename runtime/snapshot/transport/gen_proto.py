"""Regenerate ``snapshot_pb2.py`` and ``snapshot_pb2_grpc.py`` from ``snapshot.proto``.

    python -m plait.runtime.snapshot.transport.gen_proto            # rewrite the checked-in modules
    python -m plait.runtime.snapshot.transport.gen_proto --check    # exit 1 if they are stale

The generated modules are checked in so that running plait needs only grpcio and
protobuf, not grpcio-tools. protoc sees the proto under the virtual path
``plait/runtime/snapshot/transport/snapshot.proto`` (``-Iplait/runtime/snapshot/transport=<this folder>``),
so the grpc module imports ``from plait.runtime.snapshot.transport import snapshot_pb2``, which
resolves inside the installed package, and the descriptor's file name is the same
wherever the repository is checked out: regenerating is byte-identical.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

__all__ = ["PROTO", "GENERATED", "generate", "generate_from", "run"]

HERE = Path(__file__).resolve().parent
PROTO = HERE / "snapshot.proto"
VIRTUAL_DIR = "plait/runtime/snapshot/transport"
GENERATED = ("snapshot_pb2.py", "snapshot_pb2_grpc.py")


def generate(out_dir: Path) -> list[Path]:
    """Run protoc (from grpcio-tools) on snapshot.proto; write the modules into ``out_dir``."""
    return generate_from(PROTO, VIRTUAL_DIR, GENERATED, out_dir)


def generate_from(proto: Path, virtual_dir: str, generated: tuple[str, ...], out_dir: Path) -> list[Path]:
    """Run protoc on ``proto`` seen under ``virtual_dir`` (its package path); write ``generated`` into ``out_dir``."""
    try:
        from grpc_tools import protoc
    except ImportError:
        raise SystemExit("gen_proto: grpcio-tools is not installed; pip install 'grpcio-tools>=1.85'") from None
    import importlib.resources

    well_known = str(importlib.resources.files("grpc_tools") / "_proto")
    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory(prefix="plait-protoc-") as tmp:
        args = [
            "grpc_tools.protoc",
            f"-I{virtual_dir}={proto.parent}",
            f"-I{well_known}",
            f"--python_out={tmp}",
            f"--grpc_python_out={tmp}",
            f"{virtual_dir}/{proto.name}",
        ]
        code = protoc.main(args)
        if code != 0:
            raise SystemExit(f"gen_proto: protoc failed with exit code {code} on {proto}")
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for name in generated:
            target = out_dir / name
            shutil.copyfile(Path(tmp) / virtual_dir / name, target)
            written.append(target)
    return written


def main(argv: list[str] | None = None) -> int:
    return run(argv, module="plait.runtime.snapshot.transport.gen_proto", description=__doc__.split("\n")[0],
               generate=generate, here=HERE)


def run(argv: list[str] | None, *, module: str, description: str, generate, here: Path) -> int:
    """The command line of a ``gen_proto`` module: rewrite its generated modules, or ``--check`` them."""
    parser = argparse.ArgumentParser(prog=f"python -m {module}", description=description)
    parser.add_argument("--check", action="store_true", help="only compare with the checked-in modules")
    args = parser.parse_args(argv)
    if not args.check:
        for path in generate(here):
            print(f"wrote {path}")
        return 0
    with tempfile.TemporaryDirectory(prefix="plait-gen-") as tmp:
        stale = [p.name for p in generate(Path(tmp)) if p.read_bytes() != (here / p.name).read_bytes()]
    if stale:
        print(f"stale: {', '.join(stale)}; run python -m {module}", file=sys.stderr)
        return 1
    print("generated modules are current")
    return 0


if __name__ == "__main__":
    sys.exit(main())
