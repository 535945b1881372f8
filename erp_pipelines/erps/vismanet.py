"""Visma.net ERP (Financials) API connector (facts: specs/vismanet/NOTES.md and the OpenAPI file next to it).

- Auth: Visma Connect client credentials, one token per company: `tenant_id` selects the company,
  client id and secret go in the form body, scope `vismanet_erp_service_api:read` (NOTES §2).
- Tenants: the company tenant ids in `VISMANET_TENANT_IDS` (a company gives us its tenant by
  approving our app with our invitation code; no call lists them, NOTES §3). The organisation
  number is `/v1/organization` `corporateId`, else the main branch's (`/v1/branch`).
- Reads: the chart from `/v1/account`; balances from `/v2/generalLedgerBalance` per period
  (`periodId=yyyyMM`), the actual ledger only, summed over branches and subaccounts, converted
  to debit positive in one place (`debit_positive`).
- Paging: `pageNumber`/`pageSize`; every row carries `metadata.totalCount` (`VismaPages`).
- Limits: `X-RateLimit-*` headers per company and client (NOTES §7): one throttle per tenant.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import httpx

from erp_pipelines.accounts import AccountClass, classify_account, saft_mapping
from erp_pipelines.erps.base import BilingualFix, Connector, Setting, require_fields, require_same_company
from erp_pipelines.erps.kit import (
    ClientCredentials,
    Page,
    PagingStyle,
    RateLimit,
    RateLimitHeaders,
    Reply,
    RequestContext,
    gather_all,
    read_all,
)
from erp_pipelines.erps.kit.throttle import Throttle
from erp_pipelines.errors import (
    AuthError,
    BadResponse,
    ClientAccessError,
    ConfigError,
    ErpError,
    RateLimited,
    UpstreamError,
)
from erp_pipelines.model import Account, Balance, Client, kroner
from erp_pipelines.tokens import credential_key

log = logging.getLogger(__name__)

TOKEN_PATH = "/connect/token"
SCOPE = "vismanet_erp_service_api:read"  # UNCONFIRMED by Visma's own docs: third-party clients use it (NOTES §2)
PAGE_SIZE = 1000  # asked for; the server caps it at the row's metadata.maxPageSize (numbers UNCONFIRMED, NOTES §6)
ACTUAL = "Actual"
# `AccountDto.type` (NOTES) → account class, for numbers outside NS 4102 (Liability includes equity)
ACCOUNT_TYPE_CLASSES: dict[str, AccountClass] = {
    "Asset": "asset", "Liability": "liability", "Income": "income", "Expense": "expense",
}
# UNCONFIRMED (NOTES §5): without toggleBalanceSigns the API signs liability and income accounts credit
# positive. Only zero-movement rows rely on it: a row with movement shows its own sign (`debit_positive`).
CREDIT_POSITIVE_TYPES = frozenset({"Liability", "Income"})

RATE_LIMIT = RateLimit(
    headers=RateLimitHeaders("X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset", reset_is_delta=True),
    source="X requests per hour per company and client (unpublished); X-RateLimit-Limit/-Remaining/-Reset "
    "(seconds until the window resets) on every response, 429 when exceeded (NOTES §7)",
)

CREDENTIALS_FIX = (
    "check VISMANET_CLIENT_ID and VISMANET_CLIENT_SECRET (Visma Developer Portal, our service integration) "
    "and that VISMA_CONNECT_URL is https://connect.visma.com"
)
SCOPE_FIX = f"give our service integration the scope {SCOPE} in the Visma Developer Portal"
REAPPROVE_FIX = (
    "Visma Connect issues no token for this company: ask the company to approve our app again with our "
    "invitation code in the Visma App Store, and check that our Visma.net user there has the role "
    "\"API User\" (it can take 10-15 minutes to apply)"
)
RIGHTS_FIX = "ask the company to give our Visma.net user back its rights to the general ledger (role \"API User\")"


def not_activated_fix(tenant_id: str) -> str:
    return (
        f"Visma.net refuses tenant {tenant_id} although its token is valid: either {tenant_id} is the customer "
        "tenant, not the company tenant (put the company's tenant id, Visma Admin → Company → Configuration → "
        f"Tenant id, in VISMANET_TENANT_IDS), or the company has not activated our app (ask it to activate the "
        "app with our invitation code in the Visma App Store)"
    )


class VismaNetConnector(Connector):
    erp = "vismanet"
    display_name = "Visma.net ERP"
    settings = (
        Setting("base_url", "VISMANET_BASE_URL", default="https://api.finance.visma.net",
                description="API base URL, without /v1 or /v2 (the paths start with them)"),
        Setting("connect_url", "VISMA_CONNECT_URL", default="https://connect.visma.com",
                description=f"Visma Connect, whose token endpoint is {TOKEN_PATH} (shared by the Visma ERPs)"),
        Setting("client_id", "VISMANET_CLIENT_ID", description="our service integration's client id"),
        Setting("client_secret", "VISMANET_CLIENT_SECRET", secret=True,
                description="our service integration's client secret"),
        Setting("tenant_ids", "VISMANET_TENANT_IDS",
                description="comma-separated company tenant ids, one per company that approved our app "
                "with our invitation code"),
    )
    rate_limit = RATE_LIMIT
    onboarding_fix = BilingualFix(
        norwegian="Selskapet må aktivere appen vår i Visma App Store med invitasjonskoden vi har sendt, "
                  "og vår Visma.net-bruker må ha rollen «API User» (det kan ta 10–15 minutter før det virker).",
        english="The company must activate our app in the Visma App Store with the invitation code we "
                "sent, and our Visma.net user there needs the role \"API User\" (it can take 10-15 minutes to "
                "apply).",
    )
    uses_token_store = True  # access tokens are reused across runs until they expire

    def __init__(self, *, base_url: str, connect_url: str, client_id: str, client_secret: str, tenant_ids: str,
                 **options: Any) -> None:
        super().__init__(base_url=base_url, connect_url=connect_url, client_id=client_id,
                         client_secret=client_secret, tenant_ids=tenant_ids, **options)
        self._tenant_ids = list(dict.fromkeys(t.strip() for t in tenant_ids.split(",") if t.strip()))
        if not self._tenant_ids:
            raise ConfigError("VISMANET_TENANT_IDS holds no tenant id", erp=self.erp,
                              fix="set VISMANET_TENANT_IDS to the company tenant ids, comma-separated")
        self._page_size = self.page_size or PAGE_SIZE
        self._token_url = connect_url.rstrip("/") + TOKEN_PATH
        self.api = self.api_client(base_url, connect_url, client_id)  # its own throttle: the token calls
        self._tokens: dict[str, ClientCredentials] = {}

    # ------------------------------------------------------------------ requests

    def _token(self, tenant_id: str) -> ClientCredentials:
        auth = self._tokens.get(tenant_id)
        if auth is None:
            config = self.config
            auth = self._tokens[tenant_id] = ClientCredentials(
                self.api, self._token_url, config["client_id"], config["client_secret"],
                refused=lambda response, body: _refused(response, body, tenant_id),
                scope=SCOPE, params={"tenant_id": tenant_id}, client_auth="client_secret_post",
                store=self.token_store,
                store_entry=credential_key("vismanet-token", self._token_url, config["client_id"],
                                           config["client_secret"], tenant_id),
            )
        return auth

    def _throttle(self, tenant_id: str) -> Throttle:
        """The limit is per company and client (NOTES §7), so each tenant has its own throttle."""
        return self.throttle or self.shared_throttle(self.config["base_url"], self.config["client_id"], tenant_id)

    async def _get(self, tenant_id: str, label: str, path: str, params: dict[str, Any] | None = None, *,
                   decode: bool | str = True) -> Any:
        return await self.api.request(
            "GET", path, params=params, auth=self._token(tenant_id), tenant=label, decode=decode,
            map_error=_error_mapper(tenant_id), throttle=self._throttle(tenant_id),
        )

    async def _rows(self, client: Client, path: str, params: dict[str, Any], key: Callable[[dict], Any]) -> list:
        """Every row of a paged list, as one consistent snapshot."""
        async def fetch(query: dict[str, Any]) -> Reply:
            return await self._get(client.erp_client_id, client.label, path, query, decode="reply")

        return await read_all(fetch, VismaPages(self._page_size), params=params, where=f"GET {path}",
                              identity=lambda row: key(row) if isinstance(row, dict) else None,
                              erp=self.erp, tenant=client.label)

    # ------------------------------------------------------------------ the contract

    async def list_clients(self) -> list[Client]:
        """One client per configured tenant id. A tenant Visma.net refuses is left out (logged with its
        tenant id); one that cannot be described just now stays registered (`unresolved_client_ids`)."""
        listed = await gather_all(*(self._describe(tenant_id) for tenant_id in self._tenant_ids))
        return [client for client in listed if client is not None]

    async def _describe(self, tenant_id: str) -> Client | None:
        try:
            name, org_number = await self._identity(tenant_id, f"tenant {tenant_id}")
        except ClientAccessError as exc:
            log.warning("vismanet tenant %s is refused: %s", tenant_id, exc)
            self.refused_clients[tenant_id] = exc
            return None
        except (UpstreamError, RateLimited, BadResponse) as exc:
            log.warning("vismanet tenant %s could not be described now: %s", tenant_id, exc)
            self.unresolved_client_ids.add(tenant_id)
            return None
        return Client(erp=self.erp, org_number=org_number, erp_client_id=tenant_id, name=name)

    async def _identity(self, tenant_id: str, label: str) -> tuple[str, str]:
        """The company's name and organisation number as Visma.net states them."""
        organizations = await self._get(tenant_id, label, "v1/organization")
        if not isinstance(organizations, list) or not organizations:
            raise BadResponse("GET /v1/organization: no organisation in the response", erp=self.erp, tenant=label)
        # UNCONFIRMED: a company tenant holds one organisation; the first one is the company
        organization = organizations[0]
        require_fields(organization, ("name",), where="GET /v1/organization", erp=self.erp, tenant=label)
        corporate_id = str(organization.get("corporateId") or "").strip()
        if not corporate_id:
            branches = await self._get(tenant_id, label, "v1/branch")
            main = [b for b in branches or [] if isinstance(b, dict) and b.get("isMainBranch")]
            corporate_id = str((main[0].get("corporateId") if main else "") or "").strip()
        return str(organization["name"]), corporate_id

    async def fetch_accounts(self, client: Client) -> list[Account]:
        # UNCONFIRMED: this spec version declares no pageNumber/pageSize on /v1/account, yet its rows carry
        # metadata; we send them, and a server that ignores them is read in one request (`VismaPages`)
        rows = await self._rows(client, "v1/account", {}, lambda row: row.get("accountCD"))
        accounts = []
        for row in rows:
            require_fields(row, ("accountCD", "description"), where="GET /v1/account", erp=self.erp,
                           tenant=client.label)
            number, kind = str(row["accountCD"]), row.get("type")
            standard, category, code = saft_mapping(row.get("publicCode1"))  # the SAF-T code (NOTES)
            accounts.append(Account(account_number=number, name=str(row["description"]), account_type=kind,
                                    standard_account=standard, grouping_category=category, grouping_code=code,
                                    account_class=classify_account(number, kind, standard, code,
                                                                   type_classes=ACCOUNT_TYPE_CLASSES)))
        return accounts

    async def fetch_balances(self, client: Client, months: list[dt.date]) -> list[Balance]:
        per_month = await gather_all(*(self._month_balances(client, month) for month in months))
        return [balance for month in per_month for balance in month]

    async def _month_balances(self, client: Client, month: dt.date) -> list[Balance]:
        """One period's balances: the actual ledger summed over branches and subaccounts.
        UNCONFIRMED: financial periods are calendar months (periodId = yyyyMM of the month)."""
        period = f"{month:%Y%m}"
        # UNCONFIRMED: excludeYTDAccount leaves out the system's year-to-date net income account, a
        # running total of the income statement rather than postings (the spec does not describe it)
        params = {"periodId": period, "balanceType": ACTUAL, "excludeYTDAccount": "true"}
        rows = await self._rows(client, "v2/generalLedgerBalance", params, _balance_key)
        where = f"GET /v2/generalLedgerBalance {period}"
        for row in rows:
            require_fields(row, ("account", "beginningBalance", "periodToDateDebit", "periodToDateCredit",
                                 "yearToDateBalance"), where=where, erp=self.erp, tenant=client.label)
            require_fields(row["account"], ("number",), where=f"{where} account", erp=self.erp, tenant=client.label)
            if row.get("financialPeriod") not in (None, period):
                raise BadResponse(f"{where}: a row of period {row['financialPeriod']}", erp=self.erp,
                                  tenant=client.label)
        # the budget (and reporting, statistical) ledgers are not the accounts: kept out even if sent
        actual = [row for row in rows if row.get("balanceType") in (None, ACTUAL)]
        totals: dict[str, list[Decimal]] = {}
        for number, amounts in debit_positive(actual, where=where, tenant=client.label):
            sums = totals.setdefault(number, [Decimal(0)] * 3)
            for i, amount in enumerate(amounts):
                sums[i] += amount
        return [Balance(month, number, *sums) for number, sums in sorted(totals.items())]

    async def verify_tenant(self, client: Client) -> None:
        name, reported = await self._identity(client.erp_client_id, client.label)
        require_same_company(client, name, reported, source="Visma.net", erp=self.erp,
                             fix="check the company's organisation number (Corporate ID) in Visma.net and that its "
                             "tenant id in VISMANET_TENANT_IDS belongs to this company")


