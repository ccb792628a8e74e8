"""Drawdown tables and monthly / yearly return tables (services/analytics/tables.py).

Oracles, to 1e-9 relative on the 20-stock sample (1990-2022), on gapped copies of it and
on synthetic edge cases:

* pyfolio-reloaded's ``timeseries.gen_drawdown_table`` for the drawdown table (depth,
  peak, valley and recovery dates, order). pyfolio's wealth starts at the first return,
  ours at the starting value before it, so pyfolio is given the series with a 0 return
  dated on the starting value's row (the one documented difference; a test shows it).
  Lengths are checked as positions in that same series (returns) and date differences.
* QuantStats' ``drawdown_details`` as a second opinion on the dates: its ``start`` is
  the day after our peak, its ``end`` the day before our recovery.
* empyrical's ``aggregate_returns`` (monthly, yearly) and QuantStats' ``monthly_returns``
  (with its EOY column) for the period tables.

Plus ComputeMetrics / ComputePortfolio over gRPC returning exactly the engine's tables.
"""

from __future__ import annotations

import itertools
import math
import warnings
from datetime import date

import empyrical as ep
import grpc
import matplotlib
import numpy as np
import pandas as pd
import pytest

from finsight.analytics.v1 import analytics_pb2 as pb
from services.analytics import metrics as m
from services.analytics import tables as t
from tests.analytics.conftest import Running
from tests.analytics.test_metrics_oracle import _read_wide

# QuantStats sets a seaborn style in matplotlib's global rcParams when imported (the CLI
# chart tests of the same session check colours); pyfolio warns that zipline is missing.
with warnings.catch_warnings(), matplotlib.rc_context():
    warnings.simplefilter("ignore")
    import pyfolio.timeseries as pft
    import quantstats as qs

REL = 1e-9
MONTHS = ["JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC"]


# ---------------------------------------------------------------------------
# Data and oracle adapters
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sample() -> tuple[list[str], np.ndarray, np.ndarray]:
    symbols, prices, dates = _read_wide("sp500_dataset.csv.gz")
    return symbols, prices, dates


