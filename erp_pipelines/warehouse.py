"""The DuckDB warehouse: schema and atomic per-tenant writes. Plain Python, no Dagster.

- Money is DECIMAL(18,2), NOK, debit positive (see `model.py`). Timestamps are UTC.
- Every write replaces a window (ERP, tenants, periods) in one transaction: delete, then a bulk
  insert from Arrow. Re-running is idempotent and a failed or killed write leaves the previous
  rows in place (DuckDB rolls back an uncommitted transaction when the file is next opened).
- DuckDB allows one writing process per file. Connections are short-lived and every access holds
  a file lock (`<warehouse>.lock`), so concurrent runs queue for a moment instead of failing.
  Extraction happens outside the lock; only the write phase is serialised.
- With `ERP_DUCKLAKE_CATALOG` the same tables live in DuckLake instead (many machines, no lock; a
  conflicting commit is retried whole): see `warehouse_backends.py`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import hashlib
import os
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from erp_pipelines.accounts import classify_account
from erp_pipelines.model import (
    DEFAULT_CONNECTION,
    Account,
    Balance,
    Client,
    ClientStatus,
    client_id_order,
    first_repeat,
    is_shared_number_rejection,
    resolve_shared_numbers,
)
from erp_pipelines.model import auto_activate as model_auto_activate
from erp_pipelines.warehouse_backends import WarehouseBackend, backend_from_env, retried_on_conflict, rollback

MONEY = pa.decimal128(18, 2)

SCHEMA = """
CREATE TABLE IF NOT EXISTS clients (
    erp VARCHAR NOT NULL,
    org_number VARCHAR NOT NULL,
    erp_client_id VARCHAR NOT NULL,
    name VARCHAR,
    status VARCHAR NOT NULL,
    status_reason VARCHAR,
    first_seen_at TIMESTAMP NOT NULL,
    last_seen_at TIMESTAMP NOT NULL,
    revoked_at TIMESTAMP,
    last_extracted_at TIMESTAMP,
    last_error VARCHAR,
    last_error_at TIMESTAMP,
    deactivated_at TIMESTAMP,
    fiscal_year_start_month SMALLINT,
    connection VARCHAR  -- the connection (credential set) the client is reached through
);
CREATE TABLE IF NOT EXISTS client_audit (
    recorded_at TIMESTAMP NOT NULL,
    erp VARCHAR NOT NULL,
    org_number VARCHAR NOT NULL,
    erp_client_id VARCHAR,
    action VARCHAR NOT NULL,
    rows_deleted BIGINT,
    detail VARCHAR,
    actor VARCHAR
);
CREATE TABLE IF NOT EXISTS accounts (
    erp VARCHAR NOT NULL,
    org_number VARCHAR NOT NULL,
    account_number VARCHAR NOT NULL,
    name VARCHAR,
    account_type VARCHAR,  -- the ERP's own type, unchanged (SAF-T: GL; others e.g. OPERATING_REVENUES, Asset)
    standard_account VARCHAR,  -- SAF-T standard account, 4 digits (`3000`); NULL when the source gives none
    extracted_at TIMESTAMP NOT NULL,
    run_id VARCHAR,
    account_class VARCHAR,  -- asset|liability|equity|income|expense: NS 4102 ranges, else the ERP's type (accounts.py)
    grouping_category VARCHAR,  -- SAF-T 1.30 GroupingCategory (`salgsinntekt`); `StandardAccountID` for a 2-digit one
    grouping_code VARCHAR  -- SAF-T 1.30 GroupingCode (`3000`), or the 2-digit StandardAccountID (`30`)
);
CREATE TABLE IF NOT EXISTS balances (
    erp VARCHAR NOT NULL,
    org_number VARCHAR NOT NULL,
    period DATE NOT NULL,
    account_number VARCHAR NOT NULL,
    opening DECIMAL(18,2) NOT NULL,
    movement DECIMAL(18,2) NOT NULL,
    closing DECIMAL(18,2) NOT NULL,
    currency VARCHAR NOT NULL,
    extracted_at TIMESTAMP NOT NULL,
    run_id VARCHAR
);
CREATE TABLE IF NOT EXISTS reconciliation (
    erp VARCHAR NOT NULL,
    org_number VARCHAR NOT NULL,
    source VARCHAR,
    check_name VARCHAR NOT NULL,
    account_number VARCHAR,
    period DATE,
    expected DECIMAL(18,2),
    actual DECIMAL(18,2),
    message VARCHAR NOT NULL,
    recorded_at TIMESTAMP NOT NULL,
    run_id VARCHAR
);
CREATE TABLE IF NOT EXISTS refused_files (  -- file sources (SAF-T): dropped files not imported, and why
    erp VARCHAR NOT NULL,
    file_name VARCHAR NOT NULL,
    fingerprint VARCHAR NOT NULL,  -- sha256 of the content (the XML inside, for a zip); never the content
    reason VARCHAR NOT NULL,  -- not_xml, not_saft, truncated, malformed, invalid, ..., ignored_type
    message VARCHAR NOT NULL,
    fix VARCHAR,
    first_seen_at TIMESTAMP NOT NULL,
    last_seen_at TIMESTAMP NOT NULL
);
"""
# views last: they read columns that MIGRATIONS add to older files
VIEWS = """
CREATE OR REPLACE VIEW current_clients AS
    SELECT * FROM clients WHERE status <> 'rejected'
    QUALIFY row_number() OVER (
        PARTITION BY erp, org_number
        ORDER BY status IN ('active', 'no_api_access') DESC, status = 'inactive' DESC, last_seen_at DESC, erp_client_id
    ) = 1;
