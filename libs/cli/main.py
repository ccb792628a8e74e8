"""`finsight`: the suite from a terminal, as tables (or `--json` for scripts).

The CLI is an ordinary gRPC client: it authenticates with `FINSIGHT_API_KEY`
or the development key file (`var/dev-api-key`), and prints a failed call's
status and field violations in plain words, never a traceback.

Exit status: 0 success; 1 a call failed (or, for `ingest`, rows were rejected;
for `health`, something is not serving); 2 a usage error (bad arguments, a
file that cannot be read); 3 an unexpected error in the CLI itself
(`FINSIGHT_DEBUG=1` shows its traceback); 130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import grpc
from rich.console import Console
from rich.markup import escape

from libs.cli import (
    analytics_cmds,
    analyze_cmds,
    commands,
    factor_cmds,
    llm_cmds,
    memory_cmds,
    optimise_cmds,
)
from libs.cli.connection import (
    DEFAULT_PORTS,
    Connection,
    KeyFileError,
    describe_error,
    error_json,
)

EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell reports for a closed pipe
Handler = Callable[[argparse.Namespace, Connection], Coroutine[Any, Any, Any]]


def _global_options(parser: argparse.ArgumentParser, *, on_command: bool = False) -> None:
    """Options every command takes, before or after its name. On a command's parser their
    default is SUPPRESS, so one given before the command is not reset by the command's."""

    def default(value: object) -> object:
        return argparse.SUPPRESS if on_command else value

    add = parser.add_argument
    add("--host", default=default(None), help="where the services run (default 127.0.0.1)")
    add(
        "--key-file",
        type=Path,
        default=default(None),
        help="API key file (else FINSIGHT_API_KEY, else ./var/dev-api-key); unreadable: error",
    )
    add("--ca-file", type=Path, default=default(None), help="CA certificate: connect with TLS")
    add("--timeout", type=float, default=default(30.0), help="deadline per call, seconds")
    add("--json", action="store_true", default=default(False), help="machine-readable output")
    add(
        "--target",
        metavar="HOST:PORT",
        default=default(None),
        help="address of the service the command calls (as importer_cli's --target)",
    )
    for service, port in DEFAULT_PORTS.items():
        add(
            f"--{service.replace('_', '-')}-target",
            metavar="HOST:PORT",
            dest=f"{service}_target",
            default=default(None),
            help=f"address of {service} (default HOST:{port})",
        )


def _subparsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):
                found += [child, *_subparsers(child)]
    return found


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="finsight", description=__doc__.splitlines()[0])
    _global_options(parser)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    modules = (
        commands,
        analytics_cmds,
        factor_cmds,
        optimise_cmds,
        analyze_cmds,
        llm_cmds,
        memory_cmds,
    )
    for module in modules:
        module.register(sub)
    for child in _subparsers(parser):
        _global_options(child, on_command=True)
    return parser


def targets_of(args: argparse.Namespace) -> dict[str, str]:
    found = {s: getattr(args, f"{s}_target") for s in DEFAULT_PORTS}
    if args.target:
        found["*"] = args.target
    return {s: t for s, t in found.items() if t}


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:  # argparse already printed the usage problem (or --help)
        return exit_.code if isinstance(exit_.code, int) else 2
    console = Console(stderr=True, highlight=False)
    try:
        conn = Connection.from_env(
            host=args.host,
            key_file=args.key_file,
            ca_file=args.ca_file,
            timeout=args.timeout,
            targets=targets_of(args),
        )
        handler: Handler = args.handler
        result: Any = asyncio.run(handler(args, conn))
    except grpc.aio.AioRpcError as err:
        info, lines = describe_error(err, conn)
        if args.json:
            print(json.dumps(error_json(info)))
        else:
            console.print("[bold red]error[/]: " + escape("\n".join(lines)))
        return 1
    except BrokenPipeError:  # the reader went away (`finsight memory export u | head`)
        return EXIT_BROKEN_PIPE
    except (commands.CliError, KeyFileError, OSError) as err:
        if args.json:
            print(json.dumps({"error": {"code": "USAGE", "message": str(err)}}))
        else:
            console.print(f"[bold red]error[/]: {escape(str(err))}")
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as err:  # a bug of the CLI: say so in one line, never a traceback
        if os.environ.get("FINSIGHT_DEBUG"):
            raise
        console.print(
            f"[bold red]unexpected error[/]: {type(err).__name__}: {escape(str(err))} "
            "(FINSIGHT_DEBUG=1 shows the traceback)"
        )
        return 3
    if isinstance(result, int):
        return result
    return 0


def entry() -> None:
    code = main()
    if code == EXIT_BROKEN_PIPE:
        # Python would complain when it flushes stdout at exit: point it at /dev/null.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    sys.exit(code)


if __name__ == "__main__":
    entry()
