"""SAF-T Financial (Norway, 1.20 and 1.30) as an ERP: files dropped in a folder, one tenant per company.

Plain Python, no Dagster. Entry points:
- `import_file(path)`: refuse or import one file → `SaftImport` (chart, monthly balances, reconciliation);
- `read_header(path)` / `validate_file(path)`: the cheap and the checking halves of it;
- `SaftConnector(drop_dir)`: the `Connector` over a drop folder.

A file is refused (`SaftFileRejected`, a `BadResponse`; nothing from it is returned) with a reason code:
`not_xml` (e.g. a CSV named .xml), `not_saft` (XML, but not SAF-T Financial), `truncated`, `malformed`
(not well-formed XML), `contains_dtd`, `bad_zip`, `invalid` (fails its version's XSD or holds unreadable
amounts), or `invalid_org_number` (`Header/Company/RegistrationNumber` is not a valid organisation/personal
number: `SaftInvalidOrgNumber`, also an `InvalidTenantId`). How versions, validation, periods and balances
work: see the modules of `erp_pipelines.saft`.

The connector lists every file it refused or ignored (other types than .xml/.zip: `ignored_type`) as
`RefusedFile`s (`refused_files`, `ignored_files`), logs each once, and `refused_file_report()` gives the
rows of the warehouse's `refused_files` table. Files are fingerprinted by content (for a zip: the XML
inside), so a re-zipped identical export is not imported again.

Several files of one company (e.g. two fiscal years, or a re-export) form one tenant. Where their months
overlap, the newer file wins: later `AuditFileDateCreated`, then later modification time (an overlap whose
closing balances differ is reported as `file_overlap`). Where consecutive months come from different
files the seam is checked (`file_seam`: closing of one month = opening of the next; across a year end
only for assets and liabilities), and months no file covers are reported (`coverage_gap`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import hashlib
import itertools
import logging
import zipfile
from collections.abc import Iterable
from decimal import Decimal
from pathlib import Path

from erp_pipelines.erps.base import Connector, Setting
from erp_pipelines.erps.kit import RateLimit
from erp_pipelines.errors import ConfigError, InvalidTenantId, TenantMismatch
from erp_pipelines.model import Account, Balance, Client, add_months, month_start
from erp_pipelines.saft.balances import build_import
from erp_pipelines.saft.parser import parse_file, read_header
from erp_pipelines.saft.records import (
    FIXES,
    IGNORED_TYPE,
    INVALID_ORG_NUMBER,
    ReconciliationIssue,
    RefusedFile,
    SaftAccount,
    SaftFileRejected,
    SaftHeader,
    SaftImport,
)
from erp_pipelines.saft.safety import is_zip, open_xml, xml_size
from erp_pipelines.saft.schemas import (
    XMLSCHEMA_MAX_BYTES,
    declared_version,
    libxml2_schema_for,
    xmlschema_errors,
)

__all__ = [
    "FileFingerprint",
    "ReconciliationIssue",
    "RefusedFile",
    "SaftAccount",
    "SaftConnector",
    "SaftFileInfo",
    "SaftFileRejected",
    "SaftHeader",
    "SaftImport",
    "SaftInvalidOrgNumber",
    "import_file",
    "read_header",
    "validate_file",
]

log = logging.getLogger(__name__)
ENGINES = ("auto", "xmlschema", "libxml2", "none")


class SaftInvalidOrgNumber(SaftFileRejected, InvalidTenantId):
    """The file's Header/Company/RegistrationNumber fails organisation-number validation."""


# ---------------------------------------------------------------------------------------- one file


def import_file(path: str | Path, *, validation: str = "auto") -> SaftImport:
    """Check, validate and import one SAF-T Financial file (.xml, or .zip holding one .xml).

    `validation`: "auto" (xmlschema up to 16 MiB of XML, libxml2 streamed inside the import pass above),
    "xmlschema", "libxml2", or "none" (trusted files only)."""
    path = Path(path)
    header = _checked_header(path)
    engine = _engine(path, validation)
    if engine == "xmlschema":
        _xmlschema_validate(path, header)
    schema = libxml2_schema_for(header.version) if engine == "libxml2" else None
    parsed = parse_file(path, header, schema=schema)
    return build_import(parsed, validated_with=engine if engine != "none" else "not validated")


