import asyncio
import datetime as dt
import multiprocessing
from decimal import Decimal

import duckdb
import httpx
import pytest

from erp_pipelines.clients import format_client_list, list_clients
from erp_pipelines.config import connector_kwargs
from erp_pipelines.erps.extract import ACCOUNTS, BALANCES
from erp_pipelines.erps.kit import RateLimit, Throttle
from erp_pipelines.erps.xledger import XledgerConnector
from erp_pipelines.model import Balance, Client, ClientStatus, months_between
from erp_pipelines.pipeline import load_tenants, refresh_clients
from erp_pipelines.registry import ERPS
from erp_pipelines.sandbox.ledger import generate_ledger
from erp_pipelines.sandbox.xledger import FISCAL_YEAR_START_MONTH, FISCAL_YEAR_TENANT, XledgerSandbox
from erp_pipelines.warehouse import Warehouse

JAN, FEB, MAR = dt.date(2026, 1, 1), dt.date(2026, 2, 1), dt.date(2026, 3, 1)


def balance(period, account, opening, movement):
    opening, movement = Decimal(opening), Decimal(movement)
    return Balance(period, account, opening, movement, opening + movement)


@pytest.fixture
def warehouse(tmp_path, warehouse_backend):
    """A new warehouse on each backend: the DuckDB file, and DuckLake (tests/conftest.py)."""
    return Warehouse(tmp_path / "w.duckdb")


def test_balances_are_replaced_per_tenant_and_window(warehouse):
    warehouse.replace_balances("x", {"A": [balance(JAN, "1920", "10.00", "5.55")],
                                     "B": [balance(JAN, "1920", "1.00", "1.00")]}, [JAN])
    warehouse.replace_balances("x", {"A": [balance(FEB, "1920", "15.55", "-0.01")]}, [FEB])
    # re-pull January for A only: B and A's February are untouched
    warehouse.replace_balances("x", {"A": [balance(JAN, "1920", "10.00", "5.56")]}, [JAN])
    rows = warehouse.query("SELECT org_number, period, opening, movement, closing FROM balances ORDER BY 1, 2")
    assert rows == [
        ("A", JAN, Decimal("10.00"), Decimal("5.56"), Decimal("15.56")),
        ("A", FEB, Decimal("15.55"), Decimal("-0.01"), Decimal("15.54")),
        ("B", JAN, Decimal("1.00"), Decimal("1.00"), Decimal("2.00")),
    ]
    column_type = warehouse.query("SELECT data_type FROM information_schema.columns "
                                  "WHERE table_name='balances' AND column_name='closing'")
    assert column_type == [("DECIMAL(18,2)",)]


def test_rerun_is_idempotent(warehouse):
    rows = {"A": [balance(JAN, "1920", "1", "2"), balance(JAN, "3000", "-1", "-2")]}
    for _ in range(3):
        warehouse.replace_balances("x", rows, [JAN, FEB])
    assert warehouse.query("SELECT count(*) FROM balances") == [(2,)]


def test_failed_write_keeps_previous_rows(warehouse):
    warehouse.replace_balances("x", {"A": [balance(JAN, "1920", "1", "2")]}, [JAN])
    with pytest.raises(ValueError, match="outside the window"):
        warehouse.replace_balances("x", {"A": [balance(MAR, "1920", "9", "9")]}, [JAN])
    assert warehouse.query("SELECT closing FROM balances") == [(Decimal("3.00"),)]


def test_registry_marks_revoked_and_reactivated(warehouse):
    a, b = Client("x", "A", "1", "Alpha"), Client("x", "B", "2", "Beta")
    bad = Client("x", "", "3", "Bad", ClientStatus.REJECTED, "has no organisation number")
    first = warehouse.record_clients("x", [a, b, bad])
    assert first.new == ["A", "B"] and [c.erp_client_id for c in first.rejected] == ["3"]
    second = warehouse.record_clients("x", [a])
    assert second.revoked == ["B"] and second.new == []
    statuses = dict(warehouse.query("SELECT erp_client_id, status FROM clients"))
    assert statuses == {"1": "active", "2": "revoked", "3": "rejected"}
    third = warehouse.record_clients("x", [a, b])
    assert third.reactivated == ["B"]
    assert warehouse.query("SELECT revoked_at FROM clients WHERE erp_client_id = '2'") == [(None,)]


def test_access_error_sets_no_api_access_until_success(warehouse):
    warehouse.record_clients("x", [Client("x", "A", "1", "Alpha")])
    warehouse.record_extraction_outcomes("x", succeeded=[], failed={"A": ("tick API-tilgang", True)})
    assert warehouse.clients("x")[0].status == ClientStatus.NO_API_ACCESS
    warehouse.record_clients("x", [Client("x", "A", "1", "Alpha")])  # a refresh keeps it
    assert warehouse.clients("x")[0].status == ClientStatus.NO_API_ACCESS
    warehouse.record_extraction_outcomes("x", succeeded=["A"], failed={})
    client = warehouse.clients("x")[0]
    assert client.status == ClientStatus.OK and client.status_reason is None


