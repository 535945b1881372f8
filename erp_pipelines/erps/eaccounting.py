"""Visma eAccounting API v2 connector (facts: specs/eaccounting/NOTES.md).

- Auth: OAuth2 authorisation code at Visma's identity server, one grant per company: the user picks
  the company at login (`acr_values=... forceselectcompany:true`). `erp-pipelines consent
  eaccounting` runs once per company; each company's tokens live in the token store under their own
  entry, beside an index of the consented companies (name, organisation number).
- Refresh tokens rotate and the old one dies at once (NOTES §2, pitfall 1): the kit's
  `RefreshingToken` refreshes under a cross-process lock per company, re-reads the store after taking
  it and stores the new tokens durably before the access token is used.
- Tenants: the consented companies; name and organisation number from `/companysettings` (a sales
  scope endpoint: the consent asks for `ea:sales_readonly` too).
- Balances: `/accountbalances/{date}` gives balances at the end of a date; those at each month end
  (and the one before the window) give opening and movement, profit and loss restarting in the first
  month of the fiscal year that `/fiscalyears` reports.
- Limits: 600 requests per minute per client and endpoint (NOTES §7). One throttle per company
  consent, paced under 600/min over all its endpoints together: within the limit whatever the API
  counts as one endpoint (every `/accountbalances/{date}` one bucket or many).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Mapping
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any

import httpx

from erp_pipelines.erps.base import BilingualFix, Connector, Setting, require_fields, stated_org_number
from erp_pipelines.erps.kit import (
    ApiClient,
    OAuthApp,
    PageNumber,
    RateLimit,
    RefreshingToken,
    Reply,
    RequestContext,
    StaticToken,
    Token,
    TokenAuth,
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
    TenantMismatch,
)
from erp_pipelines.model import Account, Balance, Client, ClientStatus, normalise_tenant_id
from erp_pipelines.tokens import credential_key

ERP = "eaccounting"
# UNCONFIRMED (NOTES §6): the maximum page size; the default is 50, 1000 is commonly cited
PAGE_SIZE = 200
RATE_LIMIT = RateLimit(
    requests_per_second=10.0,
    source="600 requests per minute per client and endpoint (NOTES §7); paced per company over all endpoints",
)
# UNCONFIRMED (NOTES §6): the OData parameter names `$page`/`$pagesize` (1-based) from no primary source
PAGING = PageNumber(PAGE_SIZE, page_param="$page", size_param="$pagesize", first_page=1, items_key="Data",
                    meta_key="Meta", meta_page_count="TotalNumberOfPages", meta_total="TotalNumberOfResults")
SCOPES = "ea:api offline_access ea:accounting_readonly ea:sales_readonly"  # companysettings needs a sales scope
# UNCONFIRMED (NOTES §2): the service GUID comes from Visma's sandbox example; assumed the same in production
ACR_VALUES = "service:44643EB1-3F76-4C1C-A672-402AE8085934 forceselectcompany:true"
CENT = Decimal("0.01")

CONSENT_FIX = ("run `erp-pipelines consent eaccounting` again and log in to this company "
               "(one consent per company; a changed Visma password also ends a consent)")
CLIENT_FIX = "check EACCOUNTING_CLIENT_ID and EACCOUNTING_CLIENT_SECRET (the app registered with Visma)"
ACCESS_FIX = ("the company's eAccounting product variant must include bookkeeping (Standard, Pro, Bookkeeping "
              "or Solo; not Invoicing) and the consenting user needs read access to accounting and sales; "
              "then run `erp-pipelines consent eaccounting` again for this company")
PICK_COMPANY_HELP = (
    "log in and pick the company to read (one company per consent). If the login shows no company list, "
    "turn off the default company (standardfirma) in eAccounting, under your user's settings, and run "
    "`erp-pipelines consent eaccounting` again"
)


@dataclasses.dataclass(frozen=True)
class FiscalYear:
    id: str
    start: dt.date
    end: dt.date


class EAccountingConnector(Connector):
    erp = ERP
    display_name = "Visma eAccounting"
    settings = (
        Setting("base_url", "EACCOUNTING_BASE_URL", default="https://eaccountingapi.vismaonline.com/v2",
                description="API base URL", url_path="/v2"),
        Setting("identity_url", "EACCOUNTING_IDENTITY_URL", default="https://identity.vismaonline.com",
                description="Visma identity server (/connect/authorize, /connect/token)"),
        Setting("client_id", "EACCOUNTING_CLIENT_ID", description="OAuth app client id (Visma Developer Portal)"),
        Setting("client_secret", "EACCOUNTING_CLIENT_SECRET", secret=True, description="OAuth app client secret"),
        Setting("redirect_uri", "EACCOUNTING_REDIRECT_URI", default="http://127.0.0.1:8765/callback",
                description="OAuth redirect URI, registered with the app; `erp-pipelines consent eaccounting` "
                "listens on it"),
    )
    rate_limit = RATE_LIMIT
    onboarding_fix = BilingualFix(
        norwegian="Selskapets eAccounting-variant må ha regnskap (Standard, Pro, Bokføring eller Solo; "
                  "ikke Fakturering), og brukeren som samtykker må ha lesetilgang til regnskap og salg; kjør så "
                  "`erp-pipelines consent eaccounting` på nytt for selskapet.",
        english="The company's eAccounting variant must include bookkeeping (Standard, Pro, Bookkeeping "
                "or Solo; not Invoicing) and the consenting user needs read access to accounting and sales; then "
                "run `erp-pipelines consent eaccounting` again for the company.",
    )
    uses_token_store = True  # one consent per company, with rotating refresh tokens

    def __init__(self, *, base_url: str, client_id: str, client_secret: str,
                 identity_url: str = "https://identity.vismaonline.com",
                 redirect_uri: str = "http://127.0.0.1:8765/callback", **options: Any) -> None:
        super().__init__(base_url=base_url, client_id=client_id, client_secret=client_secret,
                         identity_url=identity_url, redirect_uri=redirect_uri, **options)
        if self.token_store is None:
            raise ConfigError("eAccounting needs the token store for its consents", erp=ERP,
                              fix="set ERP_TOKEN_STORE_PATH (or leave the default next to the warehouse)")
        self._page_size = min(self.page_size or PAGE_SIZE, PAGE_SIZE)
        # the identity server's client (token requests); company clients share its statistics
        self.api = self.api_client(identity_url, client_id, "identity")
        self._companies: dict[str, tuple[ApiClient, TokenAuth]] = {}
        self._fiscal_years: dict[str, list[FiscalYear]] = {}

    # ------------------------------------------------------------------ per-company consents

    def identity_endpoint(self, name: str) -> str:
        return f"{self.config['identity_url'].rstrip('/')}/connect/{name}"

    def _index_entry(self) -> str:
        """The token store entry listing the consented companies (id → name, organisation number)."""
        return credential_key("eaccounting-consents", self.config["base_url"].rstrip("/"), self.config["client_id"])

    def consent_entry(self, company_id: str) -> str:
        """Where one company's tokens live in the token store (a hash: no secret in the name)."""
        return credential_key("eaccounting-consent", self.config["base_url"].rstrip("/"), self.config["client_id"],
                              company_id)

    def consents(self) -> dict[str, dict[str, str]]:
        index = self.token_store.get(self._index_entry())
        return dict(index) if isinstance(index, Mapping) else {}

    def _company(self, company_id: str, auth: TokenAuth | None = None) -> tuple[ApiClient, TokenAuth]:
        """The company's client (its own throttle: the limit is per company) and its consent's tokens."""
        if company_id not in self._companies:
            api = self.api_client(self.config["base_url"], self.config["client_id"], company_id, map_error=_map_error)
            api.stats = self.api.stats
            # UNCONFIRMED (NOTES §2): client id and secret as HTTP Basic at the token endpoint (the kit's way)
            self._companies[company_id] = (api, auth or RefreshingToken(
                self.api, self.identity_endpoint("token"), self.config["client_id"], self.config["client_secret"],
                refused=_refused_by_token_endpoint, store=self.token_store, store_entry=self.consent_entry(company_id),
                missing=lambda: ClientAccessError("no consent is stored for this company", erp=ERP, fix=CONSENT_FIX),
            ))
        elif auth is not None:
            self._companies[company_id] = (self._companies[company_id][0], auth)
        return self._companies[company_id]

    # ------------------------------------------------------------------ OAuth consent (erp-pipelines consent)

    def oauth_app(self) -> OAuthApp:
        return OAuthApp(
            authorize_url=self.identity_endpoint("authorize"), token_url=self.identity_endpoint("token"),
            client_id=self.config["client_id"], client_secret=self.config["client_secret"],
            redirect_uri=self.config["redirect_uri"], scope=SCOPES,
            extra={"acr_values": ACR_VALUES, "prompt": "login"}, help=PICK_COMPANY_HELP,
        )

    async def consented_companies(self, token: Token) -> list[Client]:
        """The one company a new grant is for, refused when another consented company has its number."""
        settings = await self._settings("consent", auth=StaticToken(token.value), tenant=None)
        company = _client_of(settings, None)
        try:
            number = normalise_tenant_id(company.org_number)
        except ValueError:
            return [company]  # the client rules refuse it, with the reason
        for other_id, other in self.consents().items():
            if other_id != company.erp_client_id and other.get("org_number") == number:
                return [dataclasses.replace(company, status=ClientStatus.REJECTED, status_reason=(
                    f"organisation number {number} is already consented for {other.get('name')} "
                    f"(company {other_id}); no two clients of one integration may share a number"))]
        return [company]

    def store_consent(self, token: Token, companies: list[Client]) -> None:
        """One grant is one company: its tokens first, then its line in the index."""
        (company,) = companies
        self.token_store.put(self.consent_entry(company.erp_client_id), token.as_json())
        self.token_store.update(self._index_entry(), lambda index: {
            **(index or {}), company.erp_client_id: {"name": company.name, "org_number": company.org_number}})

    # ------------------------------------------------------------------ the contract

    async def _settings(self, company_id: str, *, auth: TokenAuth | None = None, tenant: str | None) -> Any:
        api, company_auth = self._company(company_id, auth)
        return await api.get_json("companysettings", auth=company_auth, tenant=tenant)

    async def _pages(self, client: Client, path: str, *, identity) -> list[Any]:
        api, auth = self._company(client.erp_client_id)

        async def fetch(query: dict[str, Any]) -> Reply:
            return await api.reply("GET", path, params=query, auth=auth, tenant=client.label)

        try:
            return await read_all(fetch, dataclasses.replace(PAGING, size=self._page_size), where=f"GET {path}",
                                  identity=lambda row: identity(row) if isinstance(row, dict) else None,
                                  erp=ERP, tenant=client.label)
        except ErpError as exc:
            raise exc.for_tenant(client.label)

    async def list_clients(self) -> list[Client]:
        consents = self.consents()
        if not consents:
            raise AuthError("no eAccounting company has been consented yet", erp=ERP,
                            fix="run `erp-pipelines consent eaccounting` once per company")
        return await gather_all(*(self._describe(company_id, stored) for company_id, stored in consents.items()))

    async def _describe(self, company_id: str, stored: Mapping[str, str]) -> Client:
        """The company as it names itself now; a consent that no longer works keeps the stored
        identity, so the company stays listed and fails alone (with its fix) when it is read."""
        stored_client = Client(ERP, str(stored.get("org_number") or ""), company_id, str(stored.get("name") or ""))
        try:
            settings = await self._settings(company_id, tenant=stored_client.label)
        except ClientAccessError:
            return stored_client
        return dataclasses.replace(_client_of(settings, stored_client.label), erp_client_id=company_id)

    async def fiscal_years(self, client: Client) -> list[FiscalYear]:
        if client.erp_client_id not in self._fiscal_years:
            rows = await self._pages(client, "fiscalyears", identity=lambda row: row.get("Id"))
            years = []
            for row in rows:
                _require(row, ("Id", "StartDate", "EndDate"), "fiscalyears", client.label)
                years.append(FiscalYear(str(row["Id"]), _date(row["StartDate"], client), _date(row["EndDate"], client)))
            self._fiscal_years[client.erp_client_id] = sorted(years, key=lambda year: year.start)
        return self._fiscal_years[client.erp_client_id]

    async def fetch_accounts(self, client: Client) -> list[Account]:
        """Charts are per fiscal year (NOTES §4): every year's, the latest name of each number."""
        charts = await gather_all(*(self._pages(client, f"accounts/{year.id}", identity=lambda row: row.get("Number"))
                                    for year in await self.fiscal_years(client)))
        latest: dict[str, tuple[str, str | None]] = {}
        for rows in charts:
            for row in rows:
                _require(row, ("Number", "Name"), "accounts", client.label)
                latest[str(row["Number"])] = (str(row["Name"]), row.get("TypeDescription") or None)
        # the class from the NS 4102 number (`Account` classifies it): TypeDescription's values are undocumented
        return [Account(account_number=number, name=name, account_type=kind) for number, (name, kind) in latest.items()]

    async def fetch_balances(self, client: Client, months: list[dt.date]) -> list[Balance]:
        years = await self.fiscal_years(client)
        closings = await gather_all(*(self._closing(client, day, years) for day in month_ends(months)))
        start = self.fiscal_year_starts[client.erp_client_id] = _start_month(years, months[-1])
        return balances_from_closings(months, closings, fiscal_year_start_month=start)

    async def _closing(self, client: Client, day: dt.date, years: list[FiscalYear]) -> dict[str, Decimal]:
        """Balances at the end of `day`: balance sheet since the first posting, profit and loss year to
        date (UNCONFIRMED, NOTES §5: the spec says only "balance at the given date"; debit positive)."""
        if not years or day < years[0].start:
            return {}  # before the company's first fiscal year there are no books (not asked: UNCONFIRMED answer)
        rows = await self._pages(client, f"accountbalances/{day.isoformat()}", identity=lambda row: row.get("AccountNumber"))
        closing: dict[str, Decimal] = {}
        for row in rows:
            _require(row, ("AccountNumber", "Balance"), "accountbalances", client.label)
            closing[str(row["AccountNumber"])] = _amount(row["Balance"], client.label)  # int64 here, string in charts
        return closing

    async def verify_tenant(self, client: Client) -> None:
        settings = await self._settings(client.erp_client_id, tenant=client.label)
        reported = _client_of(settings, client.label)
        company_id = settings.get("CompanyIdentifier")
        if reported.org_number != client.org_number or (company_id and str(company_id) != client.erp_client_id):
            raise TenantMismatch(
                f"eAccounting answered for {reported.name} (orgnr {reported.org_number or 'none'}, company "
                f"{company_id}) instead of this tenant; nothing was stored", erp=ERP, tenant=client.label,
                fix="check the company's organisation number in eAccounting, then run the consent again for it",
            )

    async def aclose(self) -> None:
        for api, _ in self._companies.values():
            await api.aclose()
        await super().aclose()