# ---------------------------------------------------------------------------------------- paging


@dataclasses.dataclass(frozen=True)
class VismaPages(PagingStyle):
    """`pageNumber` (from 1) and `pageSize` (NOTES §6). Every row carries `metadata` {`totalCount`,
    `maxPageSize`}: the list ends when the rows read reach `totalCount` (so a server that ignores
    the parameters and sends everything is read in one request) or at an empty page; without
    metadata, at a short page. A page size above `maxPageSize` is silently capped, so the next
    pages ask for the cap. `totalCount` is the list's version. State: (page, size, rows read)."""

    size: int

    @property
    def start(self) -> tuple[int, int, int]:  # type: ignore[override]
        return 1, self.size, 0

    def params(self, state: tuple[int, int, int]) -> dict[str, Any]:
        return {"pageNumber": state[0], "pageSize": state[1]}

    def page(self, reply: Reply, state: tuple[int, int, int], where: str) -> Page:
        number, size, read = state
        items = [] if reply.body is None else reply.body
        if not isinstance(items, list):
            raise BadResponse(f"{where}: the response is not a JSON array")
        meta = items[0].get("metadata") if items and isinstance(items[0], dict) else None
        meta = meta if isinstance(meta, dict) else {}
        total, cap = _whole(meta.get("totalCount")), _whole(meta.get("maxPageSize"))
        read += len(items)
        size = min(size, cap) if cap else size
        more = bool(items) and (read < total if total is not None else len(items) >= size)
        return Page(items, (number + 1, size, read) if more else None, total)