def validate_file(path: str | Path, *, validation: str = "auto") -> SaftHeader:
    """Every refusal check of `import_file`, without keeping anything. Returns the header."""
    path = Path(path)
    header = _checked_header(path)
    engine = _engine(path, validation)
    if engine == "xmlschema":
        _xmlschema_validate(path, header)
    elif engine == "libxml2":
        parse_file(path, header, schema=libxml2_schema_for(header.version))
    return header


def _checked_header(path: Path) -> SaftHeader:
    header = read_header(path)
    if header.org_number is None:
        raise SaftInvalidOrgNumber(
            path,
            f"Header/Company/RegistrationNumber {header.registration_number!r}: {header.org_number_problem}",
            company=header.company_label,
            code=INVALID_ORG_NUMBER,
        )
    return header


def _engine(path: Path, validation: str) -> str:
    if validation not in ENGINES:
        raise ValueError(f"validation must be one of {ENGINES}, not {validation!r}")
    if validation != "auto":
        return validation
    return "xmlschema" if xml_size(path) <= XMLSCHEMA_MAX_BYTES else "libxml2"


def _xmlschema_validate(path: Path, header: SaftHeader) -> None:
    errors = xmlschema_errors(path, header.version)
    if errors:
        how = (
            "as declared in AuditFileVersion"
            if declared_version(header.declared_version)
            else f"detected from the structure; AuditFileVersion says {header.declared_version!r}"
        )
        raise SaftFileRejected(
            path,
            f"does not validate against the SAF-T Financial {header.version} XSD ({how}); first errors:",
            company=header.company_label,
            errors=errors,
        )


# ---------------------------------------------------------------------------------------- drop folder


@dataclasses.dataclass(frozen=True)
class FileFingerprint:
    """Identity of a dropped file's content, for a sensor to spot new or changed files. For a zip, the
    XML inside is hashed: re-zipping an identical export (new member timestamps) keeps the fingerprint."""

    path: str
    sha256: str
    size: int  # bytes hashed (the XML inside, for a zip)
    mtime: float  # seconds since the epoch

    @property
    def cursor(self) -> str:
        return f"{Path(self.path).name}:{self.sha256}:{self.size}"


@dataclasses.dataclass(frozen=True)
class SaftFileInfo:
    """One file of the drop folder as seen from its header only."""

    path: Path
    size: int
    mtime_ns: int
    header: SaftHeader | None  # None when the file was refused before its header could be read
    problem: str | None  # why the file cannot be used as it is

    @property
    def company_key(self) -> str | None:
        if self.header is None:
            return None
        return (
            self.header.org_number
            or self.header.registration_number
            or f"(no organisation number) {self.path.name}"
        )

    @property
    def precedence(self) -> tuple[dt.date, int]:
        """Newer wins: AuditFileDateCreated, then modification time."""
        created = self.header.date_created if self.header and self.header.date_created else dt.date.min
        return created, self.mtime_ns


@dataclasses.dataclass(frozen=True)
class CompanyImport:
    """All files of one company combined: newer files win overlapping months."""

    files: tuple[SaftImport, ...]  # oldest first
    accounts: tuple[Account, ...]
    balances: tuple[Balance, ...]
    issues: tuple[ReconciliationIssue, ...]
    month_source: dict[dt.date, str]  # month → file name it was taken from


