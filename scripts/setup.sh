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
  # another apt-get (unattended upgrades, a second set-up) may hold the locks: wait for them (up to
  # 10 min) instead of failing
  lock=(-o DPkg::Lock::Timeout=600)
  for i in $(seq 1 60); do
    $SUDO apt-get "${lock[@]}" update -qq && break
    [ "$i" = 60 ] && { echo "setup: apt-get update failed for 10 min" >&2; exit 1; }
    echo "setup: apt-get update failed (lock held?), retrying in 10 s" >&2
    sleep 10
  done
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get "${lock[@]}" install -y -qq "${need[@]}" >/dev/null
fi

python3 -m pip install -q --disable-pip-version-check -e ".[dev,mooncake]"
