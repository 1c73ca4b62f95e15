"""Tile plans: windows cover the scene, whole tiles end on the edges, sizes in pixels, metres or a GSD."""

from __future__ import annotations

import pytest

from rsvlm_edge.scene.tiling import Length, TileWindow, TilingError, parse_length, plan_tiles


def _covered(plan, width, height):
    seen = [[False] * width for _ in range(height)]
    for w in plan.windows:
        for y in range(w.row_off, w.row_off + w.height):
            for x in range(w.col_off, w.col_off + w.width):
                seen[y][x] = True
    return all(all(row) for row in seen)


def test_default_tile_is_the_model_input_at_native_resolution_and_covers_the_scene():
    plan = plan_tiles(300, 260, model_size=128)
    assert plan.tile == (128, 128) and plan.step == (128, 128) and plan.read_size == (128, 128)
    assert [w.col_off for w in plan.windows[:3]] == [0, 128, 300 - 128]  # the last column ends on the edge
    assert {(w.width, w.height) for w in plan.windows} == {(128, 128)}  # every tile whole and square
    assert [w.index for w in plan.windows] == list(range(len(plan.windows)))
    assert _covered(plan, 300, 260)


@pytest.mark.parametrize("overlap, step", [("0.25", 96), ("32", 96), ("32px", 96), ("320m", 96), (None, 128)])
def test_overlap_as_a_fraction_pixels_or_metres(overlap, step):
    over = parse_length(overlap, "--overlap", fraction=True) if overlap else None
    plan = plan_tiles(1000, 1000, model_size=128, overlap=over, res=(10.0, 10.0), metres=True)
    assert plan.step == (step, step)
    assert _covered(plan, 1000, 1000)


def test_tile_in_metres_is_read_at_the_model_input_size():
    plan = plan_tiles(2000, 2000, model_size=128, tile=Length(5120, "m"), res=(10.0, 10.0), metres=True)
    assert plan.tile == (512, 512) and plan.read_size == (128, 128)


def test_gsd_resamples_the_working_grid():
    # 20 m per model pixel on a 10 m scene: a 128 px tile covers 256 native pixels, read at 128
    plan = plan_tiles(1000, 1000, model_size=128, gsd=20.0, res=(10.0, 10.0), metres=True)
    assert plan.tile == (256, 256) and plan.read_size == (128, 128)
    finer = plan_tiles(1000, 1000, model_size=128, gsd=5.0, res=(10.0, 10.0), metres=True)
    assert finer.tile == (64, 64) and finer.read_size == (128, 128)  # 5 m: read upsampled to 128 px


def test_a_scene_smaller_than_a_tile_is_one_tile_with_its_aspect_ratio_kept():
    plan = plan_tiles(60, 40, model_size=128)
    assert [(w.col_off, w.row_off, w.width, w.height) for w in plan.windows] == [(0, 0, 60, 40)]
    assert plan.read_size == (60, 40)
    wide = plan_tiles(600, 40, model_size=128, tile=Length(1000, "px"))
    assert wide.read_size == (128, 9)


@pytest.mark.parametrize("kwargs, words", [
    ({"tile": Length(0.2, "px")}, "less than one pixel"),
    ({"overlap": Length(128, "px")}, "smaller than the tile"),
    ({"overlap": Length(1.5, "frac")}, "smaller than the tile"),
    ({"tile": Length(100, "m")}, "georeferenced"),
    ({"gsd": 10.0}, "georeferenced"),
    ({"gsd": -1.0}, "positive"),
])
def test_bad_tilings_fail_with_the_option_named(kwargs, words):
    with pytest.raises(TilingError, match=words):
        plan_tiles(500, 500, model_size=128, **kwargs)


def test_metres_need_a_projected_crs_in_metres():
    with pytest.raises(TilingError, match="projected CRS"):
        plan_tiles(500, 500, model_size=128, tile=Length(100, "m"), res=(0.0001, 0.0001), metres=False)


@pytest.mark.parametrize("text", ["abc", "12 km", "-5", ""])
def test_unreadable_lengths_are_refused(text):
    with pytest.raises(TilingError, match="--tile"):
        parse_length(text, "--tile")


def test_tile_window_id_round_trip_and_mapping_of_model_units():
    w = TileWindow(7, 1024, 512, 256, 128)
    assert w.id == "r000512_c001024"
    assert TileWindow.from_dict(w.to_dict()) == w
    assert w.to_scene(0, 0) == (1024, 512) and w.to_scene(100, 100) == (1280, 640) and w.to_scene(50, 25) == (1152, 544)
