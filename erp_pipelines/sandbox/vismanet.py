"""Visma.net ERP API simulator: the truth ledger through Visma.net's paths, auth and shapes.

Facts come from `specs/vismanet/NOTES.md` and `vismanet-erp-api-v1-openapi-20250424.json`:

- Visma Connect client credentials at `/connect/token` (served at the root, as its own host):
  form `grant_type=client_credentials`, `client_id`, `client_secret` (HTTP Basic also accepted),
  `scope=vismanet_erp_service_api:read`, `tenant_id` = the company; one token per company.
  OAuth errors: `invalid_client`, `invalid_tenant` (the company does not grant our app),
  `invalid_scope`, `invalid_request`;
- the API below `API_PREFIX` (standing in for the host `api.finance.visma.net`), paths from
  `/v1` or `/v2`; a valid token of a tenant that is not an active company (a customer tenant, or a
  company that deactivated our app) gets 401 (NOTES pitfall 1);
- JSON arrays, every row with `metadata` {`totalCount`, `maxPageSize`}; `pageNumber` (from 1) and
  `pageSize` (capped at `maxPageSize`);
- the ledger split over two branches (vouchers alternate between them) plus a budget ledger;
  balances in kroner, liability and income accounts credit positive unless `toggleBalanceSigns=true`;
- `X-RateLimit-Limit/-Remaining/-Reset` (seconds) on every API response, per company and client.

Usage in tests::

    sandbox = VismaNetSandbox(generate_ledger(5))
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=sandbox.app), base_url="http://vismanet.test")
    sandbox.deny_access(sandbox.ledger.tenants[1])   # its valid tokens now get 401
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import secrets
import threading
import time
import uuid
from collections.abc import Callable
from decimal import Decimal
from typing import Any
from urllib.parse import parse_qsl

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Scope

from erp_pipelines.model import add_months
from erp_pipelines.sandbox.common import (
    AccessToken,
    ErpProfile,
    PagingMutation,
    RateLimitHeaderNames,
    RateLimitPolicy,
    SandboxHarness,
    apply_paging_mutations,
    basic_credentials,
    bearer_token,
    expire_all,
    header_value,
    ids_in_ledger_order,
    json_bytes,
    json_response,
)
from erp_pipelines.sandbox.ledger import TruthAccount, TruthLedger, TruthTenant
from erp_pipelines.sandbox.simulator import ApiPaths, Simulator

API_PREFIX = "/api"  # the sandbox's stand-in for the host https://api.finance.visma.net
TOKEN_PATH = "/connect/token"
SCOPE = "vismanet_erp_service_api:read"
DEFAULT_CLIENT_ID = "isv_erp_pipelines_sandbox"  # sandbox only
DEFAULT_CLIENT_SECRET = "sandbox-visma-connect-secret-6b1f0d2e"  # sandbox only
TOKEN_LIFETIME = 3600  # UNCONFIRMED (NOTES §2)
# Per company and client; Visma publishes no number (NOTES §7): generous, a fixed window like theirs.
DEFAULT_RATE_LIMIT = RateLimitPolicy(limit=100, window_seconds=5, reset_header_on_429=True)
MAX_PAGE_SIZE = {"/v1/account": 1000, "/v2/generalLedgerBalance": 2000}  # numbers UNCONFIRMED (NOTES §6)
BRANCHES = (("1", "Hovedkontor"), ("2", "Avdeling Bergen"))  # voucher n posts in BRANCHES[n % 2]
ACTUAL_LEDGER = ("HOVED", "Hovedbok")
BUDGET_LEDGER = ("BUDSJETT", "Budsjett")
PHANTOM_ACCOUNT = TruthAccount(1000, "Forskning og utvikling", "ASSETS")  # what a mid-paging insert adds
VISMANET_HEADERS = RateLimitHeaderNames("X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset")


class ApiError(Exception):
    """An error answer; Visma.net's error body is UNCONFIRMED (NOTES §8): {"message": ...}."""

    def __init__(self, status: int, message: str, body: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status, self.body = status, body or {"message": message}


def oauth_error(error: str, description: str) -> ApiError:
    return ApiError(400, description, {"error": error, "error_description": description})


def derived_uuid(*parts: Any) -> str:
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return str(uuid.UUID(bytes=digest[:16], version=4))


def account_type(number: int) -> str:
    """Visma.net's account type (Asset, Liability, Income, Expense) from the NS 4102 number."""
    if number < 2000:
        return "Asset"
    if number < 3000:
        return "Liability"  # equity included
    return "Income" if number < 4000 or 8000 <= number < 8100 else "Expense"


def kroner(ore: int) -> Decimal:
    return Decimal(ore).scaleb(-2)


def stamp(day: dt.date) -> str:
    return f"{day.isoformat()}T08:00:00+00:00"  # the spec's date-time needs an offset


@dataclasses.dataclass
class Company:
    tenant: TruthTenant
    tenant_id: str  # the company tenant
    customer_tenant_id: str  # the customer (licence holder) tenant: tokens work, API calls 401
    app_active: bool = True  # False: the company deactivated our app (valid tokens get 401)
    ledger_rights: bool = True  # False: our Visma.net user lost its rights to the ledger (403 there)
    approved: bool = True  # False: Visma Connect issues no token for it (invalid_tenant)
    impersonate_as: str | None = None  # fault: answer with this other company's data


class VismaNetSandbox(Simulator):
    erp = "vismanet"
    api_prefix = API_PREFIX
    paths = ApiPaths(clients="/v1/organization", accounts="/v1/account", balances="/v2/generalLedgerBalance",
                     identity="/v1/organization", phantom_account=str(PHANTOM_ACCOUNT.number),
                     paged_client_list=False)
    default_rate_limit = DEFAULT_RATE_LIMIT
    contract_rate_limit = DEFAULT_RATE_LIMIT
    revoke_fix = "approve our app again"
    deny_access_fix = "rights to the general ledger"
    required_balance_field = "*.yearToDateBalance"

    def __init__(self, ledger: TruthLedger, *, rate_limit: RateLimitPolicy | None = None, fault_seed: int = 0,
                 client_id: str = DEFAULT_CLIENT_ID, client_secret: str = DEFAULT_CLIENT_SECRET,
                 token_lifetime: int = TOKEN_LIFETIME) -> None:
        self.ledger = ledger
        self.client_id, self.client_secret, self.token_lifetime = client_id, client_secret, token_lifetime
        self.clock: Callable[[], float] = time.monotonic  # token expiry; replace in tests
        self.tokens_minted = 0
        self._lock = threading.RLock()
        tenant_ids = ids_in_ledger_order(ledger.tenants, lambda t, attempt: derived_uuid("company", t.seed, *([attempt] if attempt else [])))
        companies = [Company(t, tenant_ids[t.erp_client_id], derived_uuid("customer", t.seed)) for t in ledger.tenants]
        self._companies = {c.tenant_id: c for c in companies}
        self._tokens: dict[str, AccessToken] = {}
        self._mutations: list[PagingMutation] = []
        self._balances: dict[tuple[str, dt.date], dict] = {}
        profile = ErpProfile(name=self.erp, api_prefix=API_PREFIX, error_body=self._error_body,
                             credential_key=self._credential_key, tenant_of=self._tenant_of,
                             rate_limit_headers=VISMANET_HEADERS)
        self.harness = SandboxHarness(profile, rate_limit=rate_limit or dataclasses.replace(DEFAULT_RATE_LIMIT),
                                      fault_seed=fault_seed)
        self.app = self.harness.build_app(self._api_routes(), exception_handlers={
            ApiError: self._api_error, HTTPException: self._http_error})
        self.app.routes.insert(0, Route(TOKEN_PATH, self.token, methods=["POST"]))  # Visma Connect's own host

    # ------------------------------------------------------------------ simulator hooks

    @property
    def tenant_ids(self) -> list[str]:
        return [c.tenant_id for c in self._companies.values()]

    def company(self, tenant: TruthTenant) -> Company:
        return next(c for c in self._companies.values() if c.tenant is tenant)

    def environment(self, url: str) -> dict[str, str]:
        return {
            "VISMANET_BASE_URL": url,
            "VISMA_CONNECT_URL": url.removesuffix(API_PREFIX),
            "VISMANET_CLIENT_ID": self.client_id,
            "VISMANET_CLIENT_SECRET": self.client_secret,
            "VISMANET_TENANT_IDS": ",".join(self.tenant_ids),
        }

    def credential_lines(self) -> list[str]:
        return [
            f"token URL:     <root>{TOKEN_PATH} (form: client_id, client_secret, tenant_id, scope={SCOPE})",
            f"client id:     {self.client_id}",
            f"client secret: {self.client_secret}",
            f"tenant ids:    {','.join(self.tenant_ids)}  (company tenants, in ledger order)",
        ]

    def wrong_credential(self, environment: dict[str, str]) -> tuple[dict[str, str], str]:
        return {**environment, "VISMANET_CLIENT_SECRET": "not-the-secret-" + "0" * 16}, "VISMANET_CLIENT_SECRET"

    def prepare_demo(self) -> None:
        if len(self.ledger.tenants) > 5:  # one company whose user lost its ledger rights
            self.deny_access(self.ledger.tenants[5])

    def scope_of(self, tenant: TruthTenant) -> str:
        return self.company(tenant).tenant_id

    def deny_access(self, tenant: TruthTenant) -> None:
        """Our user loses its rights to the ledger: the company stays describable, its reads get 403.
        UNCONFIRMED: Visma.net's answer to a read the user's roles do not allow."""
        with self._lock:
            self.company(tenant).ledger_rights = False

    def deactivate_app(self, tenant: TruthTenant) -> None:
        """The company deactivates our app: its valid tokens get 401 everywhere (NOTES pitfall 1)."""
        with self._lock:
            self.company(tenant).app_active = False

    def revoke(self, tenant: TruthTenant) -> None:
        with self._lock:
            company = self.company(tenant)
            company.approved = False
            self._tokens = {k: v for k, v in self._tokens.items() if v.holder != company.tenant_id}

    def swap_identity(self, tenant: TruthTenant, as_tenant: TruthTenant) -> None:
        with self._lock:
            self.company(tenant).impersonate_as = self.company(as_tenant).tenant_id

    def expire_tokens(self) -> int:
        with self._lock:
            return expire_all(self._tokens, self.clock())

    def mutate_during_paging(self, path: str, action: str = "insert", *, position: int = 0,
                             after_requests: int = 1, tenant: TruthTenant | int | str | None = None) -> PagingMutation:
        path = "/" + path.removeprefix(API_PREFIX).strip("/")
        if path not in MAX_PAGE_SIZE or action not in ("insert", "remove"):
            raise ValueError(f"paging mutations insert or remove rows of {list(MAX_PAGE_SIZE)}")
        if isinstance(tenant, int):
            tenant = self.ledger.by_client_id(tenant)
        tenant_id = self.company(tenant).tenant_id if isinstance(tenant, TruthTenant) else tenant
        mutation = PagingMutation(path, action, position, after_requests, tenant_id)
        with self._lock:
            self._mutations.append(mutation)
        return mutation

    # ------------------------------------------------------------------ request identity (for the harness)

    def _access(self, scope: Scope) -> AccessToken | None:
        return self._tokens.get(bearer_token(header_value(scope, "authorization")) or "")

    def _credential_key(self, scope: Scope) -> str | None:
        """The limit is per company and client (NOTES §7)."""
        access = self._access(scope)
        return f"{self.client_id}:{access.holder}" if access else None

    def _tenant_of(self, scope: Scope) -> str | None:
        access = self._access(scope)
        return access.holder if access else None

    def _error_body(self, status: int, message: str, request_id: str) -> bytes:
        return json_bytes({"message": message})

    # ------------------------------------------------------------------ token endpoint (Visma Connect)

    async def token(self, request: Request) -> Response:
        try:
            form = dict(parse_qsl((await request.body()).decode("utf-8", "replace")))
            client_id, client_secret = basic_credentials(request.headers.get("authorization")) or (
                form.get("client_id", ""), form.get("client_secret", ""))
            if form.get("grant_type") != "client_credentials":
                raise oauth_error("unsupported_grant_type", "Only client_credentials is supported here.")
            if (client_id, client_secret) != (self.client_id, self.client_secret):
                raise oauth_error("invalid_client", "Invalid client or client credentials.")
            if SCOPE not in form.get("scope", "").split():
                raise oauth_error("invalid_scope", f"The scope {SCOPE} is required.")
            tenant_id = form.get("tenant_id", "")
            if not tenant_id:
                raise oauth_error("invalid_request", "tenant_id is required for a service integration.")
            with self._lock:
                company = self._companies.get(tenant_id)
                customer = any(c.customer_tenant_id == tenant_id for c in self._companies.values())
                if not customer and (company is None or not company.approved):
                    raise oauth_error("invalid_tenant", "The tenant has not approved this application.")
                token = secrets.token_urlsafe(32)
                self._tokens[token] = AccessToken(tenant_id, self.clock() + self.token_lifetime)
                self.tokens_minted += 1
        except ApiError as error:
            return json_response(error.body, error.status, {"Cache-Control": "no-store"})
        body = {"access_token": token, "expires_in": self.token_lifetime, "token_type": "Bearer", "scope": SCOPE}
        return json_response(body, headers={"Cache-Control": "no-store"})

    def _authenticate(self, request: Request, *, ledger: bool = False) -> Company:
        """The company whose data answers (another one when impersonating); `ledger`: a ledger read."""
        with self._lock:
            access = self._access(request.scope)
            if access is None or self.clock() >= access.expires_at:
                raise ApiError(401, "Authorization has been denied for this request.")
            company = self._companies.get(access.holder)
            if company is None or not company.app_active:  # a customer tenant, or the app deactivated
                raise ApiError(401, "Authorization has been denied for this request.")
            if ledger and not company.ledger_rights:
                raise ApiError(403, "The user has no access rights to this resource.")
            return self._companies[company.impersonate_as] if company.impersonate_as else company

    # ------------------------------------------------------------------ endpoints

    async def organizations(self, request: Request) -> Response:
        tenant = self._authenticate(request).tenant
        row = {
            "organizationCd": str(tenant.erp_client_id), "name": tenant.name, "baseCurrency": "NOK",
            "corporateId": tenant.org_number,
            "vatRegistrationId": f"NO{tenant.org_number}MVA" if tenant.org_number else "",
            "lastModifiedDateTime": stamp(tenant.first_month),
        }
        if _flag(request, "expandBranches"):
            row["branches"] = [{"number": number, "name": name} for number, name in BRANCHES]
        return json_response([row])

    async def branches(self, request: Request) -> Response:
        tenant = self._authenticate(request).tenant
        return json_response([{
            "branchId": i + 1, "number": number, "name": name, "organizationId": tenant.erp_client_id,
            "isMainBranch": i == 0, "isActive": True, "corporateId": tenant.org_number,
            "vatRegistrationId": f"NO{tenant.org_number}MVA" if tenant.org_number else "",
            "lastModifiedDateTime": stamp(tenant.first_month),
        } for i, (number, name) in enumerate(BRANCHES)])

    async def accounts(self, request: Request) -> Response:
        company = self._authenticate(request, ledger=True)
        rows = [self._account_row(company.tenant, a) for a in sorted(company.tenant.accounts, key=lambda a: a.number)]
        above = request.query_params.get("greaterThanValue")
        if above:
            rows = [row for row in rows if row["accountCD"] > above]
        if "active" in request.query_params:
            rows = [row for row in rows if row["active"] == _flag(request, "active")]
        return self._paged(request, "/v1/account", company, rows,
                           lambda: self._account_row(company.tenant, PHANTOM_ACCOUNT))

    async def general_ledger_balances(self, request: Request) -> Response:
        company = self._authenticate(request, ledger=True)
        query = request.query_params
        period = query.get("periodId", "")
        if not period and not query.get("lastModifiedDateTime"):
            raise ApiError(400, "PeriodId is mandatory if LastModifiedDateTime is not provided.")
        try:
            month = dt.datetime.strptime(period, "%Y%m").date()
        except ValueError:
            raise ApiError(400, f"PeriodId '{period}' is not in the format yyyyMM.") from None
        flip = not _flag(request, "toggleBalanceSigns")  # liability and income credit positive by default
        rows = [self._balance_row(company.tenant, month, *key, amounts, flip)
                for key, amounts in sorted(self._period(company.tenant, month).items())]
        for name, wanted in (("balanceType", query.get("balanceType")), ("branch", query.get("branch")),
                             ("ledger", query.get("ledger")), ("account", query.get("account"))):
            if wanted:
                rows = [row for row in rows if _field(row, name) == wanted]
        phantom = (ACTUAL_LEDGER, "Actual", BRANCHES[0], PHANTOM_ACCOUNT.number, (0, 0, 0))
        return self._paged(request, "/v2/generalLedgerBalance", company, rows,
                           lambda: self._balance_row(company.tenant, month, *phantom, flip))

    # ------------------------------------------------------------------ rows

    def _account_row(self, tenant: TruthTenant, account: TruthAccount) -> dict[str, Any]:
        return {"accountID": tenant.erp_client_id * 10_000 + account.number, "accountCD": str(account.number),
                "description": account.name, "type": account_type(account.number), "active": True,
                "postOption": "Summary", "currency": "NOK", "cashAccount": account.number in (1900, 1920),
                "allowManualEntry": True, "lastModifiedDateTime": stamp(tenant.first_month)}

    def _period(self, tenant: TruthTenant, month: dt.date) -> dict[tuple, tuple[int, int, int]]:
        """(ledger, balance type, branch, account) → (opening, debit, credit) in øre, debit positive.
        Actual: the vouchers, each in its branch; profit and loss opens at zero each year. Budget:
        this year's actual movements plus 10 %, in the main branch."""
        cache_key = (tenant.erp_client_id, month)
        if cache_key in self._balances:
            return self._balances[cache_key]
        sums: dict[tuple, list[int]] = {}
        for voucher in tenant.vouchers:
            if voucher.date >= add_months(month, 1):
                continue
            in_month = voucher.date.replace(day=1) == month
            branch = BRANCHES[voucher.number % 2]
            for number, ore in voucher.lines:
                if number >= 3000 and voucher.date.year != month.year:
                    continue  # an earlier year's result is in the balance sheet (årsoppgjør)
                cell = sums.setdefault((ACTUAL_LEDGER, "Actual", branch, number), [0, 0, 0])
                if not in_month:
                    cell[0] += ore
                else:
                    cell[1 if ore > 0 else 2] += abs(ore)
        for (_, _, _, number), (opening, debit, credit) in list(sums.items()):
            budget = sums.setdefault((BUDGET_LEDGER, "Budget", BRANCHES[0], number), [0, 0, 0])
            budget[0] += opening * 11 // 10
            budget[1] += debit * 11 // 10
            budget[2] += credit * 11 // 10
        result = {key: tuple(cell) for key, cell in sums.items() if any(cell)}
        self._balances[cache_key] = result
        return result

    def _balance_row(self, tenant: TruthTenant, month: dt.date, ledger: tuple[str, str], balance_type: str,
                     branch: tuple[str, str], number: int, amounts: tuple[int, int, int], flip: bool) -> dict[str, Any]:
        opening, debit, credit = amounts
        kind = account_type(number)
        sign = -1 if flip and kind in ("Liability", "Income") else 1
        name = next((a.name for a in tenant.accounts if a.number == number), PHANTOM_ACCOUNT.name)
        return {
            "branch": {"number": branch[0], "name": branch[1]},
            "ledger": {"id": ledger[0], "description": ledger[1]},
            "balanceType": balance_type,
            "financialPeriod": f"{month:%Y%m}",
            "account": {"type": kind, "number": str(number), "description": name},
            "currencyId": "NOK",
            "periodToDateDebit": kroner(debit), "periodToDateCredit": kroner(credit),
            "beginningBalance": kroner(sign * opening), "yearToDateBalance": kroner(sign * (opening + debit - credit)),
            "periodToDateDebitInCurrency": kroner(debit), "periodToDateCreditInCurrency": kroner(credit),
            "beginningBalanceInCurrency": kroner(sign * opening),
            "yearToDateBalanceInCurrency": kroner(sign * (opening + debit - credit)),
            "yearClosed": month.year < tenant.last_month.year,
            "lastModifiedDateTime": stamp(month),
        }

    # ------------------------------------------------------------------ paging

    def _paged(self, request: Request, path: str, company: Company, rows: list[dict[str, Any]],
               phantom: Callable[[], dict[str, Any]]) -> Response:
        """One page (NOTES §6): pageNumber from 1, pageSize capped at maxPageSize, metadata on every row.
        UNCONFIRMED: /v1/account pages like the others, though this spec version declares no paging there."""
        cap = MAX_PAGE_SIZE[path]
        try:
            number = int(request.query_params.get("pageNumber") or 1)
            size = min(cap, int(request.query_params.get("pageSize") or cap))
        except ValueError:
            raise ApiError(400, "pageNumber and pageSize must be whole numbers.") from None
        if number < 1 or size < 1:
            raise ApiError(400, "pageNumber and pageSize must be 1 or more.")
        rows = self._mutated(path, company, rows, phantom)
        metadata = {"totalCount": len(rows), "maxPageSize": cap}
        return json_response([{**row, "metadata": metadata} for row in rows[(number - 1) * size:number * size]])

    def _mutated(self, path: str, company: Company, rows: list[dict[str, Any]],
                 phantom: Callable[[], dict[str, Any]]) -> list[dict[str, Any]]:
        with self._lock:  # the inserted row is of the month asked for
            return apply_paging_mutations(self._mutations, path, company.tenant_id, rows, phantom=phantom,
                                          new_row_each_request=True)

    # ------------------------------------------------------------------ routing and errors

    def _api_routes(self) -> list[Route]:
        return [
            Route("/v1/organization", self.organizations, methods=["GET"]),
            Route("/v1/branch", self.branches, methods=["GET"]),
            Route("/v1/account", self.accounts, methods=["GET"]),
            Route("/v2/generalLedgerBalance", self.general_ledger_balances, methods=["GET"]),
        ]

    async def _api_error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        return json_response(exc.body, exc.status)

    async def _http_error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return json_response({"message": str(exc.detail)}, exc.status_code, exc.headers)


def _flag(request: Request, name: str) -> bool:
    value = request.query_params.get(name, "").strip().lower()
    if value not in ("", "true", "false"):
        raise ApiError(400, f"The value '{value}' is not valid for {name}.")
    return value == "true"


def _field(row: dict[str, Any], name: str) -> str:
    value = row[name]
    return str(value.get("id", value.get("number")) if isinstance(value, dict) else value)