def _client_of(settings: Any, tenant: str | None) -> Client:
    """A Client from `/companysettings`; the organisation number normalised when it is valid."""
    _require(settings, ("Name",), "companysettings", tenant)
    if not settings.get("CompanyIdentifier"):
        _require(settings, ("CompanyIdentifier",), "companysettings", tenant)
    number = stated_org_number(settings.get("CorporateIdentityNumber"))
    return Client(ERP, number, str(settings["CompanyIdentifier"]), str(settings["Name"]))


def _start_month(years: list[FiscalYear], month: dt.date) -> int:
    """The first month of the fiscal year holding `month` (else the latest year's). UNCONFIRMED: a
    window across a change of fiscal year start is taken with the last month's year."""
    holding = [year for year in years if year.start <= month <= year.end] or years[-1:]
    return holding[0].start.month if holding else 1


def _date(value: Any, tenant: str) -> dt.date:
    try:
        return dt.date.fromisoformat(str(value)[:10])
    except ValueError:
        raise BadResponse(f"fiscalyears: {value!r} is not a date", erp=ERP, tenant=tenant) from None


def _amount(value: Any, tenant: str) -> Decimal:
    """`Balance` is a JSON double in kroner; rounded to øre."""
    if isinstance(value, bool) or not isinstance(value, int | Decimal):
        raise BadResponse(f"accountbalances: Balance {value!r} is not a number", erp=ERP, tenant=tenant)
    return Decimal(value).quantize(CENT, rounding=ROUND_HALF_EVEN)


