#!/bin/sh
# The app's browser test (tests/test_app.py) drives a Chromium through playwright; nothing else
# in the toolkit needs a browser. Use one that is already there ($CHROMIUM, or chromium,
# chromium-browser, google-chrome on PATH); else install Debian's where that is allowed (root,
# or sudo without a password); else say what to do. Never `playwright install` (a download).
set -eu
for c in "${CHROMIUM:-}" chromium chromium-browser google-chrome; do
    if [ -n "$c" ] && command -v "$c" >/dev/null 2>&1; then
        exit 0
    fi
done
if [ "$(id -u)" = 0 ]; then
    SUDO=""
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO="sudo -n"
else
    cat >&2 <<'MSG'
The test suite's browser test needs Chromium, and none was found (CHROMIUM, chromium,
chromium-browser, google-chrome). Install one, e.g. `sudo apt-get install chromium` on Debian
or Ubuntu, or point CHROMIUM=/path/to/chrome at an existing Chrome or Chromium binary, then
run `make test` again. (`make demo` and the toolkit itself need no browser.)
MSG
    exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "The browser test needs Chromium: install it with your system's package manager, or set CHROMIUM=/path/to/chrome" >&2
    exit 1
fi
echo "installing Debian's chromium for the app's browser test" >&2
$SUDO apt-get update -q && $SUDO apt-get install -y -q chromium