@pytest.fixture(scope="module")
def gapped(sample) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Missing days: a late listing, a suspension, random holes, an early delisting."""
    symbols, prices, dates = sample
    cols = [symbols.index(s) for s in ("AAPL", "GE", "XOM", "JPM")]
    out = prices[:, cols].copy()
    out[:250, 0] = np.nan
    out[4000:4030, 0] = np.nan  # a suspension across a month end
    rng = np.random.default_rng(11)
    out[rng.choice(np.arange(1, dates.size), 600, replace=False), 1] = np.nan
    out[-30:, 2] = np.nan
    out[2000:2100, 3] = np.nan  # months without a single price
    return ["AAPL", "GE", "XOM", "JPM"], out, dates


def _series(prices: np.ndarray, dates: np.ndarray) -> tuple[pd.Series, pd.Series]:
    """(our returns without NaN, the same with a 0 return on the starting value's row)."""
    r = m.simple_returns(prices)
    ok = ~np.isnan(r)
    base = int(np.argmax(~np.isnan(prices)))
    returns = pd.Series(r[ok], index=pd.DatetimeIndex(dates[ok]))
    anchored = pd.Series(
        np.r_[0.0, r[ok]], index=pd.DatetimeIndex(np.r_[dates[base : base + 1], dates[ok]])
    )
    return returns, anchored


def _day(value: object) -> date | None:
    return None if pd.isnull(value) else pd.Timestamp(value).date()  # type: ignore[arg-type]


def _close(a: float, b: float, rel: float = REL) -> bool:
    return math.isclose(a, b, rel_tol=rel, abs_tol=1e-15)


def _check_against_pyfolio(ours: list[t.DrawdownPeriod], anchored: pd.Series, top: int) -> None:
    """Every row of ours equals pyfolio's row of the same rank; lengths by position."""
    table = pft.gen_drawdown_table(anchored, top=top).dropna(subset=["Peak date"])
    rows = [r for _, r in table.iterrows() if r["Net drawdown in %"] > 0]
    assert len(ours) == len(rows)
    position = {d.date(): i for i, d in enumerate(anchored.index)}
    last = anchored.index[-1].date()
    for i, (o, row) in enumerate(zip(ours, rows, strict=True)):
        where = f"rank {i}: ours={o} pyfolio={row.to_dict()}"
        assert _close(-100.0 * o.depth, float(row["Net drawdown in %"])), where
        assert o.peak_date == _day(row["Peak date"]), where
        assert o.trough_date == _day(row["Valley date"]), where
        assert o.recovery_date == _day(row["Recovery date"]), where
        assert o.recovered == (o.recovery_date is not None)
        end = o.recovery_date or last
        assert o.periods_to_trough == position[o.trough_date] - position[o.peak_date], where
        assert o.duration_periods == position[end] - position[o.peak_date], where
        assert o.days_to_trough == (o.trough_date - o.peak_date).days
        assert o.duration_days == (end - o.peak_date).days
        if o.recovery_date is not None:  # pyfolio: business days, both ends included
            weekdays = len(pd.bdate_range(o.peak_date, o.recovery_date))
            assert int(row["Duration"]) == weekdays, where
        else:
            assert pd.isnull(row["Duration"])


def _check_against_quantstats(ours: list[t.DrawdownPeriod], returns: pd.Series) -> None:
    """QuantStats lists every run below the peak: start = the day after our peak, end =
    the day before our recovery (the last day when open), depth equal."""
    details = qs.stats.drawdown_details(qs.stats.to_drawdown_series(returns))
    by_valley = {r["valley"]: r for _, r in details.iterrows()}
    index = [d.date() for d in returns.index]
    position = {d: i for i, d in enumerate(index)}
    for o in ours:
        row = by_valley[o.trough_date.isoformat()]
        start = index[position[o.peak_date] + 1] if o.peak_date in position else index[0]
        end = index[position[o.recovery_date] - 1] if o.recovery_date else index[-1]
        assert row["start"] == start.isoformat(), (o, row.to_dict())
        assert row["end"] == end.isoformat(), (o, row.to_dict())
        assert _close(float(row["max drawdown"]), 100.0 * o.depth), (o, row.to_dict())


def _check_periods(ours: t.SeriesTables, returns: pd.Series) -> None:
    monthly = ep.aggregate_returns(returns, "monthly")
    yearly = ep.aggregate_returns(returns, "yearly")
    assert [(p.period_start.year, p.period_start.month) for p in ours.monthly] == list(
        monthly.index
    )
    assert [p.period_start.year for p in ours.yearly] == list(yearly.index)
    for p, want in zip(ours.monthly, monthly.to_numpy(), strict=True):
        assert _close(p.value, float(want)), (p, want)
    for p, want in zip(ours.yearly, yearly.to_numpy(), strict=True):
        assert _close(p.value, float(want)), (p, want)
    grid = qs.stats.monthly_returns(returns, eoy=True, compounded=True)
    for p in ours.monthly:
        want = grid.loc[str(p.period_start.year), MONTHS[p.period_start.month - 1]]
        assert _close(p.value, float(want)), (p, want)
    for p in ours.yearly:
        assert _close(p.value, float(grid.loc[str(p.period_start.year), "EOY"])), p
    counts = returns.groupby([returns.index.year, returns.index.month]).size()
    assert [p.n_returns for p in ours.monthly] == counts.tolist()
    assert sum(p.n_returns for p in ours.yearly) == returns.size


# ---------------------------------------------------------------------------
# The sample and its gapped copy
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sample_tables(sample) -> dict[str, t.SeriesTables]:
    symbols, prices, dates = sample
    return t.compute_tables(prices, dates, symbols, drawdowns=10, periods=True)


def test_sample_drawdown_tables_match_pyfolio_and_quantstats(sample, sample_tables) -> None:
    symbols, prices, dates = sample
    metrics = m.compute_metrics(prices, dates, symbols)
    for j, symbol in enumerate(symbols):
        returns, anchored = _series(prices[:, j], dates)
        ours = sample_tables[symbol].drawdowns
        assert len(ours) == 10, symbol
        _check_against_pyfolio(ours, anchored, 10)
        _check_against_quantstats(ours, returns)
        # The deepest row is the metric set's max drawdown, to the bit.
        dd = metrics[symbol].drawdown
        first = ours[0]
        assert (first.depth, first.peak_date, first.trough_date, first.recovery_date) == (
            dd.max_drawdown,
            dd.peak_date,
            dd.trough_date,
            dd.recovery_date,
        )
        assert (first.duration_periods, first.duration_days) == (
            dd.duration_periods,
            dd.duration_days,
        )
        # Deepest first; never overlapping.
        assert [d.depth for d in ours] == sorted(d.depth for d in ours)
        spans = sorted((d.peak_date, d.recovery_date or date.max) for d in ours)
        assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans))


