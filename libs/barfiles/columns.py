"""Reader bars (exact decimals) -> per-symbol integer columns, for the wire and the loader.

Shared by the ingest client (libs/barfiles/ingest.py, which sends the columns over
IngestBars) and the analytics service's sample data loader (which writes them directly).
Prices become micro-units (1e-6), the unit of the wire's `*_micros` fields and of the
service's DECIMAL(18,6) columns: a price with more than 6 decimals cannot be carried
exactly, so such a row is rejected with a reason, never rounded.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date
from decimal import Decimal
from typing import Final

from libs.barfiles.reader import Bar

PRICE_SCALE: Final = 6  # micro-units: the wire's *_micros fields


def decimal_to_micros(value: Decimal) -> int | None:
    """Exact micro-units of a decimal price, or None when it has more than 6 decimals."""
    scaled = value.scaleb(PRICE_SCALE)
    integral = scaled.to_integral_value()
    if scaled != integral:
        return None
    return int(integral)


@dataclass(slots=True)
class SymbolColumns:
    """One symbol's rows as plain lists (cheap to extend, converted once)."""

    symbol: str
    days: list[date] = field(default_factory=list)
    open: list[int] = field(default_factory=list)
    high: list[int] = field(default_factory=list)
    low: list[int] = field(default_factory=list)
    close: list[int] = field(default_factory=list)
    adj_close: list[int] = field(default_factory=list)
    volume: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.days)


@dataclass(frozen=True, slots=True)
class TooPrecise:
    symbol: str
    day: date
    reason: str


class MicrosConverter:
    """Decimal -> micro-units with a memo: price files repeat the same values a lot."""

    def __init__(self) -> None:
        self._memo: dict[Decimal, int | None] = {}

    def __call__(self, value: Decimal) -> int | None:
        try:
            return self._memo[value]
        except KeyError:
            out = self._memo[value] = decimal_to_micros(value)
            if len(self._memo) > 1_000_000:
                self._memo.clear()
            return out


def group_by_symbol(
    bars: Sequence[Bar], convert: MicrosConverter | None = None
) -> tuple[list[SymbolColumns], list[TooPrecise]]:
    """Group bars by symbol (first-seen order); reject prices with more than 6 decimals."""
    convert = convert or MicrosConverter()
    groups: dict[str, SymbolColumns] = {}
    rejected: list[TooPrecise] = []
    for bar in bars:
        prices = [
            convert(bar.open),
            convert(bar.high),
            convert(bar.low),
            convert(bar.close),
            convert(bar.adj_close),
        ]
        if any(p is None for p in prices):
            rejected.append(
                TooPrecise(bar.symbol, bar.date, "price has more than 6 decimal places")
            )
            continue
        g = groups.get(bar.symbol)
        if g is None:
            g = groups[bar.symbol] = SymbolColumns(bar.symbol)
        g.days.append(bar.date)
        g.open.append(prices[0])  # type: ignore[arg-type]
        g.high.append(prices[1])  # type: ignore[arg-type]
        g.low.append(prices[2])  # type: ignore[arg-type]
        g.close.append(prices[3])  # type: ignore[arg-type]
        g.adj_close.append(prices[4])  # type: ignore[arg-type]
        g.volume.append(bar.volume)
    return list(groups.values()), rejected
