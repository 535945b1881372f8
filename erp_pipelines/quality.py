"""Integrity checks over the warehouse, as plain SQL (the Dagster asset checks call these).

Each returns the violating rows (empty means the check passes), over one ERP, optionally only
some tenants (the ones a run just loaded):
- `trial_balance`: per tenant and month, opening, movement and closing each sum to zero;
- `continuity`: an account's closing in one month equals its opening the next month; balance-sheet
  accounts always, profit-and-loss accounts (NS 4102 classes 3-8) except where the tenant's fiscal
  year restarts: a month in which every one of them opens at zero (any fiscal-year start; a wrong
  restart cannot hide, the openings' trial balance would not sum to zero);
- `row_arithmetic`: opening + movement = closing on every row;
- `unknown_accounts`: every balance's account exists in that tenant's chart of accounts.

Each check names its columns (for tables a reader can follow), its severity ("error": the numbers
are wrong and nothing downstream may use them; "warn": worth a look, the numbers still add up) and
how far a violating row is off, in NOK (`Violations.worst`: the row furthest off).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from decimal import Decimal

from erp_pipelines.warehouse import Warehouse

ERROR, WARN = "error", "warn"


@dataclasses.dataclass(frozen=True)
class Check:
    description: str
    sql: str
    columns: tuple[str, ...]  # the first is always org_number, the second the period
    severity: str
    off_by: Callable[[tuple], Decimal]  # how far a violating row is off (NOK, signed)


def _largest(*amounts: Decimal) -> Decimal:
    return max(amounts, key=abs)


CHECKS = {
    "trial_balance": Check(
        "Opening, movement and closing each sum to zero per tenant and month (double entry).",
        """
        SELECT org_number, period, sum(opening) AS opening, sum(movement) AS movement, sum(closing) AS closing
        FROM balances WHERE erp = ? {tenants}
        GROUP BY org_number, period
        HAVING sum(opening) <> 0 OR sum(movement) <> 0 OR sum(closing) <> 0
        ORDER BY org_number, period
        """,
        ("org_number", "period", "opening", "movement", "closing"),
        ERROR,
        lambda row: _largest(row[2], row[3], row[4]),
    ),
    "continuity": Check(
        ("Closing balance of month m equals the opening balance of month m+1 (profit and loss restarts "
        "with the fiscal year)."),
        """
        WITH b AS (SELECT org_number, period, account_number, opening, closing,
                          coalesce(try_cast(left(account_number, 1) AS INTEGER) BETWEEN 3 AND 8, false) AS result_account
                   FROM balances WHERE erp = ? {tenants}),
        months AS (SELECT DISTINCT org_number, period FROM b),
        restarts AS (  -- months where the fiscal year starts again: every result account opens at zero
            SELECT org_number, period FROM b WHERE result_account
            GROUP BY org_number, period HAVING bool_and(opening = 0)
        ),
        pairs AS (
            SELECT m.org_number, m.period AS month, n.period AS next_month,
                   r.period IS NOT NULL AS restart
            FROM months m JOIN months n
              ON n.org_number = m.org_number AND n.period = m.period + INTERVAL 1 MONTH
            LEFT JOIN restarts r ON r.org_number = n.org_number AND r.period = n.period
        ),
        keys AS (
            SELECT DISTINCT p.org_number, p.month, p.next_month, p.restart, b.account_number, b.result_account
            FROM pairs p JOIN b ON b.org_number = p.org_number AND b.period IN (p.month, p.next_month)
        )
        SELECT k.org_number, k.month, k.account_number, coalesce(c.closing, 0) AS closing,
               coalesce(o.opening, 0) AS next_opening
        FROM keys k
        LEFT JOIN b c ON c.org_number = k.org_number AND c.period = k.month AND c.account_number = k.account_number
        LEFT JOIN b o ON o.org_number = k.org_number AND o.period = k.next_month AND o.account_number = k.account_number
        WHERE coalesce(c.closing, 0) <> coalesce(o.opening, 0) AND NOT (k.restart AND k.result_account)
        ORDER BY 1, 2, 3
        """,
        ("org_number", "period", "account", "closing", "next_opening"),
        WARN,
        lambda row: row[3] - row[4],
    ),
    "row_arithmetic": Check(
        "opening + movement = closing on every row.",
        """
        SELECT org_number, period, account_number, opening, movement, closing
        FROM balances WHERE erp = ? {tenants} AND opening + movement <> closing
        ORDER BY 1, 2, 3
        """,
        ("org_number", "period", "account", "opening", "movement", "closing"),
        ERROR,
        lambda row: row[3] + row[4] - row[5],
    ),
    "unknown_accounts": Check(
        "Every balance's account number exists in the tenant's chart of accounts.",
        # one row per tenant and unknown account: its last month and the balance sitting on it then
        """
        SELECT b.org_number, max(b.period) AS period, b.account_number, arg_max(b.closing, b.period) AS closing
        FROM balances b
        WHERE b.erp = ? {tenants}
          AND b.org_number IN (SELECT org_number FROM accounts WHERE erp = b.erp)
          AND NOT EXISTS (SELECT 1 FROM accounts a WHERE a.erp = b.erp AND a.org_number = b.org_number
                          AND a.account_number = b.account_number)
        GROUP BY b.org_number, b.account_number
        ORDER BY 1, 3
        """,
        ("org_number", "period", "account", "closing"),
        WARN,
        lambda row: row[3],
    ),
}


TENANT_FILTER = "AND org_number IN (SELECT unnest(?::VARCHAR[]))"


def run_check(
    warehouse: Warehouse, erp: str, name: str, *, tenants: list[str] | None = None, limit: int = 50
) -> tuple[int, list[tuple]]:
    """(number of violations, the first `limit` of them)."""
    found = violations(warehouse, erp, name, tenants=tenants)
    return found.count, found.rows[:limit]


@dataclasses.dataclass(frozen=True)
class Violations:
    check: Check
    rows: list[tuple]

    @property
    def count(self) -> int:
        return len(self.rows)

    @property
    def tenants(self) -> list[str]:
        return sorted({row[0] for row in self.rows})

    @property
    def worst(self) -> tuple | None:
        """The row furthest off (the first of equals), or None."""
        return max(self.rows, key=lambda row: abs(self.check.off_by(row)), default=None)


def violations(warehouse: Warehouse, erp: str, name: str, *, tenants: list[str] | None = None) -> Violations:
    """Every violating row of one check, over one ERP (optionally only some tenants)."""
    check = CHECKS[name]
    params: list = [erp]
    if tenants is not None:
        params.append(list(tenants))
    sql = check.sql.format(tenants=TENANT_FILTER if tenants is not None else "")
    with warehouse.connect() as con:
        rows = con.execute(sql, params).fetchall()
    return Violations(check, rows)
