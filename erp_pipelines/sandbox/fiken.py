"""Fiken API v2 simulator: the truth ledger rendered through Fiken's paths, auth and shapes.

Facts come from `specs/fiken/NOTES.md` and `fiken-openapi.yaml`:

- `Authorization: Bearer` on every call: the user's personal API token (sees every company of the
  user) or an OAuth2 access token (sees the companies its consent covers);
- OAuth2 authorisation code under /oauth (real Fiken: https://fiken.no/oauth; here in the same app):
  authorize auto-approves, token exchanges a code or a refresh token (every refresh rotates the
  refresh token), revoke withdraws the consent;
- companies are addressed by slug; lists are bare JSON arrays paged with `page` (0-based) and
  `pageSize` (default 25, max 100) and described by the `Fiken-Api-*` headers;
- amounts are integer øre, debit positive (the sign is UNCONFIRMED); `accountBalances?date=` gives
  closing balances at the end of that date, profit and loss year to date; the customer and supplier
  ledgers are reskontro sub-accounts (`1500:10001`, `2400:20001`);
- one request in flight per user and at most 4 per second, 429 beyond; no rate-limit headers.

Usage in tests::

    sandbox = FikenSandbox(generate_ledger(5))
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=sandbox.app),
                               base_url="http://fiken.test/api/v2",
                               headers={"Authorization": f"Bearer {sandbox.api_token}"})
    sandbox.set_api_access(80_002, False)           # its accounts and balances answer 403
    sandbox.faults.server_error(503, times=2, tenant=sandbox.slug_of(80_001))
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import itertools
import json
import math
import re
import secrets
import threading
import time
import unicodedata
from collections.abc import Callable, Iterable
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qsl, urlencode

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Mount, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from erp_pipelines.sandbox.common import (
    ADMIN_PREFIX,
    ErpProfile,
    PagingMutation,
    RateLimitPolicy,
    SandboxHarness,
    apply_paging_mutations,
    basic_credentials,
    bearer_token,
    client_admin_endpoint,
    header_value,
    json_bytes,
    json_response,
    request_facts,
)
from erp_pipelines.sandbox.ledger import (
    COMPANY_WORDS,
    TRADES,
    TruthLedger,
    TruthTenant,
    make_org_number,
    make_personal_number,
)
from erp_pipelines.sandbox.simulator import ApiPaths, Simulator

API_PREFIX = "/api/v2"
OAUTH_PREFIX = "/oauth"
DEFAULT_API_TOKEN = "sandbox-fiken-personal-api-token"
DEFAULT_CLIENT_ID = "sandbox-fiken-oauth-client-id"
DEFAULT_CLIENT_SECRET = "sandbox-fiken-oauth-client-secret"
# NOTES §5: one request in flight per user, more than 4 per second refused; Fiken sends no
# rate-limit headers and no Retry-After.
DEFAULT_RATE_LIMIT = RateLimitPolicy(limit=4, window_seconds=1.0, max_in_flight=1)
ACCESS_TOKEN_SECONDS = 86157  # the spec's example `expires_in` (about 24 h)
DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE = 25, 100
COMPANY_SORTS = ("createdDate", "name", "organizationNumber")  # each with " asc" / " desc"
USER = {"name": "Sandra Sandkasse", "email": "regnskap@sandbox.invalid"}
USER_KEY = "fiken-user-1"  # the sandbox's one user: every token shares its rate-limit budget
PHANTOM_ACCOUNT = {"code": "1000", "name": "Forskning og utvikling"}  # what a paging insert adds

# Reskontro: account -> (first sub-account number, names to draw from)
RESKONTRO: dict[int, tuple[int, tuple[str, ...]]] = {
    1500: (10001, ("Ola Nordmann", "Kari Hansen", "Bakeriet på Torget AS", "Lie Eiendom AS",
                   "Berg Maskin AS", "Nilsen Frisør")),
    2400: (20001, ("Kontorland AS", "Telenett Norge AS", "Grossisten Vest AS", "Kraftselskapet AS",
                   "Renhold Service AS", "Lagerhuset Nord AS")),
}


# ---------------------------------------------------------------------------------------- errors


def error_document(reason: str, description: str) -> dict[str, str]:
    """ASSUMPTION (NOTES §6): Fiken documents no error body for its API. We answer with the shape
    of the OAuth token endpoint's documented errors; clients should branch on the status only."""
    return {"error": reason, "error_description": description}


def reason_of(status: int) -> str:
    try:
        return HTTPStatus(status).phrase.lower().replace(" ", "_")  # 429 -> "too_many_requests"
    except ValueError:
        return "error"


def error_body(status: int, message: str, request_id: str) -> bytes:
    """Error body for responses the shared machinery makes (429, injected 5xx)."""
    return json_bytes(error_document(reason_of(status), message))


