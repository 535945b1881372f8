"""PowerOffice Go API v2 simulator: the truth ledger rendered through PowerOffice's paths, auth and shapes.

Facts come from `specs/poweroffice/NOTES.md` and the two vendor OpenAPI files next to it:

- OAuth 2.0 client credentials: `POST /OAuth/Token` (also `/Demo/OAuth/Token`, any letter case) with
  HTTP Basic `applicationKey:clientKey` and form `grant_type=client_credentials` gives a bearer
  token for ONE client; unknown keys or a client that deactivated the integration get
  400 `invalid_client`;
- the API product's subscription key (`Ocp-Apim-Subscription-Key`, or query `subscription-key`)
  goes on every call, token calls included; 10 requests per second per subscription key, shared
  by all client keys, token calls counted (the token path is part of the limited API, see
  `PowerOfficeProfile`);
- PascalCase DTOs, JSON arrays with page-number paging (`PageNumber`, `PageSize` <= 20000) and an
  `X-Pagination` header, 204 for an empty page, ProblemDetails errors;
- `TrialBalance` is cumulative and inclusive at a date, profit and loss from the fiscal year's
  start (1 January), amounts NOK as exact JSON numbers, debit positive.

Usage in tests::

    sandbox = PowerOfficeSandbox(generate_ledger(5))
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=sandbox.app), base_url="http://poweroffice.test/v2")
    token_url = sandbox.token_url("http://poweroffice.test/v2")  # http://poweroffice.test/OAuth/Token
    sandbox.deactivate_client(80_002)           # its key now gets invalid_client
    sandbox.faults.server_error(503, tenant=sandbox.tenant_scope(80_001), path_prefix="/TrialBalance")
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import math
import secrets
import threading
import time
import uuid
from collections.abc import Callable
from decimal import Decimal
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qsl, urlencode

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Match, Route
from starlette.types import Scope

from erp_pipelines.sandbox.common import (
    AccessToken,
    ErpProfile,
    PagingMutation,
    RateLimitPolicy,
    SandboxHarness,
    apply_paging_mutations,
    basic_credentials,
    bearer_token,
    client_admin_endpoint,
    expire_all,
    header_value,
    ids_in_ledger_order,
    json_bytes,
    json_response,
)
from erp_pipelines.sandbox.ledger import (
    CHART,
    COMPANY_WORDS,
    RETAINED_EARNINGS,
    TRADES,
    TruthAccount,
    TruthLedger,
    TruthTenant,
    Voucher,
    make_org_number,
)
from erp_pipelines.sandbox.simulator import ApiPaths, Simulator

API_PREFIX = "/v2"
TOKEN_PATH = "/OAuth/Token"  # production; the demo's is /Demo/OAuth/Token (both served, any case)
TOKEN_PATHS = ("/oauth/token", "/demo/oauth/token")
DEFAULT_APPLICATION_KEY = "3f6d2a91-7c4e-4b0a-9d18-5e2c7a4b9f61"  # sandbox only
DEFAULT_SUBSCRIPTION_KEY = "9c41e7b05a2d4f8e8b6a3d1c0f7e5a29"  # hex without dashes, as the portal issues them
DEFAULT_RATE_LIMIT = RateLimitPolicy(limit=10, window_seconds=1.0)  # per subscription key (NOTES §7)
TOKEN_LIFETIME = 1200  # seconds; the portal says 20 min, the spec example 600 (NOTES §2)
DEFAULT_PAGE_SIZE = 5000
MAX_PAGE_SIZE = 20_000
FISCAL_YEAR_END_MONTH = 12  # FinancialSettings.FinancialYearEndMonth "December"
SUBSCRIPTION_HEADER = "Ocp-Apim-Subscription-Key"
SUBSCRIPTION_QUERY = "subscription-key"
INVALID_CLIENT = ("Client integration not found. Please ensure the provided keys are matching the "
                  "desired environment.")
PHANTOM_ACCOUNT = TruthAccount(1000, "Forskning og utvikling", "ASSETS")  # what a mid-paging insert adds

# The privilege ("auth role") each endpoint needs (spec summaries); ClientIntegrationInformation needs none.
PRIVILEGES = {
    "/OrganizationSettings": "CommonServices",
    "/FinancialSettings": "CommonServices",
    "/GeneralLedgerAccounts": "GeneralLedgerAccount",
    "/TrialBalance": "TrialBalance",
    "/AccountTransactions": "AccountTransaction",
}
DATA_PRIVILEGES = ("GeneralLedgerAccount", "TrialBalance", "AccountTransaction")
RFC9110_SECTIONS = {400: "15.5.1", 401: "15.5.2", 403: "15.5.4", 404: "15.5.5", 405: "15.5.6", 500: "15.6.1",
                    502: "15.6.3", 503: "15.6.4", 504: "15.6.5"}
PAGED_PATHS = ("/GeneralLedgerAccounts", "/TrialBalance", "/AccountTransactions")
MONTH_NAMES = ("January", "February", "March", "April", "May", "June", "July", "August", "September",
               "October", "November", "December")
VOUCHER_TYPES = {  # the ledger's voucher texts as PowerOffice voucher types (VoucherType enum)
    "Salgsfaktura": "OutgoingInvoice", "Salg avgiftsfritt": "OutgoingInvoice",
    "Leverandørfaktura": "IncomingInvoice", "Lønn": "PayrollJournal", "Arbeidsgiveravgift": "PayrollJournal",
    "Feriepenger": "PayrollJournal", "Innbetaling kunde": "BankJournal", "Betaling leverandør": "BankJournal",
    "Bankgebyr": "BankJournal", "Husleie": "BankJournal", "Mva-oppgjør": "VatReturns",
    "Årsoppgjør": "YearEndJournal",
}


# ---------------------------------------------------------------------------------------- errors


class Refusal(Exception):
    """A finished error response, raised from anywhere in a handler."""

    def __init__(self, response: Response) -> None:
        super().__init__(response.status_code)
        self.response = response


def problem_body(status: int, title: str, detail: str | None = None,
                 instance: str | None = None) -> dict[str, Any]:
    """ProblemDetails with PascalCase keys (NOTES §8); `Type` as ASP.NET fills it in."""
    section = RFC9110_SECTIONS.get(status)
    return {"Type": f"https://tools.ietf.org/html/rfc9110#section-{section}" if section else "about:blank",
            "Title": title, "Status": status, "Detail": detail, "Instance": instance}


def problem(status: int, title: str, detail: str, instance: str | None = None) -> Refusal:
    return Refusal(json_response(problem_body(status, title, detail, instance), status))


def bad_request(detail: str, instance: str | None = None) -> Refusal:
    return problem(400, "One or more validation errors occurred.", detail, instance)


def invalid_resource_parameter(detail: str) -> Refusal:
    return problem(400, "Invalid resourceParameter", detail)  # the title NOTES §8 quotes


def oauth_error(error: str, description: str) -> Refusal:
    """The token endpoint's ErrorResponseDto (RFC 6749 §5.2), always 400 as the auth spec declares."""
    return Refusal(json_response({"error": error, "error_description": description}, 400,
                                 {"Cache-Control": "no-store"}))


