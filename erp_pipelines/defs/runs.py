"""Run requests that cover many tenants in few runs: the one path schedules and sensors share.

A run covers a contiguous range of a dynamic partitions definition (tags
`dagster/asset_partition_range_start/end`), executed in-process with the tenants of the range
extracted concurrently. Tenants are split into contiguous blocks of at most `chunk_size`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import dagster as dg

RANGE_START = "dagster/asset_partition_range_start"
RANGE_END = "dagster/asset_partition_range_end"


def contiguous_chunks(ordered_keys: Sequence[str], selected: Iterable[str], chunk_size: int) -> list[list[str]]:
    """Split the selected keys into runs of consecutive keys (in partition order), each at most
    `chunk_size` long. Unselected keys (revoked tenants) break a run."""
    wanted = set(selected)
    chunks: list[list[str]] = []
    current: list[str] = []
    for key in ordered_keys:
        if key in wanted and len(current) < chunk_size:
            current.append(key)
            continue
        if current:
            chunks.append(current)
        current = [key] if key in wanted else []
    if current:
        chunks.append(current)
    return chunks


def tenant_range_run_requests(
    *,
    ordered_keys: Sequence[str],
    selected: Iterable[str],
    chunk_size: int,
    asset_selection: Sequence[dg.AssetKey],
    run_key_prefix: str,
    run_config: dict[str, Any] | None = None,
    tags: dict[str, str] | None = None,
) -> list[dg.RunRequest]:
    requests = []
    for chunk in contiguous_chunks(ordered_keys, selected, chunk_size):
        first, last = chunk[0], chunk[-1]
        requests.append(
            dg.RunRequest(
                run_key=f"{run_key_prefix}:{first}...{last}",
                asset_selection=list(asset_selection),
                run_config=run_config or {},
                tags={**(tags or {}), RANGE_START: first, RANGE_END: last, "erp/tenants": str(len(chunk))},
            )
        )
    return requests
