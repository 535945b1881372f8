"""Streaming reads of a SAF-T Financial file (lxml iterparse, every element dropped once read).

- `read_header`: the Header and the version, stopping at the first Transaction at the latest (cheap).
- `parse_file`: one pass over the whole file: the chart of accounts, every Line aggregated per
  (AccountID, PeriodYear, Period, TransactionDate month) as debit − credit, and the declared totals.
  Memory holds the aggregates only (accounts × periods), never the transactions.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path

from lxml import etree

from erp_pipelines.model import normalise_tenant_id
from erp_pipelines.saft.records import (
    CONTAINS_DTD,
    MALFORMED,
    NAMESPACE,
    NOT_SAFT,
    SaftAccount,
    SaftFileRejected,
    SaftHeader,
)
from erp_pipelines.saft.safety import (
    check_envelope,
    iterparse,
    open_xml,
    refuse_doctype,
    refuse_unless_saft_root,
)
from erp_pipelines.saft.schemas import DEFAULT_VERSION, declared_version, version_hint

ZERO = Decimal(0)


def q(name: str) -> str:
    return f"{{{NAMESPACE}}}{name}"


AUDIT_FILE = q("AuditFile")
HEADER = q("Header")
MASTER_FILES = q("MasterFiles")
GL_ACCOUNTS = q("GeneralLedgerAccounts")
ACCOUNT = q("Account")
GL_ENTRIES = q("GeneralLedgerEntries")
JOURNAL = q("Journal")
TRANSACTION = q("Transaction")
TRANSACTION_ID = q("TransactionID")
PERIOD = q("Period")
PERIOD_YEAR = q("PeriodYear")
TRANSACTION_DATE = q("TransactionDate")
LINE = q("Line")
ACCOUNT_ID = q("AccountID")
DEBIT_AMOUNT = q("DebitAmount")
CREDIT_AMOUNT = q("CreditAmount")
AMOUNT = q("Amount")
TOTALS = (NUMBER_OF_ENTRIES, TOTAL_DEBIT, TOTAL_CREDIT) = (
    q("NumberOfEntries"),
    q("TotalDebit"),
    q("TotalCredit"),
)
# big repeated elements outside what is read, dropped as they end so memory stays flat
DROPPED = tuple(
    q(n) for n in ("Customer", "Supplier", "Invoice", "Payment", "StockMovement", "AssetTransaction")
)
SCANNED = (ACCOUNT, q("Customer"), q("Supplier"), TRANSACTION)
SECTIONS = (HEADER, MASTER_FILES, JOURNAL, q("SourceDocuments"))


@dataclass
class ParsedFile:
    """What one pass over a file found. Movements are keyed (AccountID, PeriodYear, Period, "YYYY-MM" of
    TransactionDate); the date month only matters for periods that are not calendar months."""

    header: SaftHeader
    accounts: dict[str, SaftAccount] = field(default_factory=dict)
    duplicate_accounts: list[SaftAccount] = field(
        default_factory=list
    )  # later Accounts with a seen AccountID
    movements: dict[tuple[str, int, int, str], Decimal] = field(default_factory=dict)
    transactions: int = 0
    lines: int = 0
    line_debit: Decimal = ZERO
    line_credit: Decimal = ZERO
    has_entries: bool = False
    declared_entries: int | None = None
    declared_debit: Decimal | None = None
    declared_credit: Decimal | None = None
    last_transaction_id: str | None = None


# ---------------------------------------------------------------------------------------- header


def read_header(path: str | Path) -> SaftHeader:
    """Header and version of a file, after the envelope checks (DTD, truncation). Not validated."""
    path = Path(path)
    check_envelope(path)
    with open_xml(path) as stream:
        try:
            header, version = _scan_header(path, iterparse(stream, events=("start", "end")))
        except etree.XMLSyntaxError as exc:
            raise SaftFileRejected(path, parser_refusal(str(exc)), code=parser_refusal_code(str(exc))) from None
    return _header_record(path, header, version)


def _scan_header(path: Path, events) -> tuple[etree._Element, str]:
    root = header = None
    version = None
    for event, element in events:
        if root is None:
            root = element
            refuse_unless_saft_root(path, element.tag)
            continue
        if event != "end":
            continue
        if element.tag == HEADER:
            refuse_doctype(path, element)
            header = element
            version = declared_version(element.findtext(q("AuditFileVersion")))
        elif header is not None and element.tag in SCANNED:
            version = version or version_hint(element)
            if element.tag == TRANSACTION:
                break
            _drop(element)
        if header is not None and version:
            break
    if header is None:
        raise SaftFileRejected(path, "the file has no AuditFile/Header", code=NOT_SAFT)
    return header, version or DEFAULT_VERSION


def _text(element: etree._Element, path: str) -> str:
    found = element.find("/".join(q(part) for part in path.split("/")))
    return (found.text or "").strip() if found is not None else ""


def _date(text: str) -> dt.date | None:
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        return None


def _integer(text: str) -> int | None:
    try:
        return int(text)
    except ValueError:
        return None


def _header_record(path: Path, header: etree._Element, version: str) -> SaftHeader:
    raw_number = _text(header, "Company/RegistrationNumber")
    try:
        org_number, problem = normalise_tenant_id(raw_number), None
    except ValueError as exc:
        org_number, problem = None, str(exc)
    first, last, selection = _selection(header)
    software = " ".join(
        filter(None, (_text(header, n) for n in ("SoftwareCompanyName", "SoftwareID", "SoftwareVersion")))
    )
    return SaftHeader(
        source_file=path,
        version=version,
        declared_version=_text(header, "AuditFileVersion"),
        registration_number=raw_number,
        org_number=org_number,
        org_number_problem=problem,
        company_name=_text(header, "Company/Name"),
        date_created=_date(_text(header, "AuditFileDateCreated")),
        software=software,
        currency=_text(header, "DefaultCurrencyCode"),
        first_month=first,
        last_month=last,
        selection=selection,
    )


def _selection(header: etree._Element) -> tuple[dt.date | None, dt.date | None, str]:
    """First and last month of `SelectionCriteria` (dates, or period numbers read as calendar months:
    period 0 counts as 1, 13+ as 12)."""
    start, end = (
        _date(_text(header, "SelectionCriteria/SelectionStartDate")),
        _date(_text(header, "SelectionCriteria/SelectionEndDate")),
    )
    if start and end:
        return start.replace(day=1), end.replace(day=1), f"dates {start}..{end}"
    numbers = [
        _integer(_text(header, f"SelectionCriteria/{n}"))
        for n in ("PeriodStart", "PeriodStartYear", "PeriodEnd", "PeriodEndYear")
    ]
    if all(n is not None for n in numbers):
        first_period, first_year, last_period, last_year = numbers
        months = [
            dt.date(year, min(max(period, 1), 12), 1)
            for period, year in ((first_period, first_year), (last_period, last_year))
        ]
        return months[0], months[1], f"periods {first_period}/{first_year}-{last_period}/{last_year}"
    return None, None, "none"


# ---------------------------------------------------------------------------------------- full pass


def parse_file(path: str | Path, header: SaftHeader, *, schema: etree.XMLSchema | None = None) -> ParsedFile:
    """One streaming pass. With `schema` (libxml2), the pass also validates; a failure is refused with the
    validator's first errors and the position reached."""
    path = Path(path)
    result = ParsedFile(header)
    with open_xml(path) as stream:
        events = iterparse(
            stream, tag=(ACCOUNT, TRANSACTION, *TOTALS, GL_ENTRIES, *SECTIONS, *DROPPED), schema=schema
        )
        try:
            for _, element in events:
                _consume(path, element, result)
        except etree.XMLSyntaxError as exc:
            raise _syntax_rejection(path, exc.error_log, result, schema is not None) from None
        except SaftFileRejected:
            # libxml2 reports validation errors a read-chunk late: prefer them to what our reader tripped on
            if schema is not None and _schema_errors(events.error_log):
                raise _syntax_rejection(path, events.error_log, result, True) from None
            raise
    return result