def test_sample_period_tables_match_empyrical_and_quantstats(sample, sample_tables) -> None:
    symbols, prices, dates = sample
    metrics = m.compute_metrics(prices, dates, symbols)
    for j, symbol in enumerate(symbols):
        returns, _ = _series(prices[:, j], dates)
        ours = sample_tables[symbol]
        _check_periods(ours, returns)
        total = math.prod(1.0 + p.value for p in ours.yearly) - 1.0
        assert _close(total, metrics[symbol].total_return, 1e-12)
        # The data run from 1990-01-02 (the December move is missing) to 2022-12-28.
        partial = [(p.period_start, p.period_end) for p in ours.monthly if p.partial]
        assert partial == [
            (date(1990, 1, 1), date(1990, 1, 31)),
            (date(2022, 12, 1), date(2022, 12, 31)),
        ]
        assert [p.period_start.year for p in ours.yearly if p.partial] == [1990, 2022]


def test_gapped_tables_match_the_oracles_on_the_same_returns(gapped) -> None:
    names, prices, dates = gapped
    tables = t.compute_tables(prices, dates, names, drawdowns=20, periods=True)
    metrics = m.compute_metrics(prices, dates, names)
    for j, symbol in enumerate(names):
        returns, anchored = _series(prices[:, j], dates)
        ours = tables[symbol]
        _check_against_pyfolio(ours.drawdowns, anchored, 20)
        _check_against_quantstats(ours.drawdowns, returns)
        _check_periods(ours, returns)
        assert ours.drawdowns[0].depth == metrics[symbol].drawdown.max_drawdown
        assert ours.drawdowns[0].duration_periods == metrics[symbol].drawdown.duration_periods
    # JPM has no price from row 2000 to 2099: those months are absent, and the return
    # spanning the gap is booked in the month of the price that closes it.
    months = dates.astype("datetime64[M]")
    present = {np.datetime64(p.period_start, "M") for p in tables["JPM"].monthly}
    inside = set(months[2000:2100].tolist()) - {months[1999].item(), months[2100].item()}
    assert inside and not {np.datetime64(x, "M") for x in inside} & present
    assert months[2100] in present
    # AAPL (listed late) starts inside a month; XOM (delisted early) ends inside one.
    assert tables["AAPL"].monthly[0].partial and not tables["AAPL"].monthly[1].partial
    assert tables["XOM"].monthly[-1].partial and not tables["XOM"].monthly[-2].partial


def test_random_walks_match_pyfolio(tmp_path) -> None:
    rng = np.random.default_rng(2024)
    days = np.busday_offset("2020-01-01", np.arange(400), roll="forward").astype("datetime64[D]")
    prices = 100 * np.cumprod(1 + rng.normal(0.0002, 0.02, (400, 30)), axis=0)
    prices[rng.random((400, 30)) < 0.05] = np.nan
    names = [f"R{i}" for i in range(30)]
    tables = t.compute_tables(prices, days, names, drawdowns=50, periods=True)
    for j, name in enumerate(names):
        returns, anchored = _series(prices[:, j], days)
        _check_against_pyfolio(tables[name].drawdowns, anchored, 50)
        _check_periods(tables[name], returns)


# ---------------------------------------------------------------------------
# Synthetic edge cases
# ---------------------------------------------------------------------------


def _weekdays(n: int, start: str = "2024-01-01") -> np.ndarray:
    return np.busday_offset(start, np.arange(n), roll="forward").astype("datetime64[D]")


def _one(prices: list[float], top: int = 10, start: str = "2024-01-01") -> t.SeriesTables:
    days = _weekdays(len(prices), start)
    return t.compute_tables(np.array(prices, dtype=float), days, ["X"], drawdowns=top)["X"]


