"""training.real_data: loaders of the real sample sets (skipped when ../shared/data is missing) and their helpers."""

from __future__ import annotations

from collections import deque
from pathlib import Path

import numpy as np
import pytest

from rsvlm_edge.config import DEFAULT_SENSORS
from rsvlm_edge.formats import (
    mask_to_grid,
    parse_answer,
    parse_class_list,
    parse_detections,
    parse_mask,
    parse_oriented_detections,
)
from rsvlm_edge.preprocess import prepare_image
from rsvlm_edge.tasks import TAGS
from rsvlm_edge.training import real_data as rd
from rsvlm_edge.training.sample import Sample

# --------------------------------------------------------------------------------------------------- helpers (no data)


def _bfs_components(mask: np.ndarray) -> int:
    seen = np.zeros_like(mask, dtype=bool)
    count = 0
    h, w = mask.shape
    for y, x in zip(*np.nonzero(mask)):
        if seen[y, x]:
            continue
        count += 1
        queue = deque([(y, x)])
        seen[y, x] = True
        while queue:
            cy, cx = queue.popleft()
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    ny, nx = cy + dy, cx + dx
                    if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        queue.append((ny, nx))
    return count


@pytest.mark.parametrize("seed", range(6))
def test_connected_components_match_bfs(seed):
    rng = np.random.default_rng(seed)
    mask = rng.random((23, 31)) < [0.1, 0.3, 0.45, 0.6, 0.05, 0.5][seed]
    labels, count = rd.connected_components(mask)
    assert count == _bfs_components(mask)
    assert ((labels > 0) == mask).all()
    for i in range(1, count + 1):  # every label is one connected blob
        assert _bfs_components(labels == i) == 1


def test_connected_components_diagonal_and_empty():
    assert rd.connected_components(np.eye(5, dtype=bool))[1] == 1
    assert rd.connected_components(np.zeros((4, 4), bool))[1] == 0
    u = np.array([[1, 0, 1], [1, 0, 1], [1, 1, 1]], bool)
    assert rd.connected_components(u)[1] == 1


def test_enclosing_box_never_empty():
    assert rd.enclosing_box(0, 0, 320, 240, 320, 240) == (0, 0, 100, 100)
    box = rd.enclosing_box(100, 50, 101, 51, 320, 240)  # a single pixel
    assert box[2] > box[0] and box[3] > box[1]
    assert rd.enclosing_box(-5, -5, 400, 300, 320, 240) == (0, 0, 100, 100)


def test_any_grid_and_label_grid_match_mask_to_grid():
    mask = np.zeros((240, 320), bool)
    mask[100:102, 200:203] = True
    grid = rd.any_grid(mask)
    assert grid.sum() == 1
    assert rd.any_label_grid(mask, "target") == mask_to_grid(grid, {1: "target"})
    assert mask_to_grid(mask, {1: "target"}) != rd.any_label_grid(mask, "target")  # majority vote loses it


def test_split_helpers():
    keys = [f"img_{i}" for i in range(100)]
    held = rd.held_out_keys(keys)
    assert len(held) == 20 and held == rd.held_out_keys(reversed(keys))
    assert rd.held_out_keys(["only"]) == set() and len(rd.held_out_keys(["a", "b"])) == 1
    assert rd.split_hash("x") == rd.split_hash("x") != rd.split_hash("y")
    with pytest.raises(ValueError, match="split"):
        rd.load_aid("val", root=Path("/nonexistent"))


def test_read_js_json(tmp_path):
    path = tmp_path / "q.js"
    path.write_text("var q = JSON.parse('{\"a\": \"it\\'s\", \"b\": [1, 2], \"c\": \"\\u00e9\"}');\n")
    assert rd.read_js_json(path) == {"a": "it's", "b": [1, 2], "c": "\u00e9"}


def test_change_caption_buckets():
    empty = np.zeros((64, 64), bool)
    assert rd.change_caption(empty) == "no change"
    one = empty.copy()
    one[5:15, 5:15] = True
    assert rd.change_caption(one) == "a new building was built"
    many = empty.copy()
    for i in range(6):
        many[2 + 10 * i:7 + 10 * i, 2:7] = True
    assert rd.change_caption(many) == "many new buildings were built"
    assert rd.change_summary(many)[1] == 6


