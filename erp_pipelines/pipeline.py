"""Extract and load, plain Python: the one path the Dagster assets, the benchmarks and scripts share.

- `refresh_clients`: list a credential's clients, apply the client rules, store the registry.
- `load_tenants`: extract many tenants concurrently and write them in batches as they finish,
  so memory stays flat however many tenants a run covers. Yields one `LoadedBatch` per write.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
from collections.abc import AsyncIterator, Iterable, Iterator
from typing import TypeVar

from erp_pipelines.erps.base import Connector
from erp_pipelines.erps.extract import ACCOUNTS, BALANCES, extract_tenants
from erp_pipelines.errors import ClientAccessError
from erp_pipelines.model import Client, TenantExtract, classify_clients
from erp_pipelines.warehouse import ClientRegistryChange, Warehouse

T = TypeVar("T")


def iterate_sync(agen: AsyncIterator[T]) -> Iterator[T]:
    """Drive an async iterator from synchronous code on a private event loop."""
    loop = asyncio.new_event_loop()
    try:
        while True:
            try:
                yield loop.run_until_complete(agen.__anext__())
            except StopAsyncIteration:
                return
    finally:
        loop.run_until_complete(_close(agen))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


async def _close(agen: AsyncIterator) -> None:
    aclose = getattr(agen, "aclose", None)
    if aclose:
        await aclose()


async def refresh_clients(connector: Connector, warehouse: Warehouse) -> tuple[list[Client], ClientRegistryChange]:
    listed = classify_clients(await connector.list_clients())
    return listed, warehouse.record_clients(connector.erp, listed)


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
    tenant_concurrency: int = 32,
) -> AsyncIterator[LoadedBatch]:
    what = tuple(what)
    pending: list[TenantExtract] = []
    failed: list[TenantExtract] = []
    async for extract in extract_tenants(
        connector, clients, what=what, months=months, tenant_concurrency=tenant_concurrency
    ):
        (pending if extract.ok else failed).append(extract)
        if len(pending) >= batch_tenants:
            yield _write(warehouse, connector.erp, pending, failed, what, months, run_id)
            pending, failed = [], []
    if pending or failed:
        yield _write(warehouse, connector.erp, pending, failed, what, months, run_id)


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
    warehouse.record_extraction_outcomes(
        erp,
        succeeded=[e.client.org_number for e in loaded],
        failed={
            e.client.org_number: (str(e.error), isinstance(e.error, ClientAccessError)) for e in failed
        },
    )
    return LoadedBatch(loaded, failed, rows, seconds)
