"""Builds the package with its gRPC stubs generated from the repository's proto/ directory.

The stubs (`quiver/v1/*_pb2.py`, `*_pb2_grpc.py`, `*_pb2.pyi`) are written into the build tree
by grpcio-tools at build time and are never edited or checked in; `tests/test_stubs.py` fails
when an installed package's stubs differ from ../proto.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

PROTO_ROOT = Path(__file__).resolve().parent.parent / "proto"


def generate_stubs(out: Path) -> None:
    import importlib.resources

    from grpc_tools import protoc

    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / "quiver" / "v1").glob("*.proto"))
    if not protos:
        raise SystemExit(f"no .proto files under {PROTO_ROOT}/quiver/v1: build from a Quiver checkout")
    well_known = str(importlib.resources.files("grpc_tools") / "_proto")
    out.mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("grpc_tools.protoc failed on " + ", ".join(protos))


class BuildPyWithStubs(build_py):
    def run(self) -> None:
        super().run()
        generate_stubs(Path(self.build_lib))


setup(cmdclass={"build_py": BuildPyWithStubs})
