"""`finsight factors`: a symbol's or a portfolio's factor exposure (ComputeFactorExposure)."""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import numpy as np
from rich.markup import escape
from rich.table import Table

from finsight.analytics.v1 import analytics_pb2 as pb
from libs.cli.analytics_cmds import REBALANCE, holding, stub_for
from libs.cli.commands import CliError, show
from libs.cli.connection import Connection
from libs.cli.options import add_range, date_range, rate
from libs.cli.render import day, from_pb_date, num, pct, plain


def symbol_list(text: str) -> list[str]:
    """`SP500,MSFT` (commas, blanks ignored) -> ["SP500", "MSFT"]."""
    items = [s.strip() for s in text.split(",") if s.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"{text!r}: expected SYMBOL[,SYMBOL...]")
    return items


def build_request(args: argparse.Namespace) -> pb.ComputeFactorExposureRequest:
    excess = set(args.excess or [])
    unknown = sorted(excess - set(args.factors))
    if unknown:
        raise CliError(f"--excess names {', '.join(unknown)}, which --factors does not list")
    request = pb.ComputeFactorExposureRequest(
        factors=[pb.Factor(symbol=f, excess_return=f in excess) for f in args.factors],
        range=date_range(args),
        risk_free_rate=args.rf,
        rolling_window=args.rolling or 0,
        standard_errors=pb.STANDARD_ERROR_TYPE_HAC
        if args.hac is not None
        else pb.STANDARD_ERROR_TYPE_CLASSIC,
        hac_lags=args.hac or 0,
    )
    weighted = ["=" in s for s in args.subject]
    if any(weighted):
        if not all(weighted):
            raise CliError("give one SYMBOL, or holdings as SYM=WEIGHT only (e.g. AAPL=0.6 KO=0.4)")
        try:
            holdings = [holding(s) for s in args.subject]
        except argparse.ArgumentTypeError as exc:
            raise CliError(str(exc)) from None
        request.portfolio.CopyFrom(
            pb.FactorPortfolio(
                holdings=[pb.Holding(symbol=s, weight=w) for s, w in holdings],
                rebalance=REBALANCE[args.rebalance],
                allow_short=args.allow_short,
            )
        )
    elif len(args.subject) > 1:
        raise CliError("one subject symbol (or holdings SYM=WEIGHT for a portfolio)")
    else:
        request.symbol = args.subject[0]
    return request


def _t(value: float) -> str:
    return "n/a" if not math.isfinite(value) else f"{value:.2f}"


def exposure_tables(reply: pb.ComputeFactorExposureResponse) -> list[Table]:
    se = "classic"
    if reply.standard_errors == pb.STANDARD_ERROR_TYPE_HAC:
        se = f"Newey-West (HAC, {reply.hac_lags} lags)"
    c = reply.conventions
    caption = (
        f"OLS of excess returns; standard errors: {se}; risk-free "
        f"{pct(c.risk_free_rate_annual)}/yr, {c.periods_per_year:g} periods/yr; "
        f"data version {reply.data_version}"
    )
    loadings = Table(title=f"Factor exposure of {escape(reply.subject)}", caption=caption)
    for name in ("factor", "loading", "std error", "t-stat", "returns"):
        loadings.add_column(name, justify="left" if name in ("factor", "returns") else "right")
    for f in reply.loadings:
        kind = "excess (as given)" if f.excess_return else "minus risk-free"
        loadings.add_row(
            escape(f.factor), num(f.loading, 3), num(f.standard_error, 3), _t(f.t_stat), kind
        )
    fit = Table(title="Fit")
    fit.add_column("", style="bold")
    fit.add_column("value", justify="right")
    rows = [
        ("alpha (ann.)", pct(reply.alpha_annualized)),
        ("alpha per period", f"{reply.alpha:.6f}" if math.isfinite(reply.alpha) else "n/a"),
        ("alpha t-stat", _t(reply.alpha_t_stat)),
        ("R² / adjusted", f"{num(reply.r_squared, 3)} / {num(reply.adj_r_squared, 3)}"),
        ("residual volatility (ann.)", pct(reply.residual_volatility)),
        ("observations", f"{reply.observations:,}"),
        ("common window", f"{day(reply.first_date)} → {day(reply.last_date)}"),
    ]
    if reply.rolling_window:
        rows.append(("rolling window", f"{reply.rolling_window} returns"))
    for label, value in rows:
        fit.add_row(label, value)
    return [loadings, fit]


def _series(name: str, points: Any) -> Any:
    from libs.cli import plots

    pairs = [(from_pb_date(p.date), p.value) for p in points]
    return plots.Series(
        name,
        [d for d, _ in pairs if d is not None],
        np.asarray([v for d, v in pairs if d is not None], dtype=np.float64),
    )


def plot_exposure(path: Path, reply: pb.ComputeFactorExposureResponse) -> None:
    from libs.cli import plots

    plots.factor_chart(
        path,
        reply.subject,
        [_series(r.factor, r.points) for r in reply.rolling_loadings],
        _series("R²", reply.rolling_r_squared),
        reply.rolling_window,
        {f.factor: f.loading for f in reply.loadings},
    )


async def factors(args: argparse.Namespace, conn: Connection) -> int:
    if args.plot and not args.rolling:
        raise CliError("--plot draws the rolling loadings: give --rolling N as well")
    request = build_request(args)
    async with conn.channel("analytics") as channel:
        reply = await stub_for(channel).ComputeFactorExposure(
            request, metadata=conn.metadata, timeout=conn.timeout
        )
    if args.plot:
        plot_exposure(Path(args.plot), reply)
    return show(args, plain(reply), lambda: exposure_tables(reply), args.plot)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "factors",
        help="factor loadings, alpha and R² of a symbol or portfolio (--rolling, --plot)",
        description="OLS of the subject's excess returns on the factors' over the days all "
        "of them have a price: loadings with standard errors and t-stats, alpha, R², "
        "residual volatility; --rolling N adds loadings over trailing windows of N returns.",
    )
    p.add_argument(
        "subject",
        nargs="+",
        metavar="SUBJECT",
        help="a symbol, or holdings SYM=WEIGHT… for a portfolio (e.g. AAPL=0.6 KO=40%%)",
    )
    p.add_argument(
        "--factors",
        type=symbol_list,
        required=True,
        metavar="SYM,SYM…",
        help="factor symbols (price series: ETFs, or return series ingested as indices)",
    )
    p.add_argument(
        "--excess",
        type=symbol_list,
        metavar="SYM,SYM…",
        help="factors already in excess / long-short returns (no risk-free subtraction)",
    )
    add_range(p)
    p.add_argument("--rf", type=rate, default=0.0, help="annual risk-free rate: 0.04 or 4%%")
    p.add_argument(
        "--rolling", type=int, metavar="N", help="also regress over trailing windows of N returns"
    )
    p.add_argument(
        "--hac",
        type=int,
        nargs="?",
        const=0,
        metavar="LAGS",
        help="Newey-West standard errors (LAGS omitted: floor(4 (n/100)^(2/9)))",
    )
    p.add_argument("--rebalance", choices=tuple(REBALANCE), default="monthly", help="portfolio")
    p.add_argument("--allow-short", action="store_true", help="portfolio: negative weights")
    p.add_argument(
        "--plot", metavar="FILE.png", help="draw the rolling loadings and R² (--rolling)"
    )
    p.set_defaults(handler=factors)
