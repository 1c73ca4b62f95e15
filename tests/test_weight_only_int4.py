"""`rsvlm-edge build --precision int4`: INT4 weight-only decoders from onnxruntime's MatMulNBits quantizer.

The numeric bounds come from the quantization step, not from this CPU's floats: a 4-bit code is at most one step
(the block's scale) from the weight it stands for, and with ``accuracy_level`` 4 the kernel also rounds each block
of activations to INT8 (half an activation step per element); both bounds hold whatever kernel a CPU dispatches to.
"""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from rsvlm_edge.backends.ort_backend import OrtBackend
from rsvlm_edge.calibration.weight_only import BlockCodes, WeightScheme, ort_block_quant
from rsvlm_edge.cli import main
from rsvlm_edge.manifest import Manifest, ManifestError

SCHEMES = [WeightScheme(bits=4, block_size=32), WeightScheme(bits=4, block_size=32, symmetric=False),
           WeightScheme(bits=4, block_size=64, symmetric=False, method="hqq")]


@pytest.fixture(scope="module")
def int4_dir(fp32_export, tmp_path_factory):
    out = tmp_path_factory.mktemp("int4") / "int4"
    res = CliRunner().invoke(main, ["build", str(fp32_export), str(out), "--precision", "int4", "--block-size", "32"])
    assert res.exit_code == 0, res.output
    assert "int4 (weight-only)" in res.output
    return out


def nibbles(packed: np.ndarray) -> np.ndarray:
    """uint8 bytes -> their 4-bit codes, low nibble first (MatMulNBits' order)."""
    return np.stack([packed & 15, packed >> 4], -1).reshape(*packed.shape[:-1], -1)


def dequantize(b: BlockCodes, k: int, scheme: WeightScheme) -> tuple[np.ndarray, np.ndarray]:
    """The (K, N) weight the codes stand for, and each weight's step (its block's |scale|: symmetric scales carry
    the sign of the block's largest-magnitude weight, so that one maps to code -8 exactly)."""
    q = nibbles(b.codes).astype(np.float32)  # (N, K_blocks, block)
    n, blocks = q.shape[:2]
    if b.zero_points is None:
        zero = np.full((n, blocks), 8.0, np.float32)  # symmetric INT4: the kernel's implied zero point
    elif b.zero_points.dtype == np.uint8:
        zero = nibbles(b.zero_points)[:, :blocks].astype(np.float32)
    else:
        zero = b.zero_points  # HQQ: a float zero point per block
    w = ((q - zero[..., None]) * b.scales[..., None]).reshape(n, -1)[:, :k].T
    step = np.repeat(np.abs(b.scales), scheme.block_size, axis=1)[:, :k].T
    return w, step


