"""Bad inputs at the command line and the Python API: each gets one clear line naming the option or file, a non-zero
exit (2 for user errors), no traceback and nothing half-written; a folder run answers the tiles it can.

CLI cases run through click's CliRunner with ``catch_exceptions=False``, so an uncaught exception fails the test
itself rather than hiding in the output.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from rsvlm_edge import formats
from rsvlm_edge.cli import main
from rsvlm_edge.fileio import atomic_path, atomic_write_text
from rsvlm_edge.infer_command import MaskNames
from rsvlm_edge.pipeline import Pipeline
from rsvlm_edge.sampling import SamplingConfig
from rsvlm_edge.validate import available_cores


def run(*args, input=None):
    return CliRunner().invoke(main, [str(a) for a in args], input=input, catch_exceptions=False)


def assert_user_error(res, *named: str, code: int = 2) -> None:
    assert res.exit_code == code, res.output
    assert "Traceback" not in res.output
    for name in named:
        assert name in res.output, res.output


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_tile(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture()
def mixed_folder(tmp_path) -> Path:
    """Three good tiles around two unreadable ones (a truncated PNG, an empty JPEG)."""
    folder = tmp_path / "tiles"
    write_tile(folder / "a.png", 1)
    (folder / "b_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    write_tile(folder / "c.png", 2)
    (folder / "d_empty.jpg").write_bytes(b"")
    write_tile(folder / "e.png", 3)
    return folder


# ---------------------------------------------------------------------------------------- options, before the model
BAD_OPTIONS = [
    (["--batch-size", "-1"], "--batch-size"),
    (["--batch-size", "0"], "--batch-size"),
    (["--expert-budget", "infMB"], "--expert-budget"),
    (["--expert-budget", "nanGB"], "--expert-budget"),
    (["--expert-budget", "-5MB"], "--expert-budget"),
    (["--expert-budget", "1e400MB"], "--expert-budget"),
    (["--expert-budget", "0"], "--expert-budget"),
    (["--threads", "0"], "--threads"),
    (["--threads", "-3"], "--threads"),
    (["--repetition-penalty", "nan"], "--repetition-penalty"),
    (["--repetition-penalty", "0"], "--repetition-penalty"),
    (["--temperature", "inf"], "--temperature"),
    (["--temperature", "nan"], "--temperature"),
    (["--temperature", "-0.5"], "--temperature"),
    (["--top-p", "0"], "--top-p"),
    (["--top-p", "1.5"], "--top-p"),
    (["--top-p", "nan"], "--top-p"),
    (["--top-k", "-1"], "--top-k"),
    (["--max-new-tokens", "0"], "--max-new-tokens"),
    (["--seed", "-1"], "--seed"),
    (["--prompt", "\udcff\udcfe caption this"], "--prompt"),  # argv bytes that are not UTF-8 (surrogateescape)
]


@pytest.mark.parametrize("args,option", BAD_OPTIONS, ids=[" ".join(a) for a, _ in BAD_OPTIONS])
def test_infer_refuses_bad_options_before_loading_the_model(tmp_path, sample_png, args, option):
    # The model dir does not exist: the option must be refused before anything tries to load it.
    res = run("infer", tmp_path / "no-model", sample_png.parent, "--task", "cap", *args)
    assert_user_error(res, option)
    assert "model directory not found" not in res.output


@pytest.mark.parametrize("args,option", [a for a in BAD_OPTIONS if a[1] in ("--temperature", "--top-p", "--seed",
                                                                               "--threads", "--max-new-tokens")],
                         ids=lambda v: " ".join(v) if isinstance(v, list) else v)
def test_chat_checks_the_same_options(tmp_path, sample_png, args, option):
    res = run("chat", tmp_path / "no-model", sample_png, *args, input="")
    assert_user_error(res, option)


def test_non_utf8_prompt_is_named_with_its_bytes(tmp_path, sample_png):
    res = run("infer", tmp_path / "no-model", sample_png, "--prompt", "ok \udcff")
    assert_user_error(res, "--prompt", "not valid UTF-8", "ff")


def test_pin_expert_needs_the_ort_backend(tiny_model_dir, sample_png):
    res = run("infer", tiny_model_dir, sample_png, "--task", "cap", "--backend", "torch", "--pin-expert", "image")
    assert_user_error(res, "--pin-expert")


def test_max_new_tokens_past_the_context_is_refused(tiny_model_dir, sample_png):
    res = run("infer", tiny_model_dir, sample_png, "--task", "cap", "--backend", "torch", "--max-new-tokens", "100000")
    assert_user_error(res, "--max-new-tokens", "context")


def test_threads_above_the_cores_are_capped_with_a_warning(tiny_model_dir, sample_png):
    res = run("infer", tiny_model_dir, sample_png, "--task", "cap", "--backend", "torch", "--max-new-tokens", "2",
              "--threads", "100000")
    assert res.exit_code == 0, res.output
    assert f"using {available_cores()}" in res.output and "--threads 100000" in res.output


@pytest.mark.parametrize("args,option", [(["--limit", "-1"], "--limit"), (["--limit", "0"], "--limit"),
                                         (["--threads", "-1"], "--threads")])
def test_eval_checks_its_counts(tiny_model_dir, args, option):
    assert_user_error(run("eval", tiny_model_dir, *args), option)


def test_context_longer_than_the_model_was_trained_for_is_refused(tiny_model_dir, sample_png, tmp_path):
    model = tmp_path / "stretched"
    model.mkdir()
    for name in ("model.safetensors", "tokenizer.json"):
        (model / name).symlink_to(tiny_model_dir / name)
    config = json.loads((tiny_model_dir / "config.json").read_text())
    config["max_position_embeddings"] = 1_000_000_000
    (model / "config.json").write_text(json.dumps(config))
    res = run("infer", model, sample_png, "--task", "cap", "--backend", "torch")
    assert_user_error(res, "max_position_embeddings", "trained for")
    res = run("chat", model, sample_png, "--backend", "torch", input="[CAP] Describe.\n")
    assert_user_error(res, "max_position_embeddings")


# ---------------------------------------------------------------------------------------- folder runs
def test_folder_run_answers_good_tiles_and_records_bad_ones(tiny_model_dir, mixed_folder):
    res = run("infer", tiny_model_dir, mixed_folder, "--task", "cap", "--backend", "torch", "--json",
              "--max-new-tokens", "3", "--batch-size", "4")
    assert res.exit_code == 0, res.output
    records = [json.loads(line) for line in res.output.splitlines() if line.startswith("{")]
    assert [Path(r["images"][0]).name for r in records] == ["a.png", "b_corrupt.png", "c.png", "d_empty.jpg", "e.png"]
    errors = {Path(r["images"][0]).name: r["error"] for r in records if "error" in r}
    assert set(errors) == {"b_corrupt.png", "d_empty.jpg"}
    assert all(err and "Traceback" not in err for err in errors.values())
    assert all("text" in r for r in records if "error" not in r)  # the good tiles of the bad tiles' batch too
    assert "3 answered, 2 failed of 5 tiles" in res.output and "tiles/s" in res.output


def test_folder_run_text_mode_heads_each_error_with_its_path(tiny_model_dir, mixed_folder):
    res = run("infer", tiny_model_dir, mixed_folder, "--task", "cap", "--backend", "torch", "--max-new-tokens", "3")
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    at = lines.index(f"== {mixed_folder / 'b_corrupt.png'}")
    assert lines[at + 1].startswith("  error: ")
    assert f"== {mixed_folder / 'e.png'}" in lines and "Traceback" not in res.output


def test_fail_fast_stops_at_the_first_bad_tile(tiny_model_dir, mixed_folder):
    res = run("infer", tiny_model_dir, mixed_folder, "--task", "cap", "--backend", "torch", "--json",
              "--max-new-tokens", "3", "--batch-size", "1", "--fail-fast")
    assert_user_error(res, "b_corrupt.png")
    answered = [json.loads(line)["images"][0] for line in res.output.splitlines() if line.startswith("{")]
    assert [Path(p).name for p in answered] == ["a.png"]  # nothing after the bad tile


def test_folder_where_every_tile_fails_exits_non_zero(tiny_model_dir, tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "x.png").write_bytes(b"not a png")
    (folder / "y.tif").write_bytes(b"II*\x00")
    res = run("infer", tiny_model_dir, folder, "--task", "cap", "--backend", "torch", "--json")
    assert_user_error(res, "none of the 2 tiles")
    assert sum('"error"' in line for line in res.output.splitlines()) == 2


def test_a_failing_request_does_not_fail_its_batch(tiny_model_dir, tmp_path, monkeypatch):
    """A generation error is isolated by re-running the batch's tiles one by one: only the one at fault fails."""
    folder = tmp_path / "tiles"
    for i, name in enumerate(["a.png", "b_poison.png", "c.png"]):
        write_tile(folder / name, i)
    real_run = Pipeline.run

    def run_refusing_poison(self, tiles, *args, **kwargs):
        if any("poison" in t.paths[0] for t in tiles):
            raise RuntimeError("backend failed on this request")
        return real_run(self, tiles, *args, **kwargs)

    monkeypatch.setattr(Pipeline, "run", run_refusing_poison)
    res = run("infer", tiny_model_dir, folder, "--task", "cap", "--backend", "torch", "--json",
              "--max-new-tokens", "2", "--batch-size", "3")
    assert res.exit_code == 0, res.output
    records = [json.loads(line) for line in res.output.splitlines() if line.startswith("{")]
    assert ["error" in r for r in records] == [False, True, False]
    assert records[1]["error"] == "backend failed on this request"


