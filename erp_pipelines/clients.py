"""Client management as accountants know it: list, activate, deactivate, purge ("Slett kontoer")
and the checks before a full sync ("Full synkronisering"). Plain Python, no Dagster: the command
line (`erp-pipelines clients ...`) and the Dagster jobs (`defs/clients.py`) both call these.

Statuses (per client and ERP, `model.ClientStatus`): active, inactive (deactivated by the user, or
a new client waiting while `ERP_AUTO_ACTIVATE=false`), rejected (a client rule; the reason kept),
no_api_access, revoked (no longer listed; history kept). Only active and no_api_access clients get
runs. Every change is written in one transaction and recorded in the `client_audit` table.
"""

from __future__ import annotations

import calendar
import dataclasses
import datetime as dt
import getpass
from typing import Any

from erp_pipelines.connections import slug_of
from erp_pipelines.errors import ErpError
from erp_pipelines.model import (
    DEFAULT_CONNECTION,
    Client,
    ClientStatus,
    client_id_order,
    is_shared_number_rejection,
    normalise_tenant_id,
)
from erp_pipelines.warehouse import ENABLED, Warehouse


class ClientCommandError(ErpError):
    """A client command that cannot be done as asked; the message names the client and the fix."""


@dataclasses.dataclass(frozen=True)
class StatusChange:
    """One client a command looked at: its status before and after, and a note for the user."""

    client: Client
    before: ClientStatus
    after: ClientStatus
    note: str = ""

    @property
    def changed(self) -> bool:
        return self.before != self.after

    def describe(self) -> str:
        what = f"{self.before} -> {self.after}" if self.changed else f"unchanged ({self.after})"
        return f"{self.client.label}: {what}" + (f"; {self.note}" if self.note else "")


@dataclasses.dataclass(frozen=True)
class PurgeResult:
    erp: str
    org_number: str
    rows: dict[str, int]  # table -> rows deleted (or that would be deleted)
    done: bool

    @property
    def total(self) -> int:
        return sum(self.rows.values())

    def describe(self) -> str:
        tables = ", ".join(f"{table}: {count}" for table, count in self.rows.items())
        verb = "deleted" if self.done else "would delete"
        return f"{self.erp} {self.org_number}: {verb} {self.total} rows ({tables})"


def actor_name() -> str:
    """Who runs a command, for the audit row (the login name; never a credential)."""
    try:
        return getpass.getuser()
    except (OSError, KeyError):  # no login name (some containers)
        return "unknown"


# ---------------------------------------------------------------------------------------- list


def list_clients(warehouse: Warehouse, erp: str | None = None) -> list[dict[str, Any]]:
    """Every client with name, number, status, reason, last extraction and last error."""
    return warehouse.client_details(erp)


def format_client_list(rows: list[dict[str, Any]]) -> str:
    """A table for the terminal; reasons and errors on indented lines beneath their client."""
    if not rows:
        return "No clients registered yet: materialise <erp>/clients or wait for the client-access sensor."
    header = ("ERP", "NAME", "ORGNR", "CLIENT ID", "STATUS", "LAST EXTRACTION")
    table = [(r["erp"], r["name"] or "", r["org_number"] or "-", r["erp_client_id"], r["status"],
              _when(r["last_extracted_at"])) for r in rows]
    if any(r.get("connection", "default") != "default" for r in rows):  # several connections: say which
        header += ("CONNECTION",)
        table = [(*line, r["connection"]) for line, r in zip(table, rows, strict=True)]
    widths = [max(len(str(line[i])) for line in [header, *table]) for i in range(len(header))]
    out = ["  ".join(str(v).ljust(w) for v, w in zip(header, widths, strict=True)).rstrip()]
    for row, line in zip(rows, table, strict=True):
        out.append("  ".join(str(v).ljust(w) for v, w in zip(line, widths, strict=True)).rstrip())
        if row["status_reason"]:
            out.append(f"    reason: {row['status_reason']}")
        if row.get("fiscal_year_start_month") not in (None, 1):  # calendar years go without saying
            out.append(f"    fiscal year starts in {calendar.month_name[row['fiscal_year_start_month']]}")
        if row["last_error"]:
            out.append(f"    last error ({_when(row['last_error_at'])}): {row['last_error']}")
    return "\n".join(out)


def _when(value: dt.datetime | None) -> str:
    return f"{value:%Y-%m-%d %H:%M} UTC" if value else "never"


# ---------------------------------------------------------------------------------------- find


