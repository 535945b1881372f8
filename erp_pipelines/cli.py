"""`erp-pipelines` (also `python -m erp_pipelines`): the project's command line."""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="erp-pipelines", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("env-example", help="print .env.example, written from every connector's settings")
    consent = commands.add_parser(
        "consent", help="give an OAuth consent for an ERP with authorisation-code login",
        description="Prints the authorise URL, opens a browser, waits on <ERP>_REDIRECT_URI for the answer, "
        "stores the tokens in the encrypted token store and prints the companies consented. If the login "
        "shows no company to choose, turn off the default company (standardfirma) in the ERP and try again.",
    )
    consent.add_argument("erp")
    consent.add_argument("--no-browser", action="store_true", help="only print the URL")
    consent.add_argument("--connection", metavar="NAME",
                         help="a stored connection (erp-pipelines connections list); default: the environment's")
    doctor = commands.add_parser(
        "doctor", help="check every credential: does it authenticate, which clients lack access, and the fix",
        description="For every configured ERP: whether its credential authenticates, the clients it reaches "
        "and, for each client that needs a fix, what the customer must tick or create (Norwegian, with an "
        "English line). Exit codes: 0 all good; 1 some client needs a fix; 2 a credential is refused or a "
        "variable is missing.",
    )
    doctor.add_argument("erp", nargs="?", help="only this ERP")
    doctor.add_argument("--json", action="store_true", help="print one JSON document (and nothing else)")
    add_clients_commands(commands)
    add_connections_commands(commands)
    args = parser.parse_args(argv)
    if args.command == "clients":
        return clients_main(args)
    if args.command == "connections":
        return connections_main(args)
    if args.command == "doctor":
        from erp_pipelines.doctor import doctor_main

        return doctor_main(args.erp, as_json=args.json)
    if args.command == "consent":
        from erp_pipelines.consent import consent_main

        return consent_main(args.erp, open_browser=not args.no_browser, connection=args.connection)
    if args.command == "env-example":
        from erp_pipelines.config import env_example

        sys.stdout.write(env_example())
        return 0
    return 2


CLIENTS_HELP = """Client management (what the ERPs' client screens call Aktiver, Deaktiver, Slett kontoer,
Full synkronisering). Statuses: active (gets runs), inactive (deactivated; history kept), rejected (a client
rule, with the reason), no_api_access (retried until access is given), revoked (no longer listed; history kept).
Each command is also a Dagster job (clients_activate, clients_deactivate, clients_purge, <erp>_full_sync).
Exit codes: 0 done; 1 refused (the message names the client and the fix); 2 configuration."""


