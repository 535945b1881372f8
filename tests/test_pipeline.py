"""`pipeline.load_tenants` and `iterate_sync` without HTTP: batches are written while extraction goes
on, memory holds a bounded number of tenants, and the caller's work does not stall the event loop."""

import asyncio
import datetime as dt
import gc
import threading
import time
from decimal import Decimal

import pytest

from erp_pipelines.erps.base import Connector, RateLimit
from erp_pipelines.model import Account, Balance, Client
from erp_pipelines.pipeline import iterate_sync, load_tenants
from erp_pipelines.warehouse import Warehouse

MONTHS = [dt.date(2026, 1, 1), dt.date(2026, 2, 1)]


class FakeConnector(Connector):
    """Tenants answered after a short await; counts tenants extracted but not yet written."""

    erp = "fake"
    display_name = "Fake"
    settings = ()
    rate_limit = RateLimit(None, 8)

    def __init__(self) -> None:
        super().__init__()
        self.fetched = 0

    async def list_clients(self) -> list[Client]:
        return []

    async def fetch_accounts(self, client: Client) -> list[Account]:
        await asyncio.sleep(0)
        return [Account("1920", "Bank", "ASSETS", "1920")]

    async def fetch_balances(self, client: Client, months: list[dt.date]) -> list[Balance]:
        await asyncio.sleep(0)
        self.fetched += 1
        return [Balance(m, "1920", Decimal("1.00"), Decimal("2.50"), Decimal("3.50")) for m in months]


def clients(n: int) -> list[Client]:
    return [Client("fake", f"{900_000_000 + i}", str(i), f"Tenant {i}") for i in range(n)]


def test_batches_are_written_as_they_complete_and_memory_stays_bounded(tmp_path):
    warehouse = Warehouse(tmp_path / "w.duckdb")
    connector = FakeConnector()
    written = {"tenants": 0}
    peak = {"unwritten": 0}
    replace = warehouse.replace_balances

    def counting_replace(erp, by_tenant, months, **kwargs):
        peak["unwritten"] = max(peak["unwritten"], connector.fetched - written["tenants"])
        result = replace(erp, by_tenant, months, **kwargs)
        written["tenants"] += len(by_tenant)
        return result

    warehouse.replace_balances = counting_replace

    async def run():
        return [batch async for batch in load_tenants(connector, warehouse, clients(95), what=("accounts", "balances"),
                                                       months=MONTHS, batch_tenants=10, tenant_concurrency=4)]

    batches = asyncio.run(run())
    assert [len(b.loaded) for b in batches] == [10] * 9 + [5]
    assert sum(b.rows for b in batches) == 95 * (1 + 2)
    # at most the batch being written, the one filling and the tenants in flight: never all 95
    assert peak["unwritten"] <= 2 * 10 + 4
    assert warehouse.query("SELECT count(*), count(DISTINCT org_number) FROM balances") == [(190, 95)]


def test_a_run_keeps_the_collector_off_the_objects_older_than_it_and_gives_them_back(tmp_path):
    """Full collections during an extraction scan only what the run made: the objects older than
    it are frozen out of them until the last of two concurrent runs ends."""
    seen = []

    class Watching(FakeConnector):
        async def fetch_accounts(self, client):
            seen.append((self.name, gc.get_freeze_count()))
            return await super().fetch_accounts(client)

    async def one_run(name, n, concurrency):
        connector = Watching()
        connector.name = name
        return [b async for b in load_tenants(connector, Warehouse(tmp_path / f"{name}.duckdb"), clients(n),
                                               what=("accounts", "balances"), months=MONTHS, batch_tenants=5,
                                               tenant_concurrency=concurrency)]

    async def two_runs():
        return await asyncio.gather(one_run("long", 40, 2), one_run("short", 3, 3))

    assert gc.get_freeze_count() == 0
    long_run, short_run = asyncio.run(two_runs())
    assert sum(len(b.loaded) for b in long_run) == 40 and sum(len(b.loaded) for b in short_run) == 3
    assert [name for name, _ in seen[-5:]] == ["long"] * 5  # the long run went on after the short one
    assert len(seen) == 43 and all(count > 0 for _, count in seen)
    assert gc.get_freeze_count() == 0  # back to the collector once both runs ended


def test_columns_are_written_with_their_constant_values(tmp_path):
    warehouse = Warehouse(tmp_path / "w.duckdb")
    at = dt.datetime(2026, 3, 4, 5, 6, 7, 891011)
    warehouse.replace_balances("fake", {"900000000": [Balance(MONTHS[0], "3000", Decimal("-1.25"), Decimal("0.00"),
                                                              Decimal("-1.25"))]},
                               MONTHS, run_id="run-1", extracted_at=at)
    warehouse.replace_accounts("fake", {"900000000": [Account("3000", "Salg", None, None)]}, run_id="run-1",
                               extracted_at=at)
    assert warehouse.query("SELECT erp, org_number, period, account_number, opening, movement, closing, currency, "
                           "extracted_at, run_id FROM balances") == [
        ("fake", "900000000", MONTHS[0], "3000", Decimal("-1.25"), Decimal("0.00"), Decimal("-1.25"), "NOK", at, "run-1")]
    assert warehouse.query("SELECT erp, account_number, name, account_type, standard_account, extracted_at, run_id "
                           "FROM accounts") == [("fake", "3000", "Salg", None, None, at, "run-1")]
    with pytest.raises(ValueError, match="outside the window"):
        warehouse.replace_balances("fake", {"900000000": [Balance(dt.date(2025, 12, 1), "3000", Decimal(0),
                                                                  Decimal(0), Decimal(0))]}, MONTHS)


def test_iterate_sync_keeps_the_loop_running_while_the_caller_works():
    progress = []

    async def items():
        async def tick():
            for _ in range(5):
                progress.append(time.monotonic())
                await asyncio.sleep(0.01)

        task = asyncio.create_task(tick())
        yield 1
        await task
        yield 2

    seen = []
    for item in iterate_sync(items()):
        if item == 1:
            started = time.monotonic()
            time.sleep(0.15)  # the caller is busy (Dagster writing events, say)
            finished = time.monotonic()
        seen.append(item)
    assert seen == [1, 2]
    assert sum(started <= t <= finished for t in progress) >= 4  # the loop ticked meanwhile


def test_iterate_sync_leaving_early_closes_the_generator_and_its_loop():
    closed = threading.Event()

    async def items():
        try:
            for i in range(100):
                yield i
                await asyncio.sleep(0)
        finally:
            closed.set()

    before = threading.active_count()
    for item in iterate_sync(items()):
        if item == 2:
            break
    assert closed.is_set()
    assert threading.active_count() == before


def test_iterate_sync_raises_the_generators_error():
    async def items():
        yield 1
        raise RuntimeError("broken tenant list")

    with pytest.raises(RuntimeError, match="broken tenant list"):
        list(iterate_sync(items()))
