#!/usr/bin/env bash
# Usage: source scripts/setup_env.sh                 # .venv, with the versions in constraints.txt
#        STS_LATEST=1 source scripts/setup_env.sh    # .venv-latest, with the newest releases setup.cfg allows
# Creates the virtual environment (if missing) and installs sts_trainer with its test extras. torch is installed first
# as torch==2.13.0 when none is importable, so pip never pulls a multi-GB CUDA build on a CPU machine; the newest-
# releases environment keeps that torch too (only its CPU wheel lies on this kind of machine).
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -n "${STS_LATEST:-}" ]; then
    VENV="${STS_VENV:-$ROOT/.venv-latest}"
else
    VENV="${STS_VENV:-$ROOT/.venv}"
fi
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"
if ! python -c "import torch" >/dev/null 2>&1; then
    python -m pip install --quiet --upgrade pip
    python -m pip install --quiet torch==2.13.0
fi
if [ -n "${STS_LATEST:-}" ]; then
    TORCH_PIN="$(mktemp)"
    python -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > "$TORCH_PIN"
    python -m pip install --quiet --upgrade --upgrade-strategy eager -c "$TORCH_PIN" -e "$ROOT[test]"
    rm -f "$TORCH_PIN"
    python -m pip list 2>/dev/null | grep -iE '^(torch|transformers|accelerate|datasets|peft|evaluate|deepspeed|trl) '
elif ! python -c "import sts_trainer, pytest, deepspeed" >/dev/null 2>&1 \
        || [ "$ROOT/setup.cfg" -nt "$VENV/.sts_installed" ] || [ "$ROOT/constraints.txt" -nt "$VENV/.sts_installed" ]; then
    python -m pip install --quiet -c "$ROOT/constraints.txt" -e "$ROOT[test]"
    touch "$VENV/.sts_installed"
fi
