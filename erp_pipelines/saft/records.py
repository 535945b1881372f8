"""What a SAF-T Financial file yields: its header, chart of accounts, reconciliation issues, and the
error raised when a file is refused. Amounts are `Decimal` NOK, debit positive (see `model`)."""

from __future__ import annotations

import dataclasses
import datetime as dt
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

from erp_pipelines.accounts import saft_mapping
from erp_pipelines.errors import BadResponse
from erp_pipelines.model import Account, Balance

NAMESPACE = "urn:StandardAuditFile-Taxation-Financial:NO"
VERSION_1_20 = "1.20"
VERSION_1_30 = "1.30"
VERSIONS = (VERSION_1_20, VERSION_1_30)

REEXPORT = (
    "re-export the SAF-T Financial file from the ERP (complete, version 1.20 or 1.30) and drop it in again"
)
FIX_ORG_NUMBER = (
    "correct the organisation number in the ERP's company settings (Header/Company/RegistrationNumber), "
    "then re-export the SAF-T file"
)

# why a dropped file was not imported (the `reason` of `SaftFileRejected` and of the warehouse's
# `refused_files` rows) → the fix shown with it
NOT_XML, NOT_SAFT, TRUNCATED, MALFORMED, INVALID = "not_xml", "not_saft", "truncated", "malformed", "invalid"
CONTAINS_DTD, BAD_ZIP, INVALID_ORG_NUMBER = "contains_dtd", "bad_zip", "invalid_org_number"
IGNORED_TYPE = "ignored_type"  # not .xml/.zip: listed, never read
FIXES = {
    NOT_XML: "this is not an XML file (a CSV, Excel or PDF export renamed?): export SAF-T Financial (XML) "
    "from the ERP and drop that file in instead",
    NOT_SAFT: "this XML is not a SAF-T Financial file: export SAF-T Financial (not Cash Register or another "
    "XML format) from the ERP and drop that file in instead",
    TRUNCATED: "the file was cut off while being copied or exported: copy it again, or re-export it",
    MALFORMED: REEXPORT,
    INVALID: REEXPORT,
    CONTAINS_DTD: REEXPORT,
    BAD_ZIP: "zip exactly one SAF-T Financial .xml file per .zip, or drop the .xml itself",
    INVALID_ORG_NUMBER: FIX_ORG_NUMBER,
    IGNORED_TYPE: "only .xml and .zip files are imported: move other files out of the drop folder",
}


class SaftFileRejected(BadResponse):
    """A SAF-T file that cannot be imported. Nothing from it is returned.

    `code` says why (`FIXES`' keys: not_xml, not_saft, truncated, malformed, invalid, ...); `errors` holds the first few problems as "path: reason" lines (XSD errors, parse errors)."""

    def __init__(
        self,
        source_file: str | Path,
        reason: str,
        *,
        company: str | None = None,
        errors: tuple[str, ...] | list[str] = (),
        fix: str | None = None,
        code: str = INVALID,
    ):
        self.source_file = Path(source_file)
        self.reason = reason
        self.code = code  # one of FIXES' keys
        fix = fix or FIXES[code]
        self.errors = tuple(errors)
        message = f"SAF-T file {self.source_file.name!r} refused: {reason}"
        if self.errors:
            message += "\n" + "\n".join(f"  - {line}" for line in self.errors) + "\n"
        super().__init__(message, erp="saft", tenant=company, fix=fix)


@dataclass(frozen=True)
class RefusedFile:
    """A dropped file that was not imported, and why: a row of the warehouse's `refused_files`.
    Never holds the file's content."""

    file_name: str
    fingerprint: str  # sha256 of the content (of the XML inside, for a zip)
    reason: str  # a key of FIXES
    message: str
    fix: str

    def as_row(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class SaftHeader:
    """`AuditFile/Header`, plus the schema version the file is read with."""

    source_file: Path
    version: str  # detected schema version, "1.20" or "1.30" (see schemas.detect_version)
    declared_version: str  # Header/AuditFileVersion as written (the official examples say "1.0")
    registration_number: str  # Header/Company/RegistrationNumber as written
    org_number: str | None  # normalised; None when the number fails validation
    org_number_problem: str | None  # why it fails, when it does
    company_name: str
    date_created: dt.date | None
    software: str  # "SoftwareCompanyName SoftwareID SoftwareVersion"
    currency: str
    first_month: dt.date | None  # first day of the selection's first month
    last_month: dt.date | None  # first day of the selection's last month
    selection: str  # the selection as written, e.g. "periods 1/2017-4/2017" or "dates 2025-01-01..2025-12-31"

    @property
    def company_label(self) -> str:
        number = self.org_number or self.registration_number or "no organisation number"
        return f"{self.company_name or 'unnamed company'} (orgnr {number})"

    @property
    def fiscal_year(self) -> int | None:
        return self.first_month.year if self.first_month else None


@dataclass(frozen=True)
class SaftAccount:
    """`MasterFiles/GeneralLedgerAccounts/Account`; balances signed debit-minus-credit."""

    account_id: str
    description: str
    account_type: str
    standard_account_id: str | None  # 1.20
    grouping_category: str | None  # 1.30 (optional in 1.20)
    grouping_code: str | None
    opening: Decimal  # at the start of the file's selection
    closing: Decimal  # at its end

    def to_account(self) -> Account:
        """The canonical account: a 4-digit `StandardAccountID` in `standard_account`; a 2-digit one
        and the 1.30 grouping in `grouping_category`/`grouping_code`; the class from the number."""
        standard, category, code = saft_mapping(self.standard_account_id, self.grouping_category, self.grouping_code)
        return Account(self.account_id, self.description, self.account_type, standard, category, code)


@dataclass(frozen=True)
class ReconciliationIssue:
    """One mismatch between what a file declares and what its lines add up to. Never hidden."""

    org_number: str
    source_file: str
    # per file (saft.balances): closing_balance, total_debit, total_credit, number_of_entries,
    # opening_trial_balance, unbalanced_period, unknown_account, duplicate_account, period_mapping,
    # period_outside_selection,
    # no_period; across one company's files (erps.saft.combine): file_overlap, file_seam, coverage_gap
    check: str
    account_number: str | None
    period: dt.date | None  # first day of the month concerned
    expected: Decimal | None  # what the file declares
    actual: Decimal | None  # what the lines add up to
    message: str

    def as_row(self) -> dict:
        """The warehouse's `reconciliation` columns (`Warehouse.replace_reconciliation`)."""
        return {
            "org_number": self.org_number,
            "source": self.source_file,
            "check_name": self.check,
            "account_number": self.account_number,
            "period": self.period,
            "expected": self.expected,
            "actual": self.actual,
            "message": self.message,
        }


@dataclass(frozen=True)
class SaftImport:
    """One imported file: its chart, monthly balances and every reconciliation issue found."""

    header: SaftHeader
    accounts: tuple[SaftAccount, ...]
    balances: tuple[Balance, ...]
    issues: tuple[ReconciliationIssue, ...]
    months: tuple[dt.date, ...]  # the months covered, first days, ascending
    transactions: int
    lines: int
    line_debit: Decimal  # Σ DebitAmount/Amount over all lines
    line_credit: Decimal  # Σ CreditAmount/Amount
    validated_with: str  # "xmlschema" | "libxml2" | "not validated"
    period_mapping: str  # "calendar" | "transaction_date" (see balances.py)

    @property
    def chart(self) -> list[Account]:
        return [account.to_account() for account in self.accounts]
