#!/usr/bin/env bash
# Install vtp-harness (editable, with test extras) into a virtual environment.
#
#   scripts/install.sh [VENV_DIR]      (default: .venv in the repository root)
#
# By default the install is CPU-only: constraints/cpu.txt pins torch to the local
# CPU wheel so no CUDA packages are pulled. Set HARNESS_OWN_TORCH=1 to skip that
# constraint when you have already installed your own (e.g. CUDA) torch in the venv
# (that torch version is then pinned instead, so pip does not replace it).
# Environment: PYTHON (interpreter used to create the venv, default python3).
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV_DIR="${1:-$REPO_ROOT/.venv}"
case "$VENV_DIR" in /*) ;; *) VENV_DIR="$PWD/$VENV_DIR" ;; esac
cd "$REPO_ROOT"

PY="$VENV_DIR/bin/python"
STAMP="$VENV_DIR/.vtp-harness-install.stamp"
CONSTRAINTS="constraints/cpu.txt"

if [[ "${HARNESS_OWN_TORCH:-0}" == "1" ]]; then
    MODE="own-torch"
    PIP_CONSTRAINT_ARGS=()
else
    MODE="cpu"
    PIP_CONSTRAINT_ARGS=(-c "$CONSTRAINTS")
fi

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

# Fast path: already installed in this mode and nothing relevant changed since.
if [[ -f "$STAMP" && "$STAMP" -nt pyproject.toml && "$STAMP" -nt "$CONSTRAINTS" ]] \
   && [[ "$(cat "$STAMP")" == "$MODE" ]]; then
    exit 0
fi

if [[ "$MODE" == "own-torch" ]]; then
    # Keep the user's torch: without a pin, pip may "upgrade" it to the newest CUDA
    # build from the index while resolving lmms-eval's torchvision dependency.
    if OWN_TORCH_VERSION="$("$PY" -c "import importlib.metadata as m; print(m.version('torch'))" 2>/dev/null)"; then
        OWN_CONSTRAINTS="$(mktemp)"
        trap 'rm -f "$OWN_CONSTRAINTS"' EXIT
        echo "torch==$OWN_TORCH_VERSION" > "$OWN_CONSTRAINTS"
        PIP_CONSTRAINT_ARGS=(-c "$OWN_CONSTRAINTS")
        echo "install.sh: HARNESS_OWN_TORCH=1: keeping installed torch $OWN_TORCH_VERSION"
    else
        echo "install.sh: warning: HARNESS_OWN_TORCH=1 but torch is not installed in $VENV_DIR;" \
             "pip will pick a torch from the index" >&2
    fi
fi

echo "install.sh: installing vtp-harness[test] into $VENV_DIR ($MODE)"
rm -f "$STAMP"
{ "$PY" -m pip install -q "${PIP_CONSTRAINT_ARGS[@]}" -e ".[test]" 2>&1 1>&3 | filter_stderr; } 3>&1

# lmms-eval declares torchvision, but nothing here needs it. The PyPI torchvision wheel
# is built against CUDA torch and fails to import with the CPU torch
# ("operator torchvision::nms does not exist"); transformers would then fail to import
# the LLaVA classes. Remove it only when it is installed and actually broken.
if "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('torchvision') is None)"; then
    if ! "$PY" -c "import torchvision" >/dev/null 2>&1; then
        echo "install.sh: uninstalling torchvision: it fails to import with this torch build (unused; it breaks transformers' LLaVA imports)"
        { "$PY" -m pip uninstall -q -y torchvision 2>&1 1>&3 | filter_stderr; } 3>&1
    fi
fi

echo "$MODE" > "$STAMP"
echo "install.sh: done"
