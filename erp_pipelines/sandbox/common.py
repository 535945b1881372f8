"""Machinery shared by every ERP simulator: faults, rate limits, statistics, admin routes, serving.

Nothing here knows a vendor. An ERP simulator describes itself with an `ErpProfile` (API path
prefix, request-id and rate-limit header names, how to find the credential and the tenant of a
request, how its error bodies look) and gets:

- `FaultPlan`: runtime-configurable chaos (latency, 5xx, 429, dropped connections, timeouts,
  malformed JSON, a dropped field), scoped by path prefix and tenant, reproducible (seeded);
- `RateLimiter`: `limit` requests per `window_seconds` (a fixed window, a sliding window or a
  token bucket: `WINDOW_MODES`) and/or a cap on requests in flight, per credential key, with the
  ERP's header names;
- `RequestStats`: counts per path template and status, 429s, in-flight peak and a request log;
- admin routes under `/_sandbox/...` (outside the vendor API) and `serve()` to run any sandbox
  app as a real HTTP server on 127.0.0.1.

Only requests under the profile's `api_prefix` are faulted, limited and counted.

Dropped connections and timeouts raise httpx transport exceptions from inside the app:
`SandboxConnectionDropped` (an `httpx.RemoteProtocolError`) and `SandboxTimeout` (an
`httpx.ReadTimeout`). Through `httpx.ASGITransport` the client sees exactly those exceptions;
behind uvicorn the connection is closed after the status line (the client sees
`httpx.RemoteProtocolError`) or the client's own read timeout fires first.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import dataclasses
import json
import logging
import math
import random
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from decimal import Decimal
from typing import Any, TypeVar
from urllib.parse import parse_qsl, unquote

import httpx
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Match, Mount, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

ADMIN_PREFIX = "/_sandbox"
STATE_KEY = "sandbox"  # scope["state"][STATE_KEY]: per-request facts the middlewares share
Row = TypeVar("Row")  # a list element as a simulator keeps it


# ---------------------------------------------------------------------------------------- JSON


def json_bytes(value: Any) -> bytes:
    """Serialise to UTF-8 JSON. `Decimal` becomes a JSON number token with its exact digits
    (Decimal("1234.50") -> 1234.50), so amounts never pass through float."""
    return "".join(_json_tokens(value)).encode("utf-8")


def _json_tokens(value: Any) -> Iterator[str]:
    if isinstance(value, Decimal):
        if not value.is_finite():
            raise ValueError(f"cannot serialise {value} as JSON")
        yield format(value, "f")
    elif isinstance(value, Mapping):
        yield "{"
        for i, (key, item) in enumerate(value.items()):
            if i:
                yield ","
            yield json.dumps(str(key), ensure_ascii=False)
            yield ":"
            yield from _json_tokens(item)
        yield "}"
    elif isinstance(value, list | tuple):
        yield "["
        for i, item in enumerate(value):
            if i:
                yield ","
            yield from _json_tokens(item)
        yield "]"
    else:
        yield json.dumps(value, ensure_ascii=False)


def json_response(value: Any, status_code: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    return Response(json_bytes(value), status_code=status_code, headers=dict(headers or {}),
                    media_type="application/json")


# ---------------------------------------------------------------------------------------- profile


@dataclasses.dataclass(frozen=True)
class RateLimitHeaderNames:
    """The ERP's names for the rate-limit headers; `reset` carries seconds left in the window."""

    limit: str
    remaining: str
    reset: str


@dataclasses.dataclass
class ErpProfile:
    """What the shared machinery needs to know about one ERP's API."""

    name: str
    api_prefix: str  # e.g. "/v2"; only requests below it are faulted, limited and counted
    error_body: Callable[[int, str, str], bytes]  # (status, message, request_id) -> JSON body
    credential_key: Callable[[Scope], str | None] = lambda scope: None  # whose rate limit
    tenant_of: Callable[[Scope], str | None] = lambda scope: None  # which tenant a request is for
    request_id_header: str | None = None
    rate_limit_headers: RateLimitHeaderNames | None = None
    # for APIs that name the tenant in the body (GraphQL): reads it into the scope before anything
    # looks at the request, and returns the `receive` that replays the body
    prepare_request: Callable[[Scope, Receive], Awaitable[Receive]] | None = None

    def is_api_request(self, scope: Scope) -> bool:
        if scope["type"] != "http":
            return False
        path = scope["path"]
        return path == self.api_prefix or path.startswith(self.api_prefix.rstrip("/") + "/")


def request_facts(scope: Scope) -> dict[str, Any]:
    """The per-request dict the sandbox middlewares share (request id, fault, tenant, ...)."""
    state = scope.setdefault("state", {})
    return state.setdefault(STATE_KEY, {})


def request_id_of(scope: Scope) -> str:
    facts = request_facts(scope)
    if "request_id" not in facts:
        facts["request_id"] = str(uuid.uuid4())
    return facts["request_id"]


