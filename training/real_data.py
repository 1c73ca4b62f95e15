"""Loaders for the real sample sets in ``shared/data`` -> :class:`~rsvlm_edge.training.sample.Sample` lists.

The data folder is ``root`` when given, else ``$RSVLM_DATA``, else ``<repo>/../shared/data``. Nothing is cached on
disk and nothing is copied. A missing set raises :class:`FileNotFoundError` (the training recipe skips it).

Splits (``split`` = ``"train"``, ``"test"`` or ``"all"``) are deterministic and disjoint. Unless a set ships its own
split, items are ranked by the SHA-1 of a stable key (file name, image id, patch name) and the first
``round(0.2 * n)`` (at least 1 when there are 2 or more) are ``"test"``; AID does this per class so both splits keep
the class balance. The key is the *image*, so every question / task of an image lands in the same split. Split
membership depends only on the set of keys, so it is stable from run to run (adding files can move a few items).

Per set (answers follow docs/design.md and are rendered with :mod:`rsvlm_edge.formats`):

* ``aid``: [CLS] "Classify the scene." -> class name in lower-case words, and [CAP] "Describe the image." ->
  a caption template over the class. Target ``class_name``.
* ``rsvqa_lr``: [VQA] question -> the answer text of the data ("yes", "no", integers, "rural", "urban"); split by
  image id. Target ``question_type``, ``answer``.
* ``levir_cd``: two-image [SEG] change mask (label ``building``) and [CCD] template caption from the number of
  changed regions. The sample folder keeps LEVIR-CD's own split in the file names; ``train_*``/``val_*`` pairs are
  "train" (with the 8 flips/rotations of each pair, masks transformed alike), ``test_*`` pairs are "test".
* ``sirst``: infrared small targets, 1-band uint8 ``ir``: [DET] and [SEG] (label ``target``); the ``idx_427``
  split (trainval -> "train", test -> "test"). Boxes come from the connected components of the pixel masks: the
  VOC xml files hold one box per image, the union of all targets.
* ``bigearthnet``: S2 (12 bands, ``ms``) and S1 (VV, VH dB, ``sar``) patches, [CLS] "List the land cover classes."
  -> the CORINE labels; S1 follows its S2 patch's split.
* ``dota``: [OBB] and [DET] for label files whose image exists.
* ``hrsid``: SAR ship crops (8-bit grey PNG -> ``sar`` uint8, both channels the single polarisation): [DET] and
  [SEG] ships from the instance-id masks.

Axis-aligned boxes are the smallest integer 0..100 box enclosing the object (floor / ceil), so small targets never
collapse to an empty box. [SEG] grids of the small-object sets (SIRST, HRSID) mark a cell when any of its pixels is
foreground (``target["mask_rule"] == "any"``); LEVIR-CD uses :func:`~rsvlm_edge.formats.mask_to_grid`'s majority
vote.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from rsvlm_edge.formats import (
    BACKGROUND,
    MASK_SIZE,
    format_class_list,
    format_detections,
    format_mask,
    format_oriented_detections,
    mask_to_grid,
    obb_from_corners,
    parse_detections,
    parse_oriented_detections,
)
from rsvlm_edge.imageio import read_band_stack, read_image
from rsvlm_edge.preprocess import MS_BANDS, guess_sensor, to_single_band
from rsvlm_edge.training.sample import Sample

DATA_ENV = "RSVLM_DATA"
SPLITS = ("train", "test", "all")
TEST_FRACTION = 0.2
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")


# --------------------------------------------------------------------------------------------------- paths, splits


def default_root() -> Path:
    """``$RSVLM_DATA``, else the ``data`` folder of the ``shared`` directory beside the repository."""
    env = os.environ.get(DATA_ENV)
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _root(root: str | os.PathLike | None) -> Path:
    return Path(root) if root is not None else default_root()


def _require(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise FileNotFoundError(f"{what} data not found at {path} (pass root= or set ${DATA_ENV})")
    return path


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")


def split_hash(key: str) -> int:
    """Stable 64-bit hash of a key (Python's ``hash`` is salted per process)."""
    return int.from_bytes(hashlib.sha1(key.encode("utf-8")).digest()[:8], "big")


def held_out_keys(keys: Iterable[str], fraction: float = TEST_FRACTION) -> set[str]:
    """The held-out keys: the ``round(fraction * n)`` lowest hashes (at least one when n >= 2)."""
    unique = sorted(set(keys))
    if len(unique) < 2:
        return set()
    count = max(1, round(fraction * len(unique)))
    return set(sorted(unique, key=lambda k: (split_hash(k), k))[:count])




def _wanted(is_test: bool, split: str) -> bool:
    return split == "all" or is_test == (split == "test")


def _take(samples: Iterator[Sample], limit: int | None) -> list[Sample]:
    out: list[Sample] = []
    if limit is not None and limit <= 0:
        return out
    for sample in samples:
        out.append(sample)
        if limit is not None and len(out) >= limit:
            break
    return out


def _by_hash(keys: Iterable[str]) -> list[str]:
    """Deterministic shuffle, so a ``limit`` takes a mixed subset (classes, images) rather than the first folder."""
    return sorted(keys, key=lambda k: (split_hash("order:" + k), k))


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


# --------------------------------------------------------------------------------------------------- geometry helpers


def connected_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected components of a 2-D bool mask: (int32 labels 1..n, 0 = background; n), in raster order.

    Runs of foreground pixels are joined with a union-find over touching runs of consecutive rows.
    """
    m = np.asarray(mask, dtype=bool)
    if m.ndim != 2:
        raise ValueError(f"expected a 2-D mask, got shape {m.shape}")
    h, w = m.shape
    padded = np.zeros((h, w + 2), dtype=np.int8)
    padded[:, 1:-1] = m
    edges = np.diff(padded, axis=1)
    sy, sx = np.nonzero(edges == 1)
    _, ex = np.nonzero(edges == -1)  # same rows and order as the starts: one end per run
    n = len(sy)
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    row_start = np.searchsorted(sy, np.arange(h + 1))
    for y in range(1, h):
        a0, a1 = row_start[y - 1], row_start[y]  # runs of the previous row
        b0, b1 = row_start[y], row_start[y + 1]
        i = a0
        for j in range(b0, b1):
            # move past previous-row runs that end before this run starts (diagonal contact allowed)
            while i < a1 and ex[i] < sx[j]:
                i += 1
            k = i
            while k < a1 and sx[k] <= ex[j]:
                ri, rj = find(k), find(j)
                if ri != rj:
                    parent[max(ri, rj)] = min(ri, rj)
                k += 1
    labels = np.zeros((h, w), dtype=np.int32)
    ids: dict[int, int] = {}
    for r in range(n):
        root = find(r)
        label = ids.setdefault(root, len(ids) + 1)
        labels[sy[r], sx[r]:ex[r]] = label
    return labels, len(ids)


def enclosing_box(x0: float, y0: float, x1: float, y1: float, width: int, height: int) -> tuple[int, int, int, int]:
    """Pixel box (x0, y0 inclusive; x1, y1 exclusive) -> smallest integer 0..100 box that encloses it."""
    def norm(v: float, size: int, up: bool) -> int:
        scaled = min(100.0, max(0.0, 100.0 * v / size))
        return int(math.ceil(scaled - 1e-9)) if up else int(math.floor(scaled + 1e-9))
    return norm(x0, width, False), norm(y0, height, False), norm(x1, width, True), norm(y1, height, True)


def _component_boxes(labels: np.ndarray, count: int) -> list[tuple[int, int, int, int]]:
    """Enclosing 0..100 boxes of labelled regions, ordered top-to-bottom, left-to-right."""
    h, w = labels.shape
    boxes = []
    for i in range(1, count + 1):
        ys, xs = np.nonzero(labels == i)
        if ys.size:
            boxes.append(enclosing_box(xs.min(), ys.min(), xs.max() + 1, ys.max() + 1, w, h))
    return sorted(boxes, key=lambda b: (b[1], b[0], b[3], b[2]))


def any_grid(mask: np.ndarray) -> np.ndarray:
    """24x24 bool grid: a cell is set when any pixel in it is (cells as in :func:`mask_to_grid`)."""
    m = np.asarray(mask, dtype=bool)
    h, w = m.shape
    rows = [(i * h // MASK_SIZE, max(i * h // MASK_SIZE + 1, (i + 1) * h // MASK_SIZE)) for i in range(MASK_SIZE)]
    cols = [(i * w // MASK_SIZE, max(i * w // MASK_SIZE + 1, (i + 1) * w // MASK_SIZE)) for i in range(MASK_SIZE)]
    out = np.zeros((MASK_SIZE, MASK_SIZE), dtype=bool)
    for r, (r0, r1) in enumerate(rows):
        band = np.asarray(m[r0:r1].any(axis=0))
        for c, (c0, c1) in enumerate(cols):
            out[r, c] = band[c0:c1].any()
    return out


def any_label_grid(mask: np.ndarray, label: str) -> list[list[str]]:
    """:func:`any_grid` as a label grid: the same as ``mask_to_grid(any_grid(mask), {1: label})`` (a 24x24 input has
    one pixel per cell), without its per-cell ``np.unique``."""
    return [[label if cell else BACKGROUND for cell in row] for row in any_grid(mask).tolist()]


def _resize_nearest(mask: np.ndarray, width: int, height: int) -> np.ndarray:
    from PIL import Image

    image = Image.fromarray(np.asarray(mask, dtype=np.uint8) * 255)
    return np.asarray(image.resize((width, height), Image.Resampling.NEAREST)) > 127


# --------------------------------------------------------------------------------------------------- AID

AID_FOLDERS: tuple[str, ...] = (
    "Airport", "BareLand", "BaseballField", "Beach", "Bridge", "Center", "Church", "Commercial", "DenseResidential",
    "Desert", "Farmland", "Forest", "Industrial", "Meadow", "MediumResidential", "Mountain", "Park", "Parking",
    "Playground", "Pond", "Port", "RailwayStation", "Resort", "River", "School", "SparseResidential", "Square",
    "Stadium", "StorageTanks", "Viaduct",
)


def camel_to_words(name: str) -> str:
    """``"BaseballField"`` -> ``"baseball field"``."""
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", " ", name).replace("_", " ").lower().strip()


#: The 30 AID classes as answered by [CLS] (lower-case words, folder order).
AID_CLASSES: list[str] = [camel_to_words(f) for f in AID_FOLDERS]

_AID_PHRASES = {
    "airport": "an airport", "bare land": "an area of bare land", "baseball field": "a baseball field",
    "beach": "a beach", "bridge": "a bridge", "center": "a city center", "church": "a church",
    "commercial": "a commercial area", "dense residential": "a dense residential area", "desert": "a desert",
    "farmland": "farmland", "forest": "a forest", "industrial": "an industrial area", "meadow": "a meadow",
    "medium residential": "a medium residential area", "mountain": "a mountain", "park": "a park",
    "parking": "a parking lot", "playground": "a playground", "pond": "a pond", "port": "a port",
    "railway station": "a railway station", "resort": "a resort", "river": "a river", "school": "a school",
    "sparse residential": "a sparse residential area", "square": "a square", "stadium": "a stadium",
    "storage tanks": "storage tanks", "viaduct": "a viaduct",
}
CAPTION_TEMPLATES: tuple[str, ...] = ("an aerial image of {}", "a satellite image of {}",
                                      "a remote sensing image showing {}", "an overhead view of {}")


def aid_captions(class_name: str) -> list[str]:
    """Every template caption of an AID class (the references for caption metrics)."""
    phrase = _AID_PHRASES.get(class_name) or (("an " if class_name[:1] in "aeiou" else "a ") + class_name)
    return [template.format(phrase) for template in CAPTION_TEMPLATES]


def aid_caption(class_name: str, key: str = "") -> str:
    """One template caption over an AID class; the template is picked by ``key`` (deterministic)."""
    return aid_captions(class_name)[split_hash("cap:" + key) % len(CAPTION_TEMPLATES)]


def aid_index(split: str = "all", root: str | os.PathLike | None = None) -> dict[str, tuple[Path, str]]:
    """``"Folder/file.jpg" -> (path, class name)`` of one split, without reading any image (split per class)."""
    _check_split(split)
    folder = _require(_root(root) / "aid", "AID")
    index: dict[str, tuple[Path, str]] = {}
    for class_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
        name = camel_to_words(class_dir.name)
        files = [f"{class_dir.name}/{p.name}" for p in _images_in(class_dir)]
        held = held_out_keys(files)
        for key in files:
            if _wanted(key in held, split):
                index[key] = (folder / key, name)
    return index


def load_aid(split: str = "train", root: str | os.PathLike | None = None, limit: int | None = None) -> list[Sample]:
    """AID scenes: one [CLS] and one [CAP] sample per image (sharing the image array), split per class."""
    keys = aid_index(split, root)

    def generate() -> Iterator[Sample]:
        for key in _by_hash(keys):
            path, name = keys[key]
            image = read_image(path)
            target = {"class_name": name, "file": key}
            yield Sample([image], "rgb", "[CLS] Classify the scene.", name, "aid", dict(target))
            yield Sample([image], "rgb", "[CAP] Describe the image.", aid_caption(name, key), "aid",
                         dict(target, captions=aid_captions(name)))

    return _take(generate(), limit)


# --------------------------------------------------------------------------------------------------- RSVQA-LR

_JS_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "b": "\b", "f": "\f", "v": "\v", "0": "\0"}


def read_js_json(path: Path):
    """``var x = JSON.parse('...');`` -> the parsed JSON (JavaScript string escapes undone first)."""
    text = path.read_text(encoding="utf-8")
    start = text.find("JSON.parse(")
    if start < 0:
        raise ValueError(f"{path}: no JSON.parse(...) wrapper found")
    quote_at = start + len("JSON.parse(")
    quote = text[quote_at]
    if quote not in "'\"`":
        raise ValueError(f"{path}: JSON.parse argument is not a string literal")
    out, i = [], quote_at + 1
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text):
            nxt = text[i + 1]
            if nxt == "u":
                out.append(chr(int(text[i + 2:i + 6], 16)))
                i += 6
                continue
            out.append(_JS_ESCAPES.get(nxt, nxt))
            i += 2
            continue
        if ch == quote:
            return json.loads("".join(out))
        out.append(ch)
        i += 1
    raise ValueError(f"{path}: unterminated string literal in JSON.parse(...)")


def load_rsvqa_lr(split: str = "train", root: str | os.PathLike | None = None,
                  limit: int | None = None) -> list[Sample]:
    """RSVQA low-resolution (Sentinel-2 RGB): one [VQA] sample per active question; split by image id."""
    _check_split(split)
    folder = _require(_root(root) / "rsvqa_lr", "RSVQA-LR")
    questions = read_js_json(folder / "questionsS2_reduced.js")["questions"]
    answers = {a["id"]: a for a in read_js_json(folder / "answersS2_reduced.js")["answers"] if a.get("active", True)}
    image_dir = folder / "data_S2_reduced"
    usable = []
    for q in questions:
        if not q.get("active", True):
            continue
        ids = [i for i in q.get("answers_ids", []) if i in answers]
        if not ids or not (image_dir / f"{q['img_id']}.png").is_file():
            continue
        usable.append((q, answers[ids[0]]["answer"]))
    held = held_out_keys(str(q["img_id"]) for q, _ in usable)
    chosen = {str(q["id"]): (q, a) for q, a in usable if _wanted(str(q["img_id"]) in held, split)}
    cache: dict[int, np.ndarray] = {}

    def generate() -> Iterator[Sample]:
        for key in _by_hash(chosen):
            q, answer = chosen[key]
            image_id = int(q["img_id"])
            if image_id not in cache:
                cache[image_id] = read_image(image_dir / f"{image_id}.png")
            text = " ".join(str(answer).split()).lower()
            target = {"question_type": q["type"], "answer": text, "image_id": image_id, "question_id": q["id"]}
            yield Sample([cache[image_id]], "rgb", f"[VQA] {' '.join(q['question'].split())}", text, "rsvqa_lr",
                         target)

    return _take(generate(), limit)


# --------------------------------------------------------------------------------------------------- LEVIR-CD

LEVIR_FIGURES = frozenset({"test_113_0256.png"})  # a figure in the sample folder, not an image pair
CHANGE_LABEL = "building"
_CCD_CAPTIONS = {
    "none": ("no change", "there is no change", "the two images are the same"),
    "one": ("a new building was built", "one building was built", "a building appears in the scene"),
    "few": ("a few new buildings were built", "several buildings were built", "some new buildings appear"),
    "many": ("many new buildings were built", "lots of buildings were built", "many buildings appear in the scene"),
    "most": ("many new buildings were built, covering a large part of the area",
             "a large area was built up with many buildings", "many buildings were built across the scene"),
}
_MIN_CHANGE_PIXELS = 10  # connected regions smaller than this are label noise, not a building


def change_summary(change: np.ndarray) -> tuple[str, int, float]:
    """(caption bucket, number of changed regions, changed fraction) of a bool change mask."""
    labels, count = connected_components(change)
    sizes = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    regions = int((sizes >= _MIN_CHANGE_PIXELS).sum())
    fraction = float(np.mean(change))
    if regions == 0:
        bucket = "none"
    elif regions == 1:
        bucket = "one"
    elif regions <= 4:
        bucket = "few"
    elif fraction < 0.25:
        bucket = "many"
    else:
        bucket = "most"
    return bucket, regions, fraction


def change_caption(change: np.ndarray) -> str:
    """Template [CCD] caption from the number of changed regions and the changed fraction."""
    return _CCD_CAPTIONS[change_summary(change)[0]][0]


def _dihedral(array: np.ndarray, k: int, flip: bool) -> np.ndarray:
    out = np.rot90(array, k, axes=(0, 1))
    return np.ascontiguousarray(out[:, ::-1] if flip else out)


def levir_split(name: str) -> str:
    """LEVIR-CD's own split from the file name: ``train_*``/``val_*`` -> train, ``test_*`` -> test."""
    prefix = name.split("_", 1)[0]
    if prefix in ("train", "val"):
        return "train"
    if prefix == "test":
        return "test"
    return "test" if split_hash(name) % 5 == 0 else "train"


def levir_pairs(root: str | os.PathLike | None = None) -> list[str]:
    """File names with an A, B and label image of the same size (the figure excluded)."""
    folder = _require(_root(root) / "levir_cd" / "samples", "LEVIR-CD")
    names = []
    for path in _images_in(folder / "label") if (folder / "label").is_dir() else []:
        if path.name in LEVIR_FIGURES:
            continue
        if (folder / "A" / path.name).is_file() and (folder / "B" / path.name).is_file():
            names.append(path.name)
    return names


def load_levir_cd(split: str = "train", root: str | os.PathLike | None = None, limit: int | None = None,
                  augment: bool | None = None) -> list[Sample]:
    """Change pairs: a two-image [SEG] change mask and a [CCD] caption per pair.

    ``augment`` (default: on for ``split="train"``) adds the 8 flips / 90-degree rotations of each pair (images and
    mask transformed together; the caption does not change), since the sample folder holds only a handful of pairs.
    """
    _check_split(split)
    folder = _require(_root(root) / "levir_cd" / "samples", "LEVIR-CD")
    augment = split == "train" if augment is None else augment
    names = [n for n in levir_pairs(root) if _wanted(levir_split(n) == "test", split)]

    def generate() -> Iterator[Sample]:
        for name in names:
            before, after = read_image(folder / "A" / name), read_image(folder / "B" / name)
            label = read_image(folder / "label" / name)
            if before.shape[:2] != after.shape[:2] or before.shape[:2] != label.shape[:2]:
                continue  # not a registered pair
            change = label[:, :, 0] > 0
            variants = [(k, f) for f in (False, True) for k in range(4)] if augment else [(0, False)]
            for k, flip in variants:
                a, b, m = (_dihedral(x, k, flip) for x in (before, after, change))
                grid = mask_to_grid(m, {1: CHANGE_LABEL})
                bucket, regions, fraction = change_summary(m)
                view = f"rot{90 * k}" + ("-flip" if flip else "")
                base = {"file": name, "view": view, "change_pixels": m}
                yield Sample([a, b], "rgb", "[SEG] Segment the changed buildings.", format_mask(grid), "levir_cd",
                             dict(base, mask=grid, change=True, label=CHANGE_LABEL))
                yield Sample([a, b], "rgb", "[CCD] Describe the changes between the two images.",
                             _CCD_CAPTIONS[bucket][0], "levir_cd",
                             dict(base, captions=list(_CCD_CAPTIONS[bucket]), n_changes=regions,
                                  change_fraction=fraction))

    return _take(generate(), limit)


# --------------------------------------------------------------------------------------------------- SIRST


def sirst_split(root: str | os.PathLike | None = None) -> dict[str, str]:
    """Image stem -> "train"/"test" from ``idx_427`` (trainval / test); hashed split for stems not listed."""
    folder = _require(_root(root) / "sirst", "SIRST")
    stems = [p.stem for p in _images_in(folder / "images")] if (folder / "images").is_dir() else []
    listed: dict[str, str] = {}
    idx = folder / "idx_427"
    for name, value in (("trainval.txt", "train"), ("train.txt", "train"), ("val.txt", "train"), ("test.txt", "test")):
        if (idx / name).is_file():
            for stem in (idx / name).read_text().split():
                listed.setdefault(stem, value)
    held = held_out_keys(s for s in stems if s not in listed)
    return {s: listed.get(s, "test" if s in held else "train") for s in stems}


def load_sirst(split: str = "train", root: str | os.PathLike | None = None, limit: int | None = None) -> list[Sample]:
    """Infrared small targets: [DET] and [SEG] per image (1-band uint8 ``ir``)."""
    _check_split(split)
    folder = _require(_root(root) / "sirst", "SIRST")
    splits = sirst_split(root)
    stems = [s for s in sorted(splits) if _wanted(splits[s] == "test", split)
             and (folder / "masks" / f"{s}_pixels0.png").is_file()]

    def generate() -> Iterator[Sample]:
        for stem in stems:
            image = to_single_band(read_image(folder / "images" / f"{stem}.png"))
            if image.dtype != np.uint8:
                image = image.astype(np.uint8)
            mask = read_image(folder / "masks" / f"{stem}_pixels0.png")[:, :, 0] > 0
            height, width = image.shape[:2]
            if mask.shape != (height, width):  # Misc_111: mask saved at another resolution than the image
                mask = _resize_nearest(mask, width, height)
            labels, count = connected_components(mask)
            dets = [("target", box) for box in _component_boxes(labels, count)]
            answer = format_detections(dets)
            grid = any_label_grid(mask, "target")
            base = {"file": stem}
            yield Sample([image], "ir", "[DET] Detect the infrared small targets.", answer, "sirst",
                         dict(base, detections=parse_detections(answer), labels=["target"]))
            yield Sample([image], "ir", "[SEG] Segment the infrared small targets.", format_mask(grid), "sirst",
                         dict(base, mask=grid, label="target", mask_rule="any", mask_pixels=mask))

    return _take(generate(), limit)


# --------------------------------------------------------------------------------------------------- BigEarthNet


def clean_corine_label(label: str) -> str:
    """Lower-case, commas removed (a class list is comma-separated), whitespace collapsed."""
    return " ".join(label.replace(",", " ").lower().split())


def _patch_labels(folder: Path) -> tuple[list[str], dict]:
    files = sorted(folder.glob("*_labels_metadata.json"))
    if not files:
        raise FileNotFoundError(f"no *_labels_metadata.json in {folder}")
    meta = json.loads(files[0].read_text())
    return [clean_corine_label(lab) for lab in meta.get("labels", [])], meta


def load_bigearthnet(split: str = "train", root: str | os.PathLike | None = None,
                     limit: int | None = None) -> list[Sample]:
    """Multi-label land cover [CLS] on S2 (``ms``, HxWx12 uint16) and S1 (``sar``, HxWx2 float32 dB: VV, VH)."""
    _check_split(split)
    folder = _require(_root(root) / "bigearthnet", "BigEarthNet")
    s2 = sorted(p for p in folder.glob("*S2*/*") if p.is_dir())
    s1 = sorted(p for p in folder.glob("*S1*/*") if p.is_dir())
    s1_meta = {}
    for patch in s1:
        labels, meta = _patch_labels(patch)
        s1_meta[patch] = (labels, meta.get("corresponding_s2_patch") or patch.name)
    held = held_out_keys([p.name for p in s2] + [key for _, key in s1_meta.values()])
    prompt = "[CLS] List the land cover classes."

    def generate() -> Iterator[Sample]:
        for patch in s2:
            if not _wanted(patch.name in held, split):
                continue
            labels, _ = _patch_labels(patch)
            paths = [patch / f"{patch.name}_{band}.tif" for band in MS_BANDS]
            if not all(p.is_file() for p in paths):
                continue
            stack = read_band_stack(paths)
            yield Sample([stack], "ms", prompt, format_class_list(labels), "bigearthnet",
                         {"labels": labels, "patch": patch.name})
        for patch, (labels, key) in s1_meta.items():
            if not _wanted(key in held, split):
                continue
            vv, vh = patch / f"{patch.name}_VV.tif", patch / f"{patch.name}_VH.tif"
            if not (vv.is_file() and vh.is_file()):
                continue
            a, b = read_image(vv), read_image(vh)
            if a.shape != b.shape:
                continue
            array = np.concatenate([a, b], axis=2).astype(np.float32)
            yield Sample([array], "sar", prompt, format_class_list(labels), "bigearthnet",
                         {"labels": labels, "patch": patch.name, "s2_patch": key})

    return _take(generate(), limit)


# --------------------------------------------------------------------------------------------------- DOTA


def parse_dota_labels(path: Path) -> list[tuple[str, np.ndarray, int]]:
    """(label, corners (4, 2) in pixels, difficult) per object; 'imagesource:'/'gsd:' headers skipped."""
    objects = []
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) < 9 or ":" in parts[0]:
            continue
        try:
            corners = np.array([float(v) for v in parts[:8]], dtype=np.float64).reshape(4, 2)
        except ValueError:
            continue
        difficult = int(parts[9]) if len(parts) > 9 and parts[9].isdigit() else 0
        objects.append((parts[8].lower(), corners, difficult))
    return objects


