"""`python -m mlmesh_review`: run the review service until SIGTERM/SIGINT."""

from mlmesh_chassis.server import serve_main

from mlmesh_review.config import ReviewSettings
from mlmesh_review.server import build_server


def main() -> None:
    serve_main(ReviewSettings, build_server)


if __name__ == "__main__":
    main()
