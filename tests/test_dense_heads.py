"""The dense heads: answer text from head outputs (rsvlm_edge.dense), training targets, export with ORT parity,
the torch / ort / INT8 (Q/DQ and weight-only) / fake TensorRT backends, and the generation loop writing [DET], [OBB]
and [SEG] answers from the heads (alone, batched, change pairs and in a chat)."""

from __future__ import annotations

import dataclasses
import sys

import fake_trt
import numpy as np
import pytest
import torch

from rsvlm_edge import formats
from rsvlm_edge.backends.base import BackendError
from rsvlm_edge.config import ConfigError, tiny_config
from rsvlm_edge.dense import DenseOutputs, cell_grid, dense_answer, detection_answer, mask_answer
from rsvlm_edge.generation import ChatSession, Generator, Request
from rsvlm_edge.manifest import DENSE_COMPONENT, DENSE_OUTPUTS, Manifest
from rsvlm_edge.sampling import SamplingConfig
from rsvlm_edge.tasks import Turn
from rsvlm_edge.tokenizer import Tokenizer
from rsvlm_edge.training.dense_targets import DENSE_LABELS, DENSE_OBJECTS, build_targets, grid_cells

LABELS = list(DENSE_LABELS)
OBJECTS = [LABELS.index(o) for o in DENSE_OBJECTS]
GRID = 8


def empty_outputs() -> DenseOutputs:
    n, labels = GRID * GRID, len(LABELS)
    return DenseOutputs(asked=np.zeros(labels), objects=np.zeros((n, labels)), boxes=np.zeros((n, 4)),
                        obbs=np.zeros((n, 6)), cells=np.zeros((n, 9, labels)), change=np.zeros((n, 9)))


def test_detections_keep_asked_labels_and_drop_overlaps():
    out = empty_outputs()
    ship, plane = LABELS.index("ship"), LABELS.index("plane")
    out.asked[ship] = 0.9
    out.objects[10, ship], out.boxes[10] = 0.8, (0.10, 0.10, 0.20, 0.20)
    out.objects[11, ship], out.boxes[11] = 0.6, (0.11, 0.10, 0.21, 0.20)  # the same ship seen from the next patch
    out.objects[40, ship], out.boxes[40] = 0.7, (0.50, 0.60, 0.60, 0.70)
    out.objects[20, plane], out.boxes[20] = 0.95, (0.3, 0.3, 0.4, 0.4)  # a plane, but planes were not asked for
    answer = detection_answer(out, LABELS, OBJECTS, oriented=False)
    assert formats.parse_detections(answer.text) == [("ship", (10, 10, 20, 20)), ("ship", (50, 60, 60, 70))]
    assert [p for _, p in answer.items] == [0.8, 0.7] and answer.probability == pytest.approx(0.75)
    out.obbs[10] = (0.15, 0.15, 0.1, 0.05, np.cos(np.radians(60)), np.sin(np.radians(60)))
    out.obbs[40] = (0.55, 0.65, 0.1, 0.05, -1.0, 0.0)
    oriented = detection_answer(out, LABELS, OBJECTS, oriented=True)
    assert formats.parse_oriented_detections(oriented.text) == [("ship", (15, 15, 10, 5, 30)), ("ship", (55, 65, 10, 5, -90))]


def test_nothing_found_is_none_with_a_probability():
    out = empty_outputs()
    out.asked[LABELS.index("vehicle")] = 0.9
    out.objects[:, LABELS.index("vehicle")] = 0.2
    out.objects[:, LABELS.index("ship")] = 0.9  # not asked for
    answer = dense_answer("[DET]", out, LABELS, OBJECTS, GRID, 1)
    assert answer.text == "none" and answer.items == [] and answer.probability == pytest.approx(0.8)


def test_masks_take_the_best_asked_label_per_cell():
    out = empty_outputs()
    water, forest = LABELS.index("water"), LABELS.index("forest")
    out.asked[[water, forest]] = 0.9
    grid = np.zeros((24, 24, len(LABELS)))
    grid[:12, :, water] = 0.9
    grid[12:, :8, forest] = 0.7
    grid[12:, :8, LABELS.index("road")] = 0.99  # not asked for
    out.cells = grid_cells(grid, GRID)
    np.testing.assert_array_equal(cell_grid(out.cells, GRID), grid)  # the two layouts are inverses
    answer = mask_answer(out, LABELS, GRID)
    mask = np.asarray(formats.parse_mask(answer.text), dtype=object)
    assert (mask[:12] == "water").all() and (mask[12:, :8] == "forest").all() and (mask[12:, 8:] == "others").all()
    assert dict(answer.items) == pytest.approx({"water": 0.9, "forest": 0.7, "others": 1.0})
    change = empty_outputs()
    change.change = grid_cells(np.pad(np.ones((6, 6)), ((0, 18), (18, 0))), GRID)
    answer = dense_answer("[SEG]", change, LABELS, OBJECTS, GRID, 2)
    grid_text = np.asarray(formats.parse_mask(answer.text), dtype=object)
    assert (grid_text[:6, 18:] == "change").all() and (grid_text == "change").sum() == 36
    with pytest.raises(ValueError, match=r"\[CAP\]"):
        dense_answer("[CAP]", change, LABELS, OBJECTS, GRID, 1)


