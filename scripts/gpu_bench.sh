#!/usr/bin/env bash
# Usage, here (once, with the registry reachable):  bash scripts/gpu_bench.sh --prepare
#   downloads into .whl/ the wheels the device image lacks (transformers 5.24.0 for Python 3.12; the image has 5.17).
# Then one device call (the device tool's run), which ends inside 8 minutes, start and install included:
#   run(command="bash scripts/gpu_bench.sh", carry=[".whl"], timeout_s=480)
# It installs the wheels into /tmp/site, runs the LLaVA-1.5-7B profile of the benchmark on the GPU
# (python -m sts_trainer.lab.bench --profile llava-1.5-7b) and writes bench-gpu.json, bench-gpu.md and bench.log to
# $OUT (or to bench_results/gpu here). Commit the table as docs/bench-gpu.md with the device and versions it names.
set -eo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
WHEELS=(transformers==5.24.0)
if [ "${1:-}" = "--prepare" ]; then
    mkdir -p .whl
    for wheel in "${WHEELS[@]}"; do
        python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform any -d .whl "$wheel"
    done
    ls -la .whl
    exit 0
fi
OUT_DIR="${OUT:-$ROOT/bench_results/gpu}"
mkdir -p "$OUT_DIR"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, \
'cuda', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '')"
# 420 s for the benchmark itself: the call's start and the install take the rest of the 8 minutes
timeout 420 python3 -m sts_trainer.lab.bench --profile llava-1.5-7b --out "$OUT_DIR" "$@" 2>&1 | tee "$OUT_DIR/bench.log"
rm -rf "$OUT_DIR/scratch"
