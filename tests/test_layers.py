"""The import rules of the tree: each layer imports only the layers below it.

Bottom up: the protocol package both sides share; the kernel interface
mirrors; the backends behind the contract; the broker's core; the
transports; the daemon's life; the CLI.  The SDK stands beside the broker on
the protocol alone.  Every ``import`` statement counts, also those inside
functions (a lazy import is still a dependency).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SOURCE_ROOTS = (REPO / "broker", REPO / "client")

# Lowest first.  A module may import its own layer and the ones before it.
BROKER_LAYERS = (
    "grant_broker_protocol",
    "grant_broker.uapi",
    "grant_broker.backend",
    "grant_broker.core",
    "grant_broker.transport",
    "grant_broker.daemon",
    # A process of its own beside the daemon (grant-broker device-plugin): see the rule below.
    "grant_broker.deviceplugin",
    "grant_broker.cli",
)


def _modules() -> Iterator[tuple[str, Path]]:
    for root in SOURCE_ROOTS:
        for path in sorted(root.rglob("*.py")):
            relative = path.relative_to(root).with_suffix("")
            parts = relative.parts[:-1] if relative.name == "__init__" else relative.parts
            name = ".".join(parts)
            if name.split(".")[-1].endswith(("_pb2", "_pb2_grpc")):
                continue  # generated from proto/ by the build
            yield name, path


def _imports(name: str, path: Path) -> set[str]:
    """Every module *path* imports, absolute names (relative imports resolved)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


MODULES = dict(_modules())


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _layer(module: str) -> int | None:
    for index, layer in enumerate(BROKER_LAYERS):
        if _within(module, layer):
            return index
    return None


def test_the_tree_has_the_layers_it_claims() -> None:
    for layer in BROKER_LAYERS:
        assert any(_within(name, layer) for name in MODULES), f"no module in {layer}"
    assert any(_within(name, "grant_broker_client") for name in MODULES)


@pytest.mark.parametrize("name", sorted(n for n in MODULES if _layer(n) is not None))
def test_no_module_imports_a_layer_above_its_own(name: str) -> None:
    own = _layer(name)
    assert own is not None
    upward = sorted(
        imported
        for imported in _imports(name, MODULES[name])
        if (layer := _layer(imported)) is not None and layer > own
    )
    assert not upward, f"{name} ({BROKER_LAYERS[own]}) imports from above: {upward}"


@pytest.mark.parametrize("name", sorted(n for n in MODULES if _within(n, "grant_broker_client")))
def test_the_sdk_imports_nothing_of_the_daemon(name: str) -> None:
    daemon = sorted(imported for imported in _imports(name, MODULES[name]) if _within(imported, "grant_broker"))
    assert not daemon, f"{name} imports the daemon: {daemon}"


@pytest.mark.parametrize("name", sorted(n for n in MODULES if _within(n, "grant_broker_protocol")))
def test_the_protocol_imports_neither_side(name: str) -> None:
    sides = sorted(
        imported
        for imported in _imports(name, MODULES[name])
        if _within(imported, "grant_broker") or _within(imported, "grant_broker_client")
    )
    assert not sides, f"{name} imports {sides}"


@pytest.mark.parametrize(
    "name",
    sorted(n for n in MODULES if any(_within(n, p) for p in ("grant_broker.core", "grant_broker.backend", "grant_broker.uapi"))),
)
def test_the_core_and_below_never_import_grpc(name: str) -> None:
    grpc_imports = sorted(imported for imported in _imports(name, MODULES[name]) if _within(imported, "grpc"))
    assert not grpc_imports, f"{name} imports {grpc_imports}: operations must stay free of any transport"


@pytest.mark.parametrize(
    "name",
    sorted(n for n in MODULES if not any(_within(n, p) for p in ("grant_broker.daemon", "grant_broker.cli"))),
)
def test_only_the_daemon_imports_the_metrics_library(name: str) -> None:
    # The core reports calls through core/observe.py; the daemon keeps and serves the metrics.
    found = sorted(imported for imported in _imports(name, MODULES[name]) if _within(imported, "prometheus_client"))
    assert not found, f"{name} imports {found}: metrics belong to the daemon (grant_broker.daemon.metrics)"


@pytest.mark.parametrize("name", sorted(n for n in MODULES if _within(n, "grant_broker.deviceplugin")))
def test_the_device_plugin_reaches_the_broker_only_over_its_socket(name: str) -> None:
    # It runs as a process of its own (a second container): the broker is a gRPC health server to it.
    broker = sorted(
        imported
        for imported in _imports(name, MODULES[name])
        if _within(imported, "grant_broker") and not _within(imported, "grant_broker.deviceplugin")
    )
    assert not broker, f"{name} imports the broker's own modules: {broker}"


def test_the_rule_catches_an_upward_import(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from grant_broker.daemon.server import BrokerServer\n")
    assert "grant_broker.daemon.server" in _imports("grant_broker.core.probe", probe)
