"""Scene outputs on scenes the tests write with rasterio (known CRS and transform, objects at known places): the
WGS84 GeoJSON puts them at the right lon/lat within a pixel, the stitched GeoTIFF mask keeps the scene's grid, colour
table and class names, and a raster without georeferencing gives pixel coordinates and a warning. No model."""

from __future__ import annotations

import json
import tracemalloc
import warnings
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("shapely")
rasterio = pytest.importorskip("rasterio")

from rasterio.crs import CRS  # noqa: E402
from rasterio.errors import NotGeoreferencedWarning  # noqa: E402
from rasterio.transform import from_origin, rowcol  # noqa: E402
from rasterio.warp import transform as warp_points  # noqa: E402

from rsvlm_edge.formats import BACKGROUND, MASK_SIZE, MaskFormatError  # noqa: E402
from rsvlm_edge.results import class_palette  # noqa: E402
from rsvlm_edge.scene import mosaic  # noqa: E402
from rsvlm_edge.scene.geometry import read_record  # noqa: E402
from rsvlm_edge.scene.georef import GeoReference  # noqa: E402
from rsvlm_edge.scene.mosaic import read_class_names, vectorise_mask, write_class_mask  # noqa: E402
from rsvlm_edge.scene.outputs import write_scene_outputs  # noqa: E402

UTM33N = CRS.from_epsg(32633)
GSD = 10.0  # metres per pixel


def write_scene(path: Path, width: int, height: int, georeferenced: bool = True) -> Path:
    """A small uint16 3-band scene; with a UTM 33N grid of 10 m pixels when ``georeferenced``."""
    profile = {"driver": "GTiff", "width": width, "height": height, "count": 3, "dtype": "uint16"}
    if georeferenced:
        profile.update(crs=UTM33N, transform=from_origin(500_000, 5_000_000, GSD, GSD))
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(np.zeros((3, height, width), dtype=np.uint16))
    return path


def open_georef(path: Path) -> GeoReference:
    """The scene's grid as the scene source would give it (rasterio warns on opening a plain raster; not tested)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(path) as src:
            return GeoReference.of(src)


def record(col: int, row: int, result: dict | None, size: int = 128, grid: list[list[str]] | None = None) -> dict:
    out = {"tile_id": f"r{row:06d}_c{col:06d}",
           "window": {"col_off": col, "row_off": row, "width": size, "height": size}, "result": result}
    if grid is not None:
        out["grid"] = grid
    return out


def det(*items: tuple[str, list[float], float]) -> dict:
    return {"task": "[DET]", "instruction": "[DET] Detect all objects.", "score": 0.5,
            "detections": [{"label": lab, "box_px": b, "score": s} for lab, b, s in items]}


def seg(grid: list[list[str]], scores: dict[str, float] | None = None, score: float = 0.9) -> dict:
    labels = list(dict.fromkeys(c for row in grid for c in row if c != BACKGROUND))
    return {"task": "[SEG]", "instruction": "[SEG] Segment the image.", "score": score, "mask_labels": labels,
            "mask_label_scores": scores}


def halves(left: str, right: str) -> list[list[str]]:
    return [[left] * (MASK_SIZE // 2) + [right] * (MASK_SIZE // 2) for _ in range(MASK_SIZE)]


def filled(label: str) -> list[list[str]]:
    return [[label] * MASK_SIZE for _ in range(MASK_SIZE)]


def pixel_of(lon: float, lat: float, scene: Path) -> tuple[float, float]:
    """(col, row) of a WGS84 point in ``scene``: PROJ's point transform and the inverse affine, independently of
    the code under test."""
    with rasterio.open(scene) as src:
        (x,), (y,) = warp_points("EPSG:4326", src.crs, [lon], [lat])
        rows, cols = rowcol(src.transform, [x], [y], op=float)
    return float(np.ravel(cols)[0]), float(np.ravel(rows)[0])


# --------------------------------------------------------------------------------------------------- objects

@pytest.fixture()
def detections_run(tmp_path):
    """A 1000x800 UTM scene, tiles of 512 with 128 px overlap; a ship seen by two tiles, a plane by one."""
    scene = write_scene(tmp_path / "scene.tif", 1000, 800)
    records = [
        record(0, 0, det(("ship", [400, 300, 440, 330], 0.9)), size=512),
        record(384, 0, det(("ship", [16, 300, 56, 330], 0.8), ("plane", [316, 400, 376, 450], 0.7)), size=512),
        record(0, 288, det(), size=512),
        record(384, 288, det(("plane", [316, 112, 376, 162], 0.95)), size=512),
    ]
    out = tmp_path / "out"
    summary = write_scene_outputs(records, open_georef(scene), out, stem="run", model="tiny", engine="abc123",
                                  tiles=4, seconds=2.0)
    return scene, out, summary


def test_merged_objects_land_at_their_lon_lat_within_one_pixel(detections_run):
    scene, out, _ = detections_run
    collection = json.loads((out / "run.geojson").read_text())
    assert collection["type"] == "FeatureCollection" and "crs" not in collection  # RFC 7946: WGS84 implied
    by_label = {f["properties"]["label"]: f for f in collection["features"]}
    assert sorted(by_label) == ["plane", "ship"]  # the ship and the plane each seen twice, merged to one
    expected = {"ship": [(400, 300), (440, 300), (440, 330), (400, 330)],
                "plane": [(700, 400), (760, 400), (760, 450), (700, 450)]}
    for label, corners in expected.items():
        ring = by_label[label]["geometry"]["coordinates"][0]
        assert all(14 < lon < 16 and 45 < lat < 46 for lon, lat in ring)  # lon first, near 15E 45N
        got = {tuple(np.round(pixel_of(lon, lat, scene))) for lon, lat in ring}
        for col, row in corners:
            assert any(abs(c - col) <= 1 and abs(r - row) <= 1 for c, r in got), (label, col, row, got)


def test_rings_follow_the_right_hand_rule_in_every_layer(detections_run):
    """RFC 7946: exterior rings counterclockwise (positive shoelace area) in the output's own axes."""
    _, out, _ = detections_run
    for name in ("run.geojson", "run.crs.geojson"):
        for feature in json.loads((out / name).read_text())["features"]:
            xs, ys = np.array(feature["geometry"]["coordinates"][0]).T
            assert np.sum(xs[:-1] * ys[1:] - xs[1:] * ys[:-1]) > 0, name