def subscription_denied(missing: bool) -> Refusal:
    """A missing or wrong subscription key, refused by Azure API Management before PowerOffice sees it.

    UNCONFIRMED (NOTES §8): PowerOffice documents the 401 but not its body. This is Azure APIM's stock
    answer (note `statusCode` is a number here, unlike the 429 body the auth spec declares). Change it
    here if the real gateway answers otherwise."""
    message = ("Access denied due to missing subscription key. Make sure to include subscription key when "
               "making requests to an API." if missing else
               "Access denied due to invalid subscription key. Make sure to provide a valid key for an "
               "active subscription.")
    return Refusal(json_response({"statusCode": 401, "message": message}, 401))


def unauthorized(reason: str) -> Refusal:
    """A missing, unknown or expired access token. The spec declares 401 without a body; like ASP.NET's
    JWT bearer handler we send none, with the reason in WWW-Authenticate (RFC 6750). UNCONFIRMED."""
    challenge = f'Bearer error="invalid_token", error_description="{reason}"'
    return Refusal(Response(status_code=401, headers={"WWW-Authenticate": challenge}))


def forbidden(privilege: str) -> Refusal:
    return problem(403, "Forbidden", f"The integration lacks the privilege {privilege} on this client; "
                                     "see /ClientIntegrationInformation InvalidPrivileges.")


def rate_limit_body(policy: RateLimitPolicy) -> dict[str, str]:
    """The auth spec's RateLimitResponseDto (statusCode is a string there)."""
    seconds = max(1, math.ceil(policy.window_seconds))
    return {"statusCode": "429", "message": f"Rate limit is exceeded. Try again in {seconds} seconds."}


# ---------------------------------------------------------------------------------------- routing


def is_token_path(path: str) -> bool:
    return path.rstrip("/").lower() in TOKEN_PATHS


class PowerOfficeProfile(ErpProfile):
    """The token endpoint lives outside /v2, but APIM counts token calls against the subscription
    key's 10/s like any other call, so the harness treats it as an API request too (limited,
    faulted and counted)."""

    def is_api_request(self, scope: Scope) -> bool:
        return super().is_api_request(scope) or (scope["type"] == "http" and is_token_path(scope["path"]))


class TokenRoute(Route):
    """A route for /OAuth/Token that also answers /Demo/OAuth/Token, in any letter case."""

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        if scope["type"] == "http" and is_token_path(scope["path"]):
            return super().matches({**scope, "path": self.path, "root_path": ""})
        return Match.NONE, {}


# ---------------------------------------------------------------------------------------- state


@dataclasses.dataclass
class ClientState:
    """One PowerOffice Go client (company) that activated our integration."""

    tenant: TruthTenant
    client_key: str
    active: bool = True  # False: the client removed/deactivated the integration
    impersonate_as: int | None = None  # fault: answer with this other client's data and identity
    invalid_privileges: set[str] = dataclasses.field(default_factory=set)

    @property
    def id(self) -> int:
        return self.tenant.erp_client_id


@dataclasses.dataclass(frozen=True)
class Caller:
    client: ClientState  # whose key the token was minted for
    identity: ClientState  # whose data answers (differs when impersonating)


