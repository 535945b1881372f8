"""PowerOffice Go API v2 connector (facts: specs/poweroffice/NOTES.md).

- Auth: OAuth2 client credentials per client: HTTP Basic `applicationKey:clientKey` at the token
  URL, then Bearer; the subscription key (`Ocp-Apim-Subscription-Key`) on every call, token calls
  included. One token per client key; tokens are short-lived (`expires_in`).
- Tenants: one client key per client company (`POWEROFFICE_CLIENT_KEYS`); the organisation
  number from `/OrganizationSettings`. A tenant is named by a hash of its client key, never the key.
- Balances: `/TrialBalance?date=` is cumulative and inclusive at a date; the month ends give
  opening and movement, profit and loss restarting at the fiscal year's start
  (`/FinancialSettings` `FinancialYearEndMonth`).
- Limits: 10 requests per second per subscription key, shared by all client keys and token calls.
"""

from __future__ import annotations

import calendar
import datetime as dt
import hashlib
import logging
from decimal import Decimal
from typing import Any

import httpx

from erp_pipelines.accounts import AccountClass, classify_account
from erp_pipelines.erps.base import BilingualFix, Connector, Setting, require_fields, stated_org_number
from erp_pipelines.erps.kit import (
    ClientCredentials,
    PageNumber,
    RateLimit,
    Reply,
    RequestContext,
    gather_all,
    read_all,
)
from erp_pipelines.erps.kit.balances import balances_from_closings, month_ends
from erp_pipelines.errors import (
    AuthError,
    BadResponse,
    ClientAccessError,
    ConfigError,
    ErpError,
    RateLimited,
    TenantMismatch,
    UpstreamError,
)
from erp_pipelines.model import CENT, Account, Balance, Client
from erp_pipelines.tokens import credential_key

log = logging.getLogger(__name__)

PAGE_SIZE = 5000  # the documented default (NOTES §6)
# `GeneralLedgerAccountType` (NOTES) → account class, for numbers outside NS 4102
ACCOUNT_TYPE_CLASSES: dict[str, AccountClass] = {
    "Asset": "asset", "Liability": "liability", "Equity": "equity", "Income": "income", "Expense": "expense",
}
RATE_LIMIT = RateLimit(
    requests_per_second=10.0,
    source="10 requests/s per subscription key, shared by all client keys, token calls included (NOTES §7)",
)
SUBSCRIPTION_HEADER = "Ocp-Apim-Subscription-Key"
MONTHS = {name: number for number, name in enumerate(calendar.month_name) if name}

REACTIVATE_FIX = (
    "The client has removed or deactivated this integration: in PowerOffice Go, go to Innstillinger → "
    "Utvidelser and activate the integration again, then send us its new client key (POWEROFFICE_CLIENT_KEYS). "
    "/ Reactivate the integration under PowerOffice Go → Settings → Extensions."
)
PRIVILEGE_FIX = (
    "The client lacks a Go module this integration needs: check /ClientIntegrationInformation's "
    "InvalidPrivileges and ask the client to add the module (PowerOffice Go → Innstillinger → Utvidelser)."
)
KEYS_FIX = (
    "Check POWEROFFICE_APPLICATION_KEY and POWEROFFICE_SUBSCRIPTION_KEY (developer portal) and that the keys "
    "and POWEROFFICE_TOKEN_URL belong to the same environment (demo and production are separate)."
)


