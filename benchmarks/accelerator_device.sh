#!/usr/bin/env bash
# One call of the device tool runs the whole accelerator evidence suite and leaves its files in $OUT:
#
#   run(command="bash benchmarks/accelerator_device.sh", carry=["data/stdlib"], timeout_s=480)
#
# - Uses the image's python3 (jax 0.11 with its CUDA plugin, flax, optax, tokenizers; no grain: the suite's
#   path never imports it). Override with PYTHON=...
# - ACCEL_BUDGET_S (default 330) is the suite's wall budget: about 1.5 min of machine start + 6 min of run,
#   so a 15-minute device allowance leaves room to run it once more. 440 gives the full evidence in ~8 min.
# - data/stdlib (prepare it here first: python -m tidar_jax.data.prepare --out data/stdlib) is carried so the
#   device does not spend its time tokenizing; without it the suite prepares the device's own stdlib corpus.
# - Writes accelerator.json, accelerator.md, the PNGs and accelerator.log into $OUT (at most 8 files come back).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEST=${OUT:-benchmarks/results/accelerator}
mkdir -p "$DEST"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
"$PY" -c "import jax, jaxlib; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, jax.devices())" 2>&1 \
    | tee "$DEST/accelerator.log"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv 2>/dev/null | tee -a "$DEST/accelerator.log"
"$PY" -m benchmarks.accelerator --budget-s "${ACCEL_BUDGET_S:-330}" --out "$DEST" "$@" 2>&1 \
    | tee -a "$DEST/accelerator.log"