def derived_uuid(*parts: Any) -> str:
    """A deterministic uuid-like string (version 4 layout) from the given parts."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return str(uuid.UUID(bytes=digest[:16], version=4))


def make_client_key(seed: int, attempt: int = 0) -> str:
    return derived_uuid("poweroffice-client-key", seed, *([attempt] if attempt else []))


def scope_of_key(client_key: str) -> str:
    """How fault rules and statistics name a tenant: a short hash of its client key (the same name
    the PowerOffice connector gives the client, so the key itself never shows up)."""
    return "key-" + hashlib.sha256(client_key.encode()).hexdigest()[:12]


# ---------------------------------------------------------------------------------------- amounts


def kroner(ore: int) -> Decimal:
    """Integer øre as exact kroner with two decimals (123450 -> Decimal('1234.50'))."""
    return Decimal(ore).scaleb(-2)


def fiscal_year_start(day: dt.date, year_end_month: int = FISCAL_YEAR_END_MONTH) -> dt.date:
    start_month = year_end_month % 12 + 1
    return dt.date(day.year if day.month >= start_month else day.year - 1, start_month, 1)


def trial_balance_at(tenant: TruthTenant, day: dt.date) -> dict[int, int]:
    """Balance in øre (debit positive) inclusive of `day`, per account posted on or before it.

    Balance-sheet accounts accumulate from the first voucher; profit and loss (>= 3000) only from
    the fiscal year's start. An earlier year's profit and loss lands on retained earnings: the
    ledger's year-end vouchers already move it there (net zero), this also covers an unclosed year."""
    start = fiscal_year_start(day)
    balances: dict[int, int] = {}
    for voucher in tenant.vouchers:
        if voucher.date > day:
            continue
        for number, amount in voucher.lines:
            if number >= 3000 and voucher.date < start:
                number = RETAINED_EARNINGS
            balances[number] = balances.get(number, 0) + amount
    return balances


def account_type(number: int) -> str:
    """GeneralLedgerAccountType from the NS 4102 number."""
    if number < 2000:
        return "Asset"
    if number < 2100:
        return "Equity"
    if number < 3000:
        return "Liability"
    return "Income" if number < 4000 else "Expense"


# ---------------------------------------------------------------------------------------- query parameters


def query_of(request: Request) -> dict[str, str]:
    """Query parameters by lower-case name (ASP.NET binds names case-insensitively); the
    `resourceParameter.` prefix of the paging object is optional."""
    return {k.lower().removeprefix("resourceparameter."): v for k, v in request.query_params.items()}


def int_param(params: dict[str, str], name: str, default: int) -> int:
    raw = params.get(name.lower(), "").strip()
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise invalid_resource_parameter(f"The value '{raw}' is not valid for {name}.") from None


def bool_param(params: dict[str, str], name: str) -> bool:
    raw = params.get(name.lower(), "").strip().lower()
    if raw not in ("", "true", "false"):
        raise bad_request(f"The value '{raw}' is not valid for {name}.")
    return raw == "true"


def date_param(params: dict[str, str], name: str, instance: str) -> dt.date:
    """A required date; a time or offset part is ignored (NOTES §5)."""
    raw = params.get(name.lower(), "").strip()
    if not raw:
        raise bad_request(f"The {name} field is required.", instance)
    try:
        return dt.datetime.fromisoformat(raw).date()
    except ValueError:
        raise bad_request(f"The value '{raw}' is not valid for {name}.", instance) from None


def datetime_param(params: dict[str, str], name: str) -> dt.datetime | None:
    raw = params.get(name.lower(), "").strip()
    if not raw:
        return None
    try:
        moment = dt.datetime.fromisoformat(raw.replace(" ", "T", 1))
    except ValueError:
        raise bad_request(f"The value '{raw}' is not valid for {name}.") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)


def number_filter(params: dict[str, str], name: str) -> Callable[[int], bool]:
    """`accountNos`/`voucherNos`: "1000-1999, 2500, 3000-" (ranges inclusive, open ends allowed)."""
    raw = params.get(name.lower(), "").strip()
    if not raw:
        return lambda number: True
    ranges: list[tuple[int, float]] = []
    try:
        for part in (p.strip() for p in raw.split(",") if p.strip()):
            low, dash, high = part.partition("-")
            ranges.append((int(low) if low.strip() else 0,
                           (int(high) if high.strip() else math.inf) if dash else int(low)))
    except ValueError:
        raise bad_request(f"The value '{raw}' is not valid for {name}.") from None
    return lambda number: any(low <= number <= high for low, high in ranges)


def without_dimensions(params: dict[str, str], *names: str) -> bool:
    """The ledger posts no departments, projects or products: a filter other than -1 (= lines
    without one) matches nothing."""
    return all(params.get(name.lower(), "").strip() in ("", "-1") for name in names)


def stamp(day: dt.date, hour: int = 8) -> str:
    return f"{day.isoformat()}T{hour:02d}:00:00+00:00"


def order_rows(rows: list[dict[str, Any]], order_by: str | None) -> list[dict[str, Any]]:
    """`OrderBy`: "AccountNo desc, Name" (asc by default)."""
    if not order_by or not order_by.strip():
        return rows
    for clause in reversed([c.split() for c in order_by.split(",") if c.strip()]):
        field, direction = clause[0], (clause[1].lower() if len(clause) > 1 else "asc")
        key = _field_name(rows, field)
        if key is None or direction not in ("asc", "desc") or len(clause) > 2:
            raise invalid_resource_parameter(
                "OrderBy property in resourceParameter is not formatted correct.")
        rows = sorted(rows, key=lambda row: (row.get(key) is None, row.get(key) or 0),
                      reverse=direction == "desc")
    return rows


def select_fields(rows: list[dict[str, Any]], fields: str | None) -> list[dict[str, Any]]:
    """`Fields`: a comma list of properties to return (all by default)."""
    if not fields or not fields.strip():
        return rows
    keys = [_field_name(rows, f.strip()) for f in fields.split(",") if f.strip()]
    if None in keys:
        raise invalid_resource_parameter("Fields property in resourceParameter is not formatted correct.")
    return [{k: row[k] for k in keys if k in row} for row in rows]


def _field_name(rows: list[dict[str, Any]], name: str) -> str | None:
    known = {key.lower(): key for row in rows[:1] for key in row}
    return known.get(name.lower()) if rows else name


# ---------------------------------------------------------------------------------------- the sandbox


