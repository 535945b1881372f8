"""Extract many tenants of one ERP concurrently, streaming results as they finish.

Plain Python, used by the Dagster assets, the benchmarks and anyone calling the connectors directly.
HTTP concurrency is bounded by the connector's `RateLimiter`; `tenant_concurrency` only bounds
how many tenants are open at once (and so memory). One tenant's failure is captured in its
`TenantExtract.error` and never stops the others. Balance rows that are zero throughout (opening,
movement and closing) are dropped here, for every source alike.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator, Iterable

from erp_pipelines.erps.base import Connector
from erp_pipelines.errors import BadResponse, ErpError, redact
from erp_pipelines.model import Client, TenantExtract, first_repeat

ACCOUNTS = "accounts"
BALANCES = "balances"


async def extract_tenant(
    connector: Connector, client: Client, *, what: Iterable[str], months: list[dt.date]
) -> TenantExtract:
    """One tenant's records, or the error that stopped them (never both).

    After the last read the tenant guard runs (`Connector.verify_tenant`): an ERP that answered
    for another company, from the start or since some point during the reads, is refused, not
    stored. (One check after the reads catches both; a check before them would only fail sooner.) Records that
    repeat a key (an account number, or a period and account) are refused as well: a duplicated
    row must never land."""
    result = TenantExtract(client=client)
    try:
        if ACCOUNTS in what:
            result.accounts = await connector.fetch_accounts(client)
        if BALANCES in what:
            result.balances = [b for b in await connector.fetch_balances(client, months) if not b.is_zero]
            result.findings = await connector.reconciliation_findings(client)
            result.fiscal_year_start_month = connector.fiscal_year_starts.get(client.erp_client_id)
        await connector.verify_tenant(client)
        _refuse_repeated_keys(connector.erp, client, result)
    except ErpError as exc:
        result.error = exc.for_tenant(client.label)
        result.accounts, result.balances, result.findings, result.fiscal_year_start_month = [], [], None, None
    except Exception as exc:  # noqa: BLE001 - a bug or an unexpected payload must stay on its tenant
        result.error = RuntimeError(redact(
            f"{client.label}: unexpected {type(exc).__name__}: {exc} Fix: this is a bug in the "
            f"{connector.erp} connector; retry the partition, and report it with the run's logs if it recurs"
        ))
        result.accounts, result.balances, result.findings, result.fiscal_year_start_month = [], [], None, None
    return result


def _refuse_repeated_keys(erp: str, client: Client, result: TenantExtract) -> None:
    repeated = first_repeat(a.account_number for a in result.accounts)
    if repeated is None:
        repeated = first_repeat((b.period, b.account_number) for b in result.balances)
    if repeated is not None:
        raise BadResponse(
            f"the extract holds {repeated} more than once; nothing was stored",
            erp=erp,
            tenant=client.label,
            fix="retry the partition; if it recurs, the ERP's list is unstable and the connector must be fixed",
        )


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