class SaftConnector(Connector):
    """Files in `drop_dir` (*.xml, or *.zip holding one XML): one client per company. Other files are
    ignored, and listed as such (`ignored_files`)."""

    erp = "saft"
    display_name = "SAF-T Financial (file import)"
    settings = (
        Setting(
            field="drop_dir",
            env="SAFT_DROP_DIR",
            secret=False,
            description="Folder where SAF-T Financial exports (.xml or .zip) are dropped",
        ),
    )
    rate_limit = RateLimit(max_in_flight=1, source="files")
    scheduled_refresh = False  # files change only when dropped: the sensor (fingerprints) drives refreshes
    full_sync_by_default = True  # a partition imports every month its files cover
    default_history_start = "2000-01-01"
    sensor_interval_seconds = 60

    def __init__(self, drop_dir: str | Path, *, validation: str = "auto", **config):
        super().__init__(drop_dir=str(drop_dir), **config)
        self.drop_dir = Path(drop_dir)
        self.validation = validation
        self.problems: dict[str, str] = {}  # file name → why it is refused or its client will be
        # file name → why it was not imported, as of the last scan (and imports since)
        self.file_refusals: dict[str, RefusedFile] = {}
        # caches keyed by path, valid while (size, mtime_ns) hold
        self._headers: dict[Path, tuple[tuple[int, int], SaftHeader | None, SaftFileRejected | None]] = {}
        self._imports: dict[Path, tuple[tuple[int, int], SaftImport]] = {}
        self._import_refusals: dict[Path, tuple[tuple[int, int], RefusedFile]] = {}
        self._hashes: dict[Path, tuple[tuple[int, int], str, int]] = {}
        self._logged: dict[str, str] = {}  # file name → the refusal last logged for it

    # -- scanning (headers only)

    def all_files(self) -> list[Path]:
        """Every file of the drop folder but hidden and temporary ones (`.name`, `~name`)."""
        if not self.drop_dir.is_dir():
            raise ConfigError(
                f"SAFT_DROP_DIR {str(self.drop_dir)!r} is not a folder",
                erp=self.erp,
                fix="create the folder or correct SAFT_DROP_DIR",
            )
        return sorted(p for p in self.drop_dir.iterdir() if p.is_file() and not p.name.startswith((".", "~")))

    def files(self) -> list[Path]:
        """The files that are read: *.xml and *.zip."""
        return [p for p in self.all_files() if p.suffix.lower() in (".xml", ".zip")]

    def scan_files(self) -> list[SaftFileInfo]:
        """Every file's header (cheap: the first KBs plus the MasterFiles needed for the version).
        Refused and ignored files are collected in `file_refusals` and logged once."""
        infos = []
        refusals: dict[str, RefusedFile] = {}
        for path in self.all_files():
            stat = path.stat()
            key = (stat.st_size, stat.st_mtime_ns)
            if path.suffix.lower() not in (".xml", ".zip"):
                refusals[path.name] = self._ignored(path)
                continue
            header, refused = self._header(path, key)
            problem = refused.detail if refused else header.org_number_problem
            if problem:
                if self.problems.get(path.name) != problem and not refused:
                    log.warning("SAF-T file %s: %s", path.name, problem)
                self.problems[path.name] = problem
            else:
                self.problems.pop(path.name, None)
            if refused:
                refusals[path.name] = self._refused(path, refused)
            elif (earlier := self._import_refusals.get(path)) and earlier[0] == key:
                refusals[path.name] = earlier[1]  # refused when imported (e.g. fails the XSD), unchanged since
            infos.append(SaftFileInfo(path, stat.st_size, stat.st_mtime_ns, header, problem))
        self.file_refusals = refusals
        return infos

    def _header(self, path: Path, key: tuple[int, int]) -> tuple[SaftHeader | None, SaftFileRejected | None]:
        cached = self._headers.get(path)
        if cached is None or cached[0] != key:
            try:
                cached = (key, read_header(path), None)
            except SaftFileRejected as exc:
                cached = (key, None, exc)
            self._headers[path] = cached
        return cached[1], cached[2]

    # -- refused and ignored files

    @property
    def refused_files(self) -> list[RefusedFile]:
        """Files of the last scan (and imports since) that were refused, with reason, message and fix."""
        return [r for r in self.file_refusals.values() if r.reason != IGNORED_TYPE]

    @property
    def ignored_files(self) -> list[RefusedFile]:
        """Files of the last scan that are not .xml/.zip, so never read."""
        return [r for r in self.file_refusals.values() if r.reason == IGNORED_TYPE]

    def refused_file_report(self) -> tuple[list[dict], dict[str, str]]:
        """For the warehouse's `refused_files`: the rows of the last scan's refused and ignored files,
        and every file now in the folder (name → content fingerprint), so rows of removed or replaced
        files can go."""
        present = {path.name: self.fingerprint(path).sha256 for path in self.all_files()}
        return [r.as_row() for r in self.file_refusals.values()], present

    def _refused(self, path: Path, exc: SaftFileRejected) -> RefusedFile:
        refused = RefusedFile(path.name, self.fingerprint(path).sha256, exc.code, exc.detail, exc.fix)
        self._log(refused)
        return refused

    def _ignored(self, path: Path) -> RefusedFile:
        kind = f"a {path.suffix.lower()} file" if path.suffix else "a file without extension"
        ignored = RefusedFile(
            path.name,
            self.fingerprint(path).sha256,
            IGNORED_TYPE,
            f"{path.name!r} ignored: {kind}; only .xml and .zip files are imported",
            FIXES[IGNORED_TYPE],
        )
        self._log(ignored)
        return ignored

    def _log(self, refused: RefusedFile) -> None:
        if self._logged.get(refused.file_name) != refused.message:
            log.warning("%s [%s] Fix: %s", refused.message, refused.reason, refused.fix)
            self._logged[refused.file_name] = refused.message

    async def scan(self) -> list[SaftFileInfo]:
        return await asyncio.to_thread(self.scan_files)

    async def list_clients(self) -> list[Client]:
        """One client per company (organisation number). Files with an invalid number give a client with
        the raw number, for the client rules to reject; refused files give none (see `problems`)."""
        by_company: dict[str, list[SaftFileInfo]] = {}
        for info in await self.scan():
            if info.company_key is not None:
                by_company.setdefault(info.company_key, []).append(info)
        clients = []
        for key, infos in sorted(by_company.items()):
            newest = max(infos, key=lambda i: i.precedence).header
            clients.append(
                Client(
                    erp=self.erp,
                    org_number=newest.org_number or newest.registration_number,
                    erp_client_id=key,
                    name=newest.company_name,
                    status_reason=newest.org_number_problem,
                )
            )
        return clients

    # -- importing

    def files_of(self, client: Client) -> list[SaftFileInfo]:
        infos = [i for i in self.scan_files() if i.company_key == client.erp_client_id]
        return sorted(infos, key=lambda i: i.precedence)

    def _import(self, info: SaftFileInfo, client: Client) -> SaftImport:
        key = (info.size, info.mtime_ns)
        cached = self._imports.get(info.path)
        if cached is None or cached[0] != key:
            try:
                cached = (key, import_file(info.path, validation=self.validation))
            except SaftFileRejected as exc:
                refused = self._refused(info.path, exc)
                self._import_refusals[info.path] = (key, refused)
                self.file_refusals[info.path.name] = refused
                raise exc.for_tenant(client.label) from None
            self._imports[info.path] = cached
        result = cached[1]
        if result.header.org_number != client.org_number:
            raise TenantMismatch(
                f"file {info.path.name} belongs to orgnr {result.header.org_number}, not {client.org_number}",
                erp=self.erp,
                tenant=client.label,
                fix="the file changed since the clients were listed; list the clients again",
            )
        return result

    def import_company(self, client: Client) -> CompanyImport:
        infos = self.files_of(client)
        if not infos:
            raise SaftFileRejected(
                self.drop_dir, f"no SAF-T file of {client.label} in the drop folder", company=client.label
            )
        return combine([self._import(info, client) for info in infos])

    async def fetch_accounts(self, client: Client) -> list[Account]:
        company = await asyncio.to_thread(self.import_company, client)
        return list(company.accounts)

    async def fetch_balances(self, client: Client, months: list[dt.date]) -> list[Balance]:
        wanted = {month_start(m) for m in months}
        company = await asyncio.to_thread(self.import_company, client)
        return [b for b in company.balances if b.period in wanted]

    async def reconciliation_issues(self, client: Client) -> list[ReconciliationIssue]:
        company = await asyncio.to_thread(self.import_company, client)
        return list(company.issues)

    async def reconciliation_findings(self, client: Client) -> list[dict]:
        return [issue.as_row() for issue in await self.reconciliation_issues(client)]

    async def tenant_fingerprints(self) -> dict[str, str]:
        """Per company: a hash over its files' content hashes (new, changed or removed files change it)."""
        def compute() -> dict[str, str]:
            by_company: dict[str, list[str]] = {}
            for info in self.scan_files():
                if info.company_key is not None:
                    by_company.setdefault(info.company_key, []).append(self.fingerprint(info.path).cursor)
            return {
                key: hashlib.sha256("\n".join(sorted(parts)).encode()).hexdigest()[:16]
                for key, parts in by_company.items()
            }

        return await asyncio.to_thread(compute)

    # -- change detection

    def fingerprint(self, path: Path) -> FileFingerprint:
        """sha256 of the file's content; for a zip, of the XML inside (the zip's own bytes when it is
        not a readable SAF-T zip)."""
        stat = path.stat()
        key = (stat.st_size, stat.st_mtime_ns)
        cached = self._hashes.get(path)
        if cached is None or cached[0] != key:
            try:
                with open_xml(path) if is_zip(path) else open(path, "rb") as handle:
                    cached = (key, *_sha256(handle))
            except (SaftFileRejected, zipfile.BadZipFile):
                with open(path, "rb") as handle:
                    cached = (key, *_sha256(handle))
            self._hashes[path] = cached
        return FileFingerprint(str(path), cached[1], cached[2], stat.st_mtime_ns / 1e9)

    async def fingerprints(self) -> list[FileFingerprint]:
        """sha256 + size + mtime of every file in the drop folder (hashes cached while size/mtime hold)."""
        return await asyncio.to_thread(lambda: [self.fingerprint(p) for p in self.files()])