CREATE OR REPLACE VIEW all_balances AS
    SELECT b.erp, b.org_number, c.name AS client_name, b.period, b.account_number,
           a.name AS account_name, a.account_type, a.account_class, a.standard_account, a.grouping_category,
           a.grouping_code,
           b.opening, b.movement, b.closing, b.currency, b.extracted_at
    FROM balances b
    LEFT JOIN accounts a USING (erp, org_number, account_number)
    LEFT JOIN current_clients c USING (erp, org_number);
"""

# Files written before the client lifecycle: the user's deactivation column, and "ok" renamed
# "active"; before fiscal years were carried: the client's fiscal-year start; before canonical
# account columns: account_class and the SAF-T grouping, the old `standard_account` formats (`30`,
# `salgsinntekt:3000`) moved there (then `_classify_stored_accounts`); before many connections
# per ERP: each client's connection (`default`). Run once per process and file, under the lock; harmless when already applied.
MIGRATIONS = """
ALTER TABLE clients ADD COLUMN IF NOT EXISTS deactivated_at TIMESTAMP;
ALTER TABLE clients ADD COLUMN IF NOT EXISTS fiscal_year_start_month SMALLINT;
UPDATE clients SET status = 'active' WHERE status = 'ok';
ALTER TABLE clients ADD COLUMN IF NOT EXISTS connection VARCHAR;
UPDATE clients SET connection = 'default' WHERE connection IS NULL;
ALTER TABLE accounts ADD COLUMN IF NOT EXISTS account_class VARCHAR;
ALTER TABLE accounts ADD COLUMN IF NOT EXISTS grouping_category VARCHAR;
ALTER TABLE accounts ADD COLUMN IF NOT EXISTS grouping_code VARCHAR;
UPDATE accounts SET grouping_category = nullif(split_part(standard_account, ':', 1), ''),
                    grouping_code = nullif(split_part(standard_account, ':', 2), ''), standard_account = NULL
    WHERE standard_account LIKE '%:%' AND grouping_category IS NULL AND grouping_code IS NULL;
UPDATE accounts SET grouping_category = 'StandardAccountID', grouping_code = standard_account, standard_account = NULL
    WHERE NOT regexp_full_match(standard_account, '[0-9]{4}') AND grouping_category IS NULL AND grouping_code IS NULL;
