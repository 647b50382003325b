#!/usr/bin/env bash
# Install vtp-harness into a virtual environment from the lock (constraints/lock.txt).
#
#   scripts/install.sh [VENV_DIR]      (default: .venv in the repository root)
#
# Every package comes at the exact version and hash the lock names (scripts/lock.sh makes it from
# pyproject.toml), then the project itself is installed editable without dependencies, and
# scripts/check_env.py checks that the environment is the lock. The lock's torch is the CPU build
# (torch==2.13.0+cpu): an unpinned torch would pull the newest CUDA build (several GB).
# Set HARNESS_OWN_TORCH=1 when you have installed your own (e.g. CUDA) torch in the venv: the lock
# is installed less torch, and your torch is left as it is.
# Environment: PYTHON (interpreter used to create the venv, default python3; the lock is for 3.11).
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV_DIR="${1:-$REPO_ROOT/.venv}"
case "$VENV_DIR" in /*) ;; *) VENV_DIR="$PWD/$VENV_DIR" ;; esac
cd "$REPO_ROOT"

PY="$VENV_DIR/bin/python"
STAMP="$VENV_DIR/.vtp-harness-install.stamp"
LOCK="constraints/lock.txt"
LOCK_PYTHON="3.11"  # the lock is resolved for it (scripts/lock.sh): the CPU torch wheel is cp311
MODE=$([[ "${HARNESS_OWN_TORCH:-0}" == "1" ]] && echo own-torch || echo cpu)

# pip (find-links / extra-index config) prints many harmless "Location ... is ignored"
# warnings; drop them but keep everything else on stderr. Used as
#   { cmd 2>&1 1>&3 | filter_stderr; } 3>&1
# so stdout passes through, and pipefail keeps cmd's exit status.
filter_stderr() { grep -v 'is ignored' >&2 || true; }

if [[ ! -x "$PY" ]]; then
    if [[ -e "$VENV_DIR" ]]; then
        echo "install.sh: $VENV_DIR exists but has no bin/python; not a venv?" >&2
        exit 1
    fi
    echo "install.sh: creating virtual environment $VENV_DIR"
    "${PYTHON:-python3}" -m venv "$VENV_DIR"
fi

PY_VERSION="$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
if [[ "$PY_VERSION" != "$LOCK_PYTHON" ]]; then
    echo "install.sh: $VENV_DIR has Python $PY_VERSION; the lock ($LOCK) is for Python $LOCK_PYTHON." \
         "Remove it and set PYTHON=python$LOCK_PYTHON, or install outside the lock: pip install -e '.[test]'" >&2
    exit 1
fi

# Fast path: installed in this mode from this lock, pyproject.toml and script; only check.
if [[ -f "$STAMP" && "$STAMP" -nt pyproject.toml && "$STAMP" -nt "$LOCK" && "$STAMP" -nt scripts/install.sh ]] \
   && [[ "$(cat "$STAMP")" == "$MODE" ]]; then
    exec "$PY" scripts/check_env.py --allow-extra
fi

REQUIREMENTS="$LOCK"
if [[ "$MODE" == "own-torch" ]]; then
    if ! OWN_TORCH_VERSION="$("$PY" -c "import importlib.metadata as m; print(m.version('torch'))" 2>/dev/null)"; then
        echo "install.sh: HARNESS_OWN_TORCH=1 but torch is not installed in $VENV_DIR: install your torch first" >&2
        exit 1
    fi
    echo "install.sh: HARNESS_OWN_TORCH=1: keeping installed torch $OWN_TORCH_VERSION; the lock less torch"
    REQUIREMENTS="$(mktemp)"
    trap 'rm -f "$REQUIREMENTS"' EXIT
    # A lock entry is its `name==version \` line and the indented hash and comment lines under it.
    awk '/^[^ #]/ { skip = ($0 ~ /^torch==/) } !skip' "$LOCK" > "$REQUIREMENTS"
fi

echo "install.sh: installing the lock and vtp-harness into $VENV_DIR ($MODE)"
rm -f "$STAMP"
# --no-deps: the lock is the whole set (hash-checked); nothing outside it is resolved or fetched.
{ "$PY" -m pip install -q --no-deps --require-hashes -r "$REQUIREMENTS" 2>&1 1>&3 | filter_stderr; } 3>&1
# An egg-info folder left in the checkout by an older install shadows the installed metadata (its
# entry points) for anything run from the repository root: this install makes none, so remove it.
rm -rf "$REPO_ROOT"/*.egg-info
# The project itself, built with the lock's setuptools (no isolated build environment to resolve).
{ "$PY" -m pip install -q --no-deps --no-build-isolation -e . 2>&1 1>&3 | filter_stderr; } 3>&1

# lmms-eval and timm declare torchvision; the lock leaves it out (nothing here imports it). One that a
# user installed beside their own torch and that fails to import breaks transformers' LLaVA imports
# ("operator torchvision::nms does not exist"): remove it only then.
if "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('torchvision') is None)"; then
    if ! "$PY" -c "import torchvision" >/dev/null 2>&1; then
        echo "install.sh: uninstalling torchvision: it fails to import with this torch build (unused; it breaks transformers' LLaVA imports)"
        { "$PY" -m pip uninstall -q -y torchvision 2>&1 1>&3 | filter_stderr; } 3>&1
    fi
fi

"$PY" scripts/check_env.py --allow-extra
echo "$MODE" > "$STAMP"
echo "install.sh: done"
