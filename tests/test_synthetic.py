"""The synthetic multi-sensor scene generator: determinism, shapes, parseable answers, answers true to the scene."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest

from rsvlm_edge import formats
from rsvlm_edge.tasks import PAIR_TASKS, TAGS
from rsvlm_edge.training import synthetic as syn
from rsvlm_edge.training.sample import Sample

SHAPES = {"rgb": (3, np.uint8), "sar": (2, np.float32), "ir": (1, np.uint8), "ms": (12, np.uint16)}


def _same(a: Sample, b: Sample) -> bool:
    return (a.prompt == b.prompt and a.answer == b.answer and a.sensor == b.sensor and len(a.images) == len(b.images)
            and all(x.dtype == y.dtype and np.array_equal(x, y) for x, y in zip(a.images, b.images)))


def _scenes(n: int, seed: int = 0, size: int = 128, classes=syn.SCENE_CLASSES):
    rng = np.random.default_rng(seed)
    return [syn.make_scene(rng, size, classes[i % len(classes)]) for i in range(n)], rng


# --------------------------------------------------------------------------------------------------- determinism


def test_same_seed_same_samples_different_seed_differs():
    a, b, c = syn.generate(24, seed=7), syn.generate(24, seed=7), syn.generate(24, seed=8)
    assert all(_same(x, y) for x, y in zip(a, b))
    assert not all(_same(x, y) for x, y in zip(a, c))


def test_generator_stream_matches_generate_and_renderers_are_pure():
    gen = syn.SyntheticGenerator(seed=3)
    assert all(_same(x, y) for x, y in zip(gen.samples(6), syn.generate(6, seed=3)))
    scene = syn.make_scene(np.random.default_rng(0), 128, "harbor")
    for sensor in syn.SENSORS:  # a scene renders the same way every time (noise comes from its own seed)
        assert np.array_equal(syn.render(scene, sensor), syn.render(scene, sensor))


# --------------------------------------------------------------------------------------------------- every tag, every sensor


@pytest.mark.parametrize("sensor", syn.SENSORS)
def test_every_tag_for_every_sensor(sensor):
    gen = syn.SyntheticGenerator(seed=11)
    bands, dtype = SHAPES[sensor]
    for tag in TAGS:
        s = gen.sample(tag, sensor)
        assert s.tag == tag and s.prompt.startswith(tag + " ") and s.source == "synthetic" and s.sensor == sensor
        assert s.answer.strip() and isinstance(s.target, dict) and s.target
        pair = tag in PAIR_TASKS or s.target.get("change", False)
        assert len(s.images) == (2 if pair else 1)
        for im in s.images:
            assert im.shape == (128, 128, bands) and im.dtype == dtype
        parsed = formats.parse_answer(tag, s.answer)
        assert parsed.error is None, (tag, s.answer)


def test_mixture_covers_every_tag_and_sensor_rgb_most_frequent():
    samples = syn.generate(150, seed=5)
    tags = {s.tag for s in samples}
    sensors = [s.sensor for s in samples]
    assert tags == set(TAGS)
    assert set(sensors) == set(syn.SENSORS)
    assert max(syn.SENSORS, key=sensors.count) == "rgb"


def test_task_restriction_and_name_forms():
    samples = syn.generate(12, seed=2, tasks=["cap", "[CLS]"], sensors=["sar"])
    assert {s.tag for s in samples} <= {"[CAP]", "[CLS]"} and {s.sensor for s in samples} == {"sar"}
    with pytest.raises(ValueError):
        syn.SyntheticGenerator(sensors=["lidar"])
    with pytest.raises(ValueError):
        syn.SyntheticGenerator().sample("[XYZ]")


def test_task_weights_reweight_the_mixture():
    plain = [s.tag for s in syn.generate(300, seed=4)]
    gen = syn.SyntheticGenerator(seed=4, task_weights={"seg": 0.0, "[VG]": 1.0})
    tags = [gen.sample().tag for _ in range(300)]
    assert "[SEG]" in plain and "[SEG]" not in tags
    assert tags.count("[VG]") > 2 * plain.count("[VG]")
    with pytest.raises(ValueError, match="weights >= 0"):
        syn.SyntheticGenerator(task_weights={"[CAP]": -1.0})


@pytest.mark.parametrize("size", [64, 192])
def test_other_image_sizes(size):
    gen = syn.SyntheticGenerator(size=size, seed=1)
    for tag in ("[DET]", "[SEG]", "[CCD]", "[VG]"):
        for sensor in ("rgb", "ms"):
            s = gen.sample(tag, sensor)
            assert all(im.shape[:2] == (size, size) for im in s.images)
            assert formats.parse_answer(tag, s.answer).error is None


# --------------------------------------------------------------------------------------------------- answers parse back


def test_answers_parse_back_to_targets():
    gen = syn.SyntheticGenerator(seed=21)
    for sensor in syn.SENSORS:
        for _ in range(3):
            vg = gen.sample("[VG]", sensor)
            assert formats.parse_boxes(vg.answer) == [tuple(b) for b in vg.target["boxes"]]
            det = gen.sample("[DET]", sensor)
            assert formats.parse_detections(det.answer) == list(det.target["detections"])
            obb = gen.sample("[OBB]", sensor)
            assert formats.parse_oriented_detections(obb.answer) == list(obb.target["obbs"])
            seg = gen.sample("[SEG]", sensor)
            assert formats.parse_mask(seg.answer) == seg.target["mask"]
            cap = gen.sample("[CAP]", sensor)
            assert cap.answer in cap.target["captions"] and len(set(cap.target["captions"])) >= 3
            cls = gen.sample("[CLS]", sensor)
            assert cls.answer == cls.target["class_name"] and cls.answer in syn.SENSOR_SCENES[sensor]
            ref = gen.sample("[REF]", sensor)
            assert ref.target["label"] in ref.answer
            assert formats.parse_box(ref.instruction) == tuple(ref.target["box"])
            assert ref.prompt == f"[REF] What is in the region {formats.format_box(ref.target['box'])}?"


# --------------------------------------------------------------------------------------------------- truth of the scene


def test_objects_are_sized_counted_and_disjoint():
    scenes, _ = _scenes(40)
    for scene in scenes:
        assert len(scene.objects) <= 8
        seen = np.zeros((128, 128), bool)
        for o in scene.objects:
            x1, y1, x2, y2 = o.box_px
            assert max(x2 - x1, y2 - y1) >= 6 and 0 <= x1 < x2 <= 128 and 0 <= y1 < y2 <= 128
            assert not np.any(seen & o.mask)
            seen |= o.mask
            lc_under = scene.landcover[o.mask]
            if o.label == "ship":
                assert np.mean(lc_under == syn.LC["water"]) > 0.9
            if o.label == "plane":
                assert np.mean(np.isin(lc_under, [syn.LC["bare"], syn.LC["industrial"], syn.LC["road"]])) > 0.8


def test_boxes_and_oriented_boxes_lie_on_their_objects():
    scenes, _ = _scenes(30)
    for scene in scenes:
        for o in scene.objects:
            x1, y1, x2, y2 = formats.box_to_pixels(o.box(), 128, 128)
            ys, xs = np.nonzero(o.mask)
            inside = (xs + 0.5 >= x1 - 1) & (xs + 0.5 <= x2 + 1) & (ys + 0.5 >= y1 - 1) & (ys + 0.5 <= y2 + 1)
            assert inside.mean() > 0.97
            # tight: the mask touches all four sides of its pixel box, and the text box is that box rounded
            assert ys.min() == o.box_px[1] and ys.max() + 1 == o.box_px[3] and xs.min() == o.box_px[0]
            assert max(abs(a - b * 100 / 128) for a, b in zip(o.box(), o.box_px)) <= 0.5
            cx, cy, w, h, angle = formats.obb_to_pixels(o.obb(), 128, 128)
            t = math.radians(angle)
            du = (xs + 0.5 - cx) * math.cos(t) + (ys + 0.5 - cy) * math.sin(t)
            dv = -(xs + 0.5 - cx) * math.sin(t) + (ys + 0.5 - cy) * math.cos(t)
            tol = 2.2  # pixels: 0..100 integer rounding (1 unit = 1.28 px) plus polygon fill on pixel centres
            assert np.mean((np.abs(du) <= w / 2 + tol) & (np.abs(dv) <= h / 2 + tol)) > 0.97
            fill = 3.5 if o.label == "plane" else 1.8  # a plane covers about 40% of its (length x span) box
            assert 0.5 * o.area <= w * h <= fill * o.area


def test_detection_and_grounding_targets_are_scene_objects():
    scenes, rng = _scenes(30, seed=4)
    for i, scene in enumerate(scenes):
        sensor = syn.SENSORS[i % 4]
        visible = scene.visible(sensor)
        det = syn.emit_det(scene, sensor, rng)
        asked = det.target["labels"]
        expected = sorted((o.label, o.box()) for o in visible if o.label in asked)
        assert sorted(det.target["detections"]) == expected
        obb = syn.emit_obb(scene, sensor, rng)
        assert sorted(obb.target["obbs"]) == sorted((o.label, o.obb()) for o in visible if o.label in obb.target["labels"])
        vg = syn.emit_vg(scene, sensor, rng)
        if vg is None:
            continue
        (box,) = vg.target["boxes"]
        owners = [o for o in visible if o.box() == tuple(box)]
        assert owners and owners[0].label == vg.target["label"] and vg.target["label"] in vg.prompt


def test_referring_expressions_are_unique():
    scenes, rng = _scenes(40, seed=9, classes=("residential", "parking lot", "harbor", "industrial", "airport"))
    for scene in scenes:
        for obj in scene.objects:
            for expr in syn._referring_expressions(obj, scene, "rgb"):
                others = [o for o in scene.objects if o.label == obj.label and o is not obj]
                if expr == f"the {obj.label}":
                    assert not others
                if expr.startswith("the largest"):
                    assert all(obj.area > o.area for o in others)
                if expr.startswith("the leftmost"):
                    assert all(obj.cx < o.cx for o in others)
                if " in the " in expr or " near the " in expr or " on the " in expr or " at the " in expr:
                    phrase = expr.split(obj.label, 1)[1].strip()
                    if phrase.startswith(("in the", "at the", "on the")) and not phrase.startswith(("on the left", "on the right")):
                        assert all(syn._position_phrase(o.cx, o.cy, 128) != phrase for o in others)


def test_vqa_answers_agree_with_the_scene():
    scenes, rng = _scenes(60, seed=13)
    types = set()
    for i, scene in enumerate(scenes):
        sensor = syn.SENSORS[i % 4]
        s = syn.emit_vqa(scene, sensor, rng)
        qtype, subjects, answer = s.target["question_type"], s.target["subjects"], s.answer
        types.add(qtype)
        counts = {lab: sum(o.label == lab for o in scene.visible(sensor)) for lab in syn.OBJECT_CLASSES}
        fr = scene.fractions()
        assert answer == s.target["answer"]
        if qtype == "count":
            assert syn.PLURALS[subjects[0]] in s.prompt and answer == str(counts[subjects[0]])
        elif qtype == "presence":
            assert answer == ("yes" if counts[subjects[0]] else "no")
        elif qtype == "comparison":
            a, b = subjects
            assert answer == ("yes" if counts[a] > counts[b] else "no")
        elif qtype == "area":
            a, b = subjects
            assert answer == ("yes" if fr[a] > fr[b] else "no") and abs(fr[a] - fr[b]) >= 0.05
        else:
            assert qtype == "land_cover" and answer == ("yes" if fr[subjects[0]] >= 0.01 else "no")
    assert types == {"presence", "count", "comparison", "area", "land_cover"}


def test_segmentation_mask_matches_the_scene():
    scenes, rng = _scenes(12, seed=17)
    for scene in scenes:
        s = syn.emit_seg(scene, "rgb", rng)
        grid = s.target["mask"]
        if "label" in s.target:
            label = s.target["label"]
            truth = scene.semantic("rgb") == (syn.LC[label] + 1 if label in syn.LC else 8 + syn.OBJ[label])
            assert grid == formats.mask_to_grid(truth, {1: label})
            assert formats.grid_labels(grid) == [label]
        else:
            assert grid == formats.mask_to_grid(scene.semantic("rgb"), syn.Scene.semantic_names())


def test_scene_class_is_dominant():
    scenes, _ = _scenes(30, seed=19)
    for scene in scenes:
        fr = scene.fractions()
        own = syn.SCENE_LANDCOVER.get(scene.scene_class)
        if own is not None:
            assert fr[own] == max(fr.values())
        if scene.scene_class in ("river", "lake", "harbor"):
            assert fr["water"] > 0.08
        if scene.scene_class == "airport":
            assert any(o.label == "plane" for o in scene.objects)
        if scene.scene_class == "parking lot":
            assert sum(o.label == "vehicle" for o in scene.objects) >= 3


def test_every_scene_class_has_a_recipe_and_scenes_keep_to_it():
    assert list(syn.SCENE_RECIPES) == list(syn.SCENE_CLASSES)
    scenes, _ = _scenes(40, seed=23)
    for scene in scenes:
        specs = syn.SCENE_RECIPES[scene.scene_class].objects
        for label in syn.OBJECT_CLASSES:  # placement may fall short of a count, never exceed it
            assert sum(o.label == label for o in scene.objects) <= sum(s.hi for s in specs if s.label == label)


# --------------------------------------------------------------------------------------------------- change pairs


def test_change_pairs():
    rng = np.random.default_rng(23)
    kinds = set()
    for _ in range(25):
        pair = syn.make_change_pair(rng)
        kinds.add(pair.kind)
        before_b = [o for o in pair.before.objects if o.label == "building"]
        after_b = [o for o in pair.after.objects if o.label == "building"]
        if pair.kind == "none":
            assert not pair.mask.any() and "no change" in pair.captions
            assert np.array_equal(pair.before.landcover, pair.after.landcover)
        elif pair.kind == "appear":
            assert len(after_b) == len(before_b) + pair.count and pair.mask.any()
            new = [o for o in pair.after.objects if all(o is not b for b in pair.before.objects)]
            assert np.array_equal(pair.mask, np.any([o.mask for o in new], axis=0))
        elif pair.kind == "disappear":
            assert len(after_b) == len(before_b) - pair.count and pair.mask.any()
        else:
            assert np.array_equal(pair.mask, pair.before.landcover != pair.after.landcover)
        assert pair.before.noise_seed != pair.after.noise_seed
        sensor = syn.SENSORS[len(kinds) % 4]
        ccd = syn.emit_ccd(pair, sensor, rng)
        assert len(ccd.images) == 2 and ccd.answer in ccd.target["captions"]
        seg = syn.emit_change_seg(pair, sensor, rng)
        assert len(seg.images) == 2 and seg.target["change"] is True
        assert seg.target["mask"] == formats.mask_to_grid(pair.mask, {1: syn.CHANGE_LABEL})
        assert formats.parse_mask(seg.answer) == seg.target["mask"]
        assert np.array_equal(seg.target["change_pixels"], pair.mask)
        if pair.kind != "none":
            assert not np.array_equal(ccd.images[0], ccd.images[1])
    assert kinds == {"none", "appear", "disappear", "landcover"}


# --------------------------------------------------------------------------------------------------- sensor physics


def test_sensor_signatures():
    scenes, _ = _scenes(10, seed=29, classes=("harbor", "river", "industrial"))
    water_vv, urban_vv, vh_minus_vv, obj_vv = [], [], [], []
    water_ir, urban_ir, hot_ir = [], [], []
    for scene in scenes:
        lc = scene.landcover
        objects = syn._union(scene.objects, syn.OBJECT_CLASSES, 128)
        water, urban = (lc == syn.LC["water"]) & ~objects, np.isin(lc, [syn.LC["residential"], syn.LC["industrial"]]) & ~objects
        sar = syn.render_sar(scene)
        ir = syn.render_infrared(scene)[..., 0].astype(float)
        if water.any():
            water_vv.append(sar[..., 0][water].mean())
            water_ir.append(ir[water].mean())
        if urban.any():
            urban_vv.append(sar[..., 0][urban].mean())
            urban_ir.append(ir[urban].mean())
        vh_minus_vv.append((sar[..., 1] - sar[..., 0]).mean())
        for o in scene.objects:
            obj_vv.append(sar[..., 0][o.mask].mean())
            if o.label in syn.HOT_TARGETS:
                hot_ir.append(ir[o.mask].mean())
    assert np.mean(water_vv) < -18 < -10 < np.mean(urban_vv) and np.mean(obj_vv) > -3
    assert np.mean(vh_minus_vv) < -3
    assert np.mean(water_ir) + 40 < np.mean(urban_ir) < np.mean(hot_ir)
    forest = syn.make_scene(np.random.default_rng(1), 128, "forest")
    ms = syn.render_multispectral(forest).astype(float)
    veg = forest.landcover == syn.LC["forest"]
    b4, b8 = syn.MS_BANDS.index("B4"), syn.MS_BANDS.index("B8")
    assert ms[..., b8][veg].mean() > 4 * ms[..., b4][veg].mean()  # vegetation: high NIR, low red


# --------------------------------------------------------------------------------------------------- speed


def test_speed_sanity():
    gen = syn.SyntheticGenerator(seed=31)
    start = time.perf_counter()
    for _ in gen.samples(40):
        pass
    assert time.perf_counter() - start < 15.0  # ~0.3 s on one core; only catches pathological slowness
