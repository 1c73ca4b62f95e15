"""`rsvlm-edge scene` batches on a Ray actor pool (one-machine cluster on the loopback address): a 2-actor run with
one actor killed mid-scene journals every tile once and writes the local run's GeoJSON; a rerun of the finished job
sends no work to the cluster."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import ray_cluster

ray = pytest.importorskip("ray")
rasterio = pytest.importorskip("rasterio")
pytest.importorskip("shapely")

from rasterio.crs import CRS  # noqa: E402
from rasterio.transform import from_origin  # noqa: E402

from rsvlm_edge.distributed.executor import RayExecutor  # noqa: E402
from rsvlm_edge.distributed.scene import EngineView, run_scene_ray, run_scenes_ray  # noqa: E402
from rsvlm_edge.distributed.settings import RaySettings  # noqa: E402
from rsvlm_edge.sampling import SamplingConfig  # noqa: E402
from rsvlm_edge.scene.runner import SceneOptions, run_scene  # noqa: E402

cluster = ray_cluster.cluster  # a one-machine Ray cluster for this module

DEMO = Path(__file__).resolve().parents[1] / "models" / "tiny-demo"
# [DET] with short answers: features to merge, quickly; 2 tiles per batch so a kill lands on a batch in flight
OPTIONS = SceneOptions(task="det", tile="128", overlap="0.25", batch_size=2, progress=False,
                       sampling=SamplingConfig(max_new_tokens=40, constrain=True), default_tokens=False)


@pytest.fixture(scope="module")
def scene(tmp_path_factory) -> Path:
    """384x256 RGB in UTM 33N at 10 m: 12 tiles of 128 px with a quarter overlap, bright and dark blocks."""
    path = tmp_path_factory.mktemp("ray-scene") / "scene.tif"
    rng = np.random.default_rng(3)
    pixels = (rng.random((3, 256, 384)) * 60 + 80).astype(np.uint8)
    pixels[:, 40:80, 60:120] = 250
    pixels[:, 150:200, 250:300] = 20
    with rasterio.open(path, "w", driver="GTiff", width=384, height=256, count=3, dtype="uint8",
                       crs=CRS.from_epsg(32633), transform=from_origin(500_000, 5_000_000, 10, 10)) as dst:
        dst.write(pixels)
    return path


def _tiles(out: Path) -> dict[str, dict]:
    """The journal's records by tile id (one line per tile expected), less their timings."""
    lines = [json.loads(line)["record"] for line in (out / "scene.journal.jsonl").read_text().splitlines()]
    records = {}
    for record in lines:
        assert record["tile_id"] not in records, f"tile {record['tile_id']} journalled twice"
        record["result"].pop("timings_ms", None)
        records[record["tile_id"]] = record
    return records


class KillOnce(RayExecutor):
    """The pool, killing its first actor as soon as the first batch of the scene comes back."""

    def map(self, fn, items):
        for n, pair in enumerate(super().map(fn, items)):
            if n == 0:
                ray.kill(self.actors[0])
            yield pair


def test_a_scene_on_two_actors_with_one_killed_is_the_local_run_and_a_rerun_does_no_work(cluster, scene, tmp_path):
    from rsvlm_edge.pipeline import Pipeline

    with Pipeline(DEMO, threads=1) as pipe:
        local = run_scene(pipe, scene, tmp_path / "local", OPTIONS, log=lambda _: None)
    with KillOnce(RaySettings(actors=2), str(DEMO)) as pool:
        remote = run_scene(EngineView.of(DEMO), scene, tmp_path / "ray", OPTIONS, executor=pool, log=lambda _: None)
        assert pool.stats.retried >= 1
    assert remote.ran == local.ran == 12
    assert _tiles(tmp_path / "ray") == _tiles(tmp_path / "local")
    for name in ("scene.geojson", "scene.crs.geojson"):
        assert json.loads((tmp_path / "ray" / name).read_text()) == json.loads((tmp_path / "local" / name).read_text())

    journal = (tmp_path / "ray" / "scene.journal.jsonl").read_text()
    again = run_scene_ray(DEMO, scene, tmp_path / "ray", OPTIONS, cluster=RaySettings(actors=1), log=lambda _: None)
    assert (again.ran, again.resumed) == (0, 12)
    assert (tmp_path / "ray" / "scene.journal.jsonl").read_text() == journal  # nothing answered again


def test_scene_cli_on_ray_writes_the_local_runs_tile_layer(cluster, scene, tmp_path):
    from click.testing import CliRunner

    from rsvlm_edge.cli import main

    common = ["scene", str(DEMO), str(scene), "--task", "cls", "--tile", "128", "--batch-size", "4"]
    local = CliRunner().invoke(main, [*common, "-o", str(tmp_path / "local"), "--threads", "1"])
    remote = CliRunner().invoke(main, [*common, "-o", str(tmp_path / "ray"), "--ray", "auto", "--actors", "2"])
    assert local.exit_code == 0 and remote.exit_code == 0, remote.output
    layer = "scene.tiles.geojson"
    assert json.loads((tmp_path / "ray" / layer).read_text()) == json.loads((tmp_path / "local" / layer).read_text())


def test_two_scenes_at_once_on_one_pool_are_their_local_runs(cluster, scene, tmp_path):
    from rsvlm_edge.pipeline import Pipeline

    with rasterio.open(scene) as src:  # a second scene: the first turned upside down
        profile, pixels = src.profile, src.read()
    other = tmp_path / "other.tif"
    with rasterio.open(other, "w", **profile) as dst:
        dst.write(pixels[:, ::-1, :])
    options = SceneOptions(task="cls", tile="128", batch_size=1, progress=False)
    scenes = [(scene, tmp_path / "ray-a"), (other, tmp_path / "ray-b")]
    with pytest.raises(ValueError, match="its own output folder"):
        run_scenes_ray(DEMO, [(scene, tmp_path / "x"), (other, tmp_path / "x")], options, cluster=RaySettings())
    runs = run_scenes_ray(DEMO, scenes, options, cluster=RaySettings(actors=2), log=lambda _: None)
    assert [r.ran for r in runs] == [6, 6]
    with Pipeline(DEMO, threads=1) as pipe:
        for path, out in scenes:
            run_scene(pipe, path, tmp_path / f"local-{out.name}", options, log=lambda _: None)
            assert _tiles(out) == _tiles(tmp_path / f"local-{out.name}")
