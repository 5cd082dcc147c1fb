"""``grant-broker device-plugin``: the broker offered to Kubernetes pods as an extended resource.

A second container of the broker's DaemonSet (same image) that speaks
kubelet's device-plugin API (``v1beta1``, generated into :mod:`.v1beta1` by the
build).  It registers a resource (``grant-broker.io/broker`` by default) with
kubelet, advertises a fixed number of *slots* of it, all healthy exactly while
the broker's gRPC health says SERVING, and answers ``Allocate`` with a
read-only mount of the broker's socket directory and ``GRANT_BROKER_SOCKET``
in the container's environment.  A client pod asks for one slot in its
resources and needs no hostPath volume of its own.

It is a separate process: it talks to the broker only as a gRPC health client
(:mod:`.health`) and to kubelet (:mod:`.plugin`); it imports nothing of the
broker's core, transports or daemon.  It registers again when kubelet restarts
(kubelet removes the plugins' sockets and recreates its own), and outlives
broker restarts (the slots turn Unhealthy, then Healthy again).
"""

from __future__ import annotations

from grant_broker.deviceplugin.plugin import DevicePlugin, PluginConfig, run_until_signal

__all__ = ["DevicePlugin", "PluginConfig", "run_until_signal"]