def test_targets_cover_only_what_each_sample_says():
    det = {"detections": [("ship", (10, 20, 20, 30))], "labels": ["ship"]}
    obb = {"obbs": [("plane", (55, 45, 20, 10, 30))], "labels": ["plane", "ship"]}
    seg = {"mask": [["water"] * 24] * 12 + [["others"] * 24] * 12, "label": "water"}
    change = {"mask": [["change"] * 24] + [["others"] * 24] * 23, "change": True, "label": "change"}
    t = build_targets([det, obb, seg, change], GRID)
    ship, plane, water = LABELS.index("ship"), LABELS.index("plane"), LABELS.index("water")
    assert t.objects[0, 2 * 8 + 1, ship] == 1 and t.objects[0].sum() == 1 and t.objects_known[0].sum() == 1
    np.testing.assert_allclose(t.boxes[0, 17], [0.1 - 0.1875, 0.2 - 0.3125, 0.2 - 0.1875, 0.3 - 0.3125], atol=1e-6)
    assert t.objects[1, 3 * 8 + 4, plane] == 1 and t.objects_known[1, ship] == 1 and t.obbs_known[1].sum() == 1
    np.testing.assert_allclose(t.obbs[1, 28, 4:], [np.cos(np.radians(60)), np.sin(np.radians(60))], atol=1e-6)
    assert t.cells_known[2].tolist() == [float(i == water) for i in range(len(LABELS))]
    assert t.cells[2, :32, :, water].all() and not t.cells[2, 32:, :, water].any()
    assert t.change_known.tolist() == [0, 0, 0, 1] and t.asked_known.tolist() == [1, 1, 1, 0]
    assert t.change[3, :8, :3].all() and t.change[3].sum() == 24


def test_config_needs_the_pointer_and_labels():
    with pytest.raises(ConfigError, match="needs box_pointer"):
        dataclasses.replace(tiny_config(), dense_heads=True, dense_labels=["a"], dense_objects=["a"]).validate()
    with pytest.raises(ConfigError, match="dense_objects"):
        dataclasses.replace(tiny_config(), box_pointer=True, dense_heads=True, dense_labels=["a"],
                            dense_objects=["b"]).validate()


# ------------------------------------------------------------------------------------------ exported heads
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from rsvlm_edge.export.sources import small_corpus
    from rsvlm_edge.modeling import build_model, save_model

    cfg = dataclasses.replace(tiny_config(), box_pointer=True, token_pos_embed=True, dense_heads=True,
                              dense_labels=LABELS, dense_objects=list(DENSE_OBJECTS)).validate()
    model = build_model(cfg, seed=0)
    with torch.no_grad():  # decisive random heads: probabilities far from the 0.5 threshold, so answers are stable
        for layer in (model.dense_heads.asked[-1], model.dense_heads.objects):
            layer.weight.mul_(200.0)
        # masks of whole rows (one label per image, every pair changed), so [SEG] answers stay short
        heads = model.dense_heads
        heads.cell.weight.zero_()
        heads.cell.bias.copy_(torch.linspace(-6.0, 6.0, len(LABELS))[torch.randperm(len(LABELS))].repeat(9))
        heads.change.weight.zero_()
        heads.change.bias.fill_(4.0)
        # and few objects per label (about 2 of 64 patches), so [DET] answers stay short
        states = torch.randn(4, 64, cfg.hidden_size, generator=torch.Generator().manual_seed(0))
        logits = model.dense_heads.image_logits(states[:, 0], states)[1]
        model.dense_heads.objects.bias.sub_(torch.quantile(logits.reshape(-1, len(LABELS)), 0.97, dim=0))
    directory = tmp_path_factory.mktemp("ckpt-dense")
    save_model(model, directory)
    Tokenizer.train(small_corpus(), vocab_size=1024).save(directory / "tokenizer.json")
    return directory


@pytest.fixture(scope="module")
def onnx_dir(checkpoint, tmp_path_factory):
    from rsvlm_edge.export.testing import export_checkpoint

    return export_checkpoint(checkpoint, tmp_path_factory.mktemp("onnx-dense") / "tiny", check=True)


@pytest.fixture(scope="module")
def tok(onnx_dir):
    return Tokenizer.load(onnx_dir / "tokenizer.json")


