#!/usr/bin/env bash
# Installs torchjuice and what its tests need on a fresh Debian machine (idempotent).
#   - Python packages: torch pinned to the CPU build 2.13.0, the project with its test extras;
#   - servers the tests start on loopback: redis-server, PostgreSQL (initdb/pg_ctl), FUSE 3.
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive
missing=()
command -v redis-server >/dev/null || missing+=(redis-server)
command -v initdb >/dev/null || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing+=(postgresql)
command -v fusermount3 >/dev/null || missing+=(fuse3)
pkg-config --exists fuse3 2>/dev/null || missing+=(libfuse3-dev pkg-config)   # pyfuse3 builds on it
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "setup: please install: ${missing[*]} (apt-get install ...)" >&2
  fi
fi
python -m pip install -q --disable-pip-version-check torch==2.13.0 -e ".[test,bench,fuse]"
