"""Calibration inputs: sample tiles (any sensor, files or folders) paired with real task instructions.

Why every tag: each decoder expert must see the prompts it serves ([SEG] -> pixel, [VG]/[REF] -> region, the rest
-> image), otherwise its activation ranges are guessed from another expert's traffic.
"""

from __future__ import annotations

from pathlib import Path

from rsvlm_edge.generation import Request
from rsvlm_edge.pipeline import IMAGE_SUFFIXES, list_images, read_tile
from rsvlm_edge.tasks import DEFAULT_PROMPTS, PAIR_TASKS, expert_for_tag, make_instruction

#: Tags per expert, cycled over the tiles so each tile visits every expert once.
TAGS_BY_EXPERT: dict[int, list[str]] = {}
for _tag in DEFAULT_PROMPTS:
    TAGS_BY_EXPERT.setdefault(expert_for_tag(_tag), []).append(_tag)


class CalibrationInputError(ValueError):
    """No usable tiles, or a tile cannot be read."""


def find_tiles(paths: list[str | Path], limit: int | None = None) -> list[Path]:
    """Image files from files and folders (recursively), sorted per folder, at most ``limit`` (spread evenly)."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            try:
                files.extend(list_images(p))
            except FileNotFoundError as exc:
                raise CalibrationInputError(str(exc)) from None
        elif p.is_file():
            if p.suffix.lower() not in IMAGE_SUFFIXES:
                raise CalibrationInputError(f"{p} is not an image ({', '.join(IMAGE_SUFFIXES)})")
            files.append(p)
        else:
            raise CalibrationInputError(f"{p} does not exist")
    files = list(dict.fromkeys(files))
    if not files:
        raise CalibrationInputError("no calibration tiles given")
    if limit and len(files) > limit:
        step = len(files) / limit
        files = [files[int(i * step)] for i in range(limit)]
    return files


def calibration_requests(files: list[Path], config, sensor: str | None = None) -> list[Request]:
    """One request per (tile, expert): the tile with the next instruction of that expert's tags."""
    tiles = []
    for f in files:
        try:
            tiles.append(read_tile([f], sensor, config.image_size, config.sensors, config.image_preprocess))
        except (OSError, ValueError) as exc:
            raise CalibrationInputError(f"cannot use {f} for calibration: {exc}") from None
    requests = []
    experts = sorted(e for e in TAGS_BY_EXPERT if e < config.num_experts)
    for i, tile in enumerate(tiles):
        for e in experts:
            tags = TAGS_BY_EXPERT[e]
            tag = tags[i % len(tags)]
            pixels = list(tile.pixels)
            if tag in PAIR_TASKS:
                partner = next((t for t in tiles[i + 1:] + tiles[:i] if t.sensor == tile.sensor), tile)
                pixels = pixels + list(partner.pixels)
            requests.append(Request(pixels=pixels, sensor=tile.sensor, prompt=make_instruction(tag, None), expert=e))
    return requests
