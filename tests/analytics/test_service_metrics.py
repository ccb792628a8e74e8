"""ComputeMetrics / RollingMetrics / ComputePortfolio over gRPC against the in-process engine.

The service reads the stored decimals back from DuckDB; the reference here parses the
sample CSV files itself (importer -> float). Equal numbers prove that storage, pivoting
and translation lose nothing: the engine itself is checked against empyrical by
test_metrics_oracle.py. Bad input is INVALID_ARGUMENT / NOT_FOUND with field names.
"""

from __future__ import annotations

import math
from functools import cache

import grpc
import numpy as np
import pytest
from google.type import date_pb2
from redis.asyncio import Redis

from finsight.analytics.v1 import analytics_pb2 as pb
from libs.barfiles.reader import PriceMatrix, read_bars, to_price_matrix
from libs.common.errors import status_info
from services.analytics import metrics as engine
from services.analytics.sample_loader import SAMPLE_DIR
from tests.analytics.conftest import Running

STOCKS = ["AAPL", "AMD", "BAC", "BBY", "CVX", "GE", "HD", "JNJ", "JPM", "KO",
          "LLY", "MRK", "MSFT", "PEP", "PFE", "PG", "RRC", "UNH", "WMT", "XOM"]  # fmt: skip


@cache
def sample_matrix() -> PriceMatrix:
    bars = read_bars(SAMPLE_DIR / "sp500_dataset.csv.gz", layout="wide").bars
    bars += read_bars(SAMPLE_DIR / "sp500_index.csv.gz", layout="wide").bars
    bars += read_bars(SAMPLE_DIR / "sp500_ohlcv.csv.gz", layout="long", symbol="^GSPC").bars
    return to_price_matrix(bars)


