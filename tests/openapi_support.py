"""openapi-core's request and response protocols for httpx objects, shared by the simulators'
contract checks (each validates against its vendor's spec in `specs/<erp>/`)."""

from __future__ import annotations

from urllib.parse import parse_qsl

import httpx
from openapi_core.datatypes import RequestParameters
from werkzeug.datastructures import Headers, ImmutableMultiDict


class OpenAPIRequest:
    """An httpx.Request re-hosted on the spec's server: `host_url` and, when the simulator serves
    the API under another prefix, the request's `path` as the spec names it."""

    def __init__(self, request: httpx.Request, host_url: str, path: str | None = None) -> None:
        self.host_url = host_url
        self.path = request.url.path if path is None else path
        self.method = request.method.lower()
        self.body = request.content or None
        self.content_type = request.headers.get("content-type", "")
        self.parameters = RequestParameters(
            query=ImmutableMultiDict(parse_qsl(request.url.query.decode(), keep_blank_values=True)),
            header=Headers(dict(request.headers)),
            cookie=ImmutableMultiDict(),
        )


class OpenAPIResponse:
    def __init__(self, response: httpx.Response) -> None:
        self.status_code = response.status_code
        self.data = response.content
        self.content_type = response.headers.get("content-type", "")
        self.headers = Headers(dict(response.headers))