def load_dota(split: str = "train", root: str | os.PathLike | None = None, limit: int | None = None,
              max_objects: int | None = None) -> list[Sample]:
    """DOTA v1: [OBB] (oriented boxes from the 8-point corners) and [DET] (their enclosing boxes) per image.

    Images are kept at full size (the preprocessor resizes); ``max_objects`` optionally caps very long answers
    (P0706 has 536 objects) to the first objects in file order.
    """
    _check_split(split)
    folder = _require(_root(root) / "dota" / "example", "DOTA")
    images = {p.stem: p for p in _images_in(folder / "images")} if (folder / "images").is_dir() else {}
    labels = sorted(p for p in (folder / "labelTxt").glob("*.txt")) if (folder / "labelTxt").is_dir() else []
    stems = [p.stem for p in labels if p.stem in images]
    held = held_out_keys(stems)

    def generate() -> Iterator[Sample]:
        for stem in stems:
            if not _wanted(stem in held, split):
                continue
            image = read_image(images[stem])
            height, width = image.shape[:2]
            objects = parse_dota_labels(folder / "labelTxt" / f"{stem}.txt")[:max_objects]
            scale = np.array([100.0 / width, 100.0 / height])
            obbs = [(lab, obb_from_corners(corners * scale)) for lab, corners, _ in objects]
            boxes = []
            for lab, corners, _ in objects:
                (x0, y0), (x1, y1) = corners.min(axis=0), corners.max(axis=0)
                boxes.append((lab, enclosing_box(x0, y0, x1, y1, width, height)))
            obb_text, det_text = format_oriented_detections(obbs), format_detections(boxes)
            classes = sorted({lab for lab, _, _ in objects})
            base = {"file": stem, "labels": classes, "difficult": [d for _, _, d in objects]}
            yield Sample([image], "rgb", "[OBB] Detect all objects with oriented boxes.", obb_text, "dota",
                         dict(base, obbs=parse_oriented_detections(obb_text)))
            yield Sample([image], "rgb", "[DET] Detect all objects.", det_text, "dota",
                         dict(base, detections=parse_detections(det_text)))

    return _take(generate(), limit)


