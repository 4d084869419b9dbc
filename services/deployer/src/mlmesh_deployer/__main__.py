"""`python -m mlmesh_deployer`: run the deployer service until SIGTERM/SIGINT."""

from mlmesh_chassis.server import serve_main

from mlmesh_deployer.config import DeployerSettings
from mlmesh_deployer.server import build_server


def main() -> None:
    serve_main(DeployerSettings, build_server)


if __name__ == "__main__":
    main()