def header_value(scope: Scope, name: str) -> str | None:
    wanted = name.lower().encode("latin-1")
    for key, value in scope.get("headers", []):
        if key.lower() == wanted:
            return value.decode("latin-1")
    return None


async def send_bytes(send: Send, status: int, body: bytes, headers: list[tuple[str, str]],
                     content_type: str = "application/json") -> None:
    raw = [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


def _set_header(message: Message, name: str, value: str) -> None:
    key = name.lower().encode("latin-1")
    headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != key]
    headers.append((key, value.encode("latin-1")))
    message["headers"] = headers


# ---------------------------------------------------------------------------------------- statistics


@dataclasses.dataclass(frozen=True)
class RequestRecord:
    seq: int
    method: str
    path: str
    query: str
    template: str  # "GET /v2/company/{id}"
    status: int | None  # None: no response was sent (dropped connection, timeout)
    tenant: str | None
    credential: str | None
    fault: str | None  # kind of the injected fault, "rate_limited" when the limiter refused
    started: float  # time.monotonic()
    duration_ms: float
    request_id: str
    rate_limit_reason: str | None = None  # why the limiter refused ("window exhausted", "too many in flight")


class RequestStats:
    """Counts and a bounded log of API requests. Thread-safe (uvicorn runs in another thread)."""

    def __init__(self, log_size: int = 20_000) -> None:
        self._lock = threading.Lock()
        self._log_size = log_size
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self.total = 0
            self.by_template: Counter[str] = Counter()
            self.by_status: Counter[int] = Counter()
            self.by_tenant: Counter[str] = Counter()
            self.faults: Counter[str] = Counter()
            self.too_many_requests = 0  # every 429, from the limiter or injected
            self.in_flight = 0
            self.peak_in_flight = 0
            self.log: deque[RequestRecord] = deque(maxlen=self._log_size)
            self._seq = 0

    def started(self) -> None:
        with self._lock:
            self.in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self.in_flight)

    def finished(self, **record_fields: Any) -> RequestRecord:
        with self._lock:
            self.in_flight -= 1
            self._seq += 1
            record = RequestRecord(seq=self._seq, **record_fields)
            self.total += 1
            self.by_template[record.template] += 1
            self.by_status[record.status or 0] += 1
            if record.tenant is not None:
                self.by_tenant[record.tenant] += 1
            if record.fault:
                self.faults[record.fault] += 1
            if record.status == 429:
                self.too_many_requests += 1
            self.log.append(record)
            return record

    def requests(self, *, template: str | None = None, tenant: str | None = None,
                 status: int | None = None) -> list[RequestRecord]:
        """The logged requests matching every given filter (template may omit the method)."""
        with self._lock:
            records = list(self.log)
        out = []
        for r in records:
            if template is not None and template not in (r.template, r.template.split(" ", 1)[-1]):
                continue
            if tenant is not None and r.tenant != str(tenant):
                continue
            if status is not None and r.status != status:
                continue
            out.append(r)
        return out

    def snapshot(self, *, log_limit: int = 0) -> dict[str, Any]:
        with self._lock:
            data = {
                "total": self.total,
                "by_template": dict(self.by_template),
                "by_status": {str(k): v for k, v in sorted(self.by_status.items())},
                "by_tenant": dict(self.by_tenant),
                "faults": dict(self.faults),
                "too_many_requests": self.too_many_requests,
                "in_flight": self.in_flight,
                "peak_in_flight": self.peak_in_flight,
            }
            if log_limit:
                data["log"] = [dataclasses.asdict(r) for r in list(self.log)[-log_limit:]]
            return data


def route_template(routes: list[BaseRoute], scope: Scope) -> str | None:
    """The path pattern of the route that serves `scope` ('/v2/company/{id}'), Mounts included."""
    partial = None
    for route in routes:
        match, child = route.matches(scope)
        if match == Match.NONE:
            continue
        if isinstance(route, Mount):
            inner = route_template(route.routes, {**scope, **child})
            found = route.path + inner if inner is not None else None
        else:
            found = getattr(route, "path", None)
        if match == Match.FULL and found is not None:
            return found
        partial = partial or found
    return partial


