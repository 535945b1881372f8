"""Fiken API v2 connector (facts: specs/fiken/NOTES.md).

- Auth: a personal API token (`FIKEN_API_TOKEN`), or an OAuth2 consent (`FIKEN_CLIENT_ID`,
  `FIKEN_CLIENT_SECRET`; given once with `erp-pipelines consent fiken`, kept in the token store,
  refreshed with rotating refresh tokens). Fiken's terms reserve personal tokens for a customer's
  own use; a product serving an accounting firm's clients uses OAuth.
- Tenants: the companies the token or consent sees (`GET /companies`), keyed by `slug`.
- Balances: `accountBalances?date=` gives closing balances in øre at a date. The closing of each
  month end, and of the month before the window, give opening and movement; profit and loss is
  year to date and restarts in January (Fiken keeps calendar fiscal years).
- Limits: one request in flight per user and at most 4 per second, across all companies.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections import defaultdict
from decimal import Decimal
from typing import Any

import httpx

from erp_pipelines.erps.base import BilingualFix, Connector, Setting, require_fields, stated_org_number
from erp_pipelines.erps.kit import (
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
    refused_by_token_endpoint,
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
from erp_pipelines.model import Account, Balance, Client
from erp_pipelines.tokens import credential_key

PAGE_SIZE = 100  # the documented maximum (NOTES §4)
RATE_LIMIT = RateLimit(
    requests_per_second=4.0, max_in_flight=1,
    source="one request in flight per user and at most 4 requests/s; more may be throttled or banned (NOTES §5)",
)
PAGING = PageNumber(PAGE_SIZE, page_param="page", size_param="pageSize", first_page=0,
                    page_count_header="Fiken-Api-Page-Count", total_header="Fiken-Api-Result-Count")
FISCAL_YEAR_START_MONTH = 1

API_MODULE_FIX = (
    "In Fiken, the company must have the API module (Fiken: Innstillinger → Abonnement → API-modulen, "
    "99 kr/month); with OAuth, the company must also be among the companies granted to this integration "
    "(Rediger konto → Sikkerhet → Apper du har gitt tilgang til). / Enable Fiken's API module for the "
    "company and grant the company to the integration."
)
TOKEN_FIX = (
    "Create a personal API key in Fiken (Rediger konto → API → Personlige API-nøkler) and set FIKEN_API_TOKEN, "
    "or, for OAuth, check FIKEN_CLIENT_ID and FIKEN_CLIENT_SECRET and run `erp-pipelines consent fiken` again."
)
CONSENT_FIX = "Run `erp-pipelines consent fiken` and approve the companies to read (OAuth consent)."


class FikenConnector(Connector):
    erp = "fiken"
    display_name = "Fiken"
    settings = (
        Setting("base_url", "FIKEN_BASE_URL", default="https://api.fiken.no/api/v2", description="API base URL",
                url_path="/api/v2"),
        Setting("api_token", "FIKEN_API_TOKEN", secret=True, required=False,
                description="a personal API key (the company's own use); or use OAuth below"),
        Setting("client_id", "FIKEN_CLIENT_ID", required=False, description="OAuth app client id"),
        Setting("client_secret", "FIKEN_CLIENT_SECRET", secret=True, required=False,
                description="OAuth app client secret"),
        Setting("oauth_url", "FIKEN_OAUTH_URL", default="https://fiken.no/oauth",
                description="OAuth base URL (authorize, token)"),
        Setting("redirect_uri", "FIKEN_REDIRECT_URI", default="http://127.0.0.1:8765/callback",
                description="OAuth redirect URI, registered with the app; `erp-pipelines consent fiken` listens on it"),
    )
    rate_limit = RATE_LIMIT
    onboarding_fix = BilingualFix(
        norwegian="Selskapet må ha API-modulen i Fiken (Innstillinger → Abonnement → API-modulen); med "
                  "OAuth må selskapet også være gitt tilgang for integrasjonen (Rediger konto → Sikkerhet → Apper "
                  "du har gitt tilgang til).",
        english="The company needs Fiken's API module (Settings → Subscription → API module); with OAuth, "
                "the company must also be granted to this integration (Edit account → Security → Apps you have "
                "given access).",
    )
    uses_token_store = True  # OAuth consents and their rotating refresh tokens

    def __init__(self, *, base_url: str, api_token: str | None = None, client_id: str | None = None,
                 client_secret: str | None = None, oauth_url: str = "https://fiken.no/oauth",
                 redirect_uri: str = "http://127.0.0.1:8765/callback", **options: Any) -> None:
        super().__init__(base_url=base_url, api_token=api_token, client_id=client_id, client_secret=client_secret,
                         oauth_url=oauth_url, redirect_uri=redirect_uri, **options)
        if not api_token and not (client_id and client_secret):
            raise ConfigError("Fiken needs FIKEN_API_TOKEN, or FIKEN_CLIENT_ID and FIKEN_CLIENT_SECRET",
                              erp=self.erp, fix=TOKEN_FIX)
        self._page_size = min(self.page_size or PAGE_SIZE, PAGE_SIZE)
        self.api = self.api_client(base_url, base_url, api_token or client_id, map_error=_map_error)
        self.auth = self._auth()

    def _auth(self) -> TokenAuth:
        if self.config["api_token"]:
            return StaticToken(self.config["api_token"])
        if self.token_store is None:
            raise ConfigError("Fiken OAuth needs the token store", erp=self.erp,
                              fix="set ERP_TOKEN_STORE_PATH (or leave the default next to the warehouse)")
        return RefreshingToken(
            self.api, self.oauth_endpoint("token"), self.config["client_id"], self.config["client_secret"],
            refused=refused_by_token_endpoint(self.erp, CONSENT_FIX), store=self.token_store,
            store_entry=self.consent_entry(),
            missing=lambda: AuthError("no Fiken consent is stored yet", erp=self.erp, fix=CONSENT_FIX),
        )

    # ------------------------------------------------------------------ OAuth consent

    def oauth_endpoint(self, name: str) -> str:
        return f"{self.config['oauth_url'].rstrip('/')}/{name}"

    def oauth_app(self) -> OAuthApp:
        """For `erp-pipelines consent fiken` (NOTES §2.2): the user picks the companies at Fiken."""
        if not (self.config["client_id"] and self.config["client_secret"]):
            raise ConfigError("Fiken consent needs FIKEN_CLIENT_ID and FIKEN_CLIENT_SECRET", erp=self.erp,
                              fix="create an app in Fiken (tick 'developer' in your profile) and set both variables")
        return OAuthApp(
            authorize_url=self.oauth_endpoint("authorize"), token_url=self.oauth_endpoint("token"),
            client_id=self.config["client_id"], client_secret=self.config["client_secret"],
            redirect_uri=self.config["redirect_uri"],
            help="approve the companies to read; companies created after a consent must be added to it "
            "(Rediger konto → Sikkerhet → Apper du har gitt tilgang til)",
        )

    async def consented_companies(self, token: Token) -> list[Client]:
        """The companies a new consent's access token sees."""
        self.auth = StaticToken(token.value)
        return await self.list_clients()

    def store_consent(self, token: Token, companies: list[Client]) -> None:
        """One consent covers every company the user approved: one store entry."""
        self.token_store.put(self.consent_entry(), token.as_json())

    def consent_entry(self) -> str:
        """Where the consent's tokens live in the token store (a hash: no secret in the name)."""
        return credential_key("fiken-consent", self.config["base_url"].rstrip("/"), self.config["client_id"] or "")

    # ------------------------------------------------------------------ the contract

    async def _pages(self, path: str, params: dict[str, Any], *, tenant: str | None, identity) -> list[Any]:
        async def fetch(query: dict[str, Any]) -> Reply:
            return await self.api.reply("GET", path, params=query, auth=self.auth, tenant=tenant)

        try:
            return await read_all(fetch, dataclasses.replace(PAGING, size=self._page_size), params=params, identity=lambda row: identity(row) if
                                  isinstance(row, dict) else None, where=f"GET {path}", erp=self.erp, tenant=tenant)
        except ErpError as exc:
            raise exc.for_tenant(tenant) if tenant else exc

    async def list_clients(self) -> list[Client]:
        rows = await self._pages("companies", {}, tenant=None, identity=lambda row: row.get("slug"))
        clients = []
        for row in rows:
            _require(row, ("slug", "name"), "companies", None)
            clients.append(Client(erp=self.erp, org_number=str(row.get("organizationNumber") or ""),
                                  erp_client_id=str(row["slug"]), name=str(row["name"])))
        return clients

    async def fetch_accounts(self, client: Client) -> list[Account]:
        rows = await self._pages(f"companies/{client.erp_client_id}/accounts", {}, tenant=client.label,
                                 identity=lambda row: row.get("code"))
        accounts = []
        for row in rows:
            _require(row, ("code", "name"), "accounts", client.label)
            if ":" not in str(row["code"]):  # reskontro sub-accounts are counted in their account
                accounts.append(Account(account_number=str(row["code"]), name=str(row["name"])))
        return accounts

    async def fetch_balances(self, client: Client, months: list[dt.date]) -> list[Balance]:
        """Closing balances at every month end of the window and at the end of the month before."""
        closings = await gather_all(*(self._closing(client, day) for day in month_ends(months)))
        self.fiscal_year_starts[client.erp_client_id] = FISCAL_YEAR_START_MONTH
        return balances_from_closings(months, closings, fiscal_year_start_month=FISCAL_YEAR_START_MONTH)

    async def _closing(self, client: Client, day: dt.date) -> dict[str, Decimal]:
        rows = await self._pages(f"companies/{client.erp_client_id}/accountBalances", {"date": day.isoformat()},
                                 tenant=client.label, identity=lambda row: row.get("code"))
        by_code: dict[str, Decimal] = {}
        for row in rows:
            _require(row, ("code", "balance"), "accountBalances", client.label)
            by_code[str(row["code"])] = _nok(row["balance"], client.label)
        return merge_subledgers(by_code)

    async def verify_tenant(self, client: Client) -> None:
        company = await self.api.get_json(f"companies/{client.erp_client_id}", auth=self.auth, tenant=client.label)
        _require(company, ("slug",), "companies/{slug}", client.label)
        reported = stated_org_number(company.get("organizationNumber"))
        if company["slug"] != client.erp_client_id or reported != client.org_number:
            raise TenantMismatch(
                f"Fiken answered for company {company['slug']} (orgnr {reported or 'none'}) instead of this tenant; "
                "nothing was stored",
                erp=self.erp, tenant=client.label,
                fix="check the company's organisation number in Fiken and re-run the clients asset",
            )


