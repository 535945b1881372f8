"""Tripletex API v2 connector (facts: shared/erp-api/tripletex/NOTES.md).

Auth: a session token minted from the consumer token (the integration's) and the employee token
(the customer's, or an accounting firm's "Regnskapskontorets brukernøkkel"), sent as Basic auth
with username `0` (the key's own company) or a client's company id (act as that client).
"""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import httpx

from erp_pipelines.accounts import AccountClass, classify_account, saft_mapping
from erp_pipelines.erps.base import BilingualFix, Connector, Setting, require_fields, stated_org_number
from erp_pipelines.erps.kit import (
    MintedToken,
    Offset,
    RateLimit,
    RateLimitHeaders,
    Reply,
    RequestContext,
    Token,
    gather_all,
    read_all,
)
from erp_pipelines.errors import (
    AuthError,
    BadResponse,
    ClientAccessError,
    ConfigError,
    ErpError,
    TenantMismatch,
    UpstreamError,
)
from erp_pipelines.model import Account, Balance, Client, add_months, kroner
from erp_pipelines.tokens import TokenStore, credential_key

OSLO = ZoneInfo("Europe/Oslo")
RECONCILE_SOURCE = "tripletex /ledger"  # the `source` of the reconciliation rows
# (balanceSheet field, ledger field, check name) compared per account and month
RECONCILED_FIELDS = (
    ("balanceIn", "openingBalance", "ledger_opening_balance"),
    ("balanceChange", "sumAmount", "ledger_movement"),
    ("balanceOut", "closingBalance", "ledger_closing_balance"),
)
PAGE_SIZE = 1000  # the documented default; larger counts are rejected above 10000 (NOTES §4)
OWN_COMPANY = "0"  # Basic-auth username for the key's own company
# `Account.type` (NOTES §3.1) → account class, for numbers outside NS 4102
ACCOUNT_TYPE_CLASSES: dict[str, AccountClass] = {
    "ASSETS": "asset", "EQUITY": "equity", "LIABILITIES": "liability", "OPERATING_REVENUES": "income",
    "OPERATING_EXPENSES": "expense", "INVESTMENT_INCOME": "income", "COST_OF_CAPITAL": "expense",
    "TAX_ON_ORDINARY_ACTIVITIES": "expense", "EXTRAORDINARY_INCOME": "income", "EXTRAORDINARY_COST": "expense",
    "TAX_ON_EXTRAORDINARY_ACTIVITIES": "expense", "ANNUAL_RESULT": "equity", "TRANSFERS_AND_ALLOCATIONS": "equity",
}

RATE_LIMIT = RateLimit(
    headers=RateLimitHeaders("X-Rate-Limit-Limit", "X-Rate-Limit-Remaining", "X-Rate-Limit-Reset", reset_is_delta=True),
    source="X-Rate-Limit-Limit/-Remaining/-Reset headers, per employee token per API consumer; numbers "
    "unpublished; the 429 carries no reset header (NOTES §5)",
)

API_ACCESS_FIX = (
    "In the client's Tripletex, go to Regnskap → Innstillinger → Regnskapsførers tilgang and tick "
    "API-tilgang. Also check that the accounting firm has given the integration's key Klienttilgang "
    "to this client (Kunde → Kunder/Leverandører → Klienttilgang)."
)
KLIENTTILGANG_FIX = (
    "The accountant key no longer reaches this client: in the accounting firm's Tripletex, give the "
    "key's employee Klienttilgang to the client again (Kunde → Kunder/Leverandører → Klienttilgang)."
)
TOKEN_FIX = (
    "Create a new employee token (user → API-tilgang → Ny nøkkel, choose this integration) and set "
    "TRIPLETEX_EMPLOYEE_TOKEN; check that TRIPLETEX_CONSUMER_TOKEN belongs to the same environment "
    "(production and the test environment are separate)."
)


