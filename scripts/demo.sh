#!/usr/bin/env bash
# Usage: bash scripts/demo.sh [sts_trainer.lab.demo args]
# Sets up .venv if needed (see scripts/setup_env.sh) and runs the embedded demo: a tiny LLaVA trained in two stages
# with STS (alignment with VTC, instruction tuning with LDS), no downloads.
set -eo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python -m sts_trainer.lab.demo "$@"
