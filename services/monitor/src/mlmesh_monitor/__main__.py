"""`python -m mlmesh_monitor`: run the monitor until SIGTERM/SIGINT."""

from mlmesh_chassis.server import serve_main

from mlmesh_monitor.config import MonitorSettings
from mlmesh_monitor.server import build_server


def main() -> None:
    serve_main(MonitorSettings, build_server)


if __name__ == "__main__":
    main()
