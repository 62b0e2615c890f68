#!/usr/bin/env bash
# All set-up on a fresh machine (Debian, Python >= 3.11): system libraries Mooncake loads, then the
# package with its test and Mooncake extras. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
for pkg in libibverbs1 librdmacm1 libnuma1 liburing2 libcurl4; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi

python3 -m pip install -q --disable-pip-version-check -e ".[dev,mooncake]"
