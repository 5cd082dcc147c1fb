"""Build step shared by both distributions: generate ``grant_broker_protocol.v1`` from the .proto files.

``setup.py`` (the broker, with the SDK and the protocol package) and
``client/setup.py`` (the SDK alone) both install these command classes:

- ``build_py`` runs protoc (grpcio-tools) with the mypy-protobuf plugins before
  the Python sources are collected, so every wheel and every editable install
  gets ``*_pb2.py`` / ``*_pb2_grpc.py`` with typed ``.pyi`` stubs beside them;
- ``sdist`` puts the .proto files (and this module) into the source
  distribution, wherever they live in the checkout, and leaves the generated
  modules out: they are regenerated from the protos by whoever builds a wheel.

A build that finds no .proto files stops with an error instead of producing a
package without its messages.

This file is not part of any installed package; it lives in ``client/`` so
that the SDK's own source tree (and sdist) carries it, and the top-level
``setup.py`` imports it from there.
"""

from __future__ import annotations

import importlib.metadata
import os
import pathlib
import shutil
import sys
import sysconfig
import tempfile
from collections.abc import Sequence

from setuptools.command.build_py import build_py
from setuptools.command.sdist import sdist

PACKAGE = "grant_broker_protocol"
"""The package the protos generate into: proto/grant_broker_protocol/v1/x.proto -> grant_broker_protocol/v1/x_pb2.py."""

SDIST_PROTO_DIR = "proto"
"""Where the .proto files are in every sdist, relative to its root."""

MODULE_FILE = pathlib.Path(__file__).resolve()

_GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")

# The protoc plugins of mypy-protobuf: typed stubs for the messages and for the
# gRPC stubs/servicers.
_PLUGINS = {"mypy": "protoc-gen-mypy", "mypy_grpc": "protoc-gen-mypy_grpc"}


