"""Synthetic SAF-T Financial files (1.30 or 1.20) written from the truth ledger.

A file covers one calendar year (or a run of months inside it): the chart with the ledger's opening
balance at the first month and the closing after the last, then every voucher of those months as a
`Transaction` (Period = calendar month). Imported, it reproduces `tenant.balances(month)` to the øre.

Written as a stream, voucher by voucher, so `repeat` can blow a file up to gigabytes for benchmarks:
each voucher is then written `repeat` times (distinct TransactionIDs) and the declared closing
balances and totals are scaled to match (opening + repeat × movement).
"""

from __future__ import annotations

import calendar
import datetime as dt
import shutil
import zipfile
from collections.abc import Iterable
from pathlib import Path
from xml.sax.saxutils import escape

from erp_pipelines.model import months_between
from erp_pipelines.saft.records import NAMESPACE, VERSION_1_20, VERSION_1_30, VERSIONS
from erp_pipelines.sandbox.ledger import TruthTenant, Voucher, generate_ledger

# Truth chart → 1.30 næringsspesifikasjon (GroupingCategory, GroupingCode); tests check them against the list.
GROUPING_1_30: dict[int, tuple[str, str]] = {
    1200: ("balanseverdiForAnleggsmiddel", "1205"),
    1500: ("balanseverdiForOmloepsmiddel", "1500"),
    1570: ("balanseverdiForOmloepsmiddel", "1570"),
    1900: ("balanseverdiForOmloepsmiddel", "1900"),
    1920: ("balanseverdiForOmloepsmiddel", "1920"),
    2000: ("egenkapital", "2000"),
    2050: ("egenkapital", "2050"),
    2400: ("kortsiktigGjeld", "2400"),
    2600: ("kortsiktigGjeld", "2600"),
    2700: ("kortsiktigGjeld", "2740"),
    2710: ("kortsiktigGjeld", "2740"),
    2740: ("kortsiktigGjeld", "2740"),
    2770: ("kortsiktigGjeld", "2770"),
    2940: ("kortsiktigGjeld", "2949"),
    3000: ("salgsinntekt", "3000"),
    3100: ("salgsinntekt", "3100"),
    4000: ("varekostnad", "4005"),
    4300: ("varekostnad", "4005"),
    5000: ("loennskostnad", "5000"),
    5180: ("loennskostnad", "5000"),
    5400: ("loennskostnad", "5400"),
    6000: ("annenDriftskostnad", "6000"),
    6300: ("annenDriftskostnad", "6300"),
    6540: ("annenDriftskostnad", "6500"),
    6800: ("annenDriftskostnad", "6995"),
    6900: ("annenDriftskostnad", "6995"),
    7140: ("annenDriftskostnad", "7165"),
    7770: ("annenDriftskostnad", "7700"),
    8050: ("finansinntekt", "8050"),
    8150: ("finanskostnad", "8150"),
    8960: ("resultatDisponeringForSAF-T", "8800"),
}
# Truth chart → 1.20 StandardAccountID: the account number itself (it is in the 4-character list), except:
STANDARD_ACCOUNT_1_20: dict[int, str] = {5180: "5092"}

OUTPUT_VAT, INPUT_VAT = 2700, 2710
SALES_VAT_CODE, PURCHASE_VAT_CODE = "3", "1"  # company codes, mapped to the standard codes of the same number


def write_saft_file(
    tenant: TruthTenant,
    path: str | Path,
    version: str = VERSION_1_30,
    year: int = 2025,
    *,
    first_month: dt.date | None = None,
    last_month: dt.date | None = None,
    created: dt.date | None = None,
    repeat: int = 1,
) -> Path:
    """Write `tenant`'s ledger for `year` (or `first_month`..`last_month` inside it) as a SAF-T file."""
    if version not in VERSIONS:
        raise ValueError(f"version must be one of {VERSIONS}, not {version!r}")
    months = _file_months(tenant, year, first_month, last_month)
    vouchers = [v for v in tenant.vouchers if months[0] <= v.date.replace(day=1) <= months[-1]]
    created = created or dt.date(year + 1, 1, 15)
    path = Path(path)
    with open(path, "w", encoding="utf-8", newline="\n", buffering=1 << 20) as out:
        out.write(f'<?xml version="1.0" encoding="UTF-8"?>\n<AuditFile xmlns="{NAMESPACE}">\n')
        out.write(_header(tenant, version, months, created))
        out.write(_master_files(tenant, version, months, repeat))
        out.write(_entries_opening(vouchers, repeat))
        for voucher in vouchers:
            body = _transaction_body(voucher, version)
            for copy in range(repeat):
                tid = str(voucher.number) if repeat == 1 else f"{voucher.number}-{copy + 1}"
                out.write(f"\t\t\t<Transaction>\n\t\t\t\t<TransactionID>{tid}</TransactionID>\n{body}")
        out.write("\t\t</Journal>\n\t</GeneralLedgerEntries>\n</AuditFile>\n")
    return path


