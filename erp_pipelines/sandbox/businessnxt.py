"""Visma Business NXT simulator: the truth ledger served through Business NXT's GraphQL API.

Built from the same SDL the connector's queries are validated against (`specs/businessnxt/schema.graphql`):
graphql-core parses, validates and executes every request against it (`kit.graphql.execute_graphql`),
so a query the schema does not allow is refused here as the server would refuse it.

- Visma Connect client credentials at `/connect/token` (its own host, served at the root): form
  `grant_type=client_credentials`, `client_id`, `client_secret`, a Business NXT service scope,
  optional `tenant_id` (the customer tenant). One token serves every company of the customer.
- `POST /api/graphql-service` (NOTES §1) with `{"query", "variables"}`. A missing, unknown or expired
  token, or a service user not registered in Business NXT, gets 401 as an nginx HTML page (NOTES §8).
  Everything else answers 200 with GraphQL JSON: `errors[]` for refusals, next to `data` (`useCompany: null`).
- `availableCompanies` (no pageInfo), `useCompany(no:)` with `companyInformation`,
  `generalLedgerAccount` (cursor paged, opaque cursors, `totalCount`) and `generalLedgerTransaction`
  (one row per posting line; with `groupBy` one row per account with `aggregates`, not pageable).
- Limits per token (NOTES §7): 600 requests a minute and (stricter than per company) 60 in flight.

Every request names its company in the body, not the URL. So that fault rules, statistics and
chaos triggers can scope by tenant and table as with a REST API, `prepare_request` reads the body
first and files the request under a virtual path named after the table it reads
(`/api/graphql-service/generalLedgerAccount`, ...) with the company number as its tenant.

Usage in tests::

    sandbox = BusinessNxtSandbox(generate_ledger(5))
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=sandbox.app), base_url="http://bnxt.test")
    sandbox.deny_access(sandbox.ledger.tenants[1])   # its general-ledger reads now get access errors
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import functools
import json
import secrets
import threading
import time
from collections.abc import Callable
from decimal import Decimal
from typing import Any
from urllib.parse import parse_qsl

from graphql import FieldNode, GraphQLError, IntValueNode, OperationDefinitionNode, VariableNode, parse
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Message, Receive, Scope

from erp_pipelines.erps.kit.graphql import QueryBook, execute_graphql
from erp_pipelines.sandbox.common import (
    AccessToken,
    ErpProfile,
    PagingMutation,
    RateLimitPolicy,
    SandboxHarness,
    apply_paging_mutations,
    bearer_token,
    expire_all,
    header_value,
    json_bytes,
    json_response,
    request_facts,
)
from erp_pipelines.sandbox.ledger import TruthAccount, TruthLedger, TruthTenant
from erp_pipelines.sandbox.simulator import ApiPaths, Simulator

API_PREFIX = "/api/graphql-service"  # the service endpoint (NOTES §1)
TOKEN_PATH = "/connect/token"
SCOPES = ("business-graphql-service-api:access-group-based-readonly",
          "business-graphql-service-api:access-group-based")
DEFAULT_CLIENT_ID = "isv_erp_pipelines_bnxt_sandbox"  # sandbox only
DEFAULT_CLIENT_SECRET = "sandbox-bnxt-connect-secret-3c9a51f7"  # sandbox only
CUSTOMER_TENANT_ID = "a6c0f2d4-5b1e-4c8e-9f3a-7d2b1e0c4f68"  # sandbox only
CUSTOMER_NO = 1_368_910
TOKEN_LIFETIME = 3600  # UNCONFIRMED
DEFAULT_RATE_LIMIT = RateLimitPolicy(limit=600, window_seconds=60, max_in_flight=60)
MAX_PAGE = 1000  # UNCONFIRMED maximum of `first` (NOTES §6)
PHANTOM_ACCOUNT = TruthAccount(1000, "Forskning og utvikling", "ASSETS")  # what a mid-paging insert adds
UNAUTHORIZED_PAGE = (  # NOTES §8
    "<html>\r\n<head><title>401 Authorization Required</title></head>\r\n<body>\r\n"
    "<center><h1>401 Authorization Required</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n"
)
TABLES = ("companyInformation", "generalLedgerAccount", "generalLedgerTransaction")


def company_no_of(tenant: TruthTenant) -> int:
    """The tenant's Visma.net company id (what `useCompany(no:)` takes)."""
    return 4_700_000 + tenant.erp_client_id


def yyyymmdd(day: dt.date) -> int:
    return day.year * 10_000 + day.month * 100 + day.day


