"""Xledger GraphQL API simulator: the truth ledger through Xledger's one GraphQL endpoint.

Built from the same SDL the connector's queries are validated against (`specs/xledger/schema.graphql`):
every request is parsed, validated and executed by graphql-core with the resolvers below. Facts
from `specs/xledger/NOTES.md`:

- `POST /graphql`, `Authorization: token <API token>` (`Bearer` accepted too, NOTES §2); a wrong
  token gets HTTP 401 (UNCONFIRMED);
- the token belongs to the group (konsern) entity and sees it and every entity below it; each
  entity has a company record with its organisation number, and `fiscalYearStartMonth`. One
  tenant (`FISCAL_YEAR_TENANT`) keeps a fiscal year starting in July;
- Relay connections (`first` up to 10 000 / `after` = the last edge's cursor, the row's dbId),
  `pageInfo.hasNextPage`; every row carries `ownerDbId`. Rows are ordered by dbId, which
  interleaves the entities (`owner_filter_ignored` shows what a server that does not narrow by
  owner would send);
- `accountBalances`: one row per account and period with the period's movement; fiscalPeriod 0
  holds each fiscal year's opening balance of the balance sheet (UNCONFIRMED, as the connector);
- errors as HTTP 200 with `errors[].code`: the harness's rate limit (a 429 inside) is answered as
  `BAD_REQUEST.BURST_RATE_LIMIT_REACHED` (or `CONCURRENCY_LIMIT_REACHED` for too many in flight);
  `exhaust_credits` answers `BAD_REQUEST.INSUFFICIENT_CREDITS` with `extensions.resetAt`;
  `answer_with_codes` queues any code; a denied entity's reads get `BAD_REQUEST.ACCESS_DENIED`
  (UNCONFIRMED).

One endpoint serves every query, so fault rules cannot tell the lists apart by path: `paths`
gives each list a different prefix of the endpoint path (each matches every request), which only
`mutate_during_paging` reads. Requests are attributed to an entity by the connector's
`X-Correlation-Id` header (statistics and fault scoping only; the data follows the query).

Usage in tests::

    sandbox = XledgerSandbox(generate_ledger(5))
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=sandbox.app), base_url="http://xledger.test")
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import itertools
import json
import threading
from decimal import Decimal
from typing import Any

from graphql import GraphQLError
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Message, Receive, Scope, Send

from erp_pipelines.erps.kit import QueryBook, execute_graphql
from erp_pipelines.sandbox.common import (
    ErpProfile,
    RateLimitPolicy,
    SandboxHarness,
    header_value,
    json_bytes,
    json_response,
    request_facts,
)
from erp_pipelines.sandbox.ledger import (
    COMPANY_WORDS,
    TRADES,
    TruthAccount,
    TruthLedger,
    TruthTenant,
    make_org_number,
)
from erp_pipelines.sandbox.simulator import ApiPaths, Simulator

API_PREFIX = "/graphql"  # the sandbox's stand-in for https://www.xledger.net/graphql
DEFAULT_TOKEN = "sandbox-xledger-api-token-7d41c9e2"  # sandbox only
GROUP_DB_ID = 500_000
GROUP_NAME = "Fjellkjeden Konsern AS"
FISCAL_YEAR_TENANT = 2  # this valid tenant's fiscal year starts in FISCAL_YEAR_START_MONTH
FISCAL_YEAR_START_MONTH = 7
MAX_FIRST = 10_000  # records per query (NOTES §6)
ROW_STRIDE = 10_000  # row dbIds: (list position) * ROW_STRIDE + entity sequence, so entities interleave
PHANTOM_ACCOUNT = TruthAccount(1000, "Forskning og utvikling", "ASSETS")  # what a mid-paging insert adds
BURST_LIMIT = "BAD_REQUEST.BURST_RATE_LIMIT_REACHED"
CONCURRENCY_LIMIT = "BAD_REQUEST.CONCURRENCY_LIMIT_REACHED"
INSUFFICIENT_CREDITS = "BAD_REQUEST.INSUFFICIENT_CREDITS"
ACCESS_DENIED = "BAD_REQUEST.ACCESS_DENIED"  # UNCONFIRMED
# No figures are published (NOTES §7): a burst window and an in-flight cap the connector's pace stays under.
DEFAULT_RATE_LIMIT = RateLimitPolicy(limit=10, window_seconds=1.0, max_in_flight=4)
ENDPOINT = API_PREFIX
LIST_PATHS = {"entities": ENDPOINT, "accounts": ENDPOINT[:-1], "accountBalances": ENDPOINT[:-2]}


def amount_text(ore: int) -> str:
    return format(Decimal(ore).scaleb(-2), "f")


@dataclasses.dataclass
class Entity:
    db_id: int
    sequence: int  # position among the entities, for interleaved row ids
    name: str
    org_number: str
    parent: int | None
    tenant: TruthTenant | None = None  # None: the group itself (no ledger here)
    fiscal_year_start_month: int = 1
    in_group: bool = True  # False: moved out of the group (revoked)
    access: bool = True  # False: our token may not read its ledger (denied)
    impersonate_as: int | None = None  # fault: answer with this other entity's data and identity


@dataclasses.dataclass
class PagingMutation:
    """Fault: after `after_requests` reads of `list_name` (for `entity`), a row is inserted or removed."""

    list_name: str
    action: str
    position: int
    after_requests: int
    entity: int | None
    seen: int = 0
    applied: bool = False


class XledgerSandbox(Simulator):
    erp = "xledger"
    api_prefix = API_PREFIX
    paths = ApiPaths(clients=LIST_PATHS["entities"], accounts=LIST_PATHS["accounts"],
                     balances=LIST_PATHS["accountBalances"], phantom_account=str(PHANTOM_ACCOUNT.number))
    default_rate_limit = DEFAULT_RATE_LIMIT
    contract_rate_limit = DEFAULT_RATE_LIMIT
    revoke_fix = "still under the group entity"
    deny_access_fix = "General Ledger read scope"
    required_balance_field = "data.accountBalances.edges.*.node.amount"

    @classmethod
    def shape_ledger(cls, ledger: TruthLedger) -> None:
        valid = ledger.valid_tenants
        if len(valid) > FISCAL_YEAR_TENANT:
            valid[FISCAL_YEAR_TENANT].use_fiscal_year_start(FISCAL_YEAR_START_MONTH)

    def __init__(self, ledger: TruthLedger, *, rate_limit: RateLimitPolicy | None = None, fault_seed: int = 0,
                 api_token: str = DEFAULT_TOKEN) -> None:
        self.ledger = ledger
        self.api_token = api_token
        self.schema = QueryBook("xledger").schema
        self._lock = threading.RLock()
        self.shape_ledger(ledger)
        group = Entity(GROUP_DB_ID, 0, GROUP_NAME, make_org_number(GROUP_DB_ID), None)
        self.entities: dict[int, Entity] = {GROUP_DB_ID: group}
        for tenant in ledger.tenants:
            self._add_entity(tenant)
        self.owner_filter_ignored = False  # True: accounts/accountBalances answer every entity's rows
        self.credits_reset_at: str | None = None  # set: every request answers INSUFFICIENT_CREDITS
        self.queued_codes: list[str] = []  # the next requests answer these error codes
        self.partial_answers = 0  # the next requests answer data and an error together
        self.queries: list[dict[str, Any]] = []  # every request body received (query, variables)
        self._mutations: list[PagingMutation] = []
        self._rows: dict[tuple[str, int], list[dict[str, Any]]] = {}
        profile = ErpProfile(name=self.erp, api_prefix=API_PREFIX, error_body=self._error_body,
                             credential_key=self._credential_key, tenant_of=self._tenant_of)
        self.harness = SandboxHarness(profile, rate_limit=rate_limit or dataclasses.replace(DEFAULT_RATE_LIMIT),
                                      fault_seed=fault_seed)
        inner = self.harness.build_app([Route("/", self.graphql, methods=["POST"])])
        self.app = ThrottleAsGraphQLErrors(inner)

    def _add_entity(self, tenant: TruthTenant) -> Entity:
        entity = Entity(GROUP_DB_ID + tenant.erp_client_id, len(self.entities), tenant.name, tenant.org_number,
                        GROUP_DB_ID, tenant, tenant.fiscal_year_start_month)
        self.entities[entity.db_id] = entity
        return entity

    # ------------------------------------------------------------------ simulator hooks

    def entity(self, tenant: TruthTenant) -> Entity:
        return next(e for e in self.entities.values() if e.tenant is tenant)

    def environment(self, url: str) -> dict[str, str]:
        return {"XLEDGER_BASE_URL": url, "XLEDGER_API_TOKEN": self.api_token,
                "XLEDGER_GROUP_ENTITY_ID": str(GROUP_DB_ID)}

    def credential_lines(self) -> list[str]:
        return [f"API token:       {self.api_token}  (header Authorization: token <API token>)",
                f"group entity id: {GROUP_DB_ID}"]

    def wrong_credential(self, environment: dict[str, str]) -> tuple[dict[str, str], str]:
        return {**environment, "XLEDGER_API_TOKEN": "not-the-token-" + "0" * 16}, "XLEDGER_API_TOKEN"

    def prepare_demo(self) -> None:
        if len(self.ledger.tenants) > 5:  # one entity whose ledger our token may not read
            self.deny_access(self.ledger.tenants[5])

    def scope_of(self, tenant: TruthTenant) -> str:
        return str(self.entity(tenant).db_id)

    def deny_access(self, tenant: TruthTenant) -> None:
        with self._lock:
            self.entity(tenant).access = False

    def revoke(self, tenant: TruthTenant) -> None:
        with self._lock:
            self.entity(tenant).in_group = False

    def swap_identity(self, tenant: TruthTenant, as_tenant: TruthTenant) -> None:
        with self._lock:
            self.entity(tenant).impersonate_as = self.entity(as_tenant).db_id

    def expire_tokens(self) -> int:
        return 0  # a static API token does not expire (NOTES §2)

    def exhaust_credits(self, reset_at: str) -> None:
        """The credit pool is spent until `reset_at` (ISO time): every request says so."""
        self.credits_reset_at = reset_at

    def answer_with_codes(self, *codes: str) -> None:
        """The next requests answer HTTP 200 with these error codes, one each."""
        with self._lock:
            self.queued_codes.extend(codes)

    def mutate_during_paging(self, path: str, action: str = "insert", *, position: int = 0,
                             after_requests: int = 1, tenant: TruthTenant | int | str | None = None) -> PagingMutation:
        """`path`: one of `paths` (each list's prefix of the one endpoint) or a list name. Inserted
        rows get the next dbId, so they come last, as new records do."""
        names = {prefix: name for name, prefix in LIST_PATHS.items()}
        name = names.get(path, path)
        if name not in LIST_PATHS or action not in ("insert", "remove"):
            raise ValueError(f"paging mutations insert or remove rows of {list(LIST_PATHS)}")
        if isinstance(tenant, int):
            tenant = self.ledger.by_client_id(tenant)
        entity = self.entity(tenant).db_id if isinstance(tenant, TruthTenant) else (int(tenant) if tenant else None)
        mutation = PagingMutation(name, action, position, after_requests, entity)
        with self._lock:
            self._mutations.append(mutation)
        return mutation

    # ------------------------------------------------------------------ request identity (for the harness)

    def _token_ok(self, scope: Scope) -> bool:
        scheme, _, value = (header_value(scope, "authorization") or "").partition(" ")
        return scheme.lower() in ("token", "bearer") and value.strip() == self.api_token

    def _credential_key(self, scope: Scope) -> str | None:
        return "api-token" if self._token_ok(scope) else None

    @staticmethod
    def _tenant_of(scope: Scope) -> str | None:
        correlation = header_value(scope, "x-correlation-id") or ""
        for part in correlation.split():
            if part.startswith("entity="):
                return part.removeprefix("entity=")
        return None

    @staticmethod
    def _error_body(status: int, message: str, request_id: str) -> bytes:
        return json_bytes({"errors": [{"message": message}]})

    # ------------------------------------------------------------------ the endpoint

    async def graphql(self, request: Request) -> Response:
        if not self._token_ok(request.scope):
            return json_response({"errors": [{"message": "Invalid or missing API token"}]}, 401)  # UNCONFIRMED
        with self._lock:
            if self.credits_reset_at:
                return json_response({"errors": [{"message": "Insufficient credits", "code": INSUFFICIENT_CREDITS,
                                                  "extensions": {"resetAt": self.credits_reset_at}}]})
            if self.queued_codes:
                code = self.queued_codes.pop(0)
                return json_response({"errors": [{"message": "Request refused", "code": code, "extensions": {}}]})
        try:
            body = json.loads(await request.body())
        except ValueError:
            return json_response({"errors": [{"message": "The request body is not JSON"}]}, 400)
        with self._lock:
            self.queries.append(body if isinstance(body, dict) else {})
        result = execute_graphql(self.schema, body, root_value=_Root(self))
        for error in result.get("errors", []):
            code = (error.get("extensions") or {}).get("code")
            if code:
                error["code"] = code  # Xledger puts the code on the error itself (NOTES §8)
        with self._lock:
            if self.partial_answers and result.get("data"):
                self.partial_answers -= 1
                result["errors"] = [{"message": "Timed out while resolving a field"}]
        return json_response(result)

    # ------------------------------------------------------------------ data

    def visible(self) -> list[Entity]:
        """The group and every entity still under it, by dbId."""
        return sorted((e for e in self.entities.values() if e.in_group), key=lambda e: e.db_id)

    def _serving(self, db_id: int | None, list_name: str) -> list[Entity]:
        """Whose rows answer a read narrowed to `db_id` (all visible ones when not narrowed)."""
        entities = {e.db_id: e for e in self.visible()}
        if db_id is None or (self.owner_filter_ignored and list_name != "entities"):
            chosen = [e for e in entities.values() if e.tenant is not None]
        else:
            entity = entities.get(db_id)
            if entity is None:
                return []
            chosen = [entity]
        served = []
        for entity in chosen:
            if not entity.access and list_name != "entities":
                raise GraphQLError(f"No access to entity {entity.db_id}", extensions={"code": ACCESS_DENIED})
            served.append(self.entities.get(entity.impersonate_as, entity) if entity.impersonate_as else entity)
        return served

    def entity_node(self, entity: Entity) -> dict[str, Any]:
        return {
            "dbId": entity.db_id, "code": str(entity.db_id), "description": entity.name,
            "ownerDbId": entity.parent or entity.db_id, "fiscalYearStartMonth": entity.fiscal_year_start_month,
            "parent": {"dbId": entity.parent} if entity.parent else None,
            "company": {"dbId": entity.db_id + 1, "companyNumber": entity.org_number},
            "currency": {"code": "NOK"},
        }

    def account_rows(self, entity: Entity) -> list[dict[str, Any]]:
        assert entity.tenant is not None
        return [self._account_node(entity, rank, account)
                for rank, account in enumerate(sorted(entity.tenant.accounts, key=lambda a: a.number), 1)]

    def _account_node(self, entity: Entity, rank: int, account: TruthAccount) -> dict[str, Any]:
        return {"dbId": rank * ROW_STRIDE + entity.sequence, "code": str(account.number),
                "description": account.name, "ownerDbId": entity.db_id,
                "balanceSheet": not account.is_profit_and_loss}

    def balance_rows(self, entity: Entity) -> list[dict[str, Any]]:
        """Per account and period: the movement; at each fiscal year's start (after the first
        month) an opening row (fiscalPeriod 0) for the balance sheet. Cached per entity."""
        tenant = entity.tenant
        assert tenant is not None
        key = ("balances", entity.db_id)
        if key in self._rows:
            return self._rows[key]
        start = tenant.fiscal_year_start_month
        ranks = {a.number: rank for rank, a in enumerate(sorted(tenant.accounts, key=lambda a: a.number), 1)}
        rows = []
        for index, month in enumerate(tenant.months):
            fiscal_start = dt.date(tenant.fiscal_year_of(month), start, 1)
            fiscal_period = (month.year - fiscal_start.year) * 12 + month.month - fiscal_start.month + 1
            period = {"year": month.year, "monthNumber": month.month, "fiscalYear": fiscal_start.year}
            for balance in tenant.balances(month):
                number = balance.account.number
                position = (index * 2) * 100 + ranks[number]
                if month == fiscal_start and month != tenant.first_month and not balance.account.is_profit_and_loss \
                        and balance.opening:
                    rows.append(self._balance_node(entity, position, number, balance.opening,
                                                   {**period, "fiscalPeriod": 0}))
                if balance.movement:
                    rows.append(self._balance_node(entity, position + 100, number, balance.movement,
                                                   {**period, "fiscalPeriod": fiscal_period}))
        self._rows[key] = sorted(rows, key=lambda row: row["dbId"])
        return self._rows[key]

    def _balance_node(self, entity: Entity, position: int, number: int, ore: int,
                      period: dict[str, Any]) -> dict[str, Any]:
        return {"dbId": position * ROW_STRIDE + entity.sequence, "amount": amount_text(ore),
                "ownerDbId": entity.db_id, "account": {"dbId": number * 1000 + entity.sequence, "code": str(number)},
                "period": period}

    def _mutated(self, list_name: str, db_id: int | None, rows: list[dict[str, Any]],
                 entities: list[Entity]) -> list[dict[str, Any]]:
        with self._lock:
            for mutation in self._mutations:
                if mutation.list_name != list_name or mutation.entity not in (None, db_id):
                    continue
                mutation.seen += 1
                if mutation.seen <= mutation.after_requests:
                    continue
                if list_name == "entities":
                    if mutation.action == "insert" and not mutation.applied:
                        self._new_client()
                    mutation.applied = True
                    rows = [self.entity_node(e) for e in self.visible()]
                elif mutation.action == "remove":
                    rows = rows[:mutation.position] + rows[mutation.position + 1:]
                elif entities and entities[0].tenant is not None:
                    rows = rows + [self._phantom(list_name, entities[0])]
        return rows

    def _phantom(self, list_name: str, entity: Entity) -> dict[str, Any]:
        if list_name == "accounts":
            return self._account_node(entity, 9_000, PHANTOM_ACCOUNT)
        month = entity.tenant.months[-1]
        return self._balance_node(entity, 90_000, PHANTOM_ACCOUNT.number, 0,
                                  {"year": month.year, "monthNumber": month.month, "fiscalYear": month.year,
                                   "fiscalPeriod": 1})

    def _new_client(self) -> TruthTenant:
        """A client entity created under the group (a new company with its own ledger)."""
        tenants = self.ledger.tenants
        index = max(t.index for t in tenants) + 1
        used = {t.org_number for t in tenants}
        number = next(n for n in (make_org_number(index * 7_919 + k) for k in itertools.count()) if n not in used)
        tenant = TruthTenant(
            index=index, erp_client_id=max(t.erp_client_id for t in tenants) + 1, org_number=number,
            name=f"{COMPANY_WORDS[index % len(COMPANY_WORDS)]} {TRADES[index % len(TRADES)]} {index} AS",
            company_type="AS", seed=max(t.seed for t in tenants) + 1, first_month=self.ledger.first_month,
            last_month=self.ledger.last_month, accounts=tenants[0].accounts,
        )
        self.ledger.add_tenant(tenant)
        self._add_entity(tenant)
        return tenant


def _connection(rows: list[dict[str, Any]], first: int | None, after: str | None) -> dict[str, Any]:
    """One Relay page: rows after the cursor (a dbId), at most `first` (capped at 10 000)."""
    start = 0
    if after:
        try:
            cursor = int(after)
        except ValueError:
            raise GraphQLError(f"Invalid cursor {after!r}") from None
        start = next((i for i, row in enumerate(rows) if row["dbId"] > cursor), len(rows))
    size = min(first or MAX_FIRST, MAX_FIRST)
    page = rows[start:start + size]
    edges = [{"cursor": str(row["dbId"]), "node": row} for row in page]
    return {"edges": edges, "pageInfo": {
        "hasNextPage": start + size < len(rows), "hasPreviousPage": start > 0,
        "startCursor": edges[0]["cursor"] if edges else None, "endCursor": edges[-1]["cursor"] if edges else None}}


class _Root:
    """The Query type's resolvers for one request (graphql-core calls them with info and args)."""

    def __init__(self, sandbox: XledgerSandbox) -> None:
        self.sandbox = sandbox

    def entities(self, info, first=None, after=None, last=None, before=None, filter=None):
        sandbox = self.sandbox
        wanted = (filter or {}).get("dbId")
        if wanted is None:
            rows = [sandbox.entity_node(e) for e in sandbox.visible()]
            rows = sandbox._mutated("entities", None, rows, [])
        else:
            rows = [sandbox.entity_node(e) for e in sandbox._serving(int(wanted), "entities")]
        return _connection(rows, first, after)

    def accounts(self, info, first=None, after=None, last=None, before=None, filter=None):
        owner = (filter or {}).get("ownerDbId")
        sandbox = self.sandbox
        entities = sandbox._serving(owner, "accounts")
        rows = sorted((row for e in entities for row in sandbox.account_rows(e)), key=lambda row: row["dbId"])
        return _connection(sandbox._mutated("accounts", owner, rows, entities), first, after)

    def accountBalances(self, info, first=None, after=None, last=None, before=None, filter=None):
        filter = filter or {}
        owner = filter.get("ownerDbId")
        sandbox = self.sandbox
        entities = sandbox._serving(owner, "accountBalances")
        rows = sorted((row for e in entities for row in sandbox.balance_rows(e)
                       if filter.get("year_gte", 0) <= row["period"]["year"] <= filter.get("year_lte", 9999)),
                      key=lambda row: row["dbId"])
        return _connection(sandbox._mutated("accountBalances", owner, rows, entities), first, after)


