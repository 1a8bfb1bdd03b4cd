#!/usr/bin/env bash
# Everything a fresh Debian 12 + Python 3.11 machine needs, then npufa itself. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""
[ "$(id -u)" = 0 ] || SUDO=sudo

missing=()
for pkg in g++ libgtest-dev; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  $SUDO apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi

# torch first, pinned: an unpinned torch requirement would pull the newest CUDA build (several GB).
python3 -m pip install -q --disable-pip-version-check "torch==2.13.0"
python3 -m pip install -q --disable-pip-version-check pytest numpy cmake ninja
python3 -m pip install -q --disable-pip-version-check .
