#!/usr/bin/env bash
# Test-only system dependency: Debian's chromium renders the HTML report in a test.
# Best effort: where it cannot be installed, that test skips and says why.
command -v chromium >/dev/null 2>&1 && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "test set-up: installing chromium for the report rendering test"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "test set-up: could not install chromium; the report screenshot test will skip"
fi
exit 0