def matmulnbits(b: BlockCodes, k: int, n: int, scheme: WeightScheme, accuracy_level: int):
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    inits = [numpy_helper.from_array(b.codes, "c"), numpy_helper.from_array(b.scales, "s")]
    if b.zero_points is not None:
        inits.append(numpy_helper.from_array(b.zero_points, "z"))
    node = helper.make_node("MatMulNBits", ["x", "c", "s"] + (["z"] if b.zero_points is not None else []), ["y"],
                            domain="com.microsoft", K=k, N=n, bits=4, block_size=scheme.block_size,
                            accuracy_level=accuracy_level)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 8
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: f"{s.method}-{'sym' if s.symmetric else 'asym'}-{s.block_size}")
def test_int4_codes_are_within_one_step_and_matmulnbits_reads_them_as_written(scheme):
    rng = np.random.default_rng(0)
    k, n = 200, 24  # K not a whole number of blocks: the last block is zero-padded
    w = rng.standard_normal((k, n)).astype(np.float32)
    codes = ort_block_quant(w, scheme)
    assert codes.codes.dtype == np.uint8 and codes.codes.shape == (n, -(-k // scheme.block_size), scheme.block_size // 2)
    back, step = dequantize(codes, k, scheme)
    # round to nearest is half a step; HQQ moves the zero point off the rounded one: never more than one step
    assert np.all(np.abs(back - w) <= step * (1 + 1e-5))
    x = rng.standard_normal((5, k)).astype(np.float32)
    exact = matmulnbits(codes, k, n, scheme, accuracy_level=0).run(None, {"x": x})[0]
    np.testing.assert_allclose(exact, x @ back, rtol=1e-4, atol=1e-4)
    # accuracy_level 4 rounds each block of x to INT8 (step amax / 127): at most half that step per element
    y = matmulnbits(codes, k, n, scheme, accuracy_level=4).run(None, {"x": x})[0]
    blocks = -(-k // scheme.block_size)
    xp = np.zeros((5, blocks * scheme.block_size), np.float32)
    xp[:, :k] = x
    half_step = np.repeat(np.abs(xp.reshape(5, blocks, -1)).max(-1) / 127 / 2, scheme.block_size, axis=1)[:, :k]
    bound = half_step @ np.abs(back) + 1e-4 * (np.abs(x) @ np.abs(back))
    assert np.all(np.abs(y - x @ back) <= bound)


def test_hqq_and_symmetric_int8_options_are_checked():
    with pytest.raises(ValueError, match="HQQ"):
        WeightScheme(bits=4, method="hqq", symmetric=True)
    with pytest.raises(ValueError, match="block size"):
        WeightScheme(bits=4, block_size=48)
    with pytest.raises(ValueError, match="bits"):
        WeightScheme(bits=3)


def test_int4_engine_keeps_the_expert_split_and_records_its_scheme(fp32_export, int4_dir):
    import onnx

    man = Manifest.load(int4_dir)  # every file against its sha256
    layers = man.model_config["num_layers"]
    assert {man.component(n).precision for n in man.experts.decoders} == {"int4"}
    assert man.component("vision_encoder").precision == "int8"  # compute-bound once per tile: INT8 weights
    quant = man.extra["quantization"]
    assert quant["precision"] == "int4" and quant["weight_bits"] == 4 and quant["weight_block_size"] == 32
    assert quant["decoder_weights"]["bits"] == 4 and quant["decoder_weights"]["symmetric"] is False
    assert quant["decoder_weights"]["method"] == "rtn" and "onnxruntime" in quant["decoder_weights"]["quantizer"]
    assert quant["other_weights"]["bits"] == 8
    # one trunk file, one file per expert, one tensor layout for every expert file
    trunk = man.experts.trunk
    assert trunk is not None and man.experts.expert_files and man.experts.expert_tensors
    assert len(man.experts.expert_files) == man.model_config["num_experts"]
    roles = [t.extra.get("quantization") for t in [*trunk.tensors.values(), *man.experts.expert_tensors.values()]]
    # every 4-bit weight has a scale and a zero point; the lm_head is INT8 (one scale per block, no zero point)
    assert roles.count("int4") + roles.count("int8") == roles.count("scale") == roles.count("zero_point") + 1 > 1
    assert roles.count("int8") == 1 and quant["lm_head"] == "int8"
    for e, name in enumerate(man.experts.decoders):
        assert set(man.component(name).sha256) == {f"{name}.onnx", trunk.file, man.experts.expert_files[e]}
    # 4-bit codes + an FP32 scale and a 4-bit zero point per 32 weights: about 5.1 bits per weight, 0.16 of FP32;
    # the trunk also holds the INT8 lm_head (8.25 bits per weight)
    for f, bound in ((man.experts.expert_files[1], 0.2), (trunk.file, 0.3)):
        assert (int4_dir / f).stat().st_size < bound * (fp32_export / f).stat().st_size
    nodes = onnx.load(str(int4_dir / "decoder_expert0.onnx"), load_external_data=False).graph.node
    nbits = [n for n in nodes if n.op_type == "MatMulNBits"]
    assert len(nbits) == 4 * layers + 1  # qkv, o, gate-up (stacked), down per layer, and the lm_head
    for node in nbits:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if "lm_head" in node.name:  # INT8 per block of 128, symmetric (--lm-head-bits 8, the default)
            assert attrs["bits"] == 8 and attrs["block_size"] == 128 and len(node.input) == 3
            continue
        assert attrs["bits"] == 4 and attrs["block_size"] == 32 and attrs["accuracy_level"] == 4
        assert len(node.input) >= 4 and node.input[3].endswith("_zero_points")
    encoder = onnx.load(str(int4_dir / "vision_encoder.onnx"), load_external_data=False).graph.node
    encoder_ops = {n.op_type for n in encoder}  # the default encoder kernel: per-channel INT8 on the integer GEMM
    assert "DynamicQuantizeMatMul" in encoder_ops and "MatMulNBits" not in encoder_ops
    assert quant["other_weights"]["kernel"] == "DynamicQuantizeMatMul"
    assert OrtBackend.from_dir(int4_dir, verify=False).prepack_weights is True


def test_an_altered_int4_expert_file_is_refused(int4_dir, tmp_path):
    import shutil

    copy = tmp_path / "int4"
    shutil.copytree(int4_dir, copy)
    expert = copy / Manifest.load(copy, verify=False).experts.expert_files[2]
    data = bytearray(expert.read_bytes())
    data[len(data) // 2] ^= 0x10  # one 4-bit code
    expert.write_bytes(bytes(data))
    with pytest.raises(ManifestError, match="sha256"):
        Manifest.load(copy)


def test_lm_head_bits_4_quantizes_the_head_like_the_other_products(fp32_export, int4_dir, tmp_path):
    import onnx

    out = tmp_path / "int4-head4"
    res = CliRunner().invoke(main, ["build", str(fp32_export), str(out), "--precision", "int4", "--lm-head-bits", "4"])
    assert res.exit_code == 0, res.output
    head = [n for n in onnx.load(str(out / "decoder_expert0.onnx"), load_external_data=False).graph.node
            if n.op_type == "MatMulNBits" and "lm_head" in n.name]
    assert len(head) == 1 and {a.name: a.i for a in head[0].attribute}["bits"] == 4
    assert Manifest.load(out).extra["quantization"]["lm_head"] == "int4"
    # the INT8 head of the default build: a larger trunk, every other file the same size
    default = Manifest.load(int4_dir, verify=False)
    assert (int4_dir / default.experts.trunk.file).stat().st_size > (out / default.experts.trunk.file).stat().st_size
    for args, message in ((["--precision", "int8", "--scheme", "weight-only", "--lm-head-bits", "8"],
                           "applies to --precision int4"),
                          (["--precision", "int4", "--lm-head-bits", "8", "--keep-lm-head"], "exclude each other")):
        res = CliRunner().invoke(main, ["build", str(fp32_export), str(tmp_path / "x"), *args])
        assert res.exit_code == 1 and message in res.output, res.output
        assert not (tmp_path / "x").exists()


def test_large_weights_are_quantized_as_column_slices_with_the_same_logits(fp32_export, int4_dir, tmp_path, monkeypatch):
    """A weight over SLICE_ELEMENTS becomes one product per slice of its columns + Concat (a lower load-time peak):
    the codes are per column, so the logits are the unsliced engine's."""
    import onnx
    from test_engines_ort import prefill_logits

    from rsvlm_edge.calibration import weight_only

    cfg = Manifest.load(int4_dir, verify=False).config()
    monkeypatch.setattr(weight_only, "SLICE_ELEMENTS", -(-cfg.hidden_size * cfg.vocab_size // 3))  # lm_head: 3 slices
    out = tmp_path / "int4-sliced"
    res = CliRunner().invoke(main, ["build", str(fp32_export), str(out), "--precision", "int4"])
    assert res.exit_code == 0, res.output
    nodes = onnx.load(str(out / "decoder_expert2.onnx"), load_external_data=False).graph.node
    head = [n for n in nodes if n.op_type == "MatMulNBits" and "lm_head" in n.name]
    widths = [{a.name: a.i for a in n.attribute}["N"] for n in head]
    assert len(head) == 3 and sum(widths) == cfg.vocab_size
    assert [n.op_type for n in nodes if n.output[0] == "logits" or "lm_head" in n.name].count("Concat") == 1
    np.testing.assert_allclose(prefill_logits(out), prefill_logits(int4_dir), rtol=0, atol=1e-5)


def test_int4_engine_logits_stay_within_the_quantization_error_of_fp32(fp32_export, int4_dir, tmp_path):
    from test_engines_ort import logit_error

    int8 = tmp_path / "int8w"
    assert CliRunner().invoke(main, ["build", str(fp32_export), str(int8), "--precision", "int8", "--scheme",
                                     "weight-only"]).exit_code == 0
    # Both engines round activations the same way (accuracy_level 4); they differ in the weight step: INT8 is
    # amax / 127 per 128 weights, asymmetric INT4 (max - min) / 15 <= 2 amax / 15 per 32 (a block's amax is at most
    # its 128-block's), so at most 254 / 15 times coarser. The logits' error is first order in the steps: more than
    # the INT8 engine's, and at most that ratio times it.
    err4, err8 = logit_error(int4_dir, fp32_export), logit_error(int8, fp32_export)
    assert err8 < err4 < 254 / 15 * err8


def test_int4_qdq_dir_for_tensorrt_holds_the_same_codes_as_blockwise_dequantize(fp32_export, tmp_path):
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    out = tmp_path / "int4q"
    res = CliRunner().invoke(main, ["build", str(fp32_export), str(out), "--precision", "int4", "--scheme", "qdq"])
    assert res.exit_code == 0, res.output
    assert "TensorRT" in res.output
    man = Manifest.load(out)
    assert {man.component(n).precision for n in man.experts.decoders} == {"int4"}
    assert man.component("vision_encoder").precision == "fp32"  # TensorRT builds the rest in FP16
    assert man.extra["quantization"]["runtime"] == "tensorrt"
    assert man.experts.expert_files and len(man.experts.expert_files) == man.model_config["num_experts"]
    model = onnx.load(str(out / "decoder_expert1.onnx"))  # with its external data (trunk + expert 1)
    onnx.checker.check_model(model)
    assert {o.version for o in model.opset_import if o.domain in ("", "ai.onnx")} == {21}
    dqs = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    matmuls = [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1].endswith("_dq")]
    assert len(dqs) == len(matmuls) == 7 * man.model_config["num_layers"] + 1  # every weight product + lm_head
    inits = {i.name: i for i in model.graph.initializer}
    for dq in dqs:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in dq.attribute}
        assert attrs == {"axis": 0, "block_size": 32} and len(dq.input) == 2  # no zero point: symmetric
        assert inits[dq.input[0]].data_type == onnx.TensorProto.INT4
    # the Q/DQ codes are the MatMulNBits quantizer's symmetric round-to-nearest ones, laid out (K, N): each within
    # one step of its weight; the two C++ kernels round a rare near-tie differently (one code, one step)
    fp32_inits = {i.name: i for i in onnx.load(str(fp32_export / "decoder_expert1.onnx")).graph.initializer}
    dq = dqs[0]
    w = numpy_helper.to_array(fp32_inits[dq.input[0].removesuffix("_int4")]).astype(np.float32)
    scheme = WeightScheme(bits=4, block_size=32)
    expected, step = dequantize(ort_block_quant(w, scheme), w.shape[0], scheme)
    got = numpy_helper.to_array(inits[dq.input[0]]).astype(np.float32) * np.repeat(
        numpy_helper.to_array(inits[dq.input[1]]), 32, axis=0)[:w.shape[0]]
    assert np.all(np.abs(got - w) <= step * (1 + 1e-5))
    differ = ~np.isclose(got, expected, rtol=1e-6, atol=1e-7)
    assert differ.mean() < 0.01 and np.all(np.abs(got - expected)[differ] <= step[differ] * (1 + 1e-5))
    # ONNX Runtime runs the graph too (its blockwise DequantizeLinear): logits near the FP32 decoder's
    cfg = man.config()
    feeds = {"inputs_embeds": np.random.default_rng(0).normal(size=(1, 5, cfg.hidden_size)).astype(np.float32),
             "position_ids": np.arange(5, dtype=np.int32)[None], "attention_mask": np.ones((1, 5), np.float32)}
    for i in range(cfg.num_layers):
        for kv in ("key", "value"):
            feeds[f"past_{kv}_{i}"] = np.zeros((0, 1, cfg.num_kv_heads, cfg.head_dim), np.float32)
    logits = [ort.InferenceSession(m, providers=["CPUExecutionProvider"]).run(["logits"], feeds)[0]
              for m in (model.SerializeToString(), str(fp32_export / "decoder_expert1.onnx"))]
    assert np.linalg.norm(logits[0] - logits[1]) < 0.5 * np.linalg.norm(logits[1] - logits[1].mean())
    with pytest.raises(Exception, match="TensorRT"):
        OrtBackend.from_dir(out, verify=False)


def test_tensorrt_int4_settings():
    from rsvlm_edge.engines.trt_presets import get_preset
    from rsvlm_edge.engines.trt_settings import BuildSettingsError, check_graph_precision, plan_settings
    from rsvlm_edge.manifest import Component

    def comp(name, precision):
        return Component(name, f"{name}.onnx", precision, [], [], {f"{name}.onnx": "0"})

    dc = get_preset("datacenter")
    s = plan_settings(comp("decoder_expert0", "int4"), "int4", "10.3.0", dc)
    assert (s.strongly_typed, s.flags, s.precision) == (False, ("INT4", "FP16"), "int4")
    assert plan_settings(comp("vision_encoder", "fp32"), "int4", "10.3.0", dc).flags == ("FP16",)
    assert plan_settings(comp("decoder_expert0", "int4"), "int4", "11.0.0", dc).strongly_typed
    with pytest.raises(BuildSettingsError, match="no INT4"):
        plan_settings(comp("decoder_expert0", "int4"), "int4", "8.6.1", dc)
    with pytest.raises(BuildSettingsError, match="--scheme qdq"):
        check_graph_precision([comp("decoder_expert0", "fp32")], "int4", "10.3.0", False)


def test_int4_build_errors(fp32_export, tmp_path):
    runner = CliRunner()
    out = tmp_path / "x"
    res = runner.invoke(main, ["build", str(fp32_export), str(out), "--precision", "int4", "--scheme", "qdq",
                               "--asymmetric"])
    assert res.exit_code == 1 and "symmetric" in res.output
    res = runner.invoke(main, ["build", str(fp32_export), str(out), "--precision", "int4", "--method", "hqq", "--symmetric"])
    assert res.exit_code == 1 and "HQQ" in res.output
    res = runner.invoke(main, ["build", str(fp32_export), str(out), "--precision", "int8", "--scheme", "weight-only",
                               "--asymmetric"])
    assert res.exit_code == 1 and "--precision int4" in res.output
    assert not out.exists()


def test_dynamic_encoder_kernel_reads_pair_bounded_per_channel_int8(fp32_export, tmp_path):
    import onnx
    from onnx import numpy_helper

    out = tmp_path / "int8w-dyn"
    res = CliRunner().invoke(main, ["build", str(fp32_export), str(out), "--precision", "int8", "--scheme", "weight-only",
                                    "--encoder-kernel", "dynamic"])
    assert res.exit_code == 0, res.output
    man = Manifest.load(out)
    assert man.extra["quantization"]["other_weights"]["kernel"] == "DynamicQuantizeMatMul"
    encoder = onnx.load(str(out / "vision_encoder.onnx"))
    ops = [n.op_type for n in encoder.graph.node]
    assert "DynamicQuantizeMatMul" in ops and "MatMulNBits" not in ops
    inits = {i.name: numpy_helper.to_array(i) for i in encoder.graph.initializer}
    for node in encoder.graph.node:
        if node.op_type == "DynamicQuantizeMatMul":
            q = np.abs(inits[node.input[1]].astype(np.int32))  # (K, N) INT8, one scale per output channel
            top2 = np.sort(q, axis=0)[-2:].sum(0)
            assert q.dtype != np.uint8 and top2.max() <= 128  # no u8 x s8 pair sum can saturate int16 (no VNNI)
    decoder = [n.op_type for n in onnx.load(str(out / "decoder_expert0.onnx"), load_external_data=False).graph.node]
    assert "MatMulNBits" in decoder and "DynamicQuantizeMatMul" not in decoder  # decode keeps the streaming kernel
    from test_engines_ort import logit_error

    assert logit_error(out, fp32_export) < 0.05
    res = CliRunner().invoke(main, ["build", str(fp32_export), str(tmp_path / "x"), "--precision", "int8",
                                    "--calibration", str(out / "manifest.json"), "--encoder-kernel", "dynamic"])
    assert res.exit_code == 1 and "--encoder-kernel and --decoder-kernel apply to --scheme weight-only" in res.output


def test_dynamic_decoder_kernel_keeps_the_expert_split_and_fused_attention(fp32_export, tmp_path):
    """--decoder-kernel dynamic: every decoder product on DynamicQuantizeMatMul over pair-bounded per-channel INT8
    (the prefill runs on ORT's integer GEMM), attention still one GroupQueryAttention per layer, the trunk once and
    one file per expert, the same tokens' logits as FP32 within the INT8 engines' bound."""
    import onnx
    from onnx import numpy_helper

    out = tmp_path / "int8-dyn"
    res = CliRunner().invoke(main, ["build", str(fp32_export), str(out), "--precision", "int8", "--scheme", "weight-only",
                                    "--decoder-kernel", "dynamic", "--encoder-kernel", "dynamic"])
    assert res.exit_code == 0, res.output
    man = Manifest.load(out)
    quant = man.extra["quantization"]
    assert quant["decoder_weights"]["kernel"] == quant["other_weights"]["kernel"] == "DynamicQuantizeMatMul"
    assert "per call over their own range" in quant["scheme"]
    assert man.experts.trunk is not None and len(man.experts.expert_files or []) == 3
    decoder = onnx.load(str(out / "decoder_expert1.onnx"))  # with its external data: trunk + expert 1
    ops = [n.op_type for n in decoder.graph.node]
    assert "MatMulNBits" not in ops and "MatMul" not in ops
    assert ops.count("GroupQueryAttention") == man.config().num_layers
    inits = {i.name: numpy_helper.to_array(i) for i in decoder.graph.initializer}
    for node in decoder.graph.node:
        if node.op_type == "DynamicQuantizeMatMul":
            q = np.abs(inits[node.input[1]].astype(np.int32))
            assert inits[node.input[1]].dtype == np.int8 and np.sort(q, axis=0)[-2:].sum(0).max() <= 128
    from test_engines_ort import logit_error

    assert logit_error(out, fp32_export) < 0.05
    for extra, message in ((["--precision", "int4", "--decoder-kernel", "dynamic"], "use --precision int8"),
                           (["--precision", "int8", "--calibration", str(out / "manifest.json"),
                             "--decoder-kernel", "dynamic"], "apply to --scheme weight-only")):
        res = CliRunner().invoke(main, ["build", str(fp32_export), str(tmp_path / "x"), *extra])
        assert res.exit_code == 1 and message in res.output, res.output
        assert not (tmp_path / "x").exists()


def test_dynamic_kernel_computes_the_integer_reference_on_pair_bounded_weights():
    """u8 activations x pair-bounded s8 weights: no pair of products can saturate the int16 sums of x86 kernels
    without VNNI, so ORT's DynamicQuantizeMatMul equals the integer product on every CPU."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from rsvlm_edge.calibration.qdq import quantize_weight

    rng = np.random.default_rng(0)
    k, n, m = 512, 64, 40
    w = rng.standard_normal((k, n)).astype(np.float32)
    w[3] *= 12  # an outlier row: plain per-channel INT8 would put two codes near 127 in many channels
    x = (rng.standard_normal((m, k)) * 3 + 1).astype(np.float32)
    q, s = quantize_weight(w, axis=1)
    node = helper.make_node("DynamicQuantizeMatMul", ["x", "q", "s"], ["y"], domain="com.microsoft")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(q, "q"), numpy_helper.from_array(s, "s")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 8
    y = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    # DynamicQuantizeLinear: UINT8 over [min(0, x), max(0, x)], zero point rounded
    lo, hi = min(0.0, float(x.min())), max(0.0, float(x.max()))
    step = np.float32((hi - lo) / 255)
    zero = np.clip(np.rint(-lo / step), 0, 255)
    xq = np.clip(np.rint(x / step) + zero, 0, 255).astype(np.int64)
    ref = ((xq - int(zero)) @ q.astype(np.int64)) * float(step) * s.astype(np.float64)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
