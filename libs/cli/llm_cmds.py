"""`finsight usage`: tokens and cost by day and model, and the remaining budget.

Also the price book the `analyze` and `chat` commands use to show what an answer cost.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

import grpc
from rich.markup import escape
from rich.table import Table

from finsight.common.v1 import common_pb2
from finsight.llm.v1 import llm_gateway_pb2 as pb
from finsight.llm.v1 import llm_gateway_pb2_grpc
from libs.cli.commands import emit
from libs.cli.connection import Connection
from libs.cli.options import add_range, date_range
from libs.cli.render import day, money_amount, plain, usd


@dataclass(frozen=True)
class Prices:
    """USD per million tokens of one model."""

    cache_hit: float
    cache_miss: float
    output: float

    def cost(self, usage: common_pb2.TokenUsage) -> float:
        # The gateway's own formula: cached and uncached prompt tokens and completion
        # tokens priced separately (it rounds once to nano-USD; the display rounds anyway).
        uncached = max(usage.prompt_tokens - usage.cached_prompt_tokens, 0)
        return (
            usage.cached_prompt_tokens * self.cache_hit
            + uncached * self.cache_miss
            + usage.completion_tokens * self.output
        ) / 1e6


async def price_book(conn: Connection) -> dict[str, Prices]:
    """Prices by model name (and provider model id) from ListModels; empty when unreachable."""
    book: dict[str, Prices] = {}
    try:
        async with conn.channel("llm_gateway") as channel:
            reply = await llm_gateway_pb2_grpc.LlmGatewayServiceStub(channel).ListModels(
                pb.ListModelsRequest(), metadata=conn.metadata, timeout=min(conn.timeout, 5.0)
            )
    except grpc.aio.AioRpcError:
        return book
    for m in reply.models:
        p = m.pricing
        prices = Prices(
            money_amount(p.input_cache_hit_per_million),
            money_amount(p.input_cache_miss_per_million),
            money_amount(p.output_per_million),
        )
        book.setdefault(m.name, prices)
        book.setdefault(m.provider_model, prices)
    return book


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
    table = Table(title="LLM usage (UTC days)", caption=budget, show_footer=bool(reply.rows))
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
