"""`python -m mlmesh_registry`: run the registry service until SIGTERM/SIGINT."""

from mlmesh_chassis.server import serve_main

from mlmesh_registry.config import RegistrySettings
from mlmesh_registry.server import build_server


def main() -> None:
    serve_main(RegistrySettings, build_server)


if __name__ == "__main__":
    main()