# --------------------------------------------------------------------------------------------------- HRSID


def hrsid_instances(id_mask: np.ndarray) -> np.ndarray:
    """Instance-id RGB mask (one colour per ship, black background) -> int32 labels 1..n in colour order."""
    rgb = np.asarray(id_mask)[:, :, :3].astype(np.int32)
    codes = (rgb[:, :, 0] << 16) | (rgb[:, :, 1] << 8) | rgb[:, :, 2]
    values, inverse = np.unique(codes, return_inverse=True)
    labels = inverse.reshape(codes.shape).astype(np.int32)
    if values[0] != 0:  # no background colour at all
        labels += 1
    return labels


def load_hrsid(split: str = "train", root: str | os.PathLike | None = None, limit: int | None = None) -> list[Sample]:
    """HRSID SAR ship crops: [DET] ships (one box per instance colour) and [SEG] ships."""
    _check_split(split)
    folder = _require(_root(root) / "hrsid" / "data", "HRSID")
    stems = [p.stem for p in _images_in(folder) if not p.stem.endswith(("_instance_id_RGB", "_instance_color_RGB"))
             and (folder / f"{p.stem}_instance_id_RGB.png").is_file()]
    held = held_out_keys(stems)

    def generate() -> Iterator[Sample]:
        for stem in stems:
            if not _wanted(stem in held, split):
                continue
            grey = to_single_band(read_image(folder / f"{stem}.png"))
            image = np.repeat(grey, 2, axis=2)  # single polarisation in both channels of the sar stem
            labels = hrsid_instances(read_image(folder / f"{stem}_instance_id_RGB.png"))
            if labels.shape != image.shape[:2]:
                continue
            count = int(labels.max())
            dets = [("ship", box) for box in _component_boxes(labels, count)]
            answer = format_detections(dets)
            ships = labels > 0
            grid = any_label_grid(ships, "ship")
            base = {"file": stem}
            yield Sample([image], "sar", "[DET] Detect all ships.", answer, "hrsid",
                         dict(base, detections=parse_detections(answer), labels=["ship"]))
            yield Sample([image], "sar", "[SEG] Segment the ships.", format_mask(grid), "hrsid",
                         dict(base, mask=grid, label="ship", mask_rule="any", mask_pixels=ships))

    return _take(generate(), limit)


