#!/usr/bin/env bash
# System packages the test suite needs beyond the Python venv: Debian's Chromium, which the
# playground's end-to-end test drives headless through Playwright. Idempotent: does nothing
# when /usr/bin/chromium exists. Needs root (or passwordless sudo) the first time.
set -euo pipefail

if [ -x /usr/bin/chromium ]; then
    exit 0
fi
if [ "$(id -u)" -eq 0 ]; then
    SUDO=""
elif command -v sudo >/dev/null 2>&1; then
    SUDO="sudo"
else
    echo "install-system-deps: /usr/bin/chromium is missing and this is not root;" \
         "install Debian's 'chromium' package" >&2
    exit 1
fi
echo "install-system-deps: installing chromium (apt-get)" >&2
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium
/usr/bin/chromium --version >&2
