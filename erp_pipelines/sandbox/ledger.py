"""The deterministic truth ledger every ERP simulator serves.

Tenants get valid organisation numbers, a chart of accounts from the Norwegian standard chart
(NS 4102) and monthly double-entry vouchers. Amounts are integer øre, so every balance is exact.
Profit-and-loss accounts (3000-8999) start each fiscal year at zero (calendar years unless a tenant
has `fiscal_year_start_month`). Every completed year ends with a closing voucher on its last day
(årsoppgjør: 8960 against 2050, annen egenkapital), so the profit and loss accounts sum to zero at year end, each balance-sheet account's January opening equals its
December closing, and every month's trial balance sums to zero. An API that reports only closing
balances at a date can therefore be reproduced exactly.
"""

from __future__ import annotations

import datetime as dt
import functools
import random
from dataclasses import dataclass, field
from decimal import Decimal

from stdnum.no import fodselsnummer, orgnr

from erp_pipelines.model import Balance, add_months, months_between

# (number, name, type, SAF-T standard account / grouping code)
CHART: tuple[tuple[int, str, str], ...] = (
    (1200, "Maskiner og anlegg", "ASSETS"),
    (1500, "Kundefordringer", "ASSETS"),
    (1570, "Andre kortsiktige fordringer", "ASSETS"),
    (1900, "Kontanter", "ASSETS"),
    (1920, "Bankinnskudd", "ASSETS"),
    (2000, "Aksjekapital", "EQUITY"),
    (2050, "Annen egenkapital", "EQUITY"),
    (2400, "Leverandørgjeld", "LIABILITIES"),
    (2600, "Forskuddstrekk", "LIABILITIES"),
    (2700, "Utgående merverdiavgift, høy sats", "LIABILITIES"),
    (2710, "Inngående merverdiavgift, høy sats", "LIABILITIES"),
    (2740, "Oppgjørskonto merverdiavgift", "LIABILITIES"),
    (2770, "Skyldig arbeidsgiveravgift", "LIABILITIES"),
    (2940, "Skyldige feriepenger", "LIABILITIES"),
    (3000, "Salgsinntekt, avgiftspliktig", "OPERATING_REVENUES"),
    (3100, "Salgsinntekt, avgiftsfri", "OPERATING_REVENUES"),
    (4000, "Innkjøp av råvarer og halvfabrikata", "OPERATING_EXPENSES"),
    (4300, "Innkjøp av varer for videresalg", "OPERATING_EXPENSES"),
    (5000, "Lønn til ansatte", "OPERATING_EXPENSES"),
    (5180, "Påløpte feriepenger", "OPERATING_EXPENSES"),
    (5400, "Arbeidsgiveravgift", "OPERATING_EXPENSES"),
    (6000, "Avskrivning på bygninger og annen fast eiendom", "OPERATING_EXPENSES"),
    (6300, "Leie lokale", "OPERATING_EXPENSES"),
    (6540, "Inventar", "OPERATING_EXPENSES"),
    (6800, "Kontorrekvisita", "OPERATING_EXPENSES"),
    (6900, "Elektronisk kommunikasjon", "OPERATING_EXPENSES"),
    (7140, "Reisekostnad, ikke oppgavepliktig", "OPERATING_EXPENSES"),
    (7770, "Bank og kortgebyrer", "OPERATING_EXPENSES"),
    (8050, "Annen renteinntekt", "INVESTMENT_INCOME"),
    (8150, "Annen rentekostnad", "COST_OF_CAPITAL"),
    (8960, "Overføringer annen egenkapital", "TRANSFERS_AND_ALLOCATIONS"),
)
RETAINED_EARNINGS = 2050
RESULT_TRANSFER = 8960

COMPANY_WORDS = (
    "Fjord", "Nordlys", "Bergtind", "Havblikk", "Solvik", "Granli", "Elvebakken", "Stavne", "Lyngheim",
    "Furuly", "Skogsrud", "Vestkyst", "Polar", "Kvernhus", "Bryggen", "Sandnes", "Tindholm", "Vidde",
)
TRADES = ("Regnskap", "Bygg", "Elektro", "Transport", "Rørlegger", "Handel", "Eiendom", "Consulting", "Sjømat")