class TripletexSession(MintedToken):
    """A session token minted from the consumer and employee tokens (NOTES §2). Sessions die at
    midnight (CET) starting their expiration date, so one is re-minted on the day before it. With a
    token store, a session minted by an earlier (or concurrent) run is reused across runs."""

    def __init__(self, connector: TripletexConnector, *, session_days: int, store: TokenStore | None) -> None:
        super().__init__(store=store, store_entry=credential_key(
            "tripletex-session", connector.config["base_url"].rstrip("/"), connector.config["consumer_token"],
            connector.config["employee_token"],
        ))
        self._connector = connector
        self._session_days = session_days

    async def mint(self) -> Token:
        expires = self._connector.oslo_today() + dt.timedelta(days=self._session_days)
        body = await self._connector.api.send_json("POST", "token/session/:create", {
            "consumerToken": self._connector.config["consumer_token"],
            "employeeToken": self._connector.config["employee_token"],
            "expirationDate": expires.isoformat(),
        })
        token = (body.get("value") or {}).get("token") if isinstance(body, dict) else None
        if not isinstance(token, str) or not token:
            raise BadResponse("session token response has no value.token", erp="tripletex")
        day_before = dt.datetime.combine(expires - dt.timedelta(days=1), dt.time(), OSLO).timestamp()
        return Token(token, expires_at=day_before + self.leeway)

    def now(self) -> float:
        """The connector's Oslo date (injectable in tests) at the current time of day."""
        clock = dt.datetime.now(OSLO)
        return dt.datetime.combine(self._connector.oslo_today(), clock.time(), OSLO).timestamp()

    def as_company(self, username: str) -> CompanyLogin:
        return CompanyLogin(self, username)


class CompanyLogin(MintedToken):
    """The session, sent as Basic auth with a company's username: `0` for the key's own company,
    a client's company id to act as that client."""

    scheme = "Basic"

    def __init__(self, session: TripletexSession, username: str) -> None:
        self._session, self._username = session, username

    async def token(self, stale: str | None = None) -> str:
        return await self._session.token(stale)

    async def mint(self) -> Token:  # pragma: no cover - the session mints
        raise NotImplementedError

    def apply(self, request: httpx.Request, token: str) -> None:
        request.headers["Authorization"] = httpx.BasicAuth(self._username, token)._auth_header