def test_missing_data_raises_file_not_found(tmp_path, monkeypatch):
    for loader in rd.LOADERS.values():
        with pytest.raises(FileNotFoundError, match="not found"):
            loader("train", root=tmp_path)
    with pytest.raises(FileNotFoundError):
        rd.load_falcon_samples(tmp_path)
    assert not any(rd.available(tmp_path).values())
    assert rd.load_all("test", root=tmp_path) == []
    monkeypatch.setenv(rd.DATA_ENV, str(tmp_path))
    assert rd.default_root() == tmp_path


# --------------------------------------------------------------------------------------------------- real data


def _check_sample(sample: Sample) -> None:
    assert isinstance(sample, Sample)
    assert sample.tag in TAGS and sample.prompt.startswith(sample.tag)
    assert sample.sensor in DEFAULT_SENSORS
    assert len(sample.images) == (2 if sample.tag == "[CCD]" or sample.target.get("change") else 1)
    for image in sample.images:
        assert isinstance(image, np.ndarray) and image.ndim == 3
        assert image.shape[2] == DEFAULT_SENSORS[sample.sensor]
    parsed = parse_answer(sample.tag, sample.answer)
    assert parsed.error is None, (sample.prompt, sample.answer[:200], parsed.error)


def _keys(samples: list[Sample], field: str = "file") -> set:
    return {s.target[field] for s in samples}


def test_aid(data_root):
    index = rd.aid_index("all", data_root)
    train, test = rd.aid_index("train", data_root), rd.aid_index("test", data_root)
    assert len(train) + len(test) == len(index) > 1000
    assert not set(train) & set(test)
    assert 0.18 < len(test) / len(index) < 0.22
    assert sorted({name for _, name in index.values()}) == sorted(rd.AID_CLASSES)
    assert len(rd.AID_CLASSES) == 30 and "baseball field" in rd.AID_CLASSES and "bare land" in rd.AID_CLASSES
    for name in rd.AID_CLASSES:  # every class is in both splits
        assert any(n == name for _, n in test.values()) and any(n == name for _, n in train.values())
    samples = rd.load_aid("test", root=data_root, limit=24)
    assert len(samples) == 24
    again = rd.load_aid("test", root=data_root, limit=24)
    assert [(s.prompt, s.answer) for s in samples] == [(s.prompt, s.answer) for s in again]
    assert len({s.target["class_name"] for s in samples}) > 3  # the limit takes a mixed subset
    for s in samples:
        _check_sample(s)
        assert s.images[0].shape == (150, 150, 3) and s.images[0].dtype == np.uint8
        assert s.target["file"] in test
        if s.tag == "[CLS]":
            assert s.answer == s.target["class_name"] and s.answer in rd.AID_CLASSES
        else:
            assert s.tag == "[CAP]" and s.answer in s.target["captions"]
    assert rd.aid_caption("dense residential", "x").endswith("a dense residential area")


def test_rsvqa_lr(data_root):
    train, test = rd.load_rsvqa_lr("train", data_root), rd.load_rsvqa_lr("test", data_root)
    assert len(train) + len(test) == 5005
    assert 800 < len(test) < 1200
    assert not _keys(train, "image_id") & _keys(test, "image_id")  # test images are unseen
    assert len(_keys(test, "image_id")) == 10
    for s in test:
        assert s.tag == "[VQA]" and s.images[0].shape == (256, 256, 3) and s.images[0].dtype == np.uint8
        kind, answer = s.target["question_type"], s.answer
        assert answer == s.target["answer"]
        if kind in ("presence", "comp"):
            assert answer in ("yes", "no")
        elif kind == "count":
            assert answer.isdigit()
        else:
            assert kind == "rural_urban" and answer in ("rural", "urban")
    _check_sample(test[0])
    assert [s.answer for s in rd.load_rsvqa_lr("test", data_root, limit=30)] == [s.answer for s in test[:30]]