def _whole(value: Any) -> int | None:
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None


# ---------------------------------------------------------------------------------------- balances


def _balance_key(row: dict[str, Any]) -> Any:
    def part(name: str, field: str) -> Any:
        value = row.get(name)
        return value.get(field) if isinstance(value, dict) else value

    return (part("branch", "number"), part("ledger", "id"), row.get("balanceType"), part("account", "number"),
            row.get("subAccountCd") or row.get("subaccountId"))


def debit_positive(rows: list[dict[str, Any]], *, where: str, tenant: str) -> list[tuple[str, tuple[Decimal, ...]]]:
    """(account number, (opening, movement, closing)) per row, debit positive: the one place signs
    are converted. Debit and credit movements are unsigned, so movement = debit − credit; opening
    and closing carry the API's sign for the account type, which a row with movement shows itself
    (closing − opening = ±movement). A row without movement takes the sign its type shows elsewhere
    in the answer, else `CREDIT_POSITIVE_TYPES` (UNCONFIRMED default; a row without a type: as sent)."""
    parsed = []
    shown: dict[Any, int] = {}
    for row in rows:
        opening, closing = kroner(row["beginningBalance"]), kroner(row["yearToDateBalance"])
        movement = kroner(row["periodToDateDebit"]) - kroner(row["periodToDateCredit"])
        kind = row["account"].get("type")
        sign = 1 if closing - opening == movement else -1 if closing - opening == -movement else 0
        if not sign:
            raise BadResponse(f"{where} account {row['account']['number']}: beginningBalance and yearToDateBalance "
                              f"differ by {closing - opening}, the movements by {movement}", erp="vismanet",
                              tenant=tenant)
        if movement and kind:
            shown.setdefault(kind, sign)
        parsed.append((row["account"]["number"], kind, opening, movement, closing, sign if movement else None))
    result = []
    for number, kind, opening, movement, closing, sign in parsed:
        sign = sign or shown.get(kind) or (-1 if kind in CREDIT_POSITIVE_TYPES else 1)
        result.append((str(number), (sign * opening, movement, sign * closing)))
    return result