class TripletexConnector(Connector):
    erp = "tripletex"
    display_name = "Tripletex"
    settings = (
        Setting("base_url", "TRIPLETEX_BASE_URL", default="https://tripletex.no/v2", description="API base URL",
                url_path="/v2"),
        Setting("consumer_token", "TRIPLETEX_CONSUMER_TOKEN", secret=True, description="the integration's token"),
        Setting(
            "employee_token",
            "TRIPLETEX_EMPLOYEE_TOKEN",
            secret=True,
            description="a company's employee token, or the accounting firm's key (Regnskapskontorets brukernøkkel)",
        ),
        Setting(
            "reconcile",
            "TRIPLETEX_RECONCILE",
            required=False,
            default="false",
            description="true: check each month's /balanceSheet against Tripletex's /ledger totals "
                        "(doubles the balance requests)",
        ),
    )
    rate_limit = RATE_LIMIT
    onboarding_fix = BilingualFix(
        norwegian="I klientens Tripletex: gå til Regnskap → Innstillinger → Regnskapsførers tilgang og "
                  "kryss av for API-tilgang. Regnskapsbyrået må også gi integrasjonens nøkkel Klienttilgang til "
                  "klienten (Kunde → Kunder/Leverandører → Klienttilgang).",
        english="In the client's Tripletex, tick API-tilgang (API access) under Regnskap → Innstillinger "
                "→ Regnskapsførers tilgang (Accounting → Settings → Accountant's access); the accounting firm "
                "must also give the integration's key Klienttilgang (client access) to the client.",
    )
    uses_token_store = True  # session tokens are cached between runs (keyed by a hash of the credential)

    def __init__(
        self,
        *,
        base_url: str,
        consumer_token: str,
        employee_token: str,
        reconcile: bool | str = False,
        session_days: int = 2,
        today: dt.date | None = None,
        **options: Any,
    ) -> None:
        super().__init__(base_url=base_url, consumer_token=consumer_token, employee_token=employee_token,
                         reconcile=reconcile, **options)
        self.reconcile = _flag(reconcile, "TRIPLETEX_RECONCILE")
        self._findings: dict[str, list[dict[str, Any]]] = {}  # erp_client_id → findings of its last fetch_balances
        self._today = today
        self._page_size = self.page_size or PAGE_SIZE
        self.api = self.api_client(base_url, base_url, employee_token, map_error=_map_error)
        self.session = TripletexSession(self, session_days=session_days, store=self.token_store)

    @property
    def sessions_minted(self) -> int:
        return self.session.minted

    def oslo_today(self) -> dt.date:
        return self._today or dt.datetime.now(OSLO).date()

    async def _get(self, path: str, params: dict[str, Any], *, username: str, tenant: str | None) -> Any:
        return await self.api.get_json(path, params=params, auth=self.session.as_company(username), tenant=tenant)

    async def _get_all(
        self, path: str, params: dict[str, Any], *, username: str, tenant: str | None, identity: Any
    ) -> list[Any]:
        """Every row of a paged list, as one consistent snapshot (`versionDigest` on every page)."""
        login = self.session.as_company(username)

        async def fetch_page(query: dict[str, Any]) -> Reply:
            return await self.api.reply("GET", path, params=query, auth=login, tenant=tenant)

        def key(row: Any) -> Any:
            return identity(row) if isinstance(row, dict) else None

        try:
            return await read_all(
                fetch_page, Offset(self._page_size, version_key="versionDigest"), params=params, identity=key,
                where=f"GET {path}", erp=self.erp, tenant=tenant,
            )
        except ErpError as exc:
            raise exc.for_tenant(tenant) if tenant else exc

    # ---------------------------------------------------------------------------- the contract

    async def list_clients(self) -> list[Client]:
        """The clients an accountant key reaches; for a company's own key, that company alone."""
        me = await self._who_am_i(OWN_COMPANY, tenant=None)
        rows = await self._get_all(
            "company/>withLoginAccess", {"fields": "id,name,organizationNumber,type"}, username=OWN_COMPANY, tenant=None,
            identity=lambda row: row.get("id"),
        )
        if not rows:
            company = me.get("company") or {}
            return [
                Client(
                    erp=self.erp,
                    org_number=str(company.get("organizationNumber") or ""),
                    erp_client_id=OWN_COMPANY,
                    name=str(company.get("name") or ""),
                )
            ]
        clients = []
        for row in rows:
            _require(row, ("id", "name"), "company/>withLoginAccess", None)
            clients.append(
                Client(
                    erp=self.erp,
                    org_number=str(row.get("organizationNumber") or ""),
                    erp_client_id=str(row["id"]),
                    name=str(row["name"]),
                )
            )
        return clients

    async def fetch_accounts(self, client: Client) -> list[Account]:
        rows = await self._get_all(
            "ledger/account",
            {"fields": "number,name,type,saftCode,groupingCode,isInactive"},
            username=client.erp_client_id,
            tenant=client.label,
            identity=lambda row: row.get("number"),
        )
        accounts = []
        for row in rows:
            _require(row, ("number", "name"), "ledger/account", client.label)
            number, kind = str(row["number"]), row.get("type")
            # saftCode: the SAF-T standard account; groupingCode: the næringsspesifikasjon code
            standard, category, code = saft_mapping(row.get("saftCode"), None, row.get("groupingCode"))
            accounts.append(
                Account(
                    account_number=number,
                    name=str(row["name"]),
                    account_type=kind,
                    standard_account=standard,
                    grouping_category=category,
                    grouping_code=code,
                    account_class=classify_account(number, kind, standard, code, type_classes=ACCOUNT_TYPE_CLASSES),
                )
            )
        return accounts

    async def fetch_balances(self, client: Client, months: list[dt.date]) -> list[Balance]:
        """One `/balanceSheet` call per month (`dateTo` is exclusive). With `TRIPLETEX_RECONCILE`,
        also one `/ledger` call per month, compared with it (`reconciliation_findings`)."""
        ledgers = [self._month_ledger(client, month) for month in months] if self.reconcile else []
        results = await gather_all(*(self._month_balances(client, month) for month in months), *ledgers)
        per_month, per_month_ledger = results[:len(months)], results[len(months):]
        if self.reconcile:
            self._findings[client.erp_client_id] = [
                finding for month, balances, ledger in zip(months, per_month, per_month_ledger, strict=True)
                for finding in _ledger_findings(month, balances, ledger)
            ]
        return [balance for month in per_month for balance in month]

    async def reconciliation_findings(self, client: Client) -> list[dict[str, Any]] | None:
        """/balanceSheet vs /ledger per account and month, from the last `fetch_balances` of the
        client (`expected`: /ledger's total; `actual`: /balanceSheet's, the stored balance). None
        unless `TRIPLETEX_RECONCILE` is on."""
        return self._findings.pop(client.erp_client_id, None) if self.reconcile else None

    async def _month_ledger(self, client: Client, month: dt.date) -> dict[str, tuple[Decimal, Decimal, Decimal]]:
        """Account number → (openingBalance, sumAmount, closingBalance) of `/ledger` for the month."""
        rows = await self._get_all(
            "ledger",
            {
                "dateFrom": month.isoformat(),
                "dateTo": add_months(month, 1).isoformat(),
                "fields": "account(number),openingBalance,sumAmount,closingBalance",
            },
            username=client.erp_client_id,
            tenant=client.label,
            identity=_balance_account_number,
        )
        totals = {}
        for row in rows:
            _require(row, ("account", "openingBalance", "sumAmount", "closingBalance"), "ledger", client.label)
            number = _balance_account_number(row)
            if number is None:
                raise BadResponse("ledger row has no account number", erp=self.erp, tenant=client.label)
            totals[str(number)] = (kroner(row["openingBalance"]), kroner(row["sumAmount"]),
                                   kroner(row["closingBalance"]))
        return totals

    async def _month_balances(self, client: Client, month: dt.date) -> list[Balance]:
        rows = await self._get_all(
            "balanceSheet",
            {
                "dateFrom": month.isoformat(),
                "dateTo": add_months(month, 1).isoformat(),
                "includeActiveAccountsWithoutMovements": "true",
                "fields": "account(number,name),balanceIn,balanceChange,balanceOut",
            },
            username=client.erp_client_id,
            tenant=client.label,
            identity=_balance_account_number,
        )
        balances = []
        for row in rows:
            _require(row, ("account", "balanceIn", "balanceChange", "balanceOut"), "balanceSheet", client.label)
            account = row["account"]
            if not isinstance(account, dict) or account.get("number") is None:
                raise BadResponse("balanceSheet row has no account number", erp=self.erp, tenant=client.label)
            opening, movement, closing = (kroner(row[k]) for k in ("balanceIn", "balanceChange", "balanceOut"))
            if opening + movement != closing:
                raise BadResponse(
                    f"balanceSheet {month:%Y-%m} account {account['number']}: balanceIn + balanceChange "
                    f"≠ balanceOut ({opening} + {movement} ≠ {closing})",
                    erp=self.erp,
                    tenant=client.label,
                )
            balances.append(Balance(month, str(account["number"]), opening, movement, closing))
        return balances

    # ---------------------------------------------------------------------------- tenant guard

    async def verify_tenant(self, client: Client) -> None:
        """Refuse a tenant unless Tripletex says the session acts for that very company (id and
        organisation number). `extract_tenant` calls it after the last read: Tripletex's ledger rows
        do not name their company, so whoAmI after the reads is what shows a misrouted session, and
        the data read before it is then refused."""
        me = await self._who_am_i(client.erp_client_id, tenant=client.label)
        _require(me, ("companyId", "company"), "token/session/>whoAmI", client.label)
        company = me["company"]
        _require(company, ("id", "organizationNumber"), "token/session/>whoAmI company", client.label)
        reported_id = str(me.get("companyId", company.get("id", "")))
        reported_org = stated_org_number(company.get("organizationNumber"))
        id_matches = client.erp_client_id == OWN_COMPANY or reported_id == client.erp_client_id
        if not id_matches or reported_org != client.org_number:
            raise TenantMismatch(
                f"Tripletex answered for company {reported_id} (orgnr {reported_org or 'none'}) instead of this "
                "tenant; nothing was stored",
                erp=self.erp,
                tenant=client.label,
                fix="check the client's organisation number in Tripletex and re-run the clients asset",
            )

    async def _who_am_i(self, username: str, *, tenant: str | None) -> dict[str, Any]:
        body = await self._get(
            "token/session/>whoAmI",
            {"fields": "employeeId,companyId,company(id,name,organizationNumber)"},
            username=username,
            tenant=tenant,
        )
        value = body.get("value") if isinstance(body, dict) else None
        if not isinstance(value, dict):
            raise BadResponse("whoAmI response has no value", erp=self.erp, tenant=tenant)
        return value


