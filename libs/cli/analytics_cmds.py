"""`finsight ingest`, `finsight metrics`, `finsight portfolio`: market data and its metrics."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Sequence
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import grpc
import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from finsight.analytics.v1 import analytics_pb2 as pb
from finsight.analytics.v1 import analytics_pb2_grpc
from finsight.common.v1 import common_pb2
from libs.barfiles.options import add_ingest_options
from libs.cli.commands import CliError, emit, out, show
from libs.cli.connection import Connection
from libs.cli.options import add_range, date_range, rate
from libs.cli.render import day, from_pb_date, num, pct, plain
from libs.cli.table_views import DEFAULT_DRAWDOWNS, drawdown_spans, drawdown_table, monthly_table

if TYPE_CHECKING:
    from libs.barfiles.ingest import RowRejection, Totals

err_console = Console(stderr=True)

REBALANCE: Final = {
    "none": pb.REBALANCE_NONE,
    "daily": pb.REBALANCE_DAILY,
    "weekly": pb.REBALANCE_WEEKLY,
    "monthly": pb.REBALANCE_MONTHLY,
    "quarterly": pb.REBALANCE_QUARTERLY,
    "annual": pb.REBALANCE_ANNUAL,
}
SHOWN_REJECTIONS: Final = 20


def stub_for(channel: grpc.aio.Channel) -> analytics_pb2_grpc.AnalyticsServiceStub:
    return analytics_pb2_grpc.AnalyticsServiceStub(channel)


# -- ingest ----------------------------------------------------------------------------------
def _rejection_row(r: RowRejection) -> dict[str, Any]:
    return {
        "source": r.source,
        "line": r.line,
        "row": r.row,
        "symbol": r.symbol,
        "date": r.day.isoformat() if r.day else None,
        "reason": r.reason,
        "column": r.column,
        "value": r.value,
    }


def ingest_summary(path: Path, t: Totals) -> dict[str, Any]:
    rejections = [*t.parser_rejections, *t.service_rejections]
    return {
        "file": str(path),
        "sent": t.sent,
        "inserted": t.inserted,
        "updated": t.updated,
        "unchanged": t.unchanged,
        "duplicates_collapsed": t.duplicates_collapsed,
        "rejected": t.rejected,
        "rejected_by_parser": t.rejected_by_parser,
        "rejected_by_service": t.rejected_by_service,
        "written": not t.aborted,
        "streams": t.streams,
        "data_version": t.data_version,
        "rejections": [_rejection_row(r) for r in rejections[:100]],
    }


def ingest_tables(summary: dict[str, Any]) -> list[Table]:
    counts = Table(title=f"Ingest of {escape(Path(summary['file']).name)}")
    for name in ("sent", "inserted", "updated", "unchanged", "rejected"):
        counts.add_column(name, justify="right")
    rejected_cell = f"{summary['rejected']:,}"
    if summary["rejected"]:
        rejected_cell += (
            f" ({summary['rejected_by_parser']:,} parser, "
            f"{summary['rejected_by_service']:,} service)"
        )
    counts.add_row(*(f"{summary[k]:,}" for k in ("sent", "inserted", "updated", "unchanged")),
                   rejected_cell)  # fmt: skip
    if summary["duplicates_collapsed"]:
        counts.caption = (
            f"{summary['duplicates_collapsed']:,} exact duplicate row(s) kept once, not rejected"
        )
    if not summary["written"]:
        counts.caption = "[red]nothing written: --reject-all and the file has invalid rows[/]"
    tables = [counts]
    shown = summary["rejections"][:SHOWN_REJECTIONS]
    if shown:
        more = summary["rejected"] - len(shown)
        rejected = Table(title=f"First rejected rows{f' ({more:,} more)' if more > 0 else ''}")
        for name in ("by", "line", "symbol", "date", "reason", "value"):
            rejected.add_column(name)
        for r in shown:
            value = "" if r["value"] is None else repr(r["value"])
            if r["column"] and r["value"] is not None:
                value = f"{r['column']}={value}"
            where = "" if r["row"] is None else f"row {r['row']}"  # Parquet: no lines
            rejected.add_row(
                r["source"],
                where if r["line"] is None else str(r["line"]),
                escape(r["symbol"] or ""),
                r["date"] or "",
                escape(r["reason"]),
                escape(value),
            )
        tables.append(rejected)
    return tables


async def ingest(args: argparse.Namespace, conn: Connection) -> int:
    # Imported here: pyarrow and the parser are only needed by this command.
    from libs.barfiles.ingest import RichProgress, field_flag, stream_file
    from libs.barfiles.reader import ImportFormatError

    path = Path(args.file)
    # A field violation of the stream (too many rows) names the flag that sizes it.
    conn.field_flag = lambda name: field_flag(name, args.reject_all)
    async with conn.channel("analytics") as channel:
        try:
            with RichProgress(path, err_console) as progress:
                totals = await stream_file(
                    stub_for(channel),
                    path,
                    layout=args.layout,
                    symbol=args.symbol,
                    date_format=args.date_format,
                    reject_all=args.reject_all,
                    metadata=conn.metadata,
                    batch_rows=args.batch_rows,
                    stream_rows=args.stream_rows,
                    progress=progress,
                )
        except (ImportFormatError, OSError) as exc:
            raise CliError(f"cannot import {path}: {exc}") from exc
    summary = ingest_summary(path, totals)
    if args.json:
        emit(args, summary, None)
    else:
        for table in ingest_tables(summary):
            out.print(table)
    return 1 if totals.rejected else 0


# -- symbols ---------------------------------------------------------------------------------
async def symbols(args: argparse.Namespace, conn: Connection) -> int:
    async with conn.channel("analytics") as channel:
        reply = await stub_for(channel).ListSymbols(
            pb.ListSymbolsRequest(), metadata=conn.metadata, timeout=conn.timeout
        )
    shown = [s for s in reply.symbols if not args.match or args.match.lower() in s.symbol.lower()]
    table = Table(title=f"Symbols ({len(shown):,})", caption=f"data version {reply.data_version}")
    for name in ("symbol", "first day", "last day", "bars", "data"):
        table.add_column(name, justify="right" if name == "bars" else "left")
    for s in shown:
        source = pb.DataSource.Name(s.source).removeprefix("DATA_SOURCE_").lower()
        table.add_row(
            escape(s.symbol), day(s.first_date), day(s.last_date), f"{s.bar_count:,}", source
        )
    data = {"symbols": [plain(s) for s in shown], "data_version": reply.data_version}
    emit(args, data, table)
    return 0


# -- metrics ---------------------------------------------------------------------------------
Row = tuple[str, Callable[[pb.SeriesMetrics], str]]


def _drawdown(m: pb.SeriesMetrics) -> str:
    dd = m.drawdown
    if not dd.HasField("trough_date"):
        return pct(dd.max_drawdown)
    until = f"recovered {day(dd.recovery_date)}" if dd.recovered else "not recovered"
    return f"{pct(dd.max_drawdown)} ({day(dd.peak_date)} → {day(dd.trough_date)}, {until})"


def _dated(r: pb.DatedReturn) -> str:
    return f"{pct(r.value)} on {day(r.date)}"


METRIC_ROWS: Final[list[Row]] = [
    ("period", lambda m: f"{day(m.start_date)} → {day(m.end_date)}"),
    ("returns", lambda m: f"{m.return_count:,}"),
    ("total return", lambda m: pct(m.total_return)),
    ("CAGR", lambda m: pct(m.cagr)),
    ("volatility (ann.)", lambda m: pct(m.volatility)),
    ("Sharpe", lambda m: num(m.sharpe)),
    ("Sortino", lambda m: num(m.sortino)),
    ("Calmar", lambda m: num(m.calmar)),
    ("max drawdown", _drawdown),
    ("VaR 95% / 99%", lambda m: f"{pct(m.var_95)} / {pct(m.var_99)}"),
    ("CVaR 95% / 99%", lambda m: f"{pct(m.cvar_95)} / {pct(m.cvar_99)}"),
    (
        "Gaussian VaR 95% / 99%",
        lambda m: f"{pct(m.parametric_var_95)} / {pct(m.parametric_var_99)}",
    ),
    ("skew", lambda m: num(m.skew)),
    ("excess kurtosis", lambda m: num(m.kurtosis)),
    ("best day", lambda m: _dated(m.best)),
    ("worst day", lambda m: _dated(m.worst)),
    ("positive days", lambda m: pct(m.positive_share, 1)),
]
RELATIVE_ROWS: Final[list[Row]] = [
    ("beta", lambda m: num(m.relative.beta)),
    ("alpha (ann.)", lambda m: pct(m.relative.alpha)),
    ("tracking error", lambda m: pct(m.relative.tracking_error)),
    ("information ratio", lambda m: num(m.relative.information_ratio)),
    ("common returns", lambda m: f"{m.relative.common_periods:,}"),
    (
        "common window",
        lambda m: f"{day(m.relative.first_common_date)} → {day(m.relative.last_common_date)}",
    ),
]


def conventions_caption(c: pb.Conventions, data_version: int) -> str:
    return (
        f"risk-free {pct(c.risk_free_rate_annual)}/yr, {c.periods_per_year:g} periods/yr, "
        f"ddof {c.ddof}; data version {data_version}; definitions: {c.reference}"
    )


def metrics_table(
    metrics: Sequence[pb.SeriesMetrics], title: str, caption: str | None = None
) -> Table:
    table = Table(title=title, caption=caption)
    table.add_column("metric", style="bold")
    for m in metrics:
        table.add_column(m.symbol, justify="right")
    rows = list(METRIC_ROWS)
    if any(m.HasField("relative") for m in metrics):
        benchmark = next(m.relative.benchmark for m in metrics if m.HasField("relative"))
        rows += [(f"{label} vs {benchmark}", _if_relative(get)) for label, get in RELATIVE_ROWS]
    for label, get in rows:
        table.add_row(label, *(get(m) for m in metrics))
    missing = [f"{m.symbol}: {m.relative_unavailable}" for m in metrics if m.relative_unavailable]
    if missing:
        notes = "no relative figures for " + "; ".join(missing)
        table.caption = f"{table.caption}\n{notes}" if table.caption else notes
    return table


def _if_relative(get: Callable[[pb.SeriesMetrics], str]) -> Callable[[pb.SeriesMetrics], str]:
    """A relative row's cell: n/a for a series without relative figures (not proto zeros)."""
    return lambda m: get(m) if m.HasField("relative") else "n/a"


