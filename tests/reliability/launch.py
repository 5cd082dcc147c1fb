"""Run a broker with limits and a policy the CLI does not offer (for the reliability tests).

``python launch.py SOCKET '{"limits": {...}, "policy": {...}, "socket_mode": "0666", "status_view": "own"}'``
serves exactly as ``grant-broker serve --backend emulated`` does, with
``Limits(**limits)`` and ``Policy(**policy)``, and Status showing every
session to anyone unless ``status_view`` says otherwise.
"""

from __future__ import annotations

import json
import logging
import sys

import uvloop

from grant_broker.daemon.run import serve
from grant_broker.daemon.server import ServerConfig
from grant_broker.core.policy import Limits, Policy


def main() -> None:
    socket_path, options = sys.argv[1], json.loads(sys.argv[2])
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    policy = {key: frozenset(value) for key, value in options.get("policy", {}).items()}
    config = ServerConfig(
        socket_path=socket_path,
        backend="emulated",
        grace_seconds=1,
        socket_mode=int(options.get("socket_mode", "0660"), 8),
        limits=Limits(**options.get("limits", {})),
        policy=Policy(**policy),
        # The harness reads Status without a session (conftest.Daemon.status).
        status_view=options.get("status_view", "all"),
    )
    uvloop.run(serve(config, lambda server: print("listening on", socket_path, flush=True)))


if __name__ == "__main__":
    main()
