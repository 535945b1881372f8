"""The connection pool, split into small shards.

httpcore's pool walks every connection on every request and every response
(`AsyncConnectionPool._assign_requests_to_connections`: `is_idle`, `has_expired` and a socket
poll per connection). That is O(connections) per request: cheap for a handful, not for the dozens a
credential keeps in flight at the rate limit. Upstream: encode/httpcore#1035 (O(N²+N×M) → O(N+M),
open). `make bench` measures it (bench/results.md, "Connection pool"); drop this module when the
upstream fix ships and the figure no longer shows a difference.
"""

from __future__ import annotations

import functools
import math
import os
import ssl
from collections.abc import AsyncIterator, Callable
from typing import Any

import certifi
import httpx


@functools.cache
def _tls_context() -> ssl.SSLContext:
    return ssl.create_default_context(cafile=certifi.where())


PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")


class ShardedTransport(httpx.AsyncBaseTransport):
    """httpx's connection pool, split into small pools (shards) of at most `per_shard` connections.

    httpcore's pool walks all its connections on every request and every response, probing each
    idle one's socket and counting idle connections once per idle connection. That is cheap for a
    handful of connections and not for the 60 a credential keeps in flight at 200 ms latency: about
    10 ms of CPU per request (measured, 64 connections), which then caps the rate. Each request
    goes to the shard with the fewest requests in flight, so every shard stays small."""

    PER_SHARD = 8

    def __init__(self, shards: int, per_shard: int = PER_SHARD) -> None:
        limits = httpx.Limits(max_connections=per_shard, max_keepalive_connections=per_shard)
        tls = _tls_context()  # one for all shards: loading the CA bundle costs ~30 ms each time
        self._pools = [httpx.AsyncHTTPTransport(limits=limits, verify=tls) for _ in range(max(1, shards))]
        self._busy = [0] * len(self._pools)

    @classmethod
    def for_in_flight(cls, most: int) -> ShardedTransport | None:
        """Room for twice `most` requests in flight. None when the environment names a proxy:
        httpx's own pool then applies it."""
        if any(os.environ.get(name) for name in PROXY_VARIABLES):
            return None
        room = 2 * most
        return cls(math.ceil(room / cls.PER_SHARD), min(cls.PER_SHARD, room))

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        shard = min(range(len(self._pools)), key=self._busy.__getitem__)
        self._busy[shard] += 1
        released = False

        def release() -> None:  # when the body is read and closed: the connection is free again
            nonlocal released
            if not released:
                released = True
                self._busy[shard] -= 1

        try:
            response = await self._pools[shard].handle_async_request(request)
        except BaseException:
            release()
            raise
        return httpx.Response(response.status_code, headers=response.headers, extensions=response.extensions,
                              stream=_ReleasingStream(response.stream, release))

    async def aclose(self) -> None:
        for pool in self._pools:
            await pool.aclose()


class _ReleasingStream(httpx.AsyncByteStream):
    def __init__(self, stream: Any, release: Callable[[], None]) -> None:
        self._stream = stream
        self._release = release

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._stream:
            yield chunk

    async def aclose(self) -> None:
        try:
            await self._stream.aclose()
        finally:
            self._release()