async def fetch_prices(
    stub: analytics_pb2_grpc.AnalyticsServiceStub,
    conn: Connection,
    symbol: str,
    rng: Any,
) -> tuple[list[date], np.ndarray[Any, np.dtype[np.float64]]]:
    days: list[date] = []
    closes: list[int] = []
    call = stub.GetBars(
        pb.GetBarsRequest(symbol=symbol, range=rng), metadata=conn.metadata, timeout=conn.timeout
    )
    async for chunk in call:
        days.extend(d for d in (from_pb_date(x) for x in chunk.bars.dates) if d is not None)
        closes.extend(chunk.bars.adj_close_micros)
    return days, np.asarray(closes, dtype=np.float64) / 1e6


async def plot_metrics(
    args: argparse.Namespace,
    conn: Connection,
    stub: analytics_pb2_grpc.AnalyticsServiceStub,
    symbols: list[str],
    drawdown_periods: dict[str, list[tuple[date, date]]] | None = None,
) -> dict[str, Any]:
    from libs.cli import plots

    rng = date_range(args)
    prices: list[plots.Series] = []
    rolling: list[plots.Series] = []
    window = args.window
    for symbol in symbols:
        days, closes = await fetch_prices(stub, conn, symbol, rng)
        if len(closes) < 2:
            continue
        prices.append(plots.Series(symbol, days, closes))
        if symbol == args.benchmark:
            continue
        returns = len(closes) - 1
        if returns < 2:
            continue
        reply = await stub.RollingMetrics(
            pb.RollingMetricsRequest(
                symbol=symbol,
                metric=pb.ROLLING_METRIC_VOLATILITY,
                window=min(window, returns),
                range=rng,
                risk_free_rate=args.rf,
            ),
            metadata=conn.metadata,
            timeout=conn.timeout,
        )
        points = [(from_pb_date(p.date), p.value) for p in reply.points]
        rolling.append(
            plots.Series(
                symbol,
                [d for d, _ in points if d is not None],
                np.asarray([v for d, v in points if d is not None], dtype=np.float64),
            )
        )
    path = Path(args.plot)
    plots.metrics_chart(
        path, prices, rolling, window, args.benchmark, drawdown_periods=drawdown_periods
    )
    return {"plot": str(path), "window": window}


