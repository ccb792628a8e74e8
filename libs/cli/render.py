"""Turning responses into what people read (tables) and what scripts read (plain JSON).

`plain()` is the `--json` form of any protobuf message: field names as in the proto,
int64 as numbers (not strings, unlike the canonical proto JSON mapping), dates as
`YYYY-MM-DD`, timestamps as RFC 3339, money as `{"currency", "amount"}`, enums by
name, and NaN ("undefined" in the analytics contract) as `null`.
"""

from __future__ import annotations

import math
from datetime import UTC, date, datetime
from typing import Any

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from google.type import date_pb2, money_pb2


def pb_date(value: date) -> date_pb2.Date:
    return date_pb2.Date(year=value.year, month=value.month, day=value.day)


def from_pb_date(value: date_pb2.Date) -> date | None:
    if value.year == 0 or value.month == 0 or value.day == 0:
        return None
    return date(value.year, value.month, value.day)


def money_amount(value: money_pb2.Money) -> float:
    return value.units + value.nanos / 1e9


def _scalar(fd: Any, value: Any) -> Any:
    if fd.type == FieldDescriptor.TYPE_ENUM:
        known = fd.enum_type.values_by_number.get(value)
        return known.name if known is not None else value
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, bytes):
        return value.hex()
    return value


def _message(value: Message) -> Any:
    name = value.DESCRIPTOR.full_name
    if name == "google.type.Date":
        day = from_pb_date(value)  # type: ignore[arg-type]
        return day.isoformat() if day else None
    if name == "google.type.Money":
        return {"currency": value.currency_code, "amount": money_amount(value)}  # type: ignore[attr-defined]
    if name == "google.protobuf.Timestamp":
        seconds = value.seconds + value.nanos / 1e9  # type: ignore[attr-defined]
        return datetime.fromtimestamp(seconds, UTC).isoformat().replace("+00:00", "Z")
    return plain(value)


def plain(message: Message) -> dict[str, Any]:
    """The message as JSON-ready Python values (see the module docstring)."""
    out: dict[str, Any] = {}
    for fd in message.DESCRIPTOR.fields:
        value = getattr(message, fd.name)
        if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
            value_fd = fd.message_type.fields_by_name["value"]
            out[fd.name] = {
                k: _message(v) if value_fd.message_type else _scalar(value_fd, v)
                for k, v in value.items()
            }
        elif fd.is_repeated:
            out[fd.name] = [_message(v) if fd.message_type else _scalar(fd, v) for v in value]
        elif fd.containing_oneof is not None and not message.HasField(fd.name):
            continue  # only the member of a oneof that is set
        elif fd.message_type is not None:
            out[fd.name] = _message(value) if message.HasField(fd.name) else None
        else:
            out[fd.name] = _scalar(fd, value)
    return out


# -- human formats ---------------------------------------------------------------------------
def pct(value: float, digits: int = 2) -> str:
    """A fraction as a percentage; NaN ("undefined") as n/a."""
    return "n/a" if not math.isfinite(value) else f"{value * 100:.{digits}f}%"


def num(value: float, digits: int = 2) -> str:
    return "n/a" if not math.isfinite(value) else f"{value:.{digits}f}"


def day(value: date_pb2.Date) -> str:
    parsed = from_pb_date(value)
    return parsed.isoformat() if parsed else "-"


def usd(value: float | None, digits: int = 6) -> str:
    return "n/a" if value is None else f"${value:,.{digits}f}"


def short_enum(name: str, prefix: str) -> str:
    """COMMENTARY_SOURCE_LLM -> LLM."""
    return name.removeprefix(prefix)
