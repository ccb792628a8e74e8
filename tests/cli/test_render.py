"""`plain()`: the --json form of protobuf messages (no services needed)."""

from __future__ import annotations

import json
import math

from google.protobuf import timestamp_pb2
from google.type import money_pb2

from finsight.analytics.v1 import analytics_pb2 as pb
from finsight.llm.v1 import llm_gateway_pb2
from finsight.memory.v1 import memory_pb2
from libs.cli.render import pct, plain


def test_numbers_dates_enums_and_undefined_values() -> None:
    m = pb.SeriesMetrics(symbol="X", return_count=2**40, sharpe=math.nan, total_return=0.25)
    m.start_date.year, m.start_date.month, m.start_date.day = 2024, 2, 29
    data = plain(m)
    assert data["return_count"] == 2**40  # a number, not the proto-JSON string
    assert data["sharpe"] is None  # NaN = undefined
    assert data["start_date"] == "2024-02-29"
    assert data["end_date"] is None and data["relative"] is None  # unset messages
    assert data["drawdown"] is None
    json.dumps(data, allow_nan=False)  # strict JSON

    reply = pb.AnalyzeResponse(commentary_source=pb.COMMENTARY_SOURCE_RULES, warnings=["w"])
    assert plain(reply)["commentary_source"] == "COMMENTARY_SOURCE_RULES"
    assert plain(reply)["warnings"] == ["w"]


def test_money_timestamps_maps_and_oneofs() -> None:
    usage = llm_gateway_pb2.GetUsageResponse(
        total_cost=money_pb2.Money(currency_code="USD", units=1, nanos=250_000_000)
    )
    assert plain(usage)["total_cost"] == {"currency": "USD", "amount": 1.25}
    msg = memory_pb2.StoredMessage(
        message_id="m", metadata={"k": "v"}, create_time=timestamp_pb2.Timestamp(seconds=0)
    )
    data = plain(msg)
    assert data["metadata"] == {"k": "v"}
    assert data["create_time"] == "1970-01-01T00:00:00Z"
    item = memory_pb2.ExportUserDataResponse(fact=memory_pb2.Fact(fact_id="f"))
    assert list(plain(item)) == ["fact"]  # only the oneof member that is set


def test_pct() -> None:
    assert pct(0.12345) == "12.35%" and pct(math.nan) == "n/a" and pct(-0.5, 0) == "-50%"


def test_metrics_table_states_the_common_window_and_why_relative_figures_are_missing() -> None:
    from google.type import date_pb2
    from rich.console import Console

    from libs.cli.analytics_cmds import metrics_table

    def day(y: int, m: int, d: int) -> date_pb2.Date:
        return date_pb2.Date(year=y, month=m, day=d)

    shared = pb.SeriesMetrics(symbol="AAPL", return_count=2011)
    shared.relative.CopyFrom(
        pb.BenchmarkRelative(
            benchmark="^GSPC",
            beta=1.2,
            common_periods=1005,
            first_common_date=day(2015, 1, 5),
            last_common_date=day(2018, 12, 31),
        )
    )
    alone = pb.SeriesMetrics(
        symbol="KO", return_count=2011, relative_unavailable="the benchmark ^GSPC has no data"
    )
    console = Console(width=200, record=True)
    console.print(metrics_table([shared, alone], "Metrics"))
    text = console.export_text()
    assert "common window vs ^GSPC" in text and "2015-01-05 → 2018-12-31" in text
    beta = next(line for line in text.splitlines() if "beta vs ^GSPC" in line)
    assert "1.20" in beta and "n/a" in beta  # KO's cell is n/a, not the proto default 0.00
    assert "no relative figures for KO: the benchmark ^GSPC has no data" in text