def columns(names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    m = sample_matrix()
    idx = [m.symbols.index(s) for s in names]
    prices = m.adj_close[:, idx]
    keep = ~np.isnan(prices).all(axis=1)
    return prices[keep], m.dates[keep]


def d(text: str) -> date_pb2.Date:
    y, mo, da = (int(x) for x in text.split("-"))
    return date_pb2.Date(year=y, month=mo, day=da)


def same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


def assert_same_metrics(got: pb.SeriesMetrics, want: engine.SymbolMetrics) -> None:
    pairs = {
        "total_return": (got.total_return, want.total_return),
        "cagr": (got.cagr, want.cagr),
        "volatility": (got.volatility, want.volatility),
        "sharpe": (got.sharpe, want.sharpe),
        "sortino": (got.sortino, want.sortino),
        "calmar": (got.calmar, want.calmar),
        "max_drawdown": (got.drawdown.max_drawdown, want.drawdown.max_drawdown),
        "var_95": (got.var_95, want.var_95),
        "var_99": (got.var_99, want.var_99),
        "cvar_95": (got.cvar_95, want.cvar_95),
        "cvar_99": (got.cvar_99, want.cvar_99),
        "parametric_var_95": (got.parametric_var_95, want.parametric_var_95),
        "skew": (got.skew, want.skew),
        "kurtosis": (got.kurtosis, want.kurtosis),
        "best": (got.best.value, want.best.value),
        "worst": (got.worst.value, want.worst.value),
        "positive_share": (got.positive_share, want.positive_share),
    }
    if want.relative is not None:
        pairs |= {
            "beta": (got.relative.beta, want.relative.beta),
            "alpha": (got.relative.alpha, want.relative.alpha),
            "tracking_error": (got.relative.tracking_error, want.relative.tracking_error),
            "information_ratio": (got.relative.information_ratio, want.relative.information_ratio),
        }
    wrong = {k: v for k, v in pairs.items() if not same(*v)}
    assert not wrong, f"{got.symbol}: {wrong}"
    assert got.return_count == want.n_returns
    dd = want.drawdown
    assert (
        got.drawdown.peak_date.year,
        got.drawdown.peak_date.month,
        got.drawdown.peak_date.day,
    ) == (dd.peak_date.year, dd.peak_date.month, dd.peak_date.day)  # type: ignore[union-attr]
    assert got.drawdown.recovered == dd.recovered
    assert got.drawdown.duration_days == dd.duration_days


async def test_compute_metrics_equals_the_engine_on_the_sample(analytics: Running) -> None:
    symbols = [*STOCKS, "^GSPC"]
    reply = await analytics.stub.ComputeMetrics(
        pb.ComputeMetricsRequest(symbols=symbols, benchmark="SP500", risk_free_rate=0.02),
        metadata=analytics.keys.md(analytics.keys.reader_a),
    )
    prices, dates = columns([*symbols, "SP500"])
    want = engine.compute_metrics(
        prices[:, :-1],
        dates,
        symbols,
        benchmark=prices[:, -1],
        benchmark_symbol="SP500",
        risk_free=0.02,
    )
    assert [m.symbol for m in reply.metrics] == symbols
    for got in reply.metrics:
        assert_same_metrics(got, want[got.symbol])
    c = reply.conventions
    assert (c.periods_per_year, c.ddof, c.risk_free_rate_annual) == (252, 1, 0.02)
    assert c.risk_free_rate_per_period == pytest.approx(1.02 ** (1 / 252) - 1, rel=1e-15)
    assert reply.data_version >= 1


async def test_a_date_range_selects_the_prices_inside_it(analytics: Running) -> None:
    request = pb.ComputeMetricsRequest(symbols=["MSFT", "KO"], periods_per_year=252)
    request.range.start.CopyFrom(d("2008-01-01"))
    request.range.end.CopyFrom(d("2009-12-31"))
    reply = await analytics.stub.ComputeMetrics(
        request, metadata=analytics.keys.md(analytics.keys.reader_a)
    )
    prices, dates = columns(["MSFT", "KO"])
    inside = (dates >= np.datetime64("2008-01-01")) & (dates <= np.datetime64("2009-12-31"))
    want = engine.compute_metrics(prices[inside], dates[inside], ["MSFT", "KO"])
    for got in reply.metrics:
        assert_same_metrics(got, want[got.symbol])
    assert reply.metrics[0].start_date == d("2008-01-02")


async def test_relative_figures_state_their_common_window(analytics: Running) -> None:
    # ^GSPC ends on 2018-12-31: from 2015 on AAPL has four more years than it shares.
    request = pb.ComputeMetricsRequest(symbols=["AAPL", "MSFT"], benchmark="^GSPC")
    request.range.start.CopyFrom(d("2015-01-01"))
    reply = await analytics.stub.ComputeMetrics(
        request, metadata=analytics.keys.md(analytics.keys.reader_a)
    )
    for m in reply.metrics:
        rel = m.relative
        assert rel.common_periods < m.return_count
        assert (rel.first_common_date, rel.last_common_date) == (d("2015-01-05"), d("2018-12-31"))
        assert m.start_date == d("2015-01-02") and m.end_date == d("2022-12-28")
        assert m.relative_unavailable == ""


async def test_a_benchmark_without_data_in_the_range_costs_only_the_relative_figures(
    analytics: Running,
) -> None:
    md = analytics.keys.md(analytics.keys.reader_a)

    def ranged(request: pb.ComputeMetricsRequest | pb.ComputePortfolioRequest) -> None:
        request.range.start.CopyFrom(d("2019-06-01"))
        request.range.end.CopyFrom(d("2020-12-31"))

    with_bench = pb.ComputeMetricsRequest(symbols=["AAPL", "KO"], benchmark="^GSPC")
    alone = pb.ComputeMetricsRequest(symbols=["AAPL", "KO"])
    for r in (with_bench, alone):
        ranged(r)
    got = await analytics.stub.ComputeMetrics(with_bench, metadata=md)
    want = await analytics.stub.ComputeMetrics(alone, metadata=md)
    for g, w in zip(got.metrics, want.metrics, strict=True):
        assert not g.HasField("relative")
        assert g.relative_unavailable == (
            "the benchmark ^GSPC has data from 1999-01-04 to 2018-12-31, not in the range "
            "2019-06-01 to 2020-12-31, so no relative figures"
        )
        g.relative_unavailable = ""
        assert g == w  # the absolute figures are untouched

    holdings = [pb.Holding(symbol="AAPL", weight=0.6), pb.Holding(symbol="KO", weight=0.4)]
    portfolio = pb.ComputePortfolioRequest(holdings=holdings, benchmark="^GSPC")
    ranged(portfolio)
    reply = await analytics.stub.ComputePortfolio(portfolio, metadata=md)
    assert not reply.metrics.HasField("relative")
    assert "the benchmark ^GSPC has data from 1999-01-04" in reply.metrics.relative_unavailable
    assert math.isfinite(reply.metrics.volatility)


async def test_rolling_metrics_equal_the_engine(analytics: Running) -> None:
    md = analytics.keys.md(analytics.keys.reader_a)
    prices, dates = columns(["JPM", "SP500"])
    returns = engine.simple_returns(prices)
    cases: list[tuple[int, engine.RollingMetricName]] = [
        (pb.ROLLING_METRIC_VOLATILITY, "volatility"),
        (pb.ROLLING_METRIC_BETA, "beta"),
    ]
    for metric, name in cases:
        reply = await analytics.stub.RollingMetrics(
            pb.RollingMetricsRequest(symbol="JPM", metric=metric, window=63, benchmark="SP500"),
            metadata=md,
        )
        want = engine.rolling_metric(
            returns[:, 0],
            dates,
            name,
            63,
            benchmark_returns=returns[:, 1],
        )
        defined = ~np.isnan(want.values)
        assert [p.value for p in reply.points] == want.values[defined].tolist()
        assert reply.points[0].date == d(str(want.dates[defined][0]))
        assert reply.window == 63


async def test_portfolio_equals_the_engine(analytics: Running) -> None:
    holdings = [pb.Holding(symbol="AAPL", weight=0.5), pb.Holding(symbol="KO", weight=0.3),
                pb.Holding(symbol="^GSPC", weight=0.2)]  # fmt: skip
    reply = await analytics.stub.ComputePortfolio(
        pb.ComputePortfolioRequest(
            holdings=holdings,
            rebalance=pb.REBALANCE_QUARTERLY,
            benchmark="SP500",
            include_returns=True,
        ),
        metadata=analytics.keys.md(analytics.keys.reader_a),
    )
    prices, dates = columns(["AAPL", "KO", "^GSPC", "SP500"])
    # ^GSPC starts in 1999: with no start given the portfolio starts when all assets trade.
    start = int(np.argmax(~np.isnan(prices[:, 2])))
    want = engine.analyse_portfolio(
        prices[start:, :3], dates[start:], ["AAPL", "KO", "^GSPC"], [0.5, 0.3, 0.2],
        "quarterly", benchmark=prices[start:, 3], benchmark_symbol="SP500",
    )  # fmt: skip
    assert_same_metrics(reply.metrics, want.metrics)
    assert list(reply.covariance.values) == want.covariance.ravel().tolist()
    assert list(reply.correlation.values) == want.correlation.ravel().tolist()
    assert [r.contribution for r in reply.risk_contributions] == want.risk.contributions.tolist()
    assert sum(r.share for r in reply.risk_contributions) == pytest.approx(1.0, abs=1e-12)
    assert reply.portfolio_volatility == want.risk.portfolio_volatility
    assert [p.value for p in reply.returns] == want.returns[1:].tolist()
    assert reply.rebalance == pb.REBALANCE_QUARTERLY
    assert reply.metrics.start_date == d("1999-01-04")


async def bad(
    analytics: Running, call: str, request: object
) -> tuple[grpc.StatusCode, list[str], object]:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await getattr(analytics.stub, call)(
            request, metadata=analytics.keys.md(analytics.keys.reader_a)
        )
    info = status_info(err.value)
    return info.code, [v.field for v in info.field_violations], info


async def test_bad_metric_requests_name_the_field(analytics: Running) -> None:
    code, _, info = await bad(
        analytics, "ComputeMetrics", pb.ComputeMetricsRequest(symbols=["AAPL", "NOPE", "ZZZ"])
    )
    assert code == grpc.StatusCode.NOT_FOUND
    assert info.metadata["symbols"] == "NOPE,ZZZ"  # type: ignore[attr-defined]

    inverted = pb.ComputeMetricsRequest(symbols=["AAPL"])
    inverted.range.start.CopyFrom(d("2010-01-01"))
    inverted.range.end.CopyFrom(d("2009-01-01"))
    assert (await bad(analytics, "ComputeMetrics", inverted))[:2] == (
        grpc.StatusCode.INVALID_ARGUMENT,
        ["range.start"],
    )

    one_day = pb.ComputeMetricsRequest(symbols=["AAPL"])
    one_day.range.start.CopyFrom(d("2010-01-04"))
    one_day.range.end.CopyFrom(d("2010-01-05"))  # 2 prices = 1 return
    assert (await bad(analytics, "ComputeMetrics", one_day))[:2] == (
        grpc.StatusCode.INVALID_ARGUMENT,
        ["symbols"],
    )

    # A window without data says which series has none and the range each does have (not
    # numpy's "need a non-empty 2-D array"), for the benchmark too.
    empty = pb.ComputeMetricsRequest(symbols=["AAPL"], benchmark="SP500")
    empty.range.start.CopyFrom(d("2030-01-01"))
    code, fields, info = await bad(analytics, "ComputeMetrics", empty)
    assert (code, fields) == (grpc.StatusCode.INVALID_ARGUMENT, ["range"])
    assert info.reason == "NO_DATA_IN_RANGE"  # type: ignore[attr-defined]
    assert info.metadata["symbols"] == "AAPL,SP500"  # type: ignore[attr-defined]
    assert "AAPL has data from 1990-01-02 to " in info.message  # type: ignore[attr-defined]
    assert "array" not in info.message  # type: ignore[attr-defined]

    code, fields, _ = await bad(
        analytics, "ComputeMetrics",
        pb.ComputeMetricsRequest(symbols=["AAPL", "AAPL", "x y"], periods_per_year=10_000, risk_free_rate=2),
    )  # fmt: skip
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert fields == ["symbols[1]", "symbols[2]", "periods_per_year", "risk_free_rate"]
    assert (await bad(analytics, "ComputeMetrics", pb.ComputeMetricsRequest()))[1] == ["symbols"]


async def test_bad_rolling_and_portfolio_requests(analytics: Running) -> None:
    too_long = pb.RollingMetricsRequest(symbol="AAPL", metric=pb.ROLLING_METRIC_SHARPE, window=9000)
    assert (await bad(analytics, "RollingMetrics", too_long))[:2] == (
        grpc.StatusCode.INVALID_ARGUMENT,
        ["window"],
    )
    no_bench = pb.RollingMetricsRequest(symbol="AAPL", metric=pb.ROLLING_METRIC_BETA, window=20)
    assert (await bad(analytics, "RollingMetrics", no_bench))[1] == ["benchmark"]
    no_metric = pb.RollingMetricsRequest(symbol="AAPL", window=20)
    assert (await bad(analytics, "RollingMetrics", no_metric))[1] == ["metric"]

    def portfolio(*weights: float, short: bool = False) -> pb.ComputePortfolioRequest:
        names = ["AAPL", "KO", "MSFT"]
        return pb.ComputePortfolioRequest(
            holdings=[pb.Holding(symbol=s, weight=w) for s, w in zip(names, weights, strict=False)],
            allow_short=short,
        )

    assert (await bad(analytics, "ComputePortfolio", portfolio(0.5, 0.3, 0.1)))[1] == ["holdings"]
    assert (await bad(analytics, "ComputePortfolio", portfolio(0.7, 0.5, -0.2)))[1] == [
        "holdings[2].weight"
    ]
    # Weights whose exact sum overflows a float (math.fsum raises): the sum is named, not
    # an INTERNAL error.
    huge = await bad(analytics, "ComputePortfolio", portfolio(1e308, 1e308, -1e308, short=True))
    assert huge[:2] == (grpc.StatusCode.INVALID_ARGUMENT, ["holdings"])
    shorted = await analytics.stub.ComputePortfolio(
        portfolio(0.7, 0.5, -0.2, short=True), metadata=analytics.keys.md(analytics.keys.reader_a)
    )
    assert [r.weight for r in shorted.risk_contributions] == [0.7, 0.5, -0.2]

    late_start = portfolio(0.5, 0.5)
    late_start.holdings[1].symbol = "^GSPC"
    late_start.range.start.CopyFrom(d("1995-01-01"))  # ^GSPC has no price before 1999
    assert (await bad(analytics, "ComputePortfolio", late_start))[1] == ["range.start"]


async def test_results_are_cached_by_data_version(analytics: Running, redis_url: str) -> None:
    md = analytics.keys.md(analytics.keys.reader_a)
    request = pb.ComputeMetricsRequest(symbols=["PG", "PEP"], benchmark="SP500")
    first = await analytics.stub.ComputeMetrics(request, metadata=md)
    redis = Redis.from_url(redis_url)
    try:
        keys = [
            k
            async for k in redis.scan_iter(
                f"analytics:result:v1:acme:{first.data_version}:ComputeMetrics:*"
            )
        ]
        assert keys, "the result was not cached"
        # A planted entry proves the second answer is read from the cache, not recomputed.
        planted = pb.ComputeMetricsResponse.FromString(first.SerializeToString())
        planted.metrics[0].sharpe = 123.0
        for k in keys:
            await redis.set(k, planted.SerializeToString())
        second = await analytics.stub.ComputeMetrics(request, metadata=md)
        assert second.metrics[0].sharpe == 123.0
        # Any ingest bumps the version: the next answer is computed afresh.
        await analytics.stub.IngestBars(
            iter([pb.IngestBarsRequest(series=[pb.BarSeries(
                symbol="CACHEBUMP", dates=[d("2024-01-02")], open_micros=[1], high_micros=[1],
                low_micros=[1], close_micros=[1], adj_close_micros=[1], volumes=[0])])]),
            metadata=analytics.keys.md(analytics.keys.writer_a),
        )  # fmt: skip
        third = await analytics.stub.ComputeMetrics(request, metadata=md)
        assert third.data_version > first.data_version
        assert third.metrics[0].sharpe == first.metrics[0].sharpe
    finally:
        await redis.aclose()
