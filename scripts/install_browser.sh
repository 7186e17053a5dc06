#!/usr/bin/env bash
# Debian's chromium and chromedriver, for tests/test_page.py (the page at GET / in a real headless browser).
# CI runs it (.ci/run); it needs root or sudo and a Debian or Ubuntu apt. Idempotent.
set -euo pipefail
if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
  echo "browser: $(chromium --version 2>/dev/null | head -1) with $(chromedriver --version | head -1)"
  exit 0
fi
SUDO=()
if [ "$(id -u)" -ne 0 ]; then
  SUDO=(sudo)
fi
LOG="$(mktemp)"
# dpkg's lines go to a log, shown only when a step fails.
if ! { "${SUDO[@]}" apt-get update -qq && DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y -qq \
       --no-install-recommends chromium chromium-driver; } >"$LOG" 2>&1; then
  cat "$LOG" >&2
  echo "browser: apt-get could not install chromium and chromium-driver (log above)" >&2
  exit 1
fi
rm -f "$LOG"
echo "browser: $(chromium --version 2>/dev/null | head -1) with $(chromedriver --version | head -1)"
