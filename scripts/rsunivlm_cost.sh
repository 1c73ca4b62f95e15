#!/usr/bin/env bash
# Disk, RAM and time of each step from an RSUniVLM checkpoint to answers: convert -> export -> build INT8
# (weight-only) -> infer (FP32 and INT8 engines), each under /usr/bin/time -v.
#
#   bash scripts/rsunivlm_cost.sh [SRC_DIR] [WORK_DIR]
#
# SRC_DIR: a downloaded liux-cyber/RSUniVLM folder. Without it, a full-shape synthetic checkpoint (RSUniVLM's exact key
# names, shapes and BF16 dtype, random weights; 3.3 GB) is written to WORK_DIR/src first. WORK_DIR (default
# /tmp/rsunivlm-cost) needs about 20 GB free. Prints one line per step and the machine it ran on.
set -euo pipefail
SRC=${1:-}
WORK=${2:-/tmp/rsunivlm-cost}
mkdir -p "$WORK"
rm -rf "$WORK/model" "$WORK/engines" "$WORK/engines-int8"

step() {  # step NAME COMMAND...: run it, keep its output in WORK/NAME.log, print wall time and peak RSS
  local name=$1; shift
  /usr/bin/time -v -o "$WORK/$name.time" "$@" > "$WORK/$name.log" 2>&1 || { cat "$WORK/$name.log"; exit 1; }
  printf '%-12s %10s wall  %8.0f MB peak RSS\n' "$name" "$(awk '/Elapsed \(wall/ {print $NF}' "$WORK/$name.time")" \
    "$(awk '/Maximum resident/ {print $NF / 1024}' "$WORK/$name.time")"
}

if [[ -z "$SRC" ]]; then
  SRC="$WORK/src"
  [[ -f "$SRC/model.safetensors" ]] || python3 -c "import sys
from rsvlm_edge.export.rsunivlm_testing import make_rsunivlm_checkpoint
make_rsunivlm_checkpoint(sys.argv[1], full=True)" "$SRC"
fi
python3 -c "import sys
import numpy as np
from PIL import Image
Image.fromarray(np.random.default_rng(0).integers(0, 255, (512, 512, 3), dtype=np.uint8)).save(sys.argv[1])" "$WORK/tile.png"

step convert rsvlm-edge convert rsunivlm "$SRC" "$WORK/model" --no-progress
step export rsvlm-edge export "$WORK/model" "$WORK/engines"
step build-int8 rsvlm-edge build "$WORK/engines" "$WORK/engines-int8" --precision int8 --scheme weight-only
step infer-fp32 rsvlm-edge infer "$WORK/engines" "$WORK/tile.png" --task vg --prompt "the ship" --max-new-tokens 8 -v
step infer-int8 rsvlm-edge infer "$WORK/engines-int8" "$WORK/tile.png" --task vg --prompt "the ship" --max-new-tokens 8 -v
du -sh "$SRC" "$WORK/model" "$WORK/engines" "$WORK/engines-int8"
grep -h "vision\|first token" "$WORK/infer-fp32.log" "$WORK/infer-int8.log" || true
echo "machine: $(lscpu | awk -F: '/Model name/ {gsub(/^ +/, "", $2); print $2}'), $(nproc) cores," \
  "$(grep -o -w -E 'avx2|avx512f|avx512_vnni|avx_vnni|amx_int8|asimddp' /proc/cpuinfo | sort -u | tr '\n' ' ')"
