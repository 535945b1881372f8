"""Visma Business NXT (GraphQL) connector. Facts: specs/businessnxt/NOTES.md; the SDL schema and one
`.graphql` file per query next to it (read through the kit's `QueryBook`).

- Auth: Visma Connect client credentials for the *service* endpoint `/api/graphql-service`, scope
  `business-graphql-service-api:access-group-based-readonly` (we only read), client id and secret in
  the form body, `tenant_id` when `BUSINESSNXT_TENANT_ID` is set (NOTES §2). One token per credential.
- Tenants: the companies of `availableCompanies` (NOTES §3); every other read runs inside
  `useCompany(no: <Visma.net company id>)`. Name and organisation number from the company's own
  information table (`company_identity.graphql`, UNCONFIRMED, see below), also the tenant guard.
- Chart: `generalLedgerAccount`, cursor paged (`first`/`after`, `items`, `pageInfo`) through the kit's
  `Cursor` and `read_all`; `totalCount` is the list's version, so a chart edited while paged is re-read.
- Balances: no balance table is documented (NOTES §5). They are derived from the general-ledger
  postings, summed per account on the server (`groupBy` + `aggregates`). Grouping cannot be paged
  (NOTES §6), so every request is narrow: one company and one date range, one row per account back.
  Cost per tenant and window of N months: N + 2 requests (one per month for the movement, one for the
  postings before the fiscal year the window starts in (balance-sheet accounts), one for that fiscal
  year up to the window; N + 1 when the window starts at the fiscal-year start). The daily window
  (2 months) is 4 requests; a tenant-month in a long full sync is ~1 request. With the client list
  (1 + 1 per company), the chart (1 page of 500) and the tenant guard (1), the daily refresh of a
  company costs about 7 requests. Opening = closing of the month before; profit and loss restarts at
  the fiscal-year start (`kit.balances.balances_from_closings`).
- GraphQL errors in a 200 are mapped by the kit's `graphql_body_check` (`classify_error` below);
  data with errors is refused whole. A 401 is an nginx HTML page (NOTES §8): never decoded as JSON.
- Limits (NOTES §7): 600 requests per minute per token and 60 in flight per company (and per
  customer). One throttle per credential (= per token) paces at 0.95 × 10/s and holds at most 60 in
  flight for all companies together, which keeps each company, and the customer, within 60.
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
from decimal import Decimal
from typing import Any

import httpx

from erp_pipelines.erps.base import BilingualFix, Connector, Setting, require_fields, require_same_company
from erp_pipelines.erps.kit import (
    ClientCredentials,
    Cursor,
    QueryBook,
    RateLimit,
    Reply,
    RequestContext,
    data_of,
    error_code,
    gather_all,
    graphql_body_check,
    page_fetcher,
    post_query,
    read_all,
)
from erp_pipelines.erps.kit.balances import balances_from_closings
from erp_pipelines.erps.kit.graphql import MAX_MESSAGE
from erp_pipelines.errors import (
    AuthError,
    BadResponse,
    ClientAccessError,
    ErpError,
    RateLimited,
    UpstreamError,
)
from erp_pipelines.model import (
    Account,
    Balance,
    Client,
    add_months,
    kroner,
    months_between,
)
from erp_pipelines.tokens import credential_key

log = logging.getLogger(__name__)

ERP = "businessnxt"
TOKEN_PATH = "/connect/token"
SCOPE = "business-graphql-service-api:access-group-based-readonly"  # NOTES §2: the read-only service scope
PAGE_SIZE = 500  # asked for per page (NOTES §4 example); the maximum is UNCONFIRMED (NOTES §6)

RATE_LIMIT = RateLimit(
    requests_per_second=600 / 60, max_in_flight=60,
    source="600 requests/minute per Authorization token (429 from the gateway); 60 requests in flight per "
    "company and per customer (NOTES §7)",
)

# ---------------------------------------------------------------------------------------- UNCONFIRMED
# Every assumption no primary source confirms, in one place (NOTES.md marks them too):
# 1. The organisation number is `companyInformation.organisationNo` inside useCompany (NOTES §3): the
#    column read is named here and in specs/businessnxt/company_identity.graphql, nowhere else.
ORG_NUMBER_TABLE, ORG_NUMBER_COLUMN = "companyInformation", "organisationNo"
# 2. Postings: table `generalLedgerTransaction`, `voucherDate` (yyyymmdd, dates are Int [doc]) and
#    `postedAmountDomestic`, debit positive in the company's currency (NOK); grouping as
#    `groupBy: [{accountNo: DEFAULT}]` with `aggregates { sum { ... } }` (specs/businessnxt/ledger_sums.graphql).
POSTED_AMOUNT_SIGN = 1  # +1: postedAmountDomestic is debit positive already
# 3. The fiscal year starts in January (the company's own setting is not read; Norwegian companies
#    almost all use the calendar year).
FISCAL_YEAR_START_MONTH = 1
# 4. The postings before the fiscal year a window starts in are summed in one request from this date.
EARLIEST_VOUCHER_DATE = 19000101
# 5. How Business NXT words a refused company or table in `errors[]` (no error codes are documented):
#    a message with one of these words is an access error; at `useCompany` the company's, below it a table's.
ACCESS_WORDS = ("access", "not authorized", "unauthorized", "permission", "forbidden", "denied")
THROTTLING_WORDS = ("too many requests", "rate limit", "concurrent")
# 6. A grouped answer is complete (no silent page cap on grouped results), and availableCompanies
#    lists every company when asked without first/last (its totalCount is checked).
# 7. `tenant_id` in the token request names the customer tenant, as for other Visma Connect service APIs.
# ---------------------------------------------------------------------------------------- fixes

CREDENTIALS_FIX = (
    "check BUSINESSNXT_CLIENT_ID and BUSINESSNXT_CLIENT_SECRET (Visma Developer Portal, our service integration "
    "\"Business NXT GraphQL Service API\") and that VISMA_CONNECT_URL is https://connect.visma.com"
)
SCOPE_FIX = f"add the scope {SCOPE} to our integration in the Visma Developer Portal and wait for Visma's approval"
SERVICE_USER_FIX = (
    "the service user must be registered in Business NXT with access to the companies: in Business NXT, "
    "register a user for our integration's client id (Users → service user) and give it access to each "
    "company; also check that Visma approved the integration (Developer Portal) and BUSINESSNXT_TENANT_ID"
)
COMPANY_ACCESS_FIX = (
    "the service user must be registered in Business NXT with access to the company: in Business NXT, give "
    "the user registered for our integration access to this company"
)
TABLE_RIGHTS_FIX = (
    "give the access group of our service user in Business NXT read access to the general ledger "
    "(tables generalLedgerAccount, generalLedgerTransaction and companyInformation)"
)


@functools.cache
def queries() -> QueryBook:
    return QueryBook(ERP)


class BusinessNxtConnector(Connector):
    erp = ERP
    display_name = "Visma Business NXT"
    settings = (
        Setting("base_url", "BUSINESSNXT_BASE_URL", default="https://business.visma.net/api/graphql-service",
                url_path="/graphql-service",
                description="the GraphQL endpoint for services (client credentials), not /api/graphql"),
        Setting("connect_url", "VISMA_CONNECT_URL", default="https://connect.visma.com",
                description=f"Visma Connect, whose token endpoint is {TOKEN_PATH} (shared by the Visma ERPs)"),
        Setting("client_id", "BUSINESSNXT_CLIENT_ID", description="our service integration's client id"),
        Setting("client_secret", "BUSINESSNXT_CLIENT_SECRET", secret=True,
                description="our service integration's client secret"),
        Setting("tenant_id", "BUSINESSNXT_TENANT_ID", required=False,
                description="the customer's Visma tenant id, sent as tenant_id in the token request"),
    )
    rate_limit = RATE_LIMIT
    onboarding_fix = BilingualFix(
        norwegian="I Business NXT må brukeren som er registrert for integrasjonen vår (tjenestebruker) få "
                  "tilgang til dette selskapet, og tilgangsgruppen må ha lesetilgang til hovedboken.",
        english="In Business NXT, give the user registered for our integration (the service user) access "
                "to this company, and its access group read access to the general ledger.",
    )
    uses_token_store = True  # the access token is reused across runs until it expires

    def __init__(self, *, base_url: str, connect_url: str, client_id: str, client_secret: str,
                 tenant_id: str = "", **options: Any) -> None:
        super().__init__(base_url=base_url, connect_url=connect_url, client_id=client_id,
                         client_secret=client_secret, tenant_id=tenant_id, **options)
        self._endpoint = base_url.rstrip("/")
        self._page_size = self.page_size or PAGE_SIZE
        token_url = connect_url.rstrip("/") + TOKEN_PATH
        credential = (self._endpoint, connect_url, client_id, tenant_id)
        self.api = self.api_client(self._endpoint, *credential, map_error=map_http_error,
                                   check_body=graphql_body_check(ERP, classify_error))
        # Visma Connect is another host with its own answers (no GraphQL body): its own client
        self.connect = self.api_client(connect_url, "visma-connect", *credential)
        self._auth = ClientCredentials(
            self.connect, token_url, client_id, client_secret, refused=_refused, scope=SCOPE,
            params={"tenant_id": tenant_id} if tenant_id else None, client_auth="client_secret_post",
            store=self.token_store,
            store_entry=credential_key("businessnxt-token", token_url, client_id, client_secret, tenant_id),
        )

    async def aclose(self) -> None:
        await self.api.aclose()
        await self.connect.aclose()

    # ------------------------------------------------------------------ requests

    async def _query(self, name: str, variables: dict[str, Any], *, tenant: str | None) -> Reply:
        return await post_query(self.api, self._endpoint, queries().query(name), variables, auth=self._auth,
                                tenant=tenant)

    async def _company(self, name: str, company_no: str, label: str, **variables: Any) -> dict[str, Any]:
        """`data.useCompany` of one company query."""
        reply = await self._query(name, {"companyNo": int(company_no), **variables}, tenant=label)
        company = data_of(reply, "useCompany", f"query {name}")
        if not isinstance(company, dict):
            raise BadResponse(f"query {name}: useCompany is empty", erp=ERP, tenant=label)
        return company

    # ------------------------------------------------------------------ the contract

    async def list_clients(self) -> list[Client]:
        """Every company of `availableCompanies`, described by its own information table. A company
        Business NXT refuses is left out (logged with the fix); one that cannot be described just now
        stays registered (`unresolved_client_ids`)."""
        reply = await self._query("available_companies", {}, tenant=None)
        connection = data_of(reply, "availableCompanies", "query available_companies")
        items = connection.get("items") if isinstance(connection, dict) else None
        if not isinstance(items, list):
            raise BadResponse("query available_companies: no items list", erp=ERP)
        total = connection.get("totalCount")
        if isinstance(total, int) and len(items) < total:
            raise BadResponse(f"availableCompanies listed {len(items)} of {total} companies; nothing was stored",
                              erp=ERP, fix="retry later; if it persists the list is capped: page it (connector)")
        companies: dict[str, str] = {}
        for item in items:
            require_fields(item, ("companyNo",), where="availableCompanies", erp=ERP, tenant=None)
            companies.setdefault(str(item["companyNo"]), str(item.get("name") or ""))
        if not companies:
            log.warning("businessnxt: availableCompanies is empty. Fix: %s", SERVICE_USER_FIX)
        described = await gather_all(*(self._describe(no, name) for no, name in companies.items()))
        return [client for client in described if client is not None]

    async def _describe(self, company_no: str, listed_name: str) -> Client | None:
        label = f"{listed_name or 'company'} (Business NXT company {company_no})"
        try:
            name, org_number = await self._identity(company_no, label)
        except ClientAccessError as exc:
            log.warning("businessnxt company %s is refused: %s", company_no, exc)
            self.refused_clients[company_no] = exc.for_tenant(label)
            return None
        except (UpstreamError, RateLimited, BadResponse) as exc:
            log.warning("businessnxt company %s could not be described now: %s", company_no, exc)
            self.unresolved_client_ids.add(company_no)
            return None
        return Client(erp=ERP, org_number=org_number, erp_client_id=company_no, name=name or listed_name)

    async def _identity(self, company_no: str, label: str) -> tuple[str, str]:
        """The company's name and organisation number as Business NXT states them (UNCONFIRMED 1)."""
        company = await self._company("company_identity", company_no, label)
        table = company.get(ORG_NUMBER_TABLE)
        rows = table.get("items") if isinstance(table, dict) else None
        if not isinstance(rows, list) or not rows or not isinstance(rows[0], dict):
            raise BadResponse(f"query company_identity: no {ORG_NUMBER_TABLE} row", erp=ERP, tenant=label,
                              fix="the API contract changed; update the connector before re-running")
        row = rows[0]
        return str(row.get("name") or ""), str(row.get(ORG_NUMBER_COLUMN) or "").replace(" ", "")

    async def fetch_accounts(self, client: Client) -> list[Account]:
        fetch = page_fetcher(self.api, self._endpoint, queries().query("general_ledger_accounts"),
                             {"companyNo": int(client.erp_client_id)}, auth=self._auth, tenant=client.label)
        style = Cursor(self._page_size, "data.useCompany.generalLedgerAccount", rows="items", version_key="totalCount")
        rows = await read_all(fetch, style, where="query general_ledger_accounts", erp=ERP, tenant=client.label,
                              identity=lambda row: row.get("accountNo") if isinstance(row, dict) else None)
        accounts = []
        for row in rows:
            require_fields(row, ("accountNo",), where="generalLedgerAccount", erp=ERP, tenant=client.label)
            accounts.append(Account(account_number=str(row["accountNo"]), name=str(row.get("name") or "")))
        return accounts

    async def fetch_balances(self, client: Client, months: list[dt.date]) -> list[Balance]:
        """Per account and month, from the postings summed per date range (see the module docstring)."""
        if not months:
            return []
        span = months_between(min(months), max(months))  # rolled forward month by month, gaps included
        first = span[0]
        year_start = fiscal_year_start(first)
        ranges = [(EARLIEST_VOUCHER_DATE, _yyyymmdd(year_start - dt.timedelta(days=1)))]
        if year_start < first:
            ranges.append((_yyyymmdd(year_start), _yyyymmdd(first - dt.timedelta(days=1))))
        ranges += [(_yyyymmdd(month), _yyyymmdd(add_months(month, 1) - dt.timedelta(days=1))) for month in span]
        sums = await gather_all(*(self._ledger_sums(client, start, end) for start, end in ranges))
        before_year, rest = sums[0], sums[1:]
        this_year, movements = (rest[0], rest[1:]) if year_start < first else ({}, rest)
        # closing at the month end before the window: the balance sheet from all earlier postings,
        # profit and loss from this fiscal year's only
        closing = {n: v for n, v in before_year.items() if not _is_profit_and_loss(n)}
        for number, amount in this_year.items():
            closing[number] = closing.get(number, Decimal("0.00")) + amount
        closings = [closing]
        for month, movement in zip(span, movements, strict=True):
            restart = month.month == FISCAL_YEAR_START_MONTH
            closing = {n: v for n, v in closing.items() if not (restart and _is_profit_and_loss(n))}
            for number, amount in movement.items():
                closing[number] = closing.get(number, Decimal("0.00")) + amount
            closings.append(closing)
        balances = balances_from_closings(span, closings, fiscal_year_start_month=FISCAL_YEAR_START_MONTH)
        wanted = set(months)
        return [balance for balance in balances if balance.period in wanted]

    async def _ledger_sums(self, client: Client, start: int, end: int) -> dict[str, Decimal]:
        """Account → the sum of its postings from `start` to `end` (yyyymmdd, both included)."""
        where = f"query ledger_sums {start}-{end}"
        company = await self._company("ledger_sums", client.erp_client_id, client.label, fromDate=start, toDate=end)
        table = company.get("generalLedgerTransaction")
        rows = table.get("items") if isinstance(table, dict) else None
        if not isinstance(rows, list):
            raise BadResponse(f"{where}: no generalLedgerTransaction items", erp=ERP, tenant=client.label,
                              fix="the API contract changed; update the connector before re-running")
        sums: dict[str, Decimal] = {}
        for row in rows:
            require_fields(row, ("accountNo", "aggregates"), where=where, erp=ERP, tenant=client.label)
            total = (row["aggregates"].get("sum") or {}) if isinstance(row["aggregates"], dict) else {}
            require_fields(total, ("postedAmountDomestic",), where=f"{where} aggregates.sum", erp=ERP,
                           tenant=client.label)
            number = str(row["accountNo"])
            if number in sums:
                raise BadResponse(f"{where}: account {number} is listed twice", erp=ERP, tenant=client.label)
            sums[number] = POSTED_AMOUNT_SIGN * kroner(total["postedAmountDomestic"])
        return sums

    async def verify_tenant(self, client: Client) -> None:
        name, reported = await self._identity(client.erp_client_id, client.label)
        require_same_company(client, name, reported, source="Business NXT", erp=ERP,
                             fix="check the company's organisation number in Business NXT (company information) "
                             "and that company id belongs to this company")


