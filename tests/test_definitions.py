"""The definitions as a reviewer sees them: `dg check defs` passes, and the asset graph is a
snapshot (tests/snapshots/definitions.json) so every change to it shows in the diff.

Update the snapshot after an intended change: `UPDATE_SNAPSHOTS=1 make test` (or run this file).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
from definitions_env import every_source_env

from erp_pipelines.defs.build import build_definitions

ROOT = Path(__file__).resolve().parent.parent
SNAPSHOT = Path(__file__).parent / "snapshots" / "definitions.json"


def test_dg_check_defs_passes_with_every_source_enabled(tmp_path):
    env = {**os.environ, **every_source_env(tmp_path), "DAGSTER_HOME": str(tmp_path), "DAGSTER_DISABLE_TELEMETRY": "1"}
    env.pop("VIRTUAL_ENV", None)
    dg_cli = Path(sys.executable).parent / "dg"
    result = subprocess.run([str(dg_cli), "check", "defs"], check=False, cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ERROR" not in result.stdout + result.stderr


def test_the_definitions_match_their_snapshot(tmp_path):
    current = describe(build_definitions(every_source_env(tmp_path)))
    if os.environ.get("UPDATE_SNAPSHOTS"):
        SNAPSHOT.parent.mkdir(exist_ok=True)
        SNAPSHOT.write_text(json.dumps(current, indent=2, sort_keys=True) + "\n")
    assert current == json.loads(SNAPSHOT.read_text()), (
        "the definitions changed: review the difference, then UPDATE_SNAPSHOTS=1 pytest tests/test_definitions.py"
    )


def describe(defs: dg.Definitions) -> dict:
    """Asset keys, deps, partitions, checks, sensors, schedules, jobs and resources by key."""
    graph = defs.resolve_asset_graph()
    assets = {}
    for spec in defs.resolve_all_asset_specs():
        key = spec.key.to_user_string()
        assets[key] = {
            "group": spec.group_name,
            "deps": sorted(dep.asset_key.to_user_string() for dep in spec.deps),
            "partitions": _partitions(spec.partitions_def),
            "kinds": sorted(spec.kinds),
            "owners": sorted(spec.owners),
            "freshness": type(spec.freshness_policy).__name__ if spec.freshness_policy else None,
            "checks": {check.name: {"blocking": check.blocking}
                       for check in map(graph.get_check_spec, graph.get_check_keys_for_assets([spec.key]))},
        }
    repository = defs.get_repository_def()
    return {
        "assets": assets,
        "sensors": {
            sensor.name: {"targets": sorted(target.job_name for target in sensor.targets),
                          "interval_seconds": sensor.minimum_interval_seconds,
                          "default_status": sensor.default_status.value}
            for sensor in repository.sensor_defs
        },
        "schedules": {
            schedule.name: {"cron": schedule.cron_schedule, "timezone": schedule.execution_timezone,
                            "job": schedule.job_name, "default_status": schedule.default_status.value}
            for schedule in repository.schedule_defs
        },
        "jobs": sorted(job.name for job in repository.get_all_jobs() if not job.name.startswith("__")),
        "resources": {key: type(resource).__name__ for key, resource in sorted((defs.resources or {}).items())},
    }


def _partitions(partitions_def) -> str | None:
    if partitions_def is None:
        return None
    name = getattr(partitions_def, "name", None)
    return f"{type(partitions_def).__name__}({name})" if name else type(partitions_def).__name__
