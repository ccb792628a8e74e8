"""`finsight ingest / metrics / portfolio` against the real services, tables and --json."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from matplotlib.image import imread

from finsight.analytics.v1 import analytics_pb2 as pb
from finsight.analytics.v1 import analytics_pb2_grpc
from tests.cli.conftest import BENCHMARK, DAYS, Stack, synthetic_closes, trading_days
from tests.conftest import free_port

LONG = """symbol,date,open,high,low,close,adj close,volume
IGA,2024-01-02,10.5,11,10,10.75,10.7,100
IGA,2024-01-03,10.75,11.25,10.5,11,10.95,200
IGA,2024-01-04,11,11.5,10.9,11.2,11.15,300
IGB,2024-01-02,0.1234567,1,0.1,0.5,0.5,10
IGB,2024-01-03,1.5,1.2,1.0,1.1,1.1,10
IGB,2024-01-04,1.1,1.2,1.0,1.1,1.1,abc
IGB,2024-01-05,1.100001,1.2,1.0,1.1,1.1,10
"""


async def stored_closes(stack: Stack, symbol: str) -> list[int] | None:
    """adj_close_micros of a symbol as the service stores them; None when it has none."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{stack.ports['analytics']}") as channel:
        call = analytics_pb2_grpc.AnalyticsServiceStub(channel).GetBars(
            pb.GetBarsRequest(symbol=symbol),
            metadata=(("authorization", f"Bearer {stack.keys.admin}"),),
        )
        try:
            return [c for chunk in [m async for m in call] for c in chunk.bars.adj_close_micros]
        except grpc.aio.AioRpcError as err:
            assert err.code() == grpc.StatusCode.NOT_FOUND
            return None


def png_pixels(path: Path) -> Any:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return imread(path)


# -- ingest ----------------------------------------------------------------------------------
async def test_ingest_refuses_day_month_dates_unless_told_the_order(
    cli: Any, stack: Stack, tmp_path: Path
) -> None:
    path = tmp_path / "eu.csv"
    path.write_text("date,symbol,close\n01/05/2024,IGDMY,10\n02/05/2024,IGDMY,11\n")
    r = await cli("ingest", str(path))
    assert r.code == 2 and "Traceback" not in r.err
    assert "--date-format mdy" in " ".join(r.err.split())
    assert await stored_closes(stack, "IGDMY") is None  # nothing written
    r = await cli("--json", "ingest", str(path), "--date-format", "dmy")
    assert r.code == 0, r.err
    sheet = tmp_path / "prices.xlsx"
    sheet.write_bytes(b"PK\x03\x04")
    r = await cli("ingest", str(sheet))
    assert r.code == 2 and "unsupported format .xlsx" in r.err


async def test_ingest_reports_parser_and_service_rejections(
    cli: Any, stack: Stack, tmp_path: Path
) -> None:
    path = tmp_path / "long.csv"
    path.write_text(LONG)
    r = await cli("ingest", str(path))
    assert r.code == 1  # rows were rejected
    assert "Traceback" not in r.err
    for cell in ("inserted", "unchanged", "3 (2 parser, 1 service)", "First rejected rows"):
        assert cell in r.out
    assert "non-numeric volume" in r.out and "volume='abc'" in r.out
    # The line column is the file's line as an editor shows it (header = line 1).
    assert any(row.split("│")[2].strip() == "7" for row in r.out.splitlines() if "abc" in row)
    assert "more than 6 decimal places" in r.out  # never rounded
    assert "open outside [low, high]" in r.out  # the service's reason, markup-safe
    assert await stored_closes(stack, "IGA") == [10_700_000, 10_950_000, 11_150_000]
    assert await stored_closes(stack, "IGB") == [1_100_000]

    # The same file again: nothing changes, and --json says so.
    r = await cli("--json", "ingest", str(path))
    summary = r.json()
    assert r.code == 1
    assert (summary["inserted"], summary["updated"], summary["unchanged"]) == (0, 0, 4)
    assert (summary["rejected_by_parser"], summary["rejected_by_service"]) == (2, 1)
    assert summary["written"] is True
    first = summary["rejections"][0]
    assert first["source"] == "parser" and first["value"] == "abc"
    assert (first["line"], first["row"]) == (7, 6)  # line 7 in an editor, data row 6
    service = [x for x in summary["rejections"] if x["source"] == "service"]
    assert service == [
        {
            "source": "service",
            "line": None,
            "row": None,
            "symbol": "IGB",
            "date": "2024-01-03",
            "reason": "open outside [low, high]",
            "column": None,
            "value": None,
        }
    ]