def make_org_number(seed: int) -> str:
    """A valid 9-digit organisation number (starts with 8 or 9, mod-11 check digit)."""
    n = seed
    while True:
        body = f"{8 + (n % 2)}{(n * 7919 + 104729) % 10_000_000:07d}"
        check = orgnr.checksum(body + "0")  # checksum of body+0 tells the digit that makes it 0
        digit = (11 - check) % 11 if check else 0
        if digit != 10:
            candidate = body + str(digit)
            if orgnr.is_valid(candidate):
                return candidate
        n += 100_003


def make_personal_number(seed: int) -> str:
    """A valid synthetic fødselsnummer (sole proprietors without an organisation number)."""
    rng = random.Random(seed)
    while True:
        born = dt.date(1960, 1, 1) + dt.timedelta(days=rng.randrange(0, 15000))
        base = born.strftime("%d%m%y") + f"{rng.randrange(0, 500):03d}"
        k1 = fodselsnummer.calc_check_digit1(base)
        k2 = fodselsnummer.calc_check_digit2(base + k1)
        candidate = base + k1 + k2
        if len(candidate) == 11 and fodselsnummer.is_valid(candidate):
            return candidate


def _kr(ore: int) -> Decimal:
    return Decimal(ore).scaleb(-2)


@dataclass(frozen=True)
class TruthAccount:
    number: int
    name: str
    type: str

    @property
    def is_profit_and_loss(self) -> bool:
        return self.number >= 3000


@dataclass(frozen=True)
class Voucher:
    date: dt.date
    number: int
    description: str
    lines: tuple[tuple[int, int], ...]  # (account number, amount in øre, debit positive)


@dataclass(frozen=True)
class MonthBalance:
    account: TruthAccount
    opening: int  # øre, debit positive
    movement: int

    @property
    def closing(self) -> int:
        return self.opening + self.movement


@dataclass
class TruthTenant:
    index: int
    erp_client_id: int
    org_number: str  # as the ERP shows it; may be empty or invalid for the rejected fixtures
    name: str
    company_type: str
    seed: int
    first_month: dt.date
    last_month: dt.date
    accounts: tuple[TruthAccount, ...] = field(default_factory=tuple)
    expected_status: str = "ok"  # what the client rules must conclude: ok | rejected
    fiscal_year_start_month: int = 1  # 1: calendar years; else profit and loss restarts in this month

    def use_fiscal_year_start(self, month: int) -> None:
        """A non-calendar fiscal year (set by a simulator before anything is read)."""
        self.fiscal_year_start_month = month
        for cached in ("vouchers", "_monthly"):
            self.__dict__.pop(cached, None)

    def fiscal_year_of(self, day: dt.date) -> int:
        """The calendar year in which the fiscal year holding `day` starts."""
        return day.year if day.month >= self.fiscal_year_start_month else day.year - 1

    @functools.cached_property
    def vouchers(self) -> tuple[Voucher, ...]:
        return tuple(_generate_vouchers(self))

    @functools.cached_property
    def _monthly(self) -> dict[dt.date, dict[int, tuple[int, int]]]:
        movements: dict[dt.date, dict[int, int]] = {}
        for voucher in self.vouchers:
            month = voucher.date.replace(day=1)
            bucket = movements.setdefault(month, {})
            for account, amount in voucher.lines:
                bucket[account] = bucket.get(account, 0) + amount
        result: dict[dt.date, dict[int, tuple[int, int]]] = {}
        running = {a.number: 0 for a in self.accounts}
        for month in months_between(self.first_month, self.last_month):
            if month.month == self.fiscal_year_start_month and month != self.first_month:
                # the year-end closing voucher left the profit and loss summing to zero
                assert sum(v for n, v in running.items() if n >= 3000) == 0, "year-end closing missing"
                for n in running:
                    if n >= 3000:
                        running[n] = 0
            moves = movements.get(month, {})
            result[month] = {n: (running[n], moves.get(n, 0)) for n in running}
            for n, v in moves.items():
                running[n] += v
        return result

    @property
    def months(self) -> list[dt.date]:
        return months_between(self.first_month, self.last_month)

    def balances(self, month: dt.date) -> list[MonthBalance]:
        """Every account's opening and movement for a month (øre). Outside the ledger: empty."""
        by_account = self._monthly.get(month.replace(day=1))
        if by_account is None:
            return []
        return [MonthBalance(a, *by_account[a.number]) for a in self.accounts]

    def expected_balances(self, months: list[dt.date]) -> list[Balance]:
        """The canonical rows a correct extraction lands for these months (all-zero rows left out)."""
        rows = []
        for month in months:
            for b in self.balances(month):
                if b.opening or b.movement or b.closing:  # as extract.py drops zero rows
                    rows.append(Balance(month, str(b.account.number), _kr(b.opening), _kr(b.movement), _kr(b.closing)))
        return rows

    def account(self, number: int) -> TruthAccount:
        return next(a for a in self.accounts if a.number == number)


