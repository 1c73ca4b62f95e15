"""Ray actor pools (rsvlm_edge.distributed) on a real one-machine Ray cluster on the loopback address: the same
answers as the local loop, every batch answered once when an actor is killed mid-job, the engine shipped to workers
that cannot see it and checked there, and `rsvlm-edge infer --ray` printing the local run's JSON."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import ray_cluster
from click.testing import CliRunner
from PIL import Image

from rsvlm_edge.cli import main
from rsvlm_edge.distributed.engine import EngineDir, cache_root
from rsvlm_edge.distributed.settings import RaySettings
from rsvlm_edge.infer_command import answer_batch
from rsvlm_edge.manifest import MANIFEST_FILE, sha256_file
from rsvlm_edge.sampling import SamplingConfig

ray = pytest.importorskip("ray")

from rsvlm_edge.distributed.executor import RayExecutor  # noqa: E402
from rsvlm_edge.distributed.infer import infer_batch  # noqa: E402

cluster = ray_cluster.cluster  # a one-machine Ray cluster for this module

DEMO = Path(__file__).resolve().parents[1] / "models" / "tiny-demo"
INSTRUCTION = "[CAP] Describe the image."
SAMPLING = SamplingConfig(max_new_tokens=48, constrain=True)
BATCH = 2  # tiles per job: a job lasts long enough that a kill lands while the actor still holds one


@pytest.fixture(scope="module")
def tiles(tmp_path_factory) -> Path:
    """Twelve distinct RGB tiles of different sizes."""
    folder = tmp_path_factory.mktemp("ray-tiles")
    rng = np.random.default_rng(7)
    for i in range(12):
        Image.fromarray(rng.integers(0, 255, (64 + 8 * i, 80, 3), dtype=np.uint8)).save(folder / f"t{i}.png")
    return folder


def _jobs(tiles: Path) -> list:
    paths = [[str(p)] for p in sorted(tiles.glob("*.png"))]
    return [(paths[i:i + BATCH], None, INSTRUCTION, SAMPLING, True) for i in range(0, len(paths), BATCH)]


def _answers(outcomes) -> list[dict]:
    """The records a run prints, less their timings (wall-clock, different on every run)."""
    out = []
    for outcome in outcomes:
        record = outcome.to_dict()
        record.pop("timings_ms", None)
        out.append(record)
    return out


@pytest.fixture(scope="module")
def local_answers(tiles) -> list[dict]:
    from rsvlm_edge.pipeline import Pipeline

    with Pipeline(DEMO, threads=1) as pipe:
        return [_answers(answer_batch(pipe, chunk, sensor, instr, sampling, None, dt))
                for chunk, sensor, instr, sampling, dt in _jobs(tiles)]


# ------------------------------------------------------------------ the engine as workers see it (no cluster)
def test_engine_digest_is_the_manifest_hash_and_a_shipped_copy_reproduces_it(tmp_path):
    engine = EngineDir.of(DEMO)
    assert engine.digest == sha256_file(DEMO / MANIFEST_FILE)
    assert MANIFEST_FILE in engine.files and "tokenizer.json" in engine.files
    assert "model.safetensors" not in engine.files  # the checkpoint is not part of the engine
    copy = engine.unpack(engine.bundle(), tmp_path)
    assert copy.name == engine.digest and sorted(p.name for p in copy.iterdir()) == sorted(engine.files)
    assert engine.unpack(engine.bundle(), tmp_path) == copy  # a second actor on the node reuses it


def test_a_shipped_engine_that_does_not_match_its_hash_is_refused(tmp_path):
    engine = EngineDir.of(DEMO)
    bundle = engine.bundle()
    bundle[MANIFEST_FILE] = bundle[MANIFEST_FILE].replace(b'"format_version"', b'"format_version" ', 1)
    with pytest.raises(ValueError, match="does not match its manifest hash"):
        engine.unpack(bundle, tmp_path)
    assert not (tmp_path / "rsvlm-edge-engines" / engine.digest).exists()


def test_ray_options_need_ray_and_the_local_path_does_not_import_it(tiles):
    res = CliRunner().invoke(main, ["infer", str(DEMO), str(tiles), "--task", "cls", "--actors", "2"])
    assert res.exit_code == 2 and "--actors and --threads-per-actor go with --ray" in res.output
    res = CliRunner().invoke(main, ["infer", str(DEMO), str(tiles), "--task", "cls", "--ray", "auto", "--threads", "1"])
    assert res.exit_code == 2 and "with --ray give --threads-per-actor" in res.output
    code = ("import sys; from rsvlm_edge.cli import main; import rsvlm_edge.infer_command; "
            "assert 'ray' not in sys.modules, 'ray imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_missing_ray_names_the_extra(tiles, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ModuleNotFoundError
    res = CliRunner().invoke(main, ["infer", str(DEMO), str(tiles), "--task", "cls", "--ray", "auto"])
    assert res.exit_code == 2 and "pip install 'rsvlm-edge[ray]'" in res.output


# ------------------------------------------------------------------ on the cluster
def test_two_actors_answer_like_the_local_loop_when_one_is_killed_mid_job(cluster, tiles, local_answers):
    jobs = _jobs(tiles)
    seen: list[int] = []
    results: dict[int, list[dict]] = {}
    with RayExecutor(RaySettings(actors=2), str(DEMO)) as pool:
        assert len(pool.actors) == 2 and pool.stats.sources == ["shared path"] * 2
        for index, outcomes in pool.map(infer_batch, jobs):
            if not seen:  # the other actors still hold queued batches: kill one now
                ray.kill(pool.actors[0])
            seen.append(index)
            results[index] = _answers(outcomes)
        assert pool.stats.retried >= 1 and pool.stats.started == 3
    assert sorted(seen) == list(range(len(jobs)))  # none lost, none twice
    assert [results[i] for i in range(len(jobs))] == local_answers


def test_workers_that_cannot_see_the_engine_get_it_once_and_verify_it(cluster, tiles, local_answers):
    shutil.rmtree(cache_root() / EngineDir.of(DEMO).digest, ignore_errors=True)  # the workers' node is this one
    with RayExecutor(RaySettings(actors=2), str(DEMO), ship_engine=True) as pool:
        assert pool.stats.sources == ["object store"] * 2
        answers = dict(pool.map(infer_batch, _jobs(tiles)[:3]))
    assert [_answers(answers[i]) for i in range(3)] == local_answers[:3]
    with RayExecutor(RaySettings(actors=1), str(DEMO), ship_engine=True) as pool:  # the next run finds it there
        assert pool.stats.sources == ["node cache"]


def test_a_worker_whose_engine_fails_its_hashes_stops_the_run_naming_the_file(cluster, tiles, tmp_path):
    bad = tmp_path / "engine"
    shutil.copytree(DEMO, bad, ignore=shutil.ignore_patterns("model.safetensors", "train_*"))
    data = bytearray((bad / "router.bin").read_bytes())
    data[0] ^= 0xFF
    (bad / "router.bin").write_bytes(bytes(data))
    res = CliRunner().invoke(main, ["infer", str(bad), str(tiles), "--task", "cls", "--ray", "auto", "--actors", "1"])
    assert res.exit_code == 2, res.output
    assert "router.bin" in res.output and "Ray node" in res.output and "Traceback" not in res.output


def test_infer_ray_prints_the_local_runs_json(cluster, tiles, tmp_path):
    runner = CliRunner()
    common = ["infer", str(DEMO), str(tiles), "--task", "cls", "--json", "--batch-size", "5"]
    local = runner.invoke(main, [*common, "--threads", "1"])
    remote = runner.invoke(main, [*common, "--ray", "auto", "--actors", "2"])
    assert local.exit_code == 0 and remote.exit_code == 0, remote.output

    def records(text: str) -> list[dict]:
        lines = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
        for line in lines:
            line.pop("timings_ms")
        return lines

    assert len(records(local.stdout)) == 12
    assert records(remote.stdout) == records(local.stdout)


def test_a_pool_larger_than_the_cluster_is_refused_not_left_waiting(cluster, tiles):
    res = CliRunner().invoke(main, ["infer", str(DEMO), str(tiles), "--task", "cls", "--ray", "auto", "--actors", "3"])
    assert res.exit_code == 2 and "--actors 3 x --threads-per-actor 1 needs 3 CPUs; the Ray cluster has 2" in res.output


def test_the_ray_benchmark_reports_rates_and_overhead(tmp_path):
    """`python -m rsvlm_edge.distributed.bench` end to end on 4 tiles (its own cluster, in its own process)."""
    out = subprocess.run([sys.executable, "-m", "rsvlm_edge.distributed.bench", str(DEMO), "--tiles", "4",
                          "--batch-size", "2", "--rounds", "1"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(report["tiles_per_s"]) == {"local", "ray_1_actor", "ray_2_actors"}
    assert all(rate > 0 for rate in report["tiles_per_s"].values())
    assert all(ms > 0 for ms in report["cpu_ms_per_tile"].values())
    assert report["cpu"] and 0 < report["two_process_ceiling"] <= 2.5


@pytest.fixture()
def head_node(tmp_path):
    """A cluster as an operator starts one (`ray start --head`, loopback, one CPU); stopped by ending the
    blocking `ray start` process, which takes its own Ray processes down with it."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray_cli = Path(sys.executable).with_name("ray")
    head = subprocess.Popen([str(ray_cli) if ray_cli.exists() else "ray", "start", "--head", "--block",
                             "--node-ip-address", "127.0.0.1", "--port", str(port), "--num-cpus", "1",
                             "--include-dashboard", "false", "--disable-usage-stats"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        head.terminate()
        head.wait(timeout=60)
        recorded = Path(os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp") / "ray" / "ray_current_cluster"
        if recorded.is_file() and recorded.read_text().strip().endswith(f":{port}"):
            recorded.unlink()  # what `ray stop` would remove: this cluster's address, not to be joined again


def test_infer_joins_a_cluster_by_its_address(head_node, tiles):
    """--ray HOST:PORT from another process (the CLI as a user runs it), on the token-authenticated cluster that
    `ray start` gives."""
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    common = [sys.executable, "-m", "rsvlm_edge.cli", "infer", str(DEMO), str(tiles), "--task", "cls", "--json"]
    local = subprocess.run([*common, "--threads", "1"], capture_output=True, text=True, timeout=600)
    remote = subprocess.run([*common, "--ray", head_node, "--actors", "1"], capture_output=True, text=True,
                            timeout=600, env=env)
    assert remote.returncode == 0, remote.stderr[-2000:]

    def records(text: str) -> list[dict]:
        lines = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
        for line in lines:
            line.pop("timings_ms")
        return lines

    assert len(records(local.stdout)) == 12 and records(remote.stdout) == records(local.stdout)
