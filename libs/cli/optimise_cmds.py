"""`finsight optimise` (alias `optimize`): portfolio weights from OptimizePortfolio.

    finsight optimise AAPL MSFT JPM XOM --objective min-variance --max-weight 40%

prints the weights with each asset's estimates and risk share, the expected figures, the
evaluation metrics (in sample, or out of sample with --eval-from/--eval-to) and, with
--frontier N or --plot FILE.png, the efficient frontier (the chart marks the chosen
portfolio and every asset). An infeasible problem is the service's FAILED_PRECONDITION,
naming the constraint (exit 1).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any, Final

from rich.markup import escape
from rich.table import Table

from finsight.analytics.v1 import analytics_pb2 as pb
from finsight.common.v1 import common_pb2
from libs.cli.analytics_cmds import REBALANCE, metrics_table, stub_for
from libs.cli.commands import show
from libs.cli.connection import Connection
from libs.cli.options import add_range, date_range, iso_date, rate
from libs.cli.render import day, num, pb_date, pct, plain

OBJECTIVES: Final = {
    "min-variance": pb.OPTIMIZATION_OBJECTIVE_MIN_VARIANCE,
    "max-sharpe": pb.OPTIMIZATION_OBJECTIVE_MAX_SHARPE,
    "min-cvar": pb.OPTIMIZATION_OBJECTIVE_MIN_CVAR,
    "risk-parity": pb.OPTIMIZATION_OBJECTIVE_RISK_PARITY,
    "hrp": pb.OPTIMIZATION_OBJECTIVE_HRP,
}
RETURNS: Final = {"sample": pb.RETURN_ESTIMATOR_SAMPLE, "ewma": pb.RETURN_ESTIMATOR_EXPONENTIAL}
COVARIANCES: Final = {
    "sample": pb.COVARIANCE_ESTIMATOR_SAMPLE,
    "ewma": pb.COVARIANCE_ESTIMATOR_EXPONENTIAL,
    "ledoit-wolf": pb.COVARIANCE_ESTIMATOR_LEDOIT_WOLF,
}
PLOT_FRONTIER_POINTS: Final = 15
# Request field -> the flag that set it (field violations name the flag).
FLAGS: Final = {
    "objective": "--objective",
    "range": "--from/--to",
    "evaluation_range": "--eval-from/--eval-to",
    "half_life": "--half-life",
    "min_weight": "--min-weight",
    "max_weight": "--max-weight",
    "bounds": "--bound",
    "groups": "--group",
    "target_return": "--target-return",
    "target_volatility": "--target-volatility",
    "current_weights": "--current",
    "max_turnover": "--max-turnover",
    "cvar_confidence": "--confidence",
    "frontier_points": "--frontier",
    "allow_short": "--allow-short",
    "symbols": "SYMBOL",
}


def field_flag(name: str) -> str | None:
    """`groups[1].max_weight` -> `--group #2 (groups[1].max_weight)`."""
    head = name.split("[", 1)[0].split(".", 1)[0]
    flag = FLAGS.get(head)
    if flag is None:
        return None
    if "[" in name and head in ("bounds", "groups", "current_weights", "symbols"):
        index = int(name.split("[", 1)[1].split("]", 1)[0])
        return f"{flag} #{index + 1} ({name})"
    return flag if flag == name else f"{flag} ({name})"


# -- argument types --------------------------------------------------------------------------
def weight_value(text: str) -> float:
    value = rate(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r}: must be finite")
    return value


def bound(text: str) -> pb.SymbolBounds:
    """`AAPL=5%:30%`, `AAPL=:30%` (a cap only), `XOM=10%:` (a floor only)."""
    symbol, sep, rest = text.partition("=")
    low, colon, high = rest.partition(":")
    if not sep or not symbol or not colon or not (low or high):
        raise argparse.ArgumentTypeError(f"{text!r}: expected SYM=MIN:MAX (either may be empty)")
    out = pb.SymbolBounds(symbol=symbol)
    if low:
        out.min_weight = weight_value(low)
    if high:
        out.max_weight = weight_value(high)
    return out


def group(text: str) -> pb.WeightGroup:
    """`tech=AAPL,MSFT:40%` (a cap) or `tech=AAPL,MSFT:10%:40%` (a floor and a cap)."""
    name, sep, rest = text.partition("=")
    parts = rest.split(":")
    if not sep or not name or len(parts) not in (2, 3) or not parts[0]:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected NAME=SYM,SYM:MAX or NAME=SYM,SYM:MIN:MAX"
        )
    out = pb.WeightGroup(name=name, symbols=[s for s in parts[0].split(",") if s])
    if len(parts) == 2:
        out.max_weight = weight_value(parts[1])
    else:
        if parts[1]:
            out.min_weight = weight_value(parts[1])
        if parts[2]:
            out.max_weight = weight_value(parts[2])
    return out


def holding(text: str) -> pb.Holding:
    symbol, sep, weight = text.partition("=")
    if not sep or not symbol:
        raise argparse.ArgumentTypeError(f"{text!r}: expected SYM=WEIGHT (e.g. AAPL=25%)")
    return pb.Holding(symbol=symbol, weight=weight_value(weight))


# -- request and rendering -------------------------------------------------------------------
def build_request(args: argparse.Namespace) -> pb.OptimizePortfolioRequest:
    frontier = args.frontier if args.frontier else (PLOT_FRONTIER_POINTS if args.plot else 0)
    req = pb.OptimizePortfolioRequest(
        symbols=args.symbols,
        objective=OBJECTIVES[args.objective],
        range=date_range(args),
        return_estimator=RETURNS[args.returns],
        covariance_estimator=COVARIANCES[args.covariance],
        half_life=args.half_life or 0.0,
        allow_short=args.allow_short,
        bounds=args.bound or [],
        groups=args.group or [],
        current_weights=args.current or [],
        risk_free_rate=args.rf,
        cvar_confidence=args.confidence or 0.0,
        rebalance=REBALANCE[args.rebalance],
        benchmark=args.benchmark or "",
        frontier_points=frontier,
    )
    for name in ("min_weight", "max_weight", "target_return", "target_volatility", "max_turnover"):
        value = getattr(args, name)
        if value is not None:
            setattr(req, name, value)
    if args.eval_start is not None or args.eval_end is not None:
        rng = common_pb2.DateRange()
        if args.eval_start is not None:
            rng.start.CopyFrom(pb_date(args.eval_start))
        if args.eval_end is not None:
            rng.end.CopyFrom(pb_date(args.eval_end))
        req.evaluation_range.CopyFrom(rng)
    return req


def objective_name(value: int) -> str:
    return pb.OptimizationObjective.Name(value).removeprefix("OPTIMIZATION_OBJECTIVE_").lower()


def objective_text(reply: pb.OptimizePortfolioResponse) -> str:
    v = reply.objective_value
    return {
        pb.OPTIMIZATION_OBJECTIVE_MIN_VARIANCE: f"variance {num(v, 6)} (volatility {pct(math.sqrt(max(v, 0.0)))})",
        pb.OPTIMIZATION_OBJECTIVE_MAX_SHARPE: f"Sharpe {num(v, 4)}",
        pb.OPTIMIZATION_OBJECTIVE_MIN_CVAR: f"CVaR of the daily loss {pct(v, 3)}",
        pb.OPTIMIZATION_OBJECTIVE_RISK_PARITY: f"largest risk-share gap {v:.2e}",
        pb.OPTIMIZATION_OBJECTIVE_HRP: f"variance {num(v, 6)} (volatility {pct(math.sqrt(max(v, 0.0)))})",
    }.get(reply.objective, num(v, 6))


def weights_table(reply: pb.OptimizePortfolioResponse) -> Table:
    table = Table(
        title=f"Optimised weights ({objective_name(reply.objective).replace('_', '-')})",
        caption=escape(reply.optimization_rule),
    )
    for name in (
        "symbol",
        "weight",
        "exp. return",
        "volatility",
        "risk contribution",
        "risk share",
    ):
        table.add_column(name, justify="left" if name == "symbol" else "right")
    for h, a, r in zip(reply.weights, reply.assets, reply.risk_contributions, strict=True):
        table.add_row(
            escape(h.symbol),
            pct(h.weight, 1),
            pct(a.expected_return),
            pct(a.volatility),
            pct(r.contribution),
            pct(r.share, 1),
        )
    return table


def expected_table(reply: pb.OptimizePortfolioResponse) -> Table:
    w = reply.estimation_window
    table = Table(
        title="Expected (annualised, from the estimates)",
        caption=f"estimated over {day(w.start)} → {day(w.end)} "
        f"({reply.estimation_periods:,} returns); data version {reply.data_version}",
    )
    table.add_column("figure", style="bold")
    table.add_column("value", justify="right")
    rows = [
        ("objective", objective_text(reply)),
        ("expected return", pct(reply.expected_return)),
        ("expected volatility", pct(reply.expected_volatility)),
        ("expected Sharpe", num(reply.expected_sharpe)),
        (
            "solver",
            f"{reply.solver.solver} {reply.solver.status}, {reply.solver.iterations} iterations, "
            f"{reply.solver.seconds * 1000:.0f} ms",
        ),
    ]
    if math.isfinite(reply.shrinkage):
        rows.append(("Ledoit-Wolf shrinkage", num(reply.shrinkage, 4)))
    for label, value in rows:
        table.add_row(label, value)
    return table


def frontier_table(reply: pb.OptimizePortfolioResponse) -> Table:
    table = Table(title=f"Efficient frontier ({len(reply.frontier)} points)")
    for name in ("#", "exp. return", "volatility", "Sharpe", "weights"):
        table.add_column(name, justify="right" if name != "weights" else "left")
    symbols = [h.symbol for h in reply.weights]
    for i, p in enumerate(reply.frontier, 1):
        held = ", ".join(
            f"{s} {pct(w, 0)}" for s, w in zip(symbols, p.weights, strict=True) if abs(w) >= 0.005
        )
        table.add_row(str(i), pct(p.expected_return), pct(p.volatility), num(p.sharpe), held)
    return table


def tables(reply: pb.OptimizePortfolioResponse) -> list[Table]:
    where = "out of sample" if reply.out_of_sample else "in sample"
    rebalance = pb.Rebalance.Name(reply.rebalance).removeprefix("REBALANCE_").lower()
    evaluation = metrics_table(
        [reply.evaluation],
        f"Evaluation of the weights ({where}, rebalanced {rebalance})",
    )
    out_tables = [weights_table(reply), expected_table(reply), evaluation]
    if reply.frontier:
        out_tables.append(frontier_table(reply))
    return out_tables


def response_json(reply: pb.OptimizePortfolioResponse) -> dict[str, Any]:
    data = plain(reply)
    # Matrices and frontier weights are kept; weights as a symbol -> weight map too.
    data["weights_by_symbol"] = {h.symbol: h.weight for h in reply.weights}
    return data


async def optimise(args: argparse.Namespace, conn: Connection) -> int:
    request = build_request(args)
    conn.field_flag = field_flag
    async with conn.channel("analytics") as channel:
        reply = await stub_for(channel).OptimizePortfolio(
            request, metadata=conn.metadata, timeout=conn.timeout
        )
    data = response_json(reply)
    if args.plot:
        from libs.cli import frontier_plot

        frontier_plot.frontier_chart(Path(args.plot), reply)
    return show(args, data, lambda: tables(reply), args.plot)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "optimise",
        aliases=["optimize"],
        help="optimise portfolio weights (OptimizePortfolio); --plot draws the frontier",
        description="Optimise the weights of 2-100 symbols under constraints, estimated over "
        "--from/--to; the weights are evaluated in sample or over --eval-from/--eval-to. "
        "Weights, returns and volatilities take fractions (0.4) or percentages (40%%).",
    )
    p.add_argument("symbols", nargs="+", metavar="SYMBOL")
    p.add_argument("--objective", choices=tuple(OBJECTIVES), default="min-variance")
    p.add_argument(
        "--returns", choices=tuple(RETURNS), default="sample", help="expected-return estimator"
    )
    p.add_argument(
        "--covariance", choices=tuple(COVARIANCES), default="sample", help="covariance estimator"
    )
    p.add_argument(
        "--half-life", type=float, metavar="N", help="of the ewma estimators, in returns (63)"
    )
    p.add_argument("--allow-short", action="store_true", help="allow negative weights")
    p.add_argument("--min-weight", type=weight_value, metavar="W", help="floor of every weight")
    p.add_argument("--max-weight", type=weight_value, metavar="W", help="cap of every weight")
    p.add_argument(
        "--bound", type=bound, action="append", metavar="SYM=MIN:MAX", help="one symbol's bounds"
    )
    p.add_argument(
        "--group",
        type=group,
        action="append",
        metavar="NAME=SYM,SYM:MAX",
        help="cap (NAME=SYMS:MAX) or floor and cap (NAME=SYMS:MIN:MAX) of a group's weight",
    )
    p.add_argument("--target-return", type=weight_value, metavar="R", help="at least, annual")
    p.add_argument("--target-volatility", type=weight_value, metavar="V", help="at most, annual")
    p.add_argument(
        "--current", type=holding, action="append", metavar="SYM=W", help="weights held now"
    )
    p.add_argument(
        "--max-turnover", type=weight_value, metavar="T", help="sum |w - current| at most"
    )
    p.add_argument("--confidence", type=float, metavar="C", help="CVaR confidence (0.95)")
    add_range(p, "the estimation window")
    p.add_argument("--eval-from", dest="eval_start", type=iso_date, metavar="DATE",
                   help="first day of an out-of-sample evaluation")  # fmt: skip
    p.add_argument("--eval-to", dest="eval_end", type=iso_date, metavar="DATE",
                   help="last day of the evaluation")  # fmt: skip
    p.add_argument("--rebalance", choices=tuple(REBALANCE), default="monthly")
    p.add_argument("--benchmark", metavar="SYM", help="of the evaluation metrics")
    p.add_argument("--rf", type=rate, default=0.0, help="annual risk-free rate: 0.04 or 4%%")
    p.add_argument(
        "--frontier",
        type=int,
        metavar="N",
        help=f"efficient-frontier points (2-50; --plot: {PLOT_FRONTIER_POINTS})",
    )
    p.add_argument("--plot", metavar="FILE.png", help="draw the efficient frontier")
    p.set_defaults(handler=optimise)
