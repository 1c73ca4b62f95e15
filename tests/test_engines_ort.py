"""`rsvlm-edge build --target ort` (fp32 optimized, int8 from a table), the trt delegation's errors, eval --compare."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from rsvlm_edge.backends.ort_backend import OrtBackend
from rsvlm_edge.cli import main
from rsvlm_edge.generation import Generator, Request
from rsvlm_edge.manifest import Manifest
from rsvlm_edge.pipeline import load_tokenizer
from rsvlm_edge.sampling import SamplingConfig


@pytest.fixture(scope="module")
def table(fp32_export, tmp_path_factory):
    from PIL import Image

    from rsvlm_edge.calibration.calibrate import run_calibration
    from rsvlm_edge.calibration.table import save_table

    folder = tmp_path_factory.mktemp("tiles-build")
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(folder / f"t{i}.png")
    amax, meta = run_calibration(fp32_export, [folder], "minmax", threads=1, decode_steps=1, progress=False)
    return save_table(folder / "calibration.json", amax, **meta)


def tokens(engine_dir, prompt="[CAP] Describe the image.", n=6):
    gen = Generator(OrtBackend.from_dir(engine_dir, threads=1), load_tokenizer(engine_dir))
    px = np.random.default_rng(5).normal(size=(3, 128, 128)).astype(np.float32)
    return gen.generate([Request([px], "rgb", prompt)], SamplingConfig(max_new_tokens=n, ignore_stop=True))[0].token_ids


def prefill_logits(engine_dir, prompt="[CAP] Describe the image.") -> np.ndarray:
    from rsvlm_edge.training.compare import prefill

    gen = Generator(OrtBackend.from_dir(engine_dir, threads=1), load_tokenizer(engine_dir))
    request = Request([np.random.default_rng(5).normal(size=(3, 128, 128)).astype(np.float32)], "rgb", prompt)
    return prefill(gen, request, expert=0)[1][0]


def logit_error(engine_dir, reference_dir) -> float:
    """Distance of the first step's logits from the reference engine's, relative to their spread."""
    a, b = prefill_logits(reference_dir), prefill_logits(engine_dir)
    return float(np.linalg.norm(b - a) / np.linalg.norm(a - a.mean()))


def test_build_ort_fp32_optimized_same_tokens(fp32_export, tmp_path):
    out = tmp_path / "opt"
    res = CliRunner().invoke(main, ["build", str(fp32_export), str(out), "--target", "ort", "--precision", "fp32"])
    assert res.exit_code == 0, res.output
    man = Manifest.load(out)
    assert man.component("vision_encoder").extra["ort_optimization"] == "basic"
    assert (out / "decoder_trunk.bin").read_bytes() == (fp32_export / "decoder_trunk.bin").read_bytes()
    assert tokens(out) == tokens(fp32_export)


def test_build_ort_int8_from_table(fp32_export, table, tmp_path):
    out = tmp_path / "int8"
    res = CliRunner().invoke(main, ["build", str(fp32_export), str(out), "--precision", "int8", "--calibration", str(table)])
    assert res.exit_code == 0, res.output
    man = Manifest.load(out)
    assert man.component("decoder_expert1").precision == "int8"
    assert man.extra["quantization"]["activation_dtype"] == "uint8"
    assert len(tokens(out)) == 6
    # INT8 decoders prepack their weights by default (ORT's integer GEMM would repack them on every call);
    # FP32 ones do not (a packed copy of the trunk per expert session); both can be overridden
    assert OrtBackend.from_dir(out, verify=False).prepack_weights is True
    assert OrtBackend.from_dir(fp32_export, verify=False).prepack_weights is False
    assert OrtBackend.from_dir(out, verify=False, prepack_weights=False).prepack_weights is False
    unpacked = Generator(OrtBackend.from_dir(out, threads=1, prepack_weights=False), load_tokenizer(out))
    px = np.random.default_rng(5).normal(size=(3, 128, 128)).astype(np.float32)
    same = unpacked.generate([Request([px], "rgb", "[CAP] Describe the image.")],
                             SamplingConfig(max_new_tokens=6, ignore_stop=True))[0].token_ids
    assert same == tokens(out)


def test_build_int8_lm_head_fp32_and_int8_activations(fp32_export, table, tmp_path):
    import onnx

    out = tmp_path / "int8-trt"
    res = CliRunner().invoke(main, ["build", str(fp32_export), str(out), "--precision", "int8", "--calibration", str(table),
                                    "--activations", "int8", "--keep-lm-head"])
    assert res.exit_code == 0, res.output
    g = onnx.load(str(out / "decoder_expert0.onnx"), load_external_data=False)
    lm = [n for n in g.graph.node if n.op_type == "MatMul" and "lm_head" in n.name]
    assert lm and all(not i.endswith("_dq") for n in lm for i in n.input)
    zps = [i for i in g.graph.initializer if i.name.endswith("_act_zero_point")]
    assert zps and all(i.data_type == onnx.TensorProto.INT8 for i in zps)
    # the FP32 lm_head (hidden x vocab) dominates the tiny trunk, so it stays well above the 0.3x of an all-INT8 trunk
    assert (out / "decoder_trunk.bin").stat().st_size > 0.5 * (fp32_export / "decoder_trunk.bin").stat().st_size
    assert len(tokens(out)) == 6


def test_build_errors(fp32_export, tmp_path):
    runner = CliRunner()
    res = runner.invoke(main, ["build", str(fp32_export), str(tmp_path / "x"), "--precision", "int8"])
    assert res.exit_code == 1 and "--calibration" in res.output
    res = runner.invoke(main, ["build", str(fp32_export), str(tmp_path / "x"), "--precision", "fp16"])
    assert res.exit_code == 2 and "fp32 or int8" in res.output
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    res = runner.invoke(main, ["build", str(fp32_export), str(tmp_path / "x"), "--precision", "int8", "--calibration", str(bad)])
    assert res.exit_code == 1 and "calibration table" in res.output
    assert not (tmp_path / "x").exists()
    res = runner.invoke(main, ["build", "--help"])
    assert res.exit_code == 0 and "orin-agx" in res.output


def test_build_trt_without_tensorrt_is_a_clear_error(fp32_export, tmp_path):
    try:
        from rsvlm_edge.backends.trt_env import load_tensorrt

        load_tensorrt()
        pytest.skip("a real TensorRT is installed")
    except Exception:  # noqa: BLE001 - any failure means "no TensorRT here"
        pass
    res = CliRunner().invoke(main, ["build", str(fp32_export), str(tmp_path / "t"), "--target", "trt",
                                    "--preset", "orin-nano", "--precision", "fp16"])
    assert res.exit_code == 2, res.output
    assert res.output.startswith("Error: ") and len(res.output.strip().splitlines()) == 1
    assert not isinstance(res.exception, ImportError)


def test_eval_compare_same_dir_agrees(fp32_export, tmp_path):
    out = tmp_path / "cmp.json"
    # 10 samples reach grammar-constrained tags and the pointer: agreement is counted under the grammar, and
    # head-written answers by their text
    res = CliRunner().invoke(main, ["eval", "--compare", str(fp32_export), str(fp32_export), "--suite", "synthetic",
                                    "--limit", "10", "--threads", "1", "--out", str(out)])
    assert res.exit_code == 0, res.output
    report = json.loads(out.read_text())
    assert report["synthetic/token_agreement"] == 1.0 and report["all/token_agreement"] == 1.0
    deltas = [v["delta"] for v in report.values() if isinstance(v, dict)]
    assert deltas and all(d == 0 for d in deltas)
    assert "B - A" in res.output


def test_eval_argument_errors(fp32_export):
    runner = CliRunner()
    assert runner.invoke(main, ["eval"]).exit_code == 2
    assert runner.invoke(main, ["eval", str(fp32_export), "--compare", str(fp32_export), str(fp32_export)]).exit_code == 2


def test_blockwise_int8_round_trip_and_matmulnbits_semantics():
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from rsvlm_edge.calibration.weight_only import blockwise_int8, dequantize_blockwise

    rng = np.random.default_rng(0)
    k, n, block = 200, 24, 64  # K not a whole number of blocks: the last block is zero-padded
    w = rng.standard_normal((k, n)).astype(np.float32)
    codes, scales = blockwise_int8(w, block)
    assert codes.shape == (n, 4, block) and codes.dtype == np.uint8 and scales.shape == (n, 4)
    back = dequantize_blockwise(codes, scales, k)
    assert np.abs(back - w).max() <= scales.max() / 2 + 1e-6  # at most half a step per block
    x = rng.standard_normal((2, 3, k)).astype(np.float32)
    node = helper.make_node("MatMulNBits", ["x", "c", "s"], ["y"], domain="com.microsoft", K=k, N=n, bits=8,
                            block_size=block, accuracy_level=0)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(codes, "c"), numpy_helper.from_array(scales, "s")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 8
    y = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(y, x @ back, rtol=1e-4, atol=1e-4)  # ORT reads the codes exactly as written
    with pytest.raises(ValueError, match="block size"):
        blockwise_int8(w, 100)


def test_build_ort_int8_weight_only(fp32_export, tmp_path):
    import onnx

    out = tmp_path / "int8w"
    res = CliRunner().invoke(main, ["build", str(fp32_export), str(out), "--precision", "int8", "--scheme", "weight-only",
                                    "--block-size", "64"])
    assert res.exit_code == 0, res.output
    assert "weight-only" in res.output
    man = Manifest.load(out)
    assert man.component("decoder_expert2").precision == "int8"
    assert man.extra["quantization"]["weight_block_size"] == 64
    g = onnx.load(str(out / "decoder_expert0.onnx"), load_external_data=False)
    ops = [n.op_type for n in g.graph.node]
    layers = man.model_config["num_layers"]
    # q/k/v (bias folded) and gate/up are stacked: qkv, o, gate-up, down per layer, plus the lm_head; only gate/up
    # is split again (attention reads the packed q/k/v)
    assert ops.count("MatMulNBits") == 4 * layers + 1 and ops.count("Split") == layers
    assert "DequantizeLinear" not in ops and "QuantizeLinear" not in ops
    # ORT-only graphs also get the attention fusion: one GroupQueryAttention (rotary inside) per layer
    assert ops.count("GroupQueryAttention") == layers and "Neg" not in ops and "Softmax" not in ops
    # and each residual add + the RMSNorm after it become one node (all but the first layer's input norm and the
    # final norm, which reads only the last position)
    assert ops.count("SkipSimplifiedLayerNormalization") == 2 * layers - 1 and ops.count("Pow") == 2
    assert man.extra["quantization"]["components"]["decoder_expert0"]["fused"] == {
        "stacked_matmuls": 2 * layers, "attention": layers, "skip_rms_norm": 2 * layers - 1}
    # the embedding and other graphs have no attention: they keep what they had
    assert "attention" not in man.extra["quantization"]["components"]["embedding"].get("fused", {})
    # trunk shared, experts swapped: same split as the FP32 export, weights about a quarter of the FP32 bytes
    for f in ("decoder_trunk.bin", "decoder_expert1.bin"):
        assert (out / f).stat().st_size < 0.35 * (fp32_export / f).stat().st_size
    assert OrtBackend.from_dir(out, verify=False).prepack_weights is True
    # close to FP32. Not compared by greedy tokens: a random-init model's top logits nearly tie, so any rounding
    # (here 1.6% of the logits' spread) may swap them
    assert logit_error(out, fp32_export) < 0.05


def test_build_weight_only_no_stack_keeps_one_node_per_weight(fp32_export, table, tmp_path):
    import onnx

    out = tmp_path / "int8w-flat"
    res = CliRunner().invoke(main, ["build", str(fp32_export), str(out), "--precision", "int8", "--scheme", "weight-only",
                                    "--no-stack"])
    assert res.exit_code == 0, res.output
    man = Manifest.load(out)
    ops = [n.op_type for n in onnx.load(str(out / "decoder_expert0.onnx"), load_external_data=False).graph.node]
    layers = man.model_config["num_layers"]
    assert ops.count("MatMulNBits") == 7 * layers + 1 and "Split" not in ops  # q, k, v, o, gate, up, down + lm_head
    assert not any("stacked" in f for f in man.extra["quantization"]["fusions"])
    assert "stacked_matmuls" not in man.extra["quantization"]["components"]["decoder_expert0"]["fused"]
    assert logit_error(out, fp32_export) < 0.05
    res = CliRunner().invoke(main, ["build", str(fp32_export), str(tmp_path / "qdq"), "--precision", "int8",
                                    "--calibration", str(table), "--no-stack"])
    assert res.exit_code == 1 and "--no-stack applies to --scheme weight-only" in res.output


def test_stacked_matmulnbits_match_the_separate_products():
    """Products reading one activation are stacked along N (bias folded) only when their weights may share a file,
    and the stacked graph computes what the separate MatMulNBits do."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from rsvlm_edge.calibration.weight_only import quantize_weight_only

    rng = np.random.default_rng(0)
    k = 64
    weights = {"wq": rng.standard_normal((k, 32)), "wk": rng.standard_normal((k, 16)), "wx": rng.standard_normal((k, 8)),
               "bq": rng.standard_normal(32), "bk": rng.standard_normal(16)}
    weights = {n: w.astype(np.float32) for n, w in weights.items()}
    nodes = [helper.make_node("MatMul", ["x", "wq"], ["q0"], name="q"), helper.make_node("Add", ["q0", "bq"], ["q"]),
             helper.make_node("MatMul", ["x", "wk"], ["k0"], name="k"), helper.make_node("Add", ["bk", "k0"], ["k"]),
             helper.make_node("MatMul", ["x", "wx"], ["other"], name="other")]
    inits = []
    for name, w in weights.items():
        t = onnx.TensorProto(name=name, data_type=TensorProto.FLOAT, dims=w.shape)
        t.data_location = TensorProto.EXTERNAL
        inits.append(t)
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, k])],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in ("q", "k", "other")],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8

    def run(q) -> list[np.ndarray]:
        for init in q.model.graph.initializer:
            if init.name in q.tensors:
                init.CopyFrom(onnx.numpy_helper.from_array(q.tensors[init.name][0], init.name))
        sess = ort.InferenceSession(q.model.SerializeToString(), providers=["CPUExecutionProvider"])
        return sess.run(None, {"x": x})

    x = rng.standard_normal((1, 3, k)).astype(np.float32)
    separate = quantize_weight_only(model, weights, block_size=32, fuse=False)
    stacked = quantize_weight_only(model, weights, block_size=32, file_of=lambda w: "expert" if w == "wx" else "trunk")
    ops = [n.op_type for n in stacked.model.graph.node]
    assert ops.count("MatMulNBits") == 2 and ops.count("Split") == 1 and "Add" not in ops  # q+k stacked, biases folded
    assert stacked.fused == {"stacked_matmuls": 1} and stacked.weights_quantized == 3
    assert {origin for _, origin in stacked.tensors.values()} == {"wq", "bq", "wx"}  # files follow the first member
    for a, b in zip(run(separate), run(stacked)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    everything = quantize_weight_only(model, weights, block_size=32)  # one file
    assert [n.op_type for n in everything.model.graph.node].count("MatMulNBits") == 1  # x read once: all three
    assert sum(n.op_type == "Add" for n in everything.model.graph.node) == 2  # wx has no bias: none is folded


def test_rope_tables_match_the_model():
    import torch

    from rsvlm_edge.engines.ort_fusions import rope_tables
    from rsvlm_edge.modeling.model import rope_cos_sin

    cos, sin = rope_tables(16, 10000.0, 50)
    ref_cos, ref_sin = rope_cos_sin(torch.arange(50)[None], 16, 10000.0)
    np.testing.assert_allclose(cos, ref_cos[0, 0, :, :8].numpy(), atol=1e-6)
    np.testing.assert_allclose(sin, ref_sin[0, 0, :, 8:].numpy(), atol=1e-6)


def test_weight_only_refuses_a_table_and_trt(fp32_export, table, tmp_path):
    out = tmp_path / "int8w"
    res = CliRunner().invoke(main, ["build", str(fp32_export), str(out), "--precision", "int8", "--scheme", "weight-only",
                                    "--calibration", str(table)])
    assert res.exit_code == 1 and "needs no --calibration" in res.output and not out.exists()
    from rsvlm_edge.engines.ort_build import build_ort
    from rsvlm_edge.engines.trt_build import TrtBuildError, build_trt_engines

    build_ort(fp32_export, out, "int8", scheme="weight-only")
    with pytest.raises(TrtBuildError, match="MatMulNBits"):
        build_trt_engines(out, tmp_path / "plans")