def test_single_bad_image_still_fails_the_run(tiny_model_dir, tmp_path):
    bad = tmp_path / "corrupt.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    assert_user_error(run("infer", tiny_model_dir, bad, "--task", "cap", "--backend", "torch"), "corrupt.png")


def test_pair_task_on_a_folder_of_single_tiles_fails_before_loading(tmp_path, sample_png):
    res = run("infer", tmp_path / "no-model", sample_png.parent, "--task", "ccd")
    assert_user_error(res, "compares two images")


# ---------------------------------------------------------------------------------------- masks and file modes
def test_masks_of_same_stem_tiles_never_overwrite_each_other(tiny_model_dir, tmp_path, monkeypatch):
    folder = tmp_path / "tiles"
    names = ["a/x.jpg", "a/x.png", "b/x.jpg"]
    for i, name in enumerate(names):
        write_tile(folder / name, i)
    real_parse = formats.parse_answer
    grid = "\n".join(["building*12, others*12"] * formats.MASK_SIZE)
    monkeypatch.setattr(formats, "parse_answer", lambda tag, text: real_parse("[SEG]", grid))
    masks = tmp_path / "masks"
    res = run("infer", tiny_model_dir, folder, "--task", "seg", "--backend", "torch", "--json", "--max-new-tokens", "2",
              "--mask-dir", masks)
    assert res.exit_code == 0, res.output
    written = {json.loads(line)["mask_png"] for line in res.output.splitlines() if line.startswith("{")}
    assert written == {str(masks / f"{name}_mask.png") for name in names}
    files = sorted(p for p in masks.rglob("*") if p.is_file())
    assert len(files) == 6 and not [p for p in files if p.name.endswith(".tmp")]  # binary + class-indexed each
    for path in files:
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask()


