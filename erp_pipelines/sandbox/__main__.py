"""Run an ERP simulator as a real HTTP server until killed.

    python -m erp_pipelines.sandbox serve --erp <name> --port 8711 --tenants 12

Prints the API base URL and the (non-secret, sandbox-only) credentials it accepts.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import sys

from erp_pipelines.registry import ERPS, api_erps
from erp_pipelines.sandbox.common import WINDOW_MODES, RateLimitPolicy
from erp_pipelines.sandbox.ledger import generate_ledger


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
    run.add_argument("--erp", choices=sorted(spec.name for spec in api_erps()), required=True)
    run.add_argument("--host", default="127.0.0.1")
    run.add_argument("--port", type=int, default=8711, help="0 = any free port")
    run.add_argument("--tenants", type=int, default=12, help="valid tenants (plus 4 rejected fixtures)")
    run.add_argument("--seed", type=int, default=2026)
    run.add_argument("--first-month", type=dt.date.fromisoformat, default=dt.date(2025, 1, 1))
    run.add_argument("--no-fixtures", action="store_true", help="omit the tenants the client rules reject")
    run.add_argument("--rate-limit", type=_rate_limit, help="LIMIT/SECONDS per credential, e.g. 100/60")
    run.add_argument("--window", choices=WINDOW_MODES, default="fixed", help="how the rate limit counts")
    run.add_argument("--log-level", default="warning")
    args = parser.parse_args(argv)

    import uvicorn

    ledger = generate_ledger(args.tenants, seed=args.seed, first_month=args.first_month,
                             rejected_fixtures=not args.no_fixtures)
    simulator = ERPS[args.erp].simulator_class(ledger)
    if args.rate_limit:
        simulator.set_rate_limit(dataclasses.replace(args.rate_limit, mode=args.window))
    api_prefix, lines = simulator.api_prefix, simulator.credential_lines()
    config = uvicorn.Config(simulator.app, host=args.host, port=args.port, log_level=args.log_level, lifespan="off")
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