def _pyfolio(prices: list[float], top: int = 10, start: str = "2024-01-01") -> None:
    days = _weekdays(len(prices), start)
    ours = t.compute_tables(np.array(prices, dtype=float), days, ["X"], drawdowns=top)["X"]
    _, anchored = _series(np.array(prices, dtype=float), days)
    _check_against_pyfolio(ours.drawdowns, anchored, top)


def test_constant_prices_have_no_drawdown_and_zero_period_returns() -> None:
    flat = _one([100.0] * 60)
    assert flat.drawdowns == []
    assert all(p.value == 0.0 for p in flat.monthly + flat.yearly)
    # pyfolio lists one zero-depth "drawdown" (peak = valley = recovery = the first day).
    _, anchored = _series(np.full(60, 100.0), _weekdays(60))
    table = pft.gen_drawdown_table(anchored, top=3).dropna(subset=["Peak date"])
    assert table["Net drawdown in %"].tolist() == [0.0]


def test_one_bad_day() -> None:
    prices = [100.0] * 10 + [90.0] + [100.0] * 10
    (dd,) = _one(prices).drawdowns
    days = _weekdays(len(prices))
    assert dd.depth == pytest.approx(-0.1, rel=1e-12)
    assert dd.peak_date == days[9].astype(object)
    assert dd.trough_date == days[10].astype(object)
    assert dd.recovery_date == days[11].astype(object)
    assert (dd.periods_to_trough, dd.duration_periods) == (1, 2)
    _pyfolio(prices)


def test_never_recovered() -> None:
    prices = [100.0, 110.0, 105.0, 95.0, 90.0, 92.0, 91.0]
    (dd,) = _one(prices).drawdowns
    days = _weekdays(len(prices))
    assert not dd.recovered and dd.recovery_date is None
    assert dd.depth == pytest.approx(90 / 110 - 1, rel=1e-12)
    assert dd.peak_date == days[1].astype(object)
    assert dd.trough_date == days[4].astype(object)
    assert (dd.periods_to_trough, dd.duration_periods) == (3, 5)  # to the last return
    assert dd.duration_days == int((days[-1] - days[1]).astype(int))
    _pyfolio(prices)


def test_a_drawdown_still_open_at_the_end_is_listed_after_deeper_recovered_ones() -> None:
    prices = [100.0, 70.0, 100.0, 120.0, 110.0, 130.0, 125.0, 118.0]
    deep, open_end, small = _one(prices).drawdowns
    assert deep.depth == pytest.approx(-0.3, rel=1e-12) and deep.recovered
    assert open_end.depth == pytest.approx(118 / 130 - 1, rel=1e-12)
    assert not open_end.recovered
    assert small.depth == pytest.approx(110 / 120 - 1, rel=1e-12) and small.recovered
    _pyfolio(prices)


def test_equal_depths_keep_date_order() -> None:
    # Powers of two: the two falls are exactly -50% each, and the recoveries exact.
    prices = [100.0, 50.0, 100.0, 50.0, 100.0, 200.0, 100.0, 200.0]
    table = _one(prices).drawdowns
    assert [d.depth for d in table] == [-0.5, -0.5, -0.5]
    assert [d.peak_date for d in table] == sorted(d.peak_date for d in table)
    _pyfolio(prices)


def test_a_first_day_loss_counts_from_the_starting_value() -> None:
    prices = [100.0, 80.0, 90.0, 101.0, 99.0, 102.0]
    deep, small = _one(prices).drawdowns
    days = _weekdays(len(prices))
    assert deep.depth == pytest.approx(-0.2, rel=1e-12)
    assert small.depth == pytest.approx(99 / 101 - 1, rel=1e-12) and small.recovered
    assert deep.peak_date == days[0].astype(object)  # the first price
    assert (deep.periods_to_trough, deep.duration_periods) == (1, 3)
    _pyfolio(prices)
    # pyfolio on the bare returns starts at the first return: the first-day loss is gone.
    r = pd.Series(np.diff(prices) / np.array(prices[:-1]), index=pd.DatetimeIndex(days[1:]))
    table = pft.gen_drawdown_table(r, top=5).dropna(subset=["Peak date"])
    assert _day(table["Peak date"].iloc[0]) != deep.peak_date


