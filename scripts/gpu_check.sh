#!/usr/bin/env bash
# On a machine with an NVIDIA GPU, TensorRT and cuda-python: export a random-init tiny model, build TensorRT plans
# (datacenter preset; fp32 and fp16), run `rsvlm-edge infer --backend trt` on a sample tile, and check that the fp32
# plans generate the same tokens as ONNX Runtime on the same graphs (fp16 answers are printed, not compared).
# Usage: bash scripts/gpu_check.sh [WORK_DIR]     (default: a temporary folder; ~1-3 minutes on one GPU)
set -euo pipefail
cd "$(dirname "$0")/.."
WORK="${1:-$(mktemp -d)}"
mkdir -p "$WORK"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}"

python3 - <<'EOF'
from rsvlm_edge.backends.trt_env import compute_capability, load_cudart, load_tensorrt
trt = load_tensorrt(); load_cudart()
print(f"TensorRT {trt.__version__}, GPU compute capability {compute_capability()}")
EOF
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true

echo "== export (random-init tiny, fp32 and fp16 ONNX)"
rsvlm-edge export --config tiny --random-init --no-check --overwrite "$WORK/onnx32"
rsvlm-edge export --config tiny --random-init --no-check --overwrite --precision fp16 "$WORK/onnx16"

echo "== build TensorRT plans (datacenter preset)"
python3 - "$WORK" <<'EOF'
import sys, time
from pathlib import Path
from rsvlm_edge.engines.trt_build import build_trt_engines
work = Path(sys.argv[1])
for precision, src in (("fp32", "onnx32"), ("fp16", "onnx16")):
    t0 = time.perf_counter()
    build_trt_engines(work / src, work / f"plans-{precision}", preset="datacenter", precision=precision,
                      timing_cache=work / "timing.cache")
    print(f"{precision}: built in {time.perf_counter() - t0:.1f} s")
EOF

echo "== sample tile"
python3 - "$WORK/tile.png" <<'EOF'
import sys
import numpy as np
from PIL import Image
Image.fromarray(np.random.default_rng(0).integers(0, 255, (160, 160, 3), dtype=np.uint8)).save(sys.argv[1])
EOF

echo "== rsvlm-edge infer --backend trt"
rsvlm-edge infer "$WORK/plans-fp16" "$WORK/tile.png" --task cap --backend trt --json --verbose --max-new-tokens 32
rsvlm-edge infer "$WORK/plans-fp32" "$WORK/tile.png" --prompt "Segment the water." --backend trt --json --max-new-tokens 32

echo "== fp32 plans vs ONNX Runtime (same tokens expected)"
python3 - "$WORK" <<'EOF'
import sys, time
from pathlib import Path
import numpy as np
from rsvlm_edge.backends.ort_backend import OrtBackend
from rsvlm_edge.backends.trt_backend import TrtBackend
from rsvlm_edge.generation import Generator, Request
from rsvlm_edge.sampling import SamplingConfig
from rsvlm_edge.tokenizer import Tokenizer
work = Path(sys.argv[1])
tok = Tokenizer.load(work / "onnx32" / "tokenizer.json")
rng = np.random.default_rng(1)
reqs = [Request([rng.normal(size=(3, 128, 128)).astype(np.float32)], "rgb", "[CAP] Describe the image."),
        Request([rng.normal(size=(2, 128, 128)).astype(np.float32)], "sar", "[VG] Locate the ship."),
        Request([rng.normal(size=(3, 128, 128)).astype(np.float32)] * 2, "rgb", "[CCD] What changed?")]
sampling = SamplingConfig(max_new_tokens=16)
ort, trt32, trt16 = OrtBackend.from_dir(work / "onnx32"), TrtBackend.from_dir(work / "plans-fp32"), TrtBackend.from_dir(work / "plans-fp16")
bad = 0
for r in reqs:
    want = Generator(ort, tok).generate([r], sampling)[0]
    t0 = time.perf_counter(); got = Generator(trt32, tok).generate([r], sampling)[0]; ms = (time.perf_counter() - t0) * 1e3
    half = Generator(trt16, tok).generate([r], sampling)[0]
    same = got.token_ids == want.token_ids
    bad += not same
    print(f"{r.prompt!r}: fp32 {'same' if same else 'DIFFERENT'} ({ms:.0f} ms); fp16 {half.token_ids == want.token_ids}")
print(trt32.stats())
sys.exit(1 if bad else 0)
EOF
echo "gpu_check: OK ($WORK)"
