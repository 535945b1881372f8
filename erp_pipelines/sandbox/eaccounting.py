"""Visma eAccounting API v2 simulator: the truth ledger rendered through eAccounting's paths, auth and
shapes (facts: `specs/eaccounting/NOTES.md`; shapes: `eaccounting-v2-swagger.json`, which the tests
validate every response against).

- OAuth2 authorisation code under /connect (real: identity.vismaonline.com; here in the same app):
  authorize auto-approves for one company (the one queued with `select_company`, else the user's
  default company), token exchanges a code or a refresh token; every refresh rotates the refresh
  token and kills the old one at once. One grant, one company: its access tokens see only it.
- `Authorization: Bearer` on every API call; scopes as the spec's operation descriptions say
  (`/companysettings` needs a sales scope, charts and balances an accounting scope).
- Lists are `{"Meta": {...}, "Data": [...]}`, paged with `$page` (1-based) and `$pagesize`
  (default 50; the maximum of 1000 is UNCONFIRMED).
- `/accountbalances/{date}`: balances at the end of the date, kroner as JSON numbers, debit positive
  (sign UNCONFIRMED); balance sheet since the first posting, profit and loss since the start of the
  fiscal year (calendar years here); accounts with a zero balance are left out.
- Errors `{ErrorCode, DeveloperErrorMessage, ErrorId}`; 600 requests per minute per company and
  endpoint (every `/accountbalances/{date}` counted as one endpoint), 429 with ErrorCode 4010.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import concurrent.futures
import dataclasses
import datetime as dt
import math
import secrets
import socket
import threading
import time
import uuid
from decimal import Decimal
from typing import Any
from urllib.parse import parse_qsl, urlencode

import httpx
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Mount, Route
from starlette.types import Scope

from erp_pipelines.sandbox.common import (
    ErpProfile,
    PagingMutation,
    RateLimitPolicy,
    SandboxHarness,
    apply_paging_mutations,
    bearer_token,
    header_value,
    json_bytes,
    json_response,
)
from erp_pipelines.sandbox.ledger import TruthLedger, TruthTenant
from erp_pipelines.sandbox.simulator import ApiPaths, Simulator
from erp_pipelines.tokens import TokenStore

API_PREFIX = "/v2"
IDENTITY_PREFIX = "/connect"
DEFAULT_CLIENT_ID = "sandbox-eaccounting-client-id"
DEFAULT_CLIENT_SECRET = "sandbox-eaccounting-client-secret"
ACCESS_TOKEN_SECONDS = 3600  # NOTES §2: one hour
DEFAULT_RATE_LIMIT = RateLimitPolicy(limit=600, window_seconds=60.0)  # NOTES §7
MAX_PAGE_SIZE = 1000  # UNCONFIRMED (NOTES §6)
DEFAULT_PAGE_SIZE = 50
ACCOUNTING_SCOPES = {"ea:accounting", "ea:accounting_readonly"}
SALES_SCOPES = {"ea:sales", "ea:sales_readonly"}
STANDARD, INVOICING = 1, 2  # ProductVariant; Invoicing has no account balances (spec)
PHANTOM_ACCOUNT = (1000, "Forskning og utvikling")  # what a paging insert adds
ERROR_CODES = {400: 2000, 403: 4002, 404: 3000, 409: 4000, 429: 4010}  # NOTES §8; 401 and 5xx: none documented
IDS = uuid.UUID("5b0c1e2a-7d3f-4c59-9a41-2f6be1a0ea57")


def company_identifier(client_id: int) -> str:
    return str(uuid.uuid5(IDS, f"company:{client_id}"))


def fiscal_year_id(client_id: int, year: int) -> str:
    return str(uuid.uuid5(IDS, f"fiscalyear:{client_id}:{year}"))


def error_document(status: int, message: str, error_id: str) -> dict[str, Any]:
    code = ERROR_CODES.get(status)
    return {**({"ErrorCode": code} if code else {}), "DeveloperErrorMessage": message, "ErrorId": error_id}


def error_body(status: int, message: str, request_id: str) -> bytes:
    if status == 429:
        message = "API calls quota exceeded! maximum admitted 600 per Minute. Try again in 55 seconds."
    return json_bytes(error_document(status, message, request_id or str(uuid.uuid4())))


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


class OAuthError(Exception):
    def __init__(self, error: str, description: str, status: int = 400) -> None:
        super().__init__(description)
        self.error, self.description, self.status = error, description, status


@dataclasses.dataclass
class Company:
    tenant: TruthTenant
    variant: int = STANDARD
    impersonate_as: int | None = None

    @property
    def identifier(self) -> str:
        return company_identifier(self.tenant.erp_client_id)


@dataclasses.dataclass
class Grant:
    company: int  # erp_client_id
    scopes: frozenset[str]
    refresh_token: str = ""
    revoked: bool = False


@dataclasses.dataclass
class AccessToken:
    grant: Grant
    expires_at: float



class EAccountingSandbox(Simulator):
    """eAccounting API v2 at /v2, its identity server at /connect, admin at /_sandbox."""

    erp = "eaccounting"
    api_prefix = API_PREFIX
    paths = ApiPaths(clients="/companysettings", accounts="/accounts", balances="/accountbalances",
                     identity="/companysettings", phantom_account=str(PHANTOM_ACCOUNT[0]), paged_client_list=False)
    default_rate_limit = DEFAULT_RATE_LIMIT
    contract_rate_limit = DEFAULT_RATE_LIMIT
    revoke_fix = "erp-pipelines consent eaccounting"  # the connector's fix: consent again for the company
    deny_access_fix = "product variant"  # the connector's fix: a variant with bookkeeping
    required_balance_field = "Data.*.Balance"
    DEMO_TENANT_INVOICING_ONLY = 5

    def __init__(self, ledger: TruthLedger, *, client_id: str = DEFAULT_CLIENT_ID,
                 client_secret: str = DEFAULT_CLIENT_SECRET, rate_limit: RateLimitPolicy | None = None,
                 fault_seed: int = 0) -> None:
        self.ledger = ledger
        self.client_id, self.client_secret = client_id, client_secret
        self.lock = threading.Lock()
        self.companies = {t.erp_client_id: Company(t) for t in ledger.tenants}
        self.codes: dict[str, tuple[Grant, str]] = {}  # code -> (grant, redirect_uri)
        self.refresh_tokens: dict[str, Grant] = {}
        self.tokens: dict[str, AccessToken] = {}
        self.login_queue: list[int] = []  # the companies the next logins pick
        self.paging_mutations: list[PagingMutation] = []
        self.refreshes = 0  # answered refresh_token grants
        profile = ErpProfile(name=self.erp, api_prefix=API_PREFIX, error_body=error_body,
                             credential_key=self._rate_key, tenant_of=self._tenant_of)
        self.harness = SandboxHarness(profile, rate_limit=rate_limit or dataclasses.replace(DEFAULT_RATE_LIMIT),
                                      fault_seed=fault_seed)
        self.app = self.harness.build_app(self._api_routes(), exception_handlers={
            ApiError: self._api_error, OAuthError: self._oauth_error, HTTPException: self._http_error})
        self.app.router.routes.append(Mount(IDENTITY_PREFIX, routes=[  # outside the API: not limited or counted
            Route("/authorize", self.authorize, methods=["GET"]),
            Route("/token", self.token, methods=["POST"]),
        ]))

    # ------------------------------------------------------------------ simulator hooks

    def environment(self, url: str) -> dict[str, str]:
        return {"EACCOUNTING_BASE_URL": url, "EACCOUNTING_IDENTITY_URL": url.removesuffix(API_PREFIX),
                "EACCOUNTING_CLIENT_ID": self.client_id, "EACCOUNTING_CLIENT_SECRET": self.client_secret}

    def credential_lines(self) -> list[str]:
        return [f"OAuth client:    {self.client_id} / {self.client_secret}  (authorize auto-approves)",
                f"companies:       {len(self.companies)}; a login picks the one queued (select_company), else the first"]

    def wrong_credential(self, environment: dict[str, str]) -> tuple[dict[str, str], str]:
        self.expire_tokens()  # so the next call needs the app's own credential (a refresh)
        return {**environment, "EACCOUNTING_CLIENT_SECRET": "not-the-app-secret"}, "EACCOUNTING_CLIENT_SECRET"

    def prepare_demo(self) -> None:
        if len(self.ledger.valid_tenants) > self.DEMO_TENANT_INVOICING_ONLY:
            self.deny_access(self.ledger.valid_tenants[self.DEMO_TENANT_INVOICING_ONLY])

    def prepare_credentials(self, environment: dict[str, str], store: TokenStore) -> None:
        """`erp-pipelines consent eaccounting` once per valid tenant, for real (in process, so it
        works served or not): the authorise URL is followed as a browser would and the redirect lands
        on the command's listener. (The fixtures the client rules reject have no usable number, or
        share one: at most one of them could ever be added.)"""
        from erp_pipelines.consent import run_consent
        from erp_pipelines.erps.eaccounting import EAccountingConnector

        environment["EACCOUNTING_REDIRECT_URI"] = f"http://127.0.0.1:{_free_port()}/callback"
        fields = {s.field: environment.get(s.env) or s.default for s in EAccountingConnector.settings}

        async def log_in(url: str) -> None:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app)) as identity:
                approved = await identity.get(url)
            async with httpx.AsyncClient(timeout=30) as browser:
                await browser.get(approved.headers["location"])

        def browser(line: str) -> None:
            if line.startswith("http"):
                threading.Thread(target=asyncio.run, args=(log_in(line),), daemon=True).start()

        async def consent_all() -> None:
            async with EAccountingConnector(**fields, token_store=store,
                                            transport=httpx.ASGITransport(app=self.app)) as connector:
                for tenant in self.ledger.valid_tenants:
                    self.select_company(tenant)
                    await run_consent(connector, open_browser=False, timeout=30, say=browser)

        with concurrent.futures.ThreadPoolExecutor(1) as thread:  # callable from inside a running loop too
            thread.submit(asyncio.run, consent_all()).result()

    def scope_of(self, tenant: TruthTenant) -> str:
        return str(tenant.erp_client_id)

    def deny_access(self, tenant: TruthTenant) -> None:
        """The company moves to the Invoicing variant: no account balances (spec)."""
        with self.lock:
            self.companies[tenant.erp_client_id].variant = INVOICING

    def revoke(self, tenant: TruthTenant) -> None:
        """The company's consents end (user removed, password changed): tokens 401, refresh invalid_grant."""
        with self.lock:
            for grant in {id(g): g for g in self._grants() if g.company == tenant.erp_client_id}.values():
                grant.revoked = True

    def swap_identity(self, tenant: TruthTenant, as_tenant: TruthTenant) -> None:
        with self.lock:
            self.companies[tenant.erp_client_id].impersonate_as = as_tenant.erp_client_id

    def expire_tokens(self) -> int:
        with self.lock:
            live = [t for t in self.tokens.values() if t.expires_at > time.monotonic()]
            for token in live:
                token.expires_at = 0.0
            return len(live)

    def mutate_during_paging(self, path: str, action: str = "insert", *, position: int = 0,
                             after_requests: int = 1, tenant: int | None = None) -> PagingMutation:
        if path not in (self.paths.accounts, self.paths.balances):
            raise ValueError(f"{path} is not a paged list of this simulator")
        mutation = PagingMutation(path, action, position, after_requests, tenant)
        with self.lock:
            self.paging_mutations.append(mutation)
        return mutation

    def select_company(self, tenant: TruthTenant) -> None:
        """The next login picks this company (the user's choice under forceselectcompany)."""
        with self.lock:
            self.login_queue.append(tenant.erp_client_id)

    # ------------------------------------------------------------------ identity server (NOTES §2)

    async def authorize(self, request: Request) -> Response:
        params = request.query_params
        missing = [n for n in ("response_type", "client_id", "redirect_uri", "scope", "state") if not params.get(n)]
        if missing:
            raise OAuthError("invalid_request", f"missing parameter(s): {', '.join(missing)}")
        if params["client_id"] != self.client_id:
            raise OAuthError("invalid_client", "unknown client_id")
        scopes = frozenset(params["scope"].split())
        with self.lock:
            picks = "forceselectcompany:true" in params.get("acr_values", "").split()
            # without forceselectcompany the login goes to the user's default company (standardfirma)
            company = self.login_queue.pop(0) if picks and self.login_queue else next(iter(self.companies))
            code = secrets.token_urlsafe(24)
            self.codes[code] = (Grant(company, scopes), params["redirect_uri"])
        uri = params["redirect_uri"]
        return Response(status_code=302, headers={
            "Location": f"{uri}{'&' if '?' in uri else '?'}{urlencode({'code': code, 'state': params['state']})}"})

    async def token(self, request: Request) -> Response:
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/x-www-form-urlencoded":
            raise OAuthError("invalid_request", "the body must be application/x-www-form-urlencoded")
        form = dict(parse_qsl((await request.body()).decode("utf-8", "replace"), keep_blank_values=True))
        self._check_client(request, form)
        with self.lock:
            if form.get("grant_type") == "authorization_code":
                grant, redirect_uri = self.codes.pop(form.get("code", ""), (None, None))
                if grant is None or redirect_uri != form.get("redirect_uri"):
                    raise OAuthError("invalid_grant", "invalid, used or mismatched authorization code")
            elif form.get("grant_type") == "refresh_token":
                grant = self.refresh_tokens.pop(form.get("refresh_token", ""), None)  # rotation: used once
                if grant is None or grant.revoked:
                    raise OAuthError("invalid_grant", "invalid, used or revoked refresh token")
                self.refreshes += 1
            else:
                raise OAuthError("unsupported_grant_type", "grant_type must be authorization_code or refresh_token")
            grant.refresh_token = secrets.token_urlsafe(32)
            self.refresh_tokens[grant.refresh_token] = grant
            access = secrets.token_urlsafe(32)
            self.tokens[access] = AccessToken(grant, time.monotonic() + ACCESS_TOKEN_SECONDS)
        return json_response({"access_token": access, "expires_in": ACCESS_TOKEN_SECONDS, "token_type": "Bearer",
                              "refresh_token": grant.refresh_token, "scope": " ".join(sorted(grant.scopes))},
                             headers={"Cache-Control": "no-store"})

    def _check_client(self, request: Request, form: dict[str, str]) -> None:
        """HTTP Basic or client_id/client_secret in the body (which one Visma documents is UNCONFIRMED)."""
        scheme, _, encoded = request.headers.get("authorization", "").partition(" ")
        try:
            basic = base64.b64decode(encoded.strip(), validate=True).decode() if scheme.lower() == "basic" else ""
        except (binascii.Error, UnicodeDecodeError):
            basic = ""
        given = basic or f"{form.get('client_id', '')}:{form.get('client_secret', '')}"
        if given != f"{self.client_id}:{self.client_secret}":
            raise OAuthError("invalid_client", "client authentication failed")

    # ------------------------------------------------------------------ request identity

    def _grants(self) -> list[Grant]:
        return [t.grant for t in self.tokens.values()] + list(self.refresh_tokens.values())

    def _token_of(self, scope: Scope) -> AccessToken | None:
        return self.tokens.get(bearer_token(header_value(scope, "authorization")) or "")

    def _tenant_of(self, scope: Scope) -> str | None:
        token = self._token_of(scope)
        return str(token.grant.company) if token else None

    def _rate_key(self, scope: Scope) -> str | None:
        """Per company and endpoint (NOTES §7); every date of /accountbalances one endpoint."""
        tenant = self._tenant_of(scope)
        endpoint = scope["path"].removeprefix(API_PREFIX).strip("/").split("/")[0]
        return f"{tenant}:{endpoint.lower()}" if tenant else None

    def _company(self, request: Request, scopes: set[str]) -> tuple[Company, Company]:
        """(the grant's company, the company whose data answers), after the token and scope checks."""
        with self.lock:
            token = self.tokens.get(bearer_token(request.headers.get("authorization")) or "")
            if token is None or token.grant.revoked or token.expires_at <= time.monotonic():
                raise ApiError(401, "Authorization has been denied for this request.")
            if "ea:api" not in token.grant.scopes or not scopes & token.grant.scopes:
                raise ApiError(403, f"Requires any of the following scopes: {', '.join(sorted(scopes))}")
            company = self.companies[token.grant.company]
            return company, self.companies[company.impersonate_as or company.tenant.erp_client_id]

    # ------------------------------------------------------------------ rendering

    @staticmethod
    def _fiscal_years(tenant: TruthTenant) -> list[dict[str, Any]]:
        return [{"Id": fiscal_year_id(tenant.erp_client_id, year), "StartDate": f"{year}-01-01T00:00:00",
                 "EndDate": f"{year}-12-31T00:00:00", "IsLockedForAccounting": False, "BookkeepingMethod": 0}
                for year in range(tenant.first_month.year, tenant.last_month.year + 1)]

    @staticmethod
    def _chart(tenant: TruthTenant, year_id: str) -> list[dict[str, Any]]:
        return [{"Name": a.name, "Number": str(a.number), "FiscalYearId": year_id, "IsActive": True,
                 "TypeDescription": a.type, "ModifiedUtc": f"{tenant.first_month.isoformat()}T00:00:00Z",
                 "IsProjectAllowed": False, "IsCostCenterAllowed": False, "IsBlockedForManualBooking": False}
                for a in sorted(tenant.accounts, key=lambda a: a.number)]

    @staticmethod
    def _balances(tenant: TruthTenant, day: dt.date) -> list[dict[str, Any]]:
        """At the end of `day`: balance sheet cumulative, profit and loss since 1 January (øre sums)."""
        sums: dict[int, int] = {}
        for voucher in tenant.vouchers:
            if voucher.date > day:
                continue
            for number, amount in voucher.lines:
                if number < 3000 or voucher.date.year == day.year:
                    sums[number] = sums.get(number, 0) + amount
        names = {a.number: a.name for a in tenant.accounts}
        return [{"AccountNumber": n, "AccountName": names[n], "Balance": _kroner(v), "AccountType": 1 if n < 3000 else 2,
                 "AccountTypeDescription": "Balance" if n < 3000 else "Result"}
                for n, v in sorted(sums.items()) if v]

    def _paged(self, request: Request, path: str, rows: list[dict[str, Any]], company: Company | None) -> Response:
        page = _int_param(request, "$page", 1)
        size = min(_int_param(request, "$pagesize", DEFAULT_PAGE_SIZE), MAX_PAGE_SIZE)
        if page < 1 or size < 1:
            raise ApiError(400, "$page and $pagesize must be positive")
        rows = self._mutate(path, company, rows)
        meta = {"CurrentPage": page, "PageSize": size, "TotalNumberOfPages": math.ceil(len(rows) / size),
                "TotalNumberOfResults": len(rows),
                "ServerTimeUtc": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")}
        return json_response({"Meta": meta, "Data": rows[(page - 1) * size:page * size]})

    def _mutate(self, path: str, company: Company | None, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        key = "Number" if path == self.paths.accounts else "AccountNumber"
        client_id = company.tenant.erp_client_id if company else None
        number, name = PHANTOM_ACCOUNT

        def phantom() -> dict[str, Any]:
            if key == "Number" and rows:
                return {**rows[0], "Name": name, "Number": str(number)}
            return {"AccountNumber": number, "AccountName": name, "Balance": _kroner(0), "AccountType": 1,
                    "AccountTypeDescription": "Balance"}

        with self.lock:
            return apply_paging_mutations(self.paging_mutations, path, client_id, rows, phantom=phantom,
                                          identity=lambda row: row.get(key))

    # ------------------------------------------------------------------ API endpoints

    async def company_settings(self, request: Request) -> Response:
        _, serving = self._company(request, SALES_SCOPES)
        tenant = serving.tenant
        return json_response({
            "Name": tenant.name, "CountryCode": "NO", "CurrencyCode": "NOK",
            "CorporateIdentityNumber": tenant.org_number,  # as given: "" or invalid for the rejected fixtures
            "Address1": f"Sandkassegata {tenant.index + 1}", "PostalCode": "0150", "City": "Oslo",
            "ProductVariant": serving.variant, "CompanyStatus": 1, "CompanyIdentifier": serving.identifier,
        })

    async def fiscal_years(self, request: Request) -> Response:
        company, serving = self._company(request, SALES_SCOPES | ACCOUNTING_SCOPES)
        return self._paged(request, "/fiscalyears", self._fiscal_years(serving.tenant), company)

    async def accounts(self, request: Request) -> Response:
        company, serving = self._company(request, ACCOUNTING_SCOPES)
        year_id = request.path_params["fiscalyearId"]
        if year_id not in {year["Id"] for year in self._fiscal_years(serving.tenant)}:
            raise ApiError(404, "FiscalYearDoesNotExist")
        return self._paged(request, "/accounts", self._chart(serving.tenant, year_id), company)

    async def account_balances(self, request: Request) -> Response:
        company, serving = self._company(request, ACCOUNTING_SCOPES)
        if serving.variant == INVOICING:
            raise ApiError(403, "Account balances are not available in the Invoicing variant.")
        try:
            day = dt.date.fromisoformat(request.path_params["date"])
        except ValueError:
            raise ApiError(400, "date must be yyyy-MM-dd") from None
        tenant = serving.tenant
        if not tenant.first_month.year <= day.year <= tenant.last_month.year:
            raise ApiError(404, "FiscalYearDoesNotExist")  # UNCONFIRMED: how a date outside the books answers
        return self._paged(request, "/accountbalances", self._balances(tenant, day), company)

    def _api_routes(self) -> list[Route]:
        return [
            Route("/companysettings", self.company_settings, methods=["GET"]),
            Route("/fiscalyears", self.fiscal_years, methods=["GET"]),
            Route("/accounts/{fiscalyearId}", self.accounts, methods=["GET"]),
            Route("/accountbalances/{date}", self.account_balances, methods=["GET"]),
        ]

    # ------------------------------------------------------------------ errors

    async def _api_error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        return json_response(error_document(exc.status, exc.message, str(uuid.uuid4())), exc.status)

    async def _oauth_error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, OAuthError)
        return json_response({"error": exc.error, "error_description": exc.description}, exc.status)

    async def _http_error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return json_response(error_document(exc.status_code, str(exc.detail), str(uuid.uuid4())), exc.status_code)


def _kroner(ore: int) -> Decimal:
    return Decimal(ore).scaleb(-2)


def _int_param(request: Request, name: str, default: int) -> int:
    raw = request.query_params.get(name)
    try:
        return int(raw) if raw is not None else default
    except ValueError:
        raise ApiError(400, f"{name} must be an integer") from None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
