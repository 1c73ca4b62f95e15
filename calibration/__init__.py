"""INT8 calibration on sample tiles (torch-free: numpy, onnx, onnxruntime).

Modules: ``samples`` (tiles + every task's instruction), ``collect`` (record real feeds through the ORT backend,
measure tensor ranges), ``ranges`` (entropy / percentile / minmax), ``qdq`` (explicit Q/DQ graph rewrite),
``int8_writer`` (the INT8 engine dir in the export's trunk/expert layout), ``table`` (calibration.json and
TensorRT caches), ``calibrate`` + ``cli`` (`rsvlm-edge calibrate`).
"""