async def metrics(args: argparse.Namespace, conn: Connection) -> int:
    request = pb.ComputeMetricsRequest(
        symbols=args.symbols,
        range=date_range(args),
        benchmark=args.benchmark or "",
        risk_free_rate=args.rf,
        drawdown_table_size=args.drawdowns,
        period_returns=args.monthly,
    )
    async with conn.channel("analytics") as channel:
        stub = stub_for(channel)
        reply = await stub.ComputeMetrics(request, metadata=conn.metadata, timeout=conn.timeout)
        plot: dict[str, Any] | None = None
        if args.plot:
            symbols = [*args.symbols]
            if args.benchmark and args.benchmark not in symbols:
                symbols.append(args.benchmark)
            spans = drawdown_spans(reply.metrics) if args.drawdowns else None
            plot = await plot_metrics(args, conn, stub, symbols, spans)
    data = plain(reply)
    if plot:
        data["plot"] = plot["plot"]
    caption = conventions_caption(reply.conventions, reply.data_version)
    emit(args, data, metrics_table(reply.metrics, "Metrics", caption))
    if not args.json:
        for m in reply.metrics:
            if args.drawdowns:
                out.print(drawdown_table(m))
            if args.monthly:
                out.print(monthly_table(m))
    if plot and not args.json:
        out.print(f"chart written to {plot['plot']}")
    return 0


