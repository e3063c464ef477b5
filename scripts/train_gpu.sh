#!/usr/bin/env bash
# The zoo's training on one GPU, in about 10 minutes for all three models: the three runs share the device at once
# (each is far too small to fill an H200 alone), each stops with a checkpoint after $MINUTES, then all are exported.
#   MINUTES=8 bash scripts/train_gpu.sh            # resumes each from checkpoints/<model>
#   EXTRA="--restart-from-ema" bash scripts/train_gpu.sh   # start a new phase from the committed EMA weights
# The same commands run on a CPU (with --threads 1); scripts/train.py's docstring has the options.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
MINUTES=${MINUTES:-8}
STEPS=${STEPS:-60000}          # the end of the learning-rate schedule; at batch 256 an H200 makes ~18 steps/s per run
BATCH=${BATCH:-256}
EXTRA=${EXTRA:-}
mkdir -p logs
pids=()
for model in fmnist-large fmnist-small fmnist-cond; do
  # shellcheck disable=SC2086
  "$PY" scripts/train.py --model "$model" --batch-size "$BATCH" --steps "$STEPS" --lr 1e-3 --save-every 2000 \
      --max-minutes "$MINUTES" $EXTRA > "logs/train-gpu-$model.log" 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
for model in fmnist-large fmnist-small fmnist-cond; do
  tail -c 400 "logs/train-gpu-$model.log"; echo
  "$PY" scripts/train.py --model "$model" --export
done
exit $status