class PowerOfficeConnector(Connector):
    erp = "poweroffice"
    display_name = "PowerOffice Go"
    settings = (
        Setting("base_url", "POWEROFFICE_BASE_URL", default="https://goapi.poweroffice.net/v2",
                description="API base URL", url_path="/v2"),
        Setting("token_url", "POWEROFFICE_TOKEN_URL", default="https://goapi.poweroffice.net/OAuth/Token",
                description="OAuth token URL (demo: https://goapi.poweroffice.net/Demo/OAuth/Token)"),
        Setting("application_key", "POWEROFFICE_APPLICATION_KEY", secret=True,
                description="the integration's application key"),
        Setting("subscription_key", "POWEROFFICE_SUBSCRIPTION_KEY", secret=True,
                description="the API product subscription key (developer portal)"),
        Setting("client_keys", "POWEROFFICE_CLIENT_KEYS", secret=True,
                description="comma-separated client keys, one per client company that activated the integration"),
    )
    rate_limit = RATE_LIMIT
    onboarding_fix = BilingualFix(
        norwegian="I klientens PowerOffice Go: gå til Innstillinger → Utvidelser og aktiver integrasjonen "
                  "(med modulene den trenger), og send oss den nye klientnøkkelen (POWEROFFICE_CLIENT_KEYS).",
        english="In the client's PowerOffice Go, activate the integration under Settings → Extensions "
                "(with the modules it needs) and send us its new client key (POWEROFFICE_CLIENT_KEYS).",
    )
    uses_token_store = True  # access tokens are reused across runs until they expire

    def __init__(self, *, base_url: str, token_url: str, application_key: str, subscription_key: str,
                 client_keys: str, **options: Any) -> None:
        super().__init__(base_url=base_url, token_url=token_url, application_key=application_key,
                         subscription_key=subscription_key, client_keys=client_keys, **options)
        keys = [key.strip() for key in client_keys.split(",") if key.strip()]
        if not keys:
            raise ConfigError("POWEROFFICE_CLIENT_KEYS holds no client key", erp=self.erp,
                              fix="set POWEROFFICE_CLIENT_KEYS to the client keys, comma-separated")
        self._keys = {client_id(key): key for key in keys}
        self._page_size = self.page_size or PAGE_SIZE
        self.api = self.api_client(base_url, base_url, subscription_key, map_error=_map_error,
                                   headers={SUBSCRIPTION_HEADER: subscription_key})
        self._tokens: dict[str, ClientCredentials] = {}
        self._fiscal_start: dict[str, int] = {}

    @property
    def tokens_minted(self) -> int:
        return sum(auth.minted for auth in self._tokens.values())

    def _auth(self, erp_client_id: str, tenant: str | None) -> ClientCredentials:
        auth = self._tokens.get(erp_client_id)
        if auth is None:
            key = self._keys.get(erp_client_id)
            if key is None:
                raise ClientAccessError("no client key for this client is configured", erp=self.erp, tenant=tenant,
                                        fix=REACTIVATE_FIX)
            auth = self._tokens[erp_client_id] = ClientCredentials(
                self.api, self.config["token_url"], self.config["application_key"], key,
                refused=lambda response, body: _refused(response, body, tenant),
                headers={SUBSCRIPTION_HEADER: self.config["subscription_key"]},
                store=self.token_store,
                store_entry=credential_key("poweroffice-token", self.config["token_url"],
                                           self.config["application_key"], key),
            )
        return auth

    async def _get(self, client: Client | str, path: str, params: dict[str, Any] | None = None) -> Any:
        erp_client_id, tenant = (client, None) if isinstance(client, str) else (client.erp_client_id, client.label)
        return await self.api.get_json(path, params=params, auth=self._auth(erp_client_id, tenant), tenant=tenant)

    async def _pages(self, client: Client, path: str, params: dict[str, Any], identity) -> list[Any]:
        auth = self._auth(client.erp_client_id, client.label)

        async def fetch(query: dict[str, Any]) -> Reply:
            return await self.api.reply("GET", path, params=query, auth=auth, tenant=client.label)

        style = PageNumber(self._page_size, page_param="PageNumber", size_param="PageSize", first_page=1,
                           pagination_header="X-Pagination")
        try:
            return await read_all(fetch, style, params=params, where=f"GET {path}", erp=self.erp,
                                  tenant=client.label, identity=lambda row: identity(row) if isinstance(row, dict) else None)
        except ErpError as exc:
            raise exc.for_tenant(client.label)

    # ------------------------------------------------------------------ the contract

    async def list_clients(self) -> list[Client]:
        """One client per client key. A refused key is left out (reported in the log without the key,
        and its tenant is then marked revoked); all keys refused is the credential's own fault."""
        listed = await gather_all(*(self._organisation(erp_client_id) for erp_client_id in self._keys))
        clients = [client for client in listed if client is not None]
        if not clients and not self.unresolved_client_ids:
            raise AuthError("PowerOffice refuses every client key", erp=self.erp, fix=KEYS_FIX)
        return clients

    async def _organisation(self, erp_client_id: str) -> Client | None:
        try:
            settings = await self._get(erp_client_id, "OrganizationSettings")
        except ClientAccessError as exc:  # the client removed the integration: no longer listed
            log.warning("poweroffice client %s: %s", erp_client_id, exc)
            self.refused_clients[erp_client_id] = exc
            return None
        except (UpstreamError, RateLimited, BadResponse) as exc:  # passing: its registry entry stays
            log.warning("poweroffice client %s could not be described now: %s", erp_client_id, exc)
            self.unresolved_client_ids.add(erp_client_id)
            return None
        require_fields(settings, ("Name",), where="OrganizationSettings", erp=self.erp, tenant=None)
        return Client(erp=self.erp, org_number=str(settings.get("OrganizationNumber") or ""),
                      erp_client_id=erp_client_id, name=str(settings["Name"]))

    async def fetch_accounts(self, client: Client) -> list[Account]:
        rows = await self._pages(client, "GeneralLedgerAccounts", {}, lambda row: row.get("AccountNo"))
        accounts = []
        for row in rows:
            require_fields(row, ("AccountNo", "Name"), where="GeneralLedgerAccounts", erp=self.erp, tenant=client.label)
            number, kind = str(row["AccountNo"]), row.get("GeneralLedgerAccountType")
            accounts.append(Account(account_number=number, name=str(row["Name"]), account_type=kind,
                                    account_class=classify_account(number, kind, type_classes=ACCOUNT_TYPE_CLASSES)))
        return accounts

    async def fetch_balances(self, client: Client, months: list[dt.date]) -> list[Balance]:
        fiscal_start = self.fiscal_year_starts[client.erp_client_id] = await self._fiscal_year_start(client)
        closings = await gather_all(*(self._trial_balance(client, day) for day in month_ends(months)))
        return balances_from_closings(months, closings, fiscal_year_start_month=fiscal_start)

    async def _fiscal_year_start(self, client: Client) -> int:
        if client.erp_client_id not in self._fiscal_start:
            settings = await self._get(client, "FinancialSettings")
            end = MONTHS.get(str((settings or {}).get("FinancialYearEndMonth") or "December"))
            if end is None:
                raise BadResponse(f"FinancialSettings: unknown FinancialYearEndMonth "
                                  f"{settings.get('FinancialYearEndMonth')!r}", erp=self.erp, tenant=client.label)
            self._fiscal_start[client.erp_client_id] = end % 12 + 1
        return self._fiscal_start[client.erp_client_id]

    async def _trial_balance(self, client: Client, day: dt.date) -> dict[str, Decimal]:
        rows = await self._pages(client, "TrialBalance", {"date": day.isoformat()}, lambda row: row.get("AccountNo"))
        closing: dict[str, Decimal] = {}
        for row in rows:
            require_fields(row, ("AccountNo", "Balance"), where="TrialBalance", erp=self.erp, tenant=client.label)
            # Balance is a JSON number in NOK (decoded exactly); debit positive is UNCONFIRMED (NOTES §5)
            closing[str(row["AccountNo"])] = Decimal(row["Balance"]).quantize(CENT)
        return closing

    async def verify_tenant(self, client: Client) -> None:
        settings = await self._get(client, "OrganizationSettings")
        require_fields(settings, ("Name",), where="OrganizationSettings", erp=self.erp, tenant=client.label)
        reported = stated_org_number(settings.get("OrganizationNumber"))
        if reported != client.org_number:
            raise TenantMismatch(
                f"PowerOffice answered for {settings['Name']} (orgnr {reported or 'none'}) instead of this tenant; "
                "nothing was stored",
                erp=self.erp, tenant=client.label,
                fix="check the client's organisation number in PowerOffice Go and that its client key in "
                "POWEROFFICE_CLIENT_KEYS belongs to this client",
            )