def test_mask_names_are_unique_even_on_a_case_insensitive_disk(tmp_path):
    names = MaskNames(tmp_path / "m", tmp_path / "in")
    first = names(str(tmp_path / "in" / "X.PNG"))
    second = names(str(tmp_path / "in" / "x.png"))
    assert first != second and str(first).casefold() != str(second).casefold()


def test_atomic_writes_get_the_umask_mode_and_leave_nothing_on_failure(tmp_path):
    atomic_write_text(tmp_path / "out.json", "{}")
    assert (tmp_path / "out.json").stat().st_mode & 0o777 == 0o666 & ~umask()
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "half.bin") as tmp:
            tmp.write_bytes(b"partial")
            raise RuntimeError("crash while writing")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


# ---------------------------------------------------------------------------------------- Python API
@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    with Pipeline(tiny_model_dir, backend="torch") as p:
        yield p


def test_pipeline_takes_one_path_as_one_image(pipe, sample_png):
    sampling = SamplingConfig(max_new_tokens=2)
    assert pipe(str(sample_png), task="cap", sampling=sampling).tile.paths == [str(sample_png)]
    assert pipe(sample_png, task="cap", sampling=sampling).tile.paths == [str(sample_png)]


@pytest.mark.parametrize("images,error,text", [([], ValueError, "no images"), (7, TypeError, "path"),
                                                ([b"x.png"], TypeError, "path")])