class ApiMiddleware:
    """A layer of the harness: `handle` acts on API requests (the profile's `is_api_request`);
    every other request passes through untouched."""

    def __init__(self, app: ASGIApp, harness: SandboxHarness) -> None:
        self.app = app
        self.harness = harness

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.harness.profile.is_api_request(scope):
            await self.handle(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        raise NotImplementedError


class RequestStatsMiddleware(ApiMiddleware):
    """Outermost layer: request id, in-flight tracking, one `RequestRecord` per API request."""

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        profile = self.harness.profile
        facts = request_facts(scope)
        request_id = request_id_of(scope)
        facts["tenant"] = profile.tenant_of(scope)
        facts["credential"] = profile.credential_key(scope)
        template = route_template(self.harness.routes, scope) or "(no route)"
        status: list[int] = []
        started = time.monotonic()

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
                if profile.request_id_header:
                    _set_header(message, profile.request_id_header, request_id)
            await send(message)

        self.harness.stats.started()
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            self.harness.stats.finished(
                method=scope["method"],
                path=scope["path"],
                query=scope.get("query_string", b"").decode("latin-1"),
                template=f"{scope['method']} {template}",
                status=None if facts.get("no_response") else (status[0] if status else None),
                tenant=None if facts["tenant"] is None else str(facts["tenant"]),
                credential=facts["credential"],
                fault=facts.get("fault"),
                rate_limit_reason=facts.get("rate_limit_reason"),
                started=started,
                duration_ms=(time.monotonic() - started) * 1000,
                request_id=request_id,
            )


# ---------------------------------------------------------------------------------------- rate limits

WINDOW_MODES = ("fixed", "sliding", "token_bucket")
_SLACK = 1e-9  # float slack (seconds, tokens): requests paced at exactly the limit are admitted


@dataclasses.dataclass
class RateLimitPolicy:
    """Per credential key: at most `limit` requests per `window_seconds`, counted the `mode` way,
    and at most `max_in_flight` concurrent requests (None = unlimited). A refused request gets 429.

    Modes: "fixed" (a window opens with the first request after the last one ended; `reset` =
    seconds until it ends), "sliding" (at most `limit` admissions in any interval of
    `window_seconds`; `reset` = seconds until the oldest admission in it leaves) and "token_bucket"
    (capacity `limit`, refilled at `limit / window_seconds` per second, one token per request;
    `reset` = seconds until the bucket is full). `reset` is rounded up to whole seconds."""

    limit: int | None = None
    window_seconds: float = 60.0
    max_in_flight: int | None = None
    reset_header_on_429: bool = False  # include the ERP's reset header on the 429 itself
    retry_after_on_429: bool = False  # include a standard Retry-After header on the 429
    mode: str = "fixed"

    def __post_init__(self) -> None:
        if self.mode not in WINDOW_MODES:
            raise ValueError(f"unknown rate-limit mode {self.mode!r}; use one of {', '.join(WINDOW_MODES)}")
        if self.mode != "fixed" and self.window_seconds <= 0:
            raise ValueError(f"a {self.mode} rate limit needs window_seconds > 0")

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RateLimitPolicy:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown rate-limit settings: {sorted(unknown)}")
        return cls(**data)


@dataclasses.dataclass(frozen=True)
class RateDecision:
    allowed: bool
    limit: int | None
    remaining: int | None
    reset_seconds: int | None  # whole seconds until the window ends (rounded up; per mode: RateLimitPolicy)
    reason: str = ""


def _seconds_up(seconds: float) -> int:
    return max(0, math.ceil(seconds - _SLACK))


@dataclasses.dataclass
class _FixedWindow:
    start: float
    used: int = 0

    def at(self, now: float, policy: RateLimitPolicy) -> _FixedWindow:
        return self if now - self.start < policy.window_seconds else _FixedWindow(now)

    def remaining(self, policy: RateLimitPolicy) -> int:
        return max(0, policy.limit - self.used)

    def reset_seconds(self, now: float, policy: RateLimitPolicy) -> int:
        return max(0, math.ceil(self.start + policy.window_seconds - now))

    def admit(self, now: float) -> None:
        self.used += 1


@dataclasses.dataclass
class _SlidingLog:
    admitted: deque[float] = dataclasses.field(default_factory=deque)  # admission times, oldest first

    def at(self, now: float, policy: RateLimitPolicy) -> _SlidingLog:
        while self.admitted and now - self.admitted[0] >= policy.window_seconds - _SLACK:
            self.admitted.popleft()
        return self

    def remaining(self, policy: RateLimitPolicy) -> int:
        return max(0, policy.limit - len(self.admitted))

    def reset_seconds(self, now: float, policy: RateLimitPolicy) -> int:
        reset = _seconds_up(self.admitted[0] + policy.window_seconds - now) if self.admitted else 0
        return max(1, reset) if self.remaining(policy) == 0 else reset

    def admit(self, now: float) -> None:
        self.admitted.append(now)


@dataclasses.dataclass
class _TokenBucket:
    tokens: float
    refilled_at: float

    def at(self, now: float, policy: RateLimitPolicy) -> _TokenBucket:
        rate = policy.limit / policy.window_seconds
        self.tokens = min(float(policy.limit), self.tokens + (now - self.refilled_at) * rate)
        self.refilled_at = now
        return self

    def remaining(self, policy: RateLimitPolicy) -> int:
        return max(0, math.floor(self.tokens + _SLACK))

    def reset_seconds(self, now: float, policy: RateLimitPolicy) -> int:
        missing = policy.limit - self.tokens
        return 0 if missing <= _SLACK else _seconds_up(missing * policy.window_seconds / policy.limit)

    def admit(self, now: float) -> None:
        self.tokens -= 1


_LimitState = _FixedWindow | _SlidingLog | _TokenBucket  # one credential key's count, in its policy's mode


def _new_state(policy: RateLimitPolicy, now: float) -> _LimitState:
    if policy.mode == "sliding":
        return _SlidingLog()
    if policy.mode == "token_bucket":
        return _TokenBucket(float(policy.limit), now)
    return _FixedWindow(now)


class RateLimiter:
    """Request limits (see `RateLimitPolicy.mode`) and in-flight caps per credential key.
    `clock` is injectable for tests."""

    def __init__(self, policy: RateLimitPolicy | None = None, clock: Callable[[], float] = time.monotonic):
        self.policy = policy or RateLimitPolicy()
        self.clock = clock
        self._lock = threading.Lock()
        self._states: dict[str, _LimitState] = {}
        self._in_flight: Counter[str] = Counter()

    def configure(self, policy: RateLimitPolicy) -> None:
        with self._lock:
            self.policy = policy
            self._states.clear()

    def reset(self) -> None:
        with self._lock:
            self._states.clear()

    def acquire(self, key: str) -> RateDecision:
        """Admit or refuse one request; an admitted request must be `release`d when done."""
        with self._lock:
            policy, now = self.policy, self.clock()
            too_many_in_flight = policy.max_in_flight is not None and self._in_flight[key] >= policy.max_in_flight
            if policy.limit is None:
                if too_many_in_flight:
                    return RateDecision(False, None, None, None, "too many in flight")
                self._in_flight[key] += 1
                return RateDecision(True, None, None, None)
            state = self._states[key] if key in self._states else _new_state(policy, now)
            state = state.at(now, policy)
            if state.remaining(policy) == 0:
                self._states[key] = state
                return RateDecision(False, policy.limit, 0, state.reset_seconds(now, policy), "window exhausted")
            if too_many_in_flight:  # refused uncounted: not kept, so a fixed window does not start here
                return RateDecision(False, policy.limit, state.remaining(policy), state.reset_seconds(now, policy),
                                    "too many in flight")
            state.admit(now)
            self._states[key] = state
            self._in_flight[key] += 1
            return RateDecision(True, policy.limit, state.remaining(policy), state.reset_seconds(now, policy))

    def release(self, key: str) -> None:
        with self._lock:
            self._in_flight[key] -= 1
            if self._in_flight[key] <= 0:
                del self._in_flight[key]


class RateLimitMiddleware(ApiMiddleware):
    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        profile = self.harness.profile
        limiter = self.harness.rate_limiter
        key = request_facts(scope).get("credential") or "anonymous"
        decision = limiter.acquire(key)
        names = profile.rate_limit_headers
        headers: list[tuple[str, str]] = []
        if names and decision.limit is not None:
            headers = [(names.limit, str(decision.limit)), (names.remaining, str(decision.remaining))]
        if not decision.allowed:
            request_facts(scope)["fault"] = "rate_limited"
            request_facts(scope)["rate_limit_reason"] = decision.reason
            policy = limiter.policy
            if names and decision.reset_seconds is not None and policy.reset_header_on_429:
                headers.append((names.reset, str(decision.reset_seconds)))
            if policy.retry_after_on_429:
                headers.append(("Retry-After", str(decision.reset_seconds if decision.reset_seconds is not None else 1)))
            body = profile.error_body(429, "Too Many Requests", request_id_of(scope))
            await send_bytes(send, 429, body, headers)
            return
        reset_header = (names.reset, str(decision.reset_seconds)) if names and decision.reset_seconds is not None \
            else None

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                for name, value in headers:
                    _set_header(message, name, value)
                # an injected 429 decides about its own reset header
                if reset_header and message["status"] != 429:
                    _set_header(message, *reset_header)
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        finally:
            limiter.release(key)


# ---------------------------------------------------------------------------------------- faults


class SandboxConnectionDropped(httpx.RemoteProtocolError):
    """Injected: the server closed the connection without a complete response."""


class SandboxTimeout(httpx.ReadTimeout):
    """Injected: the server did not answer in time."""


FAULT_KINDS = ("latency", "error", "rate_limit", "drop_connection", "timeout", "malformed_json", "drop_field")
BODY_KINDS = {"malformed_json", "drop_field"}  # mutate the real response; the others replace it


@dataclasses.dataclass
class FaultRule:
    """One fault. It fires on matching requests with `probability` (seeded), at most `times`
    times (None = forever). Scope: `path_prefix` (with or without the API prefix, e.g.
    "/balanceSheet" or "/v2/balanceSheet") and `tenant` (as the ERP's profile names it).

    Kinds: latency (`latency_ms`, adds up with others), error (`status`), rate_limit (429 with
    optional `retry_after` / `reset_seconds` headers), drop_connection, timeout (hang
    `timeout_seconds`, then fail as a read timeout), malformed_json (body cut in half),
    drop_field (`field` removed from the JSON body). One non-latency fault per request at most."""

    kind: str
    path_prefix: str | None = None
    tenant: str | None = None
    probability: float = 1.0
    times: int | None = None
    status: int = 503  # error
    latency_ms: float = 0  # latency
    retry_after: float | None = None  # rate_limit: send Retry-After (seconds)
    reset_seconds: int | None = None  # rate_limit: send the ERP's reset header with this value
    timeout_seconds: float = 30.0  # timeout: how long to hang before failing as a read timeout
    field: str | None = None  # drop_field: dotted path, "*" for every list item ("values.*.balanceOut")
    fired: int = 0

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}; one of {FAULT_KINDS}")
        if self.kind == "drop_field" and not self.field:
            raise ValueError("a drop_field fault needs `field`")
        if self.tenant is not None:
            self.tenant = str(self.tenant)

    def matches(self, path: str, api_prefix: str, tenant: str | None) -> bool:
        if self.times is not None and self.fired >= self.times:
            return False
        if self.tenant is not None and self.tenant != tenant:
            return False
        return not self.path_prefix or path_matches(path, api_prefix, self.path_prefix)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def path_matches(path: str, api_prefix: str, prefix: str) -> bool:
    """`prefix` starts the path, below or above the API prefix, or starts what follows any of
    its segments (a tenant's own paths: `/accounts` matches `/companies/{slug}/accounts`)."""
    relative = path.removeprefix(api_prefix)
    if path.startswith(prefix) or relative.startswith(prefix):
        return True
    return any(relative[i:].startswith(prefix) for i, char in enumerate(relative) if char == "/")


