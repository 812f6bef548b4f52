#!/usr/bin/env bash
# Usage: bash scripts/test.sh [pytest args]
# Sets up .venv if needed (see scripts/setup_env.sh) and runs the whole test suite.
set -eo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python -m pytest "$@"
