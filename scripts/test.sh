#!/usr/bin/env bash
# Second command of the README (and what .ci/run calls): the whole test suite.
# Starts what the tests need first: the Docker engine and the sandbox image (when we can install them).
# PostgreSQL tests start their own throwaway cluster from the server binaries.
set -euo pipefail
cd "$(dirname "$0")/.."

make -s setup
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null || docker info >/dev/null 2>&1; then
  bash scripts/ci-setup-docker.sh
fi
# Tests run in TEST_WORKERS processes (pytest-xdist; 0: one): most of them wait on sandboxes, not on
# the CPU. A module's tests stay in one process (--dist loadscope: its module-scoped servers start once).
exec .venv/bin/python -m pytest -q -n "${TEST_WORKERS:-3}" --dist loadscope "$@"
