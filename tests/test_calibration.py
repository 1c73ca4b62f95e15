"""INT8 calibration: range estimators, Q/DQ rewrite, the INT8 engine dir (layout, size, accuracy) and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from rsvlm_edge.backends.ort_backend import OrtBackend
from rsvlm_edge.calibration.qdq import pair_sums, quantize_rows, quantize_weight
from rsvlm_edge.calibration.ranges import RangeObserver, entropy_threshold
from rsvlm_edge.calibration.samples import CalibrationInputError, find_tiles
from rsvlm_edge.calibration.table import CalibrationTableError, load_table, save_table
from rsvlm_edge.cli import main
from rsvlm_edge.engines.trt_calib import parse_cache
from rsvlm_edge.manifest import Manifest

QUANTIZED = ("vision_encoder", "embedding", "decoder_trunk", "decoder_expert0", "decoder_expert1", "decoder_expert2")


def write_tiles(folder, n=4):
    """Structured RGB tiles (gradients + blobs) and one single-band tile, as PNG."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:96, 0:96]
    for i in range(n):
        base = np.stack([(xx * (i + 1)) % 256, (yy * 2) % 256, ((xx + yy) * (3 - i % 3)) % 256], -1)
        noise = rng.integers(0, 40, base.shape)
        Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)).save(folder / f"rgb_{i}.png")
    Image.fromarray(((xx * yy) % 256).astype(np.uint8)).save(folder / "grey.png")
    return folder


@pytest.fixture(scope="module")
def tiles(tmp_path_factory):
    return write_tiles(tmp_path_factory.mktemp("calib-tiles") / "tiles")


@pytest.fixture(scope="module")
def int8_dir(fp32_export, tiles, tmp_path_factory):
    out = tmp_path_factory.mktemp("eng-int8") / "int8"
    res = CliRunner().invoke(main, ["calibrate", str(fp32_export), str(tiles), "--out", str(out), "--limit", "4",
                                    "--threads", "1", "--quiet"])
    assert res.exit_code == 0, res.output
    return out


# ----------------------------------------------------------------------------------------------- ranges, weights
def test_range_methods_order_and_outlier_clipping():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(size=200_000), [80.0]]).astype(np.float32)
    obs = RangeObserver()
    obs.observe_max("t", x)
    obs.observe_hist("t", x)
    mm, pc, en = (obs.thresholds(m)["t"] for m in ("minmax", "percentile", "entropy"))
    assert mm == pytest.approx(80.0)
    assert pc < 10 and en < 10  # the single outlier is clipped
    assert 2.0 < en and 3.0 < pc


def test_entropy_of_narrow_histogram_is_its_extent():
    hist = np.zeros(2048)
    hist[:50] = 10
    assert entropy_threshold(hist, 2048.0) == pytest.approx(50.0)


def test_weights_are_pair_bounded_and_no_coarser_than_7_bit():
    rng = np.random.default_rng(1)
    w = rng.normal(size=(64, 32)).astype(np.float32) * np.linspace(0.01, 5, 32)
    w[3, 5] = 40.0  # one channel with an outlier: pair-bounding keeps more than 7 bits there
    q, scale = quantize_weight(w, axis=1)
    assert q.dtype == np.int8 and scale.shape == (32,)
    assert np.all(np.abs(q.astype(np.float32) * scale - w) <= scale / 2 + 1e-6)  # plain rounding, no clipping
    assert pair_sums(q, axis=1).max() <= 128 and np.abs(q).max() <= 127
    assert np.all(scale <= np.abs(w).max(0) / 64 * (1 + 1e-6))  # never coarser than ORT's reduce_range (7-bit)
    assert np.abs(q[:, 5]).max() > 64
    conv = rng.normal(size=(8, 3, 3, 3)).astype(np.float32)  # Conv: the output channel is axis 0
    assert pair_sums(quantize_weight(conv, 0)[0], 0).max() <= 128
    rows, _ = quantize_rows(w, axis=1)  # tables that are only looked up keep the full 8-bit range
    assert np.abs(rows).max() == 127 and pair_sums(rows, axis=1).max() > 128