def _error_of(body: Any) -> str:
    """`{ErrorCode, DeveloperErrorMessage, ErrorId, Errors}` (NOTES §8) as a short text."""
    if not isinstance(body, Mapping):
        return ""
    code, message = body.get("ErrorCode"), str(body.get("DeveloperErrorMessage") or "")[:200]
    return (f", ErrorCode {code}" if code is not None else "") + (f": {message}" if message else "")


def _map_error(response: httpx.Response, body: Any, context: RequestContext) -> ErpError | None:
    status = response.status_code
    detail = f"HTTP {status}{_error_of(body)}"
    if status == 401:  # after one refresh: the consent no longer opens this company (401 body UNCONFIRMED)
        kind = ClientAccessError if context.tenant else AuthError
        return kind(f"eAccounting refuses the company's access token ({detail})", erp=ERP, fix=CONSENT_FIX)
    if status == 403:  # a scope, the product variant (no bookkeeping in Invoicing) or the user's rights
        kind = ClientAccessError if context.tenant else AuthError
        return kind(f"eAccounting refuses access to this company's accounting ({detail})", erp=ERP, fix=ACCESS_FIX)
    if status >= 500 or status == 429:
        return None  # retried
    return BadResponse(f"request rejected ({detail})", erp=ERP,
                       fix="check EACCOUNTING_BASE_URL: it must end in /v2 (e.g. https://eaccountingapi.vismaonline.com/v2)")


def _refused_by_token_endpoint(response: httpx.Response, body: Any) -> ErpError:
    """invalid_grant: this company's refresh token is dead (revoked, used, password changed);
    anything else: the app's own credentials."""
    code = body.get("error") if isinstance(body, Mapping) else None
    if code == "invalid_grant":
        return ClientAccessError("Visma no longer accepts this company's consent (invalid_grant)", erp=ERP,
                                 fix=CONSENT_FIX)
    return AuthError(f"the Visma identity server refused the app (HTTP {response.status_code}"
                     + (f", {code}" if code else "") + ")", erp=ERP, fix=CLIENT_FIX)


def _require(row: Any, keys: tuple[str, ...], where: str, tenant: str | None) -> None:
    require_fields(row, keys, where=where, erp=ERP, tenant=tenant)
