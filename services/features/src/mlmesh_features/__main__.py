"""`python -m mlmesh_features`: run the feature service until SIGTERM/SIGINT."""

from mlmesh_chassis.server import serve_main

from mlmesh_features.config import FeaturesSettings
from mlmesh_features.server import build_server


def main() -> None:
    serve_main(FeaturesSettings, build_server)


if __name__ == "__main__":
    main()