# ----------------------------------------------------------------------------------------------- the INT8 dir
def test_int8_dir_manifest_layout_and_sizes(fp32_export, int8_dir):
    src, man = Manifest.load(fp32_export), Manifest.load(int8_dir)  # verifies every sha256
    for name, comp in man.components.items():
        expected = "fp32" if name.startswith(("vision_stem_", "router")) else "int8"
        assert comp.precision == expected, name
    # the trunk / expert split survives: each decoder graph references the trunk and only its own expert file
    for e in range(3):
        comp = man.component(f"decoder_expert{e}")
        assert sorted(comp.external_data) == sorted(["decoder_trunk.bin", f"decoder_expert{e}.bin"])
    layout = man.experts
    assert layout.trunk is not None and layout.expert_tensors is not None
    assert any(t.dtype == "int8" for t in layout.trunk.tensors.values())
    assert all(t.dtype in ("int8", "float32") for t in layout.expert_tensors.values())
    for stem in QUANTIZED:
        ratio = (int8_dir / f"{stem}.bin").stat().st_size / (fp32_export / f"{stem}.bin").stat().st_size
        assert ratio <= 0.3, (stem, ratio)
    assert (int8_dir / "router.bin").read_bytes() == (fp32_export / "router.bin").read_bytes()
    assert man.extra["quantization"]["calibration"]["method"] == "entropy"
    assert src.config().to_dict() == man.config().to_dict()


def test_int8_outputs_close_to_fp32(fp32_export, int8_dir, tiles):
    """The quantization error of the INT8 engine against FP32, on any CPU: the saturation tests below prove that every
    integer product is exact whatever kernel runs it, so what is left is the 8-bit rounding itself. Each quantized
    activation adds uniform noise of amax/127/sqrt(12) (0.23% of its range) and weights half a step per value; the
    vision encoder and each decoder pass ~20-30 of them in series, so a few percent is the expected scale (3.7%
    vision, 5% max logit here and under an emulated AVX2 CPU). The bounds (10% relative L2 / max |logit|, logit
    correlation 0.98) sit ~2x above that and below what a wrong scale or a saturating kernel gives (14% on AVX2 with
    full-range 8-bit weights)."""
    from rsvlm_edge.pipeline import read_tile

    a, b = OrtBackend.from_dir(fp32_export, threads=1), OrtBackend.from_dir(int8_dir, threads=1)
    tile = read_tile([tiles / "rgb_1.png"], None, a.config.image_size, a.config.sensors)
    va, vb = (x.encode_images(tile.pixels[0][None], tile.sensor) for x in (a, b))
    assert np.linalg.norm(vb - va) / np.linalg.norm(va) < 0.1
    ids = np.arange(5, 25, dtype=np.int32)[None]
    for expert in range(3):
        logits = []
        for backend in (a, b):
            cache = backend.new_cache(1, 40, expert)
            emb = backend.embed(ids)
            emb[0, :10] = va[0, :10]  # real visual tokens + text
            logits.append(backend.forward(cache, emb, np.arange(20, dtype=np.int32)[None], np.ones((1, 20), np.float32)))
        la, lb = logits
        assert np.abs(lb - la).max() < 0.1 * np.abs(la).max() + 1e-3, expert
        assert np.corrcoef(la.ravel(), lb.ravel())[0, 1] > 0.98


def test_int8_dir_swaps_experts_under_a_one_expert_budget(int8_dir):
    from rsvlm_edge.generation import Generator, Request
    from rsvlm_edge.pipeline import load_tokenizer
    from rsvlm_edge.sampling import SamplingConfig

    backend = OrtBackend.from_dir(int8_dir, threads=1, expert_budget_experts=1)
    gen = Generator(backend, load_tokenizer(int8_dir))
    px = np.random.default_rng(3).normal(size=(3, 128, 128)).astype(np.float32)
    for prompt in ("[CAP] Describe the image.", "[SEG] Segment the water.", "[VG] Locate the ship."):
        out = gen.generate([Request([px], "rgb", prompt)], SamplingConfig(max_new_tokens=4, ignore_stop=True))
        assert len(out[0].token_ids) == 4
    assert backend.stats()["expert_evictions"] >= 2