# ---------------------------------------------------------------------------------------- errors


def _refused(response: httpx.Response, body: Any, tenant_id: str) -> ErpError:
    """Visma Connect's OAuth refusal (NOTES §8): the client's own credential, or this company's."""
    code = body.get("error") if isinstance(body, dict) else None
    detail = f"HTTP {response.status_code}" + (f", {code}" if code else "")
    if code in ("invalid_tenant", "unauthorized_client", "access_denied"):
        return ClientAccessError(f"Visma Connect refuses a token for tenant {tenant_id} ({detail})",
                                 erp="vismanet", fix=REAPPROVE_FIX)
    if code == "invalid_scope":
        return AuthError(f"Visma Connect refuses the scope {SCOPE} ({detail})", erp="vismanet", fix=SCOPE_FIX)
    return AuthError(f"Visma Connect refuses our client credentials ({detail})", erp="vismanet", fix=CREDENTIALS_FIX)


def _error_mapper(tenant_id: str):
    def map_error(response: httpx.Response, body: Any, context: RequestContext) -> ErpError | None:
        """Visma.net's answers to a tenant's request. UNCONFIRMED: error bodies as {"message": ...} (NOTES §8)."""
        status = response.status_code
        message = body.get("message") if isinstance(body, dict) else None
        detail = f"HTTP {status}" + (f": {message}" if message else "")
        if status == 401:  # the token was just re-minted once (ApiClient), so the token itself is fine
            return ClientAccessError(f"Visma.net refuses tenant {tenant_id} ({detail})", erp="vismanet",
                                     fix=not_activated_fix(tenant_id))
        if status == 403:  # UNCONFIRMED: what Visma.net answers when our user's roles do not allow a read
            return ClientAccessError(f"Visma.net forbids this read ({detail})", erp="vismanet", fix=RIGHTS_FIX)
        if status == 429 or status >= 500:
            return None  # retried
        return BadResponse(f"request rejected ({detail})", erp="vismanet",
                           fix="check VISMANET_BASE_URL: the host only, e.g. https://api.finance.visma.net"
                           if status == 404 else None)

    return map_error
