#!/usr/bin/env bash
# Reproduce the shipped demo model (models/tiny-demo) from scratch on CPU; re-running resumes from the checkpoint.
# bf16 autocast is picked automatically on CPUs with AVX512-BF16/AMX (--precision auto); elsewhere it runs fp32,
# about twice as slow. VISION_STEPS (default 1000) is the encoder pre-training stage.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-runs/tiny-demo}"
rsvlm-edge train "$out" --config tiny --vision-steps "${VISION_STEPS:-1000}" --align-steps "${ALIGN_STEPS:-800}" --instruct-steps "${INSTRUCT_STEPS:-4600}" \
  --batch-size 24 --lr 1e-3 --threads 2 --seed 0 --save-every 200 \
  --token-pos-embed --box-pointer
bash scripts/train_dense.sh "$out"  # the dense heads on the frozen trunk (scripts/train_dense.sh)