def test_pipeline_refuses_bad_image_arguments(pipe, images, error, text):
    with pytest.raises(error, match=text):
        pipe(images, task="cap")


def test_pipeline_refuses_non_utf8_prompt(pipe, sample_png):
    with pytest.raises(ValueError, match="UTF-8"):
        pipe(sample_png, prompt="describe \udcff")


def test_pipeline_constructor_refuses_a_list(tiny_model_dir):
    with pytest.raises(TypeError, match="model directory"):
        Pipeline([])


def test_closed_pipeline_refuses_calls_and_closes_twice(tiny_model_dir, sample_png):
    with Pipeline(tiny_model_dir, backend="torch") as p:
        p(sample_png, task="cap", sampling=SamplingConfig(max_new_tokens=1))
    p.close()  # idempotent
    with pytest.raises(RuntimeError, match="pipeline is closed"):
        p(sample_png, task="cap")
    with pytest.raises(RuntimeError, match="pipeline is closed"):
        p.tile([sample_png])


def test_pipeline_threads_are_checked_and_capped(tiny_model_dir):
    with pytest.raises(ValueError, match="threads"):
        Pipeline(tiny_model_dir, backend="torch", threads=-2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Pipeline(tiny_model_dir, backend="torch", threads=100_000).close()
    assert any("cores available" in str(w.message) for w in caught)


# ---------------------------------------------------------------------------------------- missing extras
DEMO = Path(__file__).resolve().parents[1] / "models" / "tiny-demo"  # an exported engine dir shipped in the repo
BLOCKER = """
import sys
class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"torch", "onnx", "onnxscript", "tensorrt"}:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Blocker())
from rsvlm_edge.cli import main
main()
"""


@pytest.mark.parametrize("args,extra", [
    (["build", "{model}", "{out}", "--precision", "int8", "--scheme", "weight-only"], "export"),
    (["calibrate", "{model}", "{tile}", "--out", "{out}"], "export"),
    (["train", "{out}"], "train"),
    (["build", "{engines}", "{out}", "--target", "trt"], "trt"),
], ids=["build-int8", "calibrate", "train", "build-trt"])
def test_commands_name_the_extra_they_need_on_a_runtime_only_install(tiny_model_dir, sample_png, tmp_path, args, extra):
    values = {"model": tiny_model_dir, "engines": DEMO, "out": tmp_path / "out", "tile": sample_png}
    proc = subprocess.run([sys.executable, "-c", BLOCKER, *[a.format(**values) for a in args]],
                          capture_output=True, text=True, timeout=120)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output
    assert f"rsvlm-edge[{extra}]" in output and "Traceback" not in output
    assert not (tmp_path / "out").exists()


def test_chat_refuses_a_non_utf8_line_and_goes_on(tiny_model_dir, sample_png):
    res = CliRunner().invoke(main, ["chat", str(tiny_model_dir), str(sample_png), "--backend", "torch",
                                    "--max-new-tokens", "2"], input=b"\xff\xfe what\n[CAP] Describe.\n",
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "not valid UTF-8" in res.output and "model> " in res.output and "Traceback" not in res.output
