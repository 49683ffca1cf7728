#!/usr/bin/env bash
# The test command: installs what is needed, then runs the whole suite. The tests start every
# server they use (Redis, PostgreSQL, moto's S3 server) on 127.0.0.1 and stop them at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if ! command -v initdb >/dev/null; then          # Debian's postgresql keeps its tools off PATH
  PATH="$(dirname "$(ls /usr/lib/postgresql/*/bin/initdb | tail -n1)"):$PATH"
  export PATH
fi
export TORCHJUICE_REQUIRE_SERVERS=1   # a missing server fails the run instead of skipping tests
exec python -m pytest -q "$@"
