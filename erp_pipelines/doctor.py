"""`erp-pipelines doctor`: for every configured ERP credential (each connection of each ERP:
`default` from the environment, then the stored ones), whether it authenticates, which
clients it reaches, and which of those need a fix, with what the customer must tick or create (the
connector's `onboarding_fix`, in Norwegian with an English line).

Each reached client of an API ERP gets one cheap probe: what a run reads, for last month only (the
chart of accounts, one month of balances and the tenant guard: `extract_tenant`), through the
connector, so the kit's throttle applies; some ERPs show missing access only at the balances.
Clients the client rules reject (no valid organisation number, a number listed twice) need a fix
too. The warehouse is neither read nor written; the token store is used as runs use it.

Exit codes: 0 all good; 1 some client needs a fix; 2 a credential is refused (or could not be
checked) or a variable is missing. Nothing printed holds a secret: texts come from names, numbers
and the error taxonomy, and every line passes through `redact`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import json
import os
import sys
from collections.abc import Mapping
from typing import Any

from erp_pipelines import tokens
from erp_pipelines.config import connector_from_environment
from erp_pipelines.config import enabled_names as enabled_erp_names
from erp_pipelines.connections import DEFAULT, STORE, Connection, connections_of, store_from_env
from erp_pipelines.erps.base import BilingualFix, Connector
from erp_pipelines.erps.extract import ACCOUNTS, BALANCES, extract_tenants
from erp_pipelines.errors import AuthError, ClientAccessError, ConfigError, ErpError, redact, register_secret
from erp_pipelines.model import Client, ClientStatus, add_months, classify_clients, is_shared_number_rejection
from erp_pipelines.registry import ERPS, api_erps

ALL_GOOD, NEEDS_FIX, CREDENTIAL_PROBLEM = 0, 1, 2

# credential statuses
CREDENTIAL_OK = "ok"
REFUSED = "refused"  # the ERP refuses the credential
MISSING_VARIABLE = "missing_variable"  # the configuration is incomplete or malformed
UNCHECKED = "unchecked"  # the ERP could not be asked (unreachable, unexpected answer)

# client statuses besides ClientStatus.NO_API_ACCESS and ClientStatus.REJECTED
CLIENT_OK = "ok"
CLIENT_ERROR = "error"  # the probe failed for another reason (a wrong identity, a broken answer)
CLIENT_UNREACHABLE = "unreachable"  # the ERP did not answer for this client just now

INVALID_NUMBER_FIX = BilingualFix(
    norwegian="Registrer et gyldig organisasjonsnummer (9 siffer, eller 11 for et enkeltpersonforetak) på "
              "klienten i ERP-systemet.",
    english="Register a valid organisation number (9 digits, or 11 for a sole proprietorship) on the client "
            "in the ERP.",
)
SHARED_NUMBER_FIX_NO = ("En annen klient har allerede dette organisasjonsnummeret; kommandoen i den engelske "
                        "teksten flytter nummeret til denne klienten.")
PROBE_ERROR_FIX_NO = "Klienten kunne ikke leses riktig; se den engelske linjen."
UNREACHABLE_FIX = BilingualFix(
    norwegian="ERP-systemet svarte ikke for denne klienten nå; kjør doctor igjen senere.",
    english="The ERP did not answer for this client just now; run doctor again later.",
)


@dataclasses.dataclass(frozen=True)
class ClientFinding:
    org_number: str
    name: str
    erp_client_id: str
    status: str
    fix_no: str | None = None
    fix_en: str | None = None
    detail: str | None = None  # the connector's own message for this client

    @property
    def needs_fix(self) -> bool:
        return self.status != CLIENT_OK


@dataclasses.dataclass
class ErpReport:
    erp: str
    display_name: str
    credential: str = CREDENTIAL_OK
    message: str | None = None  # why the credential is not ok, with the fix
    clients_reached: int = 0
    clients: list[ClientFinding] = dataclasses.field(default_factory=list)
    connection: str = DEFAULT  # the connection's name (`connections.py`)
    connection_slug: str = DEFAULT

    @property
    def key(self) -> str:
        """`<erp>` for the default connection, `<erp>/<slug>` for a stored one."""
        return self.erp if self.connection_slug == DEFAULT else f"{self.erp}/{self.connection_slug}"

    @property
    def needing_fix(self) -> list[ClientFinding]:
        return [client for client in self.clients if client.needs_fix]

    @property
    def exit_code(self) -> int:
        if self.credential != CREDENTIAL_OK:
            return CREDENTIAL_PROBLEM
        return NEEDS_FIX if self.needing_fix else ALL_GOOD


def exit_code(reports: list[ErpReport]) -> int:
    return max((report.exit_code for report in reports), default=CREDENTIAL_PROBLEM)


# ---------------------------------------------------------------------------------------- checks


def run_doctor(erp: str | None = None, environ: Mapping[str, str] | None = None) -> list[ErpReport]:
    """A report per configured ERP (or `erp` alone). Raises ConfigError when no ERP can be chosen."""
    env = os.environ if environ is None else environ
    if erp is not None and erp not in ERPS:
        raise ConfigError(f"unknown ERP {erp!r}", fix=f"use any of: {', '.join(ERPS)}")
    names = [erp] if erp else enabled_erp_names(env)
    if not names:
        raise ConfigError("no ERP is configured", fix="set an ERP's variables (see .env.example) or ERP_SOURCES")
    register_secret(env.get(tokens.KEY_VARIABLE))
    for name in names:
        register_secret(*(env.get(s.env) for s in ERPS[name].connector_class.settings if s.secret))

    checks = []
    for name in names:
        try:
            found = connections_of(name, env)
        except Exception:  # noqa: BLE001 - a malformed default connection: check_erp reports it
            found = []
        checks += [(name, connection) for connection in found] or [(name, None)]

    async def check_all() -> list[ErpReport]:
        return list(await asyncio.gather(*(check_erp(name, env, connection) for name, connection in checks)))

    return asyncio.run(check_all())


async def check_erp(erp: str, environ: Mapping[str, str], connection: Connection | None = None) -> ErpReport:
    """One connection of an ERP (default: the environment's): its credential, the clients it
    reaches and those that need a fix. Never raises."""
    report = ErpReport(erp, ERPS[erp].connector_class.display_name)
    if connection is not None:
        report.connection, report.connection_slug = connection.name, connection.slug
    try:
        if connection is not None and connection.source == STORE:
            connector = connection.connector(store_from_env(environ))
        else:
            connector = connector_from_environment(erp, environ)
    except Exception as exc:  # noqa: BLE001 - ConfigError, or a malformed setting: this ERP's report, not a crash
        return _credential_problem(report, MISSING_VARIABLE, exc)
    async with connector:
        try:
            listed = await connector.list_clients()
        except ConfigError as exc:
            return _credential_problem(report, MISSING_VARIABLE, exc)
        except AuthError as exc:
            return _credential_problem(report, REFUSED, exc)
        except Exception as exc:  # noqa: BLE001 - unreachable, or an unexpected answer: cannot say it authenticates
            return _credential_problem(report, UNCHECKED, exc)
        clients = classify_clients(listed)
        report.clients_reached = len(clients)
        probed = [client for client in clients if client.status != ClientStatus.REJECTED]
        findings = {c.erp_client_id: _rejection(c) for c in clients if c.status == ClientStatus.REJECTED}
        if erp in {spec.name for spec in api_erps()}:
            last_month = add_months(dt.date.today().replace(day=1), -1)
            async for extract in extract_tenants(connector, probed, what=(ACCOUNTS, BALANCES), months=[last_month]):
                if isinstance(extract.error, AuthError):
                    _credential_problem(report, REFUSED, extract.error)
                findings[extract.client.erp_client_id] = _probe_finding(connector, extract.client, extract.error)
        else:
            findings.update({c.erp_client_id: _finding(c, CLIENT_OK) for c in probed})
        report.clients = [findings[c.erp_client_id] for c in clients]
        report.clients += [_refused(connector, client_id, exc) for client_id, exc in connector.refused_clients.items()]
        report.clients += [
            ClientFinding("", f"{report.display_name} client {client_id}", client_id, CLIENT_UNREACHABLE,
                          UNREACHABLE_FIX.norwegian, UNREACHABLE_FIX.english)
            for client_id in sorted(connector.unresolved_client_ids)
        ]
    return report


def _credential_problem(report: ErpReport, credential: str, exc: Exception) -> ErpReport:
    report.credential = credential
    report.message = _message(exc)
    return report


def _message(exc: Exception) -> str:
    text = str(exc) if isinstance(exc, ErpError) else f"{type(exc).__name__}: {exc}"
    return redact(text)


def _finding(client: Client, status: str, fix: BilingualFix | None = None, *, fix_no: str | None = None,
             fix_en: str | None = None, detail: str | None = None) -> ClientFinding:
    return ClientFinding(
        client.org_number, client.name, client.erp_client_id, status,
        fix.norwegian if fix else fix_no, fix.english if fix else fix_en, detail,
    )


def _rejection(client: Client) -> ClientFinding:
    if is_shared_number_rejection(client):
        return _finding(client, ClientStatus.REJECTED.value, fix_no=SHARED_NUMBER_FIX_NO, fix_en=client.status_reason)
    return _finding(client, ClientStatus.REJECTED.value, INVALID_NUMBER_FIX, detail=client.status_reason)


def _probe_finding(connector: Connector, client: Client, error: Exception | None) -> ClientFinding:
    if error is None:
        return _finding(client, CLIENT_OK)
    detail = _message(error)
    if isinstance(error, ClientAccessError):
        return _access_finding(connector, client, error, detail)
    if isinstance(error, ErpError) and error.retryable:
        return _finding(client, CLIENT_UNREACHABLE, UNREACHABLE_FIX, detail=detail)
    fix_en = error.fix if isinstance(error, ErpError) and error.fix else "see the detail line"
    return _finding(client, CLIENT_ERROR, fix_no=PROBE_ERROR_FIX_NO, fix_en=fix_en, detail=detail)


def _access_finding(connector: Connector, client: Client, error: ErpError, detail: str) -> ClientFinding:
    status = ClientStatus.NO_API_ACCESS.value
    if connector.onboarding_fix is not None:
        return _finding(client, status, connector.onboarding_fix, detail=detail)
    return _finding(client, status, fix_en=error.fix, detail=detail)


def _refused(connector: Connector, client_id: str, error: ErpError) -> ClientFinding:
    """A configured client (a client key, a tenant id) the ERP refuses while listing."""
    client = Client(connector.erp, "", client_id, error.tenant or f"{connector.display_name} client {client_id}")
    return _access_finding(connector, client, error, _message(error))


# ---------------------------------------------------------------------------------------- output


CREDENTIAL_WORDS = {
    CREDENTIAL_OK: "credential OK",
    REFUSED: "credential REFUSED",
    MISSING_VARIABLE: "configuration incomplete",
    UNCHECKED: "credential could not be checked",
}


def format_text(reports: list[ErpReport]) -> str:
    lines: list[str] = []
    for report in reports:
        through = f", connection {report.connection}" if report.connection_slug != DEFAULT else ""
        head = f"{report.display_name} ({report.erp}{through}): {CREDENTIAL_WORDS[report.credential]}"
        if report.message:
            head += f": {report.message}"
        lines.append(head)
        if report.credential == MISSING_VARIABLE or (report.credential != CREDENTIAL_OK and not report.clients):
            continue
        needing = report.needing_fix
        lines.append(f"  {report.clients_reached} client(s) reached; {len(needing)} need(s) a fix")
        for client in needing:
            lines.append(f"  - {client.name} (orgnr {client.org_number or 'none'}, {report.erp} client "
                         f"{client.erp_client_id}): {client.status}")
            if client.fix_no:
                lines.append(f"      NO: {client.fix_no}")
            if client.fix_en:
                lines.append(f"      EN: {client.fix_en}")
            if client.detail:
                lines.append(f"      detail: {client.detail}")
    code = exit_code(reports)
    lines.append({
        ALL_GOOD: "All good.",
        NEEDS_FIX: "Some clients need a fix (exit 1).",
        CREDENTIAL_PROBLEM: "A credential is refused or a variable is missing (exit 2).",
    }[code])
    return redact("\n".join(lines))


def as_document(reports: list[ErpReport]) -> dict[str, Any]:
    """The `--json` document."""
    return {
        "exit_code": exit_code(reports),
        "erps": {
            report.key: {
                "erp": report.erp,
                "connection": report.connection,
                "display_name": report.display_name,
                "credential": report.credential,
                "message": report.message,
                "clients_reached": report.clients_reached,
                "clients": [dataclasses.asdict(client) for client in report.clients],
            }
            for report in reports
        },
    }


def doctor_main(erp: str | None = None, *, as_json: bool = False, environ: Mapping[str, str] | None = None) -> int:
    try:
        reports = run_doctor(erp, environ)
    except ConfigError as exc:
        if as_json:
            print(redact(json.dumps({"exit_code": CREDENTIAL_PROBLEM, "error": str(exc), "erps": {}})))
        else:
            print(f"erp-pipelines doctor: {redact(str(exc))}", file=sys.stderr)
        return CREDENTIAL_PROBLEM
    if as_json:
        print(redact(json.dumps(as_document(reports), ensure_ascii=False, indent=2)))
    else:
        print(format_text(reports))
    return exit_code(reports)