class ThrottleAsGraphQLErrors:
    """Xledger answers throttling as HTTP 200 with an error code (NOTES §8): a 429 from the shared
    harness (its rate limiter or an injected fault) leaves here as BURST_RATE_LIMIT_REACHED, or
    CONCURRENCY_LIMIT_REACHED when too many requests were in flight. The harness counts the 429.
    It also routes the endpoint path itself (no trailing slash) to the API's one route."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope["path"] == API_PREFIX:  # the endpoint itself is the route below the mount
            scope = {**scope, "path": API_PREFIX + "/", "raw_path": (API_PREFIX + "/").encode()}
        throttled = []

        async def send_as_graphql(message: Message) -> None:
            if message["type"] == "http.response.start" and message["status"] == 429:
                throttled.append(True)
                return
            if message["type"] == "http.response.body" and throttled:
                if message.get("more_body"):
                    return
                reason = request_facts(scope).get("rate_limit_reason")
                code = CONCURRENCY_LIMIT if reason == "too many in flight" else BURST_LIMIT
                body = json_bytes({"errors": [{"message": "Too many requests", "code": code, "extensions": {}}]})
                await send({"type": "http.response.start", "status": 200, "headers": [
                    (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
                return
            await send(message)

        await self.app(scope, receive, send_as_graphql)