def test_features_carry_task_label_score_tile_model_and_engine(detections_run):
    _, out, _ = detections_run
    props = {f["properties"]["label"]: f["properties"] for f in json.loads((out / "run.geojson").read_text())["features"]}
    assert props["ship"] == {"task": "[DET]", "label": "ship", "score": 0.9, "tile_id": "r000000_c000000",
                             "kind": "box", "model": "tiny", "engine": "abc123", "merged": 2}
    assert props["plane"]["score"] == 0.95 and props["plane"]["tile_id"] == "r000288_c000384"


def test_the_scene_crs_layer_names_its_crs_and_keeps_metres(detections_run):
    _, out, _ = detections_run
    collection = json.loads((out / "run.crs.geojson").read_text())
    assert collection["crs"]["properties"]["name"] == "EPSG:32633"
    ship = next(f for f in collection["features"] if f["properties"]["label"] == "ship")
    xs, ys = zip(*ship["geometry"]["coordinates"][0])
    assert (min(xs), max(xs)) == (500_000 + 400 * GSD, 500_000 + 440 * GSD)
    assert (min(ys), max(ys)) == (5_000_000 - 330 * GSD, 5_000_000 - 300 * GSD)


def test_the_summary_counts_labels_and_tiles_per_second_and_is_written(detections_run):
    _, out, summary = detections_run
    assert summary["counts"] == {"ship": 1, "plane": 1}
    assert summary["tiles"] == 4 and summary["tiles_per_s"] == 2.0 and summary["tiles_failed"] == 0
    assert summary["objects_found"] == 4 and summary["merged_away"] == 2
    assert summary["scene"]["crs"] == "EPSG:32633" and summary["scene"]["width"] == 1000
    assert json.loads((out / "run.summary.json").read_text()) == summary
    assert sorted(p.name for p in out.iterdir()) == ["run.crs.geojson", "run.geojson", "run.summary.json"]


def test_min_score_drops_objects_before_they_merge(tmp_path):
    scene = write_scene(tmp_path / "scene.tif", 300, 300)
    records = [record(0, 0, det(("ship", [10, 10, 30, 30], 0.3), ("car", [60, 60, 70, 70], 0.6)))]
    summary = write_scene_outputs(records, open_georef(scene), tmp_path / "out", min_score=0.5)
    assert summary["counts"] == {"car": 1} and summary["below_min_score"] == 1


def test_a_raster_without_georeferencing_gives_pixel_coordinates_and_a_warning(tmp_path):
    scene = write_scene(tmp_path / "plain.tif", 300, 200, georeferenced=False)
    georef = open_georef(scene)
    assert not georef.georeferenced
    records = [record(96, 0, det(("ship", [4, 40, 24, 60], 0.8)))]
    with pytest.warns(NotGeoreferencedWarning, match="plain.tif.*pixel coordinates"):
        write_scene_outputs(records, georef, tmp_path / "out", scene_name="plain.tif")
    collection = json.loads((tmp_path / "out" / "scene.geojson").read_text())
    assert collection["pixel_coordinates"] is True
    xs, ys = zip(*collection["features"][0]["geometry"]["coordinates"][0])
    assert (min(xs), max(xs), min(ys), max(ys)) == (100, 120, 40, 60)


