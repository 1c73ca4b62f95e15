"""The tile loop on the tiny demo model: pure picklable batches, nodata tiles skipped, the resume journal, real
scenes (DOTA boxes back in scene pixels, BigEarthNet bands with their CRS) and the `rsvlm-edge scene` command."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
from click.testing import CliRunner
from scene_rasters import noise, write_raster

from rsvlm_edge.scene.runner import Journal, SceneOptions, TileJob, TileRecord, close_scenes, run_scene, run_tiles
from rsvlm_edge.scene.source import resolve_scene

DEMO = Path(__file__).resolve().parents[1] / "models" / "tiny-demo"
FAST = {"max_new_tokens": 4}


@pytest.fixture(scope="module")
def pipe():
    from rsvlm_edge import Pipeline

    with Pipeline(DEMO, threads=1) as p:
        yield p
    close_scenes()


def _sampling(**kw):
    from rsvlm_edge.sampling import SamplingConfig

    return SamplingConfig(**{**FAST, **kw})


def _quiet(_line: str) -> None:
    pass


@pytest.fixture
def scene(tmp_path):
    return write_raster(tmp_path / "scene.tif", noise((3, 200, 260)))


def test_the_unit_of_work_is_a_pure_function_of_a_picklable_job(pipe, scene):
    from rsvlm_edge.scene.tiling import plan_tiles

    spec = resolve_scene([scene], sensor="rgb")
    plan = plan_tiles(260, 200, model_size=pipe.config.image_size)
    job = TileJob(spec, plan.windows[:3], plan.read_size, "[CLS] Classify the scene.", _sampling(), False)
    job = pickle.loads(pickle.dumps(job))
    first, second = run_tiles(pipe, job), run_tiles(pipe, job)
    assert [r.tile_id for r in first] == [w.id for w in plan.windows[:3]]
    assert [(r.status, r.result["text"]) for r in first] == [(r.status, r.result["text"]) for r in second]
    record = first[0]
    assert record.image_size == (128, 128) and record.task == "[CLS]" and record.result["sensor"] == "rgb"
    back = TileRecord.from_dict(json.loads(json.dumps(record.to_dict())))
    assert back.window == record.window and back.result == record.result


def test_nodata_tiles_are_skipped_and_outputs_are_written(pipe, tmp_path):
    data = noise((3, 128, 384))
    data[:, :, :128] = 0  # the first tile is all nodata
    path = write_raster(tmp_path / "scene.tif", data, nodata=0)
    run = run_scene(pipe, path, tmp_path / "out", task="cls", sampling=_sampling(), log=_quiet)
    assert [r.status for r in run.records] == ["nodata", "ok", "ok"]
    assert run.summary["tiles_nodata"] == 1 and run.summary["tiles_total"] == 3
    tiles = json.loads((tmp_path / "out" / "scene.tiles.geojson").read_text())
    assert {f["properties"]["tile_id"] for f in tiles["features"]} == {"r000000_c000128", "r000000_c000256"}
    lon, lat = tiles["features"][0]["geometry"]["coordinates"][0][0]
    assert 14 < lon < 16 and 47 < lat < 48.5  # UTM 33N, 500 km E, 5300 km N


def test_a_rerun_resumes_from_the_journal_and_retries_failed_tiles(pipe, scene, tmp_path):
    out = tmp_path / "out"
    opts = SceneOptions(task="cls", sampling=_sampling(), overlap="0.25")
    first = run_scene(pipe, scene, out, opts, max_tiles=2, log=_quiet)
    assert (first.ran, first.resumed) == (2, 0)
    journal = out / "scene.journal.jsonl"
    lines = journal.read_text().splitlines()
    entry = json.loads(lines[0])
    entry["record"].update(status="error", result=None, error="killed")
    journal.write_text("\n".join(lines + [json.dumps(entry), '{"key": "torn'] ) + "\n")  # a failure, a torn line
    second = run_scene(pipe, scene, out, opts, log=_quiet)
    assert second.resumed == 1 and second.ran == second.planned - 1  # the failed tile ran again
    assert all(r.status == "ok" for r in second.records)
    assert Journal(journal, second.summary["run_key"]).load()[entry["record"]["tile_id"]].status == "ok"
    other = run_scene(pipe, scene, out, opts, prompt="[CLS] What is this?", log=_quiet)
    assert other.resumed == 0  # another instruction is another run
    again = run_scene(pipe, scene, out, opts, resume=False, log=_quiet)
    assert again.resumed == 0 and again.ran == again.planned


def test_dota_boxes_come_back_in_scene_pixels(pipe, data_root, tmp_path):
    """[VG]: the box pointer answers every tile with a box, so every tile has a box to map, whatever the model
    finds (its [DET] may rightly find nothing on a scene so unlike its training data)."""
    image = data_root / "dota" / "example" / "images" / "P0706.png"
    run = run_scene(pipe, image, tmp_path / "out", task="vg", prompt="[VG] the ship", tile="512", overlap="0.25",
                    sampling=_sampling(max_new_tokens=40), log=_quiet)
    assert run.scene["crs"] is None and run.scene["width"] == 1111 and run.scene["height"] == 1182
    assert all(r.image_size == (128, 128) for r in run.records)  # 512 px tiles read at the model's input
    boxes = 0
    for record in run.records:
        w = record.window
        for box in (record.result or {}).get("boxes_px", []):
            x1, y1, x2, y2 = box
            sx, sy = w.width / record.image_size[0], w.height / record.image_size[1]
            scene_box = (w.col_off + x1 * sx, w.row_off + y1 * sy, w.col_off + x2 * sx, w.row_off + y2 * sy)
            assert w.col_off <= scene_box[0] <= scene_box[2] <= w.col_off + w.width
            assert w.row_off <= scene_box[1] <= scene_box[3] <= w.row_off + w.height
            boxes += 1
    objects = json.loads((tmp_path / "out" / "scene.geojson").read_text())
    assert objects.get("pixel_coordinates") is True
    for feature in objects["features"]:
        xs, ys = zip(*feature["geometry"]["coordinates"][0])
        assert 0 <= min(xs) <= max(xs) <= 1111 and 0 <= min(ys) <= max(ys) <= 1182
    assert 0 < len(objects["features"]) <= boxes


def test_bigearthnet_bands_run_as_one_multispectral_scene(pipe, data_root, tmp_path):
    folder = data_root / "bigearthnet" / "BigEarthNet-S2-Example" / "S2A_MSIL2A_20170613T101031_87_48"
    run = run_scene(pipe, folder, tmp_path / "out", task="cls", sampling=_sampling(), log=_quiet)
    assert run.scene["sensor"] == "ms" and run.scene["crs_name"] == "EPSG:32633" and len(run.scene["bands"]) == 12
    assert [r.status for r in run.records] == ["ok"] and run.records[0].result["sensor"] == "ms"


# --------------------------------------------------------------------------------------------------- the command


def _cli(*args):
    from rsvlm_edge.cli import main

    return CliRunner().invoke(main, ["scene", str(DEMO), *map(str, args)])


def test_scene_command_end_to_end(scene, tmp_path):
    out = tmp_path / "out"
    result = _cli(scene, "-o", out, "--task", "cls", "--max-new-tokens", "4", "--tile", "1280m", "--overlap", "0.25",
                  "--threads", "1", "--json")
    assert result.exit_code == 0, result.output
    assert "sensor: rgb (guessed: 3 bands" in result.stderr and "EPSG:32633" in result.stderr
    assert "tiles: 6 tile(s) of 128x128 px (1280 m), overlap 32 px" in result.stderr  # 3 columns x 2 rows
    summary = json.loads(result.stdout)
    assert summary["tiles_run"] == 6 and Path(summary["outputs"]["tiles"]).is_file()
    again = _cli(scene, "-o", out, "--task", "cls", "--max-new-tokens", "4", "--tile", "1280m", "--overlap", "0.25",
                 "--threads", "1")
    assert again.exit_code == 0 and "resuming: 6 tile(s)" in again.stderr


@pytest.mark.parametrize("args, words", [
    (["--bands", "B02,B8A"], "no band file for B8A"),
    (["--tile", "0.2"], "--tile 0.2 px: less than one pixel"),
    (["--overlap", "128"], "smaller than the tile"),
    (["--tile", "100m", "--plain"], "needs a georeferenced scene"),
    (["--pair"], "do not overlap"),
    (["--batch-size", "0"], "--batch-size"),
])
def test_scene_command_bad_input_is_one_line_and_writes_nothing(tmp_path, args, words):
    folder = tmp_path / "bands"
    write_raster(folder / "x_B02.tif", noise((1, 64, 64)))
    plain = "--plain" in args
    scene = write_raster(tmp_path / "scene.tif", noise((3, 64, 64)), crs=None if plain else "EPSG:32633")
    inputs = [scene]
    if "--bands" in args:
        inputs = [folder]
    if "--pair" in args:
        inputs = [scene, write_raster(tmp_path / "far.tif", noise((3, 64, 64)), crs="EPSG:32634")]
    out = tmp_path / "out"
    result = _cli(*inputs, "-o", out, "--task", "cls", *[a for a in args if a != "--plain"])
    assert result.exit_code == 2
    assert words in result.output and "Traceback" not in result.output
    assert not out.exists() or not [p for p in out.iterdir() if p.suffix in (".geojson", ".json", ".tif")]


def test_an_interrupted_run_leaves_its_journal_and_no_outputs_then_resumes(pipe, scene, tmp_path):
    from rsvlm_edge.scene.runner import LocalExecutor

    class Crash(LocalExecutor):
        def map(self, fn, items):
            for n, item in enumerate(super().map(fn, items)):
                if n == 1:
                    raise KeyboardInterrupt
                yield item

    out = tmp_path / "out"
    opts = SceneOptions(task="cls", sampling=_sampling(), batch_size=2)
    with pytest.raises(KeyboardInterrupt):
        run_scene(pipe, scene, out, opts, executor=Crash(pipe), log=_quiet)
    assert [p.name for p in out.iterdir()] == ["scene.journal.jsonl"]  # one batch journalled, nothing else
    run = run_scene(pipe, scene, out, opts, log=_quiet)
    assert run.resumed == 2 and run.ran == run.planned - 2 and (out / "scene.summary.json").is_file()


def test_gsd_tiles_cover_more_ground_and_are_read_at_the_model_input(pipe, scene, tmp_path):
    run = run_scene(pipe, scene, tmp_path / "out", task="cls", gsd=20.0, sampling=_sampling(), log=_quiet)
    assert {(r.window.width, r.window.height) for r in run.records} == {(256, 200)}  # the scene is 200 px high
    assert {r.image_size for r in run.records} == {(128, 100)}


def test_infer_refuses_vv_and_vh_files_as_a_change_pair(data_root):
    from rsvlm_edge.cli import main

    folder = data_root / "bigearthnet" / "BigEarthNet-S1-Example" / "S1A_IW_GRDH_1SDV_20170613T165043_33UUP_87_48"
    vv, vh = next(folder.glob("*_VV.tif")), next(folder.glob("*_VH.tif"))
    result = CliRunner().invoke(main, ["infer", str(DEMO), str(vv), str(vh), "--task", "ccd"])
    assert result.exit_code == 2 and "look like the VV and VH bands of one SAR scene" in result.output
    assert "rsvlm-edge scene" in result.output


def test_scene_bench_reports_tiles_per_second_and_peak_memory(tmp_path):
    from rsvlm_edge.cli import main

    scene = tmp_path / "synthetic.tif"
    args = ["scene-bench", str(DEMO), "--size", "600", "--tiles", "4", "--batch-size", "2", "--threads", "1",
            "--scene", str(scene), "--json"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["tiles"] == 4 and report["tiles_planned"] == 25 and report["tiles_per_s"] > 0
    assert 0 < report["peak_rss_after_write_mb"] <= report["peak_rss_mb"] and report["cpu"]
    import rasterio

    with rasterio.open(scene) as ds:  # kept, georeferenced, tiled
        assert (ds.width, ds.height, ds.count, ds.dtypes[0]) == (600, 600, 3, "uint16") and ds.crs.to_epsg() == 32633
        assert ds.block_shapes[0] == (512, 512)