def tile(seed: int, bands: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(bands, 128, 128)).astype(np.float32)


def test_export_adds_the_dense_heads_with_parity(onnx_dir):
    m = Manifest.load(onnx_dir)
    comp = m.component(DENSE_COMPONENT)
    assert comp.extra["kind"] == "dense_heads" and comp.extra["labels"] == LABELS
    assert [t.name for t in comp.inputs] == ["query", "patches", "patches_after"]
    assert [t.name for t in comp.outputs] == list(DENSE_OUTPUTS)
    assert comp.outputs[4].shape == ["batch", 64, 9, len(LABELS)]
    assert m.has_dense_heads()
    assert m.extra["export"]["checks"][DENSE_COMPONENT]["parity"]["max_abs_diff"] < 1e-4


def test_backends_agree_on_the_heads(checkpoint, onnx_dir):
    from rsvlm_edge.backends.ort_backend import OrtBackend
    from rsvlm_edge.backends.torch_backend import TorchBackend

    rng = np.random.default_rng(2)
    query, before, after = (rng.normal(size=shape).astype(np.float32) for shape in ((3, 256), (3, 64, 256), (3, 64, 256)))
    got = []
    for backend in (TorchBackend.from_dir(checkpoint), OrtBackend.from_dir(onnx_dir)):
        assert backend.has_dense_heads
        got.append(backend.dense(query, before, after))
    for name in DENSE_OUTPUTS:
        np.testing.assert_allclose(got[0][name], got[1][name], rtol=1e-4, atol=1e-4)


def test_models_without_heads_refuse_them():
    from rsvlm_edge.backends.torch_backend import TorchBackend
    from rsvlm_edge.modeling import build_model

    backend = TorchBackend(build_model(dataclasses.replace(tiny_config(), box_pointer=True).validate()))
    assert not backend.has_dense_heads
    with pytest.raises(BackendError, match="no dense heads"):
        backend.dense(np.zeros((1, 256), np.float32), *[np.zeros((1, 64, 256), np.float32)] * 2)


REQUESTS = [("[DET] Detect all ships.", 1), ("[CAP] Describe the image.", 1), ("[OBB] Detect all planes with "
            "oriented boxes.", 1), ("[SEG] Segment the water.", 1), ("[SEG] Segment the changes.", 2)]


def requests() -> list[Request]:
    return [Request([tile(10 * i + k) for k in range(n)], "rgb", prompt) for i, (prompt, n) in enumerate(REQUESTS)]


def test_dense_answers_come_from_the_heads(checkpoint, onnx_dir, tok):
    from rsvlm_edge.backends.ort_backend import OrtBackend
    from rsvlm_edge.backends.torch_backend import TorchBackend

    sampling = SamplingConfig(max_new_tokens=400)
    gen = Generator(OrtBackend.from_dir(onnx_dir), tok)
    batched = gen.generate(requests(), sampling)
    assert batched[1].dense is None  # other tasks are sampled
    for request, out in zip(requests(), batched):
        alone = gen.generate([request], sampling)[0]
        assert alone.text == out.text  # batching and left padding do not change the heads' answer
        if out.dense is None:
            continue
        tag = request.prompt.split()[0]
        assert out.text == out.dense.text and formats.parse_answer(tag, out.text).error is None
        assert out.token_ids == tok.encode(out.text) and out.finish_reason == "stop"
        assert 0 <= out.dense.probability <= 1 and all(0 <= p <= 1 for _, p in out.dense.items)
    assert all(out.dense is not None for out in batched[::2] + batched[3:])
    assert "change" in batched[4].text or "others" in batched[4].text
    reference = Generator(TorchBackend.from_dir(checkpoint), tok).generate(requests(), sampling)
    assert [r.text for r in reference] [::2] == [b.text for b in batched][::2]


def test_chat_writes_dense_answers_from_the_kept_states(onnx_dir, tok):
    from rsvlm_edge.backends.ort_backend import OrtBackend

    gen = Generator(OrtBackend.from_dir(onnx_dir), tok)
    chat = ChatSession(gen, [tile(7)], "rgb")
    first = chat.ask("[DET] Detect all ships.", SamplingConfig(max_new_tokens=300))
    second = chat.ask("[DET] Detect all vehicles.", SamplingConfig(max_new_tokens=300))
    assert chat.counters["reprefills"] == 0 and first.dense is not None and second.dense is not None
    fresh = gen.generate([Request([tile(7)], "rgb", "[DET] Detect all vehicles.",
                                  history=[Turn("[DET] Detect all ships.", first.text)])],
                         SamplingConfig(max_new_tokens=300))[0]
    assert second.text == fresh.text