# ----------------------------------------------------------------------------------------------- table + caches
def test_table_and_trt_caches(int8_dir):
    table, meta = load_table(int8_dir / "calibration.json")
    assert meta["method"] == "entropy" and set(table) >= {"vision_encoder", "decoder_expert0", "decoder_expert2"}
    for comp, amax in table.items():
        text = (int8_dir / "trt_calib" / f"{comp}.cache").read_text()
        assert text.splitlines()[0] == "TRT-8601-EntropyCalibration2"
        cache = parse_cache(text)
        assert set(cache.scales) == set(amax)
        for name, value in amax.items():
            assert cache.scales[name] == pytest.approx(max(value, 1e-8) / 127.0, rel=1e-6)
    line = (int8_dir / "trt_calib" / "vision_encoder.cache").read_text().splitlines()[1]
    name, _, hexscale = line.rpartition(": ")
    assert len(hexscale) == 8 and int(hexscale, 16) >= 0


def test_table_roundtrip_and_errors(tmp_path):
    path = save_table(tmp_path / "t.json", {"c": {"x": 1.5}}, method="minmax")
    table, meta = load_table(path)
    assert table == {"c": {"x": 1.5}} and meta["method"] == "minmax"
    (tmp_path / "bad.json").write_text('{"format": 1, "amax": {"c": {"x": -1}}}')
    with pytest.raises(CalibrationTableError, match="non-negative"):
        load_table(tmp_path / "bad.json")
    with pytest.raises(CalibrationTableError, match="not found"):
        load_table(tmp_path / "missing.json")
    (tmp_path / "junk.json").write_text("not json")
    with pytest.raises(CalibrationTableError, match="not a JSON"):
        load_table(tmp_path / "junk.json")


# ----------------------------------------------------------------------------------------------- CLI + errors
def test_other_methods_give_ranges(fp32_export, tiles):
    from rsvlm_edge.calibration.calibrate import run_calibration

    tables = {m: run_calibration(fp32_export, [tiles], m, limit=2, threads=1, decode_steps=1, progress=False)[0]
              for m in ("minmax", "percentile")}
    for comp, amax in tables["minmax"].items():
        assert set(amax) == set(tables["percentile"][comp])
        assert all(tables["percentile"][comp][t] <= v + 1e-6 for t, v in amax.items())


def test_find_tiles_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CalibrationInputError, match="no images"):
        find_tiles([tmp_path / "empty"])
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(CalibrationInputError, match="not an image"):
        find_tiles([tmp_path / "notes.txt"])
    with pytest.raises(CalibrationInputError, match="does not exist"):
        find_tiles([tmp_path / "nope.png"])
    tiles = write_tiles(tmp_path / "t", n=6)
    assert len(find_tiles([tiles], limit=3)) == 3


def test_calibrate_cli_errors(fp32_export, int8_dir, tiles, tmp_path):
    runner = CliRunner()
    (tmp_path / "empty").mkdir()
    res = runner.invoke(main, ["calibrate", str(fp32_export), str(tmp_path / "empty"), "--out", str(tmp_path / "o")])
    assert res.exit_code == 1 and "no images" in res.output
    res = runner.invoke(main, ["calibrate", str(fp32_export), str(tiles), "--out", str(int8_dir), "--quiet"])
    assert res.exit_code == 1 and "not empty" in res.output and "--overwrite" in res.output
    res = runner.invoke(main, ["calibrate", str(int8_dir), str(tiles), "--out", str(tmp_path / "o2"), "--quiet",
                               "--limit", "1"])
    assert res.exit_code == 1 and "not an FP32 export" in res.output
    assert not (tmp_path / "o2").exists()
    res = runner.invoke(main, ["calibrate", str(fp32_export), str(tiles), "--out", str(tmp_path / "o3"), "--limit", "0"])
    assert res.exit_code == 2
    res = runner.invoke(main, ["calibrate", str(tmp_path / "empty"), str(tiles), "--out", str(tmp_path / "o4")])
    assert res.exit_code == 1 and "manifest" in res.output
    res = runner.invoke(main, ["calibrate", "--help"])
    assert res.exit_code == 0 and "entropy" in res.output and "trt_calib" in res.output


def test_calibration_table_is_json_with_amax(int8_dir):
    data = json.loads((int8_dir / "calibration.json").read_text())
    assert data["format"] == 1 and data["tiles"] == 4 and data["requests"] == 12


