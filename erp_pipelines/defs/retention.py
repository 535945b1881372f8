"""Retention of Dagster's run history: a job and a daily schedule that delete old finished runs.

Dagster has no retention setting for run event logs, and the daily per-tenant runs add events
every day. `dagster_run_retention` deletes (`DagsterInstance.delete_run`: the run and all its
events) every finished run last updated more than `ERP_RUN_RETENTION_DAYS` days ago (default 90;
0 keeps every run: the schedule skips), except:

- a run that holds the latest materialisation, or the latest observation, of any partition of any
  asset (or of an unpartitioned asset), so every partition page keeps its last materialisation with
  its metadata and the reason of its last failure;
- a run still in progress (queued, starting, started, cancelling): only finished runs qualify.

A newer materialisation can only come from a run newer than the cutoff, so a run found holding a
latest event is never deleted by a race with a run in progress. The work goes in batches
(`batch_size` runs and storage ids per query), so thousands of runs take a bounded amount of memory
per query. The step's output metadata reports the counts.
"""

import datetime as dt
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import dagster as dg

from erp_pipelines.errors import ConfigError

RETENTION_VARIABLE = "ERP_RUN_RETENTION_DAYS"
DEFAULT_RETENTION_DAYS = 90
JOB_NAME = "dagster_run_retention"
FINISHED = [dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED]
UNFINISHED = [status for status in dg.DagsterRunStatus if status not in FINISHED]
KEPT_EVENT_TYPES = (dg.DagsterEventType.ASSET_MATERIALIZATION, dg.DagsterEventType.ASSET_OBSERVATION)


def retention_days(environ: Mapping[str, str] | None = None) -> int:
    """`ERP_RUN_RETENTION_DAYS`: whole days (default 90); 0 keeps every run."""
    env = os.environ if environ is None else environ
    raw = (env.get(RETENTION_VARIABLE) or "").strip() or str(DEFAULT_RETENTION_DAYS)
    if not raw.isdigit():
        raise ConfigError(f"{RETENTION_VARIABLE} must be a whole number of days (0 keeps every run)",
                          fix=f"e.g. {RETENTION_VARIABLE}={DEFAULT_RETENTION_DAYS}")
    return int(raw)


@dataclass(frozen=True)
class RetentionResult:
    cutoff: dt.datetime
    runs_deleted: int
    runs_kept_latest_event: int
    runs_kept_in_progress: int
    materializations_deleted: int


def _batches(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def runs_holding_latest_asset_events(instance: dg.DagsterInstance, batch_size: int = 500) -> set[str]:
    """The ids of the runs that hold the latest materialisation or observation of some partition of
    some asset, or of an unpartitioned asset. Covers every asset key in the event log, also ones no
    longer defined."""
    keys = list(instance.get_asset_keys())
    holders: set[str] = set()
    for event_type in KEPT_EVENT_TYPES:
        fetch = instance.fetch_materializations if event_type == dg.DagsterEventType.ASSET_MATERIALIZATION \
            else instance.fetch_observations
        for key in keys:
            latest = fetch(key, limit=1).records  # the asset's latest event (unpartitioned assets)
            storage_ids = sorted(set(instance.get_latest_storage_id_by_partition(key, event_type).values()))
            holders.update(record.run_id for record in latest)
            for batch in _batches(storage_ids, batch_size):
                found = fetch(dg.AssetRecordsFilter(asset_key=key, storage_ids=list(batch)), limit=len(batch))
                holders.update(record.run_id for record in found.records)
    return holders


def delete_old_runs(instance: dg.DagsterInstance, cutoff: dt.datetime, *, batch_size: int = 500,
                    log=None) -> RetentionResult:
    """Delete every finished run last updated before `cutoff` that holds no latest asset event."""
    keep = runs_holding_latest_asset_events(instance, batch_size)
    old_finished = dg.RunsFilter(updated_before=cutoff, statuses=FINISHED)
    candidates: list[str] = []
    cursor = None
    while batch := instance.get_run_ids(old_finished, cursor=cursor, limit=batch_size):
        candidates.extend(batch)
        cursor = batch[-1]
    doomed = [run_id for run_id in candidates if run_id not in keep]
    materializations = 0
    for number, run_id in enumerate(doomed, start=1):
        materializations += instance.get_run_stats(run_id).materializations
        instance.delete_run(run_id)
        if log is not None and number % batch_size == 0:
            log.info(f"run retention: {number} of {len(doomed)} runs deleted")
    in_progress = instance.get_runs_count(dg.RunsFilter(updated_before=cutoff, statuses=UNFINISHED))
    return RetentionResult(cutoff, len(doomed), len(candidates) - len(doomed), in_progress, materializations)


class RetentionConfig(dg.Config):
    older_than_days: int = DEFAULT_RETENTION_DAYS
    """Delete finished runs last updated more than this many days ago (0: delete nothing)."""
    batch_size: int = 500
    """Runs (and storage ids) per storage query."""


def build_run_retention(days: int) -> tuple[dg.JobDefinition, dg.ScheduleDefinition]:
    """The retention job (defaults to `days`) and its daily schedule (skips when `days` is 0)."""

    @dg.op(name="delete_old_runs", description="Deletes old finished runs, keeping each partition's latest "
                                                "materialisation and observation and every run in progress.")
    def delete_old_runs_op(context: dg.OpExecutionContext, config: RetentionConfig) -> dg.Output[None]:
        if config.older_than_days <= 0:
            context.log.info(f"run retention is off ({RETENTION_VARIABLE}=0): nothing deleted")
            return dg.Output(None, metadata={"runs_deleted": 0, "retention_days": 0})
        cutoff = dt.datetime.now(dt.UTC) - dt.timedelta(days=config.older_than_days)
        result = delete_old_runs(context.instance, cutoff, batch_size=config.batch_size, log=context.log)
        context.log.info(f"run retention: {result.runs_deleted} runs deleted, {result.runs_kept_latest_event} "
                         f"kept for their latest asset events, {result.runs_kept_in_progress} in progress")
        return dg.Output(None, metadata={
            "retention_days": config.older_than_days,
            "cutoff": dg.MetadataValue.timestamp(cutoff),
            "runs_deleted": result.runs_deleted,
            "runs_kept_latest_event": result.runs_kept_latest_event,
            "runs_kept_in_progress": result.runs_kept_in_progress,
            "materializations_deleted": result.materializations_deleted,
        })

    run_config = {"ops": {"delete_old_runs": {"config": {"older_than_days": days}}}}

    @dg.job(name=JOB_NAME, config=run_config,
            description=f"Deletes Dagster runs older than {RETENTION_VARIABLE} days and their events, keeping "
                        "every partition's latest materialisation and every run in progress.")
    def run_retention_job():
        delete_old_runs_op()

    @dg.schedule(name=f"{JOB_NAME}_daily", job=run_retention_job, cron_schedule="30 3 * * *",
                 execution_timezone="Europe/Oslo", default_status=dg.DefaultScheduleStatus.RUNNING,
                 description=f"Nightly run retention ({RETENTION_VARIABLE}, default {DEFAULT_RETENTION_DAYS} days).")
    def run_retention_schedule(context: dg.ScheduleEvaluationContext):
        if days <= 0:
            return dg.SkipReason(f"{RETENTION_VARIABLE}=0: every run is kept")
        return dg.RunRequest(run_config=run_config)

    return run_retention_job, run_retention_schedule