@pytest.fixture(scope="module")
def table(onnx_dir, tmp_path_factory):
    from PIL import Image

    from rsvlm_edge.calibration.calibrate import run_calibration
    from rsvlm_edge.calibration.table import save_table

    folder = tmp_path_factory.mktemp("tiles-dense")
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(folder / f"t{i}.png")
    amax, meta = run_calibration(onnx_dir, [folder], "minmax", threads=1, decode_steps=1, progress=False)
    return save_table(folder / "calibration.json", amax, **meta)


@pytest.mark.parametrize("scheme", ["qdq", "weight-only"])
def test_int8_builds_keep_the_heads_in_fp32(onnx_dir, tok, table, tmp_path, scheme):
    from rsvlm_edge.backends.ort_backend import OrtBackend
    from rsvlm_edge.engines.ort_build import build_ort

    m = build_ort(onnx_dir, tmp_path / scheme, precision="int8", scheme=scheme,
                  calibration=table if scheme == "qdq" else None)
    assert m.component(DENSE_COMPONENT).precision == "fp32" and m.has_dense_heads()
    backend = OrtBackend.from_dir(tmp_path / scheme)
    out = Generator(backend, tok).generate([requests()[0]], SamplingConfig(max_new_tokens=300))[0]
    assert out.dense is not None and formats.parse_answer("[DET]", out.text).error is None
    rng = np.random.default_rng(3)
    feeds = [rng.normal(size=s).astype(np.float32) for s in ((2, 256), (2, 64, 256), (2, 64, 256))]
    want = OrtBackend.from_dir(onnx_dir).dense(*feeds)
    got = backend.dense(*feeds)
    for name in DENSE_OUTPUTS:  # the copied FP32 graph: the same numbers
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-5)


def test_trt_backend_writes_the_same_answers(onnx_dir, tok, tmp_path, monkeypatch):
    from rsvlm_edge.backends.ort_backend import OrtBackend
    from rsvlm_edge.backends.trt_backend import TrtBackend
    from rsvlm_edge.engines.trt_build import build_trt_engines

    monkeypatch.setitem(sys.modules, "tensorrt", fake_trt.make_tensorrt("10.3.0"))
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", fake_trt.make_cudart(9, 0))
    fake_trt.BUILDS.clear()
    plans = build_trt_engines(onnx_dir, tmp_path / "plans", preset="orin-nx", precision="fp16", log=lambda msg: None)
    trt_backend = TrtBackend.from_dir(plans)
    assert trt_backend.has_dense_heads
    sampling = SamplingConfig(max_new_tokens=400)
    chosen = [r for r in requests() if r.prompt.startswith(("[DET]", "[SEG]", "[OBB]"))]
    want = Generator(OrtBackend.from_dir(onnx_dir), tok).generate(chosen, sampling)
    got = [g for i in range(0, len(chosen), 2)  # the preset's plans take batches of up to 2
           for g in Generator(trt_backend, tok).generate(chosen[i:i + 2], sampling)]
    assert [g.text for g in got] == [w.text for w in want]
    assert all(g.dense is not None and w.dense is not None for g, w in zip(got, want))
    trt_backend.close()


def test_one_task_eval_suites():
    from rsvlm_edge.training.evaluate import suite_samples

    assert {s.tag for s in suite_samples("detection", 5, None)} == {"[DET]"}
    assert {s.tag for s in suite_samples("oriented", 5, None)} == {"[OBB]"}
    plain, change = suite_samples("segmentation", 8, None), suite_samples("change", 8, None)
    assert len(plain) == len(change) == 8
    assert all(len(s.images) == 1 and not s.target.get("change") for s in plain)
    assert all(len(s.images) == 2 and s.target["change"] for s in change)


def test_dense_train_writes_a_model_with_heads(checkpoint, tmp_path):
    from rsvlm_edge.backends.torch_backend import TorchBackend
    from rsvlm_edge.training.dense_train import DenseTrainConfig, run

    tc = DenseTrainConfig(det=6, obb=6, seg=12, epochs=2, batch_size=8)
    features = tmp_path / "states.npz"
    summary = run(checkpoint, tmp_path / "model", tc, data_root=tmp_path / "no-data", features=features)
    assert summary["samples"]["synthetic [SEG]"] == 12 and summary["samples"]["levir_cd"] == 0
    assert [row["epoch"] for row in summary["log"] if "epoch" in row] == [1, 2]
    backend = TorchBackend.from_dir(tmp_path / "model")
    assert backend.has_dense_heads and backend.config.dense_labels == LABELS
    assert (tmp_path / "model" / "tokenizer.json").is_file() and (tmp_path / "model" / "dense_log.json").is_file()
    written = features.stat().st_mtime_ns
    run(checkpoint, tmp_path / "model2", tc, data_root=tmp_path / "no-data", features=features)
    assert features.stat().st_mtime_ns == written  # the cached states were reused, not recomputed
