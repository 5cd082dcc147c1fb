"""The distributions as a user gets them: sdist -> wheel -> a fresh virtualenv.

``python -m build`` (no flags) builds the sdist, then the wheel from that sdist,
each in an isolated environment with the [build-system] requirements from PyPI,
as a user's build does. That is the path that once produced a wheel without its
generated modules (the sdist had no proto/). Both distributions are built:

- grant-broker (the top level): the daemon, with the SDK and the protocol package;
- grant-broker-client (client/): the SDK and the protocol package alone.

Each wheel is then installed, with its dependencies, into a virtualenv of its
own, and every module of its packages is imported there: the SDK's without the
daemon, which must not be importable. One module-scoped fixture does all the
building (a few minutes; pip's cache makes repeats faster).
"""

from __future__ import annotations

import email.message
import email.parser
import os
import pathlib
import shutil
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from dataclasses import dataclass

import pytest
from packaging.requirements import Requirement

ROOT = pathlib.Path(__file__).resolve().parent.parent
# The broker's version; the SDK distribution must carry the same.
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
# The protocol both sides share (proto/grant_broker_protocol/), and kubelet's device-plugin API,
# which only the broker's distribution generates (proto/grant_broker/deviceplugin/).
PROTOS = sorted(p.relative_to(ROOT / "proto").as_posix() for p in (ROOT / "proto" / "grant_broker_protocol").rglob("*.proto"))
BROKER_PROTOS = sorted(p.relative_to(ROOT / "proto").as_posix() for p in (ROOT / "proto" / "grant_broker").rglob("*.proto"))
GENERATED = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")

# Generous: the first build downloads the build requirements (grpcio-tools, ...).
pytestmark = pytest.mark.timeout(1200)

# What a fresh clone with the working tree's changes holds: no virtualenv, no
# earlier build output, no generated modules (the builds must make them).
_NOT_SOURCES = shutil.ignore_patterns(
    ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "*.pyc", ".pytest_cache", ".mypy_cache",
    ".hypothesis", ".xen-run", "bench-results", *(f"*{suffix}" for suffix in GENERATED),
)