def merge_subledgers(by_code: dict[str, Decimal]) -> dict[str, Decimal]:
    """Reskontro sub-accounts (`1500:10001`) counted once, in their 4-digit account.

    UNCONFIRMED (NOTES §3, pitfall 10): whether Fiken lists the 4-digit account itself beside its
    sub-accounts. When it does and the row equals the sub-accounts' sum, the row is their total and
    is taken once; when it differs, it holds postings without a sub-ledger and both are added."""
    subledgers: dict[str, Decimal] = defaultdict(Decimal)
    for code, amount in by_code.items():
        if ":" in code:
            subledgers[code.partition(":")[0]] += amount
    merged = {code: amount for code, amount in by_code.items() if ":" not in code}
    for account, total in subledgers.items():
        plain = merged.get(account)
        merged[account] = total if plain is None or plain == total else plain + total
    return merged


def _nok(ore: Any, tenant: str) -> Decimal:
    """Fiken amounts are integer øre (NOTES §3: 5050 = 50.50 kr); debit positive (UNCONFIRMED, NOTES §3)."""
    if isinstance(ore, bool) or not isinstance(ore, int | Decimal) or Decimal(ore) != Decimal(ore).to_integral():
        raise BadResponse(f"accountBalances: balance {ore!r} is not a whole number of øre", erp="fiken", tenant=tenant)
    return Decimal(int(ore)).scaleb(-2)


def _map_error(response: httpx.Response, body: Any, context: RequestContext) -> ErpError | None:
    """Fiken documents no error body (NOTES §6): the status decides."""
    status = response.status_code
    detail = f"HTTP {status}"
    if status == 401:
        return AuthError(f"Fiken refuses the credential ({detail})", erp="fiken", fix=TOKEN_FIX)
    if status in (403, 404) and context.tenant:
        # UNCONFIRMED (NOTES §2.3, §6): a company without the API module, or no longer granted, answers 403
        return ClientAccessError(f"Fiken refuses access to this company ({detail})", erp="fiken", fix=API_MODULE_FIX)
    if status >= 500 or status == 429:
        return None  # retried
    return BadResponse(f"request rejected ({detail})", erp="fiken",
                       fix="check FIKEN_BASE_URL: it must end in /api/v2 (e.g. https://api.fiken.no/api/v2)")


def _require(row: Any, keys: tuple[str, ...], where: str, tenant: str | None) -> None:
    require_fields(row, keys, where=where, erp="fiken", tenant=tenant)