# ---------------------------------------------------------------------------------------- helpers


def fiscal_year_start(month: dt.date) -> dt.date:
    """The first month of the fiscal year `month` is in (UNCONFIRMED 3)."""
    year = month.year if month.month >= FISCAL_YEAR_START_MONTH else month.year - 1
    return dt.date(year, FISCAL_YEAR_START_MONTH, 1)


def _yyyymmdd(day: dt.date) -> int:
    return day.year * 10_000 + day.month * 100 + day.day


def _is_profit_and_loss(number: str) -> bool:
    digits = number[:4]
    return digits.isdigit() and int(digits) >= 3000  # NS 4102 classes 3-8


# ---------------------------------------------------------------------------------------- errors


def classify_error(error: dict[str, Any], context: RequestContext) -> ErpError | None:
    """One object of `errors[]` (HTTP 200) in the taxonomy; None leaves it to the kit (BadResponse,
    and data with errors refused whole). Words and codes: UNCONFIRMED 5."""
    message = str(error.get("message") or "")[:MAX_MESSAGE]
    wording = f"{message} {error_code(error) or ''}".lower()
    if any(word in wording for word in THROTTLING_WORDS):
        return RateLimited(f"Business NXT is throttling: {message}", retry_after=1.0, erp=ERP,
                           fix="lower the concurrency for this credential or retry later")
    if not any(word in wording for word in ACCESS_WORDS):
        return None
    if context.tenant is None:  # the integration's own listing
        return AuthError(f"Business NXT refuses our service user: {message}", erp=ERP, fix=SERVICE_USER_FIX)
    path = error.get("path") if isinstance(error.get("path"), list) else []
    if len(path) > 1:  # below useCompany: one table
        return ClientAccessError(f"Business NXT refuses a table of this company: {message}", erp=ERP,
                                 fix=TABLE_RIGHTS_FIX)
    return ClientAccessError(f"Business NXT refuses this company: {message}", erp=ERP, fix=COMPANY_ACCESS_FIX)


