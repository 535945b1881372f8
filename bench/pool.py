"""Connection pool: `ShardedTransport` against httpx's own pool, side by side in one run.

Both pools keep the same number of requests in flight against a tiny keep-alive HTTP server in a
child process (it answers `{}` after a fixed latency, so its CPU is not ours). The figure is our
process's CPU time per request: httpcore's pool walks every connection on every request and
response (encode/httpcore#1035), so its cost grows with the connections in flight. When the two
columns meet, `erps/kit/transport.py` can go.

    python -m bench.pool            # prints the table
"""

from __future__ import annotations

import asyncio
import json
import select
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from erp_pipelines.erps.kit.transport import ShardedTransport

SECTION = "## Connection pool"
RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"


async def _serve(latency_s: float) -> None:  # the child process
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while await reader.readuntil(b"\r\n\r\n"):
                await asyncio.sleep(latency_s)
                writer.write(RESPONSE)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0, backlog=1024)
    print(json.dumps({"port": server.sockets[0].getsockname()[1]}), flush=True)
    async with server:
        await asyncio.to_thread(sys.stdin.read)  # until the parent closes our stdin


async def _drive(transport: httpx.AsyncBaseTransport, url: str, in_flight: int, requests: int) -> tuple[float, float]:
    """(CPU seconds, wall seconds) for `requests` GETs with `in_flight` at once, after a warm-up
    that opens every connection."""
    async with httpx.AsyncClient(transport=transport, timeout=30) as client:
        async def worker(count: int) -> None:
            for _ in range(count):
                (await client.get(url)).raise_for_status()

        await asyncio.gather(*(worker(1) for _ in range(in_flight)))
        cpu, wall = time.process_time(), time.perf_counter()
        await asyncio.gather(*(worker(requests // in_flight) for _ in range(in_flight)))
        return time.process_time() - cpu, time.perf_counter() - wall


def measure(in_flight: tuple[int, ...] = (8, 64), requests: int = 6400, latency_ms: float = 20.0) -> dict[str, Any]:
    root = str(Path(__file__).resolve().parents[1])
    server = subprocess.Popen([sys.executable, "-m", "bench.pool", "serve", str(latency_ms / 1000)], cwd=root,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        if not select.select([server.stdout], [], [], 30)[0]:
            raise RuntimeError("the pool benchmark's server did not start")
        url = f"http://127.0.0.1:{json.loads(server.stdout.readline())['port']}/"
        rows = []
        for most in in_flight:
            count = max(most, requests // most * most)
            pools = {
                "httpx": httpx.AsyncHTTPTransport(limits=httpx.Limits(max_connections=2 * most,
                                                                      max_keepalive_connections=2 * most)),
                "sharded": ShardedTransport.for_in_flight(most),
            }
            row: dict[str, Any] = {"in_flight": most, "requests": count}
            for name, transport in pools.items():
                cpu, wall = asyncio.run(_drive(transport, url, most, count))
                row[f"{name}_cpu_us"] = round(cpu / count * 1e6)
                row[f"{name}_per_s"] = round(count / wall)
            rows.append(row)
        return {"latency_ms": latency_ms, "rows": rows}
    finally:
        server.stdin.close()
        server.wait(timeout=15)
        server.stdout.close()


def render(figures: dict[str, Any], command: str) -> str:
    lines = [
        SECTION, "",
        (f"`{command}`: client CPU per request (µs) and requests per second, same server ({figures['latency_ms']:g} ms "
        "latency, child process), same requests in flight; `ShardedTransport` (`erps/kit/transport.py`, shards of "
        f"{ShardedTransport.PER_SHARD} connections) against one `httpx.AsyncHTTPTransport` sized for the same "
        "connections. Upstream: encode/httpcore#1035."), "",
        "| in flight | requests | httpx pool CPU µs/request | sharded CPU µs/request | httpx pool req/s | sharded req/s |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [f"| {r['in_flight']} | {r['requests']} | {r['httpx_cpu_us']} | {r['sharded_cpu_us']} | "
              f"{r['httpx_per_s']} | {r['sharded_per_s']} |" for r in figures["rows"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        asyncio.run(_serve(float(sys.argv[2])))
    else:
        print(render(measure(), "python -m bench.pool"))
