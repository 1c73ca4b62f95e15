#!/usr/bin/env bash
# Install the torch-free runtime and run the shipped demo model on a sample tile with ONNX Runtime on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q -e .
tile="${1:-../shared/data/aid/Airport/airport_1.jpg}"
rsvlm-edge infer models/tiny-demo "$tile" --task cap --verbose