# -- portfolio -------------------------------------------------------------------------------
def holding(text: str) -> tuple[str, float]:
    """`AAPL=0.6` or `AAPL=60%`."""
    symbol, sep, weight = text.partition("=")
    if not sep or not symbol:
        raise argparse.ArgumentTypeError(f"{text!r}: expected SYMBOL=WEIGHT (e.g. AAPL=0.6)")
    try:
        value = float(weight[:-1]) / 100 if weight.endswith("%") else float(weight)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: weight {weight!r} is not a number (0.6 or 60%)"
        ) from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r}: weight must be finite")
    return symbol, value


def matrix(m: pb.Matrix) -> np.ndarray[Any, np.dtype[np.float64]]:
    n = len(m.symbols)
    return np.asarray(m.values, dtype=np.float64).reshape(n, n)


def portfolio_tables(reply: pb.ComputePortfolioResponse) -> list[Table]:
    rebalance = pb.Rebalance.Name(reply.rebalance).removeprefix("REBALANCE_").lower()
    caption = f"rebalanced {rebalance}; " + conventions_caption(
        reply.conventions, reply.data_version
    )
    tables = [metrics_table([reply.metrics], "Portfolio metrics", caption)]
    # Two volatilities that differ on purpose: the metrics table's is the realised one of
    # the portfolio's own return series (weights drift between rebalances); this one is
    # sqrt(w' S w) at the target weights over the days every asset has a return.
    risk = Table(
        title=(
            f"Risk contributions (volatility at the target weights {pct(reply.portfolio_volatility)})"
        ),
        caption=(
            f"sqrt(w'Σw) at the target weights, on the days every asset has a return; the "
            f"portfolio metrics' {pct(reply.metrics.volatility)} is the realised volatility of "
            f"the portfolio's returns, weights drifting between rebalances"
        ),
    )
    for name in ("symbol", "weight", "contribution", "share of risk"):
        risk.add_column(name, justify="right" if name != "symbol" else "left")
    for r in reply.risk_contributions:
        risk.add_row(r.symbol, pct(r.weight, 1), pct(r.contribution), pct(r.share, 1))
    tables.append(risk)
    corr = matrix(reply.correlation)
    heat = Table(title="Correlation", caption="of daily returns, common days")
    heat.add_column("")
    for s in reply.correlation.symbols:
        heat.add_column(s, justify="right")
    for i, s in enumerate(reply.correlation.symbols):
        heat.add_row(s, *(num(v) for v in corr[i]))
    tables.append(heat)
    return tables


async def plot_portfolio(
    args: argparse.Namespace,
    conn: Connection,
    stub: analytics_pb2_grpc.AnalyticsServiceStub,
    reply: pb.ComputePortfolioResponse,
) -> None:
    """The --plot chart. The response has no benchmark series: its prices come from GetBars
    over the portfolio's own period (metrics start to end date)."""
    from libs.cli import plots

    points = [(from_pb_date(p.date), p.value) for p in reply.returns]
    returns = plots.Series(
        "portfolio",
        [d for d, _ in points if d is not None],
        np.asarray([v for d, v in points if d is not None], dtype=np.float64),
    )
    benchmark = None
    if args.benchmark and len(returns.values):
        rng = common_pb2.DateRange(start=reply.metrics.start_date, end=reply.metrics.end_date)
        days, closes = await fetch_prices(stub, conn, args.benchmark, rng)
        benchmark = plots.Series(args.benchmark, days, closes)
    plots.portfolio_chart(
        Path(args.plot),
        list(reply.correlation.symbols),
        matrix(reply.correlation),
        returns,
        {r.symbol: r.weight for r in reply.risk_contributions},
        from_pb_date(reply.metrics.start_date),
        rebalance=pb.Rebalance.Name(reply.rebalance).removeprefix("REBALANCE_").lower(),
        benchmark=benchmark,
    )


