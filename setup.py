"""Build hook of the grant-broker distribution (the broker, with the SDK and the protocol package).

The gRPC/protobuf modules of ``grant_broker_protocol.v1`` are generated at build
time from proto/ (they are never committed): every wheel, sdist-built wheel and
editable install runs protoc, with mypy-protobuf's typed stubs. The step itself
lives in client/grant_broker_protocol_build.py, shared with the SDK's own
distribution (client/setup.py); the sdist carries it and proto/.  This
distribution also generates ``grant_broker.deviceplugin.v1beta1`` (kubelet's
device-plugin API, proto/grant_broker/deviceplugin/), which the SDK does not carry.
"""

from __future__ import annotations

import pathlib
import sys

from setuptools import setup

ROOT = pathlib.Path(__file__).parent.resolve()
sys.path.insert(0, str(ROOT / "client"))

import grant_broker_protocol_build as protocol_build  # noqa: E402  (found through the path above)

setup(
    cmdclass=protocol_build.command_classes(
        project_root=ROOT,
        package_dir=ROOT / "client" / protocol_build.PACKAGE,
        proto_roots=[ROOT / protocol_build.SDIST_PROTO_DIR],
        # kubelet's device-plugin API (grant-broker device-plugin): the broker's alone, never the SDK's.
        more_packages=[("grant_broker/deviceplugin", ROOT / "broker" / "grant_broker" / "deviceplugin")],
    )
)