def test_levir_cd(data_root):
    test = rd.load_levir_cd("test", data_root)
    train = rd.load_levir_cd("train", data_root)
    plain = rd.load_levir_cd("train", data_root, augment=False)
    names = rd.levir_pairs(data_root)
    assert "test_113_0256.png" not in names and len(names) == 11
    assert len(test) == 2 * sum(n.startswith("test_") for n in names) == 14
    assert len(plain) == 2 * 4 and len(train) == 8 * len(plain)
    assert not _keys(test) & _keys(train)
    for s in test + train[:16]:
        _check_sample(s)
        assert s.sensor == "rgb" and all(im.shape == (256, 256, 3) and im.dtype == np.uint8 for im in s.images)
        change = s.target["change_pixels"]
        assert change.shape == (256, 256) and change.dtype == bool
        if s.tag == "[SEG]":
            assert s.target["change"] is True
            assert parse_mask(s.answer) == s.target["mask"] == mask_to_grid(change, {1: "building"})
        else:
            assert s.tag == "[CCD]" and s.answer in s.target["captions"]
    no_change = [s for s in plain if s.tag == "[CCD]" and not s.target["change_pixels"].any()]
    assert no_change and no_change[0].answer == "no change"
    # augmented views transform images and masks together
    views = [s for s in train if s.tag == "[SEG]" and s.target["file"] == plain[0].target["file"]]
    assert len({s.target["view"] for s in views}) == 8
    rot = next(s for s in views if s.target["view"] == "rot90")
    np.testing.assert_array_equal(rot.target["change_pixels"], np.rot90(plain[0].target["change_pixels"]))
    np.testing.assert_array_equal(rot.images[0], np.rot90(plain[0].images[0]))


def test_sirst(data_root):
    splits = rd.sirst_split(data_root)
    assert len(splits) == 427
    assert sum(v == "test" for v in splits.values()) == 86
    test = rd.load_sirst("test", data_root, limit=24)
    train = rd.load_sirst("train", data_root, limit=24)
    assert len(test) == len(train) == 24
    assert not _keys(test) & _keys(train)
    labelled = [(s, "test") for s in test] + [(s, "train") for s in train]
    for s, split in labelled:
        _check_sample(s)
        image = s.images[0]
        assert s.sensor == "ir" and image.ndim == 3 and image.shape[2] == 1 and image.dtype == np.uint8
        assert splits[s.target["file"]] == split
        if s.tag == "[DET]":
            dets = parse_detections(s.answer)
            assert dets == s.target["detections"] and dets
            assert all(label == "target" and b[2] > b[0] and b[3] > b[1] for label, b in dets)
        else:
            grid = parse_mask(s.answer)
            assert grid == s.target["mask"] and any("target" in row for row in grid)
            assert s.target["mask_pixels"].shape == image.shape[:2]
            assert grid == mask_to_grid(rd.any_grid(s.target["mask_pixels"]), {1: "target"})
    # one box per connected target (the VOC xml holds the union box instead)
    det = next(s for s in test + train if s.tag == "[DET]")
    seg = next(s for s in test + train if s.tag == "[SEG]" and s.target["file"] == det.target["file"])
    assert len(parse_detections(det.answer)) == rd.connected_components(seg.target["mask_pixels"])[1]


def test_sirst_mask_at_other_resolution(data_root):
    """Misc_111's mask is 592x400 while its image is 325x220: the mask is resampled to the image."""
    split = rd.sirst_split(data_root).get("Misc_111")
    if split is None:
        pytest.skip("Misc_111 not in this copy of SIRST")
    samples = rd.load_sirst(split, data_root)
    seg = next(s for s in samples if s.target["file"] == "Misc_111" and s.tag == "[SEG]")
    assert seg.target["mask_pixels"].shape == seg.images[0].shape[:2] == (220, 325)


