"""The Python API on the shipped demo model: every input kind, batches, pairs, errors, and the CLI's JSON.

Answers are compared with each other (the same pixels through different doors), never with fixed text, so the
tests hold on any CPU: the same request through the same engine gives the same floats.
"""

from __future__ import annotations

import doctest
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import rsvlm_edge
import rsvlm_edge.pipeline
from rsvlm_edge import InferenceResult, Pipeline, Result
from rsvlm_edge.cli import main
from rsvlm_edge.inputs import load, prepare_tile
from rsvlm_edge.preprocess import PreprocessError
from rsvlm_edge.results import Detection
from rsvlm_edge.tasks import TaskError

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "models" / "tiny-demo"
TOKENS = 8  # enough for a structured answer to start; the tests compare answers, not their content


def answer(result: Result) -> dict:
    """What must not depend on how the request was made: the record less its image names and timings."""
    out = result.to_dict()
    out.pop("timings_ms")
    out.pop("images")
    return out


@pytest.fixture(scope="module")
def pipe():
    with Pipeline(DEMO, threads=1) as p:
        yield p


@pytest.fixture(scope="module")
def rgb():
    return np.random.default_rng(11).integers(0, 256, (72, 100, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def rgb_png(tmp_path_factory, rgb):
    path = tmp_path_factory.mktemp("api") / "tile.png"
    Image.fromarray(rgb).save(path)
    return path


def test_module_docstring_examples_run(monkeypatch):
    monkeypatch.chdir(REPO)  # the examples name models/tiny-demo as a user in a checkout would
    outcome = doctest.testmod(rsvlm_edge.pipeline, optionflags=doctest.ELLIPSIS)
    assert outcome.attempted >= 8 and outcome.failed == 0


def test_top_level_exports():
    assert rsvlm_edge.Pipeline is Pipeline and InferenceResult is Result
    with pytest.raises(AttributeError, match="no attribute 'Pipelines'"):
        rsvlm_edge.Pipelines  # noqa: B018 - the lookup is the test


# ---------------------------------------------------------------------------------------- input kinds
def test_path_pil_and_array_give_the_same_answer(pipe, rgb, rgb_png):
    from_path = pipe(rgb_png, task="det", max_new_tokens=TOKENS)
    from_str = pipe(str(rgb_png), task="det", max_new_tokens=TOKENS)
    from_pil = pipe(Image.fromarray(rgb), task="det", max_new_tokens=TOKENS)
    from_array = pipe(rgb, task="det", max_new_tokens=TOKENS)
    assert [r.images for r in (from_path, from_str, from_pil, from_array)] == [
        [str(rgb_png)], [str(rgb_png)], ["<PIL 0>"], ["<array 0>"]]
    assert answer(from_path) == answer(from_str) == answer(from_pil) == answer(from_array)
    assert from_array.sensor == "rgb" and from_array.task == "[DET]" and from_array.size == (100, 72)


@pytest.mark.parametrize("mode,array,same_as", [
    ("RGBA", None, "rgb"),  # alpha dropped, as the file reader drops it
    ("LA", None, "grey"),
    ("L", None, "grey"),
    ("P", None, "palette"),
    ("I;16", np.arange(72 * 100, dtype=np.uint16).reshape(72, 100) * 9, "itself"),
    ("F", np.linspace(0.0, 1.0, 72 * 100, dtype=np.float32).reshape(72, 100), "itself"),
])
def test_pil_modes_convert_as_the_file_readers_do(pipe, rgb, mode, array, same_as):
    if same_as == "rgb":
        image, expected = Image.fromarray(rgb).convert(mode), rgb
    elif same_as == "grey":
        image, expected = Image.fromarray(rgb[:, :, 1]).convert(mode), rgb[:, :, 1]
    elif same_as == "palette":
        image = Image.fromarray(rgb).quantize(16)
        expected = np.asarray(image.convert("RGB"))
    else:
        image, expected = Image.fromarray(array), array
    assert image.mode == mode
    got = pipe(image, task="cap", max_new_tokens=4)
    want = pipe(expected, task="cap", max_new_tokens=4)
    assert got.images == ["<PIL 0>"] and answer(got) == answer(want)


def test_arrays_of_any_band_count_and_dtype_get_their_sensor_guessed(pipe):
    rng = np.random.default_rng(3)
    cases = {"ms": rng.integers(0, 10000, (40, 40, 12), dtype=np.uint16),
             "sar": rng.normal(-15, 5, (40, 40, 2)).astype(np.float32),  # dB: float with negative values
             "ir": rng.integers(0, 4000, (40, 40), dtype=np.int16)}  # H x W: one band
    for sensor, array in cases.items():
        assert pipe(array, task="cls", max_new_tokens=2).sensor == sensor
    thirteen = rng.integers(0, 10000, (40, 40, 13), dtype=np.uint16)  # an L1C stack: B10 dropped
    assert pipe(thirteen, task="cls", max_new_tokens=2).sensor == "ms"


def test_given_sensor_applies_and_hw_equals_hw1(pipe):
    band = np.random.default_rng(4).integers(0, 256, (50, 60), dtype=np.uint8)
    flat = pipe(band, task="cap", sensor="sar", max_new_tokens=4)
    deep = pipe(band[:, :, None], task="cap", sensor="sar", max_new_tokens=4)
    assert flat.sensor == "sar" and answer(flat) == answer(deep)


def test_siglip_models_take_8_bit_rgb_arrays_only():
    deep = np.zeros((16, 16, 3), dtype=np.uint16)
    with pytest.raises(PreprocessError, match=r"<array 0>.*uint16"):
        prepare_tile([load(deep, "<array 0>")], None, 32, {"rgb": 3}, "siglip-square")
    with pytest.raises(PreprocessError, match=r"<array 1>.*12 bands"):
        prepare_tile([load(np.zeros((16, 16, 12), np.uint8), "<array 1>")], None, 32, {"rgb": 3}, "siglip-pad")
    rgba = Image.new("RGBA", (20, 10), (10, 20, 30, 0))
    tile = prepare_tile([load(rgba, "<PIL 0>")], None, 32, {"rgb": 3}, "siglip-square")
    assert tile.sensor == "rgb" and tile.pixels[0].shape == (3, 32, 32) and tile.sizes == [(20, 10)]


# ---------------------------------------------------------------------------------------- batches and pairs
def test_a_batch_answers_as_the_single_requests_do(pipe, rgb, rgb_png):
    rng = np.random.default_rng(5)
    other = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    items = [rgb_png, Image.fromarray(other), rgb[:, ::-1], rng.integers(0, 10000, (32, 48, 12), dtype=np.uint16),
             other[:, :, 0]]
    for batch_size in (4, 2):  # 2: three calls into the engines
        batch = pipe(items, task="vqa", prompt="How many ships are there?", max_new_tokens=TOKENS,
                     batch_size=batch_size)
        assert isinstance(batch, list) and len(batch) == len(items)
        assert [r.images for r in batch] == [[str(rgb_png)], ["<PIL 1>"], ["<array 2>"], ["<array 3>"], ["<array 4>"]]
        assert [r.sensor for r in batch] == ["rgb", "rgb", "rgb", "ms", "ir"]
        singles = [pipe(item, task="vqa", prompt="How many ships are there?", max_new_tokens=TOKENS) for item in items]
        assert [answer(r) for r in batch] == [answer(r) for r in singles]


def test_a_list_of_one_is_a_batch_of_one(pipe, rgb):
    batch = pipe([rgb], task="cap", max_new_tokens=2)
    assert isinstance(batch, list) and len(batch) == 1 and answer(batch[0]) == answer(pipe(rgb, task="cap",
                                                                                           max_new_tokens=2))


def test_a_tuple_is_one_pair_and_a_list_of_tuples_a_batch_of_pairs(pipe, rgb, rgb_png):
    after = np.random.default_rng(6).integers(0, 256, rgb.shape, dtype=np.uint8)
    pair = pipe((rgb_png, after), task="ccd", max_new_tokens=TOKENS)
    assert isinstance(pair, Result) and pair.images == [str(rgb_png), "<array 1>"] and pair.task == "[CCD]"
    pairs = pipe([(rgb_png, after), (after, rgb)], task="ccd", max_new_tokens=TOKENS)
    assert [r.images for r in pairs] == [[str(rgb_png), "<array 1>"], ["<array 2>", "<array 3>"]]
    assert answer(pairs[0]) == answer(pair)
    assert answer(pairs[1]) == answer(pipe((after, rgb), task="ccd", max_new_tokens=TOKENS))
    change_mask = pipe((rgb, after), task="seg", max_new_tokens=TOKENS)  # [SEG] also takes a pair
    assert len(change_mask.tile.pixels) == 2


def test_no_task_lets_the_router_pick(pipe, rgb):
    r = pipe(rgb, prompt="Is there a ship in the harbour?", max_new_tokens=4)
    assert r.expert_source == "router" and r.expert in ("image", "region", "pixel")
    assert set(r.router_probs) == {"image", "region", "pixel"}
    assert abs(sum(r.router_probs.values()) - 1) < 1e-4


# ---------------------------------------------------------------------------------------- result fields
def test_result_fields_follow_the_parsed_answer(pipe, rgb):
    det = pipe(rgb, task="det", max_new_tokens=48)
    if det.parse_error is None:
        assert all(isinstance(d, Detection) and len(d.box_px) == 4 for d in det.detections)
        assert [d["box_px"] for d in det.to_dict()["detections"]] == [list(d.box_px) for d in det.detections]
    else:
        assert det.detections is None and det.to_dict()["parse_error"] == det.parse_error
    for field in ("boxes_px", "oriented_detections", "labels", "mask", "mask_labels"):
        assert getattr(det, field) is None and field not in det.to_dict()
    seg = pipe(rgb, task="seg", max_new_tokens=200)
    if seg.mask is not None:
        assert seg.mask.shape == (24, 24) and seg.mask_labels == seg.to_dict()["mask_labels"]
        full = seg.mask_image()
        assert full.shape == (72, 100) and full.dtype == bool
    else:
        with pytest.raises(ValueError, match="no mask"):
            seg.mask_image()
    assert seg.finish_reason in ("stop", "length") and seg.expert == "pixel" and seg.expert_source == "tag"
    assert seg.generated_tokens == len(seg.generation.token_ids) and seg.timings["ttft_ms"] > 0


def test_to_dict_is_the_record_infer_json_prints(pipe, rgb_png):
    for task in ("vg", "det"):
        cli = CliRunner().invoke(main, ["infer", str(DEMO), str(rgb_png), "--task", task, "--json", "--threads", "1",
                                        "--max-new-tokens", str(TOKENS)], catch_exceptions=False)
        assert cli.exit_code == 0, cli.output
        printed = json.loads(cli.output.strip().splitlines()[-1])
        api = pipe(rgb_png, task=task, max_new_tokens=TOKENS).to_dict()
        assert sorted(printed) == sorted(api)
        printed.pop("timings_ms"), api.pop("timings_ms")
        assert printed == json.loads(json.dumps(api))


# ---------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("images,error,match", [
    ([], ValueError, "no images"),
    (7, TypeError, r"images: give an image as a path, a PIL image or a numpy array"),
    (["a.png", b"b.png"], TypeError, r"images\[1\]: .*bytes"),
    ([["a.png", "b.png"]], TypeError, r"images\[0\]: .*tuple \(before, after\)"),
    (np.zeros((2, 8, 8, 3), np.uint8), ValueError, r"<array 0>: .*shape \(2, 8, 8, 3\).*batch goes in a list"),
    (np.zeros((8,), np.uint8), ValueError, r"<array 0>: .*H x W"),
    (np.zeros((0, 8, 3), np.uint8), ValueError, r"<array 0>: empty"),
    (np.zeros((3, 64, 64), np.uint8), ValueError, r"<array 0>: .*channels-first.*moveaxis"),
    (np.zeros((8, 8, 3), np.complex64), TypeError, r"<array 0>: .*dtype complex64"),
    (np.array([["a"]], dtype=object), TypeError, r"<array 0>: .*dtype object"),
    ([np.zeros((8, 8), np.uint8), np.zeros((8, 8), np.uint8), np.zeros((8, 8), "U1")], TypeError,
     r"<array 2>: .*dtype <U1"),
    (np.zeros((8, 8, 5), np.uint8), PreprocessError, r"<array 0>: sensor 'ms' expects 12"),
])
def test_bad_images_fail_with_one_message_naming_the_item(pipe, images, error, match):
    with pytest.raises(error, match=match):
        pipe(images, task="cls", max_new_tokens=2)