class FaultPlan:
    """The faults currently injected. Thread-safe; the random draws come from a seeded
    `random.Random`, so a chaos run with the same seed and request order is reproducible."""

    def __init__(self, seed: int = 0, latency_ms: float = 0) -> None:
        self._lock = threading.Lock()
        self.seed = seed
        self.rng = random.Random(seed)
        self.latency_ms = latency_ms  # added to every API request
        self.rules: list[FaultRule] = []

    # -- configuration
    def add(self, kind: str, **settings: Any) -> FaultRule:
        rule = FaultRule(kind, **settings)
        with self._lock:
            self.rules.append(rule)
        return rule

    def latency(self, ms: float, **scope: Any) -> FaultRule:
        return self.add("latency", latency_ms=ms, **scope)

    def server_error(self, status: int = 503, *, times: int | None = None, probability: float = 1.0,
                     **scope: Any) -> FaultRule:
        return self.add("error", status=status, times=times, probability=probability, **scope)

    def too_many_requests(self, times: int | None = 1, *, retry_after: float | None = None,
                          reset_seconds: int | None = None, **scope: Any) -> FaultRule:
        return self.add("rate_limit", times=times, retry_after=retry_after, reset_seconds=reset_seconds, **scope)

    def drop_connection(self, times: int | None = 1, **scope: Any) -> FaultRule:
        return self.add("drop_connection", times=times, **scope)

    def timeout(self, seconds: float = 30.0, times: int | None = 1, **scope: Any) -> FaultRule:
        return self.add("timeout", timeout_seconds=seconds, times=times, **scope)

    def malformed_json(self, times: int | None = 1, **scope: Any) -> FaultRule:
        return self.add("malformed_json", times=times, **scope)

    def drop_field(self, field: str, times: int | None = 1, **scope: Any) -> FaultRule:
        return self.add("drop_field", field=field, times=times, **scope)

    def clear(self) -> None:
        with self._lock:
            self.rules.clear()
            self.latency_ms = 0

    def reseed(self, seed: int) -> None:
        with self._lock:
            self.seed = seed
            self.rng = random.Random(seed)

    def to_json(self) -> dict[str, Any]:
        with self._lock:
            return {"seed": self.seed, "latency_ms": self.latency_ms, "faults": [r.to_json() for r in self.rules]}

    def load_json(self, data: Mapping[str, Any]) -> None:
        """Apply an admin request: {"faults": [rule, ...] | rule, "seed"?, "latency_ms"?, "replace"?}."""
        faults = data.get("faults", [])
        if isinstance(faults, Mapping):
            faults = [faults]
        rules = [FaultRule(**{k: v for k, v in f.items() if k != "fired"}) for f in faults]
        with self._lock:
            if data.get("replace"):
                self.rules.clear()
            self.rules.extend(rules)
            if "latency_ms" in data:
                self.latency_ms = float(data["latency_ms"])
        if "seed" in data:
            self.reseed(int(data["seed"]))

    # -- evaluation
    def draw(self, path: str, api_prefix: str, tenant: str | None) -> list[FaultRule]:
        """The rules firing for one request: every matching latency rule plus at most one other
        fault (the first that fires, in the order added). Firing consumes a rule's `times`."""
        fired: list[FaultRule] = []
        with self._lock:
            for rule in self.rules:
                if rule.kind != "latency" and any(r.kind != "latency" for r in fired):
                    continue
                if not rule.matches(path, api_prefix, tenant):
                    continue
                if rule.probability < 1.0 and self.rng.random() >= rule.probability:
                    continue
                rule.fired += 1
                fired.append(rule)
        return fired