def _sha256(handle) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    while chunk := handle.read(1 << 20):
        digest.update(chunk)
        size += len(chunk)
    return digest.hexdigest(), size


# ---------------------------------------------------------------------------------------- combining


def combine(imports: Iterable[SaftImport]) -> CompanyImport:
    """Merge one company's files, given oldest first: each month is taken from the newest file covering it."""
    files = tuple(imports)
    winner: dict[dt.date, SaftImport] = {}
    for result in files:
        for month in result.months:
            winner[month] = result
    issues = [issue for result in files for issue in result.issues]
    issues += _overlap_issues(files, winner)
    issues += _seam_issues(winner)
    issues += _gap_issues(winner)
    balances = [b for result in files for b in result.balances if winner.get(b.period) is result]
    balances.sort(key=lambda b: (b.account_number, b.period))
    accounts: dict[str, Account] = {}
    for result in files:
        for account in result.accounts:
            accounts[account.account_id] = account.to_account()
    return CompanyImport(
        files=files,
        accounts=tuple(accounts[k] for k in sorted(accounts)),
        balances=tuple(balances),
        issues=tuple(issues),
        month_source={m: r.header.source_file.name for m, r in sorted(winner.items())},
    )


def _issue(result: SaftImport, check: str, message: str, **fields) -> ReconciliationIssue:
    header = result.header
    values = {"account_number": None, "period": None, "expected": None, "actual": None, **fields}
    return ReconciliationIssue(
        header.org_number or header.registration_number,
        header.source_file.name,
        check,
        message=message,
        **values,
    )


