#!/usr/bin/env bash
# Make sure a headless browser is there for the report tests: install Debian's chromium (as
# root) when no chromium is on the PATH. Never fails the test run: without a browser the
# browser tests skip and say why.
set -uo pipefail
for name in chromium chromium-browser google-chrome; do
  command -v "$name" >/dev/null 2>&1 && exit 0
done
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "chromium: not installed and cannot install it here (needs root and apt-get); the browser tests will skip" >&2
  exit 0
fi
echo "chromium: not installed; installing Debian's chromium for the report browser tests" >&2
if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }; then
  echo "chromium: installation failed; the browser tests will skip" >&2
fi
exit 0
