"""Before/after change pairs for [CCD] captions and two-image [SEG] change masks: buildings appear or disappear, a
land-cover region changes, or nothing changes (new noise only)."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from rsvlm_edge.training.synthetic.geometry import _coords, _dilate, _smooth
from rsvlm_edge.training.synthetic.language import _centroid, _count_word, _position_phrase, _things
from rsvlm_edge.training.synthetic.scene import Scene, _n, _Placer, _union, make_scene
from rsvlm_edge.training.synthetic.vocab import LC, LC_ARTICLE_WORDS, LC_WORDS


@dataclass(eq=False)
class ChangePair:
    """Before/after scenes, the pixel change mask, caption references and what changed."""

    before: Scene
    after: Scene
    mask: np.ndarray  # bool HxW
    captions: list[str]
    kind: str  # "appear" | "disappear" | "landcover" | "none"
    count: int = 0  # buildings that appeared / disappeared


_LC_TRANSITIONS = (("forest", "farmland"), ("farmland", "residential"), ("bare", "industrial"), ("farmland", "bare"),
                   ("forest", "bare"), ("bare", "residential"))


def make_change_pair(rng: np.random.Generator, size: int = 128) -> ChangePair:
    """Before/after scenes: buildings appear or disappear, a land-cover region changes, or nothing changes."""
    for _ in range(20):
        kind = str(rng.choice(["appear", "disappear", "landcover", "none"], p=[0.35, 0.25, 0.25, 0.15]))
        base_class = str(rng.choice(["residential", "farmland", "industrial", "bare land", "forest"]))
        before = make_scene(rng, size, base_class)
        after_seed = int(rng.integers(2**31 - 1))
        if kind == "none":
            after = replace(before, noise_seed=after_seed, objects=list(before.objects))
            refs = ["no change", "there is no change", "nothing has changed", "the scene is unchanged"]
            return ChangePair(before, after, np.zeros((size, size), bool), refs, "none")
        anchor = rng.uniform(0.2, 0.8, 2) * size
        if kind == "appear":
            k = _n(rng, 1, 4)
            placer = _Placer(before.landcover, before.objects)
            new = placer.place(rng, "building", k, near=(anchor[0], anchor[1], 0.22 * size))
            if not new or len(before.objects) + len(new) > 8:
                continue
            after = replace(before, noise_seed=after_seed, objects=before.objects + new)
            mask = _union(new, ("building",), size)
            n = len(new)
            pos = _position_phrase(*_centroid(mask), size)
            what = _things("building", n)
            first = "a new building" if n == 1 else f"{_count_word(n)} new buildings"
            refs = [f"{first} appeared {pos}", f"{what} {'was' if n == 1 else 'were'} built {pos}",
                    f"{what} {'has' if n == 1 else 'have'} been constructed {pos}",
                    f"{'a new building appears' if n == 1 else 'new buildings appear'} {pos}"]
            return ChangePair(before, after, mask, refs, kind, n)
        if kind == "disappear":
            buildings = [o for o in before.objects if o.label == "building"]
            if not buildings:
                continue
            buildings.sort(key=lambda o: (o.cx - anchor[0]) ** 2 + (o.cy - anchor[1]) ** 2)
            gone = [o for o in buildings[:_n(rng, 1, 3)]
                    if (o.cx - buildings[0].cx) ** 2 + (o.cy - buildings[0].cy) ** 2 < (0.3 * size) ** 2]
            lc_after = before.landcover.copy()
            mask = _union(gone, ("building",), size)
            lc_after[mask] = LC["bare"]
            after = replace(before, noise_seed=after_seed, landcover=lc_after,
                            objects=[o for o in before.objects if not any(o is g for g in gone)], _fractions=None)
            n = len(gone)
            pos = _position_phrase(*_centroid(mask), size)
            what = _things("building", n)
            refs = [f"{what} {'was' if n == 1 else 'were'} demolished {pos}",
                    f"{what} disappeared {pos}",
                    f"{what} {'has' if n == 1 else 'have'} been removed {pos}",
                    f"{'a building is' if n == 1 else 'buildings are'} gone {pos}"]
            return ChangePair(before, after, mask, refs, kind, n)
        # land-cover change in a blob around the anchor; objects there are dropped from both images
        fr = before.fractions()
        options = [t for t in _LC_TRANSITIONS if fr[t[0]] >= 0.05]
        if not options:
            continue
        src, dst = options[int(rng.integers(len(options)))]
        where = np.flatnonzero(before.landcover == LC[src])
        anchor = np.array(divmod(int(where[rng.integers(where.size)]), size)[::-1], float) + 0.5
        anchor = np.clip(anchor, 0.15 * size, 0.85 * size)
        yy, xx = _coords(size)
        r = rng.uniform(0.18, 0.3) * size
        wobble = _smooth(rng, size, 4)[0] - 0.5
        region = ((xx - anchor[0]) ** 2 + (yy - anchor[1]) ** 2) / r**2 + 0.8 * wobble < 1.0
        mask = region & (before.landcover == LC[src])
        if mask.mean() < 0.03:
            continue
        near_region = _dilate(region, 2)
        kept = [o for o in before.objects if not np.any(near_region[o.slices] & o.patch)]
        lc_after = before.landcover.copy()
        lc_after[mask] = LC[dst]
        before = replace(before, objects=kept, _fractions=None)
        after = replace(before, noise_seed=after_seed, landcover=lc_after, objects=list(kept), _fractions=None)
        pos = _position_phrase(*_centroid(mask), size)
        a, b = LC_WORDS[src], LC_ARTICLE_WORDS[dst]
        refs = [f"the {a} {pos} was turned into {b}", f"some {a} {pos} became {b}", f"{b} replaced the {a} {pos}",
                f"the {a} {pos} changed to {b}"]
        return ChangePair(before, after, mask, refs, "landcover")
    before = make_scene(rng, size, "forest")
    after = replace(before, noise_seed=int(rng.integers(2**31 - 1)))
    return ChangePair(before, after, np.zeros((size, size), bool), ["no change", "there is no change",
                                                                    "nothing has changed", "the scene is unchanged"], "none")
