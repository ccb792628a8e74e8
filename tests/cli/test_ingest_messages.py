"""`finsight ingest` speaks the command line: flags, not request fields or Python keywords.

No services needed: these problems are found before anything is sent.
"""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from grpc.aio import AioRpcError, Metadata

from libs.barfiles.ingest import RowRejection, field_flag
from libs.cli.connection import Connection, describe_error
from libs.cli.main import main
from libs.common.errors import InvalidArgument
from services.analytics.importer_cli import parse_args


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(argv)
    return code, " ".join(capsys.readouterr().err.split())


@pytest.mark.parametrize("flag", ["--batch-rows", "--stream-rows"])
def test_zero_rows_per_message_or_stream_is_a_usage_error(
    flag: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # --stream-rows 0 used to loop for ever sending empty streams; --batch-rows 0 said
    # "batch_size must be positive".
    path = tmp_path / "bars.csv"
    path.write_text("date,symbol,close\n2024-01-02,A,1\n")
    code, err = run(["ingest", str(path), flag, "0"], capsys)
    assert code == 2
    assert f"argument {flag}: must be at least 1, got 0" in err
    with pytest.raises(SystemExit):
        parse_args([str(path), flag, "0"])  # the same options in importer_cli


def test_file_problems_name_the_flag(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FINSIGHT_API_KEY", "k-unused")  # refused before any call
    ohlcv = tmp_path / "index.csv"
    ohlcv.write_text("Date,Open,High,Low,Close,Adj Close,Volume\n2024-01-02,1,2,1,2,2,5\n")
    code, err = run(["ingest", str(ohlcv)], capsys)
    assert code == 2 and "give --symbol for a single-symbol file" in err
    assert "symbol=" not in err

    misspelt = tmp_path / "typo.csv"
    misspelt.write_text("symbol,date,close,Adj Closing\nA,2024-01-02,1,1\n")
    code, err = run(["ingest", str(misspelt)], capsys)
    assert code == 2
    assert "unknown column 'Adj Closing': did you mean adj_close?" in err
    assert "accepted: date, open, high, low, close, adj_close, volume, symbol" in err


def _too_many_rows() -> AioRpcError:
    """The service's answer to a stream past its row limit (servicer.IngestBars)."""
    error = InvalidArgument.field(
        "messages[3]",
        "the stream exceeds 10 rows; split it into several IngestBars calls (nothing was written)",
    )
    details = error.to_status().SerializeToString()
    return AioRpcError(
        grpc.StatusCode.INVALID_ARGUMENT,
        Metadata(),
        Metadata(("grpc-status-details-bin", details)),
        details=str(error),
    )


def test_a_stream_field_violation_names_the_flag_that_sizes_the_stream() -> None:
    conn = Connection("127.0.0.1", None, None, 5.0)
    _, lines = describe_error(_too_many_rows(), conn)
    assert "  - messages[3]: the stream exceeds 10 rows" in "\n".join(lines)  # no command's flags

    conn.field_flag = lambda name: field_flag(name, reject_all=False)
    text = "\n".join(describe_error(_too_many_rows(), conn)[1])
    assert "  - --stream-rows (bars per IngestBars stream: give a smaller number): the " in text
    assert "  - messages[3]" not in text  # (the status message above keeps the server's words)

    conn.field_flag = lambda name: field_flag(name, reject_all=True)
    text = "\n".join(describe_error(_too_many_rows(), conn)[1])
    assert "  - --reject-all (the whole file is one IngestBars stream" in text
    # Row-level violations have no flag: they keep the field.
    assert field_flag("messages[0].series[1].rows[2]", reject_all=True) is None


def test_rejections_describe_the_editor_line() -> None:
    csv_row = RowRejection("parser", "non-numeric price", "A", None, 2, "close", "ten", 3)
    assert csv_row.describe() == "line 3: non-numeric price (close='ten')"
    malformed = RowRejection("parser", "expected 3 fields, got 2", None, None, None, None, "A,1", 7)
    assert malformed.describe() == "line 7: expected 3 fields, got 2 ('A,1')"
    parquet = RowRejection("parser", "non-numeric price", "X", None, 2, "X", "y")
    assert parquet.describe() == "row 2: non-numeric price (X='y')"