@dataclasses.dataclass
class Company:
    tenant: TruthTenant
    no: int
    access: bool = True  # False: the service user has no access to the company (revoked)
    ledger_rights: bool = True  # False: its access group lost read access to the general ledger
    impersonate_as: int | None = None  # fault: answer with this other company's data


class BusinessNxtSandbox(Simulator):
    erp = "businessnxt"
    api_prefix = API_PREFIX
    paths = ApiPaths(clients="/availableCompanies", accounts="/generalLedgerAccount",
                     balances="/generalLedgerTransaction", identity="/companyInformation",
                     phantom_account=str(PHANTOM_ACCOUNT.number), paged_client_list=False)
    default_rate_limit = DEFAULT_RATE_LIMIT
    contract_rate_limit = DEFAULT_RATE_LIMIT
    revoke_fix = "registered in Business NXT with access to the company"
    deny_access_fix = "read access to the general ledger"
    required_balance_field = "data.useCompany.generalLedgerTransaction.items.*.aggregates"

    def __init__(self, ledger: TruthLedger, *, rate_limit: RateLimitPolicy | None = None, fault_seed: int = 0,
                 client_id: str = DEFAULT_CLIENT_ID, client_secret: str = DEFAULT_CLIENT_SECRET,
                 token_lifetime: int = TOKEN_LIFETIME) -> None:
        self.ledger = ledger
        self.client_id, self.client_secret, self.token_lifetime = client_id, client_secret, token_lifetime
        self.schema = QueryBook(self.erp).schema  # the SDL the connector's queries are validated against
        self.clock: Callable[[], float] = time.monotonic  # token expiry; replace in tests
        self.tokens_minted = 0
        self.service_user_registered = True  # False: Business NXT answers every token with 401
        self.queries: list[dict[str, Any]] = []  # every request body executed (tests read the variables)
        self._lock = threading.RLock()
        self._companies = {c.no: c for c in (Company(t, company_no_of(t)) for t in ledger.tenants)}
        self._tokens: dict[str, AccessToken] = {}
        self._mutations: list[PagingMutation] = []
        self._postings: dict[int, tuple[dict[str, Any], ...]] = {}
        profile = ErpProfile(name=self.erp, api_prefix=API_PREFIX, error_body=self._error_body,
                             credential_key=self._credential_key, tenant_of=self._tenant_of,
                             prepare_request=self.prepare_request)
        self.harness = SandboxHarness(profile, rate_limit=rate_limit or dataclasses.replace(DEFAULT_RATE_LIMIT),
                                      fault_seed=fault_seed)
        routes = [Route(f"/{name}", self.graphql, methods=["POST"]) for name in ("availableCompanies", *TABLES)]
        inner = self.harness.build_app([*routes, Route("/", self.graphql, methods=["POST"]),
                                        Route("/{other}", self.graphql, methods=["POST"])])
        inner.routes.insert(0, Route(TOKEN_PATH, self.token, methods=["POST"]))  # Visma Connect's own host
        self.app = _Prepared(inner, self.prepare_request)

    # ------------------------------------------------------------------ simulator hooks

    def company(self, tenant: TruthTenant) -> Company:
        return self._companies[company_no_of(tenant)]

    def environment(self, url: str) -> dict[str, str]:
        return {
            "BUSINESSNXT_BASE_URL": url,
            "VISMA_CONNECT_URL": url.removesuffix(API_PREFIX),
            "BUSINESSNXT_CLIENT_ID": self.client_id,
            "BUSINESSNXT_CLIENT_SECRET": self.client_secret,
            "BUSINESSNXT_TENANT_ID": CUSTOMER_TENANT_ID,
        }

    def credential_lines(self) -> list[str]:
        return [
            f"token URL:     <root>{TOKEN_PATH} (form: client_id, client_secret, scope={SCOPES[0]}, tenant_id)",
            f"client id:     {self.client_id}",
            f"client secret: {self.client_secret}",
            f"tenant id:     {CUSTOMER_TENANT_ID}  (the customer)",
            f"GraphQL:       POST {API_PREFIX}; companies {', '.join(str(c) for c in self._companies)}",
        ]

    def wrong_credential(self, environment: dict[str, str]) -> tuple[dict[str, str], str]:
        return {**environment, "BUSINESSNXT_CLIENT_SECRET": "not-the-secret-" + "0" * 16}, "BUSINESSNXT_CLIENT_SECRET"

    def prepare_demo(self) -> None:
        if len(self.ledger.tenants) > 5:  # one company whose service user lost its ledger rights
            self.deny_access(self.ledger.tenants[5])

    def scope_of(self, tenant: TruthTenant) -> str:
        return str(company_no_of(tenant))

    def deny_access(self, tenant: TruthTenant) -> None:
        """The service user's access group loses read access to the general ledger: the company is
        still listed and describable, its ledger tables answer with an access error."""
        with self._lock:
            self.company(tenant).ledger_rights = False

    def revoke(self, tenant: TruthTenant) -> None:
        """The service user loses its access to the company: no longer listed, every query refused."""
        with self._lock:
            self.company(tenant).access = False

    def swap_identity(self, tenant: TruthTenant, as_tenant: TruthTenant) -> None:
        with self._lock:
            self.company(tenant).impersonate_as = company_no_of(as_tenant)

    def expire_tokens(self) -> int:
        with self._lock:
            return expire_all(self._tokens, self.clock())

    def mutate_during_paging(self, path: str, action: str = "insert", *, position: int = 0,
                             after_requests: int = 1, tenant: TruthTenant | int | str | None = None) -> PagingMutation:
        table = path.removeprefix(API_PREFIX).strip("/")
        if table not in ("generalLedgerAccount", "generalLedgerTransaction") or action not in ("insert", "remove"):
            raise ValueError("paging mutations insert or remove rows of generalLedgerAccount or generalLedgerTransaction")
        if isinstance(tenant, int) and tenant < 4_700_000:
            tenant = self.ledger.by_client_id(tenant)
        company_no = company_no_of(tenant) if isinstance(tenant, TruthTenant) else \
            int(tenant) if tenant is not None else None
        mutation = PagingMutation(table, action, position, after_requests, company_no)
        with self._lock:
            self._mutations.append(mutation)
        return mutation

    # ------------------------------------------------------------------ request identity (for the harness)

    async def prepare_request(self, scope: Scope, receive: Receive) -> Receive:
        """Read a GraphQL request's body once: its company becomes the request's tenant and the
        table it reads its virtual path (see the module docstring). Returns the body, replayed."""
        facts = request_facts(scope) if scope["type"] == "http" else {}
        if scope["type"] != "http" or scope["path"].rstrip("/") != API_PREFIX or "graphql" in facts:
            return receive
        chunks, more = [], True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        table, company = _target(body)
        facts["graphql"] = {"table": table, "company": company}
        scope["path"] = f"{API_PREFIX}/{table or ''}"
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        return replay

    def _access(self, scope: Scope) -> tuple[str, AccessToken] | None:
        token = bearer_token(header_value(scope, "authorization")) or ""
        access = self._tokens.get(token)
        return (token, access) if access else None

    def _credential_key(self, scope: Scope) -> str | None:
        """The limits are per token (NOTES §7)."""
        access = self._access(scope)
        return f"token:{access[0][:12]}" if access else None

    def _tenant_of(self, scope: Scope) -> str | None:
        company = request_facts(scope).get("graphql", {}).get("company")
        return None if company is None else str(company)

    def _error_body(self, status: int, message: str, request_id: str) -> bytes:
        return json_bytes({"message": message})  # the gateway's error body is UNCONFIRMED (NOTES §8)

    # ------------------------------------------------------------------ token endpoint (Visma Connect)

    async def token(self, request: Request) -> Response:
        form = dict(parse_qsl((await request.body()).decode("utf-8", "replace")))

        def refused(error: str, description: str) -> Response:
            return json_response({"error": error, "error_description": description}, 400,
                                 {"Cache-Control": "no-store"})

        if form.get("grant_type") != "client_credentials":
            return refused("unsupported_grant_type", "Only client_credentials is supported here.")
        if (form.get("client_id"), form.get("client_secret")) != (self.client_id, self.client_secret):
            return refused("invalid_client", "Invalid client or client credentials.")
        if not set(form.get("scope", "").split()) & set(SCOPES):
            return refused("invalid_scope", "A Business NXT GraphQL service scope is required.")
        if form.get("tenant_id") not in (None, CUSTOMER_TENANT_ID):
            return refused("invalid_tenant", "The tenant has not approved this application.")
        with self._lock:
            token = secrets.token_urlsafe(32)
            self._tokens[token] = AccessToken(self.client_id, self.clock() + self.token_lifetime)
            self.tokens_minted += 1
        body = {"access_token": token, "expires_in": self.token_lifetime, "token_type": "Bearer", "scope": SCOPES[0]}
        return json_response(body, headers={"Cache-Control": "no-store"})

    # ------------------------------------------------------------------ the GraphQL endpoint

    async def graphql(self, request: Request) -> Response:
        with self._lock:
            access = self._access(request.scope)
            if access is None or self.clock() >= access[1].expires_at or not self.service_user_registered:
                return Response(UNAUTHORIZED_PAGE, 401, media_type="text/html")
        try:
            body = json.loads(await request.body(), parse_float=Decimal)
        except ValueError:
            return json_response({"errors": [{"message": "The request body is not valid JSON."}]})
        self.queries.append(body if isinstance(body, dict) else {})
        table = request_facts(request.scope).get("graphql", {}).get("table")
        root = {"availableCompanies": self._available_companies,
                "useCompany": functools.partial(self._use_company, table=table)}
        return json_response(execute_graphql(self.schema, body, root_value=root))

    def _available_companies(self, info: Any, customerNo: int | None = None, first: int | None = None,
                             last: int | None = None) -> dict[str, Any]:
        with self._lock:
            # the row under the SDL's own field names, in its order: name, company id, customer id
            fields = list(self.schema.get_type("AvailableCompany").fields)
            items = [dict(zip(fields, (c.tenant.name, c.no, CUSTOMER_NO), strict=True))
                     for c in self._companies.values() if c.access and customerNo in (None, CUSTOMER_NO)]
        total = len(items)
        if first is not None:
            items = items[:first]
        elif last is not None:
            items = items[-last:] if last else []
        return {"totalCount": total, "items": items}

    def _use_company(self, info: Any, no: int | None = None, *, table: str | None) -> dict[str, Any]:
        with self._lock:
            company = self._companies.get(no)
            if company is None or not company.access:
                raise GraphQLError(f"Access denied: the user has no access to company {no}.")
            answering = self._companies[company.impersonate_as] if company.impersonate_as else company
            ledger_rights = company.ledger_rights

        def guarded(name: str, read: Callable[..., Any]) -> Callable[..., Any]:
            def resolve(info: Any, **args: Any) -> Any:
                if not ledger_rights and name != "companyInformation":
                    raise GraphQLError(f"Access denied: no read access to table {name}.")
                return read(answering, no, **args)
            return resolve

        return {"companyInformation": guarded("companyInformation", self._company_information),
                "generalLedgerAccount": guarded("generalLedgerAccount", self._accounts),
                "generalLedgerTransaction": guarded("generalLedgerTransaction", self._transactions)}

    # ------------------------------------------------------------------ tables

    def _company_information(self, company: Company, asked_no: int, first: int | None = None,
                             after: str | None = None) -> dict[str, Any]:
        tenant = company.tenant
        row = {"name": tenant.name, "organisationNo": tenant.org_number}
        return {"totalCount": 1, "pageInfo": _page_info(False, 0, 1), "items": [row][:first or 1]}

    def _accounts(self, company: Company, asked_no: int, **args: Any) -> dict[str, Any]:
        rows = [{"accountNo": a.number, "name": a.name} for a in sorted(company.tenant.accounts, key=lambda a: a.number)]
        rows = self._mutated("generalLedgerAccount", asked_no, rows,
                             lambda: {"accountNo": PHANTOM_ACCOUNT.number, "name": PHANTOM_ACCOUNT.name})
        rows = [row for row in rows if _matches(row, args.get("filter"))]
        return _paged(rows, args)

    def _transactions(self, company: Company, asked_no: int, **args: Any) -> dict[str, Any]:
        with self._lock:
            cached = self._postings.get(company.no)
            if cached is None:
                cached = self._postings[company.no] = postings(company.tenant)
        rows = self._mutated("generalLedgerTransaction", asked_no, list(cached),
                             lambda: {"accountNo": PHANTOM_ACCOUNT.number, "voucherNo": 0,
                                      "voucherDate": yyyymmdd(company.tenant.last_month),
                                      "postedAmountDomestic": Decimal("0.00")})
        rows = [row for row in rows if _matches(row, args.get("filter"))]
        group_by = args.get("groupBy")
        if not group_by:
            return _paged(rows, args)
        if any(args.get(name) is not None for name in ("first", "after", "last", "before", "skip")):
            raise GraphQLError("Pagination is not supported for grouping queries.")  # NOTES §6
        columns = [column for part in group_by for column in part]
        groups: dict[tuple, list[dict[str, Any]]] = {}
        for row in rows:
            groups.setdefault(tuple(row[c] for c in columns), []).append(row)
        items = [{**dict(zip(columns, key, strict=True)),
                  "aggregates": {"sum": {"postedAmountDomestic": sum((r["postedAmountDomestic"] for r in group),
                                                                     Decimal("0.00"))},
                                 "count": {"accountNo": len(group)}}}
                 for key, group in sorted(groups.items())]
        return {"totalCount": len(items), "pageInfo": _page_info(False, 0, len(items)), "items": items}

    def _mutated(self, table: str, company_no: int, rows: list[dict[str, Any]],
                 phantom: Callable[[], dict[str, Any]]) -> list[dict[str, Any]]:
        with self._lock:
            return apply_paging_mutations(self._mutations, table, company_no, rows, phantom=phantom,
                                          new_row_each_request=True)