def test_pair_tasks_refuse_a_list_of_single_images(pipe, rgb):
    with pytest.raises(TaskError, match=r"images\[0\]: \[CCD\] compares two images.*tuple \(before, after\)"):
        pipe([rgb, rgb], task="ccd")
    with pytest.raises(TaskError, match=r"\[CCD\] compares two images.*tuple"):
        pipe(rgb, task="ccd")
    with pytest.raises(TaskError, match=r"images\[1\]: a request takes 1 image .* got 3"):
        pipe([(rgb, rgb), (rgb, rgb, rgb)], task="seg")


def test_bad_call_options(pipe, rgb):
    with pytest.raises(TypeError, match="unexpected keyword argument.*max_tokens"):
        pipe(rgb, task="cap", max_tokens=3)
    with pytest.raises(ValueError, match="batch_size"):
        pipe([rgb], task="cap", batch_size=0)
    with pytest.raises(ValueError, match="temperature"):
        pipe(rgb, task="cap", temperature=-1.0)
    with pytest.raises(ValueError, match="sensor 'hsi' is not one"):
        pipe(rgb, task="cap", sensor="hsi")
    with pytest.raises(TaskError, match="unknown task"):
        pipe(rgb, task="describe")


def test_missing_file_in_a_batch_is_named(pipe, rgb, tmp_path):
    with pytest.raises(ValueError, match=f"image file not found: {tmp_path / 'gone.png'}"):
        pipe([rgb, tmp_path / "gone.png"], task="cap", max_new_tokens=2)


def test_closed_pipeline_refuses_every_call(rgb):
    with Pipeline(DEMO, threads=1) as p:
        assert p(rgb, task="cap", max_new_tokens=1).images == ["<array 0>"]
    for call in (lambda: p(rgb, task="cap"), lambda: p([rgb], task="cap"), lambda: p.tile("x.png"),
                 lambda: p.prepare([rgb], ["<array 0>"])):
        with pytest.raises(RuntimeError, match="pipeline is closed"):
            call()
