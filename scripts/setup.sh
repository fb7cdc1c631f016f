#!/usr/bin/env bash
# One-time set-up on a fresh machine: a virtual environment in .venv with torch, the project with its service and
# dev extras, and (as root, with apt) the redis-server, promtool and chromium binaries the tests use (chromium for
# the operator console's browser test). pip shows what it downloads as it goes; the whole run takes about 5 minutes
# on a fast connection.
#
#   scripts/setup.sh                                   # everything
#   MOSAIC_NO_APT=1 scripts/setup.sh                   # skip the Debian packages
#
# Which torch build: `pip install torch==$TORCH_VERSION` from pip's configured index. On Linux x86_64 with a
# public index that resolves to the CUDA build, which pulls about 18 NVIDIA packages (several GB): right on a
# GPU host, wasteful on a laptop. CPU-only machines set one of these (for the torch install only):
#
#   MOSAIC_TORCH_INDEX_URL=URL scripts/setup.sh        # URL of PyTorch's CPU wheel index (see pytorch's
#                                                      # "get started" page); passed to pip as --index-url
#   MOSAIC_TORCH_WHEEL=path/to/torch-...+cpu-....whl scripts/setup.sh   # a wheel you downloaded
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
PIP=(.venv/bin/python -m pip --disable-pip-version-check)
[[ -t 1 ]] && PIP+=(--progress-bar on)

step() { printf '\n==> [%dm%02ds] %s\n' $((SECONDS / 60)) $((SECONDS % 60)) "$*"; }

# pyproject.toml's requires-python, checked before anything is installed (pip would refuse the project only after
# torch).
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "error: Mosaic needs Python 3.11 or newer; $PYTHON is $("$PYTHON" --version 2>/dev/null || echo "not found")." \
        "Run with PYTHON=python3.11 (or newer) scripts/setup.sh" >&2
    exit 2
fi

if [[ -z "${MOSAIC_NO_APT:-}" ]] && command -v apt-get >/dev/null && [[ "$(id -u)" == 0 ]]; then
    missing=()
    command -v redis-server >/dev/null || missing+=(redis-server)
    command -v promtool >/dev/null || missing+=(prometheus)
    need_chromium=0
    command -v chromium >/dev/null || need_chromium=1
    if ((${#missing[@]} || need_chromium)); then
        apt-get update -qq
    fi
    if ((need_chromium)); then
        # Debian ships the browser as `chromium`; where apt has no such package (Ubuntu's is a snap), say so.
        if apt-cache show chromium >/dev/null 2>&1; then
            missing+=(chromium)
        else
            echo "note: apt has no chromium package here; install Chromium for tests/e2e/test_e2e_console_browser.py"
        fi
    fi
    if ((${#missing[@]})); then
        step "installing Debian packages: ${missing[*]}"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
    fi
fi

if [[ ! -x .venv/bin/python ]]; then
    step "creating .venv with $($PYTHON --version)"
    "$PYTHON" -m venv .venv
fi
"${PIP[@]}" install -q --upgrade pip

if [[ -n "${MOSAIC_TORCH_WHEEL:-}" ]]; then
    step "installing torch from the wheel $MOSAIC_TORCH_WHEEL"
    "${PIP[@]}" install "$MOSAIC_TORCH_WHEEL"
elif [[ -n "${MOSAIC_TORCH_INDEX_URL:-}" ]]; then
    step "installing torch==$TORCH_VERSION from MOSAIC_TORCH_INDEX_URL (that index also serves torch's dependencies)"
    "${PIP[@]}" install --index-url "$MOSAIC_TORCH_INDEX_URL" "torch==$TORCH_VERSION"
else
    step "installing torch==$TORCH_VERSION from pip's index (the CUDA build on a public index: several GB;" \
        "CPU-only machines: see MOSAIC_TORCH_INDEX_URL at the top of this script)"
    "${PIP[@]}" install "torch==$TORCH_VERSION"
fi
.venv/bin/python -c "import torch; print('installed torch', torch.__version__, '- CUDA build:', torch.version.cuda or 'no')"

step "installing mosaic with its service and dev extras (torch is already there, so pip keeps it)"
"${PIP[@]}" install -e '.[dev]'
step "done: run .venv/bin/mosaic --help, or .venv/bin/mosaic demo"
