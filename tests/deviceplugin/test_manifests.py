"""deploy/kubernetes: the DaemonSet's two containers and the example client pod agree with each other.

(Schema validation of the manifests is tests/test_deploy.py's; these read what the
files mean: the resource, the group, the paths, the update strategy.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from grant_broker.cli import build_parser

KUBERNETES = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes"
# The image's ENTRYPOINT: grant-broker --socket /run/grant-broker/broker.sock (deploy/container/Containerfile).
ENTRYPOINT = ["--socket", "/run/grant-broker/broker.sock"]


def _load(name: str) -> Any:
    return yaml.safe_load((KUBERNETES / name).read_text())


@pytest.fixture(scope="module")
def pod_spec() -> Any:
    return _load("daemonset.yaml")["spec"]["template"]["spec"]


@pytest.fixture(scope="module")
def client() -> Any:
    return _load("client-pod.yaml")["spec"]


def _container(spec: Any, name: str) -> Any:
    (found,) = [container for container in spec["containers"] if container["name"] == name]
    return found


def _args(spec: Any, name: str) -> Any:
    return build_parser().parse_args([*ENTRYPOINT, *_container(spec, name)["args"]])


def _mounts(container: Any) -> dict[str, Any]:
    return {mount["mountPath"]: mount for mount in container.get("volumeMounts", [])}


def test_the_daemonset_never_restarts_a_broker_by_itself() -> None:
    assert _load("daemonset.yaml")["spec"]["updateStrategy"] == {"type": "OnDelete"}


def test_the_daemonset_runs_as_a_node_critical_daemon_on_any_taint(pod_spec: Any) -> None:
    assert pod_spec["priorityClassName"] == "system-node-critical"
    assert {"operator": "Exists"} in pod_spec["tolerations"]


def test_the_device_plugin_watches_the_brokers_socket_in_the_shared_directory(pod_spec: Any) -> None:
    broker, plugin = _args(pod_spec, "grant-broker"), _args(pod_spec, "device-plugin")
    assert (broker.command, plugin.command) == ("serve", "device-plugin")
    assert broker.socket == plugin.socket == "/run/grant-broker/broker.sock"
    broker_mount = _mounts(_container(pod_spec, "grant-broker"))["/run/grant-broker"]
    plugin_mount = _mounts(_container(pod_spec, "device-plugin"))["/run/grant-broker"]
    assert broker_mount["name"] == plugin_mount["name"]
    # Mounted at the host's own path, so what Allocate tells kubelet to mount (the directory of --socket) is right.
    (volume,) = [v for v in pod_spec["volumes"] if v["name"] == broker_mount["name"]]
    assert volume["hostPath"]["path"] == "/run/grant-broker"


def test_the_device_plugin_reaches_kubelets_directory(pod_spec: Any) -> None:
    plugin = _args(pod_spec, "device-plugin")
    mount = _mounts(_container(pod_spec, "device-plugin"))[plugin.kubelet_dir]
    (volume,) = [v for v in pod_spec["volumes"] if v["name"] == mount["name"]]
    assert volume["hostPath"]["path"] == plugin.kubelet_dir == "/var/lib/kubelet/device-plugins"


def test_the_client_pod_asks_for_the_resource_the_plugin_registers(pod_spec: Any, client: Any) -> None:
    plugin = _args(pod_spec, "device-plugin")
    (container,) = client["containers"]
    assert container["resources"]["limits"][plugin.resource] == 1


def test_the_client_pod_has_no_host_path_and_runs_as_non_root(client: Any) -> None:
    assert not [volume for volume in client.get("volumes", []) if "hostPath" in volume]
    assert client["securityContext"]["runAsNonRoot"] is True
    assert client["securityContext"]["runAsUser"] != 0
    (container,) = client["containers"]
    assert container["securityContext"]["allowPrivilegeEscalation"] is False


def test_the_client_pod_has_the_sockets_group_as_a_supplemental_group(pod_spec: Any, client: Any) -> None:
    broker = _args(pod_spec, "grant-broker")
    assert broker.socket_group in client["securityContext"]["supplementalGroups"]
    assert broker.socket_mode is None or broker.socket_mode & 0o060 == 0o060  # the group may connect
