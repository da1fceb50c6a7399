#!/usr/bin/env bash
# Make headless Chromium available for the browser tests (Debian package `chromium`).
# Installs it with apt-get when missing and we may (root); otherwise says what to do.
set -euo pipefail
if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing Debian's chromium for the browser tests" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq --no-install-recommends chromium >/dev/null
else
  echo "chromium is not installed; browser tests will be skipped (install Debian's 'chromium')" >&2
fi
