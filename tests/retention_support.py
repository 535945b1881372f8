"""A run history for the run-retention tests, the same on SQLite and PostgreSQL: runs that wrote
materialisations and observations of a partitioned and an unpartitioned asset, a failed run, and
a run still in progress. `age` makes runs look as if last updated `days` ago (storage specific)."""

import datetime as dt
from collections.abc import Callable
from types import SimpleNamespace

import dagster as dg
from pydantic import Field

from erp_pipelines.defs.retention import build_run_retention

BALANCES = dg.AssetKey(["acme", "balances"])
CLIENTS = dg.AssetKey(["acme", "clients"])


class Events(dg.Config):
    materialised: list[str] = Field(default_factory=list)
    observed: list[str] = Field(default_factory=list)
    clients: bool = False
    fail: bool = False


@dg.op
def write_events(context: dg.OpExecutionContext, config: Events):
    for partition in config.materialised:
        yield dg.AssetMaterialization(BALANCES, partition=partition, metadata={"run": context.run_id})
    for partition in config.observed:
        yield dg.AssetObservation(BALANCES, partition=partition, metadata={"failure": "needs API access"})
    if config.clients:
        yield dg.AssetMaterialization(CLIENTS, metadata={"run": context.run_id})
    if config.fail:
        raise dg.Failure("the ERP was down")
    yield dg.Output(None)


@dg.job
def history_job():
    write_events()


def _run(instance: dg.DagsterInstance, **events) -> str:
    result = history_job.execute_in_process(instance=instance, raise_on_error=False,
                                            run_config={"ops": {"write_events": {"config": events}}})
    return result.run_id


def make_history(instance: dg.DagsterInstance, age: Callable[[list[str], int], None]) -> SimpleNamespace:
    """Old runs (100 days) and one recent run:

    - superseded: a,b,c, all rewritten later: deleted;
    - holds_c: b,c (latest of c): kept;    holds_b: a,b (latest of b): kept;
    - recent: a (latest of a), too new to qualify;
    - observed: only observation of d (its failure reason): kept;
    - old_clients, new_clients: the unpartitioned asset twice: the first deleted, the second kept;
    - failed: a failed run with no asset events: deleted;
    - in_progress: started 100 days ago and never finished: kept."""
    runs = SimpleNamespace(
        superseded=_run(instance, materialised=["a", "b", "c"]),
        old_clients=_run(instance, clients=True),
        holds_c=_run(instance, materialised=["b", "c"]),
        holds_b=_run(instance, materialised=["a", "b"]),
        observed=_run(instance, observed=["d"]),
        new_clients=_run(instance, clients=True),
        failed=_run(instance, fail=True),
        in_progress=instance.create_run_for_job(history_job, status=dg.DagsterRunStatus.STARTED).run_id,
    )
    age([run_id for run_id in vars(runs).values()], 100)
    runs.recent = _run(instance, materialised=["a"])
    return runs


def latest_by_partition(instance: dg.DagsterInstance) -> dict:
    """Each partition's (and the unpartitioned asset's) latest materialisation and observation: run and metadata."""
    latest = {}
    for event_type, fetch in ((dg.DagsterEventType.ASSET_MATERIALIZATION, instance.fetch_materializations),
                              (dg.DagsterEventType.ASSET_OBSERVATION, instance.fetch_observations)):
        for partition, storage_id in instance.get_latest_storage_id_by_partition(BALANCES, event_type).items():
            (record,) = fetch(dg.AssetRecordsFilter(BALANCES, storage_ids=[storage_id]), limit=1).records
            entry = record.event_log_entry
            event = entry.asset_materialization or entry.asset_observation
            latest[(event_type.value, partition)] = (record.run_id, event.metadata)
    (clients,) = instance.fetch_materializations(CLIENTS, limit=1).records
    latest["clients"] = (clients.run_id, clients.event_log_entry.asset_materialization.metadata)
    return latest


def run_retention(instance: dg.DagsterInstance, *, days: int = 90, batch_size: int = 2) -> dict:
    """Executes the project's retention job on `instance`; returns its step's output metadata."""
    job, _ = build_run_retention(days)
    result = job.execute_in_process(instance=instance, run_config={
        "ops": {"delete_old_runs": {"config": {"older_than_days": days, "batch_size": batch_size}}}})
    assert result.success
    (output,) = [event for event in result.all_events if event.event_type == dg.DagsterEventType.STEP_OUTPUT]
    return {key: value.value for key, value in output.event_specific_data.metadata.items()}


def check_retention(instance: dg.DagsterInstance, runs: SimpleNamespace) -> None:
    before = latest_by_partition(instance)
    assert before[("ASSET_MATERIALIZATION", "c")][0] == runs.holds_c
    assert before[("ASSET_OBSERVATION", "d")][0] == runs.observed

    report = run_retention(instance)

    deleted = {runs.superseded, runs.old_clients, runs.failed}
    kept = {runs.holds_c, runs.holds_b, runs.observed, runs.new_clients, runs.in_progress, runs.recent}
    for run_id in deleted:
        assert instance.get_run_by_id(run_id) is None
        assert instance.all_logs(run_id) == [], "the deleted run's events remain"
    for run_id in kept:
        assert instance.get_run_by_id(run_id) is not None
    assert latest_by_partition(instance) == before, "a partition lost its latest materialisation or observation"
    assert instance.get_materialized_partitions(BALANCES) == {"a", "b", "c"}
    assert report["runs_deleted"] == 3
    assert report["runs_kept_latest_event"] == 4  # holds_c, holds_b, observed, new_clients
    assert report["runs_kept_in_progress"] == 1
    assert report["materializations_deleted"] == 4  # superseded's a, b, c and old_clients
    assert report["retention_days"] == 90

    again = run_retention(instance)  # nothing left to delete; the first retention run is recent
    assert again["runs_deleted"] == 0 and again["runs_kept_latest_event"] == 4


def days_ago(days: int) -> dt.datetime:
    return dt.datetime.now(dt.UTC) - dt.timedelta(days=days)
