"""Canonical records shared by every connector, the warehouse and the Dagster layer.

Sign convention: every amount is NOK as `Decimal` with two decimals, **debit positive, credit
negative**. Revenue and liabilities are therefore negative, as in a Norwegian trial balance
(saldobalanse). Connectors convert from the ERP's units (øre, say) and signs on the way in.
"""

from __future__ import annotations

import datetime as dt
import enum
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from decimal import Decimal

from stdnum.no import fodselsnummer, orgnr

from erp_pipelines.accounts import ACCOUNT_CLASSES, AccountClass, classify_account

CENT = Decimal("0.01")


class ClientStatus(enum.StrEnum):
    """A client's status per ERP (what an accountant sees in `erp-pipelines clients list`)."""

    ACTIVE = "active"  # extracted by the schedule and the sensor
    INACTIVE = "inactive"  # deactivated by the user (or waiting for activation); history kept
    REJECTED = "rejected"  # fails a client rule; the reason is kept
    NO_API_ACCESS = "no_api_access"  # listed, but the ERP refuses API access; retried until it works
    REVOKED = "revoked"  # no longer listed by the ERP; history kept
    OK = "active"  # alias: before the lifecycle, a usable client was "ok"

    @classmethod
    def _missing_(cls, value: object) -> ClientStatus | None:
        return cls.ACTIVE if value == "ok" else None  # rows and callers from before the lifecycle


AUTO_ACTIVATE_VARIABLE = "ERP_AUTO_ACTIVATE"


def auto_activate(environ: Mapping[str, str]) -> bool:
    """`ERP_AUTO_ACTIVATE` (default true): whether a new valid client starts as active or waits,
    inactive, until activated."""
    raw = (environ.get(AUTO_ACTIVATE_VARIABLE) or "true").strip().lower()
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{AUTO_ACTIVATE_VARIABLE}={raw!r} is neither true nor false")


DEFAULT_CONNECTION = "default"  # the environment's credential set (`connections.py`)


@dataclass(frozen=True)
class Client:
    """One tenant (client company) as an ERP lists it."""

    erp: str
    org_number: str  # normalised digits; the raw value when rejected
    erp_client_id: str
    name: str
    status: ClientStatus = ClientStatus.ACTIVE
    status_reason: str | None = None
    connection: str = DEFAULT_CONNECTION  # the connection (credential set) it is reached through

    @property
    def label(self) -> str:
        shown = self.org_number or "no organisation number"
        return f"{self.name} (orgnr {shown}, {self.erp} client {self.erp_client_id})"

    @property
    def is_active(self) -> bool:
        """Extracted by runs: active, or listed without API access (retried until access is given)."""
        return self.status in ENABLED_STATUSES


ENABLED_STATUSES = (ClientStatus.ACTIVE, ClientStatus.NO_API_ACCESS)


@dataclass(frozen=True)
class Account:
    """One account of a tenant's chart. Canonical columns (`erp_pipelines/accounts.py`):
    `account_class` (asset, liability, equity, income, expense), classified from the number when the
    connector gives none; `standard_account` a 4-digit SAF-T standard account only; the SAF-T grouping
    in `grouping_category`/`grouping_code`. `account_type` is the ERP's own type, unchanged."""

    account_number: str
    name: str
    account_type: str | None = None
    standard_account: str | None = None
    grouping_category: str | None = None
    grouping_code: str | None = None
    account_class: AccountClass | None = None

    def __post_init__(self) -> None:
        if self.account_class is None:
            found = classify_account(self.account_number, self.account_type, self.standard_account,
                                     self.grouping_code)
            object.__setattr__(self, "account_class", found)
        elif self.account_class not in ACCOUNT_CLASSES:
            raise ValueError(f"account {self.account_number}: account_class {self.account_class!r} is not one of "
                             f"{', '.join(ACCOUNT_CLASSES)}")


@dataclass(frozen=True)
class Balance:
    period: dt.date  # first day of the month
    account_number: str
    opening: Decimal
    movement: Decimal
    closing: Decimal
    currency: str = "NOK"

    @property
    def is_zero(self) -> bool:
        return not (self.opening or self.movement or self.closing)


@dataclass
class TenantExtract:
    """What one tenant yielded in one extraction: records, or the error that stopped it."""

    client: Client
    accounts: list[Account] = field(default_factory=list)
    balances: list[Balance] = field(default_factory=list)
    findings: list[dict] | None = None  # reconciliation rows, for sources that report totals
    fiscal_year_start_month: int | None = None  # 1-12, when the ERP tells (read with the balances)
    error: Exception | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


# ---------------------------------------------------------------------------------------- tenant ids