def test_int8_graphs_are_valid_and_fuse_to_integer_kernels(int8_dir, tmp_path):
    import collections

    import onnx
    import onnxruntime as ort

    for name in ("vision_encoder", "embedding", "decoder_expert1"):
        onnx.checker.check_model(str(int8_dir / f"{name}.onnx"))  # by path: external data resolves beside it
    ops = {}
    for name in ("vision_encoder", "decoder_expert0"):
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.optimized_model_filepath = str(tmp_path / f"{name}.onnx")
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name", f"{name}.bin")
        ort.InferenceSession(str(int8_dir / f"{name}.onnx"), so, providers=["CPUExecutionProvider"])
        graph = onnx.load(str(tmp_path / f"{name}.onnx"), load_external_data=False).graph
        ops[name] = collections.Counter(n.op_type for n in graph.node)
    assert ops["vision_encoder"]["QLinearConv"] >= 6 and ops["vision_encoder"]["Conv"] == 0
    assert ops["decoder_expert0"]["MatMulIntegerToFloat"] >= 7 * 4  # q, k, v, o, gate, up, down per layer (+ lm_head)


# ----------------------------------------------------------------------------------------------- saturation
# x86 without VNNI adds each two u8 x s8 products into an int16 with saturation (vpmaddubsw); the pair-bounded weights
# make that exact. These tests hold on every CPU: the proof reads the files, the emulation is numpy, and ORT's integer
# kernel must give the exact product whatever ISA it picks.
def test_int8_dir_proves_saturation_free(int8_dir, tmp_path):
    import shutil

    from rsvlm_edge.calibration.saturation import SaturationError, prove_engine_dir

    proofs = prove_engine_dir(int8_dir)
    assert set(proofs) == {"vision_encoder", "decoder_expert0", "decoder_expert1", "decoder_expert2"}
    man = Manifest.load(int8_dir)
    for name, proof in proofs.items():
        assert proof["holds"] and proof["max_pair_product"] <= 32767 and proof["weights"] >= 25
        scheme = man.component(name).extra["int8_scheme"]
        assert scheme["pair_bound"] == {k: v for k, v in proof.items() if k != "weights"}
        assert "pair-bounded" in scheme["weights"] and scheme["activations"].startswith("uint8")
    assert "pair_bound" not in man.component("embedding").extra["int8_scheme"]  # a table lookup, no product
    # the proof reads the weight bytes: two full-range values in one channel of a copy are caught
    bad = tmp_path / "bad"
    shutil.copytree(int8_dir, bad)
    trunk = Manifest.load(bad).experts.trunk
    assert trunk is not None
    entry = trunk.tensors
    name = next(n for n, t in entry.items() if t.extra["quantization"] == "int8" and len(t.shape) == 2)
    column = np.zeros(entry[name].shape, np.int8)
    with open(bad / "decoder_trunk.bin", "r+b") as f:
        f.seek(entry[name].offset)
        column = np.frombuffer(f.read(column.nbytes), np.int8).reshape(column.shape).copy()
        column[0, 0], column[1, 0] = 127, -127
        f.seek(entry[name].offset)
        f.write(column.tobytes())
    with pytest.raises(SaturationError, match="254"):
        prove_engine_dir(bad)


def vpmaddubsw_matmul(a: np.ndarray, w: np.ndarray) -> np.ndarray:
    """u8 (M, K) x s8 (K, N) the way AVX2 / AVX512BW QGEMM adds it: products of k = 2j and 2j + 1 summed into an
    int16 with saturation (vpmaddubsw), then widened and summed exactly (vpmaddwd, vpaddd)."""
    if a.shape[1] % 2:
        a, w = np.pad(a, ((0, 0), (0, 1))), np.pad(w, ((0, 1), (0, 0)))
    pairs = (a[:, 0::2, None].astype(np.int32) * w[None, 0::2] + a[:, 1::2, None].astype(np.int32) * w[None, 1::2])
    return np.clip(pairs, -32768, 32767).sum(1, dtype=np.int64)