def find_client(warehouse: Warehouse, erp: str, org_number: str, client_id: str | None = None,
                connection: str | None = None) -> Client:
    """The registered client with this number (and ERP client id, when several share the number;
    and connection, when several connections reach that client id)."""
    number, slug = _compact(org_number), connection and slug_of(connection)
    matches = [c for c in warehouse.clients(erp) if c.org_number == number
               and (client_id is None or c.erp_client_id == client_id)
               and (slug is None or c.connection == slug)]
    if not matches:
        named = "".join(f" {part}" for part in (client_id and f"client {client_id}",
                                                 connection and f"of connection {connection}") if part)
        raise ClientCommandError(
            f"no {erp}{named or ' client'} with organisation number {number} is registered", erp=erp,
            fix=f"check the number, client id and connection with `erp-pipelines clients list {erp}`; a client "
            f"the ERP lists for the first time is registered by the next run of {erp}/clients or the "
            "client-access sensor",
        )
    if len(matches) > 1:
        shown = ", ".join(f"{c.erp_client_id} {c.name} ({c.status}{_through(c)})"
                          for c in sorted(matches, key=lambda c: (client_id_order(c.erp_client_id), c.connection)))
        if len({c.erp_client_id for c in matches}) > 1:
            problem, fix = f"{len(matches)} {erp} clients share organisation number {number}", "--client-id ID"
        else:
            problem, fix = f"{erp} client {matches[0].erp_client_id} is reached through {len(matches)} connections", \
                "--connection NAME"
        raise ClientCommandError(f"{problem}: {shown}", erp=erp, fix=f"name the one you mean with {fix}")
    return matches[0]


def _through(client: Client) -> str:
    return f", connection {client.connection}" if client.connection != DEFAULT_CONNECTION else ""


def _compact(org_number: str) -> str:
    try:
        return normalise_tenant_id(org_number)
    except ValueError:
        return (org_number or "").strip()


# ---------------------------------------------------------------------------------------- activate


def activate(warehouse: Warehouse, erp: str, org_number: str | None = None, *, client_id: str | None = None,
             connection: str | None = None, all_clients: bool = False,
             actor: str | None = None) -> list[StatusChange]:
    """Make a client active ("Aktiver"): it gets scheduled and sensor runs again.

    A client rejected only because another client holds its number takes the number: the other
    is deactivated, in the same transaction. With `all_clients`, every inactive client of the ERP
    whose number no active client holds (rejected and revoked clients are left as they are)."""
    actor = actor or actor_name()
    if all_clients:
        return _activate_all(warehouse, erp, actor)
    if not org_number:
        raise ClientCommandError("activate needs an organisation number or --all", erp=erp,
                                 fix=f"erp-pipelines clients activate {erp} ORGNR (or --all)")
    client = find_client(warehouse, erp, org_number, client_id, connection)
    if client.status in ENABLED:
        note = ("already active" if client.status == ClientStatus.ACTIVE
                else f"already enabled, waiting for API access: {client.status_reason}")
        return [StatusChange(client, client.status, client.status, note)]
    if client.status == ClientStatus.REVOKED:
        raise ClientCommandError(
            "is no longer listed by the ERP (access withdrawn); it cannot be activated", erp=erp, tenant=client.label,
            fix="the client must grant the integration access again; the next client refresh brings it back",
        )
    if client.status == ClientStatus.REJECTED and not is_shared_number_rejection(client):
        raise ClientCommandError(
            f"is rejected: {client.status_reason}", erp=erp, tenant=client.label,
            fix="register a valid organisation number for the client in the ERP; the next client refresh picks it up",
        )
    moved_from = warehouse.activate_client(erp, client.erp_client_id, client.connection, actor=actor)
    changes = [StatusChange(client, client.status, ClientStatus.ACTIVE, _next_step(erp, client, moved_from))]
    registered = {(c.erp_client_id, c.connection): c for c in warehouse.clients(erp)}
    changes += [StatusChange(registered[key], ClientStatus.ACTIVE, registered[key].status,
                             f"organisation number moved to client {client.erp_client_id}") for key in moved_from]
    return changes


def _next_step(erp: str, client: Client, moved_from: list[tuple[str, str | None]]) -> str:
    if moved_from:
        ids = ", ".join(cid for cid, _ in moved_from)
        return (f"took organisation number {client.org_number} from client(s) {ids}; the "
                "client-access sensor reloads its history (or now: "
                f"erp-pipelines clients sync {erp} {client.org_number} --full)")
    return "the client-access sensor requests its first full sync if it has none"


def _activate_all(warehouse: Warehouse, erp: str, actor: str) -> list[StatusChange]:
    clients = warehouse.clients(erp)
    held = {c.org_number for c in clients if c.status in ENABLED}
    changes = []
    for client in clients:  # in registration order: the first registered of a shared number wins
        if client.status != ClientStatus.INACTIVE:
            continue
        if client.org_number in held:
            changes.append(StatusChange(client, client.status, client.status,
                                        "another client holds its number; activate it by --client-id to move it"))
            continue
        warehouse.activate_client(erp, client.erp_client_id, client.connection, actor=actor)
        held.add(client.org_number)
        changes.append(StatusChange(client, client.status, ClientStatus.ACTIVE))
    return changes


# ---------------------------------------------------------------------------------------- deactivate