async def test_ingest_wide_parquet_updates(cli: Any, stack: Stack, tmp_path: Path) -> None:
    def write(values: list[float | None]) -> Path:
        table = pa.table(
            {
                "Date": pa.array(["2024-01-02", "2024-01-03", "2024-01-04"]),
                "IGW1": pa.array(values),
                "IGW2": pa.array([100.0, 101.5, 99.75]),
            }
        )
        path = tmp_path / "wide.parquet"
        pq.write_table(table, path)
        return path

    r = await cli("--json", "ingest", str(write([1.5, 1.25, None])), "--layout", "wide")
    assert r.code == 0, r.err
    assert r.json()["inserted"] == 5 and r.json()["rejected"] == 0
    r = await cli("--json", "ingest", str(write([1.5, 1.3, None])), "--layout", "wide")
    assert (r.json()["inserted"], r.json()["updated"], r.json()["unchanged"]) == (0, 1, 4)
    assert await stored_closes(stack, "IGW1") == [1_500_000, 1_300_000]


async def test_reject_all_writes_nothing(cli: Any, stack: Stack, tmp_path: Path) -> None:
    # A row the parser rejects in the second message, after valid rows were streamed: the
    # stream is cancelled before it could commit.
    path = tmp_path / "parser.csv"
    path.write_text(LONG.replace("IGA", "IGR1").replace("IGB", "IGR2"))
    r = await cli("--json", "ingest", str(path), "--reject-all", "--batch-rows", "3")
    assert r.code == 1
    assert r.json()["sent"] == 3  # the IGR1 rows went out
    assert r.json()["written"] is False and r.json()["rejected_by_parser"] >= 1
    assert await stored_closes(stack, "IGR1") is None
    r = await cli("ingest", str(path), "--reject-all")
    assert "nothing written" in r.out

    # Only the service finds the bad row: INVALID_ARGUMENT naming it, nothing written.
    clean = "\n".join(
        line for line in LONG.splitlines() if "abc" not in line and "0.1234567" not in line
    )
    path = tmp_path / "service.csv"
    path.write_text(clean.replace("IGA", "IGR3").replace("IGB", "IGR4") + "\n")
    r = await cli("ingest", str(path), "--reject-all")
    assert r.code == 1
    assert "INVALID_ARGUMENT" in r.err and "open outside [low, high]" in r.err
    assert "rows[" in r.err and "Traceback" not in r.err
    assert await stored_closes(stack, "IGR3") is None


async def test_ingest_errors_in_plain_words(cli: Any, stack: Stack, tmp_path: Path) -> None:
    r = await cli("ingest", str(tmp_path / "missing.csv"))
    assert r.code == 2 and "no such file" in r.err and "Traceback" not in r.err

    path = tmp_path / "long.csv"
    path.write_text(LONG.replace("IGA", "IGP"))
    r = await cli("ingest", str(path), key=stack.keys.reader)
    assert r.code == 1
    assert "PERMISSION_DENIED" in r.err and "analytics.write" in r.err
    assert "Traceback" not in r.err
    assert await stored_closes(stack, "IGP") is None


# -- metrics ---------------------------------------------------------------------------------
async def test_metrics_json_matches_the_data(cli: Any) -> None:
    r = await cli("--json", "metrics", "CLIX", "CLIY", "--benchmark", BENCHMARK, "--rf", "2%")
    assert r.code == 0, r.err
    data = r.json()
    assert [m["symbol"] for m in data["metrics"]] == ["CLIX", "CLIY"]
    assert data["conventions"]["risk_free_rate_annual"] == pytest.approx(0.02)
    for seed, m in enumerate(data["metrics"]):
        closes = np.asarray(synthetic_closes(seed, DAYS), dtype=float)
        assert m["return_count"] == DAYS - 1
        assert m["total_return"] == pytest.approx(closes[-1] / closes[0] - 1, rel=1e-9)
        running_max = np.maximum.accumulate(closes)
        expected_dd = float((closes / running_max - 1).min())
        assert m["drawdown"]["max_drawdown"] == pytest.approx(expected_dd, rel=1e-9)
        assert m["start_date"] == "2023-01-02"
        assert m["relative"]["benchmark"] == BENCHMARK
        assert m["relative"]["common_periods"] == DAYS - 1


