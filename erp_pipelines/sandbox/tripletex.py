"""Tripletex API v2 simulator: the truth ledger rendered through Tripletex's paths, auth and shapes.

Facts come from `erp-api/tripletex/NOTES.md` and `tripletex-openapi.json`:

- session tokens from `POST /token/session/:create` (201, JSON body) or the legacy
  `PUT ...?consumerToken=&employeeToken=&expirationDate=` (200); a session lives until midnight
  of `expirationDate`, which must be in the future;
- HTTP Basic everywhere else: username "0"/"" = the company owning the employee token, otherwise a
  client id; password = session token;
- an accountant key ("Regnskapskontorets brukernøkkel") with username 0 may only call
  `GET /company/>withLoginAccess` and `GET /token/session/>whoAmI`;
- lists use from/count paging with `{fullResultSize, from, count, versionDigest, values}`,
  `fields` selection (nested objects default to `{id, url}`), errors the `ApiError` envelope;
- amounts are kroner as JSON numbers, debit positive; `dateTo` and `accountNumberTo` are exclusive.

Usage in tests::

    sandbox = TripletexSandbox(generate_ledger(5))
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=sandbox.app), base_url="http://tripletex.test/v2")
    sandbox.set_api_access(80_002, False)           # this client answers 403 / 9000
    sandbox.faults.server_error(503, times=2, tenant="80_001")
    sandbox.skew_ledger(80_001, 1920, 12_345, dt.date(2026, 2, 10))  # /ledger disagrees from then on
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import itertools
import json
import secrets
import threading
from collections.abc import Callable
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Scope

from erp_pipelines.sandbox.common import (
    ADMIN_PREFIX,
    ErpProfile,
    PagingMutation,
    RateLimitHeaderNames,
    RateLimitPolicy,
    SandboxHarness,
    apply_paging_mutations,
    basic_credentials,
    client_admin_endpoint,
    header_value,
    json_bytes,
    json_response,
    request_id_of,
)
from erp_pipelines.sandbox.ledger import (
    COMPANY_WORDS,
    TRADES,
    TruthLedger,
    TruthTenant,
    make_org_number,
)
from erp_pipelines.sandbox.simulator import ApiPaths, Simulator

API_PREFIX = "/v2"
DEFAULT_CONSUMER_TOKEN = "sandbox-consumer-token"
DEFAULT_ACCOUNTANT_EMPLOYEE_TOKEN = "sandbox-accountant-key"
ERROR_LINK = "https://tripletex.no/v2-docs/"
OSLO = ZoneInfo("Europe/Oslo")
MAX_COUNT = 10_000  # NOTES pitfall 9: count above 10000 is rejected with code 23000
RETAINED_EARNINGS_ACCOUNT = 2050  # profit and loss before the year's start (net zero after årsoppgjør)
# Invented (Tripletex publishes no numbers, NOTES §5); generous, override per test or on the CLI.
DEFAULT_RATE_LIMIT = RateLimitPolicy(limit=1000, window_seconds=10, reset_header_on_429=False)
# No code is documented for 429 (NOTES §6: body UNCONFIRMED); 0 marks "not from the table".
RATE_LIMIT_ERROR_CODE = 0

TRIPLETEX_RATE_LIMIT_HEADERS = RateLimitHeaderNames(
    limit="X-Rate-Limit-Limit", remaining="X-Rate-Limit-Remaining", reset="X-Rate-Limit-Reset"
)

# The accounting firm that owns the accountant key (its own company in Tripletex).
FIRM_ID = 1
FIRM_NAME = "Fjellvik Regnskapskontor AS"
FIRM_ORG_NUMBER = make_org_number(31_337)
FIRM_START = dt.date(2015, 1, 1)
ACCOUNTANT_EMPLOYEE_ID = 101

def _names(text: str) -> tuple[str, ...]:
    return tuple(text.split())


# Fields of each model in tripletex-openapi.json (components.schemas.<model>.properties).
MODEL_FIELDS: dict[str, tuple[str, ...]] = {
    "Account": _names(
        "id version changes url number numberPretty name description type legalVatTypes ledgerType "
        "balanceGroup vatType vatLocked currency isCloseable isApplicableForSupplierInvoice "
        "requireReconciliation isInactive isBankAccount isInvoiceAccount bankAccountNumber "
        "bankAccountCountry bankName bankAccountIBAN bankAccountSWIFT saftCode groupingCode displayName "
        "requiresDepartment requiresProject invoicingDepartment isPostingsExist quantityType1 "
        "quantityType2 department"
    ),
    "Client": _names(
        "id version changes url name displayName startDate endDate organizationNumber email phoneNumber "
        "phoneNumberMobile faxNumber address type currency accountantOrSimilar companyMigration "
        "invoiceShowDeliveryDate customerCompanyId"
    ),
    "Company": _names(
        "id version changes url name displayName startDate endDate organizationNumber email phoneNumber "
        "phoneNumberMobile faxNumber address type currency accountantOrSimilar companyMigration "
        "invoiceShowDeliveryDate"
    ),
    "LoggedInUserInfo": _names(
        "employeeId actualEmployeeId employee companyId company language loggedInWithConnect employeeIsProxy"
    ),
    "BalanceSheetAccount": _names("account balanceIn balanceChange balanceOut startDate endDate"),
    "LedgerAccount": _names(
        "account sumAmount currency sumAmountCurrency openingBalance openingBalanceCurrency closingBalance "
        "closingBalanceCurrency balanceOutInAccountCurrency postings"
    ),
    "Employee": _names(
        "id version changes url firstName lastName displayName employeeNumber dateOfBirth email "
        "phoneNumberMobileCountry phoneNumberMobile phoneNumberHome phoneNumberWork nationalIdentityNumber "
        "dnumber internationalId bankAccountNumber iban bic creditorBankCountryId usesAbroadPayment userType "
        "allowInformationRegistration isContact isProxy comments address department employments "
        "holidayAllowanceEarned employeeCategory isAuthProjectOverviewURL pictureId companyId "
        "vismaConnect2FAactive"
    ),
    "Address": _names(
        "id version changes url addressLine1 addressLine2 postalCode city country displayName "
        "addressAsString displayNameInklMatrikkel knr gnr bnr fnr snr unitNumber"
    ),
    "Currency": _names("id version changes url code description factor displayName isDisabled"),
    "SessionToken": _names("id version changes url consumerToken employeeToken expirationDate token encryptionKey"),
    "ConsumerToken": _names("id version changes url apiConsumer token expirationDate"),
    "EmployeeToken": _names("id version changes url employee apiConsumer token expirationDate"),
}


# ---------------------------------------------------------------------------------------- errors


class TripletexApiError(Exception):
    """Rendered as Tripletex's ApiError envelope (NOTES §6)."""

    def __init__(self, status: int, code: int, message: str, developer_message: str | None = None,
                 validation_messages: list[dict[str, Any]] | None = None) -> None:
        super().__init__(f"{status}/{code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.developer_message = developer_message or message
        self.validation_messages = validation_messages

    def body(self, request_id: str) -> dict[str, Any]:
        return {
            "status": self.status,
            "code": self.code,
            "message": self.message,
            "link": ERROR_LINK,
            "developerMessage": self.developer_message,
            # real Tripletex sends null when there is nothing to validate (NOTES §2.3)
            "validationMessages": self.validation_messages,
            "requestId": request_id,
        }


def validation_error(code: int, *messages: tuple[str, str]) -> TripletexApiError:
    """422 with one ApiValidationMessage per (field, message)."""
    return TripletexApiError(
        422, code, "Validering feilet.",
        developer_message="; ".join(f"{field}: {message}" for field, message in messages),
        validation_messages=[{"field": f, "message": m, "path": f} for f, m in messages],
    )


def unauthorized(developer_message: str) -> TripletexApiError:
    return TripletexApiError(401, 3000, "Unauthorized", developer_message)


def invalid_username(username: str) -> TripletexApiError:
    # The exact text of a real 401 (NOTES §2.3).
    return unauthorized(
        f"Authorization header has invalid username: {username}. Should be a customer id or 0 for default. "
        "The expected format is base64encoded(<<companyId>>:<<sessionToken>>)"
    )


def forbidden(developer_message: str) -> TripletexApiError:
    return TripletexApiError(403, 9000, "You do not have permission to access this feature.", developer_message)


def client_without_api_access_error(client_id: int) -> TripletexApiError:
    """What a client that is listed but has not ticked "API-tilgang" answers.

    UNCONFIRMED ASSUMPTION (NOTES §2.4 item 8): no source documents this response. We model it as
    403 / code 9000 (the missing-entitlement error). Change it here if Tripletex answers otherwise."""
    return forbidden(
        f"Client {client_id} has not given the accounting firm API access "
        "(Selskap > Regnskapsførers tilgang > API-tilgang)."
    )


def error_body(status: int, message: str, request_id: str) -> bytes:
    """ApiError body for responses the shared machinery makes (429, injected 5xx)."""
    code = RATE_LIMIT_ERROR_CODE if status == 429 else 1000 if status >= 500 else 4000
    return json_bytes(TripletexApiError(status, code, message).body(request_id))


# ---------------------------------------------------------------------------------------- objects and fields


@dataclasses.dataclass
class Node:
    """One Tripletex object: `data` holds scalars, Decimals, nested Nodes and lists of Nodes."""

    model: str
    data: dict[str, Any]

    def ref(self) -> dict[str, Any]:
        return {"id": self.data["id"], "url": self.data["url"]}


Selection = dict[str, "Selection | None"]


def parse_fields(text: str | None) -> Selection | None:
    """Tripletex `fields`: "a,b(c,d(*)),*" -> {"a": None, "b": {"c": None, "d": {"*": None}}, "*": None}."""
    if text is None or not text.strip():
        return None
    position = 0

    def parse_list() -> Selection:
        nonlocal position
        selection: Selection = {}
        while True:
            start = position
            while position < len(text) and text[position] not in ",()":
                position += 1
            name = text[start:position].strip()
            if not name:
                raise illegal_fields(text)
            sub = None
            if position < len(text) and text[position] == "(":
                position += 1
                sub = parse_list()
                if position >= len(text) or text[position] != ")":
                    raise illegal_fields(text)
                position += 1
            selection[name] = sub
            if position < len(text) and text[position] == ",":
                position += 1
                continue
            return selection

    selection = parse_list()
    if position != len(text):
        raise illegal_fields(text)
    return selection


def illegal_fields(text: str, name: str | None = None, model: str | None = None) -> TripletexApiError:
    detail = (f"Illegal field in fields filter: {name}. {name} does not match a field in the model: {model}DTO"
              if name else f"Illegal fields filter: {text}")
    return TripletexApiError(400, 11000, "Illegal field in fields filter", detail)


def render(node: Node, selection: Selection | None) -> dict[str, Any]:
    """Only the selected fields; nested objects as {id, url} unless sub-fields are asked for."""
    known = MODEL_FIELDS[node.model]
    selection = selection or {"*": None}
    for name in selection:
        if name != "*" and name not in known:
            raise illegal_fields("", name, node.model)
    everything = "*" in selection
    out: dict[str, Any] = {}
    for name in known:
        if name not in node.data or not (everything or name in selection):
            continue
        value, sub = node.data[name], selection.get(name)
        if isinstance(value, Node):
            out[name] = _render_nested(value, sub)
        elif isinstance(value, list) and value and isinstance(value[0], Node):
            out[name] = [_render_nested(v, sub) for v in value]
        else:
            out[name] = value
    return out


def _render_nested(node: Node, sub: Selection | None) -> dict[str, Any]:
    if sub is None and "id" in node.data and "url" in node.data:
        return node.ref()
    return render(node, sub)


def sort_nodes(nodes: list[Node], sorting: str | None) -> list[Node]:
    """Tripletex `sorting`: comma list of (dotted) fields, "-" prefix = descending."""
    if not sorting or not sorting.strip():
        return nodes
    keys = [k.strip() for k in sorting.split(",") if k.strip()]
    known = MODEL_FIELDS[nodes[0].model] if nodes else ()
    for key in reversed(keys):
        path = key.lstrip("-").split(".")
        if known and path[0] not in known:
            raise TripletexApiError(422, 17000, "Sorting failed", f"Illegal sorting field: {key}")

        def value(node: Node, path=path) -> tuple[bool, Any]:
            current: Any = node
            for part in path:
                current = current.data.get(part) if isinstance(current, Node) else None
            return (current is None, current if current is not None else 0)

        nodes = sorted(nodes, key=value, reverse=key.startswith("-"))
    return nodes


def kroner(ore: int) -> Decimal:
    """Integer øre as exact kroner with two decimals (123450 -> Decimal('1234.50'))."""
    return Decimal(ore).scaleb(-2)


# ---------------------------------------------------------------------------------------- state


@dataclasses.dataclass(frozen=True)
class EmployeeKey:
    """An employee token: the company that issued it and whether it is an accountant key."""

    token: str
    id: int
    employee_id: int
    company_id: int
    accountant: bool


@dataclasses.dataclass
class Session:
    id: int
    token: str
    key: EmployeeKey
    expiration_date: dt.date  # valid until midnight (Oslo) starting this date


@dataclasses.dataclass
class ClientAccess:
    login_access: bool = True  # "Klienttilgang": the accountant key is linked to the client
    api_access: bool = True  # "API-tilgang": the client allows the firm's API use
    impersonate_as: int | None = None  # fault: answer with this other client's data and identity


@dataclasses.dataclass
class Caller:
    """Who is asking, after authentication."""

    session: Session
    company_id: int  # the company named by the Basic username ("0" resolved)
    firm_context: bool  # an accountant key acting as its own firm: only two endpoints allowed
    identity_id: int  # the company the answers claim to be (differs when impersonating)
    tenant: TruthTenant | None  # whose ledger answers (None for the firm)


class TripletexState:
    """Tokens, sessions and per-client access. Guarded by `lock`."""

    def __init__(self, ledger: TruthLedger, consumer_token: str, accountant_employee_token: str,
                 company_tokens: dict[str, int]) -> None:
        self.lock = threading.RLock()
        self.ledger = ledger
        self.consumer_token = consumer_token
        self.tenants: dict[int, TruthTenant] = {t.erp_client_id: t for t in ledger.tenants}
        self.access: dict[int, ClientAccess] = {cid: ClientAccess() for cid in self.tenants}
        self.keys: dict[str, EmployeeKey] = {
            accountant_employee_token: EmployeeKey(accountant_employee_token, 1, ACCOUNTANT_EMPLOYEE_ID, FIRM_ID, True)
        }
        for n, (token, client_id) in enumerate(sorted(company_tokens.items()), start=2):
            if client_id not in self.tenants:
                raise ValueError(f"company token for unknown client {client_id}")
            self.keys[token] = EmployeeKey(token, n, 200 + n, client_id, False)
        self.sessions: dict[str, Session] = {}
        self.session_ids = itertools.count(1001)
        self.paging_mutations: list[PagingMutation] = []
        self.ledger_skews: dict[int, list[Posting]] = {}  # client id → postings only GET /ledger sees


# ---------------------------------------------------------------------------------------- the sandbox


class TripletexSandbox(Simulator):
    """A Tripletex API v2 over a truth ledger. `.app` serves the API at /v2 and admin at /_sandbox."""

    erp = "tripletex"
    api_prefix = API_PREFIX
    paths = ApiPaths(
        clients="/company/>withLoginAccess", accounts="/ledger/account", balances="/balanceSheet",
        identity="/token/session/>whoAmI", phantom_account="1000", token="/token/session/:create",
    )
    default_rate_limit = DEFAULT_RATE_LIMIT
    # a window the chaos run touches now and then (its 429s carry no reset header, like the real API's)
    chaos_rate_limit = RateLimitPolicy(limit=400, window_seconds=2.0)
    contract_rate_limit = RateLimitPolicy(limit=20, window_seconds=1.0)  # Tripletex publishes no number
    bench_rate_limit = RateLimitPolicy(limit=200, window_seconds=1.0)
    revoke_fix = "Klienttilgang"  # the accountant key's link to the client
    deny_access_fix = "API-tilgang"  # the client's API access for the firm
    required_balance_field = "values.*.balanceOut"
    DEMO_TENANT_WITHOUT_API_ACCESS = 5

    def __init__(
        self,
        ledger: TruthLedger,
        *,
        consumer_token: str = DEFAULT_CONSUMER_TOKEN,
        accountant_employee_token: str = DEFAULT_ACCOUNTANT_EMPLOYEE_TOKEN,
        company_tokens: dict[str, int] | None = None,
        rate_limit: RateLimitPolicy | None = None,
        today: dt.date | None = None,
        fault_seed: int = 0,
    ) -> None:
        self.ledger = ledger
        self.today = today  # None: the real date in Oslo
        self._postings_cache: dict[int, tuple[TruthTenant, tuple[Posting, ...]]] = {}
        self.state = TripletexState(ledger, consumer_token, accountant_employee_token, dict(company_tokens or {}))
        profile = ErpProfile(
            name=self.erp,
            api_prefix=API_PREFIX,
            error_body=error_body,
            credential_key=self._credential_key,
            tenant_of=self._tenant_of,
            request_id_header="x-tlx-request-id",
            rate_limit_headers=TRIPLETEX_RATE_LIMIT_HEADERS,
        )
        self.harness = SandboxHarness(profile, rate_limit=rate_limit or dataclasses.replace(DEFAULT_RATE_LIMIT),
                                      fault_seed=fault_seed)
        self.app = self.harness.build_app(
            self._api_routes(),
            erp_admin_routes=self._admin_routes(),
            exception_handlers={TripletexApiError: self._api_error_response, HTTPException: self._http_error},
        )

    # ------------------------------------------------------------------ simulator hooks

    def environment(self, url: str) -> dict[str, str]:
        return {"TRIPLETEX_BASE_URL": url, "TRIPLETEX_CONSUMER_TOKEN": self.consumer_token,
                "TRIPLETEX_EMPLOYEE_TOKEN": self.accountant_employee_token}

    def credential_lines(self) -> list[str]:
        tenants = self.ledger.tenants
        return [
            f"consumer token:  {self.consumer_token}",
            f"employee token:  {self.accountant_employee_token}  (accountant key; username 0 or a client id)",
            f"clients:         {len(tenants)} (ids {tenants[0].erp_client_id}..{tenants[-1].erp_client_id})",
        ]

    def wrong_credential(self, environment: dict[str, str]) -> tuple[dict[str, str], str]:
        return {**environment, "TRIPLETEX_EMPLOYEE_TOKEN": "not-a-valid-employee-token"}, "TRIPLETEX_EMPLOYEE_TOKEN"

    def prepare_demo(self) -> None:
        self.set_api_access(self.ledger.tenants[self.DEMO_TENANT_WITHOUT_API_ACCESS].erp_client_id, False)

    def scope_of(self, tenant: TruthTenant) -> str:
        return str(tenant.erp_client_id)

    def deny_access(self, tenant: TruthTenant) -> None:
        self.set_api_access(tenant.erp_client_id, False)

    def revoke(self, tenant: TruthTenant) -> None:
        self.revoke_client_access(tenant.erp_client_id)

    def swap_identity(self, tenant: TruthTenant, as_tenant: TruthTenant) -> None:
        self.impersonate(tenant.erp_client_id, as_tenant.erp_client_id)

    def expire_tokens(self) -> int:
        return self.expire_all_sessions()

    @property
    def consumer_token(self) -> str:
        return self.state.consumer_token

    @property
    def accountant_employee_token(self) -> str:
        return next(k.token for k in self.state.keys.values() if k.accountant)

    def current_date(self) -> dt.date:
        return self.today or dt.datetime.now(OSLO).date()

    # ------------------------------------------------------------------ admin (Python)
    def _client_access(self, client_id: int) -> ClientAccess:
        try:
            return self.state.access[int(client_id)]
        except KeyError:
            raise KeyError(f"no client {client_id} in this sandbox") from None

    def grant_client_access(self, client_id: int) -> None:
        """Link the accountant key to the client ("Klienttilgang")."""
        with self.state.lock:
            self._client_access(client_id).login_access = True

    def revoke_client_access(self, client_id: int) -> None:
        """Unlink: the client disappears from >withLoginAccess and its username gets 401 / 3000."""
        with self.state.lock:
            self._client_access(client_id).login_access = False

    def set_api_access(self, client_id: int, enabled: bool) -> None:
        """The client's "API-tilgang" for the firm; off -> listed, but every call 403 / 9000."""
        with self.state.lock:
            self._client_access(client_id).api_access = bool(enabled)

    def impersonate(self, client_id: int, as_client_id: int) -> None:
        """Fault: calls for `client_id` answer with the data and identity of `as_client_id`."""
        with self.state.lock:
            self._client_access(as_client_id)
            self._client_access(client_id).impersonate_as = int(as_client_id)

    def stop_impersonating(self, client_id: int | None = None) -> None:
        with self.state.lock:
            targets = [self._client_access(client_id)] if client_id is not None else self.state.access.values()
            for access in targets:
                access.impersonate_as = None

    def expire_all_sessions(self) -> int:
        """Every session token stops working now (401 / 3000). Returns how many were live."""
        with self.state.lock:
            count = len(self.state.sessions)
            self.state.sessions.clear()
            return count

    def add_client(self, *, name: str | None = None, org_number: str | None = None, company_type: str = "AS",
                   login_access: bool = True, api_access: bool = True) -> TruthTenant:
        """A new valid tenant (next client id, fresh valid organisation number), added to the
        ledger, so a "newly granted client" shows up in >withLoginAccess."""
        with self.state.lock:
            tenants = self.ledger.tenants
            index = max(t.index for t in tenants) + 1
            client_id = max(t.erp_client_id for t in tenants) + 1
            seed = max(t.seed for t in tenants) + 1
            if org_number is None:
                used = {t.org_number for t in tenants} | {FIRM_ORG_NUMBER}
                attempt = seed
                org_number = make_org_number(attempt)
                while org_number in used:
                    attempt += 1
                    org_number = make_org_number(attempt)
            if name is None:
                words = COMPANY_WORDS[index % len(COMPANY_WORDS)], TRADES[index % len(TRADES)]
                name = f"{words[0]} {words[1]} {index}" + ("" if company_type == "ENK" else " AS")
            template = tenants[0]
            tenant = TruthTenant(
                index=index, erp_client_id=client_id, org_number=org_number, name=name,
                company_type=company_type, seed=seed, first_month=self.ledger.first_month,
                last_month=self.ledger.last_month, accounts=template.accounts,
            )
            self.ledger.add_tenant(tenant)
            self.state.tenants[client_id] = tenant
            self.state.access[client_id] = ClientAccess(login_access=login_access, api_access=api_access)
            return tenant

    def mutate_during_paging(self, path: str, action: str = "insert", *, position: int = 0,
                             after_requests: int = 1, tenant: int | None = None) -> PagingMutation:
        """Fault: the list at `path` changes after `after_requests` page requests (see PagingMutation)."""
        path = path[len(API_PREFIX):] if path.startswith(API_PREFIX + "/") else path
        if path not in PAGED_PATHS:
            raise ValueError(f"paging mutations work on {sorted(PAGED_PATHS)}, not {path!r}")
        mutation = PagingMutation(path, action, position, after_requests, None if tenant is None else int(tenant))
        with self.state.lock:
            self.state.paging_mutations.append(mutation)
        return mutation

    def skew_ledger(self, client_id: int, account: int, amount_ore: int, day: dt.date) -> None:
        """Fault: GET /ledger of the client counts one more posting (`amount_ore` on `account` on
        `day`) that /balanceSheet does not, so the two disagree from that day on."""
        with self.state.lock:
            self._client_access(client_id)
            tenant = self.state.tenants[int(client_id)]
            pnl = {a.number: a.is_profit_and_loss for a in tenant.accounts}
            if int(account) not in pnl:
                raise ValueError(f"client {client_id} has no account {account}")
            skews = self.state.ledger_skews.setdefault(int(client_id), [])
            skews.append((day, int(account), int(amount_ore), pnl[int(account)]))

    def clear_ledger_skews(self, client_id: int | None = None) -> None:
        with self.state.lock:
            if client_id is None:
                self.state.ledger_skews.clear()
            else:
                self.state.ledger_skews.pop(int(client_id), None)

    def clear_paging_mutations(self) -> None:
        with self.state.lock:
            self.state.paging_mutations.clear()

    def client_states(self) -> list[dict[str, Any]]:
        with self.state.lock:
            return [
                {
                    "id": cid,
                    "name": tenant.name,
                    "organizationNumber": tenant.org_number,
                    "login_access": self.state.access[cid].login_access,
                    "api_access": self.state.access[cid].api_access,
                    "impersonate_as": self.state.access[cid].impersonate_as,
                }
                for cid, tenant in sorted(self.state.tenants.items())
            ]

    # ------------------------------------------------------------------ request identity (for the harness)
    @staticmethod
    def _basic_credentials(scope_or_header: Scope | str | None) -> tuple[str, str] | None:
        header = header_value(scope_or_header, "authorization") if isinstance(scope_or_header, dict) \
            else scope_or_header
        return basic_credentials(header)

    def _credential_key(self, scope: Scope) -> str | None:
        """Rate limits are per employee (token) per API consumer (NOTES §5)."""
        credentials = self._basic_credentials(scope)
        session = self.state.sessions.get(credentials[1]) if credentials else None
        return f"employee-token-{session.key.id}" if session else None

    def _tenant_of(self, scope: Scope) -> str | None:
        credentials = self._basic_credentials(scope)
        if not credentials:
            return None
        username = credentials[0].strip()
        if username in ("", "0"):
            session = self.state.sessions.get(credentials[1])
            return str(session.key.company_id) if session else None
        return username

    # ------------------------------------------------------------------ authentication
    def _authenticate(self, request: Request, *, firm_allowed: bool = False) -> Caller:
        credentials = self._basic_credentials(request.headers.get("authorization"))
        if credentials is None:
            raise unauthorized("Missing or malformed Basic authorization header.")
        username, token = credentials
        with self.state.lock:
            session = self.state.sessions.get(token)
            if session is None or self.current_date() >= session.expiration_date:
                raise unauthorized("Invalid or expired session token.")
            key = session.key
            username = username.strip()
            if username in ("", "0") or (username.isdigit() and int(username) == key.company_id):
                company_id = key.company_id
            elif not username.isdigit():
                raise invalid_username(username)
            else:
                company_id = int(username)
                access = self.state.access.get(company_id)
                if not key.accountant or access is None or not access.login_access:
                    raise invalid_username(username)
                if not access.api_access:
                    raise client_without_api_access_error(company_id)
            if key.accountant and company_id == FIRM_ID:
                if not firm_allowed:
                    raise forbidden(
                        "An accountant key used with username 0 may only call GET /company/>withLoginAccess "
                        "and GET /token/session/>whoAmI; use the client's id as username."
                    )
                return Caller(session, FIRM_ID, True, FIRM_ID, None)
            identity = self.state.access[company_id].impersonate_as or company_id
            return Caller(session, company_id, False, identity, self.state.tenants[identity])

    # ------------------------------------------------------------------ rendering helpers
    @staticmethod
    def _base(request: Request) -> str:
        return f"{request.url.netloc}{API_PREFIX}"

    def _company_node(self, request: Request, company_id: int, model: str = "Company") -> Node:
        base = self._base(request)
        if company_id == FIRM_ID:
            name, org, kind, start = FIRM_NAME, FIRM_ORG_NUMBER, "AS", FIRM_START
            customer_company_id = None
        else:
            tenant = self.state.tenants[company_id]
            name, org, kind, start = tenant.name, tenant.org_number, tenant.company_type, tenant.first_month
            # undocumented in the spec (NOTES §2.4.6); deliberately not the id, so misuse shows
            customer_company_id = 300_000 + tenant.index
        data: dict[str, Any] = {
            "id": company_id,
            "version": 1,
            "url": f"{base}/company/{company_id}",
            "name": name,
            "displayName": name,
            "startDate": start.isoformat(),
            "organizationNumber": org or "",  # missing number: "" (never null)
            "address": Node("Address", {"id": 500_000 + company_id, "url": f"{base}/address/{500_000 + company_id}"}),
            "type": kind,
            "currency": Node("Currency", {"id": 1, "url": f"{base}/currency/1", "code": "NOK",
                                          "description": "Norske kroner", "factor": 1, "displayName": "NOK"}),
            "accountantOrSimilar": company_id == FIRM_ID,
            "companyMigration": "NONE",
            "invoiceShowDeliveryDate": False,
        }
        if model == "Client" and customer_company_id is not None:
            data["customerCompanyId"] = customer_company_id
        return Node(model, data)

    def _account_node(self, request: Request, tenant: TruthTenant, number: int, name: str, kind: str) -> Node:
        base = self._base(request)
        account_id = tenant.erp_client_id * 10_000 + number
        return Node("Account", {
            "id": account_id,
            "version": 1,
            "url": f"{base}/ledger/account/{account_id}",
            "number": number,
            "numberPretty": str(number),
            "name": name,
            "description": "",
            "type": kind,
            "ledgerType": "GENERAL",
            "vatLocked": False,
            "currency": Node("Currency", {"id": 1, "url": f"{base}/currency/1", "code": "NOK"}),
            "isCloseable": number in (1500, 2400),
            "isApplicableForSupplierInvoice": 4000 <= number < 8000,
            "requireReconciliation": number in (1920, 2400, 1500),
            "isInactive": False,
            "isBankAccount": number == 1920,
            "isInvoiceAccount": False,
            "bankAccountNumber": "",
            "saftCode": str(number),
            "groupingCode": str(number),
            "displayName": f"{number} {name}",
            "requiresDepartment": False,
            "requiresProject": False,
            "isPostingsExist": True,
        })

    def _accounts(self, request: Request, tenant: TruthTenant) -> list[Node]:
        return [self._account_node(request, tenant, a.number, a.name, a.type)
                for a in sorted(tenant.accounts, key=lambda a: a.number)]

    def _list_response(self, request: Request, path: str, nodes: list[Node], caller: Caller | None,
                       phantom: Callable[[], Node] | None = None) -> Response:
        params = request.query_params
        start = _int_param(params, "from", 0)
        count = _int_param(params, "count", 1000)
        if start < 0 or count < 0:
            raise validation_error(21000, ("from" if start < 0 else "count", "Må være større enn eller lik 0."))
        if count > MAX_COUNT:
            raise TripletexApiError(422, 23000, "Result Set Too Large",
                                    f"count={count} exceeds the maximum result set size of {MAX_COUNT}.")
        selection = parse_fields(params.get("fields"))
        nodes = self._apply_paging_mutations(path, caller, sort_nodes(nodes, params.get("sorting")), phantom)
        rendered = [render(node, selection) for node in nodes]
        page = rendered[start:start + count]
        digest = hashlib.sha256(json_bytes(rendered)).hexdigest()[:20]
        return json_response({
            "fullResultSize": len(rendered),
            "from": start,
            "count": len(page),
            "versionDigest": digest,  # a string even when empty: the spec says non-nullable
            "values": page,
        })

    def _apply_paging_mutations(self, path: str, caller: Caller | None, nodes: list[Node],
                                phantom: Callable[[], Node] | None) -> list[Node]:
        tenant_id = caller.company_id if caller else None
        with self.state.lock:  # a phantom client is also a real client from now on: moved, not repeated
            return apply_paging_mutations(self.state.paging_mutations, path, tenant_id, nodes, phantom=phantom,
                                          identity=lambda node: node.data.get("id"))

    def _single(self, node: Node, request: Request) -> Response:
        return json_response({"value": render(node, parse_fields(request.query_params.get("fields")))})

    # ------------------------------------------------------------------ endpoints: token/session
    async def session_create_post(self, request: Request) -> Response:
        try:
            body = json.loads(await request.body() or b"null")
        except ValueError as exc:
            raise TripletexApiError(422, 22000, "Invalid JSON", f"Request body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise TripletexApiError(422, 22000, "Invalid JSON", "Expected a JSON object (PostSessionTokenBody).")
        session = self._create_session(body, field_prefix="")
        return json_response({"value": self._session_node(request, session)}, 201)

    async def session_create_put(self, request: Request) -> Response:
        # legacy: query parameters, 200 (NOTES §2.2, pitfall 3)
        session = self._create_session(dict(request.query_params), field_prefix="arg:")
        return json_response({"value": self._session_node(request, session)}, 200)

    def _create_session(self, given: dict[str, Any], *, field_prefix: str) -> Session:
        problems: list[tuple[str, str]] = []
        consumer = given.get("consumerToken")
        employee = given.get("employeeToken")
        expiration_text = given.get("expirationDate")
        if not consumer or consumer != self.state.consumer_token:
            problems.append((field_prefix + "consumerToken", "The consumer token is invalid or does not exist."))
        key = self.state.keys.get(employee) if isinstance(employee, str) else None
        if key is None:
            problems.append((field_prefix + "employeeToken", "The employee token is invalid or does not exist."))
        expiration = _parse_date(expiration_text) if isinstance(expiration_text, str) else None
        if expiration is None:
            problems.append((field_prefix + "expirationDate", "Må være en gyldig dato (YYYY-MM-DD)."))
        elif expiration <= self.current_date():
            problems.append((field_prefix + "expirationDate", "The expiration date must be in the future."))
        if problems:
            raise validation_error(18000, *problems)
        with self.state.lock:
            session = Session(next(self.state.session_ids), secrets.token_urlsafe(32), key, expiration)
            self.state.sessions[session.token] = session
        return session

    def _session_node(self, request: Request, session: Session) -> dict[str, Any]:
        base = self._base(request)
        return {
            "id": session.id,
            "version": 0,
            "url": f"{base}/token/session/{session.id}",
            "consumerToken": {"id": 11, "url": f"{base}/token/consumer/11"},
            "employeeToken": {"id": session.key.id, "url": f"{base}/token/employee/{session.key.id}"},
            "expirationDate": session.expiration_date.isoformat(),
            "token": session.token,
        }

    async def session_delete(self, request: Request) -> Response:
        caller = self._authenticate(request)
        token = request.path_params["token"]
        with self.state.lock:
            if token != caller.session.token or self.state.sessions.pop(token, None) is None:
                raise TripletexApiError(404, 6000, "Object not found", "No such session token.")
        return Response(status_code=204)

    async def who_am_i(self, request: Request) -> Response:
        caller = self._authenticate(request, firm_allowed=True)
        key = caller.session.key
        base = self._base(request)
        employee_name = ("Regnskapsfører", "Fjellvik") if key.accountant else ("Daglig", "Leder")
        employee = Node("Employee", {
            "id": key.employee_id,
            "version": 1,
            "url": f"{base}/employee/{key.employee_id}",
            "firstName": employee_name[0],
            "lastName": employee_name[1],
            "displayName": " ".join(employee_name),
            "companyId": key.company_id,
        })
        info = Node("LoggedInUserInfo", {
            "employeeId": key.employee_id,
            "actualEmployeeId": key.employee_id,
            "employee": employee,
            "companyId": caller.identity_id,
            "company": self._company_node(request, caller.identity_id),
            "language": "NO",
            "loggedInWithConnect": False,
            "employeeIsProxy": key.accountant and not caller.firm_context,
        })
        return self._single(info, request)

    # ------------------------------------------------------------------ endpoints: company
    async def with_login_access(self, request: Request) -> Response:
        caller = self._authenticate(request, firm_allowed=True)
        with self.state.lock:
            if caller.firm_context:
                ids = sorted(cid for cid, access in self.state.access.items() if access.login_access)
            else:
                ids = []  # a company's own key reaches no clients
        nodes = [self._company_node(request, cid, "Client") for cid in ids]

        def phantom() -> Node:
            return self._company_node(request, self.add_client().erp_client_id, "Client")

        return self._list_response(request, "/company/>withLoginAccess", nodes, None,
                                   phantom if caller.firm_context else None)

    async def company_get(self, request: Request) -> Response:
        caller = self._authenticate(request)
        company_id = _path_int(request, "id")
        if company_id in (caller.company_id, caller.identity_id):
            return self._single(self._company_node(request, caller.identity_id), request)
        if company_id == FIRM_ID or company_id in self.state.tenants:
            raise forbidden(f"Company {company_id} is not the company you are logged in as.")
        raise TripletexApiError(404, 6000, "Object not found", f"Company {company_id} not found.")

    # ------------------------------------------------------------------ endpoints: ledger
    async def account_search(self, request: Request) -> Response:
        caller = self._authenticate(request)
        params = request.query_params
        nodes = self._accounts(request, caller.tenant)
        filters: list[Callable[[Node], bool]] = []
        if params.get("id"):
            ids = _int_list(params, "id")
            filters.append(lambda n: n.data["id"] in ids)
        if params.get("number"):
            numbers = _int_list(params, "number")
            filters.append(lambda n: n.data["number"] in numbers)
        for name in ("isInactive", "isBankAccount", "isApplicableForSupplierInvoice"):
            wanted = _bool_param(params, name)
            if wanted is not None:
                filters.append(lambda n, name=name, wanted=wanted: n.data[name] == wanted)
        balance = _bool_param(params, "isBalanceAccount")
        if balance is not None:
            filters.append(lambda n: (n.data["number"] < 3000) == balance)
        if params.get("saftCode"):
            filters.append(lambda n: n.data["saftCode"] == params["saftCode"])
        if params.get("ledgerType"):
            filters.append(lambda n: n.data["ledgerType"] == params["ledgerType"])
        nodes = [n for n in nodes if all(f(n) for f in filters)]

        def phantom() -> Node:
            return self._account_node(request, caller.tenant, 1000, "Forskning og utvikling", "ASSETS")

        return self._list_response(request, "/ledger/account", nodes, caller, phantom)

    async def account_get(self, request: Request) -> Response:
        caller = self._authenticate(request)
        account_id = _path_int(request, "id")
        for node in self._accounts(request, caller.tenant):
            if node.data["id"] == account_id:
                return self._single(node, request)
        raise TripletexApiError(404, 6000, "Object not found", f"Account {account_id} not found.")

    async def balance_sheet(self, request: Request) -> Response:
        caller = self._authenticate(request)
        params = request.query_params
        date_from, date_to = _date_window(params)
        number_from = _int_param(params, "accountNumberFrom", None)
        number_to = _int_param(params, "accountNumberTo", None)  # exclusive
        with_unmoved = _bool_param(params, "includeActiveAccountsWithoutMovements") or False
        tenant = caller.tenant
        window = balance_window(tenant, date_from, date_to, self._postings(tenant))
        accounts = {n.data["number"]: n for n in self._accounts(request, tenant)}
        rows: list[Node] = []
        for number, (opening, movement) in sorted(window.items()):
            if number_from is not None and number < number_from:
                continue
            if number_to is not None and number >= number_to:
                continue
            if movement == 0 and not with_unmoved:
                continue
            rows.append(self._balance_row(accounts[number], opening, movement, date_from, date_to))

        def phantom() -> Node:
            account = self._account_node(request, tenant, 1000, "Forskning og utvikling", "ASSETS")
            return self._balance_row(account, 0, 0, date_from, date_to)

        return self._list_response(request, "/balanceSheet", rows, caller, phantom)

    async def ledger_search(self, request: Request) -> Response:
        """The general ledger per account: the accounts with postings in [dateFrom, dateTo), with
        opening balance, sum and closing balance (NOTES §3.3)."""
        caller = self._authenticate(request)
        params = request.query_params
        date_from, date_to = _date_window(params)
        account_id = _int_param(params, "accountId", None)
        tenant = caller.tenant
        with self.state.lock:
            skews = list(self.state.ledger_skews.get(tenant.erp_client_id, ()))
        postings = self._postings(tenant)
        if skews:
            postings = tuple(sorted(postings + tuple(skews), key=lambda line: line[0]))
        posted = {number for day, number, _, _ in postings if date_from <= day < date_to}
        window = balance_window(tenant, date_from, date_to, postings)
        accounts = {n.data["number"]: n for n in self._accounts(request, tenant)}
        rows = [self._ledger_row(request, accounts[number], opening, movement)
                for number, (opening, movement) in sorted(window.items())
                if number in posted and (account_id is None or accounts[number].data["id"] == account_id)]

        def phantom() -> Node:
            account = self._account_node(request, tenant, 1000, "Forskning og utvikling", "ASSETS")
            return self._ledger_row(request, account, 0, 0)

        return self._list_response(request, "/ledger", rows, caller, phantom)

    def _ledger_row(self, request: Request, account: Node, opening: int, movement: int) -> Node:
        base = self._base(request)
        amounts = {"openingBalance": kroner(opening), "sumAmount": kroner(movement),
                   "closingBalance": kroner(opening + movement)}
        return Node("LedgerAccount", {
            "account": account,
            **amounts,
            **{f"{name}Currency": amount for name, amount in amounts.items()},  # NOK accounts: the same
            "balanceOutInAccountCurrency": amounts["closingBalance"],
            "currency": Node("Currency", {"id": 1, "url": f"{base}/currency/1", "code": "NOK"}),
        })

    def _postings(self, tenant: TruthTenant) -> tuple[Posting, ...]:
        cached = self._postings_cache.get(tenant.erp_client_id)
        if cached is None or cached[0] is not tenant:
            cached = self._postings_cache[tenant.erp_client_id] = (tenant, postings_of(tenant))
        return cached[1]

    @staticmethod
    def _balance_row(account: Node, opening: int, movement: int, date_from: dt.date, date_to: dt.date) -> Node:
        return Node("BalanceSheetAccount", {
            "account": account,
            "balanceIn": kroner(opening),
            "balanceChange": kroner(movement),
            "balanceOut": kroner(opening + movement),
            "startDate": date_from.isoformat(),
            "endDate": date_to.isoformat(),
        })

    # ------------------------------------------------------------------ routing and errors
    def _api_routes(self) -> list[Route]:
        return [
            Route("/token/session/:create", self.session_create_post, methods=["POST"]),
            Route("/token/session/:create", self.session_create_put, methods=["PUT"]),
            Route("/token/session/>whoAmI", self.who_am_i, methods=["GET"]),
            Route("/token/session/{token}", self.session_delete, methods=["DELETE"]),
            Route("/company/>withLoginAccess", self.with_login_access, methods=["GET"]),
            Route("/company/{id}", self.company_get, methods=["GET"]),
            Route("/ledger/account", self.account_search, methods=["GET"]),
            Route("/ledger/account/{id}", self.account_get, methods=["GET"]),
            Route("/balanceSheet", self.balance_sheet, methods=["GET"]),
            Route("/ledger", self.ledger_search, methods=["GET"]),
        ]

    async def _api_error_response(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, TripletexApiError)
        return json_response(exc.body(request_id_of(request.scope)), exc.status)

    async def _http_error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if not request.url.path.startswith(API_PREFIX):
            return json_response({"error": exc.detail}, exc.status_code)
        if exc.status_code == 404:
            error = TripletexApiError(404, 6000, "Object not found", f"No endpoint {request.url.path}")
        elif exc.status_code == 405:
            error = TripletexApiError(405, 4000, "Method Not Allowed",
                                      f"{request.method} is not supported on {request.url.path}")
        else:
            error = TripletexApiError(exc.status_code, 4000, str(exc.detail))
        return json_response(error.body(request_id_of(request.scope)), error.status)

    # ------------------------------------------------------------------ admin (HTTP)
    def _admin_routes(self) -> list[Route]:
        def client_action(action: Callable[[int, dict[str, Any]], Any]):
            return client_admin_endpoint(action, lambda client_id: next(
                c for c in self.client_states() if c["id"] == client_id))

        async def list_clients(request: Request) -> Response:
            return json_response(self.client_states())

        async def create_client(request: Request) -> Response:
            body = json.loads(await request.body() or b"{}")
            allowed = {"name", "org_number", "company_type", "login_access", "api_access"}
            if not isinstance(body, dict) or set(body) - allowed:
                return json_response({"error": f"allowed keys: {sorted(allowed)}"}, 400)
            tenant = self.add_client(**body)
            return json_response(next(c for c in self.client_states() if c["id"] == tenant.erp_client_id), 201)

        async def expire_sessions(request: Request) -> Response:
            return json_response({"expired": self.expire_all_sessions()})

        async def add_paging_mutation(request: Request) -> Response:
            try:
                body = json.loads(await request.body() or b"{}")
                mutation = self.mutate_during_paging(**body)
            except (ValueError, TypeError) as exc:
                return json_response({"error": str(exc)}, 400)
            return json_response(mutation.to_json(), 201)

        async def clear_paging_mutations(request: Request) -> Response:
            self.clear_paging_mutations()
            return json_response({"paging_mutations": 0})

        async def set_today(request: Request) -> Response:
            body = json.loads(await request.body() or b"{}")
            self.today = _parse_date(body["today"]) if body.get("today") else None
            return json_response({"today": self.current_date().isoformat()})

        return [
            Route("/clients", list_clients, methods=["GET"]),
            Route("/clients", create_client, methods=["POST"]),
            Route("/clients/{id}/grant", client_action(lambda cid, body: self.grant_client_access(cid)),
                  methods=["POST"]),
            Route("/clients/{id}/revoke", client_action(lambda cid, body: self.revoke_client_access(cid)),
                  methods=["POST"]),
            Route("/clients/{id}/api-access",
                  client_action(lambda cid, body: self.set_api_access(cid, _require_bool(body, "enabled"))),
                  methods=["PUT"]),
            Route("/clients/{id}/impersonate",
                  client_action(lambda cid, body: self.impersonate(cid, _require_int(body, "as"))), methods=["PUT"]),
            Route("/clients/{id}/impersonate", client_action(lambda cid, body: self.stop_impersonating(cid)),
                  methods=["DELETE"]),
            Route("/clients/{id}/ledger-skew", client_action(lambda cid, body: self.skew_ledger(
                      cid, _require_int(body, "account", "an account number"), _require_int(body, "amount_ore", "øre"),
                      _require_date(body, "date"))), methods=["POST"]),
            Route("/clients/{id}/ledger-skew", client_action(lambda cid, body: self.clear_ledger_skews(cid)),
                  methods=["DELETE"]),
            Route("/sessions/expire", expire_sessions, methods=["POST"]),
            Route("/paging-mutations", add_paging_mutation, methods=["POST"]),
            Route("/paging-mutations", clear_paging_mutations, methods=["DELETE"]),
            Route("/today", set_today, methods=["PUT"]),
        ]


PAGED_PATHS = {"/ledger/account", "/balanceSheet", "/ledger", "/company/>withLoginAccess"}
ADMIN_BASE = f"{ADMIN_PREFIX}/{TripletexSandbox.erp}"


# ---------------------------------------------------------------------------------------- balances


Posting = tuple[dt.date, int, int, bool]  # (date, account number, øre, is profit-and-loss)


def postings_of(tenant: TruthTenant) -> tuple[Posting, ...]:
    """Every voucher line of a tenant, ordered by date."""
    pnl = {a.number for a in tenant.accounts if a.is_profit_and_loss}
    lines = [(v.date, n, amount, n in pnl) for v in tenant.vouchers for n, amount in v.lines]
    return tuple(sorted(lines, key=lambda line: line[0]))


def balance_window(tenant: TruthTenant, date_from: dt.date, date_to: dt.date,
                   postings: tuple[Posting, ...] | None = None) -> dict[int, tuple[int, int]]:
    """Per account: (opening at `date_from`, movement in [date_from, date_to)) in øre.

    Opening follows the ledger's rule: profit-and-loss accounts start each year at zero and earlier
    years' results are part of 2050's opening. The movement is the sum of postings in the window,
    so a window across new year keeps the P&L movement of both years."""
    year_start = dt.date(date_from.year, 1, 1)
    opening = {a.number: 0 for a in tenant.accounts}
    movement = dict(opening)
    for day, number, amount, is_pnl in postings if postings is not None else postings_of(tenant):
        if day >= date_to:
            break
        if day >= date_from:
            movement[number] += amount
        elif is_pnl and day < year_start:
            opening[RETAINED_EARNINGS_ACCOUNT] += amount
        else:
            opening[number] += amount
    return {n: (opening[n], movement[n]) for n in opening}


# ---------------------------------------------------------------------------------------- parameters


def _date_window(params) -> tuple[dt.date, dt.date]:
    """The required `dateFrom` (inclusive) and `dateTo` (exclusive) of a period query."""
    missing = [(name, "Kan ikke være null.") for name in ("dateFrom", "dateTo") if not params.get(name)]
    if missing:
        raise validation_error(21000, *missing)
    date_from, date_to = _parse_date(params["dateFrom"]), _parse_date(params["dateTo"])
    if date_from is None or date_to is None:
        bad = "dateFrom" if date_from is None else "dateTo"
        raise validation_error(21000, (bad, "Må være en gyldig dato (YYYY-MM-DD)."))
    if date_to <= date_from:
        raise validation_error(18000, ("dateTo", "dateTo is exclusive and must be after dateFrom."))
    return date_from, date_to


def _parse_date(text: str | None) -> dt.date | None:
    try:
        return dt.date.fromisoformat(text) if text and len(text) == 10 else None
    except ValueError:
        return None


def _int_param(params, name: str, default: int | None) -> int | None:
    raw = params.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise validation_error(21000, (name, f"Ugyldig heltall: {raw}")) from None


def _int_list(params, name: str) -> set[int]:
    try:
        return {int(part) for part in params[name].split(",") if part.strip()}
    except ValueError:
        raise validation_error(21000, (name, f"Ugyldig liste av heltall: {params[name]}")) from None


def _bool_param(params, name: str) -> bool | None:
    raw = params.get(name)
    if raw is None or raw == "":
        return None
    if raw.lower() in ("true", "false"):
        return raw.lower() == "true"
    raise validation_error(21000, (name, f"Ugyldig boolsk verdi: {raw}"))


def _path_int(request: Request, name: str) -> int:
    raw = request.path_params[name]
    try:
        return int(raw)
    except ValueError:
        raise TripletexApiError(400, 12000, "Illegal path parameter", f"{name}={raw} is not a number") from None


def _require_int(body: dict[str, Any], name: str, what: str = "a client id") -> int:
    if not isinstance(body.get(name), int) or isinstance(body.get(name), bool):
        raise TypeError(f"body needs {name!r}: {what}")
    return body[name]


def _require_date(body: dict[str, Any], name: str) -> dt.date:
    day = _parse_date(body.get(name)) if isinstance(body.get(name), str) else None
    if day is None:
        raise TypeError(f"body needs {name!r}: a date YYYY-MM-DD")
    return day


def _require_bool(body: dict[str, Any], name: str) -> bool:
    if not isinstance(body.get(name), bool):
        raise TypeError(f"body needs {name!r}: true|false")
    return body[name]