class PowerOfficeSandbox(Simulator):
    """A PowerOffice Go API v2 over a truth ledger. `.app` serves the API at /v2, the token endpoint
    at /OAuth/Token and the admin routes at /_sandbox."""

    erp = "poweroffice"
    api_prefix = API_PREFIX
    paths = ApiPaths(clients="/OrganizationSettings", accounts="/GeneralLedgerAccounts",
                     balances="/TrialBalance", identity="/OrganizationSettings",
                     phantom_account=str(PHANTOM_ACCOUNT.number), paged_client_list=False)
    default_rate_limit = DEFAULT_RATE_LIMIT
    contract_rate_limit = DEFAULT_RATE_LIMIT  # the documented limit
    revoke_fix = deny_access_fix = "Utvidelser"  # both fixes point at Innstillinger → Utvidelser
    required_balance_field = "*.Balance"
    DEMO_TENANT_WITHOUT_ACCESS = 5

    def __init__(
        self,
        ledger: TruthLedger,
        *,
        application_key: str = DEFAULT_APPLICATION_KEY,
        subscription_key: str = DEFAULT_SUBSCRIPTION_KEY,
        rate_limit: RateLimitPolicy | None = None,
        fault_seed: int = 0,
        token_lifetime: int = TOKEN_LIFETIME,
    ) -> None:
        self.ledger = ledger
        self.token_lifetime = token_lifetime
        self.clock: Callable[[], float] = time.monotonic  # token expiry; replace in tests
        self.tokens_minted = 0
        self._application_key = application_key
        self._subscription_key = subscription_key
        self._lock = threading.RLock()
        self._clients: dict[int, ClientState] = {}
        self._by_key: dict[str, ClientState] = {}
        self._tokens: dict[str, AccessToken] = {}
        self._paging_mutations: list[PagingMutation] = []
        keys = ids_in_ledger_order(ledger.tenants, lambda t, attempt: make_client_key(t.seed, attempt), scope_of_key)
        for tenant in ledger.tenants:
            self._register(tenant, keys[tenant.erp_client_id])
        profile = PowerOfficeProfile(name=self.erp, api_prefix=API_PREFIX, error_body=self._error_body,
                                     credential_key=self._credential_key, tenant_of=self._tenant_of)
        self.harness = SandboxHarness(
            profile, rate_limit=rate_limit or dataclasses.replace(DEFAULT_RATE_LIMIT), fault_seed=fault_seed)
        self.app = self.harness.build_app(
            self._api_routes(),
            erp_admin_routes=self._admin_routes(),
            exception_handlers={Refusal: self._refusal, HTTPException: self._http_error},
        )
        # build_app mounts routes below /v2 only; the token endpoint sits at the root (the app's
        # router and the harness's route list, which names path templates in the statistics)
        token_route = TokenRoute(TOKEN_PATH, self.token, methods=["POST"])
        for routes in (self.app.routes, self.harness.routes):
            routes.insert(0, token_route)

    def _register(self, tenant: TruthTenant, client_key: str | None = None) -> ClientState:
        state = ClientState(tenant, client_key or make_client_key(tenant.seed))
        self._clients[tenant.erp_client_id] = state
        self._by_key[state.client_key] = state
        return state

    # ------------------------------------------------------------------ keys and identity

    @property
    def application_key(self) -> str:
        return self._application_key

    @property
    def subscription_key(self) -> str:
        return self._subscription_key

    @property
    def client_keys(self) -> list[str]:
        """One client key per tenant, in ledger order (valid tenants and rejected fixtures alike)."""
        return [self._clients[t.erp_client_id].client_key for t in self.ledger.tenants]

    def client_key_of(self, client_id: int) -> str:
        return self._client(client_id).client_key

    def tenant_scope(self, tenant: TruthTenant | int | str) -> str:
        """The name fault rules (`tenant=`) and statistics use for a tenant: "key-<12 hex>"."""
        return scope_of_key(self._client(tenant).client_key)

    @staticmethod
    def token_url(base_url: str) -> str:
        """The token URL that goes with an API base URL ending in /v2."""
        return base_url.removesuffix(API_PREFIX) + TOKEN_PATH

    def _client(self, which: TruthTenant | int | str) -> ClientState:
        """A client by tenant, client id or scope name."""
        if isinstance(which, TruthTenant):
            which = which.erp_client_id
        if isinstance(which, str) and not which.isdigit():
            found = next((c for c in self._clients.values() if scope_of_key(c.client_key) == which), None)
        else:
            found = self._clients.get(int(which))
        if found is None:
            raise KeyError(f"no client {which} in this sandbox")
        return found

    # ------------------------------------------------------------------ simulator hooks

    def environment(self, url: str) -> dict[str, str]:
        return {
            "POWEROFFICE_BASE_URL": url,
            "POWEROFFICE_TOKEN_URL": self.token_url(url),
            "POWEROFFICE_APPLICATION_KEY": self.application_key,
            "POWEROFFICE_SUBSCRIPTION_KEY": self.subscription_key,
            "POWEROFFICE_CLIENT_KEYS": ",".join(self.client_keys),
        }

    def credential_lines(self) -> list[str]:
        return [
            f"token URL:        <root>{TOKEN_PATH} (also /Demo/OAuth/Token)",
            f"application key:  {self.application_key}",
            f"subscription key: {self.subscription_key}  (header {SUBSCRIPTION_HEADER})",
            f"client keys:      {','.join(self.client_keys)}  (one per client, in ledger order)",
        ]

    def wrong_credential(self, environment: dict[str, str]) -> tuple[dict[str, str], str]:
        return {**environment, "POWEROFFICE_SUBSCRIPTION_KEY": "0" * 32}, "POWEROFFICE_SUBSCRIPTION_KEY"

    def prepare_demo(self) -> None:
        if len(self.ledger.tenants) > self.DEMO_TENANT_WITHOUT_ACCESS:
            self.deny_access(self.ledger.tenants[self.DEMO_TENANT_WITHOUT_ACCESS])

    def scope_of(self, tenant: TruthTenant) -> str:
        return self.tenant_scope(tenant)

    def deny_access(self, tenant: TruthTenant) -> None:
        self.withdraw_privileges(tenant.erp_client_id)

    def revoke(self, tenant: TruthTenant) -> None:
        self.deactivate_client(tenant.erp_client_id)

    def swap_identity(self, tenant: TruthTenant, as_tenant: TruthTenant) -> None:
        self.impersonate(tenant.erp_client_id, as_tenant.erp_client_id)

    def expire_tokens(self) -> int:
        return self.expire_all_tokens()

    # ------------------------------------------------------------------ admin (Python)

    def deactivate_client(self, client_id: int) -> None:
        """The client removed/deactivated our integration: its key gets invalid_client, its tokens 401."""
        with self._lock:
            self._client(client_id).active = False

    def activate_client(self, client_id: int) -> None:
        with self._lock:
            self._client(client_id).active = True

    def withdraw_privileges(self, client_id: int, *privileges: str) -> None:
        """The client lacks Go modules: these privileges (default: the data ones) answer 403."""
        with self._lock:
            self._client(client_id).invalid_privileges |= set(privileges or DATA_PRIVILEGES)

    def restore_privileges(self, client_id: int) -> None:
        with self._lock:
            self._client(client_id).invalid_privileges.clear()

    def impersonate(self, client_id: int, as_client_id: int) -> None:
        """Fault: calls with `client_id`'s token answer with the data and identity of `as_client_id`."""
        with self._lock:
            self._client(client_id).impersonate_as = self._client(as_client_id).id

    def stop_impersonating(self, client_id: int | None = None) -> None:
        with self._lock:
            for state in [self._client(client_id)] if client_id is not None else self._clients.values():
                state.impersonate_as = None

    def expire_all_tokens(self) -> int:
        """Every access token issued so far answers 401 from now on (new ones can be minted).
        Returns how many were still live."""
        with self._lock:
            return expire_all(self._tokens, self.clock())

    def add_client(self, name: str | None = None, org_number: str | None = None,
                   company_type: str = "AS") -> tuple[TruthTenant, str]:
        """A client that just activated the integration: a new valid tenant (next client id, fresh
        organisation number unless given) in the ledger, and its client key."""
        with self._lock:
            tenants = self.ledger.tenants
            index = max((t.index for t in tenants), default=-1) + 1
            seed = max((t.seed for t in tenants), default=0) + 1
            if org_number is None:
                used = {t.org_number for t in tenants}
                org_number = next(n for n in map(make_org_number, range(seed, seed + 1000)) if n not in used)
            if name is None:
                words = COMPANY_WORDS[index % len(COMPANY_WORDS)], TRADES[index % len(TRADES)]
                name = f"{words[0]} {words[1]} {index}" + ("" if company_type == "ENK" else " AS")
            tenant = TruthTenant(
                index=index, erp_client_id=max((t.erp_client_id for t in tenants), default=80_000 - 1) + 1,
                org_number=org_number, name=name, company_type=company_type, seed=seed,
                first_month=self.ledger.first_month, last_month=self.ledger.last_month,
                accounts=tuple(TruthAccount(*row) for row in CHART),
            )
            self.ledger.add_tenant(tenant)
            return tenant, self._register(tenant).client_key

    def mutate_during_paging(self, path: str, action: str = "insert", *, position: int = 0,
                             after_requests: int = 1,
                             tenant: TruthTenant | int | str | None = None) -> PagingMutation:
        """Fault: the list at `path` changes after `after_requests` requests (see PagingMutation)."""
        path = "/" + path.removeprefix(API_PREFIX).strip("/")
        if path not in PAGED_PATHS:
            raise ValueError(f"paging mutations work on {list(PAGED_PATHS)}, not {path!r}")
        client_id = None if tenant is None else self._client(tenant).id
        mutation = PagingMutation(path, action, position, after_requests, client_id)
        with self._lock:
            self._paging_mutations.append(mutation)
        return mutation

    def clear_paging_mutations(self) -> None:
        with self._lock:
            self._paging_mutations.clear()

    def client_states(self) -> list[dict[str, Any]]:
        with self._lock:
            return [self._client_state(state) for state in self._clients.values()]

    @staticmethod
    def _client_state(state: ClientState) -> dict[str, Any]:
        return {
            "id": state.id,
            "name": state.tenant.name,
            "organizationNumber": state.tenant.org_number,
            "client_key": state.client_key,
            "scope": scope_of_key(state.client_key),
            "active": state.active,
            "impersonate_as": state.impersonate_as,
            "invalid_privileges": sorted(state.invalid_privileges),
        }

    # ------------------------------------------------------------------ request identity (for the harness)

    def _credential_key(self, scope: Scope) -> str | None:
        """The rate limit is per subscription key, whichever client key the call is for."""
        key = header_value(scope, SUBSCRIPTION_HEADER) or dict(
            parse_qsl(scope.get("query_string", b"").decode("latin-1"))).get(SUBSCRIPTION_QUERY)
        return "subscription-" + hashlib.sha256(key.encode()).hexdigest()[:12] if key else None

    def _tenant_of(self, scope: Scope) -> str | None:
        header = header_value(scope, "authorization") or ""
        if is_token_path(scope["path"]):
            state = self._by_key.get((basic_credentials(header) or ("", ""))[1].strip().lower())
        else:
            access = self._tokens.get(bearer_token(header) or "")
            state = self._clients.get(access.holder) if access else None
        return scope_of_key(state.client_key) if state else None

    def _error_body(self, status: int, message: str, request_id: str) -> bytes:
        """Bodies for the responses the shared machinery makes (429, injected errors)."""
        if status == 429:
            return json_bytes(rate_limit_body(self.rate_limiter.policy))
        return json_bytes(problem_body(status, HTTPStatus(status).phrase, message))

    # ------------------------------------------------------------------ authentication

    def _require_subscription(self, request: Request) -> None:
        given = request.headers.get(SUBSCRIPTION_HEADER) or request.query_params.get(SUBSCRIPTION_QUERY)
        if given != self.subscription_key:
            raise subscription_denied(missing=not given)

    def _authenticate(self, request: Request, path: str) -> Caller:
        self._require_subscription(request)
        token = bearer_token(request.headers.get("authorization"))
        if token is None:
            raise unauthorized("The access token is missing")
        with self._lock:
            access = self._tokens.get(token)
            if access is None:
                raise unauthorized("The access token is invalid")
            if self.clock() >= access.expires_at:
                raise unauthorized("The access token expired")
            client = self._clients[access.holder]
            if not client.active:
                raise unauthorized("The client integration is not active")
            privilege = PRIVILEGES.get(path)
            if privilege in client.invalid_privileges:
                raise forbidden(privilege)
            identity = self._clients[client.impersonate_as] if client.impersonate_as is not None else client
            return Caller(client, identity)

    # ------------------------------------------------------------------ endpoint: token

    async def token(self, request: Request) -> Response:
        self._require_subscription(request)
        form = dict(parse_qsl((await request.body()).decode("utf-8", "replace")))
        grant_type = form.get("grant_type")
        if not grant_type:
            raise oauth_error("invalid_request", "The grant_type parameter is missing.")  # text UNCONFIRMED
        if grant_type != "client_credentials":
            raise oauth_error("unsupported_grant_type", "Only the client_credentials grant is supported.")
        application_key, client_key = basic_credentials(request.headers.get("authorization")) or ("", "")
        with self._lock:
            state = self._by_key.get(client_key.strip().lower())
            known_application = application_key.strip().lower() == self.application_key.lower()
            if not known_application or state is None or not state.active:
                raise oauth_error("invalid_client", INVALID_CLIENT)
            token = secrets.token_urlsafe(32)
            self._tokens[token] = AccessToken(state.id, self.clock() + self.token_lifetime)
            self.tokens_minted += 1
        body = {"access_token": token, "token_type": "bearer", "expires_in": self.token_lifetime}
        return json_response(body, headers={"Cache-Control": "no-store"})

    # ------------------------------------------------------------------ endpoints: client

    async def organization_settings(self, request: Request) -> Response:
        tenant = self._authenticate(request, "/OrganizationSettings").identity.tenant
        address = {"AddressLine1": f"Storgata {tenant.index + 1}", "ZipCode": "0155", "City": "Oslo",
                   "CountryCode": "NO"}
        return json_response({
            "Id": derived_uuid("client", tenant.seed),
            "Name": tenant.name,
            "LegalName": tenant.name,
            "OrganizationNumber": tenant.org_number,  # as the client registered it; "" when none
            "MailAddress": address,
            "DeliveryAddress": address,
            "MailAddressIsDeliveryAddress": True,
            "IsAgricultureClient": False,
            "DefaultAgricultureDepartment": "None",
            "InvoiceInboxEhf": True,
            "InvoiceInboxEmail": False,
            "LastChangedDateTimeOffset": stamp(tenant.first_month),
        })

    async def financial_settings(self, request: Request) -> Response:
        tenant = self._authenticate(request, "/FinancialSettings").identity.tenant
        return json_response({
            "FinancialYearEndMonth": MONTH_NAMES[FISCAL_YEAR_END_MONTH - 1],
            "ConversionDate": tenant.first_month.isoformat(),
            "CurrencyCode": "NOK",
            "UseTrustAccountManagement": False,
            "LastChangedDateTimeOffset": stamp(tenant.first_month),
        })

    async def client_integration_information(self, request: Request) -> Response:
        caller = self._authenticate(request, "/ClientIntegrationInformation")
        privileges = sorted(set(PRIVILEGES.values()))
        return json_response({
            "ClientId": derived_uuid("client", caller.identity.tenant.seed),
            "ClientName": caller.identity.tenant.name,
            "ValidPrivileges": [p for p in privileges if p not in caller.client.invalid_privileges],
            "InvalidPrivileges": [p for p in privileges if p in caller.client.invalid_privileges],
            "ActiveClientSubscriptions": ["Accounting"],
        })

    # ------------------------------------------------------------------ endpoints: ledger

    async def general_ledger_accounts(self, request: Request) -> Response:
        caller = self._authenticate(request, "/GeneralLedgerAccounts")
        params, tenant = query_of(request), caller.identity.tenant
        wanted = number_filter(params, "accountNos")
        changed_after = datetime_param(params, "lastChangedDateTimeOffsetGreaterThan")
        rows = [self._account_row(tenant, a) for a in sorted(tenant.accounts, key=lambda a: a.number)
                if wanted(a.number)]
        if changed_after is not None:
            rows = [row for row in rows
                    if dt.datetime.fromisoformat(row["LastChangedDateTimeOffset"]) > changed_after]
        return self._paged(request, "/GeneralLedgerAccounts", caller, rows,
                           lambda: self._account_row(tenant, PHANTOM_ACCOUNT))

    async def trial_balance(self, request: Request) -> Response:
        caller = self._authenticate(request, "/TrialBalance")
        params, tenant = query_of(request), caller.identity.tenant
        day = date_param(params, "date", request.url.path)
        wanted = number_filter(params, "accountNos")
        hide_zero = bool_param(params, "hideAccountsWithZeroBalance")
        bool_param(params, "includeSubProject")
        balances = trial_balance_at(tenant, day) if without_dimensions(
            params, "departmentCodes", "projectCode", "productCode") else {}
        names = {a.number: a.name for a in tenant.accounts}
        rows = [self._balance_row(tenant, number, names[number], ore)
                for number, ore in sorted(balances.items())
                if wanted(number) and not (hide_zero and ore == 0)]
        return self._paged(request, "/TrialBalance", caller, rows,
                           lambda: self._balance_row(tenant, PHANTOM_ACCOUNT.number, PHANTOM_ACCOUNT.name, 0))

    async def account_transactions(self, request: Request) -> Response:
        caller = self._authenticate(request, "/AccountTransactions")
        params, tenant = query_of(request), caller.identity.tenant
        missing = [name for name in ("fromDate", "toDate") if not params.get(name.lower(), "").strip()]
        if missing:
            detail = " ".join(f"The {name} field is required." for name in missing)
            raise bad_request(detail, request.url.path)
        first = date_param(params, "fromDate", request.url.path)
        last = date_param(params, "toDate", request.url.path)
        accounts, vouchers = number_filter(params, "accountNos"), number_filter(params, "voucherNos")
        types = {t.strip().lower() for t in params.get("vouchertypes", "").split(",") if t.strip()}
        created_after = datetime_param(params, "createdDateTimeOffsetGreaterThan")
        changed_after = datetime_param(params, "lastChangedDateTimeOffsetGreaterThan")
        # created and last-changed stamps are equal here
        after = max((moment for moment in (created_after, changed_after) if moment), default=None)
        rows = []
        if without_dimensions(params, "departmentCodes", "projectCodes", "productCodes"):
            for voucher in tenant.vouchers:
                if not (first <= voucher.date <= last and vouchers(voucher.number)):
                    continue
                if types and _voucher_type(voucher).lower() not in types:
                    continue
                if after and dt.datetime.fromisoformat(stamp(voucher.date, 12)) <= after:
                    continue
                rows += [self._transaction_row(tenant, voucher, i, number, amount)
                         for i, (number, amount) in enumerate(voucher.lines) if accounts(number)]
        return self._paged(request, "/AccountTransactions", caller, rows, lambda: self._transaction_row(
            tenant, Voucher(first, 0, "Korreksjon", ()), 0, PHANTOM_ACCOUNT.number, 0))

    # ------------------------------------------------------------------ rows

    @staticmethod
    def _account_id(tenant: TruthTenant, number: int) -> int:
        return tenant.erp_client_id * 10_000 + number

    def _account_row(self, tenant: TruthTenant, account: TruthAccount) -> dict[str, Any]:
        return {
            "Id": self._account_id(tenant, account.number),
            "AccountNo": account.number,
            "Name": account.name,
            "IsActive": True,
            "GeneralLedgerAccountType": account_type(account.number),
            "CurrencyCode": "NOK",
            "VatCode": "0",
            "VatReturnSpecification": "None",
            "AgricultureDepartment": "None",
            "IsDepartmentRequired": False,
            "IsProjectRequired": False,
            "IsVatCodeLocked": False,
            "LastChangedDateTimeOffset": stamp(tenant.first_month),
        }

    def _balance_row(self, tenant: TruthTenant, number: int, name: str, ore: int) -> dict[str, Any]:
        return {"AccountId": self._account_id(tenant, number), "AccountNo": number, "AccountName": name,
                "Balance": kroner(ore), "AgricultureDepartment": "None"}

    def _transaction_row(self, tenant: TruthTenant, voucher: Voucher, line: int, number: int,
                         ore: int) -> dict[str, Any]:
        return {
            "Id": tenant.erp_client_id * 10_000_000 + voucher.number * 100 + line,
            "AccountId": self._account_id(tenant, number),
            "AccountNo": number,
            "Amount": kroner(ore),
            "CurrencyAmount": kroner(ore),
            "CurrencyCode": "NOK",
            "Description": voucher.description,
            "PostingDate": voucher.date.isoformat(),
            "VoucherDate": voucher.date.isoformat(),
            "VoucherNo": voucher.number,
            "VoucherId": derived_uuid("voucher", tenant.seed, voucher.number),
            "VoucherType": _voucher_type(voucher),
            "AgricultureDepartment": "None",
            "VatReturnSpecification": "None",
            "IsReversed": False,
            "CreatedDateTimeOffset": stamp(voucher.date, 12),
            "LastChangedDateTimeOffset": stamp(voucher.date, 12),
        }

    # ------------------------------------------------------------------ paging

    def _paged(self, request: Request, path: str, caller: Caller, rows: list[dict[str, Any]],
               phantom: Callable[[], dict[str, Any]]) -> Response:
        """One page of `rows` (NOTES §6): PageNumber from 1, PageSize up to 20000, X-Pagination
        metadata, 204 for an empty page (also beyond the end)."""
        params = query_of(request)
        number = int_param(params, "PageNumber", 1)
        size = int_param(params, "PageSize", DEFAULT_PAGE_SIZE)
        if number < 1:
            raise invalid_resource_parameter("PageNumber must be 1 or larger.")
        if not 1 <= size <= MAX_PAGE_SIZE:
            raise invalid_resource_parameter(f"PageSize must be between 1 and MaxPageSize ({MAX_PAGE_SIZE}).")
        rows = self._apply_paging_mutations(path, caller, order_rows(rows, params.get("orderby")), phantom)
        rows = select_fields(rows, params.get("fields"))
        page = rows[(number - 1) * size:number * size]
        if not page:
            return Response(status_code=204)
        pages = math.ceil(len(rows) / size)
        meta = {
            "currentPage": number,
            "pageSize": size,
            "totalCount": len(rows),
            "totalPages": pages,
            "previousPageLink": _page_link(request, number - 1, size) if number > 1 else None,
            "nextPageLink": _page_link(request, number + 1, size) if number < pages else None,
        }
        return json_response(page, headers={"X-Pagination": json.dumps(meta)})

    def _apply_paging_mutations(self, path: str, caller: Caller, rows: list[dict[str, Any]],
                                phantom: Callable[[], dict[str, Any]]) -> list[dict[str, Any]]:
        with self._lock:  # the same new row on every later request
            return apply_paging_mutations(self._paging_mutations, path, caller.client.id, rows, phantom=phantom)

    # ------------------------------------------------------------------ routing and errors

    def _api_routes(self) -> list[Route]:
        return [
            Route("/OrganizationSettings", self.organization_settings, methods=["GET"]),
            Route("/FinancialSettings", self.financial_settings, methods=["GET"]),
            Route("/ClientIntegrationInformation", self.client_integration_information, methods=["GET"]),
            Route("/GeneralLedgerAccounts", self.general_ledger_accounts, methods=["GET"]),
            Route("/TrialBalance", self.trial_balance, methods=["GET"]),
            Route("/AccountTransactions", self.account_transactions, methods=["GET"]),
        ]

    async def _refusal(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, Refusal)
        return exc.response

    async def _http_error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if not self.harness.profile.is_api_request(request.scope):
            return json_response({"error": exc.detail}, exc.status_code)
        detail = (f"No endpoint {request.url.path}" if exc.status_code == 404
                  else f"{request.method} is not supported on {request.url.path}" if exc.status_code == 405
                  else str(exc.detail))
        body = problem_body(exc.status_code, HTTPStatus(exc.status_code).phrase, detail, request.url.path)
        return json_response(body, exc.status_code, exc.headers)

    # ------------------------------------------------------------------ admin (HTTP)

    def _admin_routes(self) -> list[Route]:
        def client_action(action: Callable[[int, dict[str, Any]], Any]):
            return client_admin_endpoint(action, lambda client_id: self._client_state(self._client(client_id)))

        async def list_clients(request: Request) -> Response:
            return json_response(self.client_states())

        async def create_client(request: Request) -> Response:
            body = json.loads(await request.body() or b"{}")
            allowed = {"name", "org_number", "company_type"}
            if not isinstance(body, dict) or set(body) - allowed:
                return json_response({"error": f"allowed keys: {sorted(allowed)}"}, 400)
            tenant, _ = self.add_client(**body)
            return json_response(self._client_state(self._client(tenant.erp_client_id)), 201)

        async def expire_tokens(request: Request) -> Response:
            return json_response({"expired": self.expire_all_tokens()})

        async def add_paging_mutation(request: Request) -> Response:
            try:
                mutation = self.mutate_during_paging(**json.loads(await request.body() or b"{}"))
            except (ValueError, TypeError, KeyError) as exc:
                return json_response({"error": str(exc)}, 400)
            return json_response(mutation.to_json(), 201)

        async def clear_paging_mutations(request: Request) -> Response:
            self.clear_paging_mutations()
            return json_response({"paging_mutations": 0})

        def impersonate(client_id: int, body: dict[str, Any]) -> None:
            if not isinstance(body.get("as"), int):
                raise TypeError("body needs 'as': a client id")
            self.impersonate(client_id, body["as"])

        def withdraw(client_id: int, body: dict[str, Any]) -> None:
            self.withdraw_privileges(client_id, *body.get("privileges", ()))

        return [
            Route("/clients", list_clients, methods=["GET"]),
            Route("/clients", create_client, methods=["POST"]),
            Route("/clients/{id}/deactivate", client_action(lambda cid, body: self.deactivate_client(cid)),
                  methods=["POST"]),
            Route("/clients/{id}/activate", client_action(lambda cid, body: self.activate_client(cid)),
                  methods=["POST"]),
            Route("/clients/{id}/impersonate", client_action(impersonate), methods=["PUT"]),
            Route("/clients/{id}/impersonate", client_action(lambda cid, body: self.stop_impersonating(cid)),
                  methods=["DELETE"]),
            Route("/clients/{id}/privileges/withdraw", client_action(withdraw), methods=["POST"]),
            Route("/clients/{id}/privileges/restore",
                  client_action(lambda cid, body: self.restore_privileges(cid)), methods=["POST"]),
            Route("/tokens/expire", expire_tokens, methods=["POST"]),
            Route("/paging-mutations", add_paging_mutation, methods=["POST"]),
            Route("/paging-mutations", clear_paging_mutations, methods=["DELETE"]),
        ]


# ---------------------------------------------------------------------------------------- helpers


def _voucher_type(voucher: Voucher) -> str:
    return VOUCHER_TYPES.get(voucher.description, "ManualJournal")


def _page_link(request: Request, number: int, size: int) -> str:
    kept = [(k, v) for k, v in request.query_params.multi_items()
            if k.lower().removeprefix("resourceparameter.") not in ("pagenumber", "pagesize")]
    return str(request.url.replace(query=urlencode(kept + [("PageNumber", number), ("PageSize", size)])))
