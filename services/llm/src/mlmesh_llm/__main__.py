"""`python -m mlmesh_llm`: run the LLM service until SIGTERM/SIGINT."""

import asyncio

from mlmesh_chassis.server import bootstrap, run_until_signalled

from mlmesh_llm.config import LlmSettings
from mlmesh_llm.server import build_server


async def _main() -> None:
    settings = LlmSettings()
    bootstrap(settings)
    host = await build_server(settings)
    await run_until_signalled(host)


def main() -> None:
    asyncio.run(_main())


if __name__ == "__main__":
    main()
