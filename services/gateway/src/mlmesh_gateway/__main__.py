"""`python -m mlmesh_gateway`: run the gateway until SIGTERM/SIGINT."""

from mlmesh_chassis.server import serve_main

from mlmesh_gateway.config import GatewaySettings
from mlmesh_gateway.server import build_server


def main() -> None:
    serve_main(GatewaySettings, build_server)


if __name__ == "__main__":
    main()
