#!/usr/bin/env bash
# First command of the README: set everything up on a fresh Debian machine, then run the server.
#   - a virtualenv with the pinned dependencies
#   - `.env` from env.example if there is none
#   - Docker: installed and started when we are root on Debian and SANDBOX_BACKEND is not bubblewrap,
#     then the sandbox image is built (offline route when no registry answers); otherwise bubblewrap.
set -euo pipefail
cd "$(dirname "$0")/.."

make -s setup
[ -f .env ] || cp env.example .env

backend="${SANDBOX_BACKEND:-$(sed -n 's/^SANDBOX_BACKEND=//p' .env | tail -n1)}"
if [ "${backend:-auto}" != "bubblewrap" ]; then
  if docker info >/dev/null 2>&1 || { [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; }; then
    bash scripts/ci-setup-docker.sh
  else
    echo "up: no Docker engine and no way to install one here; sessions will use bubblewrap sandboxes."
  fi
fi

exec .venv/bin/crogia serve "$@"
