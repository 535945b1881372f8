"""Auth providers: `httpx.Auth` classes backed by the encrypted token store.

- `StaticToken`: a personal key or API token sent as it is (`Authorization: Bearer …`, or
  `Authorization: token …`); nothing to mint.
- `MintedToken`: the base of every token that is minted on demand, cached in memory and (with a
  store) across runs, and re-minted once when it gets a 401 (`token(stale=…)`). A connector with
  its own session scheme subclasses it and implements `mint`.
- `ClientCredentials`: OAuth2 client credentials (request built by authlib), one token per client
  key or tenant.
- `RefreshingToken`: the tokens an OAuth2 authorisation-code consent produced, refreshed with the
  refresh token. Where refresh tokens rotate, the refresh runs under a cross-process lock, re-reads
  the store after taking it, and stores the new tokens durably before the access token is used.

Every token value registers itself for redaction (`errors.register_secret`) the moment it exists.
Providers mint through the connector's `ApiClient`, so token calls are throttled and retried like
any call (some ERPs count them against the same limit).
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import dataclasses
import hashlib
import time
from collections.abc import AsyncIterator, Callable, Generator, Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

import httpx
from authlib.oauth2.rfc6749.parameters import prepare_token_request
from filelock import FileLock

from erp_pipelines.errors import AuthError, BadResponse, ErpError, register_secret
from erp_pipelines.tokens import TokenStore

if TYPE_CHECKING:
    from erp_pipelines.erps.kit.client import ApiClient, RequestContext

TokenRefused = Callable[[httpx.Response, Any], ErpError]  # (token endpoint's answer, its JSON) -> error


@dataclasses.dataclass
class Token:
    value: str
    expires_at: float | None = None  # epoch seconds; None: does not expire
    refresh_token: str | None = None

    def fresh(self, leeway: float, stale: str | None = None, now: float | None = None) -> bool:
        if self.value == stale:
            return False
        return self.expires_at is None or (time.time() if now is None else now) < self.expires_at - leeway

    def as_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Any) -> Token | None:
        if not isinstance(data, Mapping) or not isinstance(data.get("value"), str):
            return None
        register_secret(data["value"], data.get("refresh_token"))  # read from the store: a secret, stale or not
        return cls(data["value"], data.get("expires_at"), data.get("refresh_token"))

    @classmethod
    def from_oauth(cls, body: Any, *, previous_refresh: str | None = None) -> Token:
        """An RFC 6749 token response (`access_token`, `expires_in`, `refresh_token`)."""
        if not isinstance(body, Mapping) or not isinstance(body.get("access_token"), str):
            raise BadResponse("the token endpoint's answer has no access_token")
        expires_in = body.get("expires_in")
        return cls(
            body["access_token"],
            time.time() + float(expires_in) if expires_in is not None else None,
            body.get("refresh_token") or previous_refresh,
        )


@dataclasses.dataclass(frozen=True)
class OAuthApp:
    """An ERP's authorisation-code app, as a connector describes it."""

    authorize_url: str
    token_url: str
    client_id: str
    client_secret: str
    redirect_uri: str
    scope: str | None = None
    extra: Mapping[str, str] = dataclasses.field(default_factory=dict)  # e.g. acr_values
    help: str = ""  # what to do when the login shows no company to pick


class _FixedToken(httpx.Auth):
    def __init__(self, provider: TokenAuth, token: str) -> None:
        self._provider, self._token = provider, token

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        self._provider.apply(request, self._token)
        yield request


class TokenAuth(httpx.Auth):
    """A token-bearing provider. `ApiClient` asks `token()` before a request takes its turn and
    sends it with `fixed(token)`; plain httpx users get the same through `async_auth_flow`."""

    can_remint = True
    scheme = "Bearer"
    header = "Authorization"

    @abc.abstractmethod
    async def token(self, stale: str | None = None) -> str:
        """A live token; `stale` is one that just got a 401 and must not be returned again."""

    def apply(self, request: httpx.Request, token: str) -> None:
        request.headers[self.header] = f"{self.scheme} {token}" if self.scheme else token

    def fixed(self, token: str) -> httpx.Auth:
        return _FixedToken(self, token)

    async def async_auth_flow(self, request: httpx.Request):
        token = await self.token()
        self.apply(request, token)
        response = yield request
        if response.status_code == 401 and self.can_remint:
            self.apply(request, await self.token(stale=token))
            yield request


class StaticToken(TokenAuth):
    """A key sent as it is. A 401 is final: there is nothing to re-mint."""

    can_remint = False

    def __init__(self, value: str, *, scheme: str = "Bearer", header: str = "Authorization") -> None:
        register_secret(value)
        self._value, self.scheme, self.header = value, scheme, header

    async def token(self, stale: str | None = None) -> str:
        return self._value


class MintedToken(TokenAuth):
    """Minted on demand; cached in memory and, given a store, under `store_entry` across runs."""

    leeway = 60.0  # seconds before expiry at which a token counts as spent

    def __init__(self, *, store: TokenStore | None = None, store_entry: str | None = None) -> None:
        self._store = store
        self._entry = store_entry
        self._token: Token | None = None
        self._lock = asyncio.Lock()
        self.minted = 0

    @abc.abstractmethod
    async def mint(self) -> Token: ...

    def now(self) -> float:
        """Epoch seconds, against which expiry is judged."""
        return time.time()

    async def token(self, stale: str | None = None) -> str:
        async with self._lock:
            if self._token and self._token.fresh(self.leeway, stale, self.now()):
                return self._token.value
            if self._store is not None and self._entry:
                cached = Token.from_json(await asyncio.to_thread(self._store.get, self._entry))
                if cached and cached.fresh(self.leeway, stale, self.now()):
                    return self._keep(cached).value
            token = await self.mint()
            self.minted += 1
            self._keep(token)
            if self._store is not None and self._entry:
                await asyncio.to_thread(self._store.put, self._entry, token.as_json())
            return token.value

    def _keep(self, token: Token) -> Token:
        register_secret(token.value, token.refresh_token)
        self._token = token
        return token