def write_demo_drop(drop_dir: str | Path, *, seed: int = 4711) -> list[Path]:
    """A drop folder for `make demo`: three companies (own ledger, 2024–2025) that all reconcile.

    - company 1: 2024 as a 1.20 file and 2025 as a 1.30 file (two fiscal years, one tenant);
    - company 2: an export of January–June 2025, then a newer export of the whole of 2025 (overlap: the
      newer file wins; it agrees, so nothing is reported);
    - company 3: 2025 as a 1.30 file inside a zip.
    """
    drop_dir = Path(drop_dir)
    drop_dir.mkdir(parents=True, exist_ok=True)
    ledger = generate_ledger(
        3,
        seed=seed,
        first_month=dt.date(2024, 1, 1),
        last_month=dt.date(2025, 12, 1),
        rejected_fixtures=False,
        client_id_base=90_000,
    )
    first, second, third = ledger.tenants
    paths = [
        write_saft_file(first, drop_dir / f"SAF-T_{first.org_number}_2024.xml", VERSION_1_20, 2024),
        write_saft_file(first, drop_dir / f"SAF-T_{first.org_number}_2025.xml", VERSION_1_30, 2025),
        write_saft_file(
            second,
            drop_dir / f"SAF-T_{second.org_number}_2025H1.xml",
            VERSION_1_30,
            2025,
            last_month=dt.date(2025, 6, 1),
            created=dt.date(2025, 7, 10),
        ),
        write_saft_file(second, drop_dir / f"SAF-T_{second.org_number}_2025.xml", VERSION_1_30, 2025),
    ]
    xml = write_saft_file(third, drop_dir / f"SAF-T_{third.org_number}_2025.xml", VERSION_1_30, 2025)
    archive = zip_file(xml)
    xml.unlink()
    return [*paths, archive]


def zip_file(xml: Path, *, member_time: tuple[int, ...] = (2026, 1, 1, 0, 0, 0)) -> Path:
    """`xml` zipped next to it (same name, .zip). A fixed member timestamp: the same XML always gives
    the same zip (the importer fingerprints the XML inside either way)."""
    archive = xml.with_suffix(".zip")
    member = zipfile.ZipInfo(xml.name, date_time=member_time)
    member.compress_type = zipfile.ZIP_DEFLATED
    with zipfile.ZipFile(archive, "w") as zipped, open(xml, "rb") as source, zipped.open(member, "w") as target:
        shutil.copyfileobj(source, target, 1 << 20)
    return archive


def _file_months(
    tenant: TruthTenant, year: int, first: dt.date | None, last: dt.date | None
) -> list[dt.date]:
    first = max(first or dt.date(year, 1, 1), tenant.first_month)
    last = min(last or dt.date(year, 12, 1), tenant.last_month)
    if first.year != year or last.year != year or first > last:
        raise ValueError(
            f"no months of {year} in the ledger ({tenant.first_month:%Y-%m}..{tenant.last_month:%Y-%m})"
        )
    return months_between(first, last)


def _kroner(ore: int) -> str:
    """Non-negative øre as a two-decimal string (no float)."""
    return f"{ore // 100}.{ore % 100:02d}"


def _balance(kind: str, ore: int) -> str:
    """`<OpeningDebitBalance>` or `<OpeningCreditBalance>` (kind "Opening"/"Closing") by the sign of `ore`."""
    name = f"{kind}{'Debit' if ore >= 0 else 'Credit'}Balance"
    return f"\t\t\t\t<{name}>{_kroner(abs(ore))}</{name}>\n"