def map_http_error(response: httpx.Response, body: Any, context: RequestContext) -> ErpError | None:
    """Non-2xx answers of the GraphQL endpoint. A 401 is an nginx HTML page (NOTES §8), so nothing
    here reads the body as JSON; it comes after one re-minted token, so the token itself is fine."""
    status = response.status_code
    page = " (an HTML page)" if "html" in response.headers.get("content-type", "") else ""
    if status in (401, 403):
        if context.tenant is None:
            return AuthError(f"Business NXT refuses our token (HTTP {status}{page})", erp=ERP, fix=SERVICE_USER_FIX)
        return ClientAccessError(f"Business NXT refuses our token for this company (HTTP {status}{page})", erp=ERP,
                                 fix=COMPANY_ACCESS_FIX)
    if status == 429 or status >= 500:
        return None  # retried
    return BadResponse(f"the GraphQL endpoint answered HTTP {status}{page}", erp=ERP,
                       fix="check BUSINESSNXT_BASE_URL: https://business.visma.net/api/graphql-service"
                       if status in (404, 405) else None)


def _refused(response: httpx.Response, body: Any) -> ErpError:
    """Visma Connect's OAuth refusal (RFC 6749 §5.2 codes)."""
    code = body.get("error") if isinstance(body, dict) else None
    detail = f"HTTP {response.status_code}" + (f", {code}" if code else "")
    if code == "invalid_scope":
        return AuthError(f"Visma Connect refuses the scope {SCOPE} ({detail})", erp=ERP, fix=SCOPE_FIX)
    if code in ("invalid_tenant", "unauthorized_client", "access_denied"):
        return AuthError(f"Visma Connect issues no token for our integration ({detail})", erp=ERP,
                         fix=f"{SERVICE_USER_FIX}; {CREDENTIALS_FIX}")
    return AuthError(f"Visma Connect refuses our client credentials ({detail})", erp=ERP, fix=CREDENTIALS_FIX)