# ---------------------------------------------------------------------------------------- helpers


class _Prepared:
    """The app behind `prepare_request`: every request's body is read before the harness sees it."""

    def __init__(self, app: Any, prepare: Callable[[Scope, Receive], Any]) -> None:
        self.app, self.prepare = app, prepare
        self.routes = app.routes

    async def __call__(self, scope: Scope, receive: Receive, send: Any) -> None:
        await self.app(scope, await self.prepare(scope, receive), send)


def _target(body: bytes) -> tuple[str | None, int | None]:
    """(the table a request reads, its company number), from its query's first root field."""
    try:
        request = json.loads(body)
        document = parse(request["query"])
    except (ValueError, TypeError, KeyError, GraphQLError):
        return None, None
    variables = request.get("variables") or {}
    operation = next((d for d in document.definitions if isinstance(d, OperationDefinitionNode)), None)
    root = operation.selection_set.selections[0] if operation and operation.selection_set.selections else None
    if not isinstance(root, FieldNode):
        return None, None
    if root.name.value != "useCompany":
        return root.name.value, None
    company = None
    for argument in root.arguments:
        if argument.name.value == "no":
            value = argument.value
            company = variables.get(value.name.value) if isinstance(value, VariableNode) else \
                int(value.value) if isinstance(value, IntValueNode) else None
    inner = root.selection_set.selections[0] if root.selection_set and root.selection_set.selections else None
    return (inner.name.value if isinstance(inner, FieldNode) else None), company