class FikenError(Exception):
    def __init__(self, status: int, description: str, reason: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(f"{status}: {description}")
        self.status = status
        self.reason = reason or reason_of(status)
        self.description = description
        self.headers = headers or {}


def unauthorized(description: str) -> FikenError:
    return FikenError(401, description, "invalid_token", {"WWW-Authenticate": 'Bearer realm="fiken"'})


def no_api_access_error(slug: str) -> FikenError:
    """A listed company without the API module (`hasApiAccess: false`) refuses its data.

    UNCONFIRMED (NOTES §2.3, §6): no source shows this response; 403 is the best guess from
    Fiken's generic status list. Change it here if Fiken answers otherwise."""
    return FikenError(403, f"Company {slug} does not have the API module (hasApiAccess is false).")


def access_revoked_error(slug: str) -> FikenError:
    """A company the user (or the OAuth consent) no longer reaches.

    UNCONFIRMED (NOTES §6): "403 authenticated but not authorised" is our guess; a real Fiken may
    answer 404 like for a slug it never heard of. Companies a consent never covered answer 404."""
    return FikenError(403, f"Access to company {slug} has been withdrawn.")


def not_found(description: str) -> FikenError:
    return FikenError(404, description)


def bad_request(description: str) -> FikenError:
    return FikenError(400, description)


class OAuthError(FikenError):
    """RFC 6749 §5.2 errors of the /oauth endpoints (`error` is the OAuth error code)."""


# ---------------------------------------------------------------------------------------- slugs and sub-accounts


def slugify(name: str, client_id: int) -> str:
    """'Fjord Rørlegger AS', 80001 -> 'fjord-rorlegger-as-80001' (æ->ae, ø->o, å->a, the rest
    folded to ASCII, every run of other characters a single '-', the client id keeps it unique)."""
    text = name.lower().replace("æ", "ae").replace("ø", "o").replace("å", "a")
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    text = re.sub(r"[^a-z0-9]+", "-", text).strip("-")
    return f"{text}-{client_id}" if text else str(client_id)


def subaccounts(tenant: TruthTenant) -> dict[int, list[tuple[str, str]]]:
    """Two or three customer (1500:1000N) and supplier (2400:2000N) sub-accounts per tenant."""
    out = {}
    for shift, (account, (first, names)) in enumerate(RESKONTRO.items()):
        count = 2 + (tenant.seed >> shift) % 2
        start = tenant.seed % len(names)
        out[account] = [(f"{account}:{first + i}", names[(start + i) % len(names)]) for i in range(count)]
    return out


def chart_of(tenant: TruthTenant) -> list[dict[str, str]]:
    """The chart as `account` rows: every 4-digit account, each followed by its sub-accounts."""
    subs = subaccounts(tenant)
    rows = []
    for account in sorted(tenant.accounts, key=lambda a: a.number):
        rows.append({"code": str(account.number), "name": account.name})
        rows += [{"code": code, "name": name} for code, name in subs.get(account.number, ())]
    return rows


def account_number(code: str) -> int:
    """The 4-digit part of an account code ('1500:10001' -> 1500)."""
    return int(code.partition(":")[0])


# ---------------------------------------------------------------------------------------- balances


Posting = tuple[dt.date, str, int]  # (date, account code, øre, debit positive)


def postings_of(tenant: TruthTenant) -> tuple[Posting, ...]:
    """Every voucher line by date. Lines on 1500 and 2400 go to one of the account's sub-accounts,
    chosen by the voucher number modulo their count, so the sub-accounts sum to the account."""
    subs = subaccounts(tenant)
    lines = []
    for voucher in tenant.vouchers:
        for number, amount in voucher.lines:
            split = subs.get(number)
            code = split[voucher.number % len(split)][0] if split else str(number)
            lines.append((voucher.date, code, amount))
    return tuple(sorted(lines, key=lambda line: line[0]))


def closing_balances(postings: Iterable[Posting], day: dt.date) -> dict[str, int]:
    """Closing balance in øre at the end of `day` of every code with postings up to that day:
    balance-sheet accounts from the first posting, profit and loss (3000 and up) since 1 January."""
    year_start = dt.date(day.year, 1, 1)
    balances: dict[str, int] = {}
    for when, code, amount in postings:
        if when > day:
            break
        counted = when >= year_start or account_number(code) < 3000
        balances[code] = balances.get(code, 0) + (amount if counted else 0)
    return balances


# ---------------------------------------------------------------------------------------- state


@dataclasses.dataclass
class Company:
    tenant: TruthTenant
    slug: str
    created: dt.date
    api_access: bool = True  # hasApiAccess: the company has the API module
    granted: bool = True  # False: the user's access (and every consent's) was withdrawn
    impersonate_as: int | None = None  # fault: answer with this other company's data and identity


@dataclasses.dataclass(eq=False)
class Grant:
    """One OAuth consent: the companies the user approved and the current refresh token."""

    companies: set[int]
    refresh_token: str
    revoked: bool = False


@dataclasses.dataclass(eq=False)
class AccessToken:
    value: str
    grant: Grant | None  # None: the personal API token
    expires_at: float = math.inf  # time.monotonic()


@dataclasses.dataclass(frozen=True)
class PendingCode:
    companies: frozenset[int]
    redirect_uri: str



PAGED_PATHS = ("/companies", "/accounts", "/accountBalances")


class FikenState:
    """Companies, tokens and consents. Guarded by `lock`."""

    def __init__(self, ledger: TruthLedger) -> None:
        self.lock = threading.RLock()
        self.companies: dict[int, Company] = {}
        self.by_slug: dict[str, Company] = {}
        for tenant in ledger.tenants:
            self.add(tenant, ledger.first_month)
        self.tokens: dict[str, AccessToken] = {}
        self.refresh_tokens: dict[str, Grant] = {}
        self.codes: dict[str, PendingCode] = {}
        self.consent_companies: set[int] | None = None  # None: a new consent covers every company
        self.paging_mutations: list[PagingMutation] = []

    def add(self, tenant: TruthTenant, created: dt.date) -> Company:
        company = Company(tenant, slugify(tenant.name, tenant.erp_client_id), created)
        self.companies[tenant.erp_client_id] = company
        self.by_slug[company.slug] = company
        return company


class EchoRequestId:
    """Echo the client's `X-Request-ID` (NOTES §5 recommends sending one) on every answer, and log
    the request under it. Without one, nothing is added."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request_id = header_value(scope, "x-request-id") if scope["type"] == "http" else None
        if not request_id:
            await self.app(scope, receive, send)
            return
        request_facts(scope)["request_id"] = request_id

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode("latin-1"))]
            await send(message)

        await self.app(scope, receive, send_with_id)


# ---------------------------------------------------------------------------------------- the sandbox


class FikenSandbox(Simulator):
    """A Fiken API v2 over a truth ledger. `.app` serves the API at /api/v2, OAuth at /oauth and
    admin at /_sandbox; every ledger tenant is a company of the sandbox's one user."""

    erp = "fiken"
    api_prefix = API_PREFIX
    # relative to /api/v2; fault path prefixes must name the company: f"/companies/{slug}/accounts"
    paths = ApiPaths(clients="/companies", accounts="/accounts", balances="/accountBalances",
                     phantom_account=PHANTOM_ACCOUNT["code"])
    default_rate_limit = DEFAULT_RATE_LIMIT
    contract_rate_limit = DEFAULT_RATE_LIMIT  # the limit Fiken publishes
    revoke_fix = "Apper du har gitt tilgang til"  # the connector's fix: grant the company to the app again
    deny_access_fix = "API-modulen"  # the connector's fix: the company's API module
    required_balance_field = "*.balance"  # accountBalances rows (a bare array) without their balance
    DEMO_TENANT_WITHOUT_API_ACCESS = 5

    def __init__(
        self,
        ledger: TruthLedger,
        *,
        api_token: str = DEFAULT_API_TOKEN,
        client_id: str = DEFAULT_CLIENT_ID,
        client_secret: str = DEFAULT_CLIENT_SECRET,
        rate_limit: RateLimitPolicy | None = None,
        fault_seed: int = 0,
    ) -> None:
        self.ledger = ledger
        self._api_token, self._client_id, self._client_secret = api_token, client_id, client_secret
        self.state = FikenState(ledger)
        self._postings_cache: dict[int, tuple[TruthTenant, tuple[Posting, ...]]] = {}
        profile = ErpProfile(
            name=self.erp,
            api_prefix=API_PREFIX,
            error_body=error_body,
            credential_key=self._credential_key,
            tenant_of=self._tenant_of,
            rate_limit_headers=None,  # Fiken sends none (NOTES §5)
        )
        self.harness = SandboxHarness(profile, rate_limit=rate_limit or dataclasses.replace(DEFAULT_RATE_LIMIT),
                                      fault_seed=fault_seed)
        starlette_app = self.harness.build_app(
            self._api_routes(),
            erp_admin_routes=self._admin_routes(),
            exception_handlers={FikenError: self._error_response, HTTPException: self._http_error},
        )
        # OAuth lives outside the API prefix: not rate-limited, faulted or counted
        starlette_app.router.routes.append(Mount(OAUTH_PREFIX, routes=self._oauth_routes()))
        self.app = EchoRequestId(starlette_app)

    # ------------------------------------------------------------------ credentials
    @property
    def api_token(self) -> str:
        return self._api_token

    @property
    def client_id(self) -> str:
        return self._client_id

    @property
    def client_secret(self) -> str:
        return self._client_secret

    # ------------------------------------------------------------------ simulator hooks
    def environment(self, url: str) -> dict[str, str]:
        return {"FIKEN_BASE_URL": url, "FIKEN_API_TOKEN": self.api_token,
                "FIKEN_OAUTH_URL": url.removesuffix(API_PREFIX) + OAUTH_PREFIX,
                "FIKEN_CLIENT_ID": self.client_id, "FIKEN_CLIENT_SECRET": self.client_secret}

    def credential_lines(self) -> list[str]:
        return [
            f"API token:       {self.api_token}  (personal token: Authorization: Bearer ...)",
            f"OAuth client:    {self.client_id} / {self.client_secret}  (authorize auto-approves)",
            f"companies:       {len(self.state.companies)} (slugs end in the client id)",
        ]

    def wrong_credential(self, environment: dict[str, str]) -> tuple[dict[str, str], str]:
        return {**environment, "FIKEN_API_TOKEN": "not-a-valid-fiken-token"}, "FIKEN_API_TOKEN"

    def prepare_demo(self) -> None:
        self.set_api_access(self.ledger.tenants[self.DEMO_TENANT_WITHOUT_API_ACCESS].erp_client_id, False)

    def scope_of(self, tenant: TruthTenant) -> str:
        return self.tenant_scope(tenant)

    def tenant_scope(self, tenant: TruthTenant) -> str:
        """How fault rules and statistics name a tenant: its slug."""
        return self.slug_of(tenant.erp_client_id)

    def deny_access(self, tenant: TruthTenant) -> None:
        self.set_api_access(tenant.erp_client_id, False)

    def revoke(self, tenant: TruthTenant) -> None:
        self.revoke_client_access(tenant.erp_client_id)

    def swap_identity(self, tenant: TruthTenant, as_tenant: TruthTenant) -> None:
        self.impersonate(tenant.erp_client_id, as_tenant.erp_client_id)

    def expire_tokens(self) -> int:
        return self.expire_all_tokens()

    # ------------------------------------------------------------------ admin (Python)
    def _company(self, client_id: int) -> Company:
        try:
            return self.state.companies[int(client_id)]
        except (KeyError, ValueError):
            raise KeyError(f"no company {client_id} in this sandbox") from None

    def slug_of(self, client_id: int) -> str:
        return self._company(client_id).slug

    def set_api_access(self, client_id: int, enabled: bool) -> None:
        """hasApiAccess: off -> still listed, accounts and balances answer 403."""
        with self.state.lock:
            self._company(client_id).api_access = bool(enabled)

    def revoke_client_access(self, client_id: int) -> None:
        """The user's access (and every consent's) to the company is withdrawn: it leaves
        /companies and its endpoints answer 403."""
        with self.state.lock:
            self._company(client_id).granted = False

    def grant_client_access(self, client_id: int) -> None:
        """The company is reachable again and added to every consent given so far (NOTES pitfall 5:
        the user ticks it under "Apper du har gitt tilgang til")."""
        with self.state.lock:
            company = self._company(client_id)
            company.granted = True
            for grant in self._grants():
                grant.companies.add(company.tenant.erp_client_id)

    def set_consent_companies(self, client_ids: Iterable[int] | None) -> None:
        """The companies the next OAuth consents approve; None (the default): every company."""
        with self.state.lock:
            self.state.consent_companies = None if client_ids is None else \
                {self._company(c).tenant.erp_client_id for c in client_ids}

    def impersonate(self, client_id: int, as_client_id: int) -> None:
        """Fault: the company's endpoints answer with the data and identity of `as_client_id`."""
        with self.state.lock:
            self._company(as_client_id)
            self._company(client_id).impersonate_as = int(as_client_id)

    def stop_impersonating(self, client_id: int | None = None) -> None:
        with self.state.lock:
            targets = [self._company(client_id)] if client_id is not None else self.state.companies.values()
            for company in targets:
                company.impersonate_as = None

    def expire_all_tokens(self) -> int:
        """Every OAuth access token answers 401 from now on (refresh still works; the personal
        token is unaffected). Returns how many were live."""
        with self.state.lock:
            live = [t for t in self.state.tokens.values() if self._is_live(t)]
            for token in live:
                token.expires_at = -math.inf
            return len(live)

    def add_client(self, name: str | None = None, org_number: str | None = None, company_type: str = "AS", *,
                   api_access: bool = True) -> TruthTenant:
        """A newly created company (next client id, fresh valid number) with its own ledger. The
        personal token sees it at once; consents given before do not (NOTES pitfall 5)."""
        with self.state.lock:
            tenants = self.ledger.tenants
            index = max(t.index for t in tenants) + 1
            used = {t.org_number for t in tenants}
            make = make_personal_number if company_type == "ENK" else make_org_number
            if org_number is None:
                org_number = next(n for n in (make(index * 7_919 + k) for k in itertools.count()) if n not in used)
            if name is None:
                name = f"{COMPANY_WORDS[index % len(COMPANY_WORDS)]} {TRADES[index % len(TRADES)]} {index}"
                name += "" if company_type == "ENK" else " AS"
            tenant = TruthTenant(
                index=index, erp_client_id=max(t.erp_client_id for t in tenants) + 1, org_number=org_number,
                name=name, company_type=company_type, seed=max(t.seed for t in tenants) + 1,
                first_month=self.ledger.first_month, last_month=self.ledger.last_month, accounts=tenants[0].accounts,
            )
            self.ledger.add_tenant(tenant)
            self.state.add(tenant, self.ledger.last_month).api_access = api_access
            return tenant

    def mutate_during_paging(self, path: str, action: str = "insert", *, position: int = 0,
                             after_requests: int = 1, tenant: int | str | None = None) -> PagingMutation:
        """Fault: the list at `path` ("/companies", "/accounts", "/accountBalances", or a full
        company path) changes after `after_requests` page requests; `tenant` is a client id or slug."""
        name = "/" + path.removeprefix(API_PREFIX).rstrip("/").rsplit("/", 1)[-1]
        if name not in PAGED_PATHS:
            raise ValueError(f"paging mutations work on {list(PAGED_PATHS)}, not {path!r}")
        if isinstance(tenant, str) and not tenant.isdigit():
            if tenant not in self.state.by_slug:
                raise KeyError(f"no company {tenant!r} in this sandbox")
            tenant = self.state.by_slug[tenant].tenant.erp_client_id
        mutation = PagingMutation(name, action, position, after_requests, None if tenant is None else int(tenant))
        with self.state.lock:
            self.state.paging_mutations.append(mutation)
        return mutation

    def clear_paging_mutations(self) -> None:
        with self.state.lock:
            self.state.paging_mutations.clear()

    def client_states(self) -> list[dict[str, Any]]:
        with self.state.lock:
            return [self._client_state(c) for _, c in sorted(self.state.companies.items())]

    @staticmethod
    def _client_state(company: Company) -> dict[str, Any]:
        return {"id": company.tenant.erp_client_id, "slug": company.slug, "name": company.tenant.name,
                "organizationNumber": company.tenant.org_number, "api_access": company.api_access,
                "granted": company.granted, "impersonate_as": company.impersonate_as}

    # ------------------------------------------------------------------ request identity (for the harness)
    def _credential_key(self, scope: Scope) -> str | None:
        """Rate limits are per user (NOTES §5): every token of the sandbox's one user shares one."""
        value = bearer_token(header_value(scope, "authorization"))
        return USER_KEY if value and (value == self.api_token or value in self.state.tokens) else None

    @staticmethod
    def _tenant_of(scope: Scope) -> str | None:
        parts = scope["path"].removeprefix(API_PREFIX).split("/")  # ["", "companies", slug, ...]
        return parts[2] if len(parts) > 2 and parts[1] == "companies" and parts[2] else None

    # ------------------------------------------------------------------ authentication and access
    def _grants(self) -> list[Grant]:
        return list({id(t.grant): t.grant for t in self.state.tokens.values() if t.grant and not t.grant.revoked}
                    .values())

    @staticmethod
    def _is_live(token: AccessToken) -> bool:
        return token.grant is not None and not token.grant.revoked and time.monotonic() < token.expires_at

    def _authenticate(self, request: Request) -> AccessToken:
        value = bearer_token(request.headers.get("authorization"))
        if value is None:
            raise unauthorized("Missing bearer token (Authorization: Bearer <token>).")
        if value == self.api_token:
            return AccessToken(value, None)
        with self.state.lock:
            token = self.state.tokens.get(value)
            if token is None or not self._is_live(token):
                raise unauthorized("Invalid, expired or revoked access token.")
            return token

    def _sees(self, token: AccessToken, company: Company) -> bool:
        return company.granted and (token.grant is None or company.tenant.erp_client_id in token.grant.companies)

    def _resolve(self, request: Request, *, data: bool = True) -> tuple[Company, Company]:
        """(the company in the path, the company whose data answers). `data`: refuse companies
        without the API module."""
        token = self._authenticate(request)
        slug = request.path_params["companySlug"]
        with self.state.lock:
            company = self.state.by_slug.get(slug)
            if company is None or (token.grant is not None and company.tenant.erp_client_id not in token.grant.companies):
                raise not_found(f"No company with slug {slug}.")
            if not company.granted:
                raise access_revoked_error(slug)
            if data and not company.api_access:
                raise no_api_access_error(slug)
            serving = self.state.companies[company.impersonate_as] if company.impersonate_as else company
            return company, serving

    # ------------------------------------------------------------------ rendering helpers
    @staticmethod
    def _company_json(company: Company) -> dict[str, Any]:
        tenant = company.tenant
        body = {
            "name": tenant.name,
            "slug": company.slug,
            "organizationNumber": tenant.org_number,  # as given: "" or invalid for the rejected fixtures
            "vatType": "yearly" if tenant.company_type == "ENK" else "bi-monthly",
            "address": {"streetAddress": f"Sandkassegata {tenant.index + 1}", "city": "Oslo", "postCode": "0150",
                        "country": "Norge"},
            "email": f"post@{company.slug}.sandbox.invalid",
            "creationDate": company.created.isoformat(),
            "hasApiAccess": company.api_access,
            "testCompany": False,
            "accountingStartDate": tenant.first_month.isoformat(),
        }
        if tenant.company_type != "ENK":
            body["vatRegistrationDate"] = tenant.first_month.isoformat()
        return body

    def _postings(self, tenant: TruthTenant) -> tuple[Posting, ...]:
        cached = self._postings_cache.get(tenant.erp_client_id)
        if cached is None or cached[0] is not tenant:
            cached = self._postings_cache[tenant.erp_client_id] = (tenant, postings_of(tenant))
        return cached[1]

    def _balance_rows(self, tenant: TruthTenant, day: dt.date) -> list[dict[str, Any]]:
        names = {row["code"]: row["name"] for row in chart_of(tenant)}
        balances = closing_balances(self._postings(tenant), day)
        return [{"code": code, "name": names[code], "balance": balances[code]}
                for code in sorted(balances, key=lambda c: (account_number(c), c))]

    def _paged(self, request: Request, path: str, rows: list[dict[str, Any]], company: Company | None,
               phantom: Callable[[], dict[str, Any]]) -> Response:
        page, size = _page_params(request)
        rows = self._apply_paging_mutations(path, company, rows, phantom)
        headers = {
            "Fiken-Api-Page": str(page),
            "Fiken-Api-Page-Size": str(size),
            "Fiken-Api-Page-Count": str(math.ceil(len(rows) / size)),
            "Fiken-Api-Result-Count": str(len(rows)),
        }
        return json_response(rows[page * size:(page + 1) * size], headers=headers)

    def _apply_paging_mutations(self, path: str, company: Company | None, rows: list[dict[str, Any]],
                                phantom: Callable[[], dict[str, Any]]) -> list[dict[str, Any]]:
        client_id = company.tenant.erp_client_id if company else None
        key = "slug" if path == "/companies" else "code"  # a phantom company is a real company from now on
        with self.state.lock:
            return apply_paging_mutations(self.state.paging_mutations, path, client_id, rows, phantom=phantom,
                                          identity=lambda row: row.get(key))

    def _phantom_company(self) -> dict[str, Any]:
        tenant = self.add_client()
        self.grant_client_access(tenant.erp_client_id)  # approved for every consent, so it is listed
        return self._company_json(self.state.companies[tenant.erp_client_id])

    # ------------------------------------------------------------------ endpoints
    async def user(self, request: Request) -> Response:
        self._authenticate(request)
        return json_response(USER)

    async def companies(self, request: Request) -> Response:
        token = self._authenticate(request)
        sort = request.query_params.get("sortBy", "name asc")
        field, _, direction = sort.partition(" ")
        if field not in COMPANY_SORTS or direction not in ("asc", "desc"):
            raise bad_request(f"sortBy must be one of {', '.join(COMPANY_SORTS)} followed by asc or desc")
        sort_keys: dict[str, Callable[[Company], Any]] = {
            "createdDate": lambda c: c.created, "name": lambda c: c.tenant.name,
            "organizationNumber": lambda c: c.tenant.org_number,
        }
        with self.state.lock:
            visible = [c for _, c in sorted(self.state.companies.items()) if self._sees(token, c)]
        visible.sort(key=sort_keys[field], reverse=direction == "desc")
        return self._paged(request, "/companies", [self._company_json(c) for c in visible], None,
                           self._phantom_company)

    async def company(self, request: Request) -> Response:
        _, serving = self._resolve(request, data=False)
        return json_response(self._company_json(serving))

    async def accounts(self, request: Request) -> Response:
        company, serving = self._resolve(request)
        wanted = _account_filter(request, with_range=True)
        rows = [row for row in chart_of(serving.tenant) if wanted(account_number(row["code"]))]
        return self._paged(request, "/accounts", rows, company, lambda: dict(PHANTOM_ACCOUNT))

    async def account(self, request: Request) -> Response:
        _, serving = self._resolve(request)
        code = request.path_params["accountCode"]
        row = next((r for r in chart_of(serving.tenant) if r["code"] == code), None)
        if row is None:
            raise not_found(f"No account {code}.")
        return json_response(row)

    async def account_balances(self, request: Request) -> Response:
        company, serving = self._resolve(request)
        day = _date_param(request)
        wanted = _account_filter(request)
        rows = [r for r in self._balance_rows(serving.tenant, day) if wanted(account_number(r["code"]))]
        return self._paged(request, "/accountBalances", rows, company, lambda: {**PHANTOM_ACCOUNT, "balance": 0})

    async def account_balance(self, request: Request) -> Response:
        """One account at a date; a split account (1500, 2400) answers its sub-accounts' sum."""
        _, serving = self._resolve(request)
        day = _date_param(request)
        code = request.path_params["accountCode"]
        row = next((r for r in chart_of(serving.tenant) if r["code"] == code), None)
        if row is None:
            raise not_found(f"No account {code}.")
        balances = closing_balances(self._postings(serving.tenant), day)
        total = sum(v for c, v in balances.items() if c == code or (":" not in code and c.startswith(code + ":")))
        return json_response({**row, "balance": total})

    def _api_routes(self) -> list[Route]:
        slug = "/companies/{companySlug}"
        return [
            Route("/user", self.user, methods=["GET"]),
            Route("/companies", self.companies, methods=["GET"]),
            Route(slug, self.company, methods=["GET"]),
            Route(f"{slug}/accounts", self.accounts, methods=["GET"]),
            Route(f"{slug}/accounts/{{accountCode}}", self.account, methods=["GET"]),
            Route(f"{slug}/accountBalances", self.account_balances, methods=["GET"]),
            Route(f"{slug}/accountBalances/{{accountCode}}", self.account_balance, methods=["GET"]),
        ]

    # ------------------------------------------------------------------ OAuth (NOTES §2.2)
    async def oauth_authorize(self, request: Request) -> Response:
        """Auto-approves (no login page): redirects to `redirect_uri?code=...&state=...`."""
        params = request.query_params
        missing = [n for n in ("response_type", "client_id", "redirect_uri", "state") if not params.get(n)]
        if missing:
            raise OAuthError(400, f"missing parameter(s): {', '.join(missing)}", "invalid_request")
        if params["response_type"] != "code":
            raise OAuthError(400, "only response_type=code is supported", "unsupported_response_type")
        if params["client_id"] != self.client_id:
            raise OAuthError(400, "unknown client_id", "invalid_client")
        code = secrets.token_urlsafe(24)
        with self.state.lock:
            approved = self.state.consent_companies
            companies = set(self.state.companies) if approved is None else approved
            self.state.codes[code] = PendingCode(frozenset(companies), params["redirect_uri"])
        uri = params["redirect_uri"]
        location = f"{uri}{'&' if '?' in uri else '?'}{urlencode({'code': code, 'state': params['state']})}"
        return Response(status_code=302, headers={"Location": location})

    async def oauth_token(self, request: Request) -> Response:
        self._check_client(request)
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/x-www-form-urlencoded":
            raise OAuthError(400, "the body must be application/x-www-form-urlencoded", "invalid_request")
        form = dict(parse_qsl((await request.body()).decode("utf-8", "replace"), keep_blank_values=True))
        grant_type = form.get("grant_type")
        with self.state.lock:
            if grant_type == "authorization_code":
                if not form.get("code") or not form.get("redirect_uri"):
                    raise OAuthError(400, "code and redirect_uri are required", "invalid_request")
                pending = self.state.codes.pop(form["code"], None)
                if pending is None or pending.redirect_uri != form["redirect_uri"]:
                    raise OAuthError(400, "invalid, used or mismatched authorization code", "invalid_grant")
                grant = Grant(set(pending.companies), "")
            elif grant_type == "refresh_token":
                if not form.get("refresh_token"):
                    raise OAuthError(400, "refresh_token is required", "invalid_request")
                grant = self.state.refresh_tokens.pop(form["refresh_token"], None)  # rotation: used once
                if grant is None or grant.revoked:
                    raise OAuthError(400, "invalid, used or revoked refresh token", "invalid_grant")
            else:
                raise OAuthError(400, "grant_type must be authorization_code or refresh_token",
                                 "unsupported_grant_type")
            grant.refresh_token = secrets.token_urlsafe(32)
            self.state.refresh_tokens[grant.refresh_token] = grant
            access = AccessToken(secrets.token_urlsafe(32), grant, time.monotonic() + ACCESS_TOKEN_SECONDS)
            self.state.tokens[access.value] = access
        return json_response({"access_token": access.value, "refresh_token": grant.refresh_token,
                              "token_type": "bearer", "expires_in": ACCESS_TOKEN_SECONDS},
                             headers={"Cache-Control": "no-store"})

    def _check_client(self, request: Request) -> None:
        """HTTP Basic client_id:client_secret, else 401 invalid_client."""
        if basic_credentials(request.headers.get("authorization")) != (self.client_id, self.client_secret):
            raise OAuthError(401, "client authentication failed (HTTP Basic client_id:client_secret)",
                             "invalid_client", {"WWW-Authenticate": 'Basic realm="fiken"'})

    async def oauth_revoke(self, request: Request) -> Response:
        """Revokes the consent behind the access token: its access and refresh tokens stop working."""
        value = bearer_token(request.headers.get("authorization"))
        if value is None:
            raise OAuthError(400, "Authorization: Bearer <access_token> is required", "invalid_request")
        with self.state.lock:
            token = self.state.tokens.get(value)
            if token is not None and token.grant is not None:
                token.grant.revoked = True
                self.state.refresh_tokens.pop(token.grant.refresh_token, None)
        return Response(status_code=200)

    def _oauth_routes(self) -> list[Route]:
        return [
            Route("/authorize", self.oauth_authorize, methods=["GET"]),
            Route("/token", self.oauth_token, methods=["POST"]),
            Route("/revoke", self.oauth_revoke, methods=["POST"]),
        ]

    # ------------------------------------------------------------------ errors
    async def _error_response(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, FikenError)
        return json_response(error_document(exc.reason, exc.description), exc.status, exc.headers)

    async def _http_error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if request.url.path.startswith(ADMIN_PREFIX):
            return json_response({"error": exc.detail}, exc.status_code)
        description = f"No endpoint {request.method} {request.url.path}" if exc.status_code in (404, 405) \
            else str(exc.detail)
        return json_response(error_document(reason_of(exc.status_code), description), exc.status_code)

    # ------------------------------------------------------------------ admin (HTTP)
    def _admin_routes(self) -> list[Route]:
        def client_action(action: Callable[[int, dict[str, Any]], Any]):
            return client_admin_endpoint(action, lambda client_id: self._client_state(self._company(client_id)))

        def body_action(action: Callable[[dict[str, Any]], Any], status: int = 200):
            async def endpoint(request: Request) -> Response:
                try:
                    return json_response(action(json.loads(await request.body() or b"{}")), status)
                except KeyError as exc:
                    return json_response({"error": str(exc.args[0])}, 404)
                except (ValueError, TypeError) as exc:
                    return json_response({"error": str(exc)}, 400)
            return endpoint

        def create_client(body: dict[str, Any]) -> dict[str, Any]:
            tenant = self.add_client(**body)
            return self._client_state(self._company(tenant.erp_client_id))

        def add_paging_mutation(body: dict[str, Any]) -> dict[str, Any]:
            mutation = self.mutate_during_paging(**body)
            return mutation.to_json()

        def set_consent(body: dict[str, Any]) -> dict[str, Any]:
            self.set_consent_companies(body.get("companies"))
            return {"companies": None if self.state.consent_companies is None else sorted(self.state.consent_companies)}

        def clear_mutations(body: dict[str, Any]) -> dict[str, Any]:
            self.clear_paging_mutations()
            return {"paging_mutations": 0}

        return [
            Route("/clients", body_action(lambda body: self.client_states()), methods=["GET"]),
            Route("/clients", body_action(create_client, 201), methods=["POST"]),
            Route("/clients/{id}/grant", client_action(lambda cid, body: self.grant_client_access(cid)),
                  methods=["POST"]),
            Route("/clients/{id}/revoke", client_action(lambda cid, body: self.revoke_client_access(cid)),
                  methods=["POST"]),
            Route("/clients/{id}/api-access",
                  client_action(lambda cid, body: self.set_api_access(cid, _require(body, "enabled", bool))),
                  methods=["PUT"]),
            Route("/clients/{id}/impersonate",
                  client_action(lambda cid, body: self.impersonate(cid, _require(body, "as", int))), methods=["PUT"]),
            Route("/clients/{id}/impersonate", client_action(lambda cid, body: self.stop_impersonating(cid)),
                  methods=["DELETE"]),
            Route("/tokens/expire", body_action(lambda body: {"expired": self.expire_all_tokens()}), methods=["POST"]),
            Route("/consent", body_action(set_consent), methods=["PUT"]),
            Route("/paging-mutations", body_action(add_paging_mutation, 201), methods=["POST"]),
            Route("/paging-mutations", body_action(clear_mutations), methods=["DELETE"]),
        ]


ADMIN_BASE = f"{ADMIN_PREFIX}/{FikenSandbox.erp}"


# ---------------------------------------------------------------------------------------- parameters


def _int_param(request: Request, name: str, default: int | None) -> int | None:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    if not re.fullmatch(r"-?\d+", raw.strip()):
        raise bad_request(f"{name} must be an integer, not {raw!r}")
    return int(raw)


def _page_params(request: Request) -> tuple[int, int]:
    """`page` (0-based, default 0) and `pageSize` (1..100, default 25); out of range -> 400."""
    page = _int_param(request, "page", 0)
    size = _int_param(request, "pageSize", DEFAULT_PAGE_SIZE)
    if page < 0:
        raise bad_request("page must be 0 or more")
    if not 1 <= size <= MAX_PAGE_SIZE:
        raise bad_request(f"pageSize must be between 1 and {MAX_PAGE_SIZE}")
    return page, size


def _date_param(request: Request) -> dt.date:
    raw = request.query_params.get("date")
    if not raw:
        raise bad_request("date is required (YYYY-MM-DD)")
    try:
        if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", raw):
            raise ValueError
        return dt.date.fromisoformat(raw)
    except ValueError:
        raise bad_request(f"date must be YYYY-MM-DD, not {raw!r}") from None


def _account_filter(request: Request, *, with_range: bool = False) -> Callable[[int], bool]:
    """`fromAccount`/`toAccount` (both inclusive; UNCONFIRMED) on the 4-digit part, and on
    /accounts `range` ("1000-1500, 2000, 7000-7004")."""
    low = _int_param(request, "fromAccount", None)
    high = _int_param(request, "toAccount", None)
    spans: list[tuple[int, int]] = []
    raw_range = request.query_params.get("range", "") if with_range else ""
    for part in filter(None, (p.strip() for p in raw_range.split(","))):
        match = re.fullmatch(r"(\d+)\s*(?:-\s*(\d+))?", part)
        if not match:
            raise bad_request(f"range must list account numbers or ranges, not {raw_range!r}")
        spans.append((int(match[1]), int(match[2] or match[1])))

    def wanted(number: int) -> bool:
        return ((low is None or number >= low) and (high is None or number <= high)
                and (not spans or any(a <= number <= b for a, b in spans)))

    return wanted


def _require(body: dict[str, Any], name: str, kind: type) -> Any:
    value = body.get(name)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise TypeError(f"body needs {name!r} ({kind.__name__})")
    return value