def test_return_input_starting_on_row_zero() -> None:
    days = _weekdays(4)
    res = t.compute_tables(np.array([-0.1, 0.05, 0.06, -0.01]), days, ["R"], kind="returns")
    deep = res["R"].drawdowns[0]
    assert deep.peak_date == deep.trough_date == days[0].astype(object)
    assert (deep.periods_to_trough, deep.duration_periods) == (1, 3)
    assert res["R"].monthly[0].partial  # no dated starting value: partial


def test_table_size_limits_and_order() -> None:
    # Exact in binary floating point, so every return to 100 is exactly the peak again.
    prices = [100.0, 50.0, 100.0, 25.0, 100.0, 12.5, 100.0, 200.0, 150.0, 300.0]
    assert [d.depth for d in _one(prices, top=2).drawdowns] == [-0.875, -0.75]
    assert [d.depth for d in _one(prices, top=50).drawdowns] == [-0.875, -0.75, -0.5, -0.25]
    _pyfolio(prices, top=50)
    assert _one(prices, top=0).drawdowns == []
    for bad in (-1, t.MAX_DRAWDOWN_TABLE + 1):
        with pytest.raises(m.MetricsInputError) as err:
            _one(prices, top=bad)
        assert err.value.field == "drawdowns"


def test_partial_periods() -> None:
    # From the last weekday of January: February is complete; to Friday 2024-05-31.
    days = np.busday_offset("2024-01-31", np.arange(88), roll="forward").astype("datetime64[D]")
    assert str(days[-1]) == "2024-05-31"
    prices = 100 + np.arange(days.size, dtype=float)
    res = t.compute_tables(prices, days, ["P"], drawdowns=0)["P"]
    assert [p.period_start.month for p in res.monthly] == [2, 3, 4, 5]
    assert [p.partial for p in res.monthly] == [False, False, False, False]
    assert [p.partial for p in res.yearly] == [True]  # January's moves are missing
    # Ending on Thursday 2024-05-30 leaves Friday out: May is partial.
    res = t.compute_tables(prices[:-1], days[:-1], ["P"], drawdowns=0)["P"]
    assert [p.partial for p in res.monthly] == [False, False, False, True]
    # A month that ends on a weekend is complete on its last Friday (2024-08-30).
    days = np.busday_offset("2024-07-31", np.arange(23), roll="forward").astype("datetime64[D]")
    assert str(days[-1]) == "2024-08-30"
    res = t.compute_tables(100 + np.arange(23.0), days, ["P"], drawdowns=0)["P"]
    assert [(p.period_start, p.period_end, p.partial) for p in res.monthly] == [
        (date(2024, 8, 1), date(2024, 8, 31), False)
    ]


def test_five_hundred_symbols_ten_years_is_fast() -> None:
    import time

    rng = np.random.default_rng(5)
    days = _weekdays(2521, "2014-01-02")
    prices = 100 * np.cumprod(1 + rng.normal(0.0003, 0.015, (2521, 500)), axis=0)
    names = [f"S{i:03d}" for i in range(500)]
    best = math.inf
    for _ in range(3):
        started = time.perf_counter()
        out = t.compute_tables(prices, days, names, drawdowns=10, periods=True)
        best = min(best, time.perf_counter() - started)
    months = np.unique(days[1:].astype("datetime64[M]")).size
    assert len(out["S499"].monthly) == months and len(out["S499"].drawdowns) == 10
    assert best < 2.0, best  # ~0.15 s on 2 shared cores; generous for a loaded CI machine


# ---------------------------------------------------------------------------
# Over gRPC
# ---------------------------------------------------------------------------