def _map_error(response: httpx.Response, body: Any, context: RequestContext) -> ErpError | None:
    """Tripletex's ApiError envelope to the error taxonomy (NOTES §6)."""
    status = response.status_code
    code = body.get("code") if isinstance(body, dict) else None
    message = body.get("message") if isinstance(body, dict) else None
    request_id = response.headers.get("x-tlx-request-id", "")
    detail = f"HTTP {status}" + (f" code {code}" if code else "") + (f": {message}" if message else "")
    if request_id:
        detail += f" (request {request_id})"
    if status == 401 and context.tenant is None:
        return AuthError(f"the employee token or consumer token is rejected ({detail})", erp="tripletex",
                         fix=TOKEN_FIX)
    if status == 401:
        return ClientAccessError(f"Tripletex refuses the key for this client ({detail})", erp="tripletex",
                                 fix=KLIENTTILGANG_FIX)
    if status == 403:
        # ASSUMPTION (NOTES §2.4 item 8, UNCONFIRMED): a listed client that has not ticked
        # API-tilgang answers 403 / code 9000 to its username.
        return ClientAccessError(
            f"Tripletex refuses API access to this client ({detail})", erp="tripletex", fix=API_ACCESS_FIX
        )
    if status == 422 and isinstance(body, dict) and any(
        "consumer token" in str(m.get("message", "")).lower() or "employee" in str(m.get("field", "")).lower()
        for m in body.get("validationMessages") or []
        if isinstance(m, dict)
    ):
        return AuthError(f"session token refused ({detail})", erp="tripletex", fix=TOKEN_FIX)
    if status >= 500 or status == 429:
        return None  # retried by ApiClient
    if status == 404:
        return BadResponse(f"request rejected ({detail})", erp="tripletex",
                           fix="check TRIPLETEX_BASE_URL: it must end in /v2 (e.g. https://tripletex.no/v2)")
    if status in (400, 422):
        return BadResponse(f"request rejected ({detail})", erp="tripletex")
    return UpstreamError(detail, erp="tripletex")