def _header(tenant: TruthTenant, version: str, months: list[dt.date], created: dt.date) -> str:
    if version == VERSION_1_30:
        last_day = months[-1].replace(day=calendar.monthrange(months[-1].year, months[-1].month)[1])
        selection = (
            f"\t\t\t<SelectionStartDate>{months[0].isoformat()}</SelectionStartDate>\n"
            f"\t\t\t<SelectionEndDate>{last_day.isoformat()}</SelectionEndDate>\n"
        )
    else:
        selection = (
            f"\t\t\t<PeriodStart>{months[0].month}</PeriodStart>\n\t\t\t<PeriodStartYear>{months[0].year}</PeriodStartYear>\n"
            f"\t\t\t<PeriodEnd>{months[-1].month}</PeriodEnd>\n\t\t\t<PeriodEndYear>{months[-1].year}</PeriodEndYear>\n"
        )
    return (
        "\t<Header>\n"
        f"\t\t<AuditFileVersion>{version}</AuditFileVersion>\n"
        "\t\t<AuditFileCountry>NO</AuditFileCountry>\n"
        f"\t\t<AuditFileDateCreated>{created.isoformat()}</AuditFileDateCreated>\n"
        "\t\t<SoftwareCompanyName>erp-pipelines sandbox</SoftwareCompanyName>\n"
        "\t\t<SoftwareID>truth-ledger</SoftwareID>\n"
        "\t\t<SoftwareVersion>1.0</SoftwareVersion>\n"
        "\t\t<Company>\n"
        f"\t\t\t<RegistrationNumber>{escape(tenant.org_number)}</RegistrationNumber>\n"
        f"\t\t\t<Name>{escape(tenant.name)}</Name>\n"
        "\t\t\t<Address>\n\t\t\t\t<StreetName>Storgata 1</StreetName>\n\t\t\t\t<City>Oslo</City>\n"
        "\t\t\t\t<PostalCode>0155</PostalCode>\n\t\t\t\t<Country>NO</Country>\n\t\t\t</Address>\n"
        "\t\t\t<Contact>\n\t\t\t\t<ContactPerson>\n\t\t\t\t\t<FirstName>Kari</FirstName>\n"
        "\t\t\t\t\t<LastName>Nordmann</LastName>\n\t\t\t\t</ContactPerson>\n"
        "\t\t\t\t<Telephone>22000000</Telephone>\n\t\t\t</Contact>\n"
        "\t\t</Company>\n"
        "\t\t<DefaultCurrencyCode>NOK</DefaultCurrencyCode>\n"
        f"\t\t<SelectionCriteria>\n{selection}\t\t</SelectionCriteria>\n"
        "\t\t<TaxAccountingBasis>A</TaxAccountingBasis>\n"
        "\t</Header>\n"
    )


def _mapping(number: int, version: str) -> str:
    if version == VERSION_1_20:
        standard = STANDARD_ACCOUNT_1_20.get(number, str(number))
        return f"\t\t\t\t<StandardAccountID>{standard}</StandardAccountID>\n"
    category, code = GROUPING_1_30[number]
    return (
        f"\t\t\t\t<GroupingCategory>{category}</GroupingCategory>\n"
        f"\t\t\t\t<GroupingCode>{code}</GroupingCode>\n"
    )


def _master_files(tenant: TruthTenant, version: str, months: list[dt.date], repeat: int) -> str:
    opening = {b.account.number: b.opening for b in tenant.balances(months[0])}
    movement = dict.fromkeys(opening, 0)
    for month in months:
        for b in tenant.balances(month):
            movement[b.account.number] += b.movement
    parts = ["\t<MasterFiles>\n\t\t<GeneralLedgerAccounts>\n"]
    for account in tenant.accounts:
        start = opening[account.number]
        end = start + repeat * movement[account.number]
        parts.append(
            "\t\t\t<Account>\n"
            f"\t\t\t\t<AccountID>{account.number}</AccountID>\n"
            f"\t\t\t\t<AccountDescription>{escape(account.name)}</AccountDescription>\n"
            f"{_mapping(account.number, version)}"
            "\t\t\t\t<AccountType>GL</AccountType>\n"
            f"{_balance('Opening', start)}{_balance('Closing', end)}"
            "\t\t\t</Account>\n"
        )
    parts.append("\t\t</GeneralLedgerAccounts>\n")
    parts.append(_tax_table())
    parts.append("\t</MasterFiles>\n")
    return "".join(parts)


def _tax_table() -> str:
    def code(tax_code: str, text: str) -> str:
        return (
            "\t\t\t\t<TaxCodeDetails>\n"
            f"\t\t\t\t\t<TaxCode>{tax_code}</TaxCode>\n\t\t\t\t\t<Description>{text}</Description>\n"
            "\t\t\t\t\t<TaxPercentage>25</TaxPercentage>\n\t\t\t\t\t<Country>NO</Country>\n"
            f"\t\t\t\t\t<StandardTaxCode>{tax_code}</StandardTaxCode>\n\t\t\t\t\t<BaseRate>100</BaseRate>\n"
            "\t\t\t\t</TaxCodeDetails>\n"
        )

    return (
        "\t\t<TaxTable>\n\t\t\t<TaxTableEntry>\n\t\t\t\t<TaxType>MVA</TaxType>\n"
        "\t\t\t\t<Description>Merverdiavgift</Description>\n"
        f"{code(PURCHASE_VAT_CODE, 'Fradrag inngående avgift, alminnelig sats')}"
        f"{code(SALES_VAT_CODE, 'Utgående avgift, alminnelig sats')}"
        "\t\t\t</TaxTableEntry>\n\t\t</TaxTable>\n"
    )


