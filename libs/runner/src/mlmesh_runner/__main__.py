"""`mlmesh-run`: start the local mesh, print the address, stop on Ctrl-C."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from pathlib import Path

from mlmesh_runner.catalog import CATALOG, ServiceSpec
from mlmesh_runner.supervisor import Mesh


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="mlmesh-run", description=__doc__)
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=Path(".mlmesh"),
        help="databases, artifacts, logs (default .mlmesh)",
    )
    parser.add_argument("--port", type=int, default=8080, help="Envoy listener (0: any)")
    parser.add_argument("--admin-port", type=int, default=9901, help="Envoy admin (0: any)")
    parser.add_argument("--host", default="127.0.0.1", help="Envoy listener address")
    parser.add_argument("--envoy-concurrency", type=int, default=1)
    parser.add_argument("--otlp", default="", help="OTLP collector host:port for Envoy traces")
    parser.add_argument(
        "--replicas",
        action="append",
        default=[],
        metavar="NAME=N",
        help="run N processes of a service behind Envoy (repeatable), e.g. gateway=3",
    )
    parser.add_argument(
        "--region",
        action="append",
        default=[],
        metavar="INSTANCE=REGION",
        help="place an instance in a region (repeatable; default 'local'), "
        "e.g. llm.2=east; the gateway routes LLM requests region-first",
    )
    parser.add_argument(
        "--services", default="", help="comma-separated subset of services to run (default: all)"
    )
    observe = parser.add_argument_group(
        "observe", "a trace store (Arize Phoenix) and Prometheus beside the mesh, on loopback"
    )
    observe.add_argument(
        "--observe",
        action="store_true",
        help="start Phoenix and Prometheus; every service and Envoy export spans to Phoenix "
        "(setup: scripts/setup-observe.sh)",
    )
    observe.add_argument("--phoenix-port", type=int, default=0, help="Phoenix UI/REST (0: any)")
    observe.add_argument(
        "--otlp-port", type=int, default=0, help="Phoenix's OTLP gRPC receiver (0: any)"
    )
    observe.add_argument("--prometheus-port", type=int, default=0, help="Prometheus (0: any)")
    observe.add_argument(
        "--scrape-interval", default="5s", help="Prometheus' scrape interval (default 5s)"
    )
    return parser.parse_args()


def select(services: str) -> list[ServiceSpec]:
    """The catalog, or the named subset of it (in catalog order)."""
    names = {name.strip() for name in services.split(",") if name.strip()}
    unknown = names - {spec.name for spec in CATALOG}
    if unknown:
        raise SystemExit(
            f"unknown services {sorted(unknown)}; known: {[spec.name for spec in CATALOG]}"
        )
    return [spec for spec in CATALOG if not names or spec.name in names]


async def _run(args: argparse.Namespace) -> None:
    otlp = None
    if args.otlp:
        host, port = args.otlp.rsplit(":", 1)
        otlp = (host, int(port))
    observer = None
    if args.observe:
        from mlmesh_runner.observe import Observer

        observer = Observer(
            args.state_dir,
            phoenix_port=args.phoenix_port,
            otlp_port=args.otlp_port,
            prometheus_port=args.prometheus_port,
            scrape_interval=args.scrape_interval,
        )
    mesh = Mesh(
        args.state_dir,
        listen_port=args.port,
        admin_port=args.admin_port,
        listen_host=args.host,
        envoy_concurrency=args.envoy_concurrency,
        otlp_endpoint=otlp,
        catalog=select(args.services),
        replicas={
            name: int(count) for name, count in (item.split("=", 1) for item in args.replicas)
        },
        regions=dict(item.split("=", 1) for item in args.region),
        observer=observer,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await mesh.start()
        print(
            f"\nmlmesh is up: gRPC at {mesh.address} (Envoy admin http://{mesh.admin_address})",
            flush=True,
        )
        if mesh.admin_key():
            print(
                f"demo API key (admin scope; kept in {args.state_dir / 'admin.key'}):\n"
                f"  {mesh.admin_key()}\n"
                f"  e.g. grpcurl -plaintext -H 'authorization: Bearer {mesh.admin_key()}' "
                f"{mesh.address} list",
                flush=True,
            )
        if observer is not None:
            print(
                f"traces: Phoenix {observer.phoenix_url} (project 'default'; OTLP gRPC "
                f"{observer.otlp_url});\n"
                f"  one trace: {observer.phoenix_url}/redirects/traces/TRACE_ID (the trace_id "
                f"of a log line or of Envoy's access log)\n"
                f"metrics: Prometheus {observer.prometheus_url} "
                f"(targets: {observer.prometheus_url}/targets)",
                flush=True,
            )
        if any(spec.name == "review" for spec in mesh.catalog):
            print(
                f"review page: http://{mesh.address}/review/ (a key with the REVIEW scope: "
                f"mlmesh keys create --scope REVIEW NAME)",
                flush=True,
            )
        print("Ctrl-C stops everything.", flush=True)
        await stop.wait()
    finally:
        await mesh.stop()


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s runner %(message)s")
    asyncio.run(_run(_parse()))


if __name__ == "__main__":
    main()