async def portfolio(args: argparse.Namespace, conn: Connection) -> int:
    request = pb.ComputePortfolioRequest(
        holdings=[pb.Holding(symbol=s, weight=w) for s, w in args.holdings],
        range=date_range(args),
        rebalance=REBALANCE[args.rebalance],
        benchmark=args.benchmark or "",
        allow_short=args.allow_short,
        risk_free_rate=args.rf,
        include_returns=bool(args.plot),
    )
    async with conn.channel("analytics") as channel:
        stub = stub_for(channel)
        reply = await stub.ComputePortfolio(request, metadata=conn.metadata, timeout=conn.timeout)
        if args.plot:
            await plot_portfolio(args, conn, stub, reply)
    data = plain(reply)
    data.pop("returns", None)  # asked for only to draw the chart
    return show(args, data, lambda: portfolio_tables(reply), args.plot)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "ingest",
        help="import a CSV or Parquet price file (long or wide) with a progress bar",
        description="Parse FILE locally and stream its bars to AnalyticsService.IngestBars; "
        "then a summary (inserted / updated / unchanged / rejected, with the first rejected "
        "rows and why). Exit status 1 when rows were rejected.",
    )
    p.add_argument("file", metavar="FILE", help="CSV (optionally .gz) or Parquet file")
    add_ingest_options(p)  # the same options as importer_cli's (no pyarrow imported)
    p.set_defaults(handler=ingest)

    p = sub.add_parser("symbols", help="the symbols with data, their date range and bar count")
    p.add_argument("match", nargs="?", help="only symbols containing this text")
    p.set_defaults(handler=symbols)

    p = sub.add_parser(
        "metrics",
        help="the metric set of one or more symbols (ComputeMetrics); --plot draws them",
    )
    p.add_argument("symbols", nargs="+", metavar="SYMBOL")
    p.add_argument("--benchmark", metavar="SYM", help="for beta, alpha, tracking error, IR")
    add_range(p)
    p.add_argument("--rf", type=rate, default=0.0, help="annual risk-free rate: 0.04 or 4%%")
    p.add_argument(
        "--plot", metavar="FILE.png", help="draw cumulative return, drawdown, rolling volatility"
    )
    p.add_argument(
        "--window", type=int, default=63, help="rolling volatility window in returns (63)"
    )
    p.add_argument(
        "--drawdowns",
        type=int,
        nargs="?",
        const=DEFAULT_DRAWDOWNS,
        default=0,
        metavar="N",
        help=f"table of the N deepest drawdowns per symbol (N = {DEFAULT_DRAWDOWNS} if not "
        "given, at most 50); with --plot they are shaded on the drawdown panel",
    )
    p.add_argument(
        "--monthly",
        action="store_true",
        help="year x month grid of compounded returns per symbol, with the yearly return",
    )
    p.set_defaults(handler=metrics)

    p = sub.add_parser(
        "portfolio",
        help="a weighted portfolio's metrics, risk contributions, correlations (--plot)",
    )
    p.add_argument(
        "holdings", nargs="+", type=holding, metavar="SYM=WEIGHT", help="e.g. AAPL=0.6 MSFT=40%%"
    )
    p.add_argument("--rebalance", choices=tuple(REBALANCE), default="monthly")
    p.add_argument("--benchmark", metavar="SYM")
    p.add_argument("--allow-short", action="store_true", help="allow negative weights")
    add_range(p)
    p.add_argument("--rf", type=rate, default=0.0, help="annual risk-free rate: 0.04 or 4%%")
    p.add_argument(
        "--plot",
        metavar="FILE.png",
        help="correlation heat map, cumulative return and drawdown (with the benchmark)",
    )
    p.set_defaults(handler=portfolio)
