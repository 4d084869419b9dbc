"""`python -m mlmesh_batch`: run the batch service until SIGTERM/SIGINT."""

from mlmesh_chassis.server import serve_main

from mlmesh_batch.config import BatchSettings
from mlmesh_batch.server import build_server


def main() -> None:
    serve_main(BatchSettings, build_server)


if __name__ == "__main__":
    main()
