"""Task emitters: a scene (or a change pair) and a sensor to one instruction :class:`~rsvlm_edge.training.sample.Sample`
per task, the answer rendered with :mod:`rsvlm_edge.formats` and the structured truth in ``target`` for the metrics.

An emitter returns None when this scene cannot give an unambiguous sample for its task; the generator then draws
another scene.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from rsvlm_edge.formats import format_box, format_detections, format_mask, format_oriented_detections, mask_to_grid
from rsvlm_edge.training.sample import Sample
from rsvlm_edge.training.synthetic.change import ChangePair
from rsvlm_edge.training.synthetic.language import (
    _COLS,
    _ROWS,
    _cap,
    _cell,
    _join,
    _object_groups,
    _plural,
    _region_phrase,
    _things,
)
from rsvlm_edge.training.synthetic.render import render
from rsvlm_edge.training.synthetic.scene import Scene, SceneObject
from rsvlm_edge.training.synthetic.vocab import (
    _N_LC,
    CHANGE_LABEL,
    HOT_TARGETS,
    LANDCOVER_CLASSES,
    LC,
    LC_AREA_WORDS,
    LC_ARTICLE_WORDS,
    LC_SEG_WORDS,
    LC_WORDS,
    OBJ,
    OBJECT_CLASSES,
    SCENE_LANDCOVER,
    SCENE_PHRASES,
    SENSOR_LANDCOVER,
    SENSOR_OBJECTS,
)


def _sample(images: list[np.ndarray], sensor: str, tag: str, text: str, answer: str, target: dict) -> Sample:
    return Sample(images=images, sensor=sensor, prompt=f"{tag} {text}", answer=answer, source="synthetic", target=target)


def _pick(rng: np.random.Generator, options: Sequence):
    return options[int(rng.integers(len(options)))]


def emit_cap(scene: Scene, sensor: str, rng: np.random.Generator) -> Sample | None:
    """Template captions from land-cover fractions and object groups with position words; every template is a
    reference (target ``captions``), the answer is one of them."""
    fr = scene.fractions()
    shown = [n for n in SENSOR_LANDCOVER[sensor] if n != "road"]
    lcs = sorted((n for n in shown if fr[n] >= 0.1), key=lambda n: -fr[n])[:2] or [max(shown, key=lambda n: fr[n])]
    own = SCENE_LANDCOVER.get(scene.scene_class)
    words = [LC_WORDS[n] for n in lcs]
    extra = [LC_WORDS[n] for n in lcs if n != own]
    objects = scene.visible(sensor)
    objs = _join(_object_groups(objects, scene.size))
    be = "are" if len(objects) > 1 else "is"
    road = " crossed by a road" if "road" in SENSOR_LANDCOVER[sensor] and fr["road"] >= 0.02 else ""
    place = SCENE_PHRASES[scene.scene_class]
    with_lc = f" with {_join(extra)}" if extra else ""
    if own is None:  # river, lake, airport ...: the land cover says something the scene name does not
        cover = f", mostly covered by {words[0]}" + (f" with some {words[1]}" if len(words) > 1 else "")
    else:
        cover = f" with some {_join(extra)}" if extra else ""
    refs = [
        f"An aerial image of {place}{with_lc}." + (f" There {be} {objs}." if objs else ""),
        f"{_cap(place)}{road}{cover}" + (f", with {objs}." if objs else "."),
        f"This image shows {place}{road}." + (f" It contains {objs}." if objs else ""),
        f"{_cap(objs)} {be} visible in this image of {place}." if objs else f"A view of {place}{with_lc}.",
        f"A remote sensing image of {place}" + (f" with {objs}." if objs else f"{cover}."),
    ]
    answer = _pick(rng, refs)
    prompt = _pick(rng, ("Describe the image.", "Write a short caption for this image.",
                         "Describe this remote sensing image.", "What does this image show?"))
    return _sample([render(scene, sensor)], sensor, "[CAP]", prompt, answer, {"captions": refs})


def emit_cls(scene: Scene, sensor: str, rng: np.random.Generator) -> Sample | None:
    prompt = _pick(rng, ("Classify the scene.", "What type of scene is this?", "What is the scene category of this image?",
                         "Classify this remote sensing image."))
    name = scene.scene_class
    return _sample([render(scene, sensor)], sensor, "[CLS]", prompt, name, {"class_name": name})


def _vqa_question(scene: Scene, sensor: str, rng: np.random.Generator) -> tuple[str, str, str, list[str]] | None:
    """(question type, question, answer, classes asked about) or None when this draw would be ambiguous."""
    objects = scene.visible(sensor)
    labels = SENSOR_OBJECTS[sensor]
    counts = {lab: sum(o.label == lab for o in objects) for lab in labels}
    fr = scene.fractions()
    lcs = [n for n in SENSOR_LANDCOVER[sensor] if n != "road"]
    qtype = str(rng.choice(["presence", "count", "comparison", "area", "land_cover"], p=[0.25, 0.3, 0.15, 0.15, 0.15]))
    if qtype == "presence":
        present = [lab for lab in labels if counts[lab]]
        absent = [lab for lab in labels if not counts[lab]]
        lab = _pick(rng, present) if present and (not absent or rng.random() < 0.5) else _pick(rng, absent)
        q = _pick(rng, (f"Is there {_things(lab, 1)} in the image?", f"Are there any {_plural(lab)}?",
                        f"Is there {_things(lab, 1)}?"))
        return qtype, q, "yes" if counts[lab] else "no", [lab]
    if qtype == "count":
        present = [lab for lab in labels if counts[lab]]
        lab = _pick(rng, present) if present and rng.random() < 0.85 else _pick(rng, labels)
        q = _pick(rng, (f"How many {_plural(lab)} are there?", f"How many {_plural(lab)} are in the image?",
                        f"What is the number of {_plural(lab)}?"))
        return qtype, q, str(counts[lab]), [lab]
    if qtype == "comparison":
        pairs = [(x, y) for x in labels for y in labels if x != y]
        differ = [p for p in pairs if counts[p[0]] != counts[p[1]]]
        a, b = _pick(rng, differ if differ and rng.random() < 0.8 else pairs)
        q = _pick(rng, (f"Are there more {_plural(a)} than {_plural(b)}?", f"Is the number of {_plural(a)} larger than "
                        f"the number of {_plural(b)}?"))
        return qtype, q, "yes" if counts[a] > counts[b] else "no", [a, b]
    if qtype == "area":
        a, b = (str(x) for x in rng.choice(lcs, 2, replace=False))
        if abs(fr[a] - fr[b]) < 0.05:  # too close to call by eye
            return None
        wa, wb = LC_AREA_WORDS[a], LC_AREA_WORDS[b]
        q = _pick(rng, (f"Is the {wa} larger than the {wb}?", f"Does the {wa} cover more of the image than the {wb}?"))
        return qtype, q, "yes" if fr[a] > fr[b] else "no", [a, b]
    present, absent = [n for n in lcs if fr[n] >= 0.01], [n for n in lcs if fr[n] == 0]
    name = _pick(rng, present) if present and (not absent or rng.random() < 0.5) else _pick(rng, absent or lcs)
    if 0 < fr[name] < 0.01:  # a few pixels: neither a clear yes nor a clear no
        return None
    q = _pick(rng, (f"Is there any {LC_WORDS[name]} in the image?", f"Is there {LC_ARTICLE_WORDS[name]}?"))
    return qtype, q, "yes" if fr[name] >= 0.01 else "no", [name]


def emit_vqa(scene: Scene, sensor: str, rng: np.random.Generator) -> Sample | None:
    for _ in range(10):
        qa = _vqa_question(scene, sensor, rng)
        if qa is not None:
            qtype, question, answer, subjects = qa
            return _sample([render(scene, sensor)], sensor, "[VQA]", question, answer,
                           {"question_type": qtype, "answer": answer, "subjects": subjects})
    return None


def _referring_expressions(obj: SceneObject, scene: Scene, sensor: str) -> list[str]:
    """Expressions that identify ``obj`` uniquely among the visible objects."""
    size = scene.size
    same = [o for o in scene.visible(sensor) if o.label == obj.label and o is not obj]
    label = obj.label
    exprs: list[str] = []
    if not same:
        exprs.append(f"the {label}")
    margin = 0.04
    x, y = obj.cx / size, obj.cy / size
    row, col = _cell(y), _cell(x)

    def clear(v: float, cell: int) -> bool:  # inside its third with a margin
        return cell / 3 + margin <= v <= (cell + 1) / 3 - margin

    def outside(v: float, cell: int) -> bool:  # clearly not in that third
        return v < cell / 3 - margin or v > (cell + 1) / 3 + margin

    if clear(x, col) and clear(y, row) and all(outside(o.cx / size, col) or outside(o.cy / size, row) for o in same):
        exprs.append(f"the {label} {_region_phrase(row, col)}")
    if row != 1 and clear(y, row) and all(outside(o.cy / size, row) for o in same):
        exprs.append(f"the {label} near the {_ROWS[row]}")
    if col != 1 and clear(x, col) and all(outside(o.cx / size, col) for o in same):
        exprs.append(f"the {label} on the {_COLS[col]}")
    if same:
        areas = [o.area for o in same]
        if obj.area >= 1.4 * max(areas):
            exprs.append(f"the largest {label}")
        if obj.area * 1.4 <= min(areas):
            exprs.append(f"the smallest {label}")
        gap = 0.08 * size
        if obj.cx + gap <= min(o.cx for o in same):
            exprs.append(f"the leftmost {label}")
        if obj.cx - gap >= max(o.cx for o in same):
            exprs.append(f"the rightmost {label}")
        if obj.cy + gap <= min(o.cy for o in same):
            exprs.append(f"the topmost {label}")
        if obj.cy - gap >= max(o.cy for o in same):
            exprs.append(f"the bottommost {label}")
    return exprs


def emit_vg(scene: Scene, sensor: str, rng: np.random.Generator) -> Sample | None:
    objects = scene.visible(sensor)
    order = rng.permutation(len(objects))
    for i in order:
        obj = objects[int(i)]
        exprs = _referring_expressions(obj, scene, sensor)
        if not exprs:
            continue
        expr = _pick(rng, exprs)
        prompt = _pick(rng, (expr, f"Locate {expr}.", f"Where is {expr}?", f"Find {expr}."))
        box = obj.box(scene.size)
        return _sample([render(scene, sensor)], sensor, "[VG]", prompt, format_box(box),
                       {"boxes": [box], "label": obj.label, "expression": expr})
    return None


def _heading_word(heading: float) -> str | None:
    """right / down / left / up when within 25 degrees of that direction."""
    k = round(heading / 90.0) % 4
    if abs((heading - 90.0 * round(heading / 90.0) + 180) % 360 - 180) > 25:
        return None
    return ("right", "down", "left", "up")[k]


def describe_object(obj: SceneObject) -> str:
    """Short [REF] description: ``a large ship heading right``, ``a storage tank``."""
    size_word = "small " if obj.size_rank < 0.3 else "large " if obj.size_rank > 0.7 else ""
    text = f"a {size_word}{obj.label}" if size_word else _things(obj.label, 1)
    if obj.label in ("ship", "plane"):
        way = _heading_word(obj.heading)
        if way:
            text += f" heading {way}"
    return text


def emit_ref(scene: Scene, sensor: str, rng: np.random.Generator) -> Sample | None:
    objects = scene.visible(sensor)
    if not objects:
        return None
    obj = _pick(rng, objects)
    box = obj.box(scene.size)
    return _sample([render(scene, sensor)], sensor, "[REF]", f"What is in the region {format_box(box)}?",
                   describe_object(obj), {"label": obj.label, "box": box})


def _detection_query(scene: Scene, sensor: str, rng: np.random.Generator) -> tuple[str, tuple[str, ...]]:
    """(what to say after "Detect all", labels asked for)."""
    labels = SENSOR_OBJECTS[sensor]
    present = [lab for lab in labels if any(o.label == lab for o in scene.visible(sensor))]
    r = rng.random()
    if sensor == "ir" and r < 0.35:
        return "hot targets", HOT_TARGETS
    if sensor == "sar" and r < 0.4:
        return "ships", ("ship",)
    if r < 0.45:
        return "objects", labels
    lab = _pick(rng, present) if present and rng.random() < 0.85 else _pick(rng, labels)
    return _plural(lab), (lab,)


def _sorted_objects(objects: Sequence[SceneObject], labels: Sequence[str]) -> list[SceneObject]:
    chosen = [o for o in objects if o.label in labels]
    return sorted(chosen, key=lambda o: (OBJECT_CLASSES.index(o.label), round(o.cy), round(o.cx)))


def emit_det(scene: Scene, sensor: str, rng: np.random.Generator) -> Sample | None:
    what, labels = _detection_query(scene, sensor, rng)
    dets = [(o.label, o.box(scene.size)) for o in _sorted_objects(scene.visible(sensor), labels)]
    return _sample([render(scene, sensor)], sensor, "[DET]", f"Detect all {what}.", format_detections(dets),
                   {"detections": dets, "labels": list(labels)})


def emit_obb(scene: Scene, sensor: str, rng: np.random.Generator) -> Sample | None:
    what, labels = _detection_query(scene, sensor, rng)
    obbs = [(o.label, o.obb(scene.size)) for o in _sorted_objects(scene.visible(sensor), labels)]
    return _sample([render(scene, sensor)], sensor, "[OBB]", f"Detect all {what} with oriented boxes.",
                   format_oriented_detections(obbs), {"obbs": obbs, "labels": list(labels)})


def _has_label(grid: list[list[str]], label: str) -> bool:
    return any(label in row for row in grid)


def emit_seg(scene: Scene, sensor: str, rng: np.random.Generator) -> Sample | None:
    sem = scene.semantic(sensor)
    fr = scene.fractions()
    if sensor in ("rgb", "ms") and rng.random() < 0.2:
        grid = mask_to_grid(sem, Scene.semantic_names())
        labels = sorted({c for row in grid for c in row}, key=lambda c: (LANDCOVER_CLASSES + OBJECT_CLASSES).index(c))
        prompt = _pick(rng, ("Segment the image.", "Segment all land cover and objects."))
        return _sample([render(scene, sensor)], sensor, "[SEG]", prompt, format_mask(grid), {"mask": grid, "labels": labels})
    pixels = np.bincount(sem.ravel(), minlength=_N_LC + 1 + len(OBJECT_CLASSES))
    cell = (scene.size / 24) ** 2  # classes smaller than ~1.5 grid cells rarely win a cell: skip them up front
    options = [(n, LC_SEG_WORDS[n], LC[n] + 1) for n in SENSOR_LANDCOVER[sensor] if fr[n] >= 0.03]
    options += [(lab, f"the {_plural(lab)}", _N_LC + 1 + OBJ[lab]) for lab in SENSOR_OBJECTS[sensor]]
    options = [opt for opt in options if pixels[opt[2]] >= 1.5 * cell]
    for i in rng.permutation(len(options)):
        label, words, value = options[int(i)]
        grid = mask_to_grid(sem == value, {1: label})
        if _has_label(grid, label):
            return _sample([render(scene, sensor)], sensor, "[SEG]", f"Segment {words}.", format_mask(grid),
                           {"mask": grid, "label": label})
    return None


def emit_change_seg(pair: ChangePair, sensor: str, rng: np.random.Generator) -> Sample:
    grid = mask_to_grid(pair.mask, {1: CHANGE_LABEL})
    if pair.kind in ("appear", "disappear"):
        prompt = _pick(rng, ("Segment the changed buildings.", "Segment the building changes.", "Segment the changes."))
    else:
        prompt = _pick(rng, ("Segment the changes.", "Segment the changed areas."))
    images = [render(pair.before, sensor), render(pair.after, sensor)]
    return _sample(images, sensor, "[SEG]", prompt, format_mask(grid),
                   {"mask": grid, "change": True, "label": CHANGE_LABEL, "change_pixels": pair.mask.copy()})


def emit_ccd(pair: ChangePair, sensor: str, rng: np.random.Generator) -> Sample:
    prompt = _pick(rng, ("Describe the changes between the two images.", "What changed between the two images?",
                         "Describe the changes."))
    images = [render(pair.before, sensor), render(pair.after, sensor)]
    return _sample(images, sensor, "[CCD]", prompt, _pick(rng, pair.captions),
                   {"captions": list(pair.captions), "change_kind": pair.kind})


SCENE_EMITTERS = {"[CAP]": emit_cap, "[CLS]": emit_cls, "[VQA]": emit_vqa, "[VG]": emit_vg, "[REF]": emit_ref,
                  "[DET]": emit_det, "[OBB]": emit_obb, "[SEG]": emit_seg}
#: Scene classes drawn for tasks that need objects (per sensor, at most the ones whose objects it shows).
_OBJECT_SCENES = {
    "rgb": ("residential", "industrial", "airport", "harbor", "parking lot", "river", "farmland"),
    "sar": ("harbor", "river", "airport", "industrial", "residential", "parking lot"),
    "ir": ("parking lot", "harbor", "river", "industrial", "airport", "residential"),
    "ms": ("industrial", "harbor", "airport", "residential", "river"),
}
_OBJECT_TASKS = ("[VG]", "[REF]", "[DET]", "[OBB]")
