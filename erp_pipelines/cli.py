"""`erp-pipelines` (also `python -m erp_pipelines`): the project's command line."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="erp-pipelines", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("env-example", help="print .env.example, written from every connector's settings")
    consent = commands.add_parser(
        "consent", help="give an OAuth consent for an ERP with authorisation-code login",
        description="Prints the authorise URL, opens a browser, waits on <ERP>_REDIRECT_URI for the answer, "
        "stores the tokens in the encrypted token store and prints the companies consented. If the login "
        "shows no company to choose, turn off the default company (standardfirma) in the ERP and try again.",
    )
    consent.add_argument("erp")
    consent.add_argument("--no-browser", action="store_true", help="only print the URL")
    args = parser.parse_args(argv)
    if args.command == "consent":
        from erp_pipelines.consent import consent_main

        return consent_main(args.erp, open_browser=not args.no_browser)
    if args.command == "env-example":
        from erp_pipelines.config import env_example

        sys.stdout.write(env_example())
        return 0
    return 2
