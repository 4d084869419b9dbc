"""Runs ``phoenix serve`` with its OTLP gRPC receiver on loopback.

Run by the Phoenix environment's own Python (.envs/phoenix), never imported
by the mesh: it imports nothing from mlmesh. Phoenix binds its UI/REST port
to PHOENIX_HOST but its OTLP gRPC receiver to every interface (``[::]``);
this binds that receiver to MLMESH_PHOENIX_GRPC_HOST (default 127.0.0.1)
instead, so nothing off this machine can write spans.

    .envs/phoenix/bin/python libs/runner/src/mlmesh_runner/phoenix_serve.py
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any


def _bind_grpc_to(host: str) -> None:
    server_module = importlib.import_module("grpc.aio._server")
    original = server_module.Server.add_insecure_port

    def add_insecure_port(self: Any, address: str) -> int:
        if address.startswith("[::]:"):
            address = f"{host}:{address.removeprefix('[::]:')}"
        return int(original(self, address))

    server_module.Server.add_insecure_port = add_insecure_port


def main() -> None:
    _bind_grpc_to(os.environ.get("MLMESH_PHOENIX_GRPC_HOST", "127.0.0.1"))
    sys.argv = ["phoenix", "serve"]
    importlib.import_module("phoenix.server.main").main()


if __name__ == "__main__":
    main()
