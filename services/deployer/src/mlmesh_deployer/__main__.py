"""`python -m mlmesh_deployer`: run the Triton deployer until SIGTERM/SIGINT."""

import asyncio

from mlmesh_chassis.server import bootstrap, run_until_signalled

from mlmesh_deployer.config import DeployerSettings
from mlmesh_deployer.server import build_server


async def _main() -> None:
    settings = DeployerSettings()
    bootstrap(settings)
    host = await build_server(settings)
    await run_until_signalled(host)


def main() -> None:
    asyncio.run(_main())


if __name__ == "__main__":
    main()
