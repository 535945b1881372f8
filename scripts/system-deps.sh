#!/usr/bin/env bash
# Debian packages the tests need beyond Python (`make test` runs this first; CI runs it as root).
# chromium: the browser tests (tests/browser/) drive Debian's /usr/bin/chromium; no browser is downloaded.
# postgresql: tests/postgres/ start a private cluster (initdb, pg_ctl) for the Dagster instance in deploy/.
set -euo pipefail

PACKAGES=(chromium postgresql)

missing=()
for package in "${PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$package")
    fi
done
[ ${#missing[@]} -eq 0 ] && exit 0

if ! command -v apt-get >/dev/null; then
    # not Debian: the tests that need these packages fail and name them
    echo "system-deps: apt-get is not available; install these packages yourself: ${missing[*]}" >&2
    exit 0
fi
as_root=()
if [ "$(id -u)" -ne 0 ]; then
    if ! command -v sudo >/dev/null; then
        echo "system-deps: not root and no sudo; as root: apt-get install -y ${missing[*]}" >&2
        exit 0
    fi
    as_root=(sudo)
fi
echo "system-deps: installing ${missing[*]}" >&2
"${as_root[@]}" apt-get update -qq
"${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
