"""Build hook of the grant-broker-client distribution (the SDK and the protocol package, no daemon).

The gRPC/protobuf modules of ``grant_broker_protocol.v1`` are generated at build
time (grant_broker_protocol_build.py, shared with the top-level setup.py) from
the .proto files: in an sdist they are in proto/ beside this file (the sdist
copies them there); in a checkout of the repository they are in ../proto.
"""

from __future__ import annotations

import pathlib
import sys

from setuptools import setup

HERE = pathlib.Path(__file__).parent.resolve()
sys.path.insert(0, str(HERE))

import grant_broker_protocol_build as protocol_build  # noqa: E402  (found through the path above)

setup(
    cmdclass=protocol_build.command_classes(
        project_root=HERE,
        package_dir=HERE / protocol_build.PACKAGE,
        proto_roots=[HERE / protocol_build.SDIST_PROTO_DIR, HERE.parent / protocol_build.SDIST_PROTO_DIR],
    )
)
