"""Tripletex API v2 connector (facts: shared/erp-api/tripletex/NOTES.md).

Auth: a session token minted from the consumer token (the integration's) and the employee token
(the customer's, or an accounting firm's "Regnskapskontorets brukernøkkel"), sent as Basic auth
with username `0` (the key's own company) or a client's company id (act as that client).
"""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Any
from zoneinfo import ZoneInfo

import httpx

from erp_pipelines.erps.base import PUBLISHED_RATE_LIMITS, Connector, Setting
from erp_pipelines.erps.http import (
    ApiClient,
    RateLimiter,
    RateLimitHeaders,
    RetryPolicy,
    consistent_offset_list,
    gather_all,
)
from erp_pipelines.errors import (
    AuthError,
    BadResponse,
    ClientAccessError,
    ErpError,
    TenantMismatch,
    UpstreamError,
    register_secret,
)
from erp_pipelines.model import Account, Balance, Client, add_months, kroner, normalise_tenant_id
from erp_pipelines.tokens import TokenStore, credential_key

OSLO = ZoneInfo("Europe/Oslo")
PAGE_SIZE = 1000  # the documented default; larger counts are rejected above 10000 (NOTES §4)
OWN_COMPANY = "0"  # Basic-auth username for the key's own company

RATE_LIMIT_HEADERS = RateLimitHeaders(
    limit="X-Rate-Limit-Limit", remaining="X-Rate-Limit-Remaining", reset="X-Rate-Limit-Reset", reset_is_delta=True
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


class TripletexConnector(Connector):
    erp = "tripletex"
    display_name = "Tripletex"
    settings = (
        Setting("base_url", "TRIPLETEX_BASE_URL", default="https://tripletex.no/v2", description="API base URL"),
        Setting("consumer_token", "TRIPLETEX_CONSUMER_TOKEN", secret=True, description="the integration's token"),
        Setting(
            "employee_token",
            "TRIPLETEX_EMPLOYEE_TOKEN",
            secret=True,
            description="a company's employee token, or the accounting firm's key (Regnskapskontorets brukernøkkel)",
        ),
    )
    rate_limit = PUBLISHED_RATE_LIMITS["tripletex"]  # follow the X-Rate-Limit-* headers
    uses_token_store = True  # session tokens are cached between runs (keyed by a hash of the credential)

    def __init__(
        self,
        *,
        base_url: str,
        consumer_token: str,
        employee_token: str,
        transport: httpx.AsyncBaseTransport | None = None,
        limiter: RateLimiter | None = None,
        retry: RetryPolicy | None = None,
        session_days: int = 2,
        today: dt.date | None = None,
        timeout: float = 60.0,
        page_size: int | None = None,
        token_store: TokenStore | None = None,
    ) -> None:
        super().__init__(base_url=base_url)
        register_secret(consumer_token, employee_token)  # redacted from every error message
        self._consumer_token = consumer_token
        self._employee_token = employee_token
        self._session_days = session_days
        self._today = today
        self._page_size = page_size
        self._session: tuple[str, dt.date] | None = None  # (token, expiration date)
        self._session_lock = asyncio.Lock()
        self._token_store = token_store
        # the store's entry name: a hash of where and with what we log in, never the tokens themselves
        self._store_entry = credential_key("tripletex-session", base_url.rstrip("/"), consumer_token, employee_token)
        self.sessions_minted = 0
        self.api = ApiClient(
            erp=self.erp,
            base_url=base_url,
            limiter=limiter or RateLimiter.for_rate_limit(self.rate_limit),
            rate_limit_headers=RATE_LIMIT_HEADERS,
            map_error=_map_error,
            retry=retry,
            transport=transport,
            timeout=timeout,
        )

    def __repr__(self) -> str:  # never show tokens
        return f"TripletexConnector(base_url={self.config['base_url']!r})"

    async def aclose(self) -> None:
        await self.api.aclose()

    # ---------------------------------------------------------------------------- session tokens

    def _oslo_today(self) -> dt.date:
        return self._today or dt.datetime.now(OSLO).date()

    def _fresh(self, session: tuple[str, dt.date] | None, stale: str | None) -> bool:
        return bool(session) and session[0] != stale and self._oslo_today() < session[1] - dt.timedelta(1)

    async def _session_token(self, stale: str | None = None) -> str:
        """A live session token. Sessions die at midnight (CET) starting their expiration date, so
        re-mint on the day before it; `stale` forces a new one when that token got a 401.

        With a token store, a session minted by an earlier run (or a concurrent one) is reused, and
        a newly minted one is stored for the next run."""
        async with self._session_lock:
            if self._fresh(self._session, stale):
                return self._session[0]
            if self._token_store is not None:
                cached = await asyncio.to_thread(self._cached_session)
                if self._fresh(cached, stale):
                    register_secret(cached[0])
                    self._session = cached
                    return cached[0]
            expires = self._oslo_today() + dt.timedelta(days=self._session_days)
            body = await self.api.send_json(
                "POST",
                "token/session/:create",
                {
                    "consumerToken": self._consumer_token,
                    "employeeToken": self._employee_token,
                    "expirationDate": expires.isoformat(),
                },
            )
            token = (body.get("value") or {}).get("token") if isinstance(body, dict) else None
            if not isinstance(token, str) or not token:
                raise BadResponse("session token response has no value.token", erp=self.erp)
            register_secret(token)
            self._session = (token, expires)
            self.sessions_minted += 1
            if self._token_store is not None:
                await asyncio.to_thread(
                    self._token_store.put, self._store_entry, {"token": token, "expires": expires.isoformat()}
                )
            return token

    def _cached_session(self) -> tuple[str, dt.date] | None:
        entry = self._token_store.get(self._store_entry) if self._token_store is not None else None
        if not isinstance(entry, dict) or not isinstance(entry.get("token"), str):
            return None
        try:
            return entry["token"], dt.date.fromisoformat(str(entry.get("expires")))
        except ValueError:
            return None

    async def _get(self, path: str, params: dict[str, Any], *, username: str, tenant: str | None) -> Any:
        """GET as `username`, re-minting the session once on a 401. The retry continues the
        request's attempt budget (at least one attempt is left for it), so a session that expires
        mid-run never doubles the retries a request may take."""
        token = await self._session_token()
        try:
            return await self.api.get_json(path, params=params, auth=httpx.BasicAuth(username, token), tenant=tenant)
        except _Unauthorized as exc:
            fresh = await self._session_token(stale=token)
            next_attempt = min(getattr(exc, "attempts", 0) + 1, self.api.retry.max_attempts)
            try:
                return await self.api.get_json(
                    path, params=params, auth=httpx.BasicAuth(username, fresh), tenant=tenant,
                    first_attempt=next_attempt,
                )
            except _Unauthorized:
                if username == OWN_COMPANY:
                    raise AuthError("the employee token or consumer token is rejected", erp=self.erp, fix=TOKEN_FIX)
                raise ClientAccessError(
                    "Tripletex refuses the key for this client (HTTP 401)", erp=self.erp, tenant=tenant,
                    fix=KLIENTTILGANG_FIX,
                ) from None

    async def _get_all(
        self, path: str, params: dict[str, Any], *, username: str, tenant: str | None, identity: Any
    ) -> list[Any]:
        """Every row of a paged list, as one consistent snapshot: a list that changes while it is
        paged (`versionDigest` differs between pages, or a row repeats) is read again from the start,
        so a shifted page can neither duplicate nor skip a row (see `consistent_offset_list`)."""

        async def fetch_page(query: dict[str, Any]) -> Any:
            return await self._get(path, query, username=username, tenant=tenant)

        def key(row: Any) -> Any:
            return identity(row) if isinstance(row, dict) else None

        try:
            return await consistent_offset_list(
                fetch_page, params, page_size=self._page_size or PAGE_SIZE, identity=key,
                version_key="versionDigest", where=f"GET {path}", erp=self.erp, tenant=tenant,
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
            accounts.append(
                Account(
                    account_number=str(row["number"]),
                    name=str(row["name"]),
                    account_type=row.get("type"),
                    standard_account=row.get("saftCode") or row.get("groupingCode") or None,
                )
            )
        return accounts

    async def fetch_balances(self, client: Client, months: list[dt.date]) -> list[Balance]:
        """One `/balanceSheet` call per month (`dateTo` is exclusive)."""
        per_month = await gather_all(*(self._month_balances(client, month) for month in months))
        return [balance for month in per_month for balance in month]

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
        try:
            reported_org = normalise_tenant_id(str(company.get("organizationNumber") or ""))
        except ValueError:
            reported_org = str(company.get("organizationNumber") or "")
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


class _Unauthorized(ErpError):
    """A 401, resolved by `_get` into a fresh session, AuthError or ClientAccessError."""


def _map_error(response: httpx.Response, body: Any) -> ErpError | None:
    """Tripletex's ApiError envelope to the error taxonomy (NOTES §6)."""
    status = response.status_code
    code = body.get("code") if isinstance(body, dict) else None
    message = body.get("message") if isinstance(body, dict) else None
    request_id = response.headers.get("x-tlx-request-id", "")
    detail = f"HTTP {status}" + (f" code {code}" if code else "") + (f": {message}" if message else "")
    if request_id:
        detail += f" (request {request_id})"
    if status == 401:
        return _Unauthorized(detail, erp="tripletex")
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
    if status >= 500:
        return None  # retried by ApiClient
    if status in (400, 404, 422):
        return BadResponse(f"request rejected ({detail})", erp="tripletex")
    if status == 429:
        return None
    return UpstreamError(detail, erp="tripletex")


def _balance_account_number(row: dict[str, Any]) -> Any:
    account = row.get("account")
    return account.get("number") if isinstance(account, dict) else None


def _require(row: Any, keys: tuple[str, ...], where: str, tenant: str | None) -> None:
    """Unknown fields are tolerated; a missing required one is refused (schema drift)."""
    if not isinstance(row, dict):
        raise BadResponse(f"{where}: expected an object, got {type(row).__name__}", erp="tripletex", tenant=tenant)
    missing = [key for key in keys if row.get(key) is None]
    if missing:
        raise BadResponse(
            f"{where}: required field(s) {', '.join(missing)} missing from the response",
            erp="tripletex",
            tenant=tenant,
            fix="the API contract changed; update the connector before re-running",
        )