def _entries_opening(vouchers: Iterable[Voucher], repeat: int) -> str:
    count = debit = credit = 0
    for voucher in vouchers:
        count += 1
        for _, amount in voucher.lines:
            if amount >= 0:
                debit += amount
            else:
                credit -= amount
    return (
        "\t<GeneralLedgerEntries>\n"
        f"\t\t<NumberOfEntries>{count * repeat}</NumberOfEntries>\n"
        f"\t\t<TotalDebit>{_kroner(debit * repeat)}</TotalDebit>\n"
        f"\t\t<TotalCredit>{_kroner(credit * repeat)}</TotalCredit>\n"
        "\t\t<Journal>\n\t\t\t<JournalID>GL</JournalID>\n"
        "\t\t\t<Description>Hovedbok</Description>\n\t\t\t<Type>GL</Type>\n"
    )


def _transaction_body(voucher: Voucher, version: str) -> str:
    """Everything of a `<Transaction>` after its TransactionID (rendered once, written `repeat` times)."""
    day = voucher.date.isoformat()
    text = escape(voucher.description)
    parts = [
        f"\t\t\t\t<Period>{voucher.date.month}</Period>\n",
        f"\t\t\t\t<PeriodYear>{voucher.date.year}</PeriodYear>\n",
        f"\t\t\t\t<TransactionDate>{day}</TransactionDate>\n",
    ]
    if version == VERSION_1_30:
        parts.append(
            f"\t\t\t\t<VoucherType>{text}</VoucherType>\n\t\t\t\t<VoucherDescription>{text}</VoucherDescription>\n"
        )
    parts.append(
        f"\t\t\t\t<Description>{text} {voucher.number}</Description>\n"
        f"\t\t\t\t<SystemEntryDate>{day}</SystemEntryDate>\n\t\t\t\t<GLPostingDate>{day}</GLPostingDate>\n"
    )
    taxes = _tax_lines(voucher)
    for record, (account, amount) in enumerate(voucher.lines, start=1):
        side = "DebitAmount" if amount >= 0 else "CreditAmount"
        parts.append(
            "\t\t\t\t<Line>\n"
            f"\t\t\t\t\t<RecordID>{record}</RecordID>\n\t\t\t\t\t<AccountID>{account}</AccountID>\n"
            f"\t\t\t\t\t<ValueDate>{day}</ValueDate>\n\t\t\t\t\t<SourceDocumentID>{voucher.number}</SourceDocumentID>\n"
            f"\t\t\t\t\t<Description>{text}</Description>\n"
            f"\t\t\t\t\t<{side}>\n\t\t\t\t\t\t<Amount>{_kroner(abs(amount))}</Amount>\n\t\t\t\t\t</{side}>\n"
            f"{_tax_information(taxes.get(record), version)}"
            "\t\t\t\t</Line>\n"
        )
    parts.append("\t\t\t</Transaction>\n")
    return "".join(parts)


def _tax_lines(voucher: Voucher) -> dict[int, tuple[str, int, int]]:
    """RecordID of the base line → (tax code, base, VAT signed) for sales/purchase vouchers with VAT."""
    vat = {account: amount for account, amount in voucher.lines if account in (OUTPUT_VAT, INPUT_VAT)}
    found: dict[int, tuple[str, int, int]] = {}
    for record, (account, amount) in enumerate(voucher.lines, start=1):
        if OUTPUT_VAT in vat and 3000 <= account < 4000:
            found[record] = (SALES_VAT_CODE, -amount, vat[OUTPUT_VAT])
        elif INPUT_VAT in vat and 4000 <= account < 8000:
            found[record] = (PURCHASE_VAT_CODE, amount, vat[INPUT_VAT])
    return found


def _tax_information(tax: tuple[str, int, int] | None, version: str) -> str:
    if tax is None:
        return ""
    code, base, vat = tax
    if version == VERSION_1_30:
        element = "DebitTaxAmount" if vat >= 0 else "CreditTaxAmount"
    else:
        element = "TaxAmount"
    return (
        "\t\t\t\t\t<TaxInformation>\n\t\t\t\t\t\t<TaxType>MVA</TaxType>\n"
        f"\t\t\t\t\t\t<TaxCode>{code}</TaxCode>\n\t\t\t\t\t\t<TaxPercentage>25</TaxPercentage>\n"
        f"\t\t\t\t\t\t<TaxBase>{_kroner(abs(base))}</TaxBase>\n"
        f"\t\t\t\t\t\t<{element}>\n\t\t\t\t\t\t\t<Amount>{_kroner(abs(vat))}</Amount>\n\t\t\t\t\t\t</{element}>\n"
        "\t\t\t\t\t</TaxInformation>\n"
    )