def _same_drawdowns(got: list[pb.DrawdownPeriod], want: list[t.DrawdownPeriod]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.depth == w.depth
        assert date(g.peak_date.year, g.peak_date.month, g.peak_date.day) == w.peak_date
        assert date(g.trough_date.year, g.trough_date.month, g.trough_date.day) == w.trough_date
        assert g.recovered == w.recovered == g.HasField("recovery_date")
        if w.recovery_date is not None:
            r = g.recovery_date
            assert date(r.year, r.month, r.day) == w.recovery_date
        assert (g.periods_to_trough, g.days_to_trough) == (w.periods_to_trough, w.days_to_trough)
        assert (g.duration_periods, g.duration_days) == (w.duration_periods, w.duration_days)


def _same_periods(got: list[pb.CalendarPeriodReturn], want: list[t.TablePeriod]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.value == w.value
        assert (g.period_start.year, g.period_start.month, g.period_start.day) == (
            w.period_start.year,
            w.period_start.month,
            w.period_start.day,
        )
        assert g.period_end.day == w.period_end.day
        assert (g.return_count, g.partial) == (w.n_returns, w.partial)


async def test_compute_metrics_returns_the_engine_tables(analytics: Running) -> None:
    from tests.analytics.test_service_metrics import columns, d

    symbols = ["AAPL", "KO", "^GSPC"]
    request = pb.ComputeMetricsRequest(symbols=symbols, drawdown_table_size=7, period_returns=True)
    request.range.start.CopyFrom(d("2000-01-01"))
    reply = await analytics.stub.ComputeMetrics(
        request, metadata=analytics.keys.md(analytics.keys.reader_a)
    )
    prices, dates = columns(symbols)
    inside = dates >= np.datetime64("2000-01-01")
    want = t.compute_tables(prices[inside], dates[inside], symbols, drawdowns=7)
    for got in reply.metrics:
        _same_drawdowns(list(got.drawdown_periods), want[got.symbol].drawdowns)
        _same_periods(list(got.monthly_returns), want[got.symbol].monthly)
        _same_periods(list(got.yearly_returns), want[got.symbol].yearly)
        assert got.drawdown_periods[0].depth == got.drawdown.max_drawdown
    assert reply.conventions.table_rule == t.TABLE_RULE

    plain = await analytics.stub.ComputeMetrics(
        pb.ComputeMetricsRequest(symbols=["AAPL"]),
        metadata=analytics.keys.md(analytics.keys.reader_a),
    )
    assert not plain.metrics[0].drawdown_periods and not plain.metrics[0].monthly_returns
    assert plain.conventions.table_rule == ""


async def test_compute_portfolio_returns_the_tables_of_the_portfolio(analytics: Running) -> None:
    from tests.analytics.test_service_metrics import columns

    holdings = [pb.Holding(symbol="AAPL", weight=0.6), pb.Holding(symbol="KO", weight=0.4)]
    reply = await analytics.stub.ComputePortfolio(
        pb.ComputePortfolioRequest(holdings=holdings, drawdown_table_size=5, period_returns=True),
        metadata=analytics.keys.md(analytics.keys.reader_a),
    )
    prices, dates = columns(["AAPL", "KO"])
    analysis = m.analyse_portfolio(prices, dates, ["AAPL", "KO"], [0.6, 0.4], "monthly")
    want = t.compute_tables(
        analysis.returns, analysis.dates, ["portfolio"], kind="returns", drawdowns=5
    )["portfolio"]
    _same_drawdowns(list(reply.metrics.drawdown_periods), want.drawdowns)
    _same_periods(list(reply.metrics.monthly_returns), want.monthly)
    _same_periods(list(reply.metrics.yearly_returns), want.yearly)
    assert reply.metrics.drawdown_periods[0].depth == reply.metrics.drawdown.max_drawdown
    assert reply.conventions.table_rule == t.TABLE_RULE


async def test_out_of_range_table_sizes_name_the_field(analytics: Running) -> None:
    from libs.common.errors import status_info

    md = analytics.keys.md(analytics.keys.reader_a)
    for request, call in (
        (pb.ComputeMetricsRequest(symbols=["AAPL"], drawdown_table_size=51), "ComputeMetrics"),
        (pb.ComputeMetricsRequest(symbols=["AAPL"], drawdown_table_size=-1), "ComputeMetrics"),
        (
            pb.ComputePortfolioRequest(
                holdings=[pb.Holding(symbol="AAPL", weight=1.0)], drawdown_table_size=99
            ),
            "ComputePortfolio",
        ),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await getattr(analytics.stub, call)(request, metadata=md)
        info = status_info(err.value)
        assert info.code == grpc.StatusCode.INVALID_ARGUMENT
        assert [v.field for v in info.field_violations] == ["drawdown_table_size"]
        assert "0-50" in info.field_violations[0].description
