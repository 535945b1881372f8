"""Canonical account columns: `account_class` and the SAF-T mapping, the same for every source."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections import defaultdict
from decimal import Decimal

import duckdb
import pytest
from contract.contract_support import serve_erp

from erp_pipelines.accounts import ACCOUNT_CLASSES, classify_account, saft_mapping
from erp_pipelines.erps import poweroffice, tripletex, vismanet
from erp_pipelines.erps.extract import ACCOUNTS, BALANCES
from erp_pipelines.model import Account
from erp_pipelines.pipeline import load_tenants, refresh_clients
from erp_pipelines.registry import api_erps
from erp_pipelines.warehouse import Warehouse

# the truth ledger's own account types that are income (sales and financial income)
TRUTH_INCOME_TYPES = {"OPERATING_REVENUES", "INVESTMENT_INCOME"}


@pytest.mark.parametrize(
    "number, expected",
    [
        ("1000", "asset"), ("1999", "asset"),
        ("2000", "equity"), ("2099", "equity"), ("2100", "liability"), ("2999", "liability"),
        ("3000", "income"), ("3999", "income"),
        ("4000", "expense"), ("5000", "expense"), ("6000", "expense"), ("7999", "expense"),
        ("8000", "income"), ("8099", "income"), ("8100", "expense"), ("8199", "expense"),
        ("8300", "expense"), ("8399", "expense"), ("8800", "equity"), ("8960", "equity"), ("8999", "equity"),
    ],
)
def test_ns_4102_number_ranges_classify_each_boundary(number, expected):
    assert classify_account(number) == expected


@pytest.mark.parametrize(
    "number, account_type, standard, grouping_code, type_classes, expected",
    [
        # a 5-digit chart: the ERP's own type decides, before the number's leading digits
        ("30100", "OPERATING_REVENUES", None, None, tripletex.ACCOUNT_TYPE_CLASSES, "income"),
        ("80500", "INVESTMENT_INCOME", None, None, tripletex.ACCOUNT_TYPE_CLASSES, "income"),
        ("88000", "ANNUAL_RESULT", None, None, tripletex.ACCOUNT_TYPE_CLASSES, "equity"),
        ("20500", "Liability", None, None, vismanet.ACCOUNT_TYPE_CLASSES, "liability"),
        ("20500", "Equity", None, None, poweroffice.ACCOUNT_TYPE_CLASSES, "equity"),
        ("99999", "Income", None, None, poweroffice.ACCOUNT_TYPE_CLASSES, "income"),
        # a 4-digit NS number wins over the ERP's type (the ranges are the standard)
        ("3000", "Expense", None, None, poweroffice.ACCOUNT_TYPE_CLASSES, "income"),
        # no type: the SAF-T standard account, then the grouping code, then the number's leading digits
        ("19200", None, "1920", None, None, "asset"),
        ("A-100", None, None, "3000", None, "income"),
        ("1920.01", None, None, None, None, "asset"),
        ("20500", None, None, None, None, "equity"),
        ("21500", None, None, None, None, "liability"),
        ("81", None, None, None, None, "expense"),
        ("8200", None, None, None, None, "expense"),  # 82xx has no range: its class digit decides
        ("A-100", "ASSETS", None, None, None, None),  # a type without its ERP's table tells nothing
        ("9000", None, None, None, None, None),  # class 9 (internal accounts) is none of the five
    ],
)
def test_classification_falls_back_from_the_number_to_the_erps_type_and_the_standard_account(
    number, account_type, standard, grouping_code, type_classes, expected
):
    assert classify_account(number, account_type, standard, grouping_code, type_classes=type_classes) == expected


def test_every_erp_type_table_maps_to_the_five_classes():
    for table in (tripletex.ACCOUNT_TYPE_CLASSES, vismanet.ACCOUNT_TYPE_CLASSES, poweroffice.ACCOUNT_TYPE_CLASSES):
        assert set(table.values()) <= set(ACCOUNT_CLASSES)
    assert classify_account("30100", "OPERATING_EXPENSES", type_classes=tripletex.ACCOUNT_TYPE_CLASSES) == "expense"


@pytest.mark.parametrize(
    "given, expected",
    [
        (("3000", None, None), ("3000", None, None)),
        (("30", None, None), (None, "StandardAccountID", "30")),
        (("salgsinntekt:3000", None, None), (None, "salgsinntekt", "3000")),
        ((None, "salgsinntekt", "3000"), (None, "salgsinntekt", "3000")),
        (("3000", None, "3000"), ("3000", None, "3000")),
        ((" ", "", None), (None, None, None)),
    ],
)
def test_saft_mapping_has_one_format_per_column(given, expected):
    assert saft_mapping(*given) == expected


def test_an_unknown_account_class_is_refused():
    with pytest.raises(ValueError, match="account 3000: account_class 'revenue' is not one of"):
        Account("3000", "Salg", account_class="revenue")


def test_an_older_warehouse_gets_the_columns_and_its_accounts_classified_in_place(tmp_path):
    path = tmp_path / "old.duckdb"
    con = duckdb.connect(str(path))
    con.execute("CREATE TABLE accounts (erp VARCHAR NOT NULL, org_number VARCHAR NOT NULL, "
                "account_number VARCHAR NOT NULL, name VARCHAR, account_type VARCHAR, standard_account VARCHAR, "
                "extracted_at TIMESTAMP NOT NULL, run_id VARCHAR)")
    at = dt.datetime(2025, 1, 1)
    con.executemany("INSERT INTO accounts VALUES ('x', '900000000', ?, 'n', ?, ?, ?, 'r')", [
        ("3000", "GL", "30", at), ("1920", "GL", "salgsinntekt:3000", at), ("2400", "LIABILITIES", "2400", at),
        ("30100", "OPERATING_REVENUES", "3000", at), ("9000", None, None, at),
    ])
    con.close()

    warehouse = Warehouse(path)
    rows = warehouse.query("SELECT account_number, account_type, standard_account, grouping_category, grouping_code, "
                           "account_class FROM accounts ORDER BY account_number")
    assert rows == [
        ("1920", "GL", None, "salgsinntekt", "3000", "asset"),
        ("2400", "LIABILITIES", "2400", None, None, "liability"),
        ("3000", "GL", None, "StandardAccountID", "30", "income"),
        ("30100", "OPERATING_REVENUES", "3000", None, None, "income"),
        ("9000", None, None, None, None, None),
    ]
    # a write after the migration lands in the right columns
    warehouse.replace_accounts("x", {"900000000": [Account("3000", "Salg", "GL", "3000", "salgsinntekt", "3000")]})
    assert Warehouse(path).query("SELECT account_number, standard_account, grouping_category, grouping_code, "
                                 "account_class FROM accounts WHERE erp = 'x'") == [
        ("3000", "3000", "salgsinntekt", "3000", "income")]


def _load(served, warehouse: Warehouse) -> None:
    async def scenario():
        async with served.connector() as connector:
            clients, _ = await refresh_clients(connector, warehouse)
            async for batch in load_tenants(connector, warehouse, [c for c in clients if c.is_active],
                                            what=(ACCOUNTS, BALANCES), months=served.months):
                assert not batch.failed, [e.error for e in batch.failed]

    asyncio.run(scenario())


@pytest.mark.parametrize("erp", [spec.name for spec in api_erps()])
def test_every_connectors_accounts_land_with_their_class(erp, tmp_path):
    with serve_erp(erp, tmp_path, tenants=2, months=2) as served:
        _load(served, served.warehouse)
        truth = {str(a.number): a.type for t in served.ledger.valid_tenants for a in t.accounts}
        rows = served.warehouse.query("SELECT account_number, account_class FROM accounts")
    assert rows and {n for n, _ in rows} == set(truth)
    assert all(cls in ACCOUNT_CLASSES for _, cls in rows), [r for r in rows if r[1] not in ACCOUNT_CLASSES]
    assert {n for n, cls in rows if cls == "income"} == {n for n, kind in truth.items() if kind in TRUTH_INCOME_TYPES}


def test_revenue_across_erps_is_one_where_clause_and_equals_the_truth_ledger(tmp_path):
    warehouse = Warehouse(tmp_path / "shared.duckdb")
    truth: dict[tuple[str, str, dt.date], Decimal] = defaultdict(Decimal)
    for erp in ("tripletex", "poweroffice"):
        (tmp_path / erp).mkdir()
        with serve_erp(erp, tmp_path / erp, tenants=3) as served:
            _load(served, warehouse)
            for tenant in served.ledger.valid_tenants:
                for balance in tenant.expected_balances(served.months):
                    if tenant.account(int(balance.account_number)).type in TRUTH_INCOME_TYPES:
                        truth[(erp, tenant.org_number, balance.period)] += balance.movement
    revenue = warehouse.query("SELECT erp, org_number, period, sum(movement) FROM all_balances "
                              "WHERE account_class = 'income' GROUP BY ALL HAVING sum(movement) <> 0")
    assert {(erp, org, period): total for erp, org, period, total in revenue} == {
        key: total for key, total in truth.items() if total}
    assert len({erp for erp, *_ in revenue}) == 2 and all(total < 0 for *_, total in revenue)  # credit negative
