"""Run an ERP simulator as a real HTTP server until killed.

    python -m erp_pipelines.sandbox serve --erp tripletex --port 8711 --tenants 12

Prints the API base URL and the (non-secret, sandbox-only) credentials it accepts.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from collections.abc import Callable
from typing import Any

from erp_pipelines.sandbox.common import RateLimitPolicy
from erp_pipelines.sandbox.ledger import TruthLedger, generate_ledger


def _tripletex(ledger: TruthLedger, args: argparse.Namespace) -> tuple[Any, str, list[str]]:
    from erp_pipelines.sandbox import tripletex

    sandbox = tripletex.TripletexSandbox(
        ledger,
        consumer_token=args.consumer_token or tripletex.DEFAULT_CONSUMER_TOKEN,
        accountant_employee_token=args.employee_token or tripletex.DEFAULT_ACCOUNTANT_EMPLOYEE_TOKEN,
        rate_limit=args.rate_limit or tripletex.DEFAULT_RATE_LIMIT,
    )
    lines = [
        f"consumer token:  {sandbox.consumer_token}",
        f"employee token:  {sandbox.accountant_employee_token}  (accountant key; username 0 or a client id)",
        f"clients:         {len(ledger.tenants)} (ids {ledger.tenants[0].erp_client_id}..{ledger.tenants[-1].erp_client_id})",
    ]
    return sandbox.app, tripletex.API_PREFIX, lines


SIMULATORS: dict[str, Callable[[TruthLedger, argparse.Namespace], tuple[Any, str, list[str]]]] = {
    "tripletex": _tripletex,
}


def _rate_limit(text: str) -> RateLimitPolicy:
    """"LIMIT/SECONDS", e.g. "100/60"."""
    try:
        limit, _, seconds = text.partition("/")
        return RateLimitPolicy(limit=int(limit), window_seconds=float(seconds or 60))
    except ValueError:
        raise argparse.ArgumentTypeError("expected LIMIT/SECONDS, e.g. 100/60") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m erp_pipelines.sandbox", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("serve", help="serve one ERP simulator over HTTP")
    run.add_argument("--erp", choices=sorted(SIMULATORS), default="tripletex")
    run.add_argument("--host", default="127.0.0.1")
    run.add_argument("--port", type=int, default=8711, help="0 = any free port")
    run.add_argument("--tenants", type=int, default=12, help="valid tenants (plus 4 rejected fixtures)")
    run.add_argument("--seed", type=int, default=2026)
    run.add_argument("--first-month", type=dt.date.fromisoformat, default=dt.date(2025, 1, 1))
    run.add_argument("--no-fixtures", action="store_true", help="omit the tenants the client rules reject")
    run.add_argument("--consumer-token")
    run.add_argument("--employee-token")
    run.add_argument("--rate-limit", type=_rate_limit, help="LIMIT/SECONDS per credential, e.g. 100/60")
    run.add_argument("--log-level", default="warning")
    args = parser.parse_args(argv)

    import uvicorn

    ledger = generate_ledger(args.tenants, seed=args.seed, first_month=args.first_month,
                             rejected_fixtures=not args.no_fixtures)
    app, api_prefix, lines = SIMULATORS[args.erp](ledger, args)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level, lifespan="off")
    server = uvicorn.Server(config)

    def announce() -> None:
        port = server.servers[0].sockets[0].getsockname()[1] if server.servers else args.port
        root = f"http://{args.host}:{port}"
        print(f"{args.erp} sandbox: {root}{api_prefix}", *(f"  {line}" for line in lines),
              f"  admin:           {root}/_sandbox/stats", sep="\n", flush=True)

    original_startup = server.startup

    async def startup(sockets=None) -> None:
        await original_startup(sockets=sockets)
        if server.started:
            announce()

    server.startup = startup  # print once the port is bound (also for --port 0)
    server.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
