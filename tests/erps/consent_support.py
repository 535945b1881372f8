"""Running `erp-pipelines consent <erp> --no-browser` as a user would, against a sandbox that
approves every login at once."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_consent(erp: str, env: dict[str, str], *options: str) -> subprocess.CompletedProcess:
    """The consent command in a child process: the URL it prints is opened as the user's browser
    would, and the sandbox approves at once."""
    process = subprocess.Popen(
        [sys.executable, "-m", "erp_pipelines", "consent", erp, "--no-browser", *options], cwd=ROOT,
        env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    lines = []
    for line in process.stdout:
        lines.append(line)
        if line.startswith("http"):
            httpx.get(line.strip(), follow_redirects=True, timeout=10)
            break
    out, err = process.communicate(timeout=60)
    return subprocess.CompletedProcess(process.args, process.returncode, "".join(lines) + out, err)