def test_bigearthnet(data_root):
    every = rd.load_bigearthnet("all", data_root)
    train, test = rd.load_bigearthnet("train", data_root), rd.load_bigearthnet("test", data_root)
    assert len(every) == len(train) + len(test) == 12
    assert len(test) == 2  # one place: its S2 and S1 patches
    assert {s.target.get("s2_patch", s.target["patch"]) for s in test}.isdisjoint(
        {s.target.get("s2_patch", s.target["patch"]) for s in train})
    for s in every:
        _check_sample(s)
        image = s.images[0]
        if s.sensor == "ms":
            assert image.shape == (120, 120, 12) and image.dtype == np.uint16
        else:
            assert s.sensor == "sar" and image.shape == (120, 120, 2) and image.dtype == np.float32
            assert image.max() < 30 and image.min() < 0  # dB
        assert parse_class_list(s.answer) == s.target["labels"] and s.target["labels"]
        assert all("," not in label for label in s.target["labels"])
        assert prepare_image(image, s.sensor, 32).shape == (DEFAULT_SENSORS[s.sensor], 32, 32)


def test_dota(data_root):
    every = rd.load_dota("all", data_root)
    train, test = rd.load_dota("train", data_root), rd.load_dota("test", data_root)
    assert len(every) == 4 and len(train) == len(test) == 2
    assert not _keys(train) & _keys(test)
    for s in every:
        _check_sample(s)
        lines = [ln for ln in (data_root / "dota/example/labelTxt" / f"{s.target['file']}.txt").read_text().splitlines()
                 if len(ln.split()) >= 9 and ":" not in ln.split()[0]]
        if s.tag == "[OBB]":
            obbs = parse_oriented_detections(s.answer)
            assert obbs == s.target["obbs"] and len(obbs) == len(lines)
        else:
            dets = parse_detections(s.answer)
            assert dets == s.target["detections"] and len(dets) == len(lines)
    capped = rd.load_dota("all", data_root, max_objects=5)
    assert all(len(parse_detections(s.answer) if s.tag == "[DET]" else parse_oriented_detections(s.answer)) <= 5
               for s in capped)


def test_hrsid(data_root):
    train, test = rd.load_hrsid("train", data_root), rd.load_hrsid("test", data_root)
    assert len(train) == 6 and len(test) == 2
    assert not _keys(train) & _keys(test)
    for s in train + test:
        _check_sample(s)
        image = s.images[0]
        assert s.sensor == "sar" and image.shape == (800, 800, 2) and image.dtype == np.uint8
        assert np.array_equal(image[:, :, 0], image[:, :, 1])
        if s.tag == "[DET]":
            ids = rd.hrsid_instances(
                rd.read_image(data_root / "hrsid/data" / f"{s.target['file']}_instance_id_RGB.png"))
            assert len(parse_detections(s.answer)) == ids.max()


def test_calibration_tiles(data_root):
    tiles = rd.calibration_tiles(data_root)
    assert len(tiles) == len(set(tiles)) > 1000
    text = [str(p) for p in tiles]
    assert not any("_pixels0" in t or "_instance_" in t or "/label/" in t or "test_113_0256" in t for t in text)
    falcon = rd.calibration_tiles(data_root, sources=["falcon_samples"])
    assert len(falcon) == 44
    with pytest.raises(ValueError):
        rd.calibration_tiles(data_root, sources=["nope"])
    guesses = rd.load_falcon_samples(data_root)
    assert [p for p, _ in guesses] == falcon
    assert {sensor for _, sensor in guesses} == {"rgb"}


def test_load_all_small(data_root):
    present = rd.available(data_root)
    assert all(present.values())
    samples = rd.load_all("test", data_root, limit_per_source=3)
    by_source = {}
    for s in samples:
        by_source.setdefault(s.source, []).append(s)
        _check_sample(s)
        pixels = [prepare_image(im, s.sensor, 32) for im in s.images]
        assert all(p.shape == (DEFAULT_SENSORS[s.sensor], 32, 32) and np.isfinite(p).all() for p in pixels)
    assert set(by_source) == set(rd.LOADERS)
    assert all(len(v) <= 3 for v in by_source.values())