def im2col(x: np.ndarray, node) -> np.ndarray:
    """(1, C, H, W) -> (positions, C * kh * kw) for a group-1 Conv, in the weight's (c, kh, kw) order."""
    from onnx import helper

    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    kh, kw = attrs["kernel_shape"]
    sh, sw = attrs.get("strides", [1, 1])
    top, left, bottom, right = attrs.get("pads", [0, 0, 0, 0])
    x = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)), constant_values=128)  # zero padding is u8 128 (zero point)
    win = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(2, 3))[:, :, ::sh, ::sw]
    return win.transpose(0, 2, 3, 1, 4, 5).reshape(-1, x.shape[1] * kh * kw)


@pytest.fixture(scope="module")
def real_operands(fp32_export, int8_dir, tiles):
    """(product, u8 activations (M, K), pair-bounded s8 weight (K, N), plain 8-bit weight (K, N)) for every integer
    product of the vision encoder and decoder expert 0, on real calibration feeds (a tile, its prefill)."""
    import onnx

    from rsvlm_edge.calibration.collect import external_arrays, record, session_with_outputs
    from rsvlm_edge.calibration.samples import calibration_requests
    from rsvlm_edge.calibration.saturation import quantized_products

    fp32, table = Manifest.load(fp32_export), load_table(int8_dir / "calibration.json")[0]
    recording = record(fp32_export, calibration_requests(find_tiles([tiles], 1), fp32.config()), decode_steps=0,
                       threads=1)
    out = []
    for comp in ("vision_encoder", "decoder_expert0"):
        model = onnx.load(str(int8_dir / f"{comp}.onnx"), load_external_data=False)
        q_arrays = external_arrays(int8_dir, model)
        f_arrays = external_arrays(fp32_export, onnx.load(str(fp32_export / f"{comp}.onnx"), load_external_data=False))
        products = [(n, w) for n, w in quantized_products(model) if n.input[0].endswith("_dq")]
        acts = [n.input[0][:-len("_dq")] for n, _ in products]
        session, _ = session_with_outputs(fp32, comp, list(dict.fromkeys(acts)), threads=1)
        feed = recording.feeds[comp][0]
        values = dict(zip(dict.fromkeys(acts), session.run(list(dict.fromkeys(acts)), feed)))
        for (node, weight), act in zip(products, acts):
            u8 = np.clip(np.rint(values[act] / (table[comp][act] / 127.0)) + 128, 0, 255).astype(np.uint8)
            q, w = np.asarray(q_arrays[weight]), np.asarray(f_arrays[weight[:-len("_quantized")]], np.float32)
            if node.op_type == "Conv":
                if any(a.name == "group" and a.i != 1 for a in node.attribute):
                    continue
                a, q, plain = im2col(u8, node), q.reshape(len(q), -1).T, quantize_rows(w.reshape(len(w), -1), 0)[0].T
            else:
                a, plain = u8.reshape(-1, q.shape[0]), quantize_rows(w, 1)[0]
            out.append((f"{comp}/{node.name}", a, q, plain))
    return out


def test_vpmaddubsw_emulation_is_exact_for_pair_bounded_weights(real_operands):
    assert len(real_operands) >= 40 and any(name.endswith("Conv") for name, *_ in real_operands)
    bitten = 0
    for name, a, q, plain in real_operands:
        exact = a.astype(np.int64) @ q.astype(np.int64)
        np.testing.assert_array_equal(vpmaddubsw_matmul(a, q), exact, err_msg=name)
        bitten += int(np.any(vpmaddubsw_matmul(a, plain) != a.astype(np.int64) @ plain.astype(np.int64)))
    assert bitten >= 1  # full-range 8-bit weights do saturate on these very activations: the emulation bites


def test_ort_integer_kernel_is_exact_on_real_operands(real_operands):
    """ONNX Runtime's U8S8 GEMM (whatever kernel this CPU selects) against the exact int64 product."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["a", "b", "a_zero"], ["y"])], "mmi",
        [helper.make_tensor_value_info("a", TensorProto.UINT8, ["m", "k"]),
         helper.make_tensor_value_info("b", TensorProto.INT8, ["k", "n"])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, ["m", "n"])],
        [helper.make_tensor("a_zero", TensorProto.UINT8, [], [128])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    for name, a, q, _ in real_operands:
        got = session.run(None, {"a": a, "b": q})[0]
        np.testing.assert_array_equal(got, (a.astype(np.int64) - 128) @ q.astype(np.int64), err_msg=name)
