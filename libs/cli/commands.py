"""The `finsight` subcommands. Each one: parse → call → render (table or JSON)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Iterable
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from rich.console import Console
from rich.table import Table

from libs.cli.connection import HEALTH_NAMES, Connection

out = Console()


class CliError(Exception):
    """A usage problem found before any call (bad file, bad argument)."""


def emit(args: argparse.Namespace, data: Any, table: Table | None) -> None:
    if args.json or table is None:
        print(json.dumps(data, indent=2, default=str))
    else:
        out.print(table)


def show(
    args: argparse.Namespace,
    data: dict[str, Any],
    tables: Callable[[], Iterable[Table]],
    plot: str | None = None,
) -> int:
    """A command's result: `data` as JSON with `--json` (with the chart's path when one was
    written), else `tables()` and where the chart went. Exit status 0."""
    if plot:
        data["plot"] = plot
    if args.json:
        emit(args, data, None)
        return 0
    for table in tables():
        out.print(table)
    if plot:
        out.print(f"chart written to {plot}")
    return 0


# -- health ----------------------------------------------------------------------------------
async def health(args: argparse.Namespace, conn: Connection) -> int:
    rows = []
    for service, full_name in HEALTH_NAMES.items():
        async with conn.channel(service) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            for name in ("", "liveness", full_name):
                try:
                    reply = await stub.Check(
                        health_pb2.HealthCheckRequest(service=name), timeout=min(conn.timeout, 3.0)
                    )
                    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
                except grpc.aio.AioRpcError as err:
                    status = err.code().name
                rows.append(
                    {
                        "service": service,
                        "target": conn.target(service),
                        "health_name": name or '""',
                        "status": status,
                    }
                )
    table = Table(title="Finsight health")
    for column in ("service", "target", "health name", "status"):
        table.add_column(column)
    for row in rows:
        color = "green" if row["status"] == "SERVING" else "red"
        table.add_row(
            row["service"], row["target"], row["health_name"], f"[{color}]{row['status']}[/]"
        )
    emit(args, rows, table)
    return 0 if all(r["status"] == "SERVING" for r in rows) else 1


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("health", help="every service and health name, as a table")
    p.set_defaults(handler=health)
