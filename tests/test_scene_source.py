"""Opening scenes: one raster, band-file stacks on the finest band's grid, before/after pairs on their common extent,
the sensor stated or guessed, and one-line errors for what cannot be opened."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from scene_rasters import ORIGIN, noise, write_raster

from rsvlm_edge.scene.source import SceneError, open_scene, resolve_scene
from rsvlm_edge.scene.tiling import TileWindow

BEN_S2 = "bigearthnet/BigEarthNet-S2-Example/S2A_MSIL2A_20170613T101031_87_48"
BEN_S1 = "bigearthnet/BigEarthNet-S1-Example/S1A_IW_GRDH_1SDV_20170613T165043_33UUP_87_48"


def _read(spec, window, out=None):
    with open_scene(spec) as source:
        return source.read(window, out)


def test_one_raster_reads_exactly_the_window_asked(tmp_path):
    data = noise((3, 70, 90))
    path = write_raster(tmp_path / "scene.tif", data)
    spec = resolve_scene([path])
    with open_scene(spec) as source:
        assert (source.width, source.height, source.bands) == (90, 70, 3)
        assert source.crs.to_epsg() == 32633 and source.transform.c == ORIGIN[0]
        (tile,) = source.read(TileWindow(0, 17, 5, 40, 33))
        np.testing.assert_array_equal(tile, data[:, 5:38, 17:57])
        assert source.sensor == "rgb" and source.sensor_reason.startswith("guessed")
        assert "EPSG:32633" in source.describe() and "sensor: rgb" in source.describe()
        half = source.read(TileWindow(0, 0, 0, 40, 40), (20, 20))[0]  # averaged down on the read
        assert half.shape == (3, 20, 20)
        np.testing.assert_allclose(half[:, 0, 0], data[:, :2, :2].reshape(3, -1).mean(axis=1), atol=1)
    assert pickle.loads(pickle.dumps(spec)) == spec  # a worker gets the spec, not the open files


def test_stated_sensor_is_kept_and_said(tmp_path):
    spec = resolve_scene([write_raster(tmp_path / "s.tif", noise((3, 20, 20)))], sensor="ir")
    with open_scene(spec) as source:
        assert source.sensor == "ir" and "stated" in source.describe()


def test_grey_picture_in_three_bands_is_not_guessed_rgb(tmp_path):
    y, x = np.mgrid[0:64, 0:64]
    smooth = (60 + x + y).astype(np.uint8)
    with open_scene(resolve_scene([write_raster(tmp_path / "ir.tif", np.stack([smooth] * 3), crs=None)])) as source:
        assert source.sensor == "ir" and "grey" in source.sensor_reason
    speckle = np.random.default_rng(0).gamma(1.0, 40.0, (64, 64)).clip(0, 255).astype(np.uint8)
    with open_scene(resolve_scene([write_raster(tmp_path / "sar.tif", np.stack([speckle] * 3), crs=None)])) as source:
        assert source.sensor == "sar"


def test_band_files_are_stacked_on_the_finest_grid_in_the_order_named(tmp_path):
    b02, b08 = noise((1, 40, 40), 1), noise((1, 40, 40), 2)
    write_raster(tmp_path / "T33_B02_10m.tif", b02)
    write_raster(tmp_path / "T33_B08_10m.tif", b08)
    write_raster(tmp_path / "T33_B05_20m.tif", np.full((1, 20, 20), 777, np.uint16), res=20.0)
    write_raster(tmp_path / "T33_B01_60m.tif", np.full((1, 7, 7), 5, np.uint16), res=60.0)  # 420 m: overhangs
    spec = resolve_scene([tmp_path], bands="B08,b5,B2")
    assert spec.band_names == ("B08", "b5", "B2")
    with open_scene(spec) as source:
        assert (source.width, source.height, source.crs.to_epsg()) == (40, 40, 32633)
        (stack,) = source.read(TileWindow(0, 0, 0, 40, 40))
    np.testing.assert_array_equal(stack[0], b08[0])
    np.testing.assert_array_equal(stack[1], 777)  # 20 m band resampled onto the 10 m grid
    np.testing.assert_array_equal(stack[2], b02[0])


def test_a_missing_band_file_is_named(tmp_path):
    write_raster(tmp_path / "x_B02.tif", noise((1, 8, 8)))
    with pytest.raises(SceneError, match=r"no band file for B8A in .*B8A"):
        resolve_scene([tmp_path], bands="B02,B8A")
    with pytest.raises(SceneError, match="cannot tell which file is which band"):
        resolve_scene([tmp_path])
    with pytest.raises(SceneError, match="scene file not found"):
        resolve_scene([tmp_path / "nope.tif"])


def test_a_file_that_is_not_a_raster_fails_in_one_line(tmp_path):
    bad = tmp_path / "scene.tif"
    bad.write_text("not a tiff")
    with pytest.raises(SceneError, match="cannot open raster .*scene.tif"):
        open_scene(resolve_scene([bad]))


def test_bigearthnet_s2_band_folder_is_the_l2a_layout_with_its_crs(data_root):
    folder = data_root / BEN_S2
    spec = resolve_scene([folder])
    assert spec.sensor == "ms" and "Sentinel-2 L2A" in spec.sensor_reason and len(spec.images[0].files) == 12
    with open_scene(spec) as source:
        assert (source.width, source.height, source.bands) == (120, 120, 12)
        assert source.crs.to_epsg() == 32633 and source.grid.res == (10.0, 10.0)
        (stack,) = source.read(TileWindow(0, 0, 0, 120, 120))
    import rasterio

    with rasterio.open(next(folder.glob("*_B02.tif"))) as b02:
        np.testing.assert_array_equal(stack[1], b02.read(1))  # B02 is the second band of the ms input
    assert stack.dtype == np.uint16 and stack[0].std() > 0  # B01 (60 m) resampled, not blank


def test_bigearthnet_s1_vv_vh_files_are_one_sar_image_not_a_pair(data_root):
    folder = data_root / BEN_S1
    vh, vv = sorted(folder.glob("*_VH.tif"))[0], sorted(folder.glob("*_VV.tif"))[0]
    spec = resolve_scene([vh, vv])  # given VH first: stacked as VV, VH
    assert spec.band_names == ("VV", "VH") and spec.sensor == "sar" and len(spec.images) == 1
    with open_scene(spec) as source:
        (stack,) = source.read(TileWindow(0, 0, 0, source.width, source.height))
        assert source.crs is not None and stack.shape[0] == 2 and stack.dtype == np.float32
    assert resolve_scene([folder]).band_names == ("VV", "VH")


def test_a_pair_is_read_on_the_extent_both_cover(tmp_path):
    before, after = noise((3, 100, 100), 1), noise((3, 100, 100), 2)
    a = write_raster(tmp_path / "before.tif", before)
    b = write_raster(tmp_path / "after.tif", after, origin=(ORIGIN[0] + 300, ORIGIN[1] - 200))  # 30 px E, 20 px S
    spec = resolve_scene([a, b], pair=True)
    with open_scene(spec) as source:
        assert (source.width, source.height) == (70, 80)
        assert source.transform.c == ORIGIN[0] + 300 and source.transform.f == ORIGIN[1] - 200
        first, second = source.read(TileWindow(0, 5, 5, 10, 10))
    np.testing.assert_array_equal(first, before[:, 25:35, 35:45])
    np.testing.assert_array_equal(second, after[:, 5:15, 5:15])


def test_a_pair_in_two_crs_is_warped_onto_the_before_grid(tmp_path):
    from rasterio.warp import transform

    xs, ys = transform("EPSG:32633", "EPSG:32634", [ORIGIN[0] + 100], [ORIGIN[1] - 100])  # the next UTM zone
    a = write_raster(tmp_path / "before.tif", noise((3, 64, 64), 1))
    b = write_raster(tmp_path / "after.tif", noise((3, 64, 64), 2), crs="EPSG:32634", origin=(xs[0], ys[0]))
    with open_scene(resolve_scene([a, b], pair=True)) as source:
        assert source.crs.to_epsg() == 32633 and 0 < source.width <= 64 and 0 < source.height <= 64
        first, second = source.read(TileWindow(0, 0, 0, source.width, source.height))
        assert first.shape == second.shape and second.any()


def test_pairs_that_cannot_be_compared_are_refused(tmp_path):
    a = write_raster(tmp_path / "before.tif", noise((3, 20, 20)))
    far = write_raster(tmp_path / "far.tif", noise((3, 20, 20)), crs="EPSG:32634")
    plain = write_raster(tmp_path / "plain.tif", noise((3, 20, 20)), crs=None)
    with pytest.raises(SceneError, match=r"before.tif \(EPSG:32633\) and far.tif \(EPSG:32634\) do not overlap"):
        open_scene(resolve_scene([a, far], pair=True))
    with pytest.raises(SceneError, match="plain.tif has no georeferencing"):
        open_scene(resolve_scene([a, plain], pair=True))
    with pytest.raises(SceneError, match="takes two scenes"):
        resolve_scene([a], pair=True)


def test_nodata_pixels_are_known(tmp_path):
    data = noise((3, 32, 32))
    data[:, :, :16] = 0
    with open_scene(resolve_scene([write_raster(tmp_path / "s.tif", data, nodata=0)])) as source:
        (tile,) = source.read(TileWindow(0, 0, 0, 16, 16))
        assert source.invalid(tile).all()
        (tile,) = source.read(TileWindow(0, 8, 0, 16, 16))
        assert source.invalid(tile)[:, :8].all() and not source.invalid(tile)[:, 8:].any()
