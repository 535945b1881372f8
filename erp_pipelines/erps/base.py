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

import httpx

from erp_pipelines.erps.kit.client import ApiClient, RetryPolicy
from erp_pipelines.erps.kit.throttle import RateLimit, Throttle
from erp_pipelines.errors import BadResponse, ErpError, TenantMismatch, register_secret
from erp_pipelines.model import Account, Balance, Client, normalise_tenant_id
from erp_pipelines.tokens import TokenStore, credential_key


@dataclasses.dataclass(frozen=True)
class Setting:
    """One configuration value of an ERP, read from the environment variable `env`."""

    field: str
    env: str
    secret: bool = False
    required: bool = True
    default: str | None = None
    description: str = ""
    url_path: str | None = None  # a URL setting's expected path (e.g. "/v2"), checked at load time


@dataclasses.dataclass(frozen=True)
class BilingualFix:
    """A fix for the customer, in Norwegian (their ERP's words) with an English line."""

    norwegian: str
    english: str


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
    uses_token_store: ClassVar[bool] = False  # True: it keeps tokens in the store (tokens.py) across runs
    # what the customer must tick or create when a listed client refuses API access (the onboarding
    # step), as `erp-pipelines doctor` prints it; None: the error's own fix says it
    onboarding_fix: ClassVar[BilingualFix | None] = None

    def __init__(
        self,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        throttle: Throttle | None = None,
        retry: RetryPolicy | None = None,
        timeout: float = 60.0,
        page_size: int | None = None,
        token_store: TokenStore | None = None,
        **config: Any,
    ) -> None:
        """`config`: the settings' values (secret ones register for redaction here, once for all);
        the options are the same for every connector (tests, chaos and bench pass them alike)."""
        self.config = config
        register_secret(*(str(config[s.field]) for s in self.settings if s.secret and config.get(s.field)))
        self.transport, self.throttle, self.retry = transport, throttle, retry
        self.timeout, self.page_size, self.token_store = timeout, page_size, token_store
        self.unresolved_client_ids: set[str] = set()  # listed clients the ERP could not describe just now
        # erp_client_id → first month (1-12) of its fiscal year, where the ERP tells; set by fetch_balances
        self.fiscal_year_starts: dict[str, int] = {}
        self.refused_clients: dict[str, ErpError] = {}  # configured clients the ERP refuses (not listed)

    def api_client(self, base_url: str, *credential: str, **hooks: Any) -> ApiClient:
        """The kit's client for this connector: its options, and the process's one throttle for
        the credential (`credential`: the parts that identify it, hashed; never logged)."""
        return ApiClient(
            erp=self.erp, base_url=base_url, throttle=self.throttle or self.shared_throttle(*credential),
            retry=self.retry, transport=self.transport, timeout=self.timeout, url_variables=self.url_variables(),
            **hooks,
        )

    def url_variables(self) -> dict[str, str]:
        """Each configured URL → its environment variable (named when its host cannot be reached)."""
        return {str(self.config[s.field]).strip(): s.env for s in self.settings
                if s.field.endswith("url") and self.config.get(s.field)}

    def __repr__(self) -> str:  # never a secret
        shown = {s.field: self.config.get(s.field) for s in self.settings if not s.secret and s.field in self.config}
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in shown.items())})"

    def shared_throttle(self, *credential: str) -> Throttle:
        """The process's one throttle for this credential (hashed; every tenant shares it)."""
        return Throttle.shared(credential_key(f"{self.erp}-throttle", *credential), self.rate_limit)

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
        api = getattr(self, "api", None)
        if api is not None:
            await api.aclose()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()


def stated_org_number(raw: Any) -> str:
    """An organisation number as an ERP states it: normalised when valid, else as given (the client
    rules and the tenant guard then name it as given)."""
    value = str(raw or "")
    try:
        return normalise_tenant_id(value)
    except ValueError:
        return value


def require_same_company(client: Client, name: str, reported: str, *, source: str, erp: str, fix: str) -> None:
    """The tenant guard's comparison: the organisation number the ERP states (`reported`, normalised
    when valid) must be the partition's; otherwise `TenantMismatch` and nothing is stored."""
    reported = stated_org_number(reported)
    if reported != client.org_number:
        raise TenantMismatch(
            f"{source} answered for {name} (orgnr {reported or 'none'}) instead of this tenant; nothing was stored",
            erp=erp, tenant=client.label, fix=fix,
        )


def require_fields(row: Any, keys: tuple[str, ...], *, where: str, erp: str, tenant: str | None) -> None:
    """Unknown fields are tolerated; a missing required one is refused (schema drift)."""
    if not isinstance(row, dict):
        raise BadResponse(f"{where}: expected an object, got {type(row).__name__}", erp=erp, tenant=tenant)
    missing = [key for key in keys if row.get(key) is None]
    if missing:
        raise BadResponse(
            f"{where}: required field(s) {', '.join(missing)} missing from the response", erp=erp, tenant=tenant,
            fix="the API contract changed; update the connector before re-running",
        )