def drop_json_field(document: Any, dotted: str) -> Any:
    """Remove the field at a dotted path; "*" walks every item of a list ("values.*.id")."""
    head, _, rest = dotted.partition(".")
    if head == "*" and isinstance(document, list):
        for item in document if rest else ():
            drop_json_field(item, rest)
    elif isinstance(document, dict) and head in document:
        if rest:
            drop_json_field(document[head], rest)
        else:
            del document[head]
    return document


class FaultInjectionMiddleware(ApiMiddleware):
    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        profile, plan = self.harness.profile, self.harness.faults
        facts = request_facts(scope)
        tenant = facts.get("tenant")
        rules = plan.draw(scope["path"], profile.api_prefix, None if tenant is None else str(tenant))
        delay_ms = plan.latency_ms + sum(r.latency_ms for r in rules if r.kind == "latency")
        if delay_ms:
            await asyncio.sleep(delay_ms / 1000)
        fault = next((r for r in rules if r.kind != "latency"), None)
        if fault is None:
            await self.app(scope, receive, send)
            return
        facts["fault"] = fault.kind
        if fault.kind in BODY_KINDS:
            await self.app(scope, receive, _BodyMutatingSend(send, fault))
        else:
            await self._replace_response(fault, scope, send)

    async def _replace_response(self, rule: FaultRule, scope: Scope, send: Send) -> None:
        profile = self.harness.profile
        request_id = request_id_of(scope)
        if rule.kind == "error":
            body = profile.error_body(rule.status, "Injected server error", request_id)
            await send_bytes(send, rule.status, body, [])
        elif rule.kind == "rate_limit":
            headers = []
            if rule.retry_after is not None:
                headers.append(("Retry-After", f"{rule.retry_after:g}"))
            if rule.reset_seconds is not None and profile.rate_limit_headers:
                headers.append((profile.rate_limit_headers.reset, str(rule.reset_seconds)))
            body = profile.error_body(429, "Too Many Requests", request_id)
            await send_bytes(send, 429, body, headers)
        elif rule.kind == "drop_connection":
            # Send a status line promising a body, then fail: uvicorn closes the socket (the client
            # sees an incomplete message); ASGITransport hands the exception to the client.
            request_facts(scope)["no_response"] = True
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"application/json"), (b"content-length", b"1024")]})
            raise SandboxConnectionDropped("Server disconnected without sending a complete response (injected)")
        elif rule.kind == "timeout":
            request_facts(scope)["no_response"] = True
            await asyncio.sleep(rule.timeout_seconds)
            raise SandboxTimeout(f"No response within {rule.timeout_seconds:g} s (injected)")