# --------------------------------------------------------------------------------------------------- calibration


def load_falcon_samples(root: str | os.PathLike | None = None) -> list[tuple[Path, str]]:
    """The varied FALCON sample tiles (14 task folders): ``(path, guessed sensor)`` for INT8 calibration."""
    folder = _require(_root(root) / "falcon_samples" / "image_samples", "FALCON samples")
    out = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES):
        out.append((path, guess_sensor(read_image(path))))
    return out


def calibration_tiles(root: str | os.PathLike | None = None, sources: Sequence[str] | None = None) -> list[Path]:
    """Every image file usable as a calibration tile (no masks, labels or figures), source by source."""
    base = _root(root)
    if not base.is_dir():
        raise FileNotFoundError(f"data folder not found at {base} (pass root= or set ${DATA_ENV})")

    def files(folder: Path, pattern: str = "*", keep: Callable[[Path], bool] = lambda p: True) -> list[Path]:
        if not folder.is_dir():
            return []
        return sorted(p for p in folder.glob(pattern) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and keep(p))

    listing: dict[str, Callable[[], list[Path]]] = {
        "falcon_samples": lambda: files(base / "falcon_samples" / "image_samples", "**/*"),
        "aid": lambda: files(base / "aid", "*/*"),
        "rsvqa_lr": lambda: files(base / "rsvqa_lr" / "data_S2_reduced"),
        "levir_cd": lambda: files(base / "levir_cd" / "samples", "[AB]/*", lambda p: p.name not in LEVIR_FIGURES),
        "sirst": lambda: files(base / "sirst" / "images"),
        "hrsid": lambda: files(base / "hrsid" / "data", "*", lambda p: "_instance_" not in p.name),
        "dota": lambda: files(base / "dota" / "example" / "images"),
    }
    chosen = list(listing) if sources is None else list(sources)
    unknown = [s for s in chosen if s not in listing]
    if unknown:
        raise ValueError(f"unknown calibration sources {unknown}; choose from {', '.join(listing)}")
    return [path for name in chosen for path in listing[name]()]