def _consume(path: Path, element: etree._Element, result: ParsedFile) -> None:
    tag = element.tag
    if tag == TRANSACTION:
        _add_transaction(path, element, result)
    elif tag == ACCOUNT:
        if element.getparent().tag == GL_ACCOUNTS:
            account = _account(path, element)
            if account.account_id in result.accounts:  # the XSD's key is inert (see schemas.py)
                result.duplicate_accounts.append(account)
            else:
                result.accounts[account.account_id] = account
    elif tag in TOTALS:
        if element.getparent().tag == GL_ENTRIES:
            _declared_total(path, element, result)
        return  # read before their parent ends: dropped with it
    elif tag == GL_ENTRIES:
        result.has_entries = True
    elif tag == HEADER:
        refuse_doctype(path, element)
    _drop(element)


def _drop(element: etree._Element) -> None:
    """Free an element and its already-read preceding siblings (the iterparse memory idiom)."""
    element.clear(keep_tail=False)
    parent = element.getparent()
    if parent is not None:
        while element.getprevious() is not None:
            del parent[0]


def _decimal(path: Path, text: str | None, where: str) -> Decimal:
    try:
        value = Decimal(text) if text is not None else None
    except InvalidOperation:
        value = None
    if value is None or not value.is_finite():
        raise SaftFileRejected(path, f"{where}: {text!r} is not an amount")
    return value


