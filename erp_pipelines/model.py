"""Canonical records shared by every connector, the warehouse and the Dagster layer.

Sign convention: every amount is NOK as `Decimal` with two decimals, **debit positive, credit
negative**. Revenue and liabilities are therefore negative, as in a Norwegian trial balance
(saldobalanse). Connectors convert from the ERP's units (øre, say) and signs on the way in.
"""

from __future__ import annotations

import datetime as dt
import enum
from collections import Counter
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field, replace
from decimal import Decimal

from stdnum.no import fodselsnummer, orgnr

CENT = Decimal("0.01")


class ClientStatus(enum.StrEnum):
    OK = "ok"
    NO_API_ACCESS = "no_api_access"
    REJECTED = "rejected"
    REVOKED = "revoked"


@dataclass(frozen=True)
class Client:
    """One tenant (client company) as an ERP lists it."""

    erp: str
    org_number: str  # normalised digits; the raw value when rejected
    erp_client_id: str
    name: str
    status: ClientStatus = ClientStatus.OK
    status_reason: str | None = None

    @property
    def label(self) -> str:
        shown = self.org_number or "no organisation number"
        return f"{self.name} (orgnr {shown}, {self.erp} client {self.erp_client_id})"

    @property
    def is_active(self) -> bool:
        return self.status in (ClientStatus.OK, ClientStatus.NO_API_ACCESS)


@dataclass(frozen=True)
class Account:
    account_number: str
    name: str
    account_type: str | None = None
    standard_account: str | None = None


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


def classify_clients(clients: list[Client]) -> list[Client]:
    """Apply the client rules: a valid organisation/personal number, unique per integration.

    Every client sharing a number is rejected (attributing rows to the wrong company is worse than
    not loading them). Statuses already set by the connector (no API access) are kept. A client
    listed twice with identical details (one client, not two sharing a number) counts once."""
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
    counts = Counter(c.org_number for c in normalised if c.status != ClientStatus.REJECTED)
    result = []
    for client in normalised:
        if client.status != ClientStatus.REJECTED and counts[client.org_number] > 1:
            others = sorted(
                o.erp_client_id
                for o in normalised
                if o.org_number == client.org_number and o.erp_client_id != client.erp_client_id
            )
            client = replace(
                client,
                status=ClientStatus.REJECTED,
                status_reason=(
                    f"organisation number {client.org_number} is shared with client(s) {', '.join(others)}; "
                    "no two clients of one integration may share a number"
                ),
            )
        result.append(client)
    return result


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
