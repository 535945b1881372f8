"""Xledger GraphQL API connector (facts: specs/xledger/NOTES.md; schema and queries: specs/xledger/).

- Auth: a static API token, `Authorization: token <API token>` (NOTES §2).
- Tenants: the token sees its own entity and every sub-entity (NOTES §3). Onboarding gives the
  group (konsern) entity id; the clients are the entities below it, each with its organisation
  number from its company data (`company.companyNumber`).
- Reads, per entity: the chart (`accounts`) and the balances per account and period
  (`accountBalances`), one query file each. Rows of several entities can arrive mixed, so every
  row carries `ownerDbId` and only the entity's own rows are kept. The entity's identity rides in
  the same requests, so the tenant guard costs no request of its own.
- Balances: per-period amounts turned into monthly opening, movement and closing, debit positive,
  profit and loss restarting at the entity's fiscal-year start (`fiscalYearStartMonth`).
- Errors arrive as HTTP 200 with `errors[]` (NOTES §8): the kit's GraphQL body check maps them
  (`classify_error`); throttling codes pause and retry, spent credits stop the credential's run.
- Requests count against a monthly allowance (NOTES §7): a daily refresh costs two requests per
  entity (10 000 rows per page) plus the entity list, and history is never re-read.

Every assumption no primary source confirms is listed in `UNCONFIRMED` below.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Mapping
from decimal import Decimal, InvalidOperation
from typing import Any

import httpx

from erp_pipelines.erps.base import BilingualFix, Connector, Setting, require_fields, stated_org_number
from erp_pipelines.erps.kit import (
    GraphQLCursor,
    QueryBook,
    RateLimit,
    Reply,
    RequestContext,
    RetryPolicy,
    StaticToken,
    error_code,
    graphql_body_check,
    post_query,
    read_all,
)
from erp_pipelines.erps.kit.balances import FIRST_PROFIT_AND_LOSS_ACCOUNT
from erp_pipelines.errors import (
    AuthError,
    BadResponse,
    ClientAccessError,
    ConfigError,
    ErpError,
    QuotaExhausted,
    RateLimited,
    TenantMismatch,
    UpstreamError,
)
from erp_pipelines.model import Account, Balance, Client, add_months, months_between

log = logging.getLogger(__name__)

ERP = "xledger"
QUERIES = QueryBook(ERP)  # specs/xledger/*.graphql, validated against specs/xledger/schema.graphql by the tests

# Every assumption not confirmed by a primary source (NOTES.md), in one place.
UNCONFIRMED = {
    "owner_filter": "`filter: { ownerDbId }` narrows accounts/accountBalances to one entity (NOTES §3); rows "
                    "of other owners are dropped whatever the server sends",
    "entity_filter": "`entities(filter: { dbId })` answers one entity (its identity)",
    "year_filter": "`accountBalances(filter: { year_gte, year_lte })` narrows the periods by calendar year",
    "balance_meaning": "an accountBalances row is one period's movement; fiscalPeriod 0 holds the fiscal "
                       "year's opening balance (NOTES §5)",
    "sign": "amounts are debit positive, credit negative (NOTES §5)",
    "periods": "period.year/monthNumber is the calendar month of the row",
    "profit_and_loss": "without an opening row, accounts 3000 and up (NS 4102) restart at zero each fiscal year",
    "throttle_pause": "seconds to wait after BURST_RATE_LIMIT_REACHED / CONCURRENCY_LIMIT_REACHED (no figure "
                      "is published, NOTES §7)",
    "rate_limit": "requests per second and in flight the API tolerates (NOTES §7)",
    "access_codes": "the error codes of a read the token may not make for an entity",
    "http_401": "a wrong or deleted token gets HTTP 401 (NOTES §8)",
    "reset_at": "INSUFFICIENT_CREDITS carries extensions.resetAt as an ISO time (NOTES §7)",
}

DEFAULT_BASE_URL = "https://www.xledger.net/graphql"
PAGE_SIZE = 10_000  # the documented maximum per query (NOTES §6)
BURST_LIMIT = "BAD_REQUEST.BURST_RATE_LIMIT_REACHED"
CONCURRENCY_LIMIT = "BAD_REQUEST.CONCURRENCY_LIMIT_REACHED"
INSUFFICIENT_CREDITS = "BAD_REQUEST.INSUFFICIENT_CREDITS"
BURST_PAUSE_SECONDS = 1.0  # UNCONFIRMED["throttle_pause"]
CONCURRENCY_PAUSE_SECONDS = 0.5  # UNCONFIRMED["throttle_pause"]
ACCESS_CODES = frozenset({"ACCESS_DENIED", "FORBIDDEN", "NO_ACCESS", "UNAUTHORIZED", "NOT_AUTHORIZED"})  # UNCONFIRMED
CORRELATION_HEADER = "X-Correlation-Id"  # names the query and entity of a request, for support and tracing
MAX_CONFIRMATIONS = 3
# Throttling codes are Xledger's normal answer to a busy credential (NOTES §7): a request may meet a few in
# a row, each waited out, before it is answered, so its attempt budget is larger than the kit's default.
MAX_ATTEMPTS = 8

RATE_LIMIT = RateLimit(
    requests_per_second=5.0, max_in_flight=2,  # UNCONFIRMED["rate_limit"]
    source="credit-based: BURST_RATE_LIMIT_REACHED, CONCURRENCY_LIMIT_REACHED and INSUFFICIENT_CREDITS in "
    "errors[].code of an HTTP 200; no figures published (NOTES §7)",
)

TOKEN_FIX = (
    "check XLEDGER_API_TOKEN: a Domain Administrator generates it in Xledger under Administration → System "
    "Access → GraphQL → API tokens, in the same environment as XLEDGER_BASE_URL (a demo token dies at the "
    "next demo refresh)"
)


def access_fix(entity: str) -> str:
    return (
        f"in Xledger, check that entity {entity} is still under the group entity (XLEDGER_GROUP_ENTITY_ID) and "
        "that our API token has read access to it: its General Ledger read scope (Administration → System "
        "Access → GraphQL → API tokens)"
    )


class XledgerConnector(Connector):
    erp = ERP
    display_name = "Xledger"
    settings = (
        Setting("base_url", "XLEDGER_BASE_URL", default=DEFAULT_BASE_URL,
                description="the GraphQL endpoint (demo: https://demo.xledger.net/graphql)"),
        Setting("api_token", "XLEDGER_API_TOKEN", secret=True,
                description="API token generated in the group entity (Administration → System Access → GraphQL)"),
        Setting("group_entity_id", "XLEDGER_GROUP_ENTITY_ID",
                description="the group (konsern) entity's dbId; its sub-entities are the clients"),
    )
    rate_limit = RATE_LIMIT
    onboarding_fix = BilingualFix(
        norwegian="I Xledger må integrasjonsbrukeren (den som eier API-tokenet) ha rettigheter til denne "
                  "enheten: lesetilgang til hovedbok (Administrasjon → Systemtilgang → GraphQL → API-tokens), og "
                  "enheten må ligge under konsernenheten (XLEDGER_GROUP_ENTITY_ID).",
        english="In Xledger, the integration user (the API token's owner) needs rights to this entity: "
                "General Ledger read access (Administration → System Access → GraphQL → API tokens), and the "
                "entity must be under the group entity (XLEDGER_GROUP_ENTITY_ID).",
    )
    sensor_interval_seconds = 6 * 3600  # the entity list costs requests of the monthly allowance

    def __init__(self, *, base_url: str, api_token: str, group_entity_id: str, **options: Any) -> None:
        super().__init__(base_url=base_url, api_token=api_token, group_entity_id=group_entity_id, **options)
        if not group_entity_id.strip().isdigit():
            raise ConfigError("XLEDGER_GROUP_ENTITY_ID must be the group entity's dbId (digits)", erp=ERP,
                              fix="put the group entity's dbId from onboarding in XLEDGER_GROUP_ENTITY_ID")
        self._group = group_entity_id.strip()
        self._url = base_url.strip()
        self._page_size = self.page_size or PAGE_SIZE
        self._auth = StaticToken(api_token, scheme="token")
        self.retry = self.retry or RetryPolicy(max_attempts=MAX_ATTEMPTS)
        self.api = self.api_client(self._url, api_token, check_body=graphql_body_check(ERP, self.classify_error),
                                   map_error=self._map_http_error)
        self._fiscal_start: dict[str, int] = {}
        self._seen: dict[str, list[tuple[str, str]]] = {}  # entity → identities answered since the last guard
        self.credits_back_at: str | None = None

    # ------------------------------------------------------------------ requests

    async def _post(self, name: str, variables: Mapping[str, Any], *, tenant: str | None,
                    entity: str | None) -> Reply:
        if self.credits_back_at is not None:  # the credential's run has stopped: send nothing more
            raise self._credits_spent(self.credits_back_at)
        correlation = f"erp-pipelines {name}" + (f" entity={entity}" if entity else "")
        return await post_query(self.api, self._url, QUERIES.query(name), variables, auth=self._auth,
                                tenant=tenant, headers={CORRELATION_HEADER: correlation})

    async def _read(self, name: str, connection: str, variables: Mapping[str, Any], *, tenant: str | None,
                    entity: str | None) -> list[dict[str, Any]]:
        """Every node of a paged connection as one consistent snapshot: `read_all`'s guard, and a
        list that took several pages is confirmed by its first page read again (a cursor read
        cannot see a row removed behind it)."""
        style = GraphQLCursor(self._page_size, f"data.{connection}")
        where = f"Xledger {connection}"
        for _ in range(MAX_CONFIRMATIONS):
            pages: list[list[Any]] = []

            async def fetch(params: dict[str, Any], pages: list[list[Any]] = pages) -> Reply:
                reply = await self._post(name, {**variables, **params}, tenant=tenant, entity=entity)
                if entity is not None:
                    self._note_identity(reply, entity, tenant)
                pages.append(_node_ids(reply, connection))
                return reply

            nodes = await read_all(fetch, style, identity=_node_id, where=where, erp=ERP, tenant=tenant)
            if len(pages) <= 1:
                return nodes
            first = pages[0]
            await fetch(style.params(style.start))
            if pages[-1] == first:
                return nodes
            log.info("%s: the list changed while it was paged; reading it again", where)
        raise UpstreamError(f"{where}: the list kept changing while it was paged; nothing was stored", erp=ERP,
                            tenant=tenant, fix="the data is being edited in Xledger right now; retry the partition later")

    # ------------------------------------------------------------------ errors

    def classify_error(self, error: Mapping[str, Any], context: RequestContext) -> ErpError | None:
        """One `errors[]` object → the taxonomy (None: not one we know; the kit refuses it)."""
        code = error_code(error) or ""
        extensions = error.get("extensions") if isinstance(error.get("extensions"), Mapping) else {}
        if code == BURST_LIMIT:
            return RateLimited("Xledger's burst rate limit was reached", erp=ERP, retry_after=BURST_PAUSE_SECONDS,
                               fix="the connector waits and retries; lower the concurrency if it persists")
        if code == CONCURRENCY_LIMIT:
            return RateLimited("Xledger's limit on parallel requests was reached", erp=ERP,
                               retry_after=CONCURRENCY_PAUSE_SECONDS,
                               fix="the connector waits and retries; run fewer Xledger runs at once")
        if code == INSUFFICIENT_CREDITS:
            self.credits_back_at = str(extensions.get("resetAt") or "the next credit reset (time not given)")
            return self._credits_spent(self.credits_back_at)
        if code.rpartition(".")[2] in ACCESS_CODES:
            if context.tenant is None:
                return AuthError(f"Xledger refuses the API token ({code})", erp=ERP, fix=TOKEN_FIX)
            return ClientAccessError(f"Xledger refuses this entity's data to our API token ({code})", erp=ERP,
                                     fix=access_fix(context.tenant))
        return None

    @staticmethod
    def _credits_spent(back_at: str) -> QuotaExhausted:
        return QuotaExhausted(
            f"the API token's Xledger credits are used up; they come back at {back_at}. This credential's run "
            "stops here and sends no more requests", erp=ERP, resume_at=back_at,
            fix=f"re-run after {back_at}, or raise the credit allowance with Xledger",
        )

    @staticmethod
    def _map_http_error(response: httpx.Response, body: Any, context: RequestContext) -> ErpError | None:
        status = response.status_code
        if status in (401, 403):  # UNCONFIRMED["http_401"]
            return AuthError(f"Xledger refused the API token (HTTP {status})", erp=ERP, fix=TOKEN_FIX)
        if status == 429 or status >= 500:
            return None  # retried
        if status == 404:
            return BadResponse("Xledger answered HTTP 404", erp=ERP,
                               fix=f"check XLEDGER_BASE_URL: the GraphQL endpoint, e.g. {DEFAULT_BASE_URL}")
        return BadResponse(f"Xledger refused the query (HTTP {status})", erp=ERP,
                           fix="the API contract changed; update the connector before re-running")

    # ------------------------------------------------------------------ identity

    def _note_identity(self, reply: Reply, entity: str, tenant: str | None) -> None:
        """The entity the answer is for, from the same response (`entities(filter: {dbId})`)."""
        node = _identity_node(reply.body, entity, tenant)
        self._seen.setdefault(entity, []).append((str(node.get("dbId")), _org_number(node)))
        if node.get("fiscalYearStartMonth"):
            self._fiscal_start[entity] = int(node["fiscalYearStartMonth"])

    async def verify_tenant(self, client: Client) -> None:
        entity = client.erp_client_id
        seen = self._seen.pop(entity, [])
        if not seen:  # no read in this run: ask
            reply = await self._post("entity", {"entity": int(entity)}, tenant=client.label, entity=entity)
            node = _identity_node(reply.body, entity, client.label)
            seen = [(str(node.get("dbId")), _org_number(node))]
        for db_id, org_number in seen:
            org_number = stated_org_number(org_number)
            if db_id != entity or org_number != client.org_number:
                raise TenantMismatch(
                    f"Xledger answered for entity {db_id} (organisation number {org_number or 'none'}) instead of "
                    "this tenant; nothing was stored", erp=ERP, tenant=client.label,
                    fix="check the entity's organisation number in its company data in Xledger and that "
                    "XLEDGER_GROUP_ENTITY_ID is our group",
                )

    # ------------------------------------------------------------------ the contract

    async def list_clients(self) -> list[Client]:
        nodes = await self._read("entities", "entities", {}, tenant=None, entity=None)
        children: dict[str, list[dict[str, Any]]] = {}
        known = set()
        for node in nodes:
            require_fields(node, ("dbId",), where="Xledger entities", erp=ERP, tenant=None)
            known.add(str(node["dbId"]))
            parent = node.get("parent") or {}
            if parent.get("dbId") is not None:
                children.setdefault(str(parent["dbId"]), []).append(node)
        if self._group not in known:
            raise ConfigError(
                f"the group entity {self._group} is not among the entities our API token sees", erp=ERP,
                fix="check XLEDGER_GROUP_ENTITY_ID, and that the token was generated in the group entity or above",
            )
        clients, queue = [], list(children.get(self._group, []))
        while queue:  # every entity below the group, depth first
            node = queue.pop(0)
            db_id = str(node["dbId"])
            queue[:0] = children.get(db_id, [])
            self._fiscal_start[db_id] = int(node.get("fiscalYearStartMonth") or 1)
            clients.append(Client(erp=ERP, org_number=_org_number(node), erp_client_id=db_id,
                                  name=str(node.get("description") or node.get("code") or f"entity {db_id}")))
        return clients

    async def fetch_accounts(self, client: Client) -> list[Account]:
        entity = client.erp_client_id
        nodes = await self._read("accounts", "accounts", {"entity": int(entity)}, tenant=client.label, entity=entity)
        accounts = []
        for node in _own(nodes, entity, "Xledger accounts", client.label):
            require_fields(node, ("code", "description"), where="Xledger accounts", erp=ERP, tenant=client.label)
            accounts.append(Account(account_number=str(node["code"]), name=str(node["description"])))
        return accounts

    async def fetch_balances(self, client: Client, months: list[dt.date]) -> list[Balance]:
        if not months:
            return []
        months = sorted(months)
        entity = client.erp_client_id
        start = self._fiscal_start.get(entity)
        # the read starts at the fiscal year of the first month (at most 11 months before it)
        from_year = fiscal_year_start(months[0], start).year if start else add_months(months[0], -11).year
        nodes: list[dict[str, Any]] = []
        for _ in range(2):
            variables = {"entity": int(entity), "fromYear": from_year, "toYear": months[-1].year}
            nodes = await self._read("account_balances", "accountBalances", variables, tenant=client.label,
                                     entity=entity)
            start = self._fiscal_start.get(entity, 1)
            if fiscal_year_start(months[0], start).year >= from_year:
                break
            from_year = fiscal_year_start(months[0], start).year  # the identity told a longer year
        self.fiscal_year_starts[entity] = start
        return monthly_balances(_own(nodes, entity, "Xledger accountBalances", client.label), months, start,
                                tenant=client.label)


# ---------------------------------------------------------------------------------------- balances


def fiscal_year_start(month: dt.date, start_month: int) -> dt.date:
    """The first month of the fiscal year holding `month`."""
    year = month.year if month.month >= start_month else month.year - 1
    return dt.date(year, start_month, 1)


def monthly_balances(nodes: list[dict[str, Any]], months: list[dt.date], start_month: int, *,
                     tenant: str | None) -> list[Balance]:
    """Per-period rows → monthly opening, movement and closing (UNCONFIRMED["balance_meaning"]):
    walked from the first month's fiscal-year start; at each fiscal-year start the opening is the
    year's opening row (fiscalPeriod 0) if sent, else the balance sheet carried and profit and loss
    at zero."""
    movements: dict[dt.date, dict[str, Decimal]] = {}
    openings: dict[dt.date, dict[str, Decimal]] = {}
    where = "Xledger accountBalances"
    for node in nodes:
        require_fields(node, ("amount", "account", "period"), where=where, erp=ERP, tenant=tenant)
        require_fields(node["account"], ("code",), where=f"{where} account", erp=ERP, tenant=tenant)
        require_fields(node["period"], ("year", "monthNumber"), where=f"{where} period", erp=ERP, tenant=tenant)
        try:
            amount = Decimal(str(node["amount"]))  # UNCONFIRMED["sign"]: debit positive as sent
            month = dt.date(int(node["period"]["year"]), int(node["period"]["monthNumber"]), 1)
        except (InvalidOperation, ValueError, TypeError):
            raise BadResponse(f"{where}: a row with amount {node['amount']!r} or period {node['period']!r}",
                              erp=ERP, tenant=tenant) from None
        bucket = openings if node["period"].get("fiscalPeriod") == 0 else movements
        cell = bucket.setdefault(month, {})
        code = str(node["account"]["code"])
        cell[code] = cell.get(code, Decimal(0)) + amount
    wanted = set(months)
    first = fiscal_year_start(months[0], start_month)
    running: dict[str, Decimal] = {}
    balances = []
    for month in months_between(first, months[-1]):
        if month.month == start_month:
            running = dict(openings[month]) if month in openings else {
                code: value for code, value in running.items() if not _is_profit_and_loss(code)}
        moves = movements.get(month, {})
        closing = dict(running)
        for code, amount in moves.items():
            closing[code] = closing.get(code, Decimal(0)) + amount
        if month in wanted:
            for code in sorted(closing):
                opening = running.get(code, Decimal(0))
                balances.append(Balance(month, code, opening, moves.get(code, Decimal(0)), closing[code]))
        running = closing
    return balances


def _is_profit_and_loss(code: str) -> bool:  # UNCONFIRMED["profit_and_loss"]
    digits = code[:4]
    return digits.isdigit() and int(digits) >= FIRST_PROFIT_AND_LOSS_ACCOUNT


# ---------------------------------------------------------------------------------------- rows


def _node_id(node: Any) -> Any:
    return node.get("dbId") if isinstance(node, dict) else None


def _node_ids(reply: Reply, connection: str) -> list[Any]:
    data = reply.body.get("data") if isinstance(reply.body, dict) else None
    found = data.get(connection) if isinstance(data, dict) else None
    edges = found.get("edges") if isinstance(found, dict) else None
    return [_node_id(edge.get("node")) for edge in edges or [] if isinstance(edge, dict)]


def _own(nodes: list[dict[str, Any]], entity: str, where: str, tenant: str | None) -> list[dict[str, Any]]:
    """The entity's own rows: rows of several entities can arrive mixed (NOTES pitfall 3)."""
    own = []
    for node in nodes:
        require_fields(node, ("ownerDbId",), where=where, erp=ERP, tenant=tenant)
        if str(node["ownerDbId"]) == entity:
            own.append(node)
    if len(own) < len(nodes):
        log.debug("%s: %d rows of other entities left out", where, len(nodes) - len(own))
    return own


def _identity_node(body: Any, entity: str, tenant: str | None) -> dict[str, Any]:
    data = body.get("data") if isinstance(body, dict) else None
    found = data.get("entities") if isinstance(data, dict) else None
    edges = found.get("edges") if isinstance(found, dict) else None
    if not isinstance(edges, list):
        raise BadResponse("Xledger entities: no edges in the response", erp=ERP, tenant=tenant,
                          fix="the API contract changed; update the connector before re-running")
    if not edges:
        raise ClientAccessError(f"our API token no longer sees Xledger entity {entity}", erp=ERP, tenant=tenant,
                                fix=access_fix(tenant or entity))
    node = edges[0].get("node") if isinstance(edges[0], dict) else None
    require_fields(node, ("dbId",), where="Xledger entities", erp=ERP, tenant=tenant)
    return node


def _org_number(node: Mapping[str, Any]) -> str:
    company = node.get("company") or {}
    return str(company.get("companyNumber") or "").replace(" ", "").strip()