def test_the_clients_fiscal_year_start_lands_in_the_clients_table_and_survives_a_refresh(warehouse):
    """Xledger's simulator: one tenant's fiscal year starts in July, the others' in January."""
    months = months_between(dt.date(2025, 12, 1), dt.date(2026, 1, 1))
    ledger = generate_ledger(4, first_month=dt.date(2025, 6, 1), last_month=months[-1])
    sandbox = XledgerSandbox(ledger)
    july = ledger.valid_tenants[FISCAL_YEAR_TENANT]
    assert FISCAL_YEAR_START_MONTH == 7 and july.fiscal_year_start_month == 7

    def connector():
        return XledgerConnector(**connector_kwargs(ERPS["xledger"], sandbox.environment("http://xledger.test/graphql")),
                                transport=httpx.ASGITransport(app=sandbox.app),
                                throttle=Throttle(RateLimit(requests_per_second=500, max_in_flight=4)))

    async def extract():
        async with connector() as xledger:
            _, change = await refresh_clients(xledger, warehouse)
            active = list(warehouse.active_clients("xledger", change.active).values())
            failed = [e async for batch in load_tenants(xledger, warehouse, active, what=(ACCOUNTS, BALANCES),
                                                        months=months) for e in batch.failed]
            return active, failed

    active, failed = asyncio.run(extract())
    assert failed == [] and len(active) == len(ledger.valid_tenants) > 1

    def starts():
        return dict(warehouse.query("SELECT org_number, fiscal_year_start_month FROM clients WHERE status = 'active'"))

    assert starts() == {t.org_number: 7 if t is july else 1 for t in ledger.valid_tenants}

    async def refresh():
        async with connector() as xledger:
            await refresh_clients(xledger, warehouse)

    asyncio.run(refresh())  # the registry is rewritten on every listing: the start stays
    assert starts()[july.org_number] == 7
    listing = format_client_list(list_clients(warehouse, "xledger"))
    assert listing.count("fiscal year starts in July") == 1  # calendar years go without saying


def test_a_warehouse_from_before_fiscal_years_gains_the_column_in_place(tmp_path):
    path = tmp_path / "old.duckdb"
    con = duckdb.connect(str(path))
    con.execute("CREATE TABLE clients (erp VARCHAR NOT NULL, org_number VARCHAR NOT NULL, erp_client_id VARCHAR "
                "NOT NULL, name VARCHAR, status VARCHAR NOT NULL, status_reason VARCHAR, first_seen_at TIMESTAMP "
                "NOT NULL, last_seen_at TIMESTAMP NOT NULL, revoked_at TIMESTAMP, last_extracted_at TIMESTAMP, "
                "last_error VARCHAR, last_error_at TIMESTAMP, deactivated_at TIMESTAMP)")
    con.execute("INSERT INTO clients VALUES ('x', 'A', '1', 'Alpha', 'active', NULL, ?, ?, NULL, NULL, NULL, NULL, "
                "NULL)", [dt.datetime(2026, 1, 5), dt.datetime(2026, 1, 5)])
    con.close()
    warehouse = Warehouse(path)
    assert warehouse.query("SELECT name, status, fiscal_year_start_month FROM clients") == [("Alpha", "active", None)]
    warehouse.record_extraction_outcomes("x", succeeded=["A"], failed={}, fiscal_year_starts={"A": 7})
    warehouse.record_clients("x", [Client("x", "A", "1", "Alpha")])
    assert warehouse.query("SELECT fiscal_year_start_month FROM clients") == [(7,)]
    column_type = warehouse.query("SELECT data_type FROM information_schema.columns "
                                  "WHERE table_name = 'clients' AND column_name = 'fiscal_year_start_month'")
    assert column_type == [("SMALLINT",)]
    assert Warehouse(path).query("SELECT count(*) FROM clients") == [(1,)]  # reopened: the migration is idempotent


def _write_many(path, worker):
    warehouse = Warehouse(path)
    for i in range(15):
        warehouse.replace_balances(
            "x", {f"T{worker}": [balance(JAN, str(1000 + n), "1", str(i)) for n in range(50)],
                  "shared": [balance(JAN, "1920", str(worker), str(i))]}, [JAN],
        )


def test_concurrent_processes_never_fail_on_the_lock_or_lose_rows(tmp_path, warehouse_backend):
    path = tmp_path / "w.duckdb"
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_write_many, args=(path, w)) for w in range(4)]
    for p in workers:
        p.start()
    for p in workers:
        p.join(120)
    assert [p.exitcode for p in workers] == [0, 0, 0, 0]
    warehouse = Warehouse(path)
    counts = dict(warehouse.query("SELECT org_number, count(*) FROM balances GROUP BY 1"))
    assert counts == {"T0": 50, "T1": 50, "T2": 50, "T3": 50, "shared": 1}
