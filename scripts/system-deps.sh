#!/usr/bin/env bash
# System packages the review app's tests use: Debian's Chromium (the browser test drives it with
# Playwright) and PostgreSQL (the tests start a throwaway server from its binaries).
# Idempotent: installs only what is missing, and only as root; otherwise it says what to run.
set -euo pipefail

missing=()
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v chromedriver >/dev/null 2>&1 || missing+=(chromium-driver)
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || command -v initdb >/dev/null 2>&1 || missing+=(postgresql)

if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "note: ${missing[*]} not installed; the browser/PostgreSQL tests will skip." >&2
    echo "      install with: sudo apt-get update && sudo apt-get install -y ${missing[*]}" >&2
    exit 0
fi
echo "installing system packages: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q "${missing[@]}"
