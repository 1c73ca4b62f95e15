"""`rsvlm-edge bench`: ONNX Runtime engines and the PyTorch eager reference measured side by side, on the same
weights and prompts, against the machine's own memory-bandwidth and GEMM limits (installed as ``rsvlm_edge.bench``).

Torch-free except :mod:`rsvlm_edge.bench.worker` running the torch backend, which happens in its own subprocess.
"""
