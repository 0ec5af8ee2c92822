#!/usr/bin/env bash
# Installs Debian's chromium for the report's browser tests (pytest -m browser), once.
# Idempotent: does nothing when a chromium binary is already on the machine. Playwright drives
# this system browser (executable_path); `playwright install` is never run (it downloads).
set -euo pipefail

for b in /usr/bin/chromium /usr/bin/chromium-browser; do
  if [ -x "$b" ]; then
    echo "install-browser: $b present ($("$b" --version 2>/dev/null || echo unknown version))"
    exit 0
  fi
done

if ! command -v apt-get >/dev/null 2>&1; then
  echo "install-browser: no apt-get here; browser tests will be skipped" >&2
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo -n"; else
    echo "install-browser: not root and no sudo; browser tests will be skipped" >&2
    exit 0
  fi
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends chromium chromium-driver fonts-dejavu-core
echo "install-browser: $(/usr/bin/chromium --version)"