def test_a_scene_in_lon_lat_gives_the_same_coordinates_in_both_layers(tmp_path):
    scene = tmp_path / "geographic.tif"
    with rasterio.open(scene, "w", driver="GTiff", width=200, height=100, count=1, dtype="uint8", crs="EPSG:4326",
                       transform=from_origin(-3.5, 40.5, 0.001, 0.001)) as dst:
        dst.write(np.zeros((1, 100, 200), dtype=np.uint8))
    write_scene_outputs([record(0, 0, det(("ship", [10, 20, 30, 40], 0.8)))], open_georef(scene), tmp_path / "out")
    wgs84 = json.loads((tmp_path / "out" / "scene.geojson").read_text())["features"][0]["geometry"]
    native = json.loads((tmp_path / "out" / "scene.crs.geojson").read_text())["features"][0]["geometry"]
    assert wgs84 == native
    lons, lats = zip(*wgs84["coordinates"][0])
    assert (min(lons), max(lons), min(lats), max(lats)) == pytest.approx((-3.49, -3.47, 40.46, 40.48))


def test_per_tile_labels_form_a_grid_layer(tmp_path):
    scene = write_scene(tmp_path / "scene.tif", 256, 128)
    cls = [{"task": "[CLS]", "instruction": "[CLS] Classify the scene.", "text": t, "score": s, "labels": t.split(", ")}
           for t, s in (("harbor, sea", 0.8), ("sea", 0.4))]
    summary = write_scene_outputs([record(0, 0, cls[0]), record(128, 0, cls[1])], open_georef(scene),
                                  tmp_path / "out", min_score=0.5)
    layer = json.loads((tmp_path / "out" / "scene.tiles.geojson").read_text())
    (cell,) = layer["features"]
    assert cell["properties"]["labels"] == ["harbor", "sea"] and cell["properties"]["tile_id"] == "r000000_c000000"
    assert cell["geometry"]["type"] == "Polygon"
    assert summary["counts"] == {"harbor": 1, "sea": 1} and summary["below_min_score"] == 1


# --------------------------------------------------------------------------------------------------- masks

def mask_tiles() -> list[dict]:
    """300x200 scene, 128 px tiles: columns at 0, 96, 172 (32 and 52 px overlaps), rows at 0 and 72."""
    return [record(0, 0, seg(filled("water")), grid=filled("water")),
            record(96, 0, seg(filled("forest")), grid=filled("forest")),
            record(172, 0, seg(halves("forest", "road")), grid=halves("forest", "road")),
            record(0, 72, seg(filled("bare")), grid=filled("bare")),
            record(96, 72, None),  # failed: its neighbours cover what they can
            record(172, 72, seg(filled(BACKGROUND)), grid=filled(BACKGROUND))]


def test_the_stitched_mask_keeps_the_scene_grid_colours_and_class_names(tmp_path):
    scene = write_scene(tmp_path / "scene.tif", 300, 200)
    georef = open_georef(scene)
    path = tmp_path / "mask.tif"
    pixels = write_class_mask(path, [read_record(r) for r in mask_tiles()], georef, classes=["road"],
                              tags={"TASK": "[SEG]"}, block=64)
    names = ["others", "road", "bare", "forest", "water"]  # background, the given classes, then the rest sorted
    assert list(pixels) == names and read_class_names(path) == names
    with rasterio.open(path) as src, rasterio.open(scene) as ref:
        assert src.crs == ref.crs and src.transform == ref.transform and (src.width, src.height) == (300, 200)
        assert src.dtypes == ("uint8",) and src.nodata == 255 and src.tags()["TASK"] == "[SEG]"
        palette = class_palette(len(names))
        cmap = src.colormap(1)
        assert all(cmap[i] == (*palette[3 * i:3 * i + 3], 255) for i in range(len(names)))
        assert src.overviews(1) == [2, 4, 8]
        mask = src.read(1)
    assert {int(v): int(n) for v, n in zip(*np.unique(mask, return_counts=True))} == {
        i: pixels[name] for i, name in enumerate(names) if pixels[name]} | {255: int((mask == 255).sum())}


