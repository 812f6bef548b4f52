#!/usr/bin/env bash
# Usage: source scripts/setup_env.sh
# Creates .venv (if missing) and installs sts_trainer with its extras. torch is installed first as torch==2.13.0
# when none is importable, so pip never pulls a multi-GB CUDA build on a CPU machine.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${STS_VENV:-$ROOT/.venv}"
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"
if ! python -c "import torch" >/dev/null 2>&1; then
    python -m pip install --quiet --upgrade pip
    python -m pip install --quiet torch==2.13.0
fi
if ! python -c "import sts_trainer, pytest, deepspeed" >/dev/null 2>&1 || [ "$ROOT/setup.cfg" -nt "$VENV/.sts_installed" ]; then
    python -m pip install --quiet -e "$ROOT[test]"
    touch "$VENV/.sts_installed"
fi
