"""One ERP credential's HTTP client: throttle, auth, retries, the response hook and error mapping.

Every attempt of a request counts against one budget (`RetryPolicy.max_attempts`, tenacity),
whatever went wrong: a 5xx, a 429, a dropped connection, a malformed body or a throttling code in
a 2xx body. A 429 or a throttling code waits out the throttle's pause instead of a back-off.

- `auth`: a `TokenAuth` provider is asked for its token *before* the request takes its turn, so a
  token call of its own never waits behind requests that wait for it. A 401 re-mints the token
  exactly once; a second 401 is mapped by the connector (`map_error`).
- `check_body`: the connector's response hook; it can reject a 2xx body (GraphQL `errors[]`,
  throttling codes) as an `ErpError`. A `RateLimited` from it pauses the credential for its
  `retry_after` and is retried; anything else is raised.
- JSON numbers are decoded as `Decimal`, so money never passes through float.

Messages never include request headers or bodies, so credentials cannot leak through errors.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import time
from collections import Counter
from collections.abc import Callable, Mapping
from decimal import Decimal
from typing import Any
from urllib.parse import urlsplit

import httpx
import tenacity

from erp_pipelines.erps.kit.auth import TokenAuth
from erp_pipelines.erps.kit.throttle import Throttle
from erp_pipelines.erps.kit.transport import ShardedTransport
from erp_pipelines.errors import RETRY_PARTITION, RETRY_RUN, BadResponse, ErpError, RateLimited, UpstreamError

log = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})


@dataclasses.dataclass
class HttpStats:
    """What a client did; figures for benchmarks, chaos runs and materialisation metadata."""

    requests: int = 0
    retries: int = 0
    rate_limited: int = 0
    transport_errors: int = 0
    by_status: Counter = dataclasses.field(default_factory=Counter)
    throttled_seconds: float = 0.0

    def as_metadata(self) -> dict[str, int | float]:
        return {
            "http_requests": self.requests,
            "http_retries": self.retries,
            "http_429s": self.rate_limited,
            "http_transport_errors": self.transport_errors,
            "throttled_seconds": round(self.throttled_seconds, 3),
        }


@dataclasses.dataclass(frozen=True)
class Reply:
    """A 2xx response, its JSON already decoded (None for an empty body or a 204)."""

    status_code: int
    headers: httpx.Headers
    body: Any


@dataclasses.dataclass(frozen=True)
class RequestContext:
    """What the error mapper knows of the failed request."""

    method: str
    path: str
    tenant: str | None  # None: the integration's own credential (listing clients, minting tokens)


ErrorMapper = Callable[[httpx.Response, Any, RequestContext], ErpError | None]
BodyCheck = Callable[[httpx.Response, Any, RequestContext], ErpError | None]


@dataclasses.dataclass
class RetryPolicy:
    max_attempts: int = 5
    backoff_base: float = 0.25
    backoff_cap: float = 20.0

    def backoff(self, attempt: int) -> float:
        """Full jitter: uniform in [0, min(cap, base * 2**attempt)]."""
        return random.uniform(0, min(self.backoff_cap, self.backoff_base * 2**attempt))


def decode_json(response: httpx.Response) -> Any:
    """The body as JSON with exact Decimal numbers."""
    return json.loads(response.content, parse_float=Decimal)


def safe_json(response: httpx.Response) -> Any:
    try:
        return decode_json(response)
    except ValueError:
        return None


class _Again(Exception):
    """One attempt failed in a way worth another; `error` is raised when the budget is spent."""

    def __init__(self, error: ErpError, *, back_off: bool = True, is_retry: bool = True) -> None:
        super().__init__(error.detail)
        self.error = error
        self.back_off = back_off
        self.is_retry = is_retry  # False: a re-minted token, not a failure


class ApiClient:
    """One credential's HTTP client. Connectors call `get_json`/`send_json`/`request`."""

    def __init__(
        self,
        *,
        erp: str,
        base_url: str,
        throttle: Throttle,
        map_error: ErrorMapper | None = None,
        check_body: BodyCheck | None = None,
        retry: RetryPolicy | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        timeout: float = 60.0,
        headers: Mapping[str, str] | None = None,
        url_variables: Mapping[str, str] | None = None,
    ) -> None:
        """`url_variables`: configured URL → the environment variable that sets it, so a host that
        cannot be reached is named with the variable to check."""
        self.erp = erp
        self.url_variables = dict(url_variables or {})
        self.throttle = throttle
        self.map_error = map_error
        self.check_body = check_body
        self.retry = retry or RetryPolicy()
        self.stats = HttpStats()
        self._http = httpx.AsyncClient(
            base_url=base_url.rstrip("/") + "/",
            transport=transport or ShardedTransport.for_in_flight(throttle.limit.max_in_flight or Throttle.IN_FLIGHT_CEILING),
            timeout=httpx.Timeout(timeout, connect=min(10.0, timeout)),
            headers={"Accept": "application/json", **(headers or {})},
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def get_json(self, path: str, *, params=None, auth=None, tenant: str | None = None) -> Any:
        return await self.request("GET", path, params=params, auth=auth, tenant=tenant, decode=True)

    async def reply(self, method: str, path: str, **kwargs: Any) -> Reply:
        """`request` returning status, headers and the decoded body (paging needs all three)."""
        return await self.request(method, path, decode="reply", **kwargs)

    async def send_json(self, method: str, path: str, body: Any, *, params=None, auth=None, tenant=None) -> Any:
        return await self.request(method, path, params=params, json_body=body, auth=auth, tenant=tenant, decode=True)

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        json_body: Any = None,
        form: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        auth: httpx.Auth | None = None,
        tenant: str | None = None,
        decode: bool | str = False,
        map_error: ErrorMapper | None = None,
        throttle: Throttle | None = None,
    ) -> Any:
        """Send with retries; returns the 2xx response (with `decode`: its JSON body, None for an
        empty body) or raises a mapped `ErpError` carrying `attempts`. `path` may be absolute (a
        token endpoint on another host); `map_error` replaces the connector's mapper for this call;
        `throttle` the client's for an ERP whose limit is per tenant, not per credential."""
        context = RequestContext(method, path, tenant)
        state = {"reminted": False, "attempt": 0, "throttle": throttle or self.throttle}
        retrying = tenacity.AsyncRetrying(
            stop=tenacity.stop_after_attempt(self.retry.max_attempts),
            wait=self._wait,
            retry=tenacity.retry_if_exception_type(_Again),
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    return await self._attempt(context, state, params=params, json_body=json_body, form=form,
                                               headers=headers, auth=auth, decode=decode,
                                               map_error=map_error or self.map_error)
        except _Again as again:
            error: ErpError = again.error
        except ErpError as raised:
            error = raised
        error.attempts = state["attempt"]
        raise (error.for_tenant(tenant) if tenant else error) from None

    def _wait(self, retry_state: tenacity.RetryCallState) -> float:
        failure = retry_state.outcome.exception() if retry_state.outcome else None
        if retry_state.attempt_number < self.retry.max_attempts:  # tenacity asks even when it will stop
            self.stats.retries += not (isinstance(failure, _Again) and not failure.is_retry)
        if isinstance(failure, _Again) and not failure.back_off:
            return 0.0  # the throttle's pause is the wait
        return self.retry.backoff(retry_state.attempt_number)

    async def _attempt(self, context: RequestContext, state: dict[str, Any], *, auth, decode: bool | str,
                       map_error: ErrorMapper | None, **send) -> Any:
        state["attempt"] += 1
        token = await auth.token() if isinstance(auth, TokenAuth) else None
        url = context.path if "://" in context.path else context.path.lstrip("/")
        queued_at = time.monotonic()
        throttle: Throttle = state["throttle"]
        async with throttle.slot() as ticket:
            self.stats.throttled_seconds += time.monotonic() - queued_at
            self.stats.requests += 1
            try:
                response = await self._http.request(
                    context.method, url, params=send["params"], json=send["json_body"], data=send["form"],
                    headers=send["headers"], auth=auth.fixed(token) if token is not None else auth,
                )
            except httpx.TransportError as exc:
                self.stats.transport_errors += 1
                raise _Again(self._transport_error(context, url, exc)) from None
        status = response.status_code
        self.stats.by_status[status] += 1
        if status == 429:
            self.stats.rate_limited += 1
            pause = throttle.on_rate_limited(ticket, response.headers)
            log.debug("%s %s: 429, pausing %.2fs", context.method, context.path, pause)
            raise _Again(RateLimited(
                f"{context.method} {_shown(context.path)} still rate limited", erp=self.erp,
                fix="lower the concurrency for this credential or retry later",
            ), back_off=False)
        throttle.observe(ticket, response.headers)
        if status == 401 and token is not None and auth.can_remint and not state["reminted"]:
            state["reminted"] = True
            await auth.token(stale=token)
            raise _Again(UpstreamError(f"{context.method} {_shown(context.path)}: HTTP 401", erp=self.erp),
                         back_off=False, is_retry=False)
        if response.is_success:
            return self._accept(response, context, decode, throttle)
        body = safe_json(response)
        mapped = map_error(response, body, context) if map_error else None
        if mapped is None and status in RETRY_STATUSES:
            raise _Again(UpstreamError(
                f"{context.method} {_shown(context.path)} answered HTTP {status}", erp=self.erp,
                fix=f"the ERP is failing; {_retry_later(context)}",
            ))
        if mapped is None:
            mapped = BadResponse(f"{context.method} {_shown(context.path)} answered HTTP {status}", erp=self.erp)
        raise mapped

    def _transport_error(self, context: RequestContext, url: str, exc: httpx.TransportError) -> UpstreamError:
        """No answer: names the host (never credentials or the query) and the variable that sets it."""
        try:
            target = self._http.base_url.join(url)
        except httpx.InvalidURL:
            target = self._http.base_url
        host = f"{target.host}:{target.port}" if target.port else target.host
        variable = self._url_variable(target)
        where = f"{host} (set by {variable})" if variable else host
        check = f"check {variable} (host name and port) and" if variable else "check"
        request = f"{context.method} {_shown(context.path)}"
        if isinstance(exc, httpx.ConnectError):
            detail = f"{request}: cannot connect to {where}: {type(exc).__name__}"
            fix = f"{check} that this machine reaches {host} (DNS, firewall, proxy); then {_retry_later(context)}"
        elif isinstance(exc, httpx.TimeoutException):
            detail = f"{request}: {where} did not answer in time: {type(exc).__name__}"
            fix = f"{check} that {host} is up and reachable from here; then {_retry_later(context)}"
        else:
            detail = f"{request}: the connection to {where} failed: {type(exc).__name__}"
            fix = f"the ERP did not answer; {_retry_later(context)}"
        return UpstreamError(detail, erp=self.erp, fix=fix)

    def _url_variable(self, target: httpx.URL) -> str | None:
        """The variable whose URL is the longest prefix of `target`, else one with its host."""
        shown = str(target.copy_with(query=None, fragment=None))
        best, best_length = None, -1
        for configured, variable in self.url_variables.items():
            prefix = configured.rstrip("/")
            if (shown == prefix or shown.startswith(prefix + "/")) and len(prefix) > best_length:
                best, best_length = variable, len(prefix)
        if best is None:
            best = next((v for u, v in self.url_variables.items() if urlsplit(u).hostname == target.host), None)
        return best

    def _accept(self, response: httpx.Response, context: RequestContext, decode: bool | str,
                throttle: Throttle) -> Any:
        body: Any = response
        if decode:
            if not response.content or response.status_code == 204:
                body = None
            else:
                try:
                    body = decode_json(response)
                except ValueError:  # truncated or malformed: retried like a dropped connection
                    raise _Again(BadResponse(
                        f"{context.method} {_shown(context.path)} returned malformed JSON", erp=self.erp,
                        fix=f"the ERP returned a broken payload; {_retry_later(context)}",
                    )) from None
        rejected = self.check_body(response, body if decode else safe_json(response), context) \
            if self.check_body else None
        if rejected is None:
            return Reply(response.status_code, response.headers, body) if decode == "reply" else body
        if isinstance(rejected, RateLimited) and rejected.retryable:
            self.stats.rate_limited += 1
            throttle.pause_for(rejected.retry_after or 1.0)
            raise _Again(rejected, back_off=False)
        raise rejected


def _retry_later(context: RequestContext) -> str:
    """A tenant's request belongs to a partition; the integration's own (the client list) does not."""
    return RETRY_PARTITION if context.tenant else RETRY_RUN


def _shown(path: str) -> str:
    """A path for messages: absolute URLs lose their query."""
    return path.split("?", 1)[0]
