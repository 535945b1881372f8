"""`erp-pipelines consent <erp> [--no-browser] [--connection NAME]`: an OAuth2 authorisation-code
consent, once (for the environment's connection, or for a stored one under its own token prefix).

1. Prints the authorise URL on a line of its own and opens a browser (unless `--no-browser`).
2. Listens on the `<ERP>_REDIRECT_URI` port on localhost for the redirect with the code.
3. Exchanges the code (authlib builds the requests; the connector's client sends them), asks the
   ERP which companies the consent reaches, applies the client rules (a valid organisation or
   personal number; of two companies sharing a number the lower ERP id holds it, as in the client
   registry), stores the tokens in the encrypted token store and prints each company with its name
   and organisation number. A company sharing a number is stored too, so that
   `erp-pipelines clients activate` can move the number to it later.

Exit codes: 0 stored; 1 refused (no usable company, the user declined, time-out); 2 configuration.
Connectors offer consent by implementing `oauth_app`, `consented_companies` and `store_consent`.
"""

from __future__ import annotations

import asyncio
import http.server
import threading
import webbrowser
from collections.abc import Callable, Mapping
from typing import Any, Self
from urllib.parse import parse_qs, urlparse

from authlib.common.security import generate_token
from authlib.oauth2.rfc6749.parameters import prepare_grant_uri

from erp_pipelines.erps.kit.auth import OAuthApp, Token, oauth_form, refused_by_token_endpoint, request_token
from erp_pipelines.errors import AuthError, ErpError, redact
from erp_pipelines.model import ClientStatus, classify_clients, is_shared_number_rejection


class ConsentRefused(ErpError):
    """The consent gave no company we may serve, or the user declined it."""


def authorize_url(app: OAuthApp, state: str) -> str:
    return prepare_grant_uri(app.authorize_url, app.client_id, "code", redirect_uri=app.redirect_uri,
                             scope=app.scope, state=state, **dict(app.extra))


async def run_consent(connector: Any, *, open_browser: bool = True, timeout: float = 600.0,
                      say: Callable[[str], None] = print) -> list:
    """The whole consent; returns the companies stored. Raises `ErpError` (refusals, time-out)."""
    app = connector.oauth_app()
    state = generate_token(32)
    url = authorize_url(app, state)
    with RedirectListener(app.redirect_uri) as listener:
        say("Open this address, log in and approve access:")
        say(url)
        if open_browser:
            webbrowser.open(url)
        query = await asyncio.to_thread(listener.wait, timeout)
    if query is None:
        raise ConsentRefused(f"no answer arrived on {app.redirect_uri} within {timeout:.0f} s", erp=connector.erp,
                             fix="run the command again and finish the login in time")
    if query.get("state") != state:
        raise ConsentRefused("the answer's state does not match this consent", erp=connector.erp,
                             fix="run the command again; do not reuse an old login link")
    if "error" in query or "code" not in query:
        raise ConsentRefused(f"the consent was declined ({query.get('error', 'no code')}: "
                             f"{query.get('error_description', '')})".rstrip(": )") + ")", erp=connector.erp,
                             fix=app.help or "run the command again and approve access")
    body = await request_token(
        connector.api, app.token_url,
        oauth_form("authorization_code", code=query["code"], redirect_uri=app.redirect_uri),
        refused=refused_by_token_endpoint(connector.erp, "check the client id and secret, then run consent again"),
        basic=(app.client_id, app.client_secret),
    )
    token = Token.from_oauth(body)
    companies = classify_clients(await connector.consented_companies(token))
    accepted = [company for company in companies
                if company.status == ClientStatus.ACTIVE or is_shared_number_rejection(company)]
    for company in companies:
        shown = f"{company.name} (orgnr {company.org_number or 'none'})"
        if company.status == ClientStatus.ACTIVE:
            say(f"  {shown}: consented")
        elif is_shared_number_rejection(company):
            say(f"  {shown}: consented, but rejected until activated: {company.status_reason}")
        else:
            say(f"  {shown}: refused: {company.status_reason}")
    if not accepted:
        raise ConsentRefused("the consent reaches no company with a valid, unique organisation number",
                             erp=connector.erp, fix=app.help or "register the company's organisation number in the ERP")
    await asyncio.to_thread(connector.store_consent, token, accepted)
    return accepted


class RedirectListener:
    """A one-shot HTTP server on the redirect URI's localhost port, waiting for the redirect."""

    def __init__(self, redirect_uri: str) -> None:
        parsed = urlparse(redirect_uri)
        if parsed.hostname not in ("127.0.0.1", "localhost", "::1"):
            raise AuthError(f"the redirect URI must point at this machine, not {parsed.hostname}",
                            fix="register and set a redirect URI such as http://127.0.0.1:8765/callback")
        self._path = parsed.path or "/"
        self._arrived = threading.Event()
        self.query: dict[str, str] | None = None
        listener = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                request = urlparse(self.path)
                if request.path != listener._path:
                    self.send_error(404)
                    return
                listener.query = {k: v[0] for k, v in parse_qs(request.query).items()}
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; charset=utf-8")
                self.end_headers()
                self.wfile.write(b"erp-pipelines: consent received; you can close this window.\n")
                listener._arrived.set()

            def log_message(self, *args: Any) -> None:  # the code must not reach a log
                pass

        self._server = http.server.HTTPServer((parsed.hostname, parsed.port or 80), Handler)

    def __enter__(self) -> Self:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def wait(self, timeout: float) -> dict[str, str] | None:
        return self.query if self._arrived.wait(timeout) else None


def consent_main(erp: str, *, open_browser: bool, connection: str | None = None,
                 environ: Mapping[str, str] | None = None) -> int:
    """`connection`: a stored connection's name; its tokens go under its own prefix in the store.
    Without it, the environment's connection (`default`)."""
    from erp_pipelines import connections
    from erp_pipelines.config import connector_from_environment

    try:
        if connection is None:
            connector = connector_from_environment(erp, environ)
        else:
            store = connections.store_from_env(environ)
            connector = connections.connection_named(erp, connection, environ, store).connector(store)
    except ErpError as exc:
        print(f"erp-pipelines consent: {exc}")
        return 2
    if not hasattr(connector, "oauth_app"):
        print(f"erp-pipelines consent: {erp} has no OAuth consent; its credentials go in its variables")
        return 2

    async def consent() -> list:
        try:
            return await run_consent(connector, open_browser=open_browser)
        finally:
            await connector.aclose()

    try:
        companies = asyncio.run(consent())
    except ErpError as exc:
        print(f"erp-pipelines consent: {redact(str(exc))}")
        return 2 if isinstance(exc, AuthError) and "client id" in str(exc) else 1
    print(f"Stored the consent for {len(companies)} compan{'y' if len(companies) == 1 else 'ies'}.")
    return 0