def test_overlaps_are_cut_where_the_centre_most_tile_takes_over(tmp_path):
    """Tile centres at x 64 and 160 meet at x 112; rows at y 64 and 136 meet at y 100."""
    scene = write_scene(tmp_path / "scene.tif", 300, 200)
    path = tmp_path / "mask.tif"
    write_class_mask(path, [read_record(r) for r in mask_tiles()], open_georef(scene), block=64)
    names = read_class_names(path)
    with rasterio.open(path) as src:
        mask = src.read(1)
    water, forest, road = names.index("water"), names.index("forest"), names.index("road")
    assert mask[10, 111] == water and mask[10, 112] == forest
    # forest tile (centre 160) vs forest|road tile (centre 236): cut at 198; the road half starts at 172 + 64
    assert mask[10, 197] == forest and mask[10, 236] == road
    assert mask[99, 50] == water and mask[100, 50] == names.index("bare")
    # the failed tile (96, 72) leaves its area to its neighbours: its upper part to the forest tile above ...
    assert mask[120, 150] == forest
    assert mask[150, 150] == 255  # ... and what no other tile covers is nodata
    assert mask[150, 250] == 0  # the lower-right tile answered background


def test_labels_below_min_score_are_written_as_background(tmp_path):
    scene = write_scene(tmp_path / "scene.tif", 128, 128)
    grid = halves("water", "forest")
    records = [record(0, 0, seg(grid, scores={"water": 0.9, "forest": 0.2}), grid=grid)]
    pixels = write_class_mask(tmp_path / "mask.tif", [read_record(r) for r in records], open_georef(scene),
                              min_score=0.5, block=64)
    assert pixels["water"] == 64 * 128 and pixels["forest"] == 0 and pixels["others"] == 64 * 128


def test_vectorised_regions_join_across_strips_and_carry_label_scores(tmp_path):
    scene = write_scene(tmp_path / "scene.tif", 300, 200)
    tiles = [read_record(r) for r in mask_tiles()]
    path = tmp_path / "mask.tif"
    pixels = write_class_mask(path, tiles, open_georef(scene), block=64)
    regions = vectorise_mask(path, tiles, strip=32)
    by_label: dict[str, list] = {}
    for f in regions:
        by_label.setdefault(f.label, []).append(f)
    assert sorted(by_label) == ["bare", "forest", "road", "water"]
    assert all(len(v) == 1 for v in by_label.values())  # each class is one connected region here
    for label, (region,) in by_label.items():
        assert region.geometry.area == pixels[label] and region.score == 0.9 and region.kind == "mask"
    assert by_label["water"][0].tile_id == "r000000_c000000" and by_label["water"][0].properties["tiles"] == 3


def test_the_whole_mask_output_goes_through_write_scene_outputs(tmp_path):
    scene = write_scene(tmp_path / "scene.tif", 300, 200)
    summary = write_scene_outputs(mask_tiles(), open_georef(scene), tmp_path / "out", model="tiny", engine="e1",
                                  vectorise=True)
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["scene.mask.geojson", "scene.mask.tif", "scene.summary.json"]
    assert summary["tiles_failed"] == 1 and summary["mask_classes"] == ["others", "bare", "forest", "road", "water"]
    assert summary["counts"] == {"bare": 1, "forest": 1, "road": 1, "water": 1}
    with rasterio.open(out / "scene.mask.tif") as src:
        assert src.tags()["MODEL"] == "tiny" and src.tags()["ENGINE"] == "e1"
    layer = json.loads((out / "scene.mask.geojson").read_text())
    assert {f["properties"]["label"] for f in layer["features"]} == {"bare", "forest", "road", "water"}


def test_a_malformed_grid_is_refused_by_tile(tmp_path):
    bad = filled("water")[:-1]
    with pytest.raises(MaskFormatError, match="tile r000000_c000128: expected a 24x24 grid, got 23 rows"):
        read_record(record(128, 0, seg(bad), grid=bad))


def test_a_mask_write_that_fails_midway_leaves_no_file_behind(tmp_path, monkeypatch):
    scene = write_scene(tmp_path / "scene.tif", 300, 200)
    tiles = [read_record(r) for r in mask_tiles()]
    calls = []
    real_paint = mosaic._paint

    def paint_then_fail(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_paint(*args, **kwargs)

    monkeypatch.setattr(mosaic, "_paint", paint_then_fail)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(KeyboardInterrupt):
        write_class_mask(out / "mask.tif", tiles, open_georef(scene), block=64)
    assert list(out.iterdir()) == []


def test_the_scene_mask_is_never_whole_in_memory(tmp_path):
    """A 4096^2 mask (16 MiB of uint8) of 512 px tiles is written with well under half of that allocated."""
    size, tile, stride = 4096, 512, 448
    scene = write_scene(tmp_path / "scene.tif", size, size)
    georef = open_georef(scene)
    offsets = list(range(0, size - tile, stride)) + [size - tile]
    tiles = [read_record(record(c, r, seg(halves("water", "forest")), size=tile, grid=halves("water", "forest")))
             for r in offsets for c in offsets]
    tracemalloc.start()
    try:
        pixels = write_class_mask(tmp_path / "mask.tif", tiles, georef, overviews=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert sum(pixels.values()) == size * size
    assert peak < size * size // 2, f"peak {peak / 2**20:.1f} MiB"