class _BodyMutatingSend:
    """Buffers the response body, then truncates it or drops a field before sending."""

    def __init__(self, send: Send, mutation: FaultRule) -> None:
        self.send = send
        self.mutation = mutation
        self.start: Message | None = None
        self.chunks: list[bytes] = []

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.start = message
            return
        if message["type"] != "http.response.body":
            await self.send(message)
            return
        self.chunks.append(message.get("body", b""))
        if message.get("more_body"):
            return
        body = self._mutate(b"".join(self.chunks))
        assert self.start is not None
        _set_header(self.start, "content-length", str(len(body)))
        await self.send(self.start)
        await self.send({"type": "http.response.body", "body": body})

    def _mutate(self, body: bytes) -> bytes:
        if self.mutation.kind == "malformed_json":
            return body[: max(1, len(body) // 2)]
        try:
            document = json.loads(body, parse_float=Decimal)
        except ValueError:
            return body
        return json_bytes(drop_json_field(document, self.mutation.field or ""))


# ---------------------------------------------------------------------------------------- harness


class SandboxHarness:
    """Faults, rate limits and statistics of one simulator, plus its admin routes.

    An ERP simulator creates one, then builds its Starlette app with `build_app`."""

    def __init__(self, profile: ErpProfile, *, rate_limit: RateLimitPolicy | None = None,
                 fault_seed: int = 0, clock: Callable[[], float] = time.monotonic) -> None:
        self.profile = profile
        self.stats = RequestStats()
        self.faults = FaultPlan(seed=fault_seed)
        self.rate_limiter = RateLimiter(rate_limit, clock=clock)
        self.routes: list[BaseRoute] = []

    def build_app(self, api_routes: list[BaseRoute], *, erp_admin_routes: list[BaseRoute] = (),
                  exception_handlers: Mapping[Any, Callable] | None = None) -> Starlette:
        """The API mounted at the profile's prefix, admin routes at /_sandbox, middlewares on top."""
        admin = self.admin_routes() + [Mount(f"/{self.profile.name}", routes=list(erp_admin_routes))]
        self.routes = [Mount(self.profile.api_prefix, routes=list(api_routes)), Mount(ADMIN_PREFIX, routes=admin)]
        return Starlette(
            routes=self.routes,
            middleware=[
                # outermost first: a faulted request has been admitted by the limiter and its
                # injected latency holds an in-flight slot, as a slow server would
                Middleware(RequestStatsMiddleware, harness=self),
                Middleware(RateLimitMiddleware, harness=self),
                Middleware(FaultInjectionMiddleware, harness=self),
            ],
            exception_handlers=dict(exception_handlers or {}),
        )

    # -- Python controls
    def reset_stats(self) -> None:
        self.stats.reset()

    def clear_faults(self) -> None:
        self.faults.clear()

    def set_rate_limit(self, policy: RateLimitPolicy) -> None:
        self.rate_limiter.configure(policy)

    # -- admin HTTP
    def admin_routes(self) -> list[BaseRoute]:
        async def get_stats(request: Request) -> Response:
            log_limit = int(request.query_params.get("log", "0") or 0)
            return json_response(self.stats.snapshot(log_limit=log_limit))

        async def reset_stats(request: Request) -> Response:
            self.reset_stats()
            return json_response(self.stats.snapshot())

        async def get_faults(request: Request) -> Response:
            return json_response(self.faults.to_json())

        async def post_faults(request: Request) -> Response:
            try:
                self.faults.load_json(await request.json())
            except (ValueError, TypeError) as exc:
                return json_response({"error": str(exc)}, 400)
            return json_response(self.faults.to_json())

        async def delete_faults(request: Request) -> Response:
            self.clear_faults()
            return json_response(self.faults.to_json())

        async def get_rate_limit(request: Request) -> Response:
            return json_response(dataclasses.asdict(self.rate_limiter.policy))

        async def put_rate_limit(request: Request) -> Response:
            try:
                self.set_rate_limit(RateLimitPolicy.from_json(await request.json()))
            except (ValueError, TypeError) as exc:
                return json_response({"error": str(exc)}, 400)
            return json_response(dataclasses.asdict(self.rate_limiter.policy))

        return [
            Route("/stats", get_stats, methods=["GET"]),
            Route("/stats/reset", reset_stats, methods=["POST"]),
            Route("/faults", get_faults, methods=["GET"]),
            Route("/faults", post_faults, methods=["POST"]),
            Route("/faults", delete_faults, methods=["DELETE"]),
            Route("/rate-limit", get_rate_limit, methods=["GET"]),
            Route("/rate-limit", put_rate_limit, methods=["PUT"]),
        ]


# ---------------------------------------------------------------------------------------- serving


def client_admin_endpoint(action: Callable[[int, dict[str, Any]], Any],
                          state_of: Callable[[int], Any]) -> Callable[[Request], Awaitable[Response]]:
    """An admin endpoint under `/clients/{id}/...`: `action(client id, JSON body)`, then the answer
    `state_of(client id)`; an unknown client (KeyError) is a 404, a bad body a 400."""

    async def endpoint(request: Request) -> Response:
        try:
            client_id = int(request.path_params["id"])
            action(client_id, json.loads(await request.body() or b"{}"))
            return json_response(state_of(client_id))
        except KeyError as exc:
            return json_response({"error": str(exc.args[0])}, 404)
        except (ValueError, TypeError) as exc:
            return json_response({"error": str(exc)}, 400)

    return endpoint


class _HideInjectedFaults(logging.Filter):
    """Keep uvicorn from logging a traceback for every fault we injected on purpose."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, SandboxConnectionDropped | SandboxTimeout)


_FAULT_LOG_FILTER = _HideInjectedFaults()


@contextlib.contextmanager
def serve(app: ASGIApp, *, host: str = "127.0.0.1", port: int = 0, path: str = "",
          log_level: str = "warning", startup_timeout: float = 10.0) -> Iterator[str]:
    """Run `app` with uvicorn in a background thread; yields "http://host:port" + `path`.

    `port=0` picks a free ephemeral port. Waits until the server accepts connections and shuts
    it down cleanly on exit."""
    import uvicorn

    logging.getLogger("uvicorn.error").addFilter(_FAULT_LOG_FILTER)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="off",
                            access_log=False, timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=f"sandbox-server-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError(f"sandbox server on {host}:{port} failed to start")
        if time.monotonic() > deadline:
            server.should_exit = True
            raise TimeoutError(f"sandbox server on {host}:{port} did not start within {startup_timeout} s")
        time.sleep(0.01)
    bound_port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{bound_port}{path}"
    finally:
        server.should_exit = True
        thread.join(timeout=5)
        if thread.is_alive():  # a request is still hanging (e.g. an injected timeout)
            server.force_exit = True
            thread.join(timeout=5)


@dataclasses.dataclass
class PagingMutation:
    """Fault: from request number `after_requests + 1` on, the list at `path` changes: a row is
    inserted at / removed from `position`, so later pages shift by one."""

    path: str  # the list's path (or name) as the simulator names it
    action: str = "insert"  # insert | remove
    position: int = 0
    after_requests: int = 1
    tenant: int | str | None = None  # the simulator's id of the company; None: every company
    seen: int = 0
    inserted: Any = None  # the row inserted, made once

    def __post_init__(self) -> None:
        if self.action not in ("insert", "remove"):
            raise ValueError("action must be 'insert' or 'remove'")

    def to_json(self) -> dict[str, Any]:
        """What the admin API answers: the fault as asked for, and how many requests it has seen."""
        return {field.name: getattr(self, field.name) for field in dataclasses.fields(self) if field.name != "inserted"}


def apply_paging_mutations(mutations: list[PagingMutation], path: str, tenant: int | str | None, rows: list[Row],
                           *, phantom: Callable[[], Row] | None, identity: Callable[[Row], Any] | None = None,
                           new_row_each_request: bool = False) -> list[Row]:
    """`rows` as this request sees them; call under the simulator's lock. The inserted row is made
    once by `phantom` and then reused; `new_row_each_request`: made anew by every request (a row
    that depends on the request, such as its month or company). With `identity`, a row already in
    the list with the inserted row's identity is moved, not repeated. No `phantom`: nothing inserted."""
    for mutation in mutations:
        if mutation.path != path or mutation.tenant not in (None, tenant):
            continue
        mutation.seen += 1
        if mutation.seen <= mutation.after_requests:
            continue
        position = min(mutation.position, len(rows))
        if mutation.action == "remove":
            rows = rows[:position] + rows[position + 1:]
            continue
        if phantom is None:
            continue
        if new_row_each_request or mutation.inserted is None:
            mutation.inserted = phantom()
        inserted_id = identity(mutation.inserted) if identity else None
        if inserted_id is not None:
            rows = [r for r in rows if identity(r) != inserted_id]
        rows = [*rows]
        rows.insert(min(position, len(rows)), mutation.inserted)
    return rows


@dataclasses.dataclass(frozen=True)
class AccessToken:
    """A bearer token a simulator minted: for whom (the simulator's own id of a client, company or
    tenant) and until when (on the simulator's clock)."""

    holder: Any
    expires_at: float


def expire_all(tokens: dict[str, AccessToken], now: float) -> int:
    """Forget every token (the clients must mint new ones); the number that were still live."""
    live = sum(1 for token in tokens.values() if token.expires_at > now)
    tokens.clear()
    return live


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header; None for no header, another scheme
    or an empty token."""
    scheme, _, token = (authorization or "").partition(" ")
    return (token.strip() or None) if scheme.lower() == "bearer" else None


def basic_credentials(authorization: str | None) -> tuple[str, str] | None:
    """(username, password) of an `Authorization: Basic <base64>` header; None for no header,
    another scheme, or one that does not decode to `username:password`."""
    if not authorization or authorization[:6].lower() != "basic ":
        return None
    try:
        decoded = base64.b64decode(authorization[6:].strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    username, sep, password = decoded.partition(":")
    return (username, password) if sep else None


def identity_front(owners: Mapping[str, ASGIApp]) -> Starlette:
    """One identity server in front of simulators that share it (Visma Connect serves Visma.net and
    Business NXT alike, at one URL): each request goes to the simulator that owns its client id,
    given as the form's `client_id` or as HTTP Basic."""

    async def forward(request: Request) -> Response:
        body = await request.body()
        client_id = dict(parse_qsl(body.decode(errors="replace"))).get("client_id")
        basic = request.headers.get("authorization", "")
        if not client_id and basic.lower().startswith("basic "):
            with contextlib.suppress(ValueError, UnicodeDecodeError):
                client_id = unquote(base64.b64decode(basic[6:]).decode().partition(":")[0])
        owner = owners.get(client_id or "")
        if owner is None:
            return json_response({"error": "invalid_client"}, status_code=400)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=owner), base_url="http://identity") as client:
            answer = await client.request(request.method, request.url.path, params=request.query_params,
                                          content=body, headers={k: v for k, v in request.headers.items()
                                                                 if k.lower() not in ("host", "content-length")})
        return Response(answer.content, status_code=answer.status_code, media_type=answer.headers.get("content-type"))

    return Starlette(routes=[Route("/{path:path}", forward, methods=["GET", "POST"])])


def ids_in_ledger_order(tenants: Iterable[Any], make: Callable[[Any, int], str],
                        listed_as: Callable[[str], str] = lambda value: value) -> dict[int, str]:
    """An id per tenant (`make(tenant, attempt)`, by `erp_client_id`) for ERPs whose ids are hashes:
    a tenant sharing an organisation number with an earlier one is given ids until the one the
    connector lists (`listed_as`) sorts after the earlier tenant's. The client rules give a shared
    number to the lower id; the truth ledger gives it to the first tenant."""
    from erp_pipelines.model import client_id_order

    ids: dict[int, str] = {}
    first_with: dict[str, str] = {}
    for tenant in tenants:
        attempt, value = 0, make(tenant, 0)
        holder = first_with.get(tenant.org_number) if tenant.org_number else None
        while holder is not None and client_id_order(listed_as(value)) <= client_id_order(holder):
            attempt += 1
            value = make(tenant, attempt)
        first_with.setdefault(tenant.org_number, listed_as(value))
        ids[tenant.erp_client_id] = value
    return ids
