#!/usr/bin/env bash
# The peer table of docs/benchmarks.md: install the peers, build llama.cpp, run `rsvlm-edge bench-peers`.
#
#   bash scripts/peers.sh [WORK_DIR] [bench-peers options...]
#
# WORK_DIR (default /tmp/rsvlm-peers, about 20 GB) keeps the decoder, every engine and llama.cpp's sources, so a
# second run only measures. llama-cpp-python is built from its source release (no prebuilt binary for this CPU's
# ISA): about 15 minutes on 2 cores, run under `nice` with one compile job so the machine stays usable. The same
# release's vendored llama.cpp provides convert_hf_to_gguf.py. Nothing else is downloaded: no weights.
# Example: bash scripts/peers.sh /tmp/rsvlm-peers --rounds 3 --threads 2 --json bench/results/peers.json
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-/tmp/rsvlm-peers}
shift || true
LLAMA_CPP_PYTHON=${LLAMA_CPP_PYTHON:-0.3.36}
mkdir -p "$WORK"

python3 -m pip install -q -e ".[dev]" "onnxruntime-genai>=0.18" "gguf>=0.17" \
  "sentencepiece>=0.1.98,<0.3.0"

SRC="$WORK/llama_cpp_python-$LLAMA_CPP_PYTHON"
if [[ ! -f "$SRC/vendor/llama.cpp/convert_hf_to_gguf.py" ]]; then
  python3 -m pip download -q --no-deps --no-binary :all: -d "$WORK" "llama-cpp-python==$LLAMA_CPP_PYTHON"
  tar -xzf "$WORK/llama_cpp_python-$LLAMA_CPP_PYTHON.tar.gz" -C "$WORK"
fi
if ! python3 -c "import llama_cpp" 2>/dev/null; then
  # GGML_NATIVE: kernels for this CPU's ISA, as a llama.cpp user builds it; the rest of llama.cpp is not needed
  CMAKE_BUILD_PARALLEL_LEVEL=1 CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF \
-DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF" \
    nice -n 10 python3 -m pip install --no-cache-dir "$SRC"
fi

nice -n 10 rsvlm-edge bench-peers --work "$WORK" --llama-cpp "$SRC" "$@"
