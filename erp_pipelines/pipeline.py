"""Extract and load, plain Python: the one path the Dagster assets, the benchmarks and scripts share.

- `refresh_clients`: list every connection's clients, apply the client rules, store the registry.
- `load_tenants`: extract many tenants concurrently and write them in batches as they finish,
  so memory stays flat however many tenants a run covers. Yields one `LoadedBatch` per write.

Both take one connector, or `Connectors` (one per connection of an ERP, `connections.py`): each
connection is listed and extracted with its own connector (its own credential and rate-limit
budget), concurrently; a connection whose credential is refused fails its own tenants only.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import gc
import threading
from collections.abc import AsyncIterator, Awaitable, Iterable, Iterator
from typing import TypeVar

from erp_pipelines.connections import DEFAULT
from erp_pipelines.erps.base import Connector
from erp_pipelines.erps.extract import ACCOUNTS, BALANCES, extract_tenants
from erp_pipelines.errors import AuthError, ClientAccessError, ConfigError, ErpError
from erp_pipelines.model import Client, TenantExtract, apply_number_rules
from erp_pipelines.warehouse import ClientRegistryChange, Warehouse

T = TypeVar("T")


class Connectors(dict[str, Connector]):
    """One ERP's connectors by connection slug (`default` first). Closes like one connector."""

    def __init__(self, erp: str, connectors: dict[str, Connector] | None = None) -> None:
        super().__init__(connectors or {})
        self.erp = erp

    @classmethod
    def of(cls, connector: Connector | Connectors) -> Connectors:
        return connector if isinstance(connector, Connectors) else cls(connector.erp, {DEFAULT: connector})

    async def aclose(self) -> None:
        await asyncio.gather(*(connector.aclose() for connector in self.values()))

    async def tenant_fingerprints(self) -> dict[str, str] | None:
        found = await asyncio.gather(*(connector.tenant_fingerprints() for connector in self.values()))
        return {k: v for each in found if each for k, v in each.items()} if any(found) else None


def connection_error(erp: str, slug: str, error: BaseException) -> BaseException:
    """A refused credential, told as its connection's: the message names the connection and the fix."""
    if not isinstance(error, AuthError):
        return error
    where = (f"the {erp} variables in the environment" if slug == DEFAULT else
             f"erp-pipelines connections remove {erp} --name {slug}, then add it again with the right values")
    return AuthError(f"{erp} connection {slug!r}: {error.detail}", erp=erp,
                     fix=f"{error.fix + '; ' if error.fix else ''}correct this connection's credential: {where}")


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


async def refresh_clients(connector: Connector | Connectors,
                          warehouse: Warehouse) -> tuple[list[Client], ClientRegistryChange]:
    """List the clients of every connection, apply the client rules against the registry (who holds
    which number, through which connection; who the user deactivated) and store them together.
    Returns the listing with its final statuses. A connection whose listing fails keeps its clients
    as they were (`change.failed_connections` says why); when every connection fails, it raises."""
    connectors = Connectors.of(connector)
    slugs = list(connectors)
    answers = await asyncio.gather(*(connectors[slug].list_clients() for slug in slugs), return_exceptions=True)
    listed: list[Client] = []
    failed: dict[str, BaseException] = {}
    for slug, answer in zip(slugs, answers, strict=True):
        if isinstance(answer, BaseException):
            if not isinstance(answer, Exception):
                raise answer
            failed[slug] = connection_error(connectors.erp, slug, answer) if len(slugs) > 1 else answer
            continue
        listed += [dataclasses.replace(c, connection=slug) for c in answer]
    if failed and len(failed) == len(slugs):
        raise next(iter(failed.values()))
    unresolved = [(slug, cid) for slug, c in connectors.items() for cid in c.unresolved_client_ids]
    change = await asyncio.to_thread(warehouse.record_clients, connectors.erp, apply_number_rules(listed),
                                     unresolved=unresolved, failed_connections=failed.keys())
    change.failed_connections = {slug: str(error) for slug, error in failed.items()}
    change.refused_files = await asyncio.to_thread(record_refused_files, connectors, warehouse)
    return change.listed, change


def record_refused_files(connector: Connector | Connectors, warehouse: Warehouse) -> list[dict] | None:
    """File sources (SAF-T: `refused_file_report`) store the files they refused or ignored in the
    warehouse's `refused_files`; returns those rows (None for other sources)."""
    connectors = Connectors.of(connector)
    reports = [report() for c in connectors.values() if (report := getattr(c, "refused_file_report", None))]
    if not reports:
        return None
    rows = [row for found, _ in reports for row in found]
    present = {name: value for _, shown in reports for name, value in shown.items()}
    warehouse.record_refused_files(connectors.erp, rows, present=present)
    return rows


@dataclasses.dataclass
class LoadedBatch:
    """Tenants whose records were written in one transaction, and tenants that failed."""

    loaded: list[TenantExtract]
    failed: list[TenantExtract]
    rows: int
    write_seconds: float


