"""Monthly balances and reconciliation of one parsed SAF-T file.

Balances: per account, opening = OpeningDebitBalance − OpeningCreditBalance at the first month; then per
month movement = Σ debit − Σ credit of its lines, closing = opening + movement, next opening = closing.
Every month of the range gets a row, with or without movement.

Period → month (`period_mapping`):
- "calendar" (default): Period 1–12 of PeriodYear y is calendar month y-Period. SAF-T has no fiscal-year
  element and Norwegian companies nearly all keep calendar years. Period 0 (an opening period some ERPs
  use) is booked in January of PeriodYear, Period 13+ (year-end/closing periods) in December; each such
  period is reported as a `period_mapping` issue. (The official examples only use periods 1–12.)
- "transaction_date": when a period read as a calendar month falls outside the header's selection while
  every TransactionDate lies inside it, the file numbers periods by a fiscal year that does not start in
  January (e.g. period 1 = July). Every line is then booked in the month of its TransactionDate, and one
  `period_mapping` issue says so.
Months with lines outside the selection are kept (the range grows) and reported as `period_outside_selection`.

Checks (each mismatch is a ReconciliationIssue; nothing is dropped or corrected):
closing_balance (computed closing after the last month vs the declared closing), total_debit, total_credit,
number_of_entries, unbalanced_period (a month's movements do not sum to zero), opening_trial_balance (the
chart's opening balances do not sum to zero), unknown_account (lines on an account missing from the chart),
duplicate_account, period_mapping, period_outside_selection, no_period. Not checked: TransactionID
uniqueness (it would cost memory per transaction; the XSD's key on it is inert under XSD 1.0).
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from decimal import Decimal

from erp_pipelines.model import CENT, Balance, months_between
from erp_pipelines.saft.parser import ParsedFile
from erp_pipelines.saft.records import ReconciliationIssue, SaftAccount, SaftImport

ZERO = Decimal(0)
CALENDAR, TRANSACTION_DATE = "calendar", "transaction_date"


def build_import(parsed: ParsedFile, *, validated_with: str) -> SaftImport:
    issues = _Issues(parsed)
    mode = _period_mapping(parsed)
    movements = _monthly_movements(parsed, mode, issues)
    months = _month_range(parsed, movements, issues)
    accounts = _accounts_with_unknown(parsed, movements, issues)
    balances = _balances(parsed, accounts, movements, months, issues)
    _check_totals(parsed, issues)
    _check_trial_balances(parsed, movements, months, issues)
    return SaftImport(
        header=parsed.header,
        accounts=tuple(accounts),
        balances=tuple(balances),
        issues=tuple(issues.found),
        months=tuple(months),
        transactions=parsed.transactions,
        lines=parsed.lines,
        line_debit=parsed.line_debit,
        line_credit=parsed.line_credit,
        validated_with=validated_with,
        period_mapping=mode,
    )


class _Issues:
    def __init__(self, parsed: ParsedFile):
        header = parsed.header
        self.org_number = header.org_number or header.registration_number
        self.source_file = header.source_file.name
        self.found: list[ReconciliationIssue] = []

    def add(self, check: str, message: str, *, account=None, period=None, expected=None, actual=None) -> None:
        self.found.append(
            ReconciliationIssue(
                self.org_number, self.source_file, check, account, period, expected, actual, message
            )
        )


# ---------------------------------------------------------------------------------------- periods


def _calendar_month(year: int, period: int) -> dt.date:
    return dt.date(year, min(max(period, 1), 12), 1)


def _date_month(key: str) -> dt.date | None:
    try:
        return dt.date(int(key[:4]), int(key[5:7]), 1)
    except ValueError:
        return None


def _period_mapping(parsed: ParsedFile) -> str:
    first, last = parsed.header.first_month, parsed.header.last_month
    if first is None or last is None:
        return CALENDAR
    calendar_outside = any(
        not first <= _calendar_month(year, period) <= last
        for (_, year, period, _) in parsed.movements
        if 1 <= period <= 12
    )
    if not calendar_outside:
        return CALENDAR
    dates = [_date_month(key) for (*_, key) in parsed.movements]
    return TRANSACTION_DATE if all(d is not None and first <= d <= last for d in dates) else CALENDAR


def _monthly_movements(parsed: ParsedFile, mode: str, issues: _Issues) -> dict[tuple[str, dt.date], Decimal]:
    movements: dict[tuple[str, dt.date], Decimal] = defaultdict(lambda: ZERO)
    odd_periods: dict[tuple[int, int], dt.date] = {}
    for (account, year, period, date_key), amount in parsed.movements.items():
        month = _date_month(date_key) if mode == TRANSACTION_DATE else None
        if month is None:
            month = _calendar_month(year, period)
            if not 1 <= period <= 12:
                odd_periods[(year, period)] = month
        movements[(account, month)] += amount
    if mode == TRANSACTION_DATE:
        issues.add(
            "period_mapping",
            f"Period numbers read as calendar months fall outside the selection ({parsed.header.selection}) "
            "while every TransactionDate lies inside it: a fiscal year not starting in January. "
            "Lines were booked in the month of their TransactionDate.",
        )
    for (year, period), month in sorted(odd_periods.items()):
        issues.add(
            "period_mapping",
            f"Period {period} of {year} is not a calendar month; its lines were booked in {month:%Y-%m}.",
            period=month,
        )
    return movements


def _month_range(parsed: ParsedFile, movements, issues: _Issues) -> list[dt.date]:
    header = parsed.header
    used = sorted({month for (_, month) in movements})
    if header.first_month and header.last_month:
        for month in used:
            if not header.first_month <= month <= header.last_month:
                issues.add(
                    "period_outside_selection",
                    f"Lines in {month:%Y-%m} lie outside the file's selection ({header.selection}); they are "
                    "included, so balances run past the selection.",
                    period=month,
                )
        bounds = [header.first_month, header.last_month, *used]
    elif used:
        bounds = used
    else:
        issues.add(
            "no_period", "The file has neither a selection period nor transactions: no monthly balances."
        )
        return []
    return months_between(min(bounds), max(bounds))


# ---------------------------------------------------------------------------------------- balances


def _accounts_with_unknown(parsed: ParsedFile, movements, issues: _Issues) -> list[SaftAccount]:
    accounts = list(parsed.accounts.values())
    for duplicate in parsed.duplicate_accounts:
        issues.add(
            "duplicate_account",
            f"Account {duplicate.account_id} appears more than once in the chart; the first one is used "
            f"(ignored: {duplicate.description!r}, opening {duplicate.opening:.2f}, closing {duplicate.closing:.2f}).",
            account=duplicate.account_id,
        )
    seen = {account for (account, _) in movements}
    for account_id in sorted(seen - parsed.accounts.keys()):
        total = sum((v for (a, _), v in movements.items() if a == account_id), ZERO)
        issues.add(
            "unknown_account",
            f"Lines post to account {account_id}, which is not in the chart of accounts; "
            "its balances start at 0.",
            account=account_id,
            actual=total.quantize(CENT),
        )
        accounts.append(
            SaftAccount(account_id, "(not in the chart of accounts)", "", None, None, None, ZERO, ZERO)
        )
    return accounts


def _balances(
    parsed, accounts: list[SaftAccount], movements, months: list[dt.date], issues: _Issues
) -> list[Balance]:
    currency = parsed.header.currency or "NOK"
    rows: list[Balance] = []
    for account in accounts:
        balance = account.opening
        for month in months:
            movement = movements.get((account.account_id, month), ZERO)
            closing = balance + movement
            rows.append(
                Balance(
                    month,
                    account.account_id,
                    balance.quantize(CENT),
                    movement.quantize(CENT),
                    closing.quantize(CENT),
                    currency,
                )
            )
            balance = closing
        known = account.account_id in parsed.accounts
        if months and known and balance != account.closing:
            issues.add(
                "closing_balance",
                f"Account {account.account_id} {account.description}: the file declares a closing balance "
                f"of {account.closing:.2f}, but opening {account.opening:.2f} + lines "
                f"{balance - account.opening:.2f} = {balance:.2f} "
                f"(difference {balance - account.closing:.2f}).",
                account=account.account_id,
                period=months[-1],
                expected=account.closing.quantize(CENT),
                actual=balance.quantize(CENT),
            )
    return rows


# ---------------------------------------------------------------------------------------- totals


def _check_totals(parsed: ParsedFile, issues: _Issues) -> None:
    if not parsed.has_entries:
        return
    checks = (
        (
            "total_debit",
            "TotalDebit",
            parsed.declared_debit,
            parsed.line_debit,
            "the lines' debits add up to",
        ),
        (
            "total_credit",
            "TotalCredit",
            parsed.declared_credit,
            parsed.line_credit,
            "the lines' credits add up to",
        ),
        (
            "number_of_entries",
            "NumberOfEntries",
            parsed.declared_entries,
            parsed.transactions,
            "the file holds",
        ),
    )
    for check, element, declared, actual, what in checks:
        if declared != actual:
            issues.add(
                check,
                f"GeneralLedgerEntries/{element} declares {declared}, but {what} {actual}.",
                expected=None if declared is None else Decimal(declared),
                actual=Decimal(actual),
            )


def _check_trial_balances(parsed: ParsedFile, movements, months: list[dt.date], issues: _Issues) -> None:
    """A complete ledger sums to zero: the opening balances, and each month's movements."""
    opening = sum((a.opening for a in parsed.accounts.values()), ZERO)
    if parsed.accounts and opening != 0:
        issues.add(
            "opening_trial_balance",
            f"The chart's opening balances sum to {opening:.2f} instead of 0: the opening balance sheet "
            "does not balance (accounts missing from the chart, or wrong balances).",
            period=months[0] if months else None,
            expected=ZERO.quantize(CENT),
            actual=opening.quantize(CENT),
        )
    per_month: dict[dt.date, Decimal] = defaultdict(lambda: ZERO)
    for (_, month), amount in movements.items():
        per_month[month] += amount
    for month in sorted(per_month):
        if per_month[month] != 0:
            issues.add(
                "unbalanced_period",
                f"The lines of {month:%Y-%m} sum to {per_month[month]:.2f} (debit − credit) instead of 0.",
                period=month,
                expected=ZERO.quantize(CENT),
                actual=per_month[month].quantize(CENT),
            )
