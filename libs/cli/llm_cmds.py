"""`finsight usage` (tokens and cost by day and model, and the remaining budget),
`finsight complete` (one completion, optionally schema-checked JSON or with tools the model
may call) and `finsight embed` (vectors of texts, through an embedding route)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.table import Table

from finsight.common.v1 import common_pb2
from finsight.llm.v1 import llm_gateway_pb2 as pb
from finsight.llm.v1 import llm_gateway_pb2_grpc
from libs.cli.commands import CliError, emit
from libs.cli.connection import Connection
from libs.cli.options import add_range, date_range
from libs.cli.render import day, money_amount, plain, usd


def tokens(u: common_pb2.TokenUsage) -> str:
    text = f"{u.prompt_tokens:,} prompt + {u.completion_tokens:,} completion = {u.total_tokens:,}"
    if u.cached_prompt_tokens:
        text += f" ({u.cached_prompt_tokens:,} prompt tokens cached)"
    return text


# -- usage -----------------------------------------------------------------------------------
def usage_table(reply: pb.GetUsageResponse) -> Table:
    if reply.HasField("daily_budget"):
        budget = (
            f"daily budget {usd(money_amount(reply.daily_budget), 2)}, "
            f"remaining today {usd(money_amount(reply.remaining_budget_today), 4)}"
        )
    else:
        budget = "no daily budget (unlimited)"
    if not reply.rows:
        budget = "no usage yet in this range; " + budget
    table = Table(title="LLM usage (UTC days)", caption=budget, show_footer=True)
    total = reply.total_usage
    columns: list[tuple[str, str]] = [
        ("day", "total"),
        ("model", ""),
        ("requests", f"{reply.total_requests:,}"),
        ("cache hits", f"{sum(r.cache_hits for r in reply.rows):,}"),
        ("prompt tokens", f"{total.prompt_tokens:,}"),
        ("cached prompt", f"{total.cached_prompt_tokens:,}"),
        ("completion tokens", f"{total.completion_tokens:,}"),
        ("total tokens", f"{total.total_tokens:,}"),
        ("cost", usd(money_amount(reply.total_cost))),
    ]
    for name, footer in columns:
        table.add_column(
            name, footer=footer, justify="left" if name in ("day", "model") else "right"
        )
    for r in reply.rows:
        u = r.usage
        table.add_row(
            day(r.date),
            escape(r.model),
            f"{r.requests:,}",
            f"{r.cache_hits:,}",
            f"{u.prompt_tokens:,}",
            f"{u.cached_prompt_tokens:,}",
            f"{u.completion_tokens:,}",
            f"{u.total_tokens:,}",
            usd(money_amount(r.cost)),
        )
    return table


async def usage(args: argparse.Namespace, conn: Connection) -> int:
    request = pb.GetUsageRequest(range=date_range(args), model=args.model or "")
    async with conn.channel("llm_gateway") as channel:
        reply = await llm_gateway_pb2_grpc.LlmGatewayServiceStub(channel).GetUsage(
            request, metadata=conn.metadata, timeout=conn.timeout
        )
    data: dict[str, Any] = plain(reply)
    emit(args, data, usage_table(reply))
    return 0


# -- complete and embed ----------------------------------------------------------------------
def _schema_text(path: str | None) -> str:
    """The JSON Schema file's text (checked here as JSON; the gateway checks the schema)."""
    if path is None:
        return ""
    try:
        text = Path(path).read_text(encoding="utf-8")
        json.loads(text)
    except OSError as exc:
        raise CliError(f"--schema {path}: cannot read it ({exc.strerror})") from exc
    except ValueError as exc:
        raise CliError(f"--schema {path}: not JSON ({exc})") from exc
    return text


_TOOL_CHOICES = {
    "auto": pb.TOOL_CHOICE_MODE_AUTO,
    "none": pb.TOOL_CHOICE_MODE_NONE,
    "required": pb.TOOL_CHOICE_MODE_REQUIRED,
}


def _tools(path: str | None) -> list[pb.Tool]:
    """Tools from a JSON file: a list of {"name", "description", "parameters"} objects, or
    of OpenAI's {"type": "function", "function": {...}} (the gateway checks them)."""
    if path is None:
        return []
    try:
        items = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise CliError(f"--tools {path}: cannot read it ({exc.strerror})") from exc
    except ValueError as exc:
        raise CliError(f"--tools {path}: not JSON ({exc})") from exc
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        raise CliError(f"--tools {path}: must be a JSON list of tool objects")
    tools = []
    for item in items:
        function = item.get("function", item) if item.get("type") == "function" else item
        parameters = function.get("parameters")
        tools.append(
            pb.Tool(
                name=str(function.get("name", "")),
                description=str(function.get("description", "")),
                parameters=json.dumps(parameters) if parameters is not None else "",
            )
        )
    return tools


def _tool_choice(value: str | None) -> pb.ToolChoice | None:
    if value is None:
        return None
    if value in _TOOL_CHOICES:
        return pb.ToolChoice(mode=_TOOL_CHOICES[value])
    return pb.ToolChoice(mode=pb.TOOL_CHOICE_MODE_FUNCTION, function_name=value)


def _prompt(args: argparse.Namespace) -> str:
    text = " ".join(args.prompt) if args.prompt else sys.stdin.read()
    if not text.strip():
        raise CliError("the prompt is empty: give it as arguments or on standard input")
    return text


