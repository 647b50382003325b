#!/usr/bin/env bash
# Regenerate constraints/lock.txt: every package of the CPU install, transitive ones included, at an
# exact version with its hashes, resolved from pyproject.toml (the `test` extra) under
# constraints/cpu.txt (the CPU torch) by uv, a locking tool pinned below.
#
#   scripts/lock.sh            (from anywhere; writes constraints/lock.txt)
#
# A deliberate act: run it when pyproject.toml or constraints/cpu.txt changes, or to take newer
# releases on purpose; then run both README commands from a fresh clone (README: "The lock").
# The lock is for CPython 3.11 on Linux x86_64, the machine the CPU torch wheel is built for.
# torchvision is resolved but left out: lmms-eval and timm declare it, nothing here imports it, and
# the registry's wheel fails to import beside the CPU torch (scripts/install.sh, check_env.py).
set -euo pipefail

UV_VERSION="0.13.9"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOL_VENV="$REPO_ROOT/.cache/lock-tool"
cd "$REPO_ROOT"

if [[ ! -x "$TOOL_VENV/bin/uv" ]] || [[ "$("$TOOL_VENV/bin/uv" --version)" != "uv $UV_VERSION"* ]]; then
    echo "lock.sh: installing uv $UV_VERSION into $TOOL_VENV"
    "${PYTHON:-python3}" -m venv "$TOOL_VENV"
    "$TOOL_VENV/bin/python" -m pip install -q "uv==$UV_VERSION" 2>&1 | { grep -v 'is ignored' >&2 || true; }
fi

# The CPU torch wheel (torch==2.13.0+cpu) is not on the registry's index: it comes from a local
# wheel folder (pip's find-links; PIP_FIND_LINKS here) or the PyTorch CPU wheel index.
FIND_LINKS=()
for dir in ${PIP_FIND_LINKS:-/opt/wheels}; do
    [[ -d "$dir" ]] && FIND_LINKS+=(--find-links "$dir")
done

"$TOOL_VENV/bin/uv" pip compile pyproject.toml --extra test \
    --constraint constraints/cpu.txt "${FIND_LINKS[@]}" \
    --python-version 3.11 --python-platform x86_64-unknown-linux-gnu \
    --no-emit-package torchvision --generate-hashes \
    --custom-compile-command "scripts/lock.sh" \
    --output-file constraints/lock.txt "$@"
echo "lock.sh: wrote constraints/lock.txt ($(grep -c '^[A-Za-z0-9].*==' constraints/lock.txt) packages)"