def postings(tenant: TruthTenant) -> tuple[dict[str, Any], ...]:
    """One row per voucher line, debit positive, in kroner."""
    return tuple({"accountNo": number, "voucherNo": voucher.number, "voucherDate": yyyymmdd(voucher.date),
                  "postedAmountDomestic": Decimal(ore).scaleb(-2)}
                 for voucher in tenant.vouchers for number, ore in voucher.lines)


def _matches(row: dict[str, Any], expression: dict[str, Any] | None) -> bool:
    """A filter expression ({_and: [...]}, {_or: [...]}, {column: {_gte: ...}}) against one row."""
    if not expression:
        return True
    for key, condition in expression.items():
        if key == "_and" and not all(_matches(row, part) for part in condition or []):
            return False
        if key == "_or" and condition and not any(_matches(row, part) for part in condition):
            return False
        if key in ("_and", "_or") or condition is None:
            continue
        value = row.get(key)
        for operator, operand in condition.items():
            if operand is None:
                continue
            if not _OPERATORS[operator](value, operand):
                return False
    return True


_OPERATORS: dict[str, Callable[[Any, Any], bool]] = {
    "_eq": lambda a, b: a == b, "_not_eq": lambda a, b: a != b, "_gt": lambda a, b: a > b,
    "_gte": lambda a, b: a >= b, "_lt": lambda a, b: a < b, "_lte": lambda a, b: a <= b,
    "_in": lambda a, b: a in b,
}


