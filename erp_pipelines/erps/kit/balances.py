"""Monthly balances from closing balances at month ends, for ERPs that report only those
(closing balances at a date): written once, so every such connector derives them alike."""

from __future__ import annotations

import datetime as dt
import itertools
from decimal import Decimal

from erp_pipelines.model import Balance, add_months

ZERO = Decimal("0.00")
FIRST_PROFIT_AND_LOSS_ACCOUNT = 3000  # NS 4102: classes 3-8


def month_ends(months: list[dt.date]) -> list[dt.date]:
    """The last day of the month before the window, then of every month in it."""
    if not months:
        return []
    return [add_months(month, 1) - dt.timedelta(days=1) for month in (add_months(months[0], -1), *months)]


def balances_from_closings(
    months: list[dt.date], closings: list[dict[str, Decimal]], *, fiscal_year_start_month: int = 1,
) -> list[Balance]:
    """`closings[i]`: account → closing balance at `month_ends(months)[i]`. Opening = the previous
    month's closing, except profit and loss (year to date in these ERPs), which opens at zero in the
    first month of a fiscal year; movement = closing − opening."""
    balances = []
    for (before, after), month in zip(itertools.pairwise(closings), months, strict=True):
        year_starts = month.month == fiscal_year_start_month
        for number in sorted(set(before) | set(after)):
            restarts = year_starts and _is_profit_and_loss(number)
            opening = ZERO if restarts else before.get(number, ZERO)
            closing = after.get(number, ZERO)
            balances.append(Balance(month, number, opening, closing - opening, closing))
    return balances


def _is_profit_and_loss(number: str) -> bool:
    digits = number[:4]
    return digits.isdigit() and int(digits) >= FIRST_PROFIT_AND_LOSS_ACCOUNT
