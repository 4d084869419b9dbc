"""`python -m mlmesh_llm`: run the llm service until SIGTERM/SIGINT."""

from mlmesh_chassis.server import serve_main

from mlmesh_llm.config import LlmSettings
from mlmesh_llm.server import build_server


def main() -> None:
    serve_main(LlmSettings, build_server)


if __name__ == "__main__":
    main()
