"""The contract every ERP connector implements. Plain Python: no Dagster imports.

A connector turns one credential into canonical records (`erp_pipelines.model`):

- `list_clients()`: every tenant the credential reaches, unvalidated (the client rules in
  `model.classify_clients` are applied by the caller, identically for every ERP);
- `fetch_accounts(client)`: the chart of accounts;
- `fetch_balances(client, months)`: per account per month (first-of-month dates): opening,
  movement and closing as `Decimal` NOK, debit positive.

After a tenant's last read, `extract.extract_tenant` asks the connector to confirm the ERP acted
for that tenant (`verify_tenant`), for every ERP: an identity that is wrong, or that changed while
the data was read, refuses the data instead of storing it under the wrong company.
"""

from __future__ import annotations

import abc
import dataclasses
import datetime as dt
from typing import Any, ClassVar

from erp_pipelines.model import Account, Balance, Client


@dataclasses.dataclass(frozen=True)
class Setting:
    """One configuration value of an ERP, read from the environment variable `env`."""

    field: str
    env: str
    secret: bool = False
    required: bool = True
    default: str | None = None
    description: str = ""


@dataclasses.dataclass(frozen=True)
class RateLimit:
    """An ERP's published limit per credential. `requests_per_second=None` means "follow the
    response headers". `max_in_flight` is the published concurrency cap, or, when the ERP publishes
    none, where the limiter starts: it may then raise concurrency up to `in_flight_ceiling` when
    latency dominates (see `http.RateLimiter`)."""

    requests_per_second: float | None = None
    max_in_flight: int = 8
    source: str = ""
    in_flight_ceiling: int | None = None  # None: max_in_flight is a hard cap


# Each ERP's published limit per credential, in one place (facts: shared/erp-api/<erp>/NOTES.md).
# A connector sets `rate_limit = PUBLISHED_RATE_LIMITS["<erp>"]`; the benchmark's sandbox enforces
# the same numbers. Where a vendor publishes no concurrency cap we start at 16 in flight and let
# the limiter go up to 64 when latency dominates.
PUBLISHED_RATE_LIMITS: dict[str, RateLimit] = {
    "tripletex": RateLimit(
        None, 16, "X-Rate-Limit-Limit/-Remaining/-Reset headers, per employee token per API consumer; "
        "numbers unpublished; the 429 carries no reset header", in_flight_ceiling=64,
    ),
    "vismanet": RateLimit(
        None, 16, "X-RateLimit-Limit/-Remaining/-Reset headers, fixed window per company and client; "
        "numbers unpublished", in_flight_ceiling=64,
    ),
    "poweroffice": RateLimit(
        10.0, 16, "10 requests/s per subscription key, shared by all client keys", in_flight_ceiling=64,
    ),
    "fiken": RateLimit(4.0, 1, "1 request in flight and 4 requests/s per user (more may be slowed or banned)"),
    "eaccounting": RateLimit(
        10.0, 16, "600 requests/minute per client and endpoint; no rate-limit headers", in_flight_ceiling=64,
    ),
    "businessnxt": RateLimit(10.0, 60, "600 requests/minute per token; 60 in flight per company"),
}


class Connector(abc.ABC):
    """Base class of every connector. Subclasses set the class attributes and the three methods."""

    erp: ClassVar[str]
    display_name: ClassVar[str]
    settings: ClassVar[tuple[Setting, ...]]
    rate_limit: ClassVar[RateLimit]
    scheduled_refresh: ClassVar[bool] = True  # False for sources that only change when files arrive
    full_sync_by_default: ClassVar[bool] = False  # file sources: a partition imports all its months
    default_history_start: ClassVar[str] = "2023-01-01"  # first month of a full sync (<ERP>_HISTORY_START)
    sensor_interval_seconds: ClassVar[int] = 300
    uses_token_store: ClassVar[bool] = False  # True: the constructor takes `token_store=` (tokens.py)

    def __init__(self, **config: Any) -> None:
        self.config = config

    @abc.abstractmethod
    async def list_clients(self) -> list[Client]: ...

    @abc.abstractmethod
    async def fetch_accounts(self, client: Client) -> list[Account]: ...

    @abc.abstractmethod
    async def fetch_balances(self, client: Client, months: list[dt.date]) -> list[Balance]: ...

    async def verify_tenant(self, client: Client) -> None:
        """Raise `TenantMismatch` unless the ERP says it is answering for `client` (organisation
        number, company id). API connectors implement it; sources whose records carry their own
        identity (SAF-T files) check it while parsing and keep this no-op."""

    async def reconciliation_findings(self, client: Client) -> list[dict[str, Any]] | None:
        """Rows for the warehouse's `reconciliation` table (totals the ERP reports vs the records),
        or None when the source reports no totals to reconcile against."""
        return None

    async def tenant_fingerprints(self) -> dict[str, str] | None:
        """erp_client_id → a hash of the tenant's source content, for sources whose content can be
        fingerprinted cheaply (files). A changed fingerprint makes the sensor request a re-import."""
        return None

    async def aclose(self) -> None:
        """Release connections. Safe to call twice."""

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()
