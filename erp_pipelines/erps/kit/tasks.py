"""Concurrency helpers for connectors."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any


async def gather_all(*awaitables: Awaitable[Any]) -> list[Any]:
    """Like `asyncio.gather`, but the first failure cancels the others (and waits for them) before
    it is raised: a failed tenant leaves no requests running behind it."""
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(_await(a)) for a in awaitables]
    except BaseExceptionGroup as failures:
        raise failures.exceptions[0] from None
    return [task.result() for task in tasks]


async def _await(awaitable: Awaitable[Any]) -> Any:
    return await awaitable
