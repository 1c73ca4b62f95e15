"""Per-patch training targets of the dense heads from a sample's structured truth (``Sample.target``).

Every sample says something about a few labels only: ``[DET] Detect all ships.`` says where the ships are and
nothing about planes; ``[SEG] Segment the water.`` which cells are water. So each target comes with the labels it
covers (``known``), and the losses count only those (:mod:`rsvlm_edge.training.dense_train`); a per-label sigmoid,
not a softmax over labels, is what makes such partial labels usable.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rsvlm_edge.formats import BACKGROUND, MASK_SIZE, normalize_obb
from rsvlm_edge.training.synthetic.vocab import LANDCOVER_CLASSES, OBJECT_CLASSES

#: The demo model's label vocabulary: land cover and objects of the synthetic scenes, and SIRST's small targets.
DENSE_LABELS: tuple[str, ...] = LANDCOVER_CLASSES + OBJECT_CLASSES + ("target",)
DENSE_OBJECTS: tuple[str, ...] = OBJECT_CLASSES + ("target",)


@dataclass
class DenseTargets:
    """Targets of ``n`` samples over ``N`` patches, ``L`` labels and ``C`` cells per patch (arrays float32)."""

    asked: np.ndarray  # (n, L) labels the instruction asks for
    asked_known: np.ndarray  # (n,) 1 where the sample says which labels are asked (not for change masks)
    objects: np.ndarray  # (n, N, L) an object of the label has its centre in the patch
    objects_known: np.ndarray  # (n, L)
    boxes: np.ndarray  # (n, N, 4) x1, y1, x2, y2 minus the patch centre, image sizes
    boxes_known: np.ndarray  # (n, N)
    obbs: np.ndarray  # (n, N, 6) cx, cy minus the patch centre, w, h, cos 2a, sin 2a
    obbs_known: np.ndarray  # (n, N)
    cells: np.ndarray  # (n, N, C, L)
    cells_known: np.ndarray  # (n, L)
    change: np.ndarray  # (n, N, C)
    change_known: np.ndarray  # (n,)


def grid_cells(grid: np.ndarray, patches: int) -> np.ndarray:
    """(24, 24, ...) image-order cells -> (patches^2, k*k, ...) per patch (inverse of ``dense.cell_grid``)."""
    k = MASK_SIZE // patches
    rest = grid.shape[2:]
    return grid.reshape(patches, k, patches, k, *rest).swapaxes(1, 2).reshape(patches * patches, k * k, *rest)


def _centre_patch(cx: float, cy: float, grid: int) -> int:
    return min(grid - 1, max(0, int(cy * grid))) * grid + min(grid - 1, max(0, int(cx * grid)))


def _patch_centre(patch: int, grid: int) -> tuple[float, float]:
    return (patch % grid + 0.5) / grid, (patch // grid + 0.5) / grid


def build_targets(targets: list[dict], grid: int, labels: tuple[str, ...] = DENSE_LABELS) -> DenseTargets:
    """:class:`DenseTargets` of samples' ``target`` dicts ([DET] ``detections``, [OBB] ``obbs``, [SEG] ``mask``
    with ``label``/``labels``, change masks with ``change``)."""
    n, patches, cells, nl = len(targets), grid * grid, (MASK_SIZE // grid) ** 2, len(labels)
    index = {lab: i for i, lab in enumerate(labels)}
    t = DenseTargets(
        np.zeros((n, nl), np.float32), np.zeros(n, np.float32), np.zeros((n, patches, nl), np.float32),
        np.zeros((n, nl), np.float32), np.zeros((n, patches, 4), np.float32), np.zeros((n, patches), np.float32),
        np.zeros((n, patches, 6), np.float32), np.zeros((n, patches), np.float32),
        np.zeros((n, patches, cells, nl), np.float32), np.zeros((n, nl), np.float32),
        np.zeros((n, patches, cells), np.float32), np.zeros(n, np.float32))
    for i, target in enumerate(targets):
        if target.get("change"):
            mask = np.asarray(target["mask"], dtype=object) != BACKGROUND
            t.change[i] = grid_cells(mask.astype(np.float32), grid)
            t.change_known[i] = 1.0
            continue
        if "mask" in target:
            # one label asked ("Segment the water."), or the whole scene ("Segment the image."): every class asked,
            # and the cells say which are there
            known = [target["label"]] if "label" in target else [lab for lab in labels
                                                                 if lab in LANDCOVER_CLASSES + OBJECT_CLASSES]
            asked = known
            mask = np.asarray(target["mask"], dtype=object)
            for lab in known:
                if lab in index:
                    t.cells[i, :, :, index[lab]] = grid_cells((mask == lab).astype(np.float32), grid)
                    t.cells_known[i, index[lab]] = 1.0
        else:
            asked = list(target.get("labels", []))
            for lab in asked:
                if lab in index:
                    t.objects_known[i, index[lab]] = 1.0
            for lab, box in target.get("detections", []):
                x1, y1, x2, y2 = (float(v) / 100.0 for v in box)
                patch = _centre_patch((x1 + x2) / 2, (y1 + y2) / 2, grid)
                px, py = _patch_centre(patch, grid)
                t.objects[i, patch, index[lab]] = 1.0
                t.boxes[i, patch] = (x1 - px, y1 - py, x2 - px, y2 - py)
                t.boxes_known[i, patch] = 1.0
            for lab, obb in target.get("obbs", []):
                cx, cy, w, h, angle = normalize_obb(*obb)
                patch = _centre_patch(cx / 100.0, cy / 100.0, grid)
                px, py = _patch_centre(patch, grid)
                a = np.radians(2.0 * angle)
                t.objects[i, patch, index[lab]] = 1.0
                t.obbs[i, patch] = (cx / 100.0 - px, cy / 100.0 - py, w / 100.0, h / 100.0, np.cos(a), np.sin(a))
                t.obbs_known[i, patch] = 1.0
        for lab in asked:
            if lab in index:
                t.asked[i, index[lab]] = 1.0
        t.asked_known[i] = 1.0
    return t
