#!/usr/bin/env bash
# Headless Chromium for the UI test (Debian's chromium and chromium-driver).
# Installs only where it is missing and apt-get can run as root; otherwise says why and carries on
# (the browser test then skips, or fails under CI=true).
set -uo pipefail
if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then
  exit 0
fi
if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
  echo "installing Debian's chromium and chromium-driver for the browser test" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
  exit 0
fi
echo "chromium is not installed (as root: apt-get install chromium chromium-driver); the browser test will skip" >&2
