#!/usr/bin/env bash
# Train the dense heads ([DET], [OBB], [SEG] and change masks) of a trained demo run on its frozen trunk, in place:
# RUN/model gets dense_heads on, the heads' weights and dense_log.json. Re-running retrains them the same way (seeded).
set -euo pipefail
cd "$(dirname "$0")/.."
run="${1:-runs/tiny-demo}"
python3 -m rsvlm_edge.training.dense_train "$run/model" "$run/model" --threads "${THREADS:-2}"