async def test_metrics_table(cli: Any) -> None:
    r = await cli("metrics", "CLIX", "--from", "2023-03-01", "--to", "2023-06-30")
    assert r.code == 0, r.err
    for cell in ("Metrics", "CLIX", "total return", "Sharpe", "max drawdown", "VaR 95% / 99%"):
        assert cell in r.out
    assert "2023-03-01 → 2023-06-30" in r.out
    closes = np.asarray(synthetic_closes(0, DAYS), dtype=float)
    days = [d.isoformat() for d in trading_days(DAYS)]
    inside = [c for d, c in zip(days, closes, strict=True) if "2023-03-01" <= d <= "2023-06-30"]
    assert f"{(inside[-1] / inside[0] - 1) * 100:.2f}%" in r.out
    assert "beta" not in r.out  # no benchmark requested


async def test_metrics_plot_writes_a_png(cli: Any, tmp_path: Path) -> None:
    path = tmp_path / "metrics.png"
    r = await cli("metrics", "CLIX", "CLIZ", "--benchmark", BENCHMARK, "--plot", str(path))
    assert r.code == 0, r.err
    assert f"chart written to {path}" in r.out
    pixels = png_pixels(path)
    assert pixels.shape[0] > 500 and pixels.shape[1] > 800
    # Not a blank canvas: matplotlib's C0 blue (CLIX's line) is drawn.
    blue = np.array([0x1F, 0x77, 0xB4]) / 255
    assert (np.abs(pixels[..., :3] - blue).max(axis=-1) < 0.02).sum() > 200
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary file left behind


async def test_unknown_symbol_is_not_found_in_plain_words(cli: Any, tmp_path: Path) -> None:
    path = tmp_path / "never.png"
    r = await cli("metrics", "CLIX", "NOSUCH", "--plot", str(path))
    assert r.code == 1
    assert r.out == ""
    assert "NOT_FOUND" in r.err and "UNKNOWN_SYMBOL" in r.err and "NOSUCH" in r.err
    assert "Traceback" not in r.err
    assert not path.exists()

    r = await cli("--json", "metrics", "NOSUCH")
    error = r.json()["error"]
    assert r.code == 1
    assert (error["code"], error["reason"]) == ("NOT_FOUND", "UNKNOWN_SYMBOL")
    assert error["metadata"]["symbols"] == "NOSUCH"


async def test_usage_errors_exit_2(cli: Any) -> None:
    r = await cli("metrics", "CLIX", "--from", "2023-13-01")
    assert r.code == 2 and "not a date" in r.err
    r = await cli("metrics")
    assert r.code == 2 and "Traceback" not in r.err
    r = await cli("portfolio", "CLIX=abc")
    assert r.code == 2 and "not a number" in r.err


