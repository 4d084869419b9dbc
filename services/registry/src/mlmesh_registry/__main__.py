"""`python -m mlmesh_registry`: run the registry until SIGTERM/SIGINT."""

import asyncio

from mlmesh_chassis.server import bootstrap, run_until_signalled

from mlmesh_registry.config import RegistrySettings
from mlmesh_registry.server import build_server


async def _main() -> None:
    settings = RegistrySettings()
    bootstrap(settings)
    host = await build_server(settings)
    await run_until_signalled(host)


def main() -> None:
    asyncio.run(_main())


if __name__ == "__main__":
    main()