async def complete(args: argparse.Namespace, conn: Connection) -> int:
    messages = []
    if args.system:
        messages.append(common_pb2.ChatMessage(role=common_pb2.ROLE_SYSTEM, content=args.system))
    messages.append(common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=_prompt(args)))
    request = pb.CompleteRequest(
        model=args.model or "",
        messages=messages,
        json_schema=_schema_text(args.schema),
        tools=_tools(args.tools),
        tool_choice=_tool_choice(args.tool_choice),
    )
    if args.max_tokens is not None:
        request.max_tokens = args.max_tokens
    if args.temperature is not None:
        request.temperature = args.temperature
    async with conn.channel("llm_gateway") as channel:
        reply = await llm_gateway_pb2_grpc.LlmGatewayServiceStub(channel).Complete(
            request, metadata=conn.metadata, timeout=conn.timeout
        )
    if args.json:
        data: dict[str, Any] = plain(reply)
        if args.schema:
            data["value"] = json.loads(reply.content)
        print(json.dumps(data, ensure_ascii=False, default=str))
        return 0
    if reply.content or not reply.tool_calls:
        print(reply.content)
    for made in reply.tool_calls:
        print(f"tool call {made.id}: {made.name}({made.arguments})")
    note = f"{reply.model} via {reply.provider or 'cache'}: {tokens(reply.usage)}, "
    note += f"{usd(money_amount(reply.cost), 6)}"
    if reply.schema_repaired:
        note += ", schema repaired once"
    if reply.cached:
        note += ", from the cache"
    print(escape(note), file=sys.stderr)
    return 0


async def embed(args: argparse.Namespace, conn: Connection) -> int:
    texts = list(args.texts) or [line for line in sys.stdin.read().splitlines() if line.strip()]
    if not texts:
        raise CliError("no texts: give them as arguments or one per line on standard input")
    async with conn.channel("llm_gateway") as channel:
        reply = await llm_gateway_pb2_grpc.LlmGatewayServiceStub(channel).Embed(
            pb.EmbedRequest(model=args.model or "", inputs=texts, dimensions=args.dimensions),
            metadata=conn.metadata,
            timeout=conn.timeout,
        )
    data = {
        "model": reply.model,
        "route": reply.route,
        "dimensions": reply.dimensions,
        "cached": reply.cached,
        "usage": plain(reply.usage),
        "cost": plain(reply.cost),
        "vectors": [list(e.values) for e in reply.embeddings],
    }
    table = Table(
        title=f"{len(texts)} vector(s) of {reply.dimensions} from {escape(reply.model)}",
        caption=f"{tokens(reply.usage)}, {usd(money_amount(reply.cost), 6)}"
        + (", from the cache" if reply.cached else ""),
    )
    table.add_column("text")
    table.add_column("first components")
    for text, e in zip(texts, reply.embeddings, strict=True):
        table.add_row(escape(text[:60]), ", ".join(f"{v:.4f}" for v in e.values[:4]) + ", …")
    emit(args, data, table)
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "usage",
        help="LLM tokens and cost by day and model, and the remaining budget",
        description="Your tenant's LLM usage per UTC day and model (LlmGatewayService.GetUsage)."
        " Default range: the last 30 days.",
    )
    add_range(p, "usage (UTC)")
    p.add_argument("--model", help="only this configured model")
    p.set_defaults(handler=usage)

    p = sub.add_parser(
        "complete",
        help="one completion through the gateway; --schema FILE for schema-checked JSON, "
        "--tools FILE for tools the model may call",
        description="LlmGatewayService.Complete. The prompt is the arguments, or standard "
        "input. With --schema the answer is JSON valid against the schema (repaired once by "
        "the gateway if needed; SCHEMA_MISMATCH otherwise). With --tools the answer may be "
        "tool calls, printed one per line as `tool call ID: NAME(ARGUMENTS)` (the CLI does "
        "not run them).",
    )
    p.add_argument("prompt", nargs="*", metavar="PROMPT")
    p.add_argument("--system", help="a system message before the prompt")
    p.add_argument("--model", help="route or model (default: the gateway's default route)")
    p.add_argument("--schema", metavar="FILE", help="a JSON Schema (Draft 2020-12) file")
    p.add_argument(
        "--tools",
        metavar="FILE",
        help='a JSON list of tools: {"name", "description", "parameters" (JSON Schema)}',
    )
    p.add_argument(
        "--tool-choice",
        dest="tool_choice",
        metavar="auto|none|required|NAME",
        help="whether the model may, must not, or must call a tool (NAME: that tool)",
    )
    p.add_argument("--max-tokens", type=int, dest="max_tokens")
    p.add_argument("--temperature", type=float)
    p.set_defaults(handler=complete)

    p = sub.add_parser(
        "embed",
        help="vectors of texts through an embedding route of the gateway",
        description="LlmGatewayService.Embed (needs an embedding route: docs/llm_gateway.md, "
        "Embeddings). Texts are the arguments, or one per line on standard input.",
    )
    p.add_argument("texts", nargs="*", metavar="TEXT")
    p.add_argument("--model", help="embedding route or model (default: the default route)")
    p.add_argument("--dimensions", type=int, default=0, help="shorter vectors, if supported")
    p.set_defaults(handler=embed)
