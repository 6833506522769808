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
    free_mb=$(df -Pm /usr | awk 'NR == 2 { print $4 }')
    if [ -n "$free_mb" ] && [ "$free_mb" -lt 700 ]; then
        echo "warning: chromium needs about 700 MB under /usr ($free_mb MB free); the browser test will be skipped." >&2
        exit 0
    fi
    # downloaded packages are not kept: the install alone is about 450 MB
    if apt-get update -qq && apt-get install -y -qq --no-install-recommends \
            -o APT::Keep-Downloaded-Packages=false chromium >/dev/null; then
        echo "chromium installed at $(command -v chromium)"
        exit 0
    fi
    echo "warning: apt-get could not install chromium; the browser test will be skipped." >&2
    exit 0
fi
echo "note: $CHROMIUM not found. To run the HTML report browser test, install Chromium:" >&2
echo "  sudo apt-get install chromium     (Debian/Ubuntu), or set CHROMIUM=/path/to/chromium" >&2
exit 0