def _paged(rows: list[dict[str, Any]], args: dict[str, Any]) -> dict[str, Any]:
    """A forward page (`first`, `after`, `skip`) of `rows`; cursors are opaque offsets."""
    first, after, skip = args.get("first"), args.get("after"), args.get("skip") or 0
    for name, value in (("first", first), ("skip", args.get("skip"))):
        if value is not None and value < 1:
            raise GraphQLError(f"The value of '{name}' must be a positive integer.")
    start = (_offset(after) + 1 if after else 0) + skip
    size = min(first or MAX_PAGE, MAX_PAGE)
    page = rows[start:start + size]
    return {"totalCount": len(rows), "pageInfo": _page_info(start + size < len(rows), start, len(page)),
            "items": page}


def _page_info(more: bool, start: int, count: int) -> dict[str, Any]:
    return {"hasNextPage": more, "hasPreviousPage": start > 0,
            "startCursor": _cursor(start) if count else None, "endCursor": _cursor(start + count - 1) if count else None}


def _cursor(offset: int) -> str:
    return base64.b64encode(f"sandbox:{offset}".encode()).decode()


def _offset(cursor: str) -> int:
    try:
        return int(base64.b64decode(cursor).decode().partition(":")[2])
    except ValueError:
        raise GraphQLError(f"The cursor '{cursor}' is not valid.") from None
