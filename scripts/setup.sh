#!/usr/bin/env bash
# One-time set-up on a fresh machine: a virtual environment in .venv with the CPU build of torch, the project
# with its service and dev extras, and (as root, with apt) the redis-server and promtool binaries the tests use.
#
#   scripts/setup.sh            # everything
#   MOSAIC_NO_APT=1 scripts/setup.sh   # skip the Debian packages
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"

step() { printf '\n==> %s\n' "$*"; }

if [[ -z "${MOSAIC_NO_APT:-}" ]] && command -v apt-get >/dev/null && [[ "$(id -u)" == 0 ]]; then
    missing=()
    command -v redis-server >/dev/null || missing+=(redis-server)
    command -v promtool >/dev/null || missing+=(prometheus)
    if ((${#missing[@]})); then
        step "installing Debian packages: ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
fi

if [[ ! -x .venv/bin/python ]]; then
    step "creating .venv with $($PYTHON --version)"
    "$PYTHON" -m venv .venv
fi
step "installing torch==$TORCH_VERSION first (an exact pin: a range would pull a multi-GB CUDA build)"
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==$TORCH_VERSION"
step "installing mosaic with its service and dev extras"
.venv/bin/python -m pip install -q -e '.[dev]'
step "done: run .venv/bin/mosaic --help"