def normalise_tenant_id(raw: str | None) -> str:
    """Validate an organisation number (9 digits, mod 11) or, for sole proprietors, a personal
    number (11 digits). Returns the compact digits; raises ValueError with the reason."""
    value = (raw or "").strip()
    if not value:
        raise ValueError("has no organisation number")
    compact = orgnr.compact(value)
    if not compact.isdigit():
        raise ValueError(f"organisation number {value!r} is not numeric")
    if len(compact) == 9:
        if not orgnr.is_valid(compact):
            raise ValueError(f"organisation number {compact} fails the mod-11 check digit")
        return compact
    if len(compact) == 11:
        if not fodselsnummer.is_valid(compact):
            raise ValueError("personal number (11 digits) fails validation")
        return compact
    raise ValueError(f"organisation number {compact} must have 9 digits (or 11 for a personal number)")


def classify_clients(clients: list[Client], holders: Mapping[str, Client] | None = None) -> list[Client]:
    """Apply the client rules: a valid organisation/personal number, unique per integration.

    A client whose number another client already holds is rejected, the reason naming the holder
    (`holders`: number → the client holding it, e.g. from the warehouse). Clients that share a
    number no one holds yet: the lowest ERP client id holds it. Statuses already set by the
    connector (no API access) are kept. A client listed twice with identical details counts once."""
    return resolve_shared_numbers(apply_number_rules(clients), holders or {})


def apply_number_rules(clients: Iterable[Client]) -> list[Client]:
    """Normalise each client's number; reject those without a valid one (they cannot be activated)."""
    normalised: list[Client] = []
    for client in dict.fromkeys(clients):
        try:
            number = normalise_tenant_id(client.org_number)
        except ValueError as exc:
            normalised.append(
                replace(client, status=ClientStatus.REJECTED, status_reason=f"{exc}; it cannot be activated")
            )
            continue
        normalised.append(replace(client, org_number=number))
    return normalised


def resolve_shared_numbers(clients: Iterable[Client], holders: Mapping[str, Client]) -> list[Client]:
    """At most one client per organisation number: the holder in `holders` keeps its number;
    otherwise the lowest ERP client id among those listed takes it. Every other client with the
    number is rejected, naming the holder (`erp-pipelines clients activate` can move the number)."""
    clients = list(clients)
    claimants: dict[str, list[Client]] = {}
    for client in clients:
        if client.status != ClientStatus.REJECTED:
            claimants.setdefault(client.org_number, []).append(client)
    holder_of: dict[str, tuple[Client, bool]] = {}
    for number, group in claimants.items():
        held = holders.get(number)
        if held is not None:
            holder_of[number] = (held, False)
        elif len(group) > 1:
            holder_of[number] = (min(group, key=lambda c: client_id_order(c.erp_client_id)), True)
    result = []
    for client in clients:
        held = holder_of.get(client.org_number) if client.status != ClientStatus.REJECTED else None
        if held is not None and (held[0].connection, held[0].erp_client_id) != (client.connection, client.erp_client_id):
            holder, same_listing = held
            client = replace(client, status=ClientStatus.REJECTED,
                             status_reason=shared_number_reason(client, holder, same_listing=same_listing))
        result.append(client)
    return result


SHARED_NUMBER = "organisation number {number} is held by"


def shared_number_reason(client: Client, holder: Client, *, same_listing: bool = False) -> str:
    why = ("both appeared in the same first listing and the lower ERP client id holds it" if same_listing
           else "it held the number first")
    through = f" of connection {holder.connection}" if holder.connection != client.connection else ""
    return (f"{SHARED_NUMBER.format(number=client.org_number)} {holder.erp} client {holder.erp_client_id} "
            f"({holder.name}){through}: {why}. To move the number to this client: "
            f"erp-pipelines clients activate {client.erp} {client.org_number} --client-id {client.erp_client_id}")


def is_shared_number_rejection(client: Client) -> bool:
    """Rejected only because another client holds its (valid) number: activation can move it."""
    return client.status == ClientStatus.REJECTED and (client.status_reason or "").startswith(
        SHARED_NUMBER.format(number=client.org_number)
    )


def client_id_order(client_id: str) -> tuple[int, int | str]:
    """ERP client ids in numeric order where they are numbers (80014 before 100003)."""
    return (0, int(client_id)) if client_id.isdigit() else (1, client_id)


def first_repeat(keys: Iterable[Hashable]) -> Hashable | None:
    """The first key that occurs a second time, or None (duplicate rows must never land)."""
    seen: set[Hashable] = set()
    for key in keys:
        if key in seen:
            return key
        seen.add(key)
    return None


# ---------------------------------------------------------------------------------------- periods


def month_start(day: dt.date) -> dt.date:
    return day.replace(day=1)


def add_months(month: dt.date, n: int) -> dt.date:
    index = month.year * 12 + month.month - 1 + n
    return dt.date(index // 12, index % 12 + 1, 1)


def months_between(first: dt.date, last: dt.date) -> list[dt.date]:
    """Every first-of-month from `first` to `last`, both inclusive."""
    first, last = month_start(first), month_start(last)
    out = []
    while first <= last:
        out.append(first)
        first = add_months(first, 1)
    return out


def kroner(value) -> Decimal:
    """A JSON number or string in kroner as an exact two-decimal Decimal (never via float maths)."""
    if isinstance(value, float):
        value = repr(value)
    return Decimal(value).quantize(CENT)
