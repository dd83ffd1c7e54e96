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
# Tests run in TEST_WORKERS processes (pytest-xdist): most of them wait on sandboxes, not on the CPU.
# A module's tests stay in one process (--dist loadscope: its module-scoped servers start once).
# Those marked `serial` measure latency, so they run after, alone. TEST_WORKERS=0: one run, one process.
workers="${TEST_WORKERS:-3}"
if [ "$workers" = 0 ]; then
  exec .venv/bin/python -m pytest -q "$@"
fi
rc=0
.venv/bin/python -m pytest -q -n "$workers" --dist loadscope -m "not serial" "$@" || rc=$?
alone=0
.venv/bin/python -m pytest -q -m serial "$@" || alone=$?
# 5: no test of that kind among the arguments' (both 5: none at all, an error).
if [ "$rc" = 5 ] && [ "$alone" != 5 ]; then rc=0; fi
if [ "$alone" = 5 ] && [ "$rc" != 5 ]; then alone=0; fi
if [ "$rc" != 0 ]; then exit "$rc"; fi
if [ "$alone" != 0 ]; then exit "$alone"; fi
# Once more on uvloop (`crogia serve --loop uvloop`), for the parts whose I/O the loop does: the API,
# previews, sandboxes and terminals, without the paths only asyncio's own loop has (`selector_loop`).
# Only for the whole suite (no arguments); UVLOOP_PASS=0 leaves it out.
if [ "$#" = 0 ] && [ "${UVLOOP_PASS:-1}" != 0 ]; then
  CROGIA_TEST_LOOP=uvloop .venv/bin/python -m pytest -q -n "$workers" --dist loadscope \
    -m "not serial and not selector_loop" tests/api tests/previews tests/sandbox tests/terminals
fi
