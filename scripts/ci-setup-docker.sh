#!/usr/bin/env bash
# Makes the Docker sandbox backend usable on a CI machine, idempotently:
#   1. installs docker.io, debootstrap and the network isolation tools when missing (needs root, apt-get);
#   2. starts dockerd in the background when no engine answers, and waits for it;
#   3. builds the sandbox image with `python -m crogia.sandbox.image` (reused when present;
#      built offline from the host's Debian mirror when no registry answers).
# Knobs: PYTHON (default .venv/bin/python), DOCKERD_WAIT seconds (60), DOCKERD_LOG (/tmp/dockerd.log).
set -euo pipefail
cd "$(dirname "$0")/.."

py="${PYTHON:-.venv/bin/python}"
wait_s="${DOCKERD_WAIT:-60}"
log="${DOCKERD_LOG:-/tmp/dockerd.log}"

say() { echo "ci-setup-docker: $*"; }
die() { echo "ci-setup-docker: error: $*" >&2; exit 1; }

missing=()
command -v docker >/dev/null || missing+=(docker.io)
if ! docker info >/dev/null 2>&1 && ! command -v dockerd >/dev/null; then
  [[ " ${missing[*]} " == *" docker.io "* ]] || missing+=(docker.io)
fi
command -v debootstrap >/dev/null || missing+=(debootstrap)
# Network isolation: pasta (bubblewrap egress), nft (its rules, and the Docker
# bridge's fence), ip (namespaces), iptables (Docker's own rules).
command -v pasta >/dev/null || missing+=(passt)
command -v nft >/dev/null || missing+=(nftables)
command -v ip >/dev/null || missing+=(iproute2)
command -v iptables >/dev/null || missing+=(iptables)
# The userns-remap test starts a dockerd of its own; bubblewrap's seccomp filter loads libseccomp.
command -v dockerd >/dev/null || [[ " ${missing[*]} " == *" docker.io "* ]] || missing+=(docker.io)
ldconfig -p | grep 'libseccomp\.so\.2' >/dev/null || missing+=(libseccomp2)
# The preview tests open a signed link in a real browser.
command -v chromium >/dev/null || missing+=(chromium)
if ((${#missing[@]})); then
  [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null ||
    die "missing ${missing[*]}; install them (this needs root and apt-get)"
  say "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! docker info >/dev/null 2>&1; then
  [ "$(id -u)" = 0 ] || die "no Docker engine answers, and starting dockerd needs root"
  say "starting dockerd (log: $log)"
  # setsid: dockerd must outlive this script and not get the CI job's signals.
  setsid nohup dockerd >"$log" 2>&1 </dev/null &
  dockerd_pid=$!
  deadline=$((SECONDS + wait_s))
  until docker info >/dev/null 2>&1; do
    if ! kill -0 "$dockerd_pid" 2>/dev/null; then
      tail -n 20 "$log" >&2 || true
      die "dockerd exited during start-up (see $log)"
    fi
    ((SECONDS < deadline)) || { tail -n 20 "$log" >&2 || true; die "dockerd did not answer within ${wait_s}s"; }
    sleep 0.5
  done
fi
say "engine up: $(docker version --format '{{.Server.Version}}' 2>/dev/null)"

"$py" -m crogia.sandbox.image
