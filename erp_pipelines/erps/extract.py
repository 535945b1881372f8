"""Extract many tenants of one ERP concurrently, streaming results as they finish.

Plain Python, used by the Dagster assets, the benchmarks and anyone calling the connectors directly.
HTTP concurrency is bounded by the connector's `RateLimiter`; `tenant_concurrency` only bounds
how many tenants are open at once (and so memory). One tenant's failure is captured in its
`TenantExtract.error` and never stops the others.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator, Iterable

from erp_pipelines.erps.base import Connector
from erp_pipelines.errors import ErpError
from erp_pipelines.model import Client, TenantExtract

ACCOUNTS = "accounts"
BALANCES = "balances"


async def extract_tenant(
    connector: Connector, client: Client, *, what: Iterable[str], months: list[dt.date]
) -> TenantExtract:
    result = TenantExtract(client=client)
    try:
        if ACCOUNTS in what:
            result.accounts = await connector.fetch_accounts(client)
        if BALANCES in what:
            result.balances = await connector.fetch_balances(client, months)
    except ErpError as exc:
        result.error = exc.for_tenant(client.label)
        result.accounts, result.balances = [], []
    except Exception as exc:  # a bug or an unexpected payload must still stay on its tenant
        result.error = RuntimeError(f"{client.label}: unexpected {type(exc).__name__}: {exc}")
        result.accounts, result.balances = [], []
    return result


async def extract_tenants(
    connector: Connector,
    clients: Iterable[Client],
    *,
    what: Iterable[str] = (ACCOUNTS, BALANCES),
    months: list[dt.date] | None = None,
    tenant_concurrency: int = 32,
) -> AsyncIterator[TenantExtract]:
    """Yield each tenant's extract as soon as it is complete (completion order)."""
    what = tuple(what)
    months = months or []
    pending: set[asyncio.Task[TenantExtract]] = set()
    try:
        for client in clients:
            if len(pending) >= tenant_concurrency:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    yield task.result()
            pending.add(asyncio.create_task(extract_tenant(connector, client, what=what, months=months)))
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                yield task.result()
    finally:
        for task in pending:
            task.cancel()