def _overlap_issues(
    files: tuple[SaftImport, ...], winner: dict[dt.date, SaftImport]
) -> list[ReconciliationIssue]:
    issues = []
    for older in files:
        lost = [m for m in older.months if winner[m] is not older]
        for newer in {id(winner[m]): winner[m] for m in lost}.values():
            months = [m for m in lost if winner[m] is newer]
            theirs = {(b.account_number, b.period): b.closing for b in newer.balances if b.period in months}
            differ = sum(
                1
                for b in older.balances
                if b.period in months and theirs.get((b.account_number, b.period)) != b.closing
            )
            if not differ:  # the newer file agrees: a re-export, nothing to report
                continue
            issues.append(
                _issue(
                    older,
                    "file_overlap",
                    f"{months[0]:%Y-%m}..{months[-1]:%Y-%m} of {older.header.source_file.name} are "
                    f"superseded by the newer {newer.header.source_file.name}; {differ} account-month "
                    "closing balances differ between them.",
                    period=months[0],
                    actual=Decimal(differ),
                )
            )
    return issues


BALANCE_SHEET_CATEGORIES = {  # næringsspesifikasjon categories of assets and liabilities (not equity)
    "balanseverdiForAnleggsmiddel",
    "balanseverdiForOmloepsmiddel",
    "langsiktigGjeld",
    "kortsiktigGjeld",
}


