"""`python -m mlmesh_vectors`: run the vector service until SIGTERM/SIGINT."""

from mlmesh_chassis.server import serve_main

from mlmesh_vectors.config import VectorsSettings
from mlmesh_vectors.server import build_server


def main() -> None:
    serve_main(VectorsSettings, build_server)


if __name__ == "__main__":
    main()
