"""The continuity check: balance-sheet accounts carry over every month, profit and loss restarts
with the tenant's fiscal year (whatever month it starts in), and nothing else is excused."""

import datetime as dt
from decimal import Decimal

import pytest

from erp_pipelines.model import Account, Balance, months_between
from erp_pipelines.quality import run_check, violations
from erp_pipelines.warehouse import Warehouse

MONTHS = months_between(dt.date(2025, 5, 1), dt.date(2026, 2, 1))
BANK, EQUITY, SALES, COSTS, TRANSFER = "1920", "2050", "3000", "6300", "8960"
ACCOUNTS = (BANK, EQUITY, SALES, COSTS, TRANSFER)


def books(fiscal_start: int, *, breaks: dict[tuple[dt.date, str], Decimal] | None = None) -> list[Balance]:
    """Monthly balances of a tenant whose fiscal year starts in `fiscal_start`: sales of 100 and costs
    of 40 a month, paid into the bank; the year's last month closes the result into equity (8960
    against 2050) and profit and loss opens the next year at zero. `breaks` shifts an account's
    opening in a month (a broken carry-over)."""
    rows, opening = [], dict.fromkeys(ACCOUNTS, Decimal(0))
    for month in MONTHS:
        if month.month == fiscal_start:
            opening.update(dict.fromkeys((SALES, COSTS, TRANSFER), Decimal(0)))
        movement = {BANK: Decimal(60), EQUITY: Decimal(0), SALES: Decimal(-100), COSTS: Decimal(40),
                    TRANSFER: Decimal(0)}
        if month.month % 12 + 1 == fiscal_start:  # the year's last month: the closing voucher
            result = opening[SALES] + opening[COSTS] + movement[SALES] + movement[COSTS]
            movement[TRANSFER], movement[EQUITY] = -result, result
        for account in ACCOUNTS:
            start = opening[account] + (breaks or {}).get((month, account), Decimal(0))
            rows.append(Balance(month, account, start, movement[account], start + movement[account]))
            opening[account] = start + movement[account]
    return rows


def continuity(tmp_path, rows: list[Balance]) -> list[tuple]:
    warehouse = Warehouse(tmp_path / "w.duckdb")
    warehouse.replace_balances("x", {"987654321": rows}, MONTHS)
    return run_check(warehouse, "x", "continuity")[1]


@pytest.mark.parametrize("fiscal_start", [1, 7])
def test_profit_and_loss_restarts_at_the_fiscal_year_start_without_a_violation(tmp_path, fiscal_start):
    assert continuity(tmp_path, books(fiscal_start)) == []


def test_a_balance_sheet_account_must_carry_over_the_year_end_too(tmp_path):
    broken = continuity(tmp_path, books(1, breaks={(dt.date(2026, 1, 1), BANK): Decimal("0.01")}))
    assert [(row[1], row[2]) for row in broken] == [(dt.date(2025, 12, 1), BANK)]


def test_a_profit_and_loss_account_breaking_inside_the_year_is_a_violation(tmp_path):
    broken = continuity(tmp_path, books(7, breaks={(dt.date(2025, 10, 1), SALES): Decimal("5.00")}))
    assert [(row[1], row[2], row[3] - row[4]) for row in broken] == [(dt.date(2025, 9, 1), SALES, Decimal("-5.00"))]


def test_one_profit_and_loss_account_left_open_at_the_year_start_is_a_violation(tmp_path):
    july = dt.date(2025, 7, 1)
    rows = books(7, breaks={(july, COSTS): Decimal("160.00")})  # costs carried over: not a restart
    broken = continuity(tmp_path, rows)
    june = dt.date(2025, 6, 1)
    assert {(row[1], row[2]) for row in broken} == {(june, SALES), (june, COSTS), (june, TRANSFER)}


def test_a_trial_balance_violation_names_the_tenant_month_and_amount_furthest_off(tmp_path):
    warehouse = Warehouse(tmp_path / "w.duckdb")
    october, january = dt.date(2025, 10, 1), dt.date(2026, 1, 1)
    broken = books(1, breaks={(october, BANK): Decimal("5.00"), (january, COSTS): Decimal("-7.00")})
    warehouse.replace_balances("x", {"987654321": broken, "912345679": books(1)}, MONTHS)

    found = violations(warehouse, "x", "trial_balance")

    assert found.check.severity == "error" and found.check.columns[:2] == ("org_number", "period")
    assert found.tenants == ["987654321"]
    assert [row[1] for row in found.rows] == [m for m in MONTHS if m >= october]  # the break carries over
    org, period, *_ = found.worst
    assert (org, period, found.check.off_by(found.worst)) == ("987654321", october, Decimal("5.00"))
    assert violations(warehouse, "x", "trial_balance", tenants=["912345679"]).rows == []


def test_an_unknown_account_shows_its_last_month_and_the_balance_on_it(tmp_path):
    warehouse = Warehouse(tmp_path / "w.duckdb")
    warehouse.replace_balances("x", {"987654321": books(1)}, MONTHS)
    known = [Account(number, f"account {number}") for number in ACCOUNTS if number != BANK]
    warehouse.replace_accounts("x", {"987654321": known})

    found = violations(warehouse, "x", "unknown_accounts")

    assert found.check.severity == "warn"
    closing = next(b.closing for b in books(1) if b.period == MONTHS[-1] and b.account_number == BANK)
    assert found.rows == [("987654321", MONTHS[-1], BANK, closing)]
    assert found.check.off_by(found.worst) == closing == Decimal(60 * len(MONTHS))
    assert run_check(warehouse, "x", "unknown_accounts")[0] == 1
