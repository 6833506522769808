#!/bin/sh
# Headless Chromium for the report test (tests/test_report_browser.py): Debian's package.
# Installs it with apt-get when /usr/bin/chromium is missing and we are root; otherwise says how.
# Never fails the setup: without Chromium the browser test is skipped with this same hint.
set -u
CHROMIUM=${CHROMIUM:-/usr/bin/chromium}
if [ -x "$CHROMIUM" ]; then
    exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing chromium (Debian package) for the HTML report test..."
    export DEBIAN_FRONTEND=noninteractive
    if apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium >/dev/null; then
        echo "chromium installed at $(command -v chromium)"
        exit 0
    fi
    echo "warning: apt-get could not install chromium; the browser test will be skipped." >&2
    exit 0
fi
echo "note: $CHROMIUM not found. To run the HTML report browser test, install Chromium:" >&2
echo "  sudo apt-get install chromium     (Debian/Ubuntu), or set CHROMIUM=/path/to/chromium" >&2
exit 0
