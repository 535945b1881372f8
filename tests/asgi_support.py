"""A synchronous httpx client over an ASGI app, for the sync tests."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
from starlette.types import ASGIApp


class SyncASGITransport(httpx.BaseTransport):
    """`httpx.Client(transport=SyncASGITransport(app))`: a synchronous client over an ASGI app
    (httpx only ships an async ASGI transport). Each request runs in its own event loop, so do not
    use it from inside a running loop. App exceptions reach the caller as-is."""

    def __init__(self, app: ASGIApp, **asgi_options: Any) -> None:
        self.transport = httpx.ASGITransport(app=app, **asgi_options)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        async def exchange() -> httpx.Response:
            request.stream = httpx.ByteStream(request.read())
            response = await self.transport.handle_async_request(request)
            content = await response.aread()
            return httpx.Response(response.status_code, headers=response.headers, content=content,
                                  extensions=response.extensions)

        return asyncio.run(exchange())
