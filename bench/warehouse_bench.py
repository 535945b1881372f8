"""Warehouse load on both backends: `Warehouse.replace_balances` of N canonical rows (one
transaction), into an empty table and then replacing the same window (delete + insert), on

- the DuckDB file (`DuckDBFileBackend`), and
- DuckLake (`DuckLakeBackend`): its catalog in a private PostgreSQL cluster
  (`tests/postgres_support.private_cluster`), its data path a local folder;

and, on each, WRITERS processes replacing their own tenants at once (rows/s over all of them: the
file lock serialises the DuckDB file's writers; DuckLake's retry conflicting commits).
`bench/run.py` calls `measure` (the throughput section); alone:

    .venv/bin/python -m bench.warehouse_bench [--rows 1000000] [--writers 8]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import multiprocessing
import tempfile
import time
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

from erp_pipelines.model import Balance, add_months, months_between
from erp_pipelines.warehouse import Warehouse
from erp_pipelines.warehouse_backends import DuckDBFileBackend, DuckLakeBackend, WarehouseBackend

ERP = "bench"
WRITERS = 8


def balances(rows: int, months: list[dt.date], first_tenant: int = 0) -> dict[str, list[Balance]]:
    """About `rows` balances: 30 accounts × the months per tenant."""
    tenants = max(1, rows // (30 * len(months)))
    return {
        f"{800_000_000 + i}": [
            Balance(month, str(1000 + 10 * j), Decimal(f"{i}.{j:02d}"), Decimal("-125.50"),
                    Decimal(f"{i}.{j:02d}") - Decimal("125.50"))
            for month in months for j in range(30)
        ]
        for i in range(first_tenant, first_tenant + tenants)
    }


def single_writer(backend: WarehouseBackend, rows: int, months: list[dt.date]) -> dict[str, Any]:
    by_tenant = balances(rows, months)
    count = sum(len(v) for v in by_tenant.values())
    warehouse = Warehouse(Path(tempfile.gettempdir()) / "unused.duckdb", backend=backend)
    warehouse.prepare()
    out: dict[str, Any] = {"rows": count}
    for label in ("insert", "replace"):
        started = time.perf_counter()
        warehouse.replace_balances(ERP, by_tenant, months)
        out[f"{label}_rows_per_s"] = round(count / (time.perf_counter() - started))
    landed = warehouse.query("SELECT count(*) FROM balances WHERE erp = ?", [ERP])[0][0]
    out["landed_exactly"] = landed == count
    return out


def _writer(make_backend: Callable[[], WarehouseBackend], worker: int, rows: int, months: list[dt.date],
            start: Any) -> None:
    by_tenant = balances(rows, months, first_tenant=10_000 * (worker + 1))
    warehouse = Warehouse(Path(tempfile.gettempdir()) / "unused.duckdb", backend=make_backend())
    warehouse.prepare()
    start.wait()
    for _ in range(2):  # insert, then replace the same window
        warehouse.replace_balances(ERP, by_tenant, months)


def concurrent_writers(make_backend: Callable[[], WarehouseBackend], rows: int, months: list[dt.date],
                       writers: int) -> dict[str, Any]:
    """`writers` processes, each inserting then replacing rows/writers rows of its own tenants."""
    per_writer = max(30 * len(months), rows // writers)
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(writers + 1)
    processes = [context.Process(target=_writer, args=(make_backend, w, per_writer, months, start))
                 for w in range(writers)]
    for process in processes:
        process.start()
    start.wait(timeout=300)
    started = time.perf_counter()
    for process in processes:
        process.join(600)
    seconds = time.perf_counter() - started
    written = 2 * writers * sum(len(v) for v in balances(per_writer, months).values())
    landed = Warehouse(Path(tempfile.gettempdir()) / "unused.duckdb", backend=make_backend()).query(
        "SELECT count(*), count(DISTINCT (org_number, period, account_number)) FROM balances WHERE erp = ?",
        [ERP])[0]
    return {"writers": writers, "rows_written": written, "rows_per_s": round(written / seconds),
            "all_succeeded": all(p.exitcode == 0 for p in processes),
            "landed_exactly": landed[0] == landed[1] == written // 2}


class _Lake:
    """A picklable DuckLakeBackend factory (the spawned writers build their own)."""

    def __init__(self, catalog: str, data_path: str) -> None:
        self.catalog, self.data_path = catalog, data_path

    def __call__(self) -> WarehouseBackend:
        return DuckLakeBackend(self.catalog, self.data_path)


class _File:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __call__(self) -> WarehouseBackend:
        return DuckDBFileBackend(self.path)


def measure(work: Path, rows: int, months: list[dt.date], writers: int | None = None) -> dict[str, Any]:
    """Load figures on the DuckDB file and on DuckLake (None with the reason when PostgreSQL is
    missing). `writers`: WRITERS, or 2 for a tiny run (the smoke test)."""
    from tests.postgres_support import PostgresUnavailable, private_cluster

    writers = writers or (WRITERS if rows >= 10_000 else 2)

    work.mkdir(parents=True, exist_ok=True)
    figures: dict[str, Any] = {
        "duckdb": single_writer(DuckDBFileBackend(work / "load-file.duckdb"), rows, months),
        "duckdb_concurrent": concurrent_writers(_File(work / "load-file-concurrent.duckdb"), rows, months, writers),
    }
    try:
        with private_cluster() as cluster:
            lakes = [_Lake("postgres:" + cluster.libpq(cluster.create_database("lake")), f"{work / name}/")
                     for name in ("lake-data", "lake-data-concurrent")]
            figures["ducklake"] = single_writer(lakes[0](), rows, months)
            figures["ducklake_concurrent"] = concurrent_writers(lakes[1], rows, months, writers)
    except PostgresUnavailable as missing:
        figures["ducklake"] = figures["ducklake_concurrent"] = None
        figures["ducklake_missing"] = str(missing).splitlines()[0]
    return figures


def render_row(figures: dict[str, Any]) -> str:
    """The "## Throughput" table row (bench/run.py)."""
    d, dc = figures["duckdb"], figures["duckdb_concurrent"]
    lake, lc = figures["ducklake"], figures["ducklake_concurrent"]
    file_part = (f"DuckDB file {d['insert_rows_per_s']:,} rows/s (replacing {d['replace_rows_per_s']:,}; "
                 f"{dc['writers']} writers at once {dc['rows_per_s']:,})")
    lake_part = (f"DuckLake, PostgreSQL catalog + local data path {lake['insert_rows_per_s']:,} rows/s (replacing "
                 f"{lake['replace_rows_per_s']:,}; {lc['writers']} writers at once {lc['rows_per_s']:,})"
                 if lake else f"DuckLake not measured: {figures.get('ducklake_missing')}")
    return f"| warehouse load by backend, `replace_balances` of {d['rows']:,} rows | {file_part}; {lake_part} | |"


def checks(figures: dict[str, Any]) -> dict[str, bool]:
    out = {}
    for name in ("duckdb", "duckdb_concurrent", "ducklake", "ducklake_concurrent"):
        if figures.get(name):
            out[f"warehouse load, {name}: every row landed once"] = figures[name]["landed_exactly"] and figures[
                name].get("all_succeeded", True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--writers", type=int, default=None)
    args = parser.parse_args(argv)
    this_month = dt.date.today().replace(day=1)
    months = months_between(add_months(this_month, -1), this_month)
    with tempfile.TemporaryDirectory(prefix="warehouse-bench-") as work:
        figures = measure(Path(work), args.rows, months, args.writers)
    print(json.dumps(figures, indent=1))
    print(render_row(figures))
    return 0 if all(checks(figures).values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
