"""Peer harness: this project's engines against ONNX Runtime GenAI, llama.cpp and PyTorch eager on one random-init
Qwen2 decoder of the rsunivlm-1b shape (`rsvlm-edge bench-peers`, scripts/peers.sh; docs/benchmarks.md).

The table's parts (rounds, formatting, cpuinfo parsing, weight accounting) need none of the peers; building and
measuring need the ``peers`` extra."""
