#!/usr/bin/env bash
# Install everything the tests need (CPU torch from the local wheel, the project with its dev extras) and run them.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q torch==2.13.0
python3 -m pip install -q -e ".[dev]"
# TensorRT type stubs for tests/test_trt_typecheck.py; --no-deps: they pin tensorrt, which PyPI cannot install
python3 -m pip install -q --no-deps "tensorrt-stubs==10.13.0.35.1"
python3 -m pytest "$@"