def add_clients_commands(commands) -> None:
    clients = commands.add_parser("clients", help="list, activate, deactivate, purge or fully sync clients",
                                  description=CLIENTS_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = clients.add_subparsers(dest="action", required=True)
    listing = actions.add_parser("list", help="every client: name, number, status, reason, last extraction, last error")
    listing.add_argument("erp", nargs="?", help="only this ERP")
    for name, text in (("activate", "Aktiver: the client gets scheduled and sensor runs (a shared number moves to it)"),
                       ("deactivate", "Deaktiver: no scheduled or sensor runs; its history stays")):
        command = actions.add_parser(name, help=text, description=text)
        command.add_argument("erp")
        command.add_argument("org_number", nargs="?", metavar="ORGNR")
        command.add_argument("--client-id", help="the ERP's client id, when several clients share the number")
        command.add_argument("--connection", metavar="NAME",
                             help="the connection reaching the client, when several reach the same client id")
        command.add_argument("--all", action="store_true", dest="all_clients", help=f"{name} every client of the ERP")
    purge = actions.add_parser("purge", help="Slett kontoer: delete every row of one tenant; it stays as inactive")
    purge.add_argument("erp")
    purge.add_argument("org_number", metavar="ORGNR")
    purge.add_argument("--yes", action="store_true", help="really delete (without it: say what would be deleted)")
    sync = actions.add_parser("sync", help="Full synkronisering: all history of one tenant, as a Dagster run")
    sync.add_argument("erp")
    sync.add_argument("org_number", metavar="ORGNR")
    sync.add_argument("--full", action="store_true", required=True,
                      help="from <ERP>_HISTORY_START to the current month (required: the daily window is the schedule's)")


def clients_main(args: argparse.Namespace) -> int:
    from erp_pipelines import clients
    from erp_pipelines.config import warehouse_path
    from erp_pipelines.errors import ConfigError, ErpError, redact
    from erp_pipelines.registry import ERPS
    from erp_pipelines.warehouse import Warehouse

    def fail(message: str, code: int) -> int:
        print(f"erp-pipelines clients {args.action}: {redact(message)}", file=sys.stderr)
        return code

    erp = getattr(args, "erp", None)
    if erp is not None and erp not in ERPS:
        return fail(f"unknown ERP {erp!r}; use any of: {', '.join(ERPS)}", 2)
    warehouse = Warehouse(warehouse_path(os.environ))
    try:
        if args.action == "list":
            print(clients.format_client_list(clients.list_clients(warehouse, erp)))
        elif args.action in ("activate", "deactivate"):
            if bool(args.org_number) == args.all_clients:
                return fail("give either ORGNR or --all", 2)
            command = clients.activate if args.action == "activate" else clients.deactivate
            changes = command(warehouse, erp, args.org_number, client_id=args.client_id, connection=args.connection,
                              all_clients=args.all_clients)
            for change in changes:
                print(change.describe())
            if not changes:
                print(f"no {erp} client to {args.action}")
        elif args.action == "purge":
            print(clients.purge(warehouse, erp, args.org_number, confirm=args.yes).describe())
        elif args.action == "sync":
            from erp_pipelines.defs.assets import tenant_failure_messages
            from erp_pipelines.defs.clients import run_full_sync

            result = run_full_sync(erp, args.org_number)
            if not result.success:
                errors = [e.step_failure_data.error for e in result.get_step_failure_events()]
                detail = "; ".join(error.message.strip() for error in errors if error)
                return fail(f"Dagster run {result.run_id} failed: {detail}", 1)
            refused = tenant_failure_messages(result.all_events)  # a business failure: the run succeeded
            if refused:
                return fail(f"Dagster run {result.run_id}: {'; '.join(dict.fromkeys(refused))}", 1)
            print(f"{erp} {args.org_number}: full sync done (Dagster run {result.run_id})")
    except ConfigError as exc:
        return fail(str(exc), 2)
    except ErpError as exc:
        return fail(str(exc), 1)
    return 0


CONNECTIONS_HELP = """Connections: many credential sets per ERP (a firm's accountant key, a vendor's subscription
with its client keys, ...). The environment's variables are the connection named default; `add` stores
another one in the encrypted token store. Secrets are read from standard input as VAR=value lines (the
variable names of .env.example), never from arguments. Each connection has its own rate-limit budget and
its own runs (tag erp/connection=<erp>/<slug>). Exit codes: 0 done; 2 refused (the message says why)."""


def add_connections_commands(commands) -> None:
    connections = commands.add_parser("connections", help="add, list or remove an ERP's connections (credential sets)",
                                      description=CONNECTIONS_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = connections.add_subparsers(dest="action", required=True)
    add = actions.add_parser("add", help="store a connection; its secrets are read from standard input",
                             description="Reads VAR=value lines (dotenv) from standard input, e.g. "
                             "printf '<ERP>_..._TOKEN=...\\n' | erp-pipelines connections add <erp> --name \"Byrå AS\" "
                             "(the variable names of .env.example). Unset settings with a default take it.")
    add.add_argument("erp")
    add.add_argument("--name", required=True, help="the connection's name, e.g. \"Byrå AS\" (slug: byra-as)")
    add.add_argument("--set", action="append", default=[], metavar="VAR=value", dest="values",
                     help="a non-secret setting (secrets only on standard input)")
    listing = actions.add_parser("list", help="every connection: name, ERP, source, variables set, tenants served")
    listing.add_argument("erp", nargs="?", help="only this ERP")
    listing.add_argument("--json", action="store_true", help="print one JSON document")
    remove = actions.add_parser("remove", help="delete a stored connection and its cached tokens; its tenants "
                                "show as revoked at the next client refresh (history kept)")
    remove.add_argument("erp")
    remove.add_argument("--name", required=True)


def connections_main(args: argparse.Namespace) -> int:
    import json

    from erp_pipelines import connections
    from erp_pipelines.config import enabled_names, warehouse_path
    from erp_pipelines.errors import ConfigError, redact
    from erp_pipelines.warehouse import Warehouse

    try:
        store = connections.store_from_env()
        if args.action == "add":
            values = dict(_assignment(item) for item in args.values)
            text = "" if sys.stdin is None or sys.stdin.isatty() else sys.stdin.read()
            added = connections.add_connection(store, args.erp, args.name, text, values)
            print(f"{added.erp} connection {added.name!r} ({added.slug}) stored in {store.path}: "
                  f"{', '.join(added.variables)}")
            print(f"its runs carry the tag {connections.CONNECTION_TAG}={added.tag}; check it: "
                  f"erp-pipelines doctor {added.erp}")
        elif args.action == "remove":
            removed = connections.remove_connection(store, args.erp, args.name)
            print(f"{removed.erp} connection {removed.name!r} ({removed.slug}) removed with its cached tokens; its "
                  f"tenants show as revoked at the next refresh of {removed.erp}/clients (history kept)")
        else:
            erps = [args.erp] if args.erp else sorted(set(enabled_names(os.environ)))
            found = [c for erp in erps for c in connections.connections_of(erp, os.environ, store)]
            warehouse = Warehouse(warehouse_path(os.environ))
            served = warehouse.tenants_per_connection(args.erp) if warehouse.path.exists() else {}
            rows = [{"erp": c.erp, "name": c.name, "slug": c.slug, "source": c.source, "variables": c.variables,
                     "tenants_served": served.get((c.erp, c.slug), 0), "run_tag": c.tag} for c in found]
            if args.json:
                print(redact(json.dumps({"connections": rows}, ensure_ascii=False, indent=2)))
            elif not rows:
                print("No connections: set an ERP's variables (see .env.example) or "
                      "erp-pipelines connections add <erp> --name ...")
            else:
                for row in rows:
                    print(redact(f"{row['erp']}  {row['name']} ({row['slug']})  {row['source']}  "
                                 f"tenants: {row['tenants_served']}  variables: {', '.join(row['variables'])}"))
    except ConfigError as exc:
        print(f"erp-pipelines connections {args.action}: {redact(str(exc))}", file=sys.stderr)
        return 2
    return 0


def _assignment(item: str) -> tuple[str, str]:
    from erp_pipelines.errors import ConfigError

    name, sep, value = item.partition("=")
    if not sep or not name.strip():
        raise ConfigError("a --set argument is not VAR=value", fix="e.g. --set <ERP>_BASE_URL=https://...")
    return name.strip(), value