def _generate_vouchers(tenant: TruthTenant) -> list[Voucher]:
    rng = random.Random(tenant.seed)
    vouchers: list[Voucher] = []
    number = 1

    def add(day: dt.date, text: str, *lines: tuple[int, int]) -> None:
        nonlocal number
        assert sum(amount for _, amount in lines) == 0, "voucher must balance"
        vouchers.append(Voucher(day, number, text, tuple(lines)))
        number += 1

    cash = 50_000_00 + rng.randrange(0, 1_000_000_00) + rng.randrange(0, 100)
    add(tenant.first_month, "Åpningsbalanse", (1920, cash), (1200, 120_000_00), (2000, -30_000_00),
        (2050, -(cash + 120_000_00 - 30_000_00)))
    for month in months_between(tenant.first_month, tenant.last_month):
        def day(d: int, month=month) -> dt.date:
            return month.replace(day=min(d, 28))

        for _ in range(rng.randrange(2, 5)):
            net = rng.randrange(5_000_00, 250_000_00) + rng.randrange(0, 100)
            vat = net * 25 // 100
            add(day(rng.randrange(1, 28)), "Salgsfaktura", (1500, net + vat), (3000, -net), (2700, -vat))
        free_sale = rng.randrange(1_000_00, 40_000_00) + rng.randrange(0, 100)
        add(day(12), "Salg avgiftsfritt", (1500, free_sale), (3100, -free_sale))
        received = rng.randrange(10_000_00, 300_000_00) + rng.randrange(0, 100)
        add(day(20), "Innbetaling kunde", (1920, received), (1500, -received))
        for account in (4000, 4300, 6800, 6900, 6540):
            if rng.random() < 0.7:
                net = rng.randrange(500_00, 60_000_00) + rng.randrange(0, 100)
                vat = net * 25 // 100
                add(day(rng.randrange(1, 28)), "Leverandørfaktura", (account, net), (2710, vat), (2400, -(net + vat)))
        paid = rng.randrange(5_000_00, 150_000_00) + rng.randrange(0, 100)
        add(day(25), "Betaling leverandør", (2400, paid), (1920, -paid))
        gross = rng.randrange(30_000_00, 90_000_00)
        tax = gross * 35 // 100
        employer = gross * 141 // 1000
        holiday = gross * 12 // 100
        add(day(25), "Lønn", (5000, gross), (2600, -tax), (1920, -(gross - tax)))
        add(day(25), "Arbeidsgiveravgift", (5400, employer), (2770, -employer))
        add(day(28), "Feriepenger", (5180, holiday), (2940, -holiday))
        rent = rng.randrange(8_000_00, 40_000_00)
        add(day(1), "Husleie", (6300, rent), (1920, -rent))
        fee = rng.randrange(50_00, 900_00) + rng.randrange(0, 100)
        add(day(28), "Bankgebyr", (7770, fee), (1920, -fee))
        if month.month % 3 == 0:
            interest = rng.randrange(100_00, 5_000_00) + rng.randrange(0, 100)
            add(day(28), "Renteinntekt", (1920, interest), (8050, -interest))
            cost = rng.randrange(100_00, 3_000_00)
            add(day(28), "Rentekostnad", (8150, cost), (1920, -cost))
        if month.month % 2 == 0:
            settle = rng.randrange(1_000_00, 30_000_00)
            add(day(15), "Mva-oppgjør", (2700, settle), (2740, -settle))
        if rng.random() < 0.3:
            petty = rng.randrange(100_00, 3_000_00) + rng.randrange(0, 100)
            add(day(2), "Kontantuttak", (1900, petty), (1920, -petty))
            add(day(rng.randrange(3, 28)), "Reise", (7140, petty), (1900, -petty))
        if rng.random() < 0.2:
            add(day(10), "Forskudd", (1570, 2_500_00), (1920, -2_500_00))
        if add_months(month, 1).month == tenant.fiscal_year_start_month and month < tenant.last_month:
            year = tenant.fiscal_year_of(month)
            result = sum(amount for v in vouchers if tenant.fiscal_year_of(v.date) == year
                         for account, amount in v.lines if account >= 3000)
            if result:
                add(add_months(month, 1) - dt.timedelta(days=1), "Årsoppgjør", (RESULT_TRANSFER, -result),
                    (RETAINED_EARNINGS, result))
    return vouchers


