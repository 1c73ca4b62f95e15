"""INT8 calibration: range estimators, Q/DQ rewrite, the INT8 engine dir (layout, size, accuracy) and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from rsvlm_edge.backends.ort_backend import OrtBackend
from rsvlm_edge.calibration.qdq import quantize_weight
from rsvlm_edge.calibration.ranges import RangeObserver, entropy_threshold
from rsvlm_edge.calibration.samples import CalibrationInputError, find_tiles
from rsvlm_edge.calibration.table import CalibrationTableError, load_table, save_table
from rsvlm_edge.cli import main
from rsvlm_edge.engines.trt_calib import parse_cache
from rsvlm_edge.export.testing import export_checkpoint, make_checkpoint
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
def fp32_dir(tmp_path_factory):
    ckpt = make_checkpoint(tmp_path_factory.mktemp("ckpt-calib"))
    return export_checkpoint(ckpt, tmp_path_factory.mktemp("eng-calib") / "fp32")


@pytest.fixture(scope="module")
def tiles(tmp_path_factory):
    return write_tiles(tmp_path_factory.mktemp("calib-tiles") / "tiles")


@pytest.fixture(scope="module")
def int8_dir(fp32_dir, tiles, tmp_path_factory):
    out = tmp_path_factory.mktemp("eng-int8") / "int8"
    res = CliRunner().invoke(main, ["calibrate", str(fp32_dir), str(tiles), "--out", str(out), "--limit", "4",
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


def test_per_channel_weight_quantization_error_bounded():
    w = np.random.default_rng(1).normal(size=(64, 32)).astype(np.float32) * np.linspace(0.01, 5, 32)
    q, scale = quantize_weight(w, axis=1)
    assert q.dtype == np.int8 and scale.shape == (32,)
    assert np.all(np.abs(q.astype(np.float32) * scale - w) <= scale / 2 + 1e-6)
    assert np.abs(q).max() <= 127


# ----------------------------------------------------------------------------------------------- the INT8 dir
def test_int8_dir_manifest_layout_and_sizes(fp32_dir, int8_dir):
    src, man = Manifest.load(fp32_dir), Manifest.load(int8_dir)  # verifies every sha256
    for name, comp in man.components.items():
        expected = "fp32" if name.startswith(("vision_stem_", "router")) else "int8"
        assert comp.precision == expected, name
    # the trunk / expert split survives: each decoder graph references the trunk and only its own expert file
    for e in range(3):
        comp = man.component(f"decoder_expert{e}")
        assert sorted(comp.external_data) == sorted(["decoder_trunk.bin", f"decoder_expert{e}.bin"])
    layout = man.experts
    assert any(t["dtype"] == "int8" for t in layout["trunk"]["tensors"].values())
    assert all(t["dtype"] in ("int8", "float32") for t in layout["expert_tensors"].values())
    for stem in QUANTIZED:
        ratio = (int8_dir / f"{stem}.bin").stat().st_size / (fp32_dir / f"{stem}.bin").stat().st_size
        assert ratio <= 0.3, (stem, ratio)
    assert (int8_dir / "router.bin").read_bytes() == (fp32_dir / "router.bin").read_bytes()
    assert man.extra["quantization"]["calibration"]["method"] == "entropy"
    assert src.config().to_dict() == man.config().to_dict()


def test_int8_outputs_close_to_fp32(fp32_dir, int8_dir, tiles):
    from rsvlm_edge.pipeline import read_tile

    a, b = OrtBackend.from_dir(fp32_dir, threads=1), OrtBackend.from_dir(int8_dir, threads=1)
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
def test_other_methods_give_ranges(fp32_dir, tiles):
    from rsvlm_edge.calibration.calibrate import run_calibration

    tables = {m: run_calibration(fp32_dir, [tiles], m, limit=2, threads=1, decode_steps=1, progress=False)[0]
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


def test_calibrate_cli_errors(fp32_dir, int8_dir, tiles, tmp_path):
    runner = CliRunner()
    (tmp_path / "empty").mkdir()
    res = runner.invoke(main, ["calibrate", str(fp32_dir), str(tmp_path / "empty"), "--out", str(tmp_path / "o")])
    assert res.exit_code == 1 and "no images" in res.output
    res = runner.invoke(main, ["calibrate", str(fp32_dir), str(tiles), "--out", str(int8_dir), "--quiet"])
    assert res.exit_code == 1 and "not empty" in res.output and "--overwrite" in res.output
    res = runner.invoke(main, ["calibrate", str(int8_dir), str(tiles), "--out", str(tmp_path / "o2"), "--quiet",
                               "--limit", "1"])
    assert res.exit_code == 1 and "not an FP32 export" in res.output
    assert not (tmp_path / "o2").exists()
    res = runner.invoke(main, ["calibrate", str(fp32_dir), str(tiles), "--out", str(tmp_path / "o3"), "--limit", "0"])
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