def client_id(client_key: str) -> str:
    """A tenant's id: a hash of its client key (the key itself is a secret)."""
    return "key-" + hashlib.sha256(client_key.encode()).hexdigest()[:12]


def _refused(response: httpx.Response, body: Any, tenant: str | None) -> ErpError:
    """The token endpoint's refusal: `invalid_client` means the client removed our integration."""
    code = body.get("error") if isinstance(body, dict) else None
    if response.status_code == 400 and code == "invalid_client":
        return ClientAccessError("PowerOffice refuses this client's key (invalid_client)", erp="poweroffice",
                                 tenant=tenant, fix=REACTIVATE_FIX)
    return AuthError(f"the token endpoint refused the keys (HTTP {response.status_code}"
                     + (f", {code})" if code else ")"), erp="poweroffice", fix=KEYS_FIX)


def _map_error(response: httpx.Response, body: Any, context: RequestContext) -> ErpError | None:
    """ProblemDetails (PascalCase, NOTES §8) to the error taxonomy."""
    status = response.status_code
    title = body.get("Title") if isinstance(body, dict) else None
    detail = f"HTTP {status}" + (f": {title}" if title else "")
    if status == 401:
        if context.tenant:
            return ClientAccessError(f"PowerOffice refuses this client's token ({detail})", erp="poweroffice",
                                     fix=REACTIVATE_FIX)
        return AuthError(f"PowerOffice refuses the request ({detail})", erp="poweroffice", fix=KEYS_FIX)
    if status == 403:
        return ClientAccessError(f"PowerOffice refuses the request ({detail})", erp="poweroffice", fix=PRIVILEGE_FIX)
    if status >= 500 or status == 429:
        return None  # retried
    return BadResponse(f"request rejected ({detail})", erp="poweroffice",
                       fix="check POWEROFFICE_BASE_URL: it must end in /v2 (e.g. https://goapi.poweroffice.net/v2)")