def _ledger_findings(
    month: dt.date, balances: list[Balance], ledger: dict[str, tuple[Decimal, Decimal, Decimal]]
) -> list[dict[str, Any]]:
    """Reconciliation rows where /ledger's totals differ from /balanceSheet's. /ledger lists the
    accounts with postings in the period; an account it leaves out must have no movement."""
    zero = Decimal("0.00")
    by_account = {b.account_number: (b.opening, b.movement, b.closing) for b in balances}
    findings = []
    for number in sorted(by_account.keys() | ledger.keys()):
        actual = by_account.get(number, (zero, zero, zero))
        if number in ledger:
            compared = zip(RECONCILED_FIELDS, ledger[number], actual)
        else:  # no postings in /ledger: only the movement is known (zero)
            compared = [(RECONCILED_FIELDS[1], zero, actual[1])]
        for (sheet_field, ledger_field, check), expected, value in compared:
            if expected != value:
                theirs = f"≠ /ledger {ledger_field} {expected}" if number in ledger else "but /ledger lists no postings"
                findings.append({
                    "source": RECONCILE_SOURCE,
                    "check_name": check,
                    "account_number": number,
                    "period": month,
                    "expected": expected,
                    "actual": value,
                    "message": f"{month:%Y-%m} account {number}: /balanceSheet {sheet_field} {value} {theirs} "
                               f"(difference {value - expected})",
                })
    return findings


def _flag(value: bool | str, variable: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("", "0", "false", "no", "off"):
        return False
    raise ConfigError(f"{variable}={value!r} is neither true nor false", erp="tripletex",
                      fix=f"set {variable}=true or {variable}=false")


def _balance_account_number(row: dict[str, Any]) -> Any:
    account = row.get("account")
    return account.get("number") if isinstance(account, dict) else None


def _require(row: Any, keys: tuple[str, ...], where: str, tenant: str | None) -> None:
    require_fields(row, keys, where=where, erp="tripletex", tenant=tenant)
