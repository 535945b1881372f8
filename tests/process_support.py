"""A command in its own process group, torn down so that nothing of it remains (the browser tests'
webserver, the Postgres deployment tests' daemon and webserver)."""

import contextlib
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def process_group(command: list[str], env: dict[str, str], log_path: Path, *, grace_seconds: float,
                  clean_sigterm: bool = False) -> Iterator[subprocess.Popen]:
    """`command` in a new process group, its output in `log_path`. On exit the group gets SIGTERM and
    `grace_seconds` to end; leftovers are killed. `clean_sigterm`: every process must have ended on
    SIGTERM (else the group is swept with SIGKILL); in both cases none of the group may remain."""
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    try:
        yield process
    finally:
        family = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)] \
            if psutil.pid_exists(process.pid) else []
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        _, alive = psutil.wait_procs(family, timeout=grace_seconds)
        for leftover in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                leftover.kill()
        if not clean_sigterm:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)  # anything that left the tree but not the group
        process.wait(timeout=30)
        assert not (clean_sigterm and alive), \
            f"{Path(command[0]).name} left processes behind after SIGTERM: {[p.pid for p in alive]}"
        assert not [p for p in psutil.process_iter() if _in_group(p, process.pid)], \
            f"{Path(command[0]).name} left processes"


def _in_group(process: psutil.Process, pgid: int) -> bool:
    try:
        return os.getpgid(process.pid) == pgid and process.status() != psutil.STATUS_ZOMBIE
    except (ProcessLookupError, psutil.NoSuchProcess):
        return False