@dataclass
class Dist:
    sdist: pathlib.Path
    wheel: pathlib.Path
    venv: pathlib.Path

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run a program of the virtualenv (``python``, ``grant-broker``) outside the checkout."""
        return subprocess.run(
            [str(self.venv / "bin" / args[0]), *args[1:]], cwd=self.venv, capture_output=True, text=True, timeout=120,
            env={k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")},
        )


def _check(cmd: list[str], timeout: float = 120) -> None:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}"


def _build_and_install(source: pathlib.Path, out: pathlib.Path, venv: pathlib.Path) -> Dist:
    # No --sdist/--wheel: the sdist first, then the wheel built from the unpacked sdist.
    _check([sys.executable, "-m", "build", "--outdir", str(out), str(source)], timeout=900)
    (sdist,) = out.glob("*.tar.gz")
    (wheel,) = out.glob("*.whl")
    # A virtualenv without pip of its own: this interpreter's pip installs into it.
    _check([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    _check([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "--quiet",
            "--disable-pip-version-check", str(wheel)], timeout=600)
    return Dist(sdist, wheel, venv)


@pytest.fixture(scope="module")
def dists(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Dist]:
    base = tmp_path_factory.mktemp("packaging")
    checkout = base / "checkout"
    shutil.copytree(ROOT, checkout, ignore=_NOT_SOURCES, symlinks=True)
    return {
        "broker": _build_and_install(checkout, base / "dist-broker", base / "venv-broker"),
        "client": _build_and_install(checkout / "client", base / "dist-client", base / "venv-client"),
    }


def _sdist_names(dist: Dist) -> set[str]:
    with tarfile.open(dist.sdist) as sdist:
        top = sdist.getnames()[0].split("/")[0]
        return {name.removeprefix(top + "/") for name in sdist.getnames()}


def _wheel_names(dist: Dist) -> set[str]:
    with zipfile.ZipFile(dist.wheel) as wheel:
        return set(wheel.namelist())


def _metadata(dist: Dist) -> email.message.Message:
    with zipfile.ZipFile(dist.wheel) as wheel:
        (name,) = [n for n in wheel.namelist() if n.endswith(".dist-info/METADATA")]
        return email.parser.Parser().parsestr(wheel.read(name).decode())


def _expected_generated(package_dir: str = "grant_broker_protocol", protos: list[str] = PROTOS) -> set[str]:
    # proto/grant_broker_protocol/v1/x.proto -> grant_broker_protocol/v1/x_pb2.py, ...
    return {f"{package_dir}{p.removeprefix('grant_broker_protocol').removesuffix('.proto')}{s}" for p in protos for s in GENERATED}


def _expected_broker_generated() -> set[str]:
    # proto/grant_broker/deviceplugin/v1beta1/api.proto -> grant_broker/deviceplugin/v1beta1/api_pb2.py, ...
    return {f"{p.removesuffix('.proto')}{s}" for p in BROKER_PROTOS for s in GENERATED}


@pytest.mark.parametrize("name", ["broker", "client"])
def test_sdist_carries_the_protos_and_no_generated_modules(dists: dict[str, Dist], name: str) -> None:
    names = _sdist_names(dists[name])
    assert PROTOS, "the repository has no .proto files"
    assert {f"proto/{p}" for p in PROTOS} <= names
    assert BROKER_PROTOS, "kubelet's device-plugin API is missing from proto/grant_broker/"
    carried = {f"proto/{p}" for p in BROKER_PROTOS} & names
    assert carried == ({f"proto/{p}" for p in BROKER_PROTOS} if name == "broker" else set())
    build_module = "client/grant_broker_protocol_build.py" if name == "broker" else "grant_broker_protocol_build.py"
    assert build_module in names
    assert not [n for n in names if n.endswith(GENERATED)]


@pytest.mark.parametrize("name", ["broker", "client"])
def test_wheel_built_from_the_sdist_has_generated_modules_and_stubs(dists: dict[str, Dist], name: str) -> None:
    names = _wheel_names(dists[name])
    assert _expected_generated() <= names, sorted(_expected_generated() - names)
    if name == "broker":
        assert _expected_broker_generated() <= names, sorted(_expected_broker_generated() - names)
    assert "grant_broker_client/py.typed" in names
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    expected = {"grant_broker_client", "grant_broker_protocol"} | ({"grant_broker"} if name == "broker" else set())
    assert tops == expected
    if name == "broker":
        assert "grant_broker/py.typed" in names


def test_sdk_metadata_asks_ranges_and_nothing_of_the_daemon(dists: dict[str, Dist]) -> None:
    meta = _metadata(dists["client"])
    assert (meta["Name"], meta["Version"]) == ("grant-broker-client", VERSION)
    requires = meta.get_all("Requires-Dist") or []
    parsed = [Requirement(r) for r in requires]
    assert {"grpcio", "protobuf"} <= {r.name for r in parsed}
    assert not {r.name for r in parsed} & {"uvloop", "grpcio-health-checking", "grpcio-reflection", "grant-broker"}
    # Ranges: each bounded below and above, never pinned.
    for req in parsed:
        operators = {spec.operator for spec in req.specifier}
        assert {">=", "<"} <= operators and not operators & {"==", "===", "~="}, req


def test_broker_and_sdk_versions_agree(dists: dict[str, Dist]) -> None:
    assert _metadata(dists["broker"])["Version"] == _metadata(dists["client"])["Version"] == VERSION


_IMPORT_ALL = """
import importlib, pkgutil, sys
for top in sys.argv[1:]:
    package = importlib.import_module(top)
    for info in pkgutil.walk_packages(package.__path__, top + "."):
        if not info.name.endswith(".__main__"):
            importlib.import_module(info.name)
    print(top, package.__path__[0])
"""


def test_broker_wheel_runs_in_a_fresh_virtualenv(dists: dict[str, Dist]) -> None:
    dist = dists["broker"]
    version = dist.run("grant-broker", "--version")
    assert version.returncode == 0, version.stderr
    assert version.stdout.strip() == f"grant-broker {VERSION}"
    imported = dist.run("python", "-c", _IMPORT_ALL, "grant_broker", "grant_broker_client", "grant_broker_protocol")
    assert imported.returncode == 0, imported.stderr
    # From the virtualenv, not from the checkout.
    assert all(str(dist.venv) in line for line in imported.stdout.splitlines()), imported.stdout


def test_sdk_wheel_stands_alone(dists: dict[str, Dist]) -> None:
    dist = dists["client"]
    imported = dist.run("python", "-c", _IMPORT_ALL, "grant_broker_client", "grant_broker_protocol")
    assert imported.returncode == 0, imported.stderr
    assert all(str(dist.venv) in line for line in imported.stdout.splitlines()), imported.stdout
    daemon = dist.run("python", "-c", "import grant_broker")
    assert daemon.returncode != 0 and "ModuleNotFoundError" in daemon.stderr, daemon.stderr
    for absent in ("uvloop", "grpc_health", "grpc_reflection", "prometheus_client"):
        assert dist.run("python", "-c", f"import {absent}").returncode != 0, f"{absent} was installed with the SDK"
    assert not (dist.venv / "bin" / "grant-broker").exists()


def test_build_stops_loudly_without_protos(tmp_path: pathlib.Path) -> None:
    """A checkout or sdist without .proto files must not build a package without its messages."""
    script = (
        "import pathlib, sys\n"
        f"sys.path.insert(0, {str(ROOT / 'client')!r})\n"
        "import grant_broker_protocol_build as b\n"
        f"b.find_proto_root([pathlib.Path({str(tmp_path / 'proto')!r}), pathlib.Path({str(tmp_path)!r})])\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "no .proto files found" in result.stderr
    assert str(tmp_path / "proto" / "grant_broker_protocol") in result.stderr
