"""`finsight usage`: tokens and cost by day and model, and the remaining budget."""

from __future__ import annotations

import argparse
from typing import Any

from rich.markup import escape
from rich.table import Table

from finsight.common.v1 import common_pb2
from finsight.llm.v1 import llm_gateway_pb2 as pb
from finsight.llm.v1 import llm_gateway_pb2_grpc
from libs.cli.commands import emit
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
