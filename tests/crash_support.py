"""The process `test_crash_safety.py` kills with SIGKILL in the middle of a warehouse write.

    python tests/crash_support.py pipeline <warehouse> <run_id> <marker>
        the real pipeline (refresh_clients + load_tenants against an in-process Tripletex sandbox);
        its balances write hangs just before COMMIT, after the DELETE and the INSERT ran, and
        touches <marker> there.
    python tests/crash_support.py big-insert <warehouse> <rows> <marker>
        one `Warehouse._replace` of <rows> balance rows for tenant BIG; touches <marker> when the
        INSERT starts and <marker>.done when it returns (then hangs before COMMIT).
    python tests/crash_support.py hold-lock <warehouse> <marker>
        takes the warehouse's cross-process lock, touches <marker> and sleeps.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import sys
import time
from pathlib import Path

import httpx

from erp_pipelines.erps.extract import ACCOUNTS, BALANCES
from erp_pipelines.erps.tripletex import TripletexConnector
from erp_pipelines.model import months_between
from erp_pipelines.pipeline import load_tenants, refresh_clients
from erp_pipelines.sandbox.ledger import generate_ledger
from erp_pipelines.sandbox.tripletex import TripletexSandbox
from erp_pipelines.warehouse import Warehouse

FIRST, LAST = dt.date(2025, 10, 1), dt.date(2025, 12, 1)
MONTHS = months_between(FIRST, LAST)


def ledger():
    return generate_ledger(3, first_month=FIRST, last_month=LAST)


def run_pipeline(warehouse_path: str, run_id: str) -> None:
    """One extraction of every tenant, the way the Dagster assets do it."""
    sandbox = TripletexSandbox(ledger())
    warehouse = Warehouse(warehouse_path)

    async def main() -> None:
        async with TripletexConnector(
            base_url="http://tripletex.sandbox/v2", consumer_token=sandbox.consumer_token,
            employee_token=sandbox.accountant_employee_token, transport=httpx.ASGITransport(app=sandbox.app),
        ) as connector:
            _, change = await refresh_clients(connector, warehouse)
            active = list(warehouse.active_clients("tripletex", change.active).values())
            async for batch in load_tenants(connector, warehouse, active, what=(ACCOUNTS, BALANCES), months=MONTHS,
                                            run_id=run_id):
                assert not batch.failed, [str(e.error) for e in batch.failed]

    asyncio.run(main())


class _HangingConnection:
    """A DuckDB connection that stops (for an hour) at a chosen point of a write."""

    def __init__(self, connection, marker: Path, *, hang_before_commit: bool, insert_markers: bool) -> None:
        self._connection = connection
        self._marker = marker
        self._hang_before_commit = hang_before_commit
        self._insert_markers = insert_markers
        self._inserted_balances = False

    def execute(self, sql, *args, **kwargs):
        text = sql.strip().upper()
        if text.startswith("INSERT INTO BALANCES"):
            if self._insert_markers:
                self._marker.touch()
            result = self._connection.execute(sql, *args, **kwargs)
            self._inserted_balances = True
            if self._insert_markers:
                Path(str(self._marker) + ".done").touch()
            return result
        if text == "COMMIT" and self._inserted_balances and self._hang_before_commit:
            self._marker.touch()
            time.sleep(3600)
        return self._connection.execute(sql, *args, **kwargs)

    def cursor(self):  # DuckLake: each warehouse connection is a cursor of one attached database
        return _HangingConnection(self._connection.cursor(), self._marker, hang_before_commit=self._hang_before_commit,
                                  insert_markers=self._insert_markers)

    def __getattr__(self, name):
        return getattr(self._connection, name)


def _patch_duckdb(marker: Path, *, insert_markers: bool) -> None:
    """Every connection the warehouse opens from now on (on either backend) is a `_HangingConnection`."""
    import duckdb

    import erp_pipelines.warehouse_backends as warehouse_module

    class PatchedDuckdb:
        def __getattr__(self, name):
            return getattr(duckdb, name)

        @staticmethod
        def connect(*args, **kwargs):
            return _HangingConnection(duckdb.connect(*args, **kwargs), marker, hang_before_commit=True,
                                      insert_markers=insert_markers)

    warehouse_module.duckdb = PatchedDuckdb()


def big_table(rows: int):
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    from erp_pipelines.warehouse import BALANCE_SCHEMA, MONEY

    numbers = pa.array(np.arange(rows, dtype=np.int32))
    zeros = pa.array(np.zeros(rows, dtype=np.int32))

    def constant(value, kind):
        return pa.array([value], kind).take(zeros)

    money = pc.cast(numbers, MONEY)
    return pa.table({
        "erp": constant("tripletex", pa.string()),
        "org_number": constant("BIG", pa.string()),
        "period": constant(FIRST, pa.date32()),
        "account_number": pc.cast(numbers, pa.string()),
        "opening": money, "movement": pc.cast(zeros, MONEY), "closing": money,
        "currency": constant("NOK", pa.string()),
        "extracted_at": constant(dt.datetime(2026, 1, 1), pa.timestamp("us")),
        "run_id": constant("big-insert", pa.string()),
    }, schema=BALANCE_SCHEMA)


def main(argv: list[str]) -> None:
    mode = argv[0]
    if mode == "pipeline":
        path, run_id, marker = argv[1], argv[2], Path(argv[3])
        _patch_duckdb(marker, insert_markers=False)
        run_pipeline(path, run_id)
    elif mode == "big-insert":
        path, rows, marker = argv[1], int(argv[2]), Path(argv[3])
        table = big_table(rows)
        _patch_duckdb(marker, insert_markers=True)  # before the first connection: DuckLake keeps its database
        warehouse = Warehouse(path)
        warehouse.ensure_schema()
        warehouse._replace("balances", "tripletex", ["BIG"], table, window=None)
    elif mode == "hold-lock":
        path, marker = argv[1], Path(argv[2])
        warehouse = Warehouse(path)
        with warehouse.connect():
            marker.touch()
            time.sleep(3600)
    raise SystemExit(f"{mode}: finished, but it should have been killed first")


if __name__ == "__main__":
    main(sys.argv[1:])