async def test_unreachable_service_is_unavailable(
    cli: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = free_port()
    monkeypatch.setenv("ANALYTICS_GRPC_PORT", str(port))
    r = await cli("--timeout", "5", "metrics", "CLIX")
    assert r.code == 1
    assert "UNAVAILABLE" in r.err and "Traceback" not in r.err
    text = " ".join(r.err.split())
    assert f"nothing answered at 127.0.0.1:{port} (analytics)" in text
    assert "is the suite running? Start it with `make run`" in text
    assert "--analytics-target" in text


async def test_target_options_choose_the_address(cli: Any, stack: Stack) -> None:
    nowhere = f"127.0.0.1:{free_port()}"
    here = f"127.0.0.1:{stack.ports['analytics']}"
    r = await cli("--timeout", "5", "symbols", "--analytics-target", nowhere)
    assert r.code == 1 and nowhere in " ".join(r.err.split())
    r = await cli("--timeout", "5", "--target", nowhere, "symbols", "--analytics-target", here)
    assert r.code == 0, r.err  # the per-service option beats --target
    r = await cli("--timeout", "5", "symbols", "--target", nowhere)
    assert r.code == 1 and nowhere in " ".join(r.err.split())


async def test_an_unreadable_key_file_is_a_usage_error_naming_it(
    cli: Any, stack: Stack, tmp_path: Path
) -> None:
    missing = tmp_path / "nope"
    for argv in (("--key-file", str(missing), "symbols"), ("symbols", "--key-file", str(missing))):
        r = await cli(*argv)
        assert r.code == 2, (argv, r.err)
        assert str(missing) in " ".join(r.err.split()) and "Traceback" not in r.err
    empty = tmp_path / "empty"
    empty.write_text("\n")
    r = await cli("symbols", "--key-file", str(empty))
    assert r.code == 2 and "empty" in r.err
    # A readable one is used, before or after the command, over FINSIGHT_API_KEY.
    good = tmp_path / "key"
    good.write_text(stack.keys.admin + "\n")
    r = await cli("--json", "symbols", "--key-file", str(good), key="fsk_wrong")
    assert r.code == 0, r.err


async def test_a_refused_or_missing_key_says_where_the_cli_looked(
    cli: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    r = await cli("symbols", key="fsk_not_a_key")
    assert r.code == 1 and "UNAUTHENTICATED" in r.err
    assert "the key from FINSIGHT_API_KEY was refused" in " ".join(r.err.split())
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FINSIGHT_DATA_DIR", raising=False)
    r = await cli("symbols", key="")
    text = " ".join(r.err.split())
    assert r.code == 1 and "no API key was sent" in text
    assert "FINSIGHT_API_KEY (not set)" in text and "--key-file (not given)" in text
    assert f"{tmp_path / 'var' / 'dev-api-key'} (not found" in text


# -- portfolio -------------------------------------------------------------------------------
async def test_portfolio_json_and_tables(cli: Any) -> None:
    r = await cli("--json", "portfolio", "CLIX=0.5", "CLIY=30%", "CLIZ=0.2", "--rebalance", "none")
    assert r.code == 0, r.err
    data = r.json()
    assert data["rebalance"] == "REBALANCE_NONE"
    assert [c["symbol"] for c in data["risk_contributions"]] == ["CLIX", "CLIY", "CLIZ"]
    assert [c["weight"] for c in data["risk_contributions"]] == pytest.approx([0.5, 0.3, 0.2])
    assert sum(c["share"] for c in data["risk_contributions"]) == pytest.approx(1.0)
    assert sum(c["contribution"] for c in data["risk_contributions"]) == pytest.approx(
        data["portfolio_volatility"]
    )
    corr = np.asarray(data["correlation"]["values"]).reshape(3, 3)
    assert np.allclose(np.diag(corr), 1.0) and np.allclose(corr, corr.T)
    assert "returns" not in data

    # Buy and hold: the total return is the weighted sum of the assets' total returns.
    closes = [np.asarray(synthetic_closes(seed, DAYS), dtype=float) for seed in range(3)]
    expected = sum(w * (c[-1] / c[0]) for w, c in zip((0.5, 0.3, 0.2), closes, strict=True)) - 1
    assert data["metrics"]["total_return"] == pytest.approx(expected, rel=1e-9)

    r = await cli("portfolio", "CLIX=0.5", "CLIY=0.5", "--benchmark", BENCHMARK)
    assert r.code == 0, r.err
    flat = " ".join(r.out.split())
    assert "volatility at the target weights" in flat and "realised volatility" in flat
    for cell in ("Portfolio metrics", "Risk contributions", "Correlation",
                 "rebalanced monthly", f"beta vs {BENCHMARK}", "50.0%"):  # fmt: skip
        assert cell in r.out


async def test_portfolio_bad_weights_are_field_violations(cli: Any) -> None:
    r = await cli("portfolio", "CLIX=0.5", "CLIY=0.6")
    assert r.code == 1
    assert "INVALID_ARGUMENT" in r.err and "- holdings" in r.err and "sum" in r.err
    assert "Traceback" not in r.err

    r = await cli("--json", "portfolio", "CLIX=1.5", "CLIY=-0.5")
    error = r.json()["error"]
    assert error["code"] == "INVALID_ARGUMENT"
    assert any("holdings" in v["field"] for v in error["field_violations"])


async def test_portfolio_plot_heat_map(cli: Any, tmp_path: Path) -> None:
    path = tmp_path / "portfolio.png"
    r = await cli("--json", "portfolio", "CLIX=0.6", "CLIZ=0.4", "--plot", str(path))
    assert r.code == 0, r.err
    assert r.json()["plot"] == str(path)
    pixels = png_pixels(path)
    # The heat map's diagonal (correlation 1) is drawn in the darkest red of RdBu_r.
    dark_red = np.array([0x67, 0x00, 0x1F]) / 255
    assert (np.abs(pixels[..., :3] - dark_red).max(axis=-1) < 0.03).sum() > 1000
    assert not math.isnan(float(pixels.mean()))


async def test_symbols(cli: Any) -> None:
    r = await cli("--json", "symbols", "CLI")
    assert r.code == 0, r.err
    rows = {s["symbol"]: s for s in r.json()["symbols"]}
    assert set(rows) == {"CLIX", "CLIY", "CLIZ", BENCHMARK}
    assert rows["CLIX"]["bar_count"] == DAYS and rows["CLIX"]["first_date"] == "2023-01-02"
    assert rows["CLIX"]["source"] == "DATA_SOURCE_TENANT"
    r = await cli("symbols", "CLIZ")
    assert "CLIZ" in r.out and "2023-01-02" in r.out and "tenant" in r.out and "CLIX" not in r.out
