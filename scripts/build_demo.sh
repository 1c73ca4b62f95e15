#!/usr/bin/env bash
# Turn a trained run into the shipped demo model dir: ONNX engines + torch weights, eval report and model card.
set -euo pipefail
cd "$(dirname "$0")/.."
run="${1:-runs/tiny-demo}"
out="${2:-models/tiny-demo}"
rsvlm-edge export "$run/model" "$out" --overwrite
cp "$run/model/model.safetensors" "$run/model/train_config.json" "$run/train_log.jsonl" "$out/"
if [ -f "$run/model/dense_log.json" ]; then cp "$run/model/dense_log.json" "$out/"; fi
cmd="rsvlm-edge eval $out --backend ort --suite synthetic --suite router --suite grounding --suite aid --suite rsvqa_lr --suite levir_cd --suite detection --suite oriented --suite segmentation --suite change --suite sirst --suite hrsid --limit 600 --out $out/eval_report.json"
$cmd
python3 -m rsvlm_edge.training.model_card "$out" "$out/eval_report.json" "$cmd"