def is_generated(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a module the build generates (never committed, never in an sdist)."""
    return pathlib.PurePath(path).name.endswith(_GENERATED_SUFFIXES)


def proto_files(root: pathlib.Path, package: str = PACKAGE) -> list[pathlib.Path]:
    """The .proto files of one generated package (a path such as ``grant_broker_protocol``) under one proto root, sorted."""
    return sorted((root / package).rglob("*.proto")) if (root / package).is_dir() else []


def find_proto_root(candidates: Sequence[pathlib.Path], package: str = PACKAGE) -> pathlib.Path:
    """The first of ``candidates`` holding .proto files of ``package``; exits with an error when none does."""
    for root in candidates:
        if proto_files(root, package):
            return root
    searched = ", ".join(str(root / package) for root in candidates)
    raise SystemExit(
        f"grant-broker build: no .proto files found (looked in {searched}). "
        f"The generated modules of {package.replace('/', '.')} cannot be built without them: "
        "build from a checkout of the repository or from an sdist that carries proto/."
    )


def find_plugin(executable: str) -> str:
    """The path of a protoc plugin that mypy-protobuf installs, as seen from this build.

    In order: the script recorded by the mypy-protobuf distribution that this
    interpreter imports (right in any isolated build env, whichever frontend
    made it), then beside the interpreter and in its scripts directory, then PATH.
    """
    candidates: list[pathlib.Path] = []
    try:
        dist = importlib.metadata.distribution("mypy-protobuf")
    except importlib.metadata.PackageNotFoundError:
        dist = None
    if dist is not None:
        candidates += [pathlib.Path(os.path.normpath(str(dist.locate_file(f)))) for f in dist.files or () if f.name == executable]
    candidates += [pathlib.Path(sys.executable).parent / executable, pathlib.Path(sysconfig.get_path("scripts")) / executable]
    on_path = shutil.which(executable)
    if on_path:
        candidates.append(pathlib.Path(on_path))
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    raise SystemExit(
        f"grant-broker build: the protoc plugin {executable} was not found "
        f"(mypy-protobuf {'is not installed' if dist is None else 'is installed but its script is missing'} "
        f"for {sys.executable}). It is a build requirement ([build-system].requires); "
        "when building without isolation, install mypy-protobuf first."
    )


def generate(proto_root: pathlib.Path, package_dir: pathlib.Path, package: str = PACKAGE) -> list[pathlib.Path]:
    """Generate the modules and stubs of every .proto under ``proto_root/package`` into ``package_dir``.

    ``package`` is the package's path below the proto root (the protos of
    ``grant_broker_protocol`` by default; ``grant_broker/deviceplugin`` for the
    broker's kubelet API), ``package_dir`` its source directory. What an
    earlier build generated there is removed first, so a deleted .proto leaves
    nothing behind. Returns the files written, relative to ``package_dir``.
    """
    import grpc_tools
    from grpc_tools import protoc

    protos = [p.relative_to(proto_root) for p in proto_files(proto_root, package)]
    if not protos:
        find_proto_root([proto_root], package)  # exits with the error
    well_known = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    plugins = {out: find_plugin(executable) for out, executable in _PLUGINS.items()}
    written: list[pathlib.Path] = []
    with tempfile.TemporaryDirectory(prefix="grant-broker-protoc-") as staging:
        args = [
            "grpc_tools.protoc",
            f"-I{proto_root}",
            f"-I{well_known}",
            *(f"--plugin=protoc-gen-{out}={path}" for out, path in plugins.items()),
            f"--python_out={staging}",
            f"--grpc_python_out={staging}",
            f"--mypy_out={staging}",
            f"--mypy_grpc_out={staging}",
            *map(str, protos),
        ]
        if protoc.main(args) != 0:
            raise SystemExit(f"grant-broker build: protoc failed on {', '.join(map(str, protos))} (in {proto_root})")
        for stale in package_dir.rglob("*"):
            if stale.is_file() and is_generated(stale):
                stale.unlink()
        generated_root = pathlib.Path(staging) / package
        for generated in sorted(generated_root.rglob("*")):
            if generated.is_file():
                relative = generated.relative_to(generated_root)
                (package_dir / relative).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(generated, package_dir / relative)
                written.append(relative)
    # proto/grant_broker_protocol/v1/x.proto must have given v1/x_pb2.pyi (and the rest).
    unstubbed = [str(p) for p in protos if p.relative_to(package).with_name(f"{p.stem}_pb2.pyi") not in written]
    if unstubbed:
        raise SystemExit(f"grant-broker build: no typed stubs were generated for {', '.join(unstubbed)}")
    return written


def command_classes(
    *,
    project_root: pathlib.Path,
    package_dir: pathlib.Path,
    proto_roots: Sequence[pathlib.Path],
    more_packages: Sequence[tuple[str, pathlib.Path]] = (),
) -> dict[str, type]:
    """The ``cmdclass`` of the setup.py in ``project_root``.

    ``package_dir``: the source directory of grant_broker_protocol in that
    project. ``proto_roots``: where to look for ``grant_broker_protocol/**/*.proto``,
    in order; the first that has any wins. ``more_packages``: further
    (package path below the proto root, source directory) pairs this
    distribution generates too, such as the broker's kubelet device-plugin
    API (``grant_broker/deviceplugin``), which the SDK's distribution does not
    carry. The sdist carries the protos in ``proto/`` and this module where it
    is relative to ``project_root``.
    """
    roots = list(proto_roots)
    packages = [(PACKAGE, package_dir), *more_packages]
    module_in_sdist = MODULE_FILE.relative_to(project_root.resolve()).as_posix()

    class build_py_with_protos(build_py):
        """Generate the protocol modules before the Python sources are collected."""

        def run(self) -> None:
            for package, directory in packages:
                generate(find_proto_root(roots, package), directory, package)
            # Package data (the .pyi stubs) is listed lazily: forget a listing made before they existed.
            self.__dict__.pop("data_files", None)
            super().run()

    class sdist_with_protos(sdist):
        """An sdist that carries the .proto files and this module, and none of the generated modules."""

        def make_release_tree(self, base_dir: str, files: list[str]) -> None:
            super().make_release_tree(base_dir, [f for f in files if not is_generated(f)])
            carried: list[tuple[pathlib.Path, str]] = []
            for package, _ in packages:
                proto_root = find_proto_root(roots, package)
                carried += [(p, f"{SDIST_PROTO_DIR}/{p.relative_to(proto_root).as_posix()}") for p in proto_files(proto_root, package)]
            carried.append((MODULE_FILE, module_in_sdist))
            for source, relative in carried:
                dest = pathlib.Path(base_dir) / relative
                dest.parent.mkdir(parents=True, exist_ok=True)
                if dest.exists():
                    dest.unlink()  # may be a hard link to the checkout's file
                shutil.copyfile(source, dest)

    return {"build_py": build_py_with_protos, "sdist": sdist_with_protos}
