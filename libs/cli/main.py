"""`finsight`: the suite from a terminal, as tables (or `--json` for scripts).

The CLI is an ordinary gRPC client: it authenticates with `FINSIGHT_API_KEY`
or the development key file (`var/dev-api-key`), and prints a failed call's
status and field violations in plain words, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import grpc
from rich.console import Console

from libs.cli import commands
from libs.cli.connection import Connection, describe_error

Handler = Callable[[argparse.Namespace, Connection], Coroutine[Any, Any, Any]]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="finsight", description=__doc__.splitlines()[0])
    parser.add_argument("--host", help="where the services run (default 127.0.0.1)")
    parser.add_argument("--key-file", type=Path, help="API key file (default var/dev-api-key)")
    parser.add_argument("--ca-file", type=Path, help="CA certificate: connect with TLS")
    parser.add_argument("--timeout", type=float, default=30.0, help="deadline per call, seconds")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    conn = Connection.from_env(
        host=args.host, key_file=args.key_file, ca_file=args.ca_file, timeout=args.timeout
    )
    console = Console(stderr=True)
    handler: Handler = args.handler
    try:
        result: Any = asyncio.run(handler(args, conn))
    except grpc.aio.AioRpcError as err:
        info, lines = describe_error(err)
        if args.json:
            print(
                json.dumps(
                    {
                        "error": {
                            "code": info.code.name,
                            "message": info.message,
                            "reason": info.reason,
                            "field_violations": [
                                {"field": v.field, "description": v.description}
                                for v in info.field_violations
                            ],
                            "retry_after_s": info.retry_after,
                        }
                    }
                )
            )
        else:
            console.print("[bold red]error[/]: " + "\n".join(lines), highlight=False)
        return 1
    except commands.CliError as err:
        console.print(f"[bold red]error[/]: {err}", highlight=False)
        return 2
    except KeyboardInterrupt:
        return 130
    if isinstance(result, int):
        return result
    return 0


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