def _refusal_mapper(refused: TokenRefused):
    def map_error(response: httpx.Response, body: Any, context: RequestContext) -> ErpError | None:
        return refused(response, body) if response.status_code in (400, 401, 403) else None

    return map_error


async def request_token(
    client: ApiClient, token_url: str, form: Mapping[str, str], *, refused: TokenRefused,
    basic: tuple[str, str] | None = None, headers: Mapping[str, str] | None = None,
) -> Any:
    """POST a form to a token endpoint through the connector's client; its refusals (400/401/403,
    RFC 6749 §5.2 `invalid_client`, `invalid_grant`, …) become the connector's error."""
    return await client.request(
        "POST", token_url, form=dict(form), headers=headers, decode=True, map_error=_refusal_mapper(refused),
        auth=httpx.BasicAuth(*basic) if basic else None,
    )


def oauth_form(grant_type: str, **params: Any) -> dict[str, str]:
    """The token request body, as authlib prepares it (RFC 6749 §4)."""
    return dict(parse_qsl(prepare_token_request(grant_type, **{k: v for k, v in params.items() if v is not None})))


class ClientCredentials(MintedToken):
    """OAuth2 client credentials: client id and secret sent as HTTP Basic (`client_secret_basic`,
    the default) or in the form body (`client_secret_post`, RFC 6749 §2.3.1)."""

    def __init__(
        self, client: ApiClient, token_url: str, client_id: str, client_secret: str, *, refused: TokenRefused,
        scope: str | None = None, params: Mapping[str, str] | None = None, headers: Mapping[str, str] | None = None,
        store: TokenStore | None = None, store_entry: str | None = None, client_auth: str = "client_secret_basic",
    ) -> None:
        super().__init__(store=store, store_entry=store_entry)
        if client_auth not in ("client_secret_basic", "client_secret_post"):
            raise ValueError(f"unknown client authentication {client_auth!r}")
        register_secret(client_secret)
        self._client, self._url, self._refused = client, token_url, refused
        in_body = client_auth == "client_secret_post"
        self._basic = None if in_body else (client_id, client_secret)
        credentials = {"client_id": client_id, "client_secret": client_secret} if in_body else {}
        self._form = oauth_form("client_credentials", scope=scope, **credentials, **dict(params or {}))
        self._headers = headers

    async def mint(self) -> Token:
        body = await request_token(self._client, self._url, self._form, refused=self._refused,
                                   basic=self._basic, headers=self._headers)
        return Token.from_oauth(body)


class RefreshingToken(MintedToken):
    """The access and refresh tokens of one authorisation-code consent, kept in the token store
    under `store_entry` (written by `erp-pipelines consent`). Without an entry the consent is
    missing: `missing()` says how to give it."""

    def __init__(
        self, client: ApiClient, token_url: str, client_id: str, client_secret: str, *, refused: TokenRefused,
        missing: Callable[[], ErpError], store: TokenStore, store_entry: str,
    ) -> None:
        super().__init__(store=store, store_entry=store_entry)
        register_secret(client_secret)
        self._client, self._url, self._refused, self._missing = client, token_url, refused, missing
        self._basic = (client_id, client_secret)

    async def token(self, stale: str | None = None) -> str:
        async with self._lock:
            if self._token and self._token.fresh(self.leeway, stale, self.now()):
                return self._token.value
            async with self._consent_lock():
                # re-read under the lock: another run may have refreshed (and rotated) meanwhile
                stored = Token.from_json(await asyncio.to_thread(self._store.get, self._entry))
                if stored is None:
                    raise self._missing()
                if stored.fresh(self.leeway, stale, self.now()):
                    return self._keep(stored).value
                token = await self.refresh(stored)
                await asyncio.to_thread(self._store.put, self._entry, token.as_json())  # durable before use
                self.minted += 1
                return self._keep(token).value

    async def mint(self) -> Token:  # pragma: no cover - `token` refreshes instead
        raise NotImplementedError

    async def refresh(self, stored: Token) -> Token:
        if not stored.refresh_token:
            raise self._missing()
        register_secret(stored.refresh_token)
        body = await request_token(
            self._client, self._url, oauth_form("refresh_token", refresh_token=stored.refresh_token),
            refused=self._refused, basic=self._basic,
        )
        return Token.from_oauth(body, previous_refresh=stored.refresh_token)

    @contextlib.asynccontextmanager
    async def _consent_lock(self) -> AsyncIterator[None]:
        """One refresh of this consent at a time across processes."""
        digest = hashlib.sha256(self._entry.encode()).hexdigest()[:16]
        lock = FileLock(f"{self._store.path}.{digest}.lock", thread_local=False)
        await asyncio.to_thread(lock.acquire)
        try:
            yield
        finally:
            lock.release()


def refused_by_token_endpoint(erp: str, fix: str, *, tenant: str | None = None) -> TokenRefused:
    """The usual mapping of a token endpoint's refusal: `AuthError` with the OAuth error code."""

    def refused(response: httpx.Response, body: Any) -> ErpError:
        code = body.get("error") if isinstance(body, Mapping) else None
        return AuthError(
            f"the token endpoint refused the credential (HTTP {response.status_code}"
            + (f", {code}" if code else "") + ")",
            erp=erp, tenant=tenant, fix=fix,
        )

    return refused