@dataclass
class TruthLedger:
    """The tenants of one simulated ERP installation (one accounting firm's client list)."""

    tenants: list[TruthTenant]
    first_month: dt.date
    last_month: dt.date

    def by_client_id(self, client_id: int) -> TruthTenant | None:
        return self._by_id.get(client_id)

    def add_tenant(self, tenant: TruthTenant) -> None:
        """Add a tenant at runtime (a newly granted client), keeping the id index current."""
        self.tenants.append(tenant)
        self._by_id[tenant.erp_client_id] = tenant

    def by_org_number(self, org_number: str) -> list[TruthTenant]:
        return [t for t in self.tenants if t.org_number == org_number]

    @functools.cached_property
    def _by_id(self) -> dict[int, TruthTenant]:
        return {t.erp_client_id: t for t in self.tenants}

    @property
    def valid_tenants(self) -> list[TruthTenant]:
        return [t for t in self.tenants if t.expected_status == "ok"]


def generate_ledger(
    tenants: int = 12,
    *,
    seed: int = 2026,
    first_month: dt.date = dt.date(2025, 1, 1),
    last_month: dt.date | None = None,
    rejected_fixtures: bool = True,
    client_id_base: int = 80_000,
) -> TruthLedger:
    """`tenants` valid tenants, plus (by default) the fixtures the client rules must reject:
    one without an organisation number, one with a bad check digit, two sharing one number.
    One valid tenant is a sole proprietorship keyed by a personal number."""
    last_month = last_month or add_months(dt.date.today().replace(day=1), 0)
    chart = tuple(TruthAccount(n, name, kind) for n, name, kind in CHART)
    rng = random.Random(seed)
    rows: list[TruthTenant] = []
    used: set[str] = set()
    for i in range(tenants):
        number = make_org_number(seed * 1_000_003 + i)
        while number in used:
            number = make_org_number(rng.randrange(1, 10**9))
        used.add(number)
        company_type = "AS"
        if i == 3 and tenants > 4:
            number = make_personal_number(seed + i)
            company_type = "ENK"
        words = COMPANY_WORDS[(i * 7 + seed) % len(COMPANY_WORDS)], TRADES[(i * 5 + seed // 7) % len(TRADES)]
        suffix = "" if company_type == "ENK" else " AS"
        name = f"{words[0]} {words[1]}{'' if i < len(COMPANY_WORDS) else f' {i}'}{suffix}"
        rows.append(
            TruthTenant(
                index=i,
                erp_client_id=client_id_base + i,
                org_number=number,
                name=name,
                company_type=company_type,
                seed=seed * 7_919 + i,
                first_month=first_month,
                last_month=last_month,
                accounts=chart,
            )
        )
    if rejected_fixtures:
        base = client_id_base + tenants
        bad_checksum = make_org_number(seed + 424242)
        bad_checksum = bad_checksum[:-1] + str((int(bad_checksum[-1]) + 1) % 10)
        shared = make_org_number(seed + 777)
        fixtures = [  # the client rules reject all but the first holder of the shared number (the lower id)
            ("Uten Orgnr Testklient", "", "AS", "rejected"),
            ("Feil Kontrollsiffer AS", bad_checksum, "AS", "rejected"),
            ("Dobbel Registrert AS", shared, "AS", "ok"),
            ("Dobbel Registrert Kopi AS", shared, "AS", "rejected"),
        ]
        for j, (name, number, company_type, status) in enumerate(fixtures):
            rows.append(
                TruthTenant(
                    index=tenants + j,
                    erp_client_id=base + j,
                    org_number=number,
                    name=name,
                    company_type=company_type,
                    # the copy keeps the books of the client whose number it shares (a test copy)
                    seed=seed * 7_919 + tenants + (j - 1 if name.endswith("Kopi AS") else j),
                    first_month=first_month,
                    last_month=last_month,
                    accounts=chart,
                    expected_status=status,
                )
            )
    return TruthLedger(rows, first_month, last_month)