async def load_tenants(
    connector: Connector | Connectors,
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
    at most two batches plus the tenants in flight, however many tenants a run covers.

    With `Connectors`, each client is extracted through its own connection's connector
    (`Client.connection`), the connections concurrently; a client whose connection is not
    configured (removed since the last client refresh) fails, naming the connection."""
    what = tuple(what)
    connectors = Connectors.of(connector)
    warehouse.prepare()  # before any request is in flight (see `Warehouse.prepare`)
    with long_lived_objects_frozen():
        async for batch in _load_tenants(connectors, warehouse, clients, what, months, run_id, batch_tenants,
                                         tenant_concurrency, every_client=not isinstance(connector, Connectors)):
            yield batch


_frozen_lock = threading.Lock()
_frozen_runs = 0


@contextlib.contextmanager
def long_lived_objects_frozen() -> Iterator[None]:
    """While extractions run, the garbage collector leaves the objects that existed before them
    (modules, definitions, the registry) alone: a full collection scanning those paused the event
    loop for 50-150 ms every few seconds, each pause turns of the rate limit lost for good
    (`make bench`, compliance section). Young objects are collected as usual; the frozen ones
    return to the collector when the last extraction of the process ends."""
    global _frozen_runs
    with _frozen_lock:
        if _frozen_runs == 0:
            gc.freeze()
        _frozen_runs += 1
    try:
        yield
    finally:
        with _frozen_lock:
            _frozen_runs -= 1
            if _frozen_runs == 0:
                gc.unfreeze()


async def _load_tenants(connectors: Connectors, warehouse: Warehouse, clients: Iterable[Client],
                        what: tuple[str, ...], months: list[dt.date], run_id: str | None, batch_tenants: int,
                        tenant_concurrency: int, *, every_client: bool) -> AsyncIterator[LoadedBatch]:
    pending: list[TenantExtract] = []
    failed: list[TenantExtract] = []
    writing: asyncio.Future[LoadedBatch] | None = None
    try:
        async for extract in _extract_by_connection(connectors, clients, what, months, tenant_concurrency,
                                                    every_client=every_client):
            (pending if extract.ok else failed).append(extract)
            if len(pending) >= batch_tenants:
                if writing is not None:
                    written, writing = writing, None
                    yield await written
                writing = asyncio.ensure_future(
                    asyncio.to_thread(_write, warehouse, connectors.erp, pending, failed, what, months, run_id)
                )
                pending, failed = [], []
        await asyncio.to_thread(record_refused_files, connectors, warehouse)  # e.g. files failing the XSD
        if writing is not None:
            written, writing = writing, None
            yield await written
        if pending or failed:
            yield await asyncio.to_thread(_write, warehouse, connectors.erp, pending, failed, what, months, run_id)
    finally:
        if writing is not None:  # never leave a write running behind: wait for it (its result stands)
            await asyncio.shield(writing)


async def _extract_by_connection(connectors: Connectors, clients: Iterable[Client], what: tuple[str, ...],
                                 months: list[dt.date], tenant_concurrency: int, *,
                                 every_client: bool = False) -> AsyncIterator[TenantExtract]:
    """`extract_tenants` per connection, concurrently, merged as tenants finish. `every_client`:
    one connector was given, and it serves every client whatever its connection."""
    groups: dict[str, list[Client]] = {}
    for client in clients:
        groups.setdefault(DEFAULT if every_client else client.connection, []).append(client)
    unknown = {slug: group for slug, group in groups.items() if slug not in connectors}
    for slug, group in unknown.items():
        error = ConfigError(f"{connectors.erp} connection {slug!r} is not configured (removed?)", erp=connectors.erp,
                            fix=f"add it again (erp-pipelines connections add {connectors.erp} --name ...), or "
                            f"refresh {connectors.erp}/clients so its tenants show as revoked")
        for client in group:
            yield TenantExtract(client, error=error)
    streams = [(slug, group) for slug, group in groups.items() if slug in connectors]
    if len(streams) == 1:
        slug, group = streams[0]
        async for extract in extract_tenants(connectors[slug], group, what=what, months=months,
                                             tenant_concurrency=tenant_concurrency):
            yield _told_as_connection(connectors, slug, extract)
        return
    queue: asyncio.Queue = asyncio.Queue()  # holds finished tenants only: each stream bounds its own
    finished = object()

    async def pump(slug: str, group: list[Client]) -> None:
        try:
            async for extract in extract_tenants(connectors[slug], group, what=what, months=months,
                                                 tenant_concurrency=tenant_concurrency):
                queue.put_nowait(_told_as_connection(connectors, slug, extract))
        finally:
            queue.put_nowait(finished)

    tasks = [asyncio.ensure_future(pump(slug, group)) for slug, group in streams]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is finished:
                remaining -= 1
                done = [task for task in tasks if task.done() and task.exception() is not None]
                if done:
                    raise done[0].exception()
                continue
            yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _told_as_connection(connectors: Connectors, slug: str, extract: TenantExtract) -> TenantExtract:
    """A refused credential names its connection when an ERP has several (or it is not `default`)."""
    if isinstance(extract.error, ErpError) and (len(connectors) > 1 or slug != DEFAULT):
        return dataclasses.replace(extract, error=connection_error(connectors.erp, slug, extract.error))
    return extract


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
