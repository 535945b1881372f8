"""Client management as Dagster jobs, so each command shows in the UI as a run with its config and
who launched it: `clients_activate`, `clients_deactivate`, `clients_purge` (config via run config),
and one `<erp>_full_sync` asset job per ERP (all history for the selected tenants). The work is
done by the plain functions in `erp_pipelines.clients`, the same ones the command line calls.
"""

import contextlib
import os
from collections.abc import Mapping

import dagster as dg

from erp_pipelines import clients
from erp_pipelines.defs.assets import WAREHOUSE, ErpAssets
from erp_pipelines.errors import ErpError

LAUNCHED_BY = "erp/launched_by"  # tag the command line sets; Dagster+ sets dagster/user itself


class ClientCommand(dg.Config):
    """Which client(s): `org_number` (and `client_id` when several share the number, `connection`
    when several connections reach that client id), or `all`."""

    erp: str
    org_number: str | None = None
    client_id: str | None = None
    connection: str | None = None
    all: bool = False


class PurgeCommand(dg.Config):
    """The tenant whose rows are deleted; `confirm` must be true (what `--yes` is on the command line)."""

    erp: str
    org_number: str
    confirm: bool = False


def launched_by(context: dg.OpExecutionContext) -> str:
    tags = context.run.tags
    return tags.get("dagster/user") or tags.get(LAUNCHED_BY) or "dagster"


def _ensure_partitions(context: dg.OpExecutionContext, erp: str, org_numbers: list[str]) -> None:
    """An activated client's number gets its partition now, not at the next client refresh."""
    name = f"{erp}_tenants"
    existing = set(context.instance.get_dynamic_partitions(name))
    missing = sorted({org for org in org_numbers if org not in existing})
    if missing:
        context.instance.add_dynamic_partitions(name, missing)


def _report(context: dg.OpExecutionContext, changes: list[clients.StatusChange]) -> dg.Output:
    for change in changes:
        context.log.info(change.describe())
    return dg.Output(
        None,
        metadata={
            "clients_changed": sum(1 for c in changes if c.changed),
            "changes": dg.MetadataValue.md("\n".join(f"- {c.describe()}" for c in changes) or "none"),
        },
    )


def _fail(exc: ErpError) -> dg.Failure:
    return dg.Failure(description=str(exc), allow_retries=False)


def _status_op(name: str, command, description: str) -> dg.OpDefinition:
    """An op that changes clients' status with `command` (`clients.activate` / `clients.deactivate`)."""

    @dg.op(name=name, description=description, required_resource_keys={WAREHOUSE})
    def change_status(context: dg.OpExecutionContext, config: ClientCommand) -> dg.Output:
        warehouse = getattr(context.resources, WAREHOUSE).get()
        try:
            changes = command(warehouse, config.erp, config.org_number, client_id=config.client_id,
                              connection=config.connection, all_clients=config.all, actor=launched_by(context))
        except ErpError as exc:
            raise _fail(exc) from None
        _ensure_partitions(context, config.erp, [c.client.org_number for c in changes if c.after == "active"])
        return _report(context, changes)

    return change_status


activate_clients = _status_op("activate_clients", clients.activate,
                              "Aktiver: make the client(s) active; a shared number moves to the activated client.")
deactivate_clients = _status_op("deactivate_clients", clients.deactivate,
                                "Deaktiver: no scheduled or sensor runs for the client(s); history kept.")


@dg.op(required_resource_keys={WAREHOUSE})
def purge_tenant(context: dg.OpExecutionContext, config: PurgeCommand) -> dg.Output:
    """Slett kontoer: delete every row of the tenant in every table; the client stays, inactive."""
    warehouse = getattr(context.resources, WAREHOUSE).get()
    try:
        result = clients.purge(warehouse, config.erp, config.org_number, confirm=config.confirm,
                               actor=launched_by(context))
    except ErpError as exc:
        raise _fail(exc) from None
    context.log.info(result.describe())
    return dg.Output(None, metadata={"rows_deleted": result.total, **{f"rows_{t}": n for t, n in result.rows.items()}})


@dg.job(name="clients_activate", description="Aktiver: activate a client (or all inactive ones) of an ERP.",
        tags={"erp/command": "activate"})
def clients_activate_job():
    activate_clients()


@dg.job(name="clients_deactivate", description="Deaktiver: stop the runs of a client (or all) of an ERP.",
        tags={"erp/command": "deactivate"})
def clients_deactivate_job():
    deactivate_clients()


@dg.job(name="clients_purge", description="Slett kontoer: delete every row of one tenant (config confirm: true).",
        tags={"erp/command": "purge"})
def clients_purge_job():
    purge_tenant()


CLIENT_JOBS = [clients_activate_job, clients_deactivate_job, clients_purge_job]


def full_sync_job_name(erp: str) -> str:
    return f"{erp}_full_sync"


def build_full_sync_job(erp_assets: ErpAssets):
    """Full synkronisering: accounts and all balance history (from `<ERP>_HISTORY_START`) for the
    selected tenants: the run the client-access sensor requests for a new client."""
    return dg.define_asset_job(
        full_sync_job_name(erp_assets.erp),
        selection=dg.AssetSelection.assets(*erp_assets.extract_keys),
        config={"ops": {erp_assets.extract_op: {"config": {"full_sync": True}}}},
        tags={"erp": erp_assets.erp, "erp/trigger": "full-sync"},
        description=f"Full synkronisering of {erp_assets.erp} tenants: accounts and every month from the history start.",
    )


def run_full_sync(erp: str, org_number: str, *, environ: Mapping[str, str] | None = None,
                  instance: dg.DagsterInstance | None = None, actor: str | None = None) -> dg.ExecuteInProcessResult:
    """`erp-pipelines clients sync ERP ORGNR --full`: check the client may be loaded (else a
    `ClientCommandError` naming its status and the fix), then execute `<erp>_full_sync` for its
    partition in this process, on the Dagster instance of `DAGSTER_HOME` (so the run shows in the
    UI) or an ephemeral one."""
    from erp_pipelines.config import load_config
    from erp_pipelines.defs.build import build_definitions
    from erp_pipelines.warehouse import Warehouse

    env = os.environ if environ is None else environ
    config = load_config(env)
    if erp not in {c.name for c in config.erps}:
        raise clients.ClientCommandError(
            f"{erp} is not enabled in this environment", erp=erp,
            fix="set its credentials (see .env.example) or add it to ERP_SOURCES",
        )
    client = clients.require_loadable(Warehouse(config.warehouse_path), erp, org_number)
    defs = build_definitions(env)
    with contextlib.ExitStack() as stack:
        if instance is None:  # ours: entered, so Dagster resolves the job against this instance's state
            own = dg.DagsterInstance.get() if env.get("DAGSTER_HOME") else dg.DagsterInstance.ephemeral()
            instance = stack.enter_context(own)
        partitions = f"{erp}_tenants"
        if not instance.has_dynamic_partition(partitions, client.org_number):
            instance.add_dynamic_partitions(partitions, [client.org_number])
        job = defs.resolve_job_def(full_sync_job_name(erp))
        return job.execute_in_process(
            instance=instance, partition_key=client.org_number, raise_on_error=False,
            tags={LAUNCHED_BY: actor or clients.actor_name(), "erp/command": "sync"},
        )