"""
NOT_TENANT_TABLES = ("clients", "client_audit")  # a purge deletes a tenant's rows from every other table

BALANCE_SCHEMA = pa.schema(
    [
        ("erp", pa.string()),
        ("org_number", pa.string()),
        ("period", pa.date32()),
        ("account_number", pa.string()),
        ("opening", MONEY),
        ("movement", MONEY),
        ("closing", MONEY),
        ("currency", pa.string()),
        ("extracted_at", pa.timestamp("us")),
        ("run_id", pa.string()),
    ]
)
ACCOUNT_SCHEMA = pa.schema(
    [
        ("erp", pa.string()),
        ("org_number", pa.string()),
        ("account_number", pa.string()),
        ("name", pa.string()),
        ("account_type", pa.string()),
        ("standard_account", pa.string()),
        ("extracted_at", pa.timestamp("us")),
        ("run_id", pa.string()),
        ("account_class", pa.string()),
        ("grouping_category", pa.string()),
        ("grouping_code", pa.string()),
    ]
)
RECONCILIATION_SCHEMA = pa.schema(
    [
        ("erp", pa.string()),
        ("org_number", pa.string()),
        ("source", pa.string()),
        ("check_name", pa.string()),
        ("account_number", pa.string()),
        ("period", pa.date32()),
        ("expected", MONEY),
        ("actual", MONEY),
        ("message", pa.string()),
        ("recorded_at", pa.timestamp("us")),
        ("run_id", pa.string()),
    ]
)
CLIENT_SCHEMA = pa.schema(
    [
        *((name, pa.string()) for name in ("erp", "org_number", "erp_client_id", "name", "status", "status_reason")),
        *((name, pa.timestamp("us")) for name in ("first_seen_at", "last_seen_at", "revoked_at", "last_extracted_at")),
        ("last_error", pa.string()),
        ("last_error_at", pa.timestamp("us")),
        ("deactivated_at", pa.timestamp("us")),
        ("fiscal_year_start_month", pa.int16()),
        ("connection", pa.string()),
    ]
)
CLIENT_COLUMNS = ", ".join(CLIENT_SCHEMA.names)
ENABLED = (ClientStatus.ACTIVE, ClientStatus.NO_API_ACCESS)
ONE_CLIENT = "erp = ? AND erp_client_id = ? AND connection IS NOT DISTINCT FROM ?"  # a registry row
HOLDER_RANK = {ClientStatus.ACTIVE: 0, ClientStatus.NO_API_ACCESS: 0, ClientStatus.INACTIVE: 1, ClientStatus.REVOKED: 2}


def _classify_stored_accounts(con: duckdb.DuckDBPyConnection) -> None:
    """Files written before `account_class`: classify the stored accounts in place (the number, the
    standard account, the grouping code; the next extraction adds what the ERP's type tells)."""
    keys = con.execute("SELECT DISTINCT account_number, standard_account, grouping_code FROM accounts "
                       "WHERE account_class IS NULL").fetchall()
    if not keys:
        return
    classes = [classify_account(number, None, standard, code) for number, standard, code in keys]
    found = pa.Table.from_pydict({"account_number": [k[0] for k in keys], "standard_account": [k[1] for k in keys],
                                  "grouping_code": [k[2] for k in keys], "account_class": classes},
                                 schema=pa.schema([(name, pa.string()) for name in
                                                   ("account_number", "standard_account", "grouping_code",
                                                    "account_class")]))
    with arrow_views(con, stored_account_classes=found):
        con.execute("UPDATE accounts a SET account_class = f.account_class FROM stored_account_classes f "
                    "WHERE a.account_class IS NULL AND a.account_number = f.account_number "
                    "AND a.standard_account IS NOT DISTINCT FROM f.standard_account "
                    "AND a.grouping_code IS NOT DISTINCT FROM f.grouping_code")


@contextlib.contextmanager
def arrow_views(con: duckdb.DuckDBPyConnection, **tables: pa.Table) -> Iterator[None]:
    """Arrow tables readable by `con`'s SQL under these names for the block (DuckDB scans them in place)."""
    for name, table in tables.items():
        con.register(name, table)
    try:
        yield
    finally:
        for name in tables:
            con.unregister(name)


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


@dataclasses.dataclass
class ClientRegistryChange:
    """What one refresh of an ERP's client list changed (organisation numbers)."""

    active: list[str]  # listed and enabled: extracted by the schedule and the sensor
    new: list[str]
    reactivated: list[str]
    revoked: list[str]
    rejected: list[Client]
    inactive: list[str] = dataclasses.field(default_factory=list)  # listed, deactivated by the user
    listed: list[Client] = dataclasses.field(default_factory=list)  # the listing with its final statuses
    # file sources: `refused_files` rows of the listing (reason "ignored_type" for ignored files)
    refused_files: list[dict[str, Any]] | None = None
    # connections whose listing failed this time (their clients kept as they were) → the error
    failed_connections: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def registered(self) -> list[str]:
        """Numbers that have (or get) a partition: every listed client holding its number."""
        return self.active + self.inactive

    @property
    def counts(self) -> dict[str, int]:
        return {
            "tenants_active": len(self.active),
            "tenants_inactive": len(self.inactive),
            "tenants_new": len(self.new),
            "tenants_reactivated": len(self.reactivated),
            "tenants_revoked": len(self.revoked),
            "tenants_rejected": len(self.rejected),
            **({"connections_failed": len(self.failed_connections)} if self.failed_connections else {}),
            **({} if self.refused_files is None else {
                "files_refused": sum(r["reason"] != "ignored_type" for r in self.refused_files),
                "files_ignored": sum(r["reason"] == "ignored_type" for r in self.refused_files),
            }),
        }


@dataclasses.dataclass
class WriteResult:
    tenants: int
    rows: int
    seconds: float
    lock_wait_seconds: float


def _schema_digest() -> str:
    return hashlib.sha256((SCHEMA + MIGRATIONS + VIEWS).encode()).hexdigest()[:16]


def _create_schema(con: duckdb.DuckDBPyConnection) -> None:
    con.execute(SCHEMA)
    con.execute(MIGRATIONS)
    _classify_stored_accounts(con)
    con.execute(VIEWS)


class Warehouse:
    def __init__(self, path: str | os.PathLike[str], *, lock_timeout: float = 900.0,
                 backend: WarehouseBackend | None = None) -> None:
        """The warehouse file at `path`, or the DuckLake catalog when `ERP_DUCKLAKE_CATALOG` is set
        (`backend_from_env`); `backend` chooses explicitly."""
        self.path = Path(path)
        self.lock_timeout = lock_timeout
        self.backend = backend or backend_from_env(self.path, os.environ, lock_timeout=lock_timeout)
        self._schema_ready = False

    def __repr__(self) -> str:
        return f"Warehouse({self.backend.describe()!r})"

    @contextlib.contextmanager
    def connect(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A short-lived connection (under the cross-process lock, for the DuckDB file)."""
        with self.backend.connection() as con:
            if not self._schema_ready:
                self.backend.setup_schema(con, _create_schema, _schema_digest())
                self._schema_ready = True
            yield con

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """The cross-process lock without a connection: while held, another process (dbt) may
        open the file and write; every other writer of this warehouse waits. (DuckLake: no lock.)"""
        with self.backend.exclusive():
            yield

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[tuple[duckdb.DuckDBPyConnection, float]]:
        waited = time.perf_counter()
        with self.connect() as con:
            waited = time.perf_counter() - waited
            con.execute("BEGIN TRANSACTION")
            try:
                yield con, waited
                con.execute("COMMIT")
            except BaseException:
                rollback(con)
                raise

    def query(self, sql: str, params: Sequence[Any] | None = None) -> list[tuple]:
        with self.connect() as con:
            return con.execute(sql, params or []).fetchall()

    def ensure_schema(self) -> None:
        with self.connect():
            pass

    def prepare(self) -> None:
        """The schema, and what the first write needs loaded: pyarrow imports pandas (and numpy)
        when it builds its first table, about a second of CPU. Call it before a long extraction,
        so that second is not spent holding the GIL while requests are in flight."""
        self.ensure_schema()
        pa.Table.from_pydict({name: [] for name in BALANCE_SCHEMA.names}, schema=BALANCE_SCHEMA)

    # ------------------------------------------------------------------------------ clients

    def clients(self, erp: str) -> list[Client]:
        rows = self.query(
            "SELECT org_number, erp_client_id, name, status, status_reason, connection FROM clients WHERE erp = ? "
            "ORDER BY first_seen_at, erp_client_id, connection",
            [erp],
        )
        return [Client(erp, org, cid, name, ClientStatus(status), reason, connection)
                for org, cid, name, status, reason, connection in rows]

    def active_clients(self, erp: str, org_numbers: Iterable[str] | None = None) -> dict[str, Client]:
        """Active tenants by organisation number (optionally only the given ones)."""
        wanted = set(org_numbers) if org_numbers is not None else None
        return {
            c.org_number: c
            for c in self.clients(erp)
            if c.is_active and (wanted is None or c.org_number in wanted)
        }

    @retried_on_conflict
    def record_clients(self, erp: str, listed: list[Client], *, seen_at: dt.datetime | None = None,
                       unresolved: Iterable[str | tuple[str, str]] = (), auto_activate: bool | None = None,
                       failed_connections: Iterable[str] = ()) -> ClientRegistryChange:
        """Store one complete client listing (classified by `classify_clients` or at least by
        `apply_number_rules`). Clients no longer listed are marked revoked (history is kept); a
        re-listed one comes back. A number already held in the registry stays with its holder: a
        newcomer sharing it is rejected, naming the holder. A new valid client starts active, or
        inactive when `auto_activate` is false (default: `ERP_AUTO_ACTIVATE`). Clients the user
        deactivated stay inactive. `unresolved`: ERP client ids the ERP could not describe this
        time (a passing failure): they stay as they were; an id alone, or (connection, id).

        `listed` holds every connection's listing of the ERP (`Client.connection`), so a number
        reached through two connections stays with its holder; `failed_connections`: connections
        whose listing failed this time: their clients stay as they were (not revoked)."""
        unresolved = {u if isinstance(u, tuple) else (None, u) for u in unresolved}
        failed_connections = set(failed_connections)
        seen_at = seen_at or utcnow()
        auto = model_auto_activate(os.environ) if auto_activate is None else auto_activate
        # the registry, not the listing's order, decides who holds a shared number
        listed = [replace(c, status=ClientStatus.ACTIVE, status_reason=None) if is_shared_number_rejection(c) else c
                  for c in dict.fromkeys(listed)]
        with self._transaction() as (con, _):
            existing = {
                (row[14], row[2]): row
                for row in con.execute(f"SELECT {CLIENT_COLUMNS} FROM clients WHERE erp = ?", [erp]).fetchall()
            }
            listed = resolve_shared_numbers(listed, _registry_holders(erp, existing, listed))
            rows, new, reactivated, revoked, final = [], [], [], [], []
            listed_ids = set()
            for client in listed:
                listed_ids.add((client.connection, client.erp_client_id))
                old = existing.get((client.connection, client.erp_client_id))
                status, reason = client.status, client.status_reason
                deactivated_at = old[12] if old else None
                if status == ClientStatus.REJECTED:
                    if old is not None and old[4] != ClientStatus.REJECTED and is_shared_number_rejection(client):
                        # the number was moved to another client (`activate`): this one stays inactive
                        status, reason = ClientStatus.INACTIVE, old[5] if old[4] == ClientStatus.INACTIVE else reason
                        deactivated_at = deactivated_at or seen_at
                    elif old is not None and old[4] == ClientStatus.REJECTED and _same_holder(old[5], reason):
                        reason = old[5]  # keep how the holder was chosen (e.g. "same first listing")
                elif deactivated_at is not None:
                    status = ClientStatus.INACTIVE
                    reason = old[5] if old[4] == ClientStatus.INACTIVE and old[5] else deactivated_reason(erp, client.org_number)
                elif old is None or old[4] == ClientStatus.REJECTED:
                    new.append(client.org_number)
                    if not auto:
                        status, reason, deactivated_at = ClientStatus.INACTIVE, waiting_reason(erp, client.org_number), seen_at
                else:
                    if old[4] == ClientStatus.REVOKED:
                        reactivated.append(client.org_number)
                    if old[4] == ClientStatus.NO_API_ACCESS and status == ClientStatus.ACTIVE:
                        status, reason = ClientStatus.NO_API_ACCESS, old[5]  # until an extraction succeeds
                final.append(replace(client, status=status, status_reason=reason))
                if old is None:
                    rows.append((erp, client.org_number, client.erp_client_id, client.name, status, reason,
                                 seen_at, seen_at, None, None, None, None, deactivated_at, None, client.connection))
                else:
                    rows.append((erp, client.org_number, client.erp_client_id, client.name, status, reason,
                                 old[6], seen_at, None, old[9], old[10], old[11], deactivated_at, old[13], old[14]))
            for key, old in existing.items():
                if key in listed_ids:
                    continue
                passing = key in unresolved or (None, key[1]) in unresolved or key[0] in failed_connections
                if not passing and old[4] in (*ENABLED, ClientStatus.INACTIVE):
                    revoked.append(old[1])
                    rows.append(old[:4] + (ClientStatus.REVOKED, "no longer listed by the ERP: access was withdrawn",
                                           old[6], old[7], seen_at) + old[9:])
                else:
                    rows.append(old)
            con.execute("DELETE FROM clients WHERE erp = ?", [erp])
            if rows:  # one Arrow insert: `executemany` costs ~0.4 ms a row
                columns = zip(*(tuple(str(v) if isinstance(v, ClientStatus) else v for v in r) for r in rows),
                              strict=True)
                listed_clients = pa.Table.from_arrays(
                    [pa.array(column, field.type) for column, field in zip(columns, CLIENT_SCHEMA, strict=True)],
                    schema=CLIENT_SCHEMA)
                with arrow_views(con, listed_clients=listed_clients):
                    con.execute(f"INSERT INTO clients ({CLIENT_COLUMNS}) SELECT * FROM listed_clients")
        return ClientRegistryChange(
            active=[c.org_number for c in final if c.status in ENABLED],
            new=new,
            reactivated=reactivated,
            revoked=revoked,
            rejected=[c for c in final if c.status == ClientStatus.REJECTED],
            inactive=[c.org_number for c in final if c.status == ClientStatus.INACTIVE],
            listed=final,
        )

    @retried_on_conflict
    def record_extraction_outcomes(
        self, erp: str, *, succeeded: Iterable[str], failed: Mapping[str, tuple[str, bool]], at: dt.datetime | None = None,
        fiscal_year_starts: Mapping[str, int] | None = None,
    ) -> None:
        """After extraction: clear errors of tenants that succeeded (and store the first month of
        their fiscal year, `fiscal_year_starts`: org → 1-12, where the ERP told); store the error
        (and, for access errors, the no_api_access status) of those that failed. `failed`: org →
        (message, is_access_error). Only the enabled client holding a number is touched (one per
        number, see `activate_client`)."""
        at = at or utcnow()
        succeeded = list(succeeded)
        with self._transaction() as (con, _):
            if succeeded:
                con.execute(
                    "UPDATE clients SET last_extracted_at = ?, last_error = NULL, last_error_at = NULL, "
                    "status = 'active', "
                    "status_reason = CASE WHEN status = 'no_api_access' THEN NULL ELSE status_reason END "
                    "WHERE erp = ? AND org_number IN (SELECT unnest(?::VARCHAR[])) AND status IN ('active', 'no_api_access')",
                    [at, erp, succeeded],
                )
            if fiscal_year_starts:
                con.executemany(
                    "UPDATE clients SET fiscal_year_start_month = ? WHERE erp = ? AND org_number = ? "
                    "AND status IN ('active', 'no_api_access')",
                    [(month, erp, org) for org, month in fiscal_year_starts.items()],
                )
            for org, (message, is_access_error) in failed.items():
                con.execute(
                    "UPDATE clients SET last_error = ?, last_error_at = ?, "
                    "status = CASE WHEN ? THEN 'no_api_access' ELSE status END, "
                    "status_reason = CASE WHEN ? THEN ? ELSE status_reason END "
                    "WHERE erp = ? AND org_number = ? AND status IN ('active', 'no_api_access')",
                    [message, at, is_access_error, is_access_error, message, erp, org],
                )

    # ------------------------------------------------------------------------------ refused files

    @retried_on_conflict
    def record_refused_files(self, erp: str, rows: Iterable[Mapping[str, Any]], *, present: Mapping[str, str],
                             seen_at: dt.datetime | None = None) -> None:
        """Store a file source's refused and ignored files (rows: file_name, fingerprint, reason, message,
        fix), in one transaction. A file refused again with the same content and reason keeps its
        first_seen_at. Earlier rows stay while their file is still present (`present`: file name →
        fingerprint) with the same content; rows of removed or replaced files are deleted."""
        seen_at = seen_at or utcnow()
        rows = {row["file_name"]: row for row in rows}
        with self._transaction() as (con, _):
            existing = con.execute(
                "SELECT file_name, fingerprint, reason, message, fix, first_seen_at, last_seen_at "
                "FROM refused_files WHERE erp = ?", [erp]).fetchall()
            first_seen = {(name, fp, reason): first for name, fp, reason, _, _, first, _ in existing}
            kept = [old for old in existing if old[0] not in rows and present.get(old[0]) == old[1]]
            con.execute("DELETE FROM refused_files WHERE erp = ?", [erp])
            values = [(erp, *old) for old in kept] + [
                (erp, name, row["fingerprint"], row["reason"], row["message"], row.get("fix"),
                 first_seen.get((name, row["fingerprint"], row["reason"]), seen_at), seen_at)
                for name, row in rows.items()
            ]
            if values:
                con.executemany("INSERT INTO refused_files VALUES (?, ?, ?, ?, ?, ?, ?, ?)", values)

    def refused_files(self, erp: str | None = None) -> list[dict[str, Any]]:
        """The refused and ignored files (of one ERP, or all), by ERP and file name."""
        with self.connect() as con:
            cursor = con.execute(
                "SELECT * FROM refused_files WHERE ? IS NULL OR erp = ? ORDER BY erp, file_name", [erp, erp])
            names = [d[0] for d in cursor.description]
            return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]

    # ------------------------------------------------------------------------------ client lifecycle

    def client_details(self, erp: str | None = None) -> list[dict[str, Any]]:
        """Every client (of one ERP, or all) with its status, reason, last extraction and last error."""
        with self.connect() as con:
            cursor = con.execute(
                f"SELECT {CLIENT_COLUMNS} FROM clients WHERE ? IS NULL OR erp = ? ORDER BY erp, name, erp_client_id",
                [erp, erp],
            )
            names = [d[0] for d in cursor.description]
            return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]

    def tenants_per_connection(self, erp: str | None = None) -> dict[tuple[str, str], int]:
        """(ERP, connection) → how many enabled tenants (active or waiting for API access) it serves."""
        rows = self.query("SELECT erp, connection, count(*) FILTER (WHERE status IN ('active', 'no_api_access')) "
                          "FROM clients WHERE ? IS NULL OR erp = ? GROUP BY ALL", [erp, erp])
        return {(e, c): n for e, c, n in rows}

    def enabled_never_extracted(self, erp: str) -> set[str]:
        """Numbers of enabled clients without a successful extraction (new, purged, or just given a
        number another client held): they need a full sync even if the partition was loaded before."""
        rows = self.query("SELECT org_number FROM clients WHERE erp = ? AND status IN ('active', 'no_api_access') "
                          "AND last_extracted_at IS NULL", [erp])
        return {org for (org,) in rows}

    @retried_on_conflict
    def activate_client(self, erp: str, client_id: str, connection: str | None = DEFAULT_CONNECTION, *,
                        actor: str | None = None, at: dt.datetime | None = None) -> list[tuple[str, str | None]]:
        """Make one client (an ERP client id reached through `connection`) active, in one
        transaction. When another client holds its number, the number moves: every other enabled
        client with that number becomes inactive (and any other one is marked deactivated, so it
        comes back inactive if listed again). Returns the (client id, connection) deactivated. Only
        an inactive client, or one rejected only for its shared number, can be activated (the
        caller checks and explains; this refuses silently)."""
        at = at or utcnow()
        with self._transaction() as (con, _):
            row = con.execute(f"SELECT org_number, name, status FROM clients WHERE {ONE_CLIENT}",
                              [erp, client_id, connection]).fetchone()
            if row is None:
                raise KeyError(f"{erp} client {client_id} of connection {connection} is not in the registry")
            org, name, status = row
            others = con.execute(
                f"SELECT erp_client_id, connection, status FROM clients WHERE erp = ? AND org_number = ? "
                f"AND NOT ({ONE_CLIENT}) AND status <> 'rejected'",
                [erp, org, erp, client_id, connection],
            ).fetchall()
            moved_from = [(cid, via) for cid, via, other_status in others if other_status in ENABLED]
            for other, via in moved_from:
                moved = (f"organisation number {org} was moved to {erp} client {client_id} ({name}) on activation; "
                         f"to move it back: erp-pipelines clients activate {erp} {org} --client-id {other}"
                         + (f" --connection {via}" if via != connection else ""))
                con.execute(f"UPDATE clients SET status = 'inactive', deactivated_at = ?, status_reason = ? "
                            f"WHERE {ONE_CLIENT}", [at, moved, erp, other, via])
            con.execute(
                f"UPDATE clients SET deactivated_at = coalesce(deactivated_at, ?) WHERE erp = ? AND org_number = ? "
                f"AND NOT ({ONE_CLIENT}) AND status <> 'rejected'",
                [at, erp, org, erp, client_id, connection],
            )
            con.execute(f"UPDATE clients SET status = 'active', status_reason = NULL, deactivated_at = NULL "
                        f"WHERE {ONE_CLIENT}", [erp, client_id, connection])
            moved_ids = ", ".join(cid for cid, _ in moved_from)
            detail = f"was {status}" + (f"; number moved from client(s) {moved_ids}" if moved_from else "")
            _audit(con, at, erp, org, client_id, "activate", None, detail, actor)
            for other, _ in moved_from:
                _audit(con, at, erp, org, other, "deactivate", None, f"number moved to client {client_id}", actor)
        return moved_from

    @retried_on_conflict
    def deactivate_client(self, erp: str, client_id: str, connection: str | None = DEFAULT_CONNECTION, *,
                          actor: str | None = None, at: dt.datetime | None = None) -> None:
        """Mark a client (an ERP client id reached through `connection`) deactivated: an enabled one
        becomes inactive (no runs; history kept); a revoked one stays revoked and comes back
        inactive if listed again."""
        at = at or utcnow()
        with self._transaction() as (con, _):
            row = con.execute(f"SELECT org_number, status FROM clients WHERE {ONE_CLIENT}",
                              [erp, client_id, connection]).fetchone()
            if row is None:
                raise KeyError(f"{erp} client {client_id} of connection {connection} is not in the registry")
            org, status = row
            con.execute(
                "UPDATE clients SET deactivated_at = coalesce(deactivated_at, ?), "
                "status = CASE WHEN status IN ('active', 'no_api_access') THEN 'inactive' ELSE status END, "
                "status_reason = CASE WHEN status IN ('active', 'no_api_access') THEN ? ELSE status_reason END "
                f"WHERE {ONE_CLIENT}",
                [at, deactivated_reason(erp, org), erp, client_id, connection],
            )
            _audit(con, at, erp, org, client_id, "deactivate", None, f"was {status}", actor)

    def tenant_tables(self) -> list[str]:
        """Every table holding tenant rows (columns erp and org_number), but the client registry."""
        rows = self.query(
            "SELECT table_name FROM information_schema.columns WHERE table_schema = 'main' "
            "AND column_name IN ('erp', 'org_number') GROUP BY table_name HAVING count(*) = 2 ORDER BY table_name"
        )
        views = {r[0] for r in self.query("SELECT view_name FROM duckdb_views() WHERE NOT internal")}
        return [name for (name,) in rows if name not in NOT_TENANT_TABLES and name not in views]

    def tenant_row_counts(self, erp: str, org_number: str) -> dict[str, int]:
        """Rows of one tenant per table (what a purge would delete)."""
        with self.connect() as con:
            return {
                table: con.execute(f"SELECT count(*) FROM {table} WHERE erp = ? AND org_number = ?",
                                   [erp, org_number]).fetchone()[0]
                for table in self.tenant_tables()
            }

    @retried_on_conflict
    def purge_tenant(self, erp: str, org_number: str, *, actor: str | None = None,
                     at: dt.datetime | None = None) -> dict[str, int]:
        """Delete every row of one tenant from every table, in one transaction; the client stays
        in the registry as inactive (a revoked one stays revoked), and an audit row records when,
        what and how many rows. Returns the rows deleted per table."""
        at = at or utcnow()
        tables = self.tenant_tables()
        with self._transaction() as (con, _):
            deleted = {}
            for table in tables:
                deleted[table] = con.execute(f"SELECT count(*) FROM {table} WHERE erp = ? AND org_number = ?",
                                             [erp, org_number]).fetchone()[0]
                con.execute(f"DELETE FROM {table} WHERE erp = ? AND org_number = ?", [erp, org_number])
            con.execute(
                "UPDATE clients SET deactivated_at = coalesce(deactivated_at, ?), last_extracted_at = NULL, "
                "last_error = NULL, last_error_at = NULL, "
                "status = CASE WHEN status IN ('active', 'no_api_access') THEN 'inactive' ELSE status END, "
                "status_reason = CASE WHEN status IN ('active', 'no_api_access', 'inactive') THEN ? "
                "ELSE status_reason END "
                "WHERE erp = ? AND org_number = ? AND status <> 'rejected'",
                [at, purged_reason(erp, org_number, at), erp, org_number],
            )
            detail = ", ".join(f"{table}={count}" for table, count in deleted.items())
            _audit(con, at, erp, org_number, None, "purge", sum(deleted.values()), detail, actor)
        return deleted

    def audit(self, erp: str | None = None) -> list[dict[str, Any]]:
        with self.connect() as con:
            cursor = con.execute("SELECT * FROM client_audit WHERE ? IS NULL OR erp = ? ORDER BY recorded_at, action",
                                 [erp, erp])
            names = [d[0] for d in cursor.description]
            return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]

    # ------------------------------------------------------------------------------ records

    def replace_accounts(
        self, erp: str, by_tenant: Mapping[str, list[Account]], *, run_id: str | None = None,
        extracted_at: dt.datetime | None = None,
    ) -> WriteResult:
        """Replace the chart of accounts of each tenant in `by_tenant`, atomically. An account
        number given twice for one tenant is refused (nothing is written)."""
        at = extracted_at or utcnow()
        for org, accounts in by_tenant.items():
            _refuse_repeats(erp, org, "account", (a.account_number for a in accounts))
        orgs, rows = _flatten(by_tenant)
        table = pa.Table.from_arrays(
            [
                _repeat(erp, pa.string(), len(rows)),
                pa.array(orgs, pa.string()),
                pa.array([a.account_number for a in rows], pa.string()),
                pa.array([a.name for a in rows], pa.string()),
                pa.array([a.account_type for a in rows], pa.string()),
                pa.array([a.standard_account for a in rows], pa.string()),
                _repeat(at, pa.timestamp("us"), len(rows)),
                _repeat(run_id, pa.string(), len(rows)),
                pa.array([a.account_class for a in rows], pa.string()),
                pa.array([a.grouping_category for a in rows], pa.string()),
                pa.array([a.grouping_code for a in rows], pa.string()),
            ],
            schema=ACCOUNT_SCHEMA,
        )
        return self._replace("accounts", erp, list(by_tenant), table, window=None)

    def replace_balances(
        self, erp: str, by_tenant: Mapping[str, list[Balance]], months: Sequence[dt.date], *,
        run_id: str | None = None, extracted_at: dt.datetime | None = None,
    ) -> WriteResult:
        """Replace each tenant's balances for the months `months[0]..months[-1]`, atomically.
        Rows outside that window are refused, so a bug cannot delete one window and fill another;
        so is a (period, account) given twice for one tenant: a duplicated row never lands."""
        if not months:
            raise ValueError("replace_balances needs the month window it replaces")
        first, last = min(months), max(months)
        at = extracted_at or utcnow()
        for org, balances in by_tenant.items():
            _refuse_repeats(erp, org, "balance", ((b.period, b.account_number) for b in balances))
        orgs, rows = _flatten(by_tenant)
        periods = [b.period for b in rows]
        if periods and not (first <= min(periods) and max(periods) <= last):
            org, b = next((o, b) for o, b in zip(orgs, rows, strict=True) if not first <= b.period <= last)
            raise ValueError(f"{erp} {org}: balance for {b.period} is outside the window {first}..{last}")
        # built column by column (list comprehensions and one conversion each): 3-4x faster than
        # appending row by row, which matters for a 1M-row load
        table = pa.Table.from_arrays(
            [
                _repeat(erp, pa.string(), len(rows)),
                pa.array(orgs, pa.string()),
                pa.array(periods, pa.date32()),
                pa.array([b.account_number for b in rows], pa.string()),
                pa.array([b.opening for b in rows], MONEY),
                pa.array([b.movement for b in rows], MONEY),
                pa.array([b.closing for b in rows], MONEY),
                pa.array([b.currency for b in rows], pa.string()),
                _repeat(at, pa.timestamp("us"), len(rows)),
                _repeat(run_id, pa.string(), len(rows)),
            ],
            schema=BALANCE_SCHEMA,
        )
        return self._replace("balances", erp, list(by_tenant), table, window=("period", first, last))

    def replace_reconciliation(
        self, erp: str, by_tenant: Mapping[str, list[Mapping[str, Any]]], *, run_id: str | None = None
    ) -> WriteResult:
        """Replace the reconciliation findings of each tenant (dicts with the table's columns)."""
        at = utcnow()
        columns: dict[str, list] = {name: [] for name in RECONCILIATION_SCHEMA.names}
        for org, issues in by_tenant.items():
            for issue in issues:
                _append(columns, erp, org, issue.get("source"), issue["check_name"], issue.get("account_number"),
                        issue.get("period"), issue.get("expected"), issue.get("actual"), issue["message"], at, run_id)
        table = pa.Table.from_pydict(columns, schema=RECONCILIATION_SCHEMA)
        return self._replace("reconciliation", erp, list(by_tenant), table, window=None)

    @retried_on_conflict
    def _replace(
        self, table_name: str, erp: str, tenants: list[str], rows: pa.Table,
        window: tuple[str, dt.date, dt.date] | None,
    ) -> WriteResult:
        started = time.perf_counter()
        if not tenants:
            return WriteResult(0, 0, 0.0, 0.0)
        tenant_table = pa.table({"org_number": pa.array(tenants, pa.string())})
        where = "erp = ? AND org_number IN (SELECT org_number FROM write_tenants)"
        params: list[Any] = [erp]
        if window:
            where += f" AND {window[0]} BETWEEN ? AND ?"
            params += [window[1], window[2]]
        with self._transaction() as (con, waited), arrow_views(con, write_tenants=tenant_table, write_rows=rows):
            con.execute(f"DELETE FROM {table_name} WHERE {where}", params)
            con.execute(f"INSERT INTO {table_name} SELECT * FROM write_rows")
        return WriteResult(len(tenants), rows.num_rows, time.perf_counter() - started, waited)

    # ------------------------------------------------------------------------------ metadata

    def row_counts(self, table: str, erp: str, org_numbers: Iterable[str]) -> tuple[int, dict[str, int]]:
        """Rows of `table` (accounts or balances) for the ERP, and for each of the given tenants."""
        if table not in ("accounts", "balances"):
            raise ValueError(f"no row counts for table {table!r}")
        wanted = list(org_numbers)
        with self.connect() as con:
            total = con.execute(f"SELECT count(*) FROM {table} WHERE erp = ?", [erp]).fetchone()[0]
            per_tenant = dict(con.execute(
                f"SELECT org_number, count(*) FROM {table} WHERE erp = ? AND list_contains(?, org_number) "
                "GROUP BY org_number", [erp, wanted]).fetchall()) if wanted else {}
        return total, {org: per_tenant.get(org, 0) for org in wanted}

    def account_names(self, erp: str, org_numbers: Iterable[str]) -> dict[tuple[str, str], str]:
        """(org number, account number) → the account's name, for the given tenants."""
        rows = self.query(
            "SELECT org_number, account_number, name FROM accounts WHERE erp = ? AND list_contains(?, org_number)",
            [erp, list(org_numbers)],
        )
        return {(org, number): name for org, number, name in rows if name}

    def failing_clients(self, erp: str) -> int:
        """Clients whose last extraction failed (an error newer than their last success)."""
        return self.query(
            "SELECT count(*) FROM clients WHERE erp = ? AND last_error_at IS NOT NULL "
            "AND (last_extracted_at IS NULL OR last_error_at > last_extracted_at)", [erp],
        )[0][0]


def _refuse_repeats(erp: str, org: str, what: str, keys: Iterable[Any]) -> None:
    repeated = first_repeat(keys)
    if repeated is not None:
        raise ValueError(f"{erp} {org}: {what} {repeated} appears twice in one write; nothing was written")


def _flatten(by_tenant: Mapping[str, list[Any]]) -> tuple[list[str], list[Any]]:
    """Every tenant's records in one list, with the tenant of each beside it."""
    orgs = [org for org, records in by_tenant.items() for _ in records]
    return orgs, [record for records in by_tenant.values() for record in records]


def _repeat(value: Any, type_: pa.DataType, n: int) -> pa.Array:
    """A column holding one value `n` times, without n Python objects (a timestamp repeated as its
    integer: `pa.repeat` of a timestamp scalar converts each element)."""
    if isinstance(value, dt.datetime):
        return pa.repeat(pa.scalar(pa.scalar(value, type_).value, pa.int64()), n).view(type_)
    return pa.repeat(pa.scalar(value, type_), n)


def _append(columns: dict[str, list], *values: Any) -> None:
    for column, value in zip(columns.values(), values, strict=True):
        column.append(value)


def deactivated_reason(erp: str, org_number: str) -> str:
    return f"deactivated: no scheduled or sensor runs; to resume: erp-pipelines clients activate {erp} {org_number}"


def purged_reason(erp: str, org_number: str, at: dt.datetime) -> str:
    return (f"accounts deleted (Slett kontoer) at {at:%Y-%m-%d %H:%M} UTC; to load again: "
            f"erp-pipelines clients activate {erp} {org_number}")


def waiting_reason(erp: str, org_number: str) -> str:
    return (f"new client waiting for activation (ERP_AUTO_ACTIVATE=false); "
            f"to load it: erp-pipelines clients activate {erp} {org_number}")


def _registry_holders(erp: str, existing: Mapping[str, tuple], listed: list[Client]) -> dict[str, Client]:
    """Number → the registered client holding it: an enabled one first, then inactive, then revoked
    (the first seen among equals). A client the listing now rejects holds nothing."""
    listed_by_id = {(c.connection, c.erp_client_id): c for c in listed}
    holders: dict[str, Client] = {}
    ranked = sorted((row for row in existing.values() if row[4] in HOLDER_RANK),
                    key=lambda row: (HOLDER_RANK[ClientStatus(row[4])], row[6], client_id_order(row[2]), row[14]))
    for row in ranked:
        now = listed_by_id.get((row[14], row[2]))
        if now is not None and now.status == ClientStatus.REJECTED:
            continue
        number = now.org_number if now is not None else row[1]
        holders.setdefault(number, Client(erp, number, row[2], row[3], ClientStatus(row[4]), connection=row[14]))
    return holders


def _same_holder(old_reason: str | None, new_reason: str | None) -> bool:
    """Both reasons name the same holder of the same shared number."""
    def holder(reason: str | None) -> str | None:
        return reason.split(":", 1)[0] if reason and reason.startswith("organisation number ") else None
    return holder(old_reason) is not None and holder(old_reason) == holder(new_reason)


def _audit(con: duckdb.DuckDBPyConnection, at: dt.datetime, erp: str, org_number: str, client_id: str | None,
           action: str, rows_deleted: int | None, detail: str, actor: str | None) -> None:
    con.execute("INSERT INTO client_audit VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [at, erp, org_number, client_id, action, rows_deleted, detail, actor])