def carries_over_year_end(account: SaftAccount) -> bool:
    """An asset or liability by the file's own mapping: its balance must carry into the next year
    unchanged. Profit and loss resets and equity takes the result, so those are not compared."""
    if account.standard_account_id:
        return account.standard_account_id[:1] in ("1", "2") and not account.standard_account_id.startswith(
            "20"
        )
    return account.grouping_category in BALANCE_SHEET_CATEGORIES


def _seam_issues(winner: dict[dt.date, SaftImport]) -> list[ReconciliationIssue]:
    """Where consecutive months come from different files, the closing of the first must be the opening
    of the second: every account within a year; across a year end only assets and liabilities
    (`carries_over_year_end`), since profit and loss restarts and the result moves into equity."""
    issues = []
    for month in sorted(winner):
        before = add_months(month, -1)
        previous, current = winner.get(before), winner[month]
        if previous is None or previous is current:
            continue
        closing = {b.account_number: b.closing for b in previous.balances if b.period == before}
        opening = {b.account_number: b.opening for b in current.balances if b.period == month}
        compared = sorted(closing.keys() | opening.keys())
        if before.year != month.year:
            mapped = {a.account_id: a for result in (previous, current) for a in result.accounts}
            compared = [n for n in compared if n in mapped and carries_over_year_end(mapped[n])]
        for account in compared:
            was, now = closing.get(account, Decimal("0.00")), opening.get(account, Decimal("0.00"))
            if was != now:
                issues.append(
                    _issue(
                        current,
                        "file_seam",
                        f"Account {account} closes {before:%Y-%m} at {was:.2f} in "
                        f"{previous.header.source_file.name} but opens {month:%Y-%m} at {now:.2f} in "
                        f"{current.header.source_file.name}.",
                        account_number=account,
                        period=month,
                        expected=was,
                        actual=now,
                    )
                )
    return issues


def _gap_issues(winner: dict[dt.date, SaftImport]) -> list[ReconciliationIssue]:
    """Months between the first and the last covered month that no file covers."""
    issues = []
    covered = sorted(winner)
    for before, after in itertools.pairwise(covered):
        if add_months(before, 1) != after:
            first, last = add_months(before, 1), add_months(after, -1)
            issues.append(
                _issue(
                    winner[after],
                    "coverage_gap",
                    f"No file covers {first:%Y-%m}..{last:%Y-%m} (between "
                    f"{winner[before].header.source_file.name} and {winner[after].header.source_file.name}): "
                    "no balances for those months.",
                    period=first,
                )
            )
    return issues