def _account(path: Path, element: etree._Element) -> SaftAccount:
    def text(name: str) -> str | None:
        value = element.findtext(q(name))
        return value.strip() if value is not None else None

    account_id = text("AccountID") or ""

    def signed(prefix: str) -> Decimal:
        debit, credit = text(f"{prefix}DebitBalance"), text(f"{prefix}CreditBalance")
        if debit is None and credit is None:
            raise SaftFileRejected(
                path, f"Account {account_id}: neither {prefix}DebitBalance nor {prefix}CreditBalance"
            )
        where = f"Account {account_id} {prefix} balance"
        return (_decimal(path, debit, where) if debit is not None else ZERO) - (
            _decimal(path, credit, where) if credit is not None else ZERO
        )

    return SaftAccount(
        account_id=account_id,
        description=text("AccountDescription") or "",
        account_type=text("AccountType") or "",
        standard_account_id=text("StandardAccountID") or None,
        grouping_category=text("GroupingCategory") or None,
        grouping_code=text("GroupingCode") or None,
        opening=signed("Opening"),
        closing=signed("Closing"),
    )


def _declared_total(path: Path, element: etree._Element, result: ParsedFile) -> None:
    text = (element.text or "").strip()
    if element.tag == NUMBER_OF_ENTRIES:
        result.declared_entries = _integer(text)
    elif element.tag == TOTAL_DEBIT:
        result.declared_debit = _decimal(path, text, "GeneralLedgerEntries/TotalDebit")
    else:
        result.declared_credit = _decimal(path, text, "GeneralLedgerEntries/TotalCredit")


def _add_transaction(path: Path, transaction: etree._Element, result: ParsedFile) -> None:
    """Fold one Transaction's Lines into the aggregates. Children come in XSD order: the period fields
    precede the Lines."""
    year = period = None
    month = ""
    movements = result.movements
    result.transactions += 1
    for child in transaction:
        tag = child.tag
        if tag == LINE:
            if year is None or period is None:
                raise SaftFileRejected(
                    path,
                    f"Transaction {result.last_transaction_id}: no numeric Period/PeriodYear before a Line",
                )
            account, debit, value = _line(path, child, result)
            key = (account, year, period, month)
            if debit:
                movements[key] = movements.get(key, ZERO) + value
                result.line_debit += value
            else:
                movements[key] = movements.get(key, ZERO) - value
                result.line_credit += value
            result.lines += 1
        elif tag == TRANSACTION_ID:
            result.last_transaction_id = child.text
        elif tag == PERIOD:
            period = _integer((child.text or "").strip())
        elif tag == PERIOD_YEAR:
            year = _integer((child.text or "").strip())
        elif tag == TRANSACTION_DATE:
            month = (child.text or "").strip()[:7]


def _line(path: Path, line: etree._Element, result: ParsedFile) -> tuple[str, bool, Decimal]:
    account = value = None
    debit = True
    for child in line:
        tag = child.tag
        if tag == ACCOUNT_ID:
            account = (child.text or "").strip()
        elif tag == DEBIT_AMOUNT or tag == CREDIT_AMOUNT:
            debit = tag == DEBIT_AMOUNT
            value = _decimal(path, child.findtext(AMOUNT), f"Transaction {result.last_transaction_id} amount")
    if not account or value is None:
        raise SaftFileRejected(
            path, f"Transaction {result.last_transaction_id}: a Line without AccountID or amount"
        )
    return account, debit, value


def _schema_errors(error_log) -> list:
    return [entry for entry in error_log if entry.domain_name == "SCHEMASV"]


def _syntax_rejection(path: Path, error_log, result: ParsedFile, validating: bool) -> SaftFileRejected:
    reached = (
        f"Transaction #{result.transactions} (TransactionID {result.last_transaction_id})"
        if result.transactions
        else "Header/MasterFiles"
    )
    schema_errors = _schema_errors(error_log)
    if validating and schema_errors:  # libxml2 streams without line numbers, and reports a read-chunk late
        return SaftFileRejected(
            path,
            f"does not validate against the SAF-T Financial {result.header.version} XSD (libxml2, streamed; "
            f"reading had reached {reached}); first errors:",
            company=result.header.company_label,
            errors=[entry.message for entry in schema_errors[:5]],
        )
    entries = [entry for entry in error_log if entry.message][:5]
    message = " ".join(entry.message for entry in entries)
    return SaftFileRejected(
        path,
        parser_refusal(message),
        company=result.header.company_label,
        errors=[f"line {entry.line}: {entry.message}" for entry in entries],
        code=parser_refusal_code(message),
    )


def parser_refusal(message: str) -> str:
    """The reason for a libxml2 parse failure, naming entity-expansion attacks as such."""
    if parser_refusal_code(message) == CONTAINS_DTD:
        return f"the XML parser refused an entity expansion (a billion-laughs style DTD): {message}"
    return f"not well-formed XML ({message})"


def parser_refusal_code(message: str) -> str:
    return CONTAINS_DTD if "amplification" in message or "entity reference loop" in message else MALFORMED