def deactivate(warehouse: Warehouse, erp: str, org_number: str | None = None, *, client_id: str | None = None,
               connection: str | None = None, all_clients: bool = False,
               actor: str | None = None) -> list[StatusChange]:
    """Stop a client's runs ("Deaktiver"): no scheduled or sensor runs; its history stays. With
    `all_clients`, every active client (and every one without API access) of the ERP."""
    actor = actor or actor_name()
    if all_clients:
        targets = [c for c in warehouse.clients(erp) if c.status in ENABLED]
    elif not org_number:
        raise ClientCommandError("deactivate needs an organisation number or --all", erp=erp,
                                 fix=f"erp-pipelines clients deactivate {erp} ORGNR (or --all)")
    else:
        targets = [_enabled_holder(warehouse, erp, org_number, client_id, connection)]
    changes = []
    for client in targets:
        if client.status == ClientStatus.REJECTED:
            raise ClientCommandError(f"is rejected ({client.status_reason}); it gets no runs anyway",
                                     erp=erp, tenant=client.label, fix="nothing to do")
        if client.status == ClientStatus.INACTIVE:
            changes.append(StatusChange(client, client.status, client.status, "already inactive"))
            continue
        warehouse.deactivate_client(erp, client.erp_client_id, client.connection, actor=actor)
        after = ClientStatus.REVOKED if client.status == ClientStatus.REVOKED else ClientStatus.INACTIVE
        note = "comes back inactive if the ERP lists it again" if after == ClientStatus.REVOKED else "history kept"
        changes.append(StatusChange(client, client.status, after, note))
    return changes


def _enabled_holder(warehouse: Warehouse, erp: str, org_number: str, client_id: str | None,
                    connection: str | None) -> Client:
    """For a number several clients share: the one that gets runs (there is at most one)."""
    if client_id is None and connection is None:
        number = _compact(org_number)
        enabled = [c for c in warehouse.clients(erp) if c.org_number == number and c.status in ENABLED]
        if len(enabled) == 1:
            return enabled[0]
    return find_client(warehouse, erp, org_number, client_id, connection)


# ---------------------------------------------------------------------------------------- purge


def purge(warehouse: Warehouse, erp: str, org_number: str, *, confirm: bool,
          actor: str | None = None) -> PurgeResult:
    """Delete every row of one tenant in every table ("Slett kontoer"), in one transaction, and
    record an audit row; the client stays registered as inactive. Without `confirm`, nothing is
    deleted and a `ClientCommandError` says what would be."""
    number = _compact(org_number)
    registered = [c for c in warehouse.clients(erp) if c.org_number == number]
    counts = warehouse.tenant_row_counts(erp, number)
    if not registered and not any(counts.values()):
        raise ClientCommandError(f"no {erp} client with organisation number {number} is registered and no rows "
                                 "are stored for it", erp=erp,
                                 fix=f"check the number with `erp-pipelines clients list {erp}`")
    if not confirm:
        plan = PurgeResult(erp, number, counts, done=False)
        raise ClientCommandError(
            f"refusing to delete without confirmation: {plan.describe()}; the client would stay registered as "
            "inactive", erp=erp, fix=f"run again with --yes: erp-pipelines clients purge {erp} {number} --yes",
        )
    deleted = warehouse.purge_tenant(erp, number, actor=actor or actor_name())
    return PurgeResult(erp, number, deleted, done=True)


# ---------------------------------------------------------------------------------------- sync


def require_loadable(warehouse: Warehouse, erp: str, org_number: str) -> Client:
    """The client a run may extract (active, or waiting for API access), or a `ClientCommandError`
    naming it, its status and how to activate it."""
    number = _compact(org_number)
    registered = [c for c in warehouse.clients(erp) if c.org_number == number]
    enabled = [c for c in registered if c.status in ENABLED]
    if enabled:
        return enabled[0]
    raise ClientCommandError(not_loadable_reason(erp, number, registered), erp=erp)


def not_loadable_reason(erp: str, org_number: str, registered: list[Client]) -> str:
    """Why no run may extract this tenant, and the fix."""
    if not registered:
        return (f"tenant {org_number} is not a registered {erp} client. Fix: check the number with "
                f"`erp-pipelines clients list {erp}`, or run {erp}/clients to refresh the client list.")
    client = min(registered, key=lambda c: (c.status == ClientStatus.REJECTED, client_id_order(c.erp_client_id)))
    reason = f" ({client.status_reason})" if client.status_reason else ""
    fixes = {
        ClientStatus.INACTIVE: f"erp-pipelines clients activate {erp} {org_number}",
        ClientStatus.REVOKED: "the client must grant the integration access again; the next client refresh "
        "brings it back",
    }
    if client.status == ClientStatus.REJECTED:
        fix = (f"erp-pipelines clients activate {erp} {org_number} --client-id {client.erp_client_id} "
               "(moves the number to it)" if is_shared_number_rejection(client)
               else "register a valid organisation number for the client in the ERP")
    else:
        fix = fixes.get(client.status, f"erp-pipelines clients activate {erp} {org_number}")
    return f"{client.label} is {client.status}{reason}: it gets no runs. Fix: {fix}"
