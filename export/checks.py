"""Checks of written graphs: ONNX validity, TensorRT-friendliness, and parity with the PyTorch reference."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx

from rsvlm_edge.export.trt_check import check_trt

MIN_OPSET = 17


class ExportCheckError(RuntimeError):
    """An exported graph fails validation (checker, shape inference, TensorRT op lists, INT64, parity)."""


def check_graph_file(path: str | Path, trt_versions: list[str] | None = None) -> dict[str, Any]:
    """onnx.checker + strict full shape inference + opset >= 17 + TensorRT op/INT64 report. Raises on failure."""
    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < MIN_OPSET:
        raise ExportCheckError(f"{path.name}: opset {opset} < {MIN_OPSET}")
    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as exc:
        raise ExportCheckError(f"{path.name}: onnx.checker failed: {exc}") from None
    try:
        onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
    except Exception as exc:  # noqa: BLE001 - InferenceError and friends
        raise ExportCheckError(f"{path.name}: strict shape inference failed: {exc}") from None
    report = check_trt(model, path.name, trt_versions)
    if not report.ok:
        raise ExportCheckError(f"{path.name} is not TensorRT-friendly:\n{report.format()}")
    return {"opset": opset, "checker": "ok", "shape_inference": "ok", "trt": {v: "ok" for v in report.versions},
            "ops": report.ops}


# ----------------------------------------------------------------------------------------------- parity
def _session(path: Path, threads: int | None = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _max_diff(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ExportCheckError(f"output shape {a.shape} differs from the reference {b.shape}")
    if not np.isfinite(a).all():
        raise ExportCheckError("ONNX Runtime output has NaN/inf")
    return float(np.abs(a - b).max()) if a.size else 0.0


def parity_simple(path: Path, module, sample: tuple, input_names: list[str], threads: int | None = None) -> dict[str, float]:
    """Run the graph and the torch module on ``sample``; max abs diff per output and the reference's max |value|."""
    import torch

    sess = _session(path, threads)
    feeds = {n: t.numpy() for n, t in zip(input_names, sample)}
    got = sess.run(None, feeds)
    with torch.inference_mode():
        ref = module(*sample)
    ref = ref if isinstance(ref, (tuple, list)) else (ref,)
    return {"max_abs_diff": max(_max_diff(g, r.numpy()) for g, r in zip(got, ref)),
            "ref_max_abs": max(float(r.abs().max()) for r in ref)}


def parity_decoder(path: Path, model, expert: int, steps: int = 3, batch: int = 2, prompt: int = 5, seed: int = 0,
                   threads: int | None = None) -> dict[str, float]:
    """Prefill (empty past, left padding on row 0) then ``steps`` decode steps, each fed its own KV cache.

    Returns the max abs diff of logits and of new K/V over all steps, against ``RSVLM.decode`` with ``expert``
    (and, for models with a box pointer, of ``hidden_states`` against ``RSVLM.decode_hidden``).
    """
    import torch

    cfg = model.cfg
    sess = _session(path, threads)
    gen = torch.Generator().manual_seed(seed)
    total = prompt + steps
    mask = torch.ones(batch, total)
    mask[0, :2] = 0  # left padding on the first row
    positions = (mask.cumsum(-1) - 1).clamp(min=0).to(torch.int32)
    embeds = torch.randn(batch, total, cfg.hidden_size, generator=gen)
    kv_shape = (0, batch, cfg.num_kv_heads, cfg.head_dim)
    ort_past = [np.zeros(kv_shape, np.float32) for _ in range(2 * cfg.num_layers)]
    ref_past = model.empty_cache(batch)
    out = {"logits": 0.0, "kv": 0.0, "ref_logits_max_abs": 0.0}
    start = 0
    for length in [prompt] + [1] * steps:
        sl = slice(start, start + length)
        feeds = {"inputs_embeds": embeds[:, sl].numpy(), "position_ids": positions[:, sl].numpy(),
                 "attention_mask": mask[:, : start + length].numpy()}
        for i in range(cfg.num_layers):
            feeds[f"past_key_{i}"], feeds[f"past_value_{i}"] = ort_past[2 * i], ort_past[2 * i + 1]
        got = sess.run(None, feeds)
        with torch.inference_mode():
            logits, new = model.decode(embeds[:, sl], positions[:, sl].long(), mask[:, : start + length], ref_past, expert)
        out["logits"] = max(out["logits"], _max_diff(got[0], logits[:, -1].numpy()))
        out["ref_logits_max_abs"] = max(out["ref_logits_max_abs"], float(logits.abs().max()))
        if cfg.box_pointer:  # the extra output the box pointer reads
            with torch.inference_mode():
                hidden, _ = model.decode_hidden(embeds[:, sl], positions[:, sl].long(), mask[:, : start + length],
                                                ref_past, expert)
            out["hidden"] = max(out.get("hidden", 0.0), _max_diff(got[-1], hidden.numpy()))
        for i, (nk, nv) in enumerate(new):
            out["kv"] = max(out["kv"], _max_diff(got[1 + 2 * i], nk.numpy()), _max_diff(got[2 + 2 * i], nv.numpy()))
            ort_past[2 * i] = np.concatenate([ort_past[2 * i], got[1 + 2 * i]])
            ort_past[2 * i + 1] = np.concatenate([ort_past[2 * i + 1], got[2 + 2 * i]])
        ref_past = [(torch.cat([pk, nk]), torch.cat([pv, nv])) for (pk, pv), (nk, nv) in zip(ref_past, new)]
        start += length
    return out
