"""Build hook: generate the gRPC/protobuf modules from proto/ at build time.

The generated modules are never committed (see .gitignore); every build —
wheel, sdist or editable install — regenerates them from the .proto files into
broker/v1/, the directory that is the ``grant_broker_protocol.v1`` package.
"""

from __future__ import annotations

import pathlib
import shutil

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = pathlib.Path(__file__).parent.resolve()
PROTO_ROOT = ROOT / "proto"
# proto/grant_broker_protocol/... is generated into the grant_broker_protocol
# package, whose sources live in client/.
PACKAGE_NAME = "grant_broker_protocol"
PACKAGE_SOURCE = ROOT / "client" / PACKAGE_NAME


def generate_protos() -> None:
    import grpc_tools
    from grpc_tools import protoc

    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))
    if not protos:
        return
    staging = ROOT / "build" / "protogen"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    well_known = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={staging}",
        f"--pyi_out={staging}",
        f"--grpc_python_out={staging}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed on: " + " ".join(protos))
    # Drop what an earlier build generated, so a removed .proto leaves nothing behind.
    for stale in PACKAGE_SOURCE.glob("v*/*_pb2*.py*"):
        stale.unlink()
    for generated in (staging / PACKAGE_NAME).rglob("*"):
        if generated.is_file():
            dest = PACKAGE_SOURCE / generated.relative_to(staging / PACKAGE_NAME)
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(generated.read_bytes())


class build_py_with_protos(build_py):
    """Run protoc before the Python sources are collected."""

    def run(self) -> None:
        generate_protos()
        super().run()


setup(cmdclass={"build_py": build_py_with_protos})
