"""Per-component ONNX export of the PyTorch reference model, with checks (installed as ``rsvlm_edge.export``).

Modules (importing this package is cheap: ``export_model`` etc. load torch only when first used):

* :mod:`~rsvlm_edge.export.exporter` - ``export_model(model, out_dir, tokenizer_file, ExportOptions(...))``: the
  engine directory (graphs, external data, manifest), staged in a temporary directory and moved into place.
* :mod:`~rsvlm_edge.export.components` - the exported views of the model and their IO specs (the split).
* :mod:`~rsvlm_edge.export.graph` - graph passes: weights with provenance, transpose/constant folding,
  LayerNormalization decomposition. :mod:`~rsvlm_edge.export.fp16` - FP16 conversion keeping FP32 islands.
* :mod:`~rsvlm_edge.export.static_shapes` - constant Reshape/Slice shapes from symbolic shape inference, so the
  traced shape arithmetic (a third of the decoder's kernels) is pruned.
* :mod:`~rsvlm_edge.export.weights` - external-data files (aligned layout, streamed sha256).
* :mod:`~rsvlm_edge.export.checks` - onnx.checker, strict shape inference, parity with PyTorch.
* :mod:`~rsvlm_edge.export.trt_check` - TensorRT 8.5 / 10.3 / 11 operator lists (``data/trt_supported_ops.json``)
  and INT64 rules; ``python -m rsvlm_edge.export.trt_check DIR`` prints a report.
* :mod:`~rsvlm_edge.export.compare` - per-component diffs and greedy token agreement between two backends.
* :mod:`~rsvlm_edge.export.cli` - the ``rsvlm-edge export`` command.

The ONNX graphs are produced by the TorchScript-based ``torch.onnx.export`` (``dynamo=False``) with parameters as
graph inputs and no constant folding, then cleaned by our own passes: it is fast (seconds for the tiny model, which
keeps tests quick), never renames, deduplicates or transposes a weight behind our back, and handles a zero-length
KV cache. The passes only rely on the ONNX graph, so switching to the dynamo exporter later is local to
:func:`~rsvlm_edge.export.exporter.trace_to_onnx`.
"""

from __future__ import annotations

__all__ = ["ExportOptions", "ExportResult", "export_model"]


def __getattr__(name: str):
    if name in __all__:
        from rsvlm_edge.export import exporter

        return getattr(exporter, name)
    raise AttributeError(name)
