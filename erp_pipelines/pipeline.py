"""Extract and load, plain Python: the one path the Dagster assets, the benchmarks and scripts share.

- `refresh_clients`: list a credential's clients, apply the client rules, store the registry.
- `load_tenants`: extract many tenants concurrently and write them in batches as they finish,
  so memory stays flat however many tenants a run covers. Yields one `LoadedBatch` per write.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import threading
from collections.abc import AsyncIterator, Awaitable, Iterable, Iterator
from typing import TypeVar

from erp_pipelines.erps.base import Connector
from erp_pipelines.erps.extract import ACCOUNTS, BALANCES, extract_tenants
from erp_pipelines.errors import ClientAccessError
from erp_pipelines.model import Client, TenantExtract, apply_number_rules
from erp_pipelines.warehouse import ClientRegistryChange, Warehouse

T = TypeVar("T")


def iterate_sync(agen: AsyncIterator[T]) -> Iterator[T]:
    """Drive an async iterator from synchronous code, on a private event loop in its own thread.

    The next item is produced while the caller works on the current one (one item ahead), and the
    loop keeps serving requests in flight meanwhile: the caller's work (Dagster events, say) does
    not stall the extraction. Leaving early cancels whatever still runs and closes the iterator."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="iterate-sync-loop", daemon=True)
    thread.start()

    async def advance() -> T:
        return await agen.__anext__()

    try:
        ahead = asyncio.run_coroutine_threadsafe(advance(), loop)
        while True:
            try:
                item = ahead.result()
            except StopAsyncIteration:
                return
            ahead = asyncio.run_coroutine_threadsafe(advance(), loop)
            yield item
    finally:
        asyncio.run_coroutine_threadsafe(_shutdown(agen), loop).result()
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()


async def _shutdown(agen: AsyncIterator) -> None:
    """Cancel every other task of the private loop (an item being produced), then close `agen`."""
    others = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
    for task in others:
        task.cancel()
    await asyncio.gather(*others, return_exceptions=True)
    await _close(agen)
    await asyncio.get_running_loop().shutdown_asyncgens()


async def _close(agen: AsyncIterator) -> None:
    aclose = getattr(agen, "aclose", None)
    if aclose:
        await aclose()


async def await_then_close(connector: Connector, awaitable: Awaitable[T]) -> T:
    """Await, then close the connector (on the same event loop)."""
    try:
        return await awaitable
    finally:
        await connector.aclose()


async def iterate_then_close(connector: Connector, items: AsyncIterator[T]) -> AsyncIterator[T]:
    """Iterate, then close the connector (on the same event loop), however the iteration ends."""
    try:
        async for item in items:
            yield item
    finally:
        await connector.aclose()


async def refresh_clients(connector: Connector, warehouse: Warehouse) -> tuple[list[Client], ClientRegistryChange]:
    """List the clients, apply the client rules against the registry (who holds which number,
    who the user deactivated) and store them. Returns the listing with its final statuses."""
    listed = apply_number_rules(await connector.list_clients())
    change = warehouse.record_clients(connector.erp, listed, unresolved=connector.unresolved_client_ids)
    change.refused_files = await asyncio.to_thread(record_refused_files, connector, warehouse)
    return change.listed, change


def record_refused_files(connector: Connector, warehouse: Warehouse) -> list[dict] | None:
    """File sources (SAF-T: `refused_file_report`) store the files they refused or ignored in the
    warehouse's `refused_files`; returns those rows (None for other sources)."""
    report = getattr(connector, "refused_file_report", None)
    if report is None:
        return None
    rows, present = report()
    warehouse.record_refused_files(connector.erp, rows, present=present)
    return rows


@dataclasses.dataclass
class LoadedBatch:
    """Tenants whose records were written in one transaction, and tenants that failed."""

    loaded: list[TenantExtract]
    failed: list[TenantExtract]
    rows: int
    write_seconds: float


async def load_tenants(
    connector: Connector,
    warehouse: Warehouse,
    clients: Iterable[Client],
    *,
    what: Iterable[str],
    months: list[dt.date],
    run_id: str | None = None,
    batch_tenants: int = 200,
    tenant_concurrency: int = 64,
) -> AsyncIterator[LoadedBatch]:
    """Extract `clients` and write them in batches of `batch_tenants`, yielding each batch once it
    is written. A batch is written in a worker thread while the next one is extracted (at most one
    write at a time), so the event loop keeps serving requests during DuckDB writes; memory holds
    at most two batches plus the tenants in flight, however many tenants a run covers."""
    what = tuple(what)
    warehouse.prepare()  # before any request is in flight (see `Warehouse.prepare`)
    pending: list[TenantExtract] = []
    failed: list[TenantExtract] = []
    writing: asyncio.Future[LoadedBatch] | None = None
    try:
        async for extract in extract_tenants(
            connector, clients, what=what, months=months, tenant_concurrency=tenant_concurrency
        ):
            (pending if extract.ok else failed).append(extract)
            if len(pending) >= batch_tenants:
                if writing is not None:
                    written, writing = writing, None
                    yield await written
                writing = asyncio.ensure_future(
                    asyncio.to_thread(_write, warehouse, connector.erp, pending, failed, what, months, run_id)
                )
                pending, failed = [], []
        await asyncio.to_thread(record_refused_files, connector, warehouse)  # e.g. files failing the XSD
        if writing is not None:
            written, writing = writing, None
            yield await written
        if pending or failed:
            yield await asyncio.to_thread(_write, warehouse, connector.erp, pending, failed, what, months, run_id)
    finally:
        if writing is not None:  # never leave a write running behind: wait for it (its result stands)
            await asyncio.shield(writing)


def _write(
    warehouse: Warehouse,
    erp: str,
    loaded: list[TenantExtract],
    failed: list[TenantExtract],
    what: tuple[str, ...],
    months: list[dt.date],
    run_id: str | None,
) -> LoadedBatch:
    rows, seconds = 0, 0.0
    if loaded and ACCOUNTS in what:
        result = warehouse.replace_accounts(erp, {e.client.org_number: e.accounts for e in loaded}, run_id=run_id)
        rows, seconds = rows + result.rows, seconds + result.seconds
    if loaded and BALANCES in what:
        result = warehouse.replace_balances(
            erp, {e.client.org_number: e.balances for e in loaded}, months, run_id=run_id
        )
        rows, seconds = rows + result.rows, seconds + result.seconds
        findings = {e.client.org_number: e.findings for e in loaded if e.findings is not None}
        if findings:
            warehouse.replace_reconciliation(erp, findings, run_id=run_id)
    warehouse.record_extraction_outcomes(
        erp,
        succeeded=[e.client.org_number for e in loaded],
        failed={
            e.client.org_number: (str(e.error), isinstance(e.error, ClientAccessError)) for e in failed
        },
        fiscal_year_starts={e.client.org_number: e.fiscal_year_start_month for e in loaded if e.fiscal_year_start_month},
    )
    return LoadedBatch(loaded, failed, rows, seconds)