# --------------------------------------------------------------------------------------------------- all sets

LOADERS: dict[str, Callable[..., list[Sample]]] = {
    "aid": load_aid, "rsvqa_lr": load_rsvqa_lr, "levir_cd": load_levir_cd, "sirst": load_sirst,
    "bigearthnet": load_bigearthnet, "dota": load_dota, "hrsid": load_hrsid,
}

_MARKERS = {
    "aid": "aid", "rsvqa_lr": "rsvqa_lr/questionsS2_reduced.js", "levir_cd": "levir_cd/samples/label",
    "sirst": "sirst/images", "bigearthnet": "bigearthnet", "dota": "dota/example/labelTxt", "hrsid": "hrsid/data",
    "falcon_samples": "falcon_samples/image_samples",
}


def available(root: str | os.PathLike | None = None) -> dict[str, bool]:
    """Which sets are present under the data folder."""
    base = _root(root)
    return {name: (base / marker).exists() for name, marker in _MARKERS.items()}


def load_all(split: str = "train", root: str | os.PathLike | None = None,
             limit_per_source: int | None = None) -> list[Sample]:
    """Every available set's samples, set by set (missing sets are skipped)."""
    _check_split(split)
    present = available(root)
    samples: list[Sample] = []
    for name, loader in LOADERS.items():
        if present.get(name):
            samples.extend(loader(split, root=root, limit=limit_per_source))
    return samples
