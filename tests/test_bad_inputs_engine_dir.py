"""Bad engine directories through `rsvlm-edge infer`: each exits non-zero with one message naming the file at
fault, never a traceback, and never reads a file outside the directory.

Cases: manifest paths leaving the directory (``..``, absolute, a symlink), an altered expert file, a malformed
``experts`` section, a ``model_config`` that does not match the graphs, a manifest that does not match its graph,
and truncated graphs (caught by the hash, or by ONNX Runtime when the manifest was rewritten to match).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import pytest
from click.testing import CliRunner

from rsvlm_edge.cli import main
from rsvlm_edge.export.testing import export_checkpoint, make_checkpoint
from rsvlm_edge.manifest import MANIFEST_FILE, Manifest, ManifestError, sha256_file


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> Path:
    checkpoint = make_checkpoint(tmp_path_factory.mktemp("ckpt-bad-dir"))
    return export_checkpoint(checkpoint, tmp_path_factory.mktemp("onnx-bad-dir") / "tiny")


@pytest.fixture
def copy(engine, tmp_path) -> Path:
    """A private copy of the engine dir to break (real files: a symlink to the original would itself be refused)."""
    return Path(shutil.copytree(engine, tmp_path / "engine"))


def edit_manifest(directory: Path, change: Callable[[dict], None]) -> None:
    path = directory / MANIFEST_FILE
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def rehash(directory: Path, name: str) -> None:
    """Record ``name``'s current sha256 and size wherever the manifest lists it (a bad export, not a bad copy)."""
    def change(data):
        for comp in data["components"].values():
            if name in comp["sha256"]:
                comp["sha256"][name] = sha256_file(directory / name)
                comp.setdefault("bytes", {})[name] = (directory / name).stat().st_size
    edit_manifest(directory, change)


def infer(directory: Path, image: Path, *extra: str):
    return CliRunner().invoke(main, ["infer", str(directory), str(image), "--task", "cap", "--max-new-tokens", "4",
                                     "--no-stream", *extra], catch_exceptions=False)


def assert_refused(result, *needles: str) -> str:
    out = result.output
    assert result.exit_code != 0, out
    assert "Traceback" not in out and len(out.strip().splitlines()) == 1, out  # one clear line
    for needle in needles:
        assert needle in out, out
    return out


def set_trunk(value):
    return lambda data: data["experts"]["trunk"].__setitem__("file", value)


@pytest.mark.parametrize("change,needles", [
    (set_trunk("../x.bin"), ["experts.trunk.file", "'../x.bin'", "inside the directory"]),
    (set_trunk("/etc/passwd"), ["experts.trunk.file", "'/etc/passwd'", "inside the directory"]),
    (set_trunk("tokenizer.json"), ["experts.trunk.file", "'tokenizer.json'", "sha256 table"]),
    (lambda d: d["experts"]["expert_files"].__setitem__(1, "../../decoder_expert1.bin"),
     ["experts.expert_files[1]", "inside the directory"]),
    (lambda d: d["experts"]["expert_files"].__setitem__(1, "decoder_expert2.bin"),
     ["experts.expert_files[1]", "'decoder_expert2.bin'", "decoder_expert1"]),
    (lambda d: d["experts"].__setitem__("expert_files", "decoder_expert0.bin"),
     ["experts.expert_files", "list of strings"]),
    (lambda d: d["experts"]["expert_files"].pop(), ["experts.expert_files", "2 entries", "num_experts = 3"]),
    (lambda d: d["experts"].__setitem__("num_experts", "3"), ["experts.num_experts", "positive integer"]),
    (lambda d: d["experts"]["trunk"].__setitem__("bytes", -1), ["experts.trunk.bytes"]),
    (lambda d: next(iter(d["experts"]["expert_tensors"].values())).__setitem__("offset", "0"),
     ["experts.expert_tensors", ".offset"]),
    (lambda d: d["components"]["embedding"]["sha256"].__setitem__("/etc/passwd", "00"),
     ["component 'embedding'", "'/etc/passwd'"]),
], ids=["trunk-dotdot", "trunk-absolute", "trunk-unverified", "expert-dotdot", "expert-of-another-decoder",
        "expert-files-not-a-list", "expert-files-too-short", "num-experts-a-string", "trunk-bytes-negative",
        "tensor-offset-a-string", "absolute-sha256-entry"])
def test_manifest_paths_and_expert_section_are_checked(copy, sample_png, change, needles):
    edit_manifest(copy, change)
    assert_refused(infer(copy, sample_png), MANIFEST_FILE, *needles)


def test_symlink_leaving_the_directory_is_refused_even_with_the_right_hash(copy, tmp_path, sample_png):
    outside = tmp_path / "elsewhere" / "decoder_trunk.bin"
    outside.parent.mkdir()
    shutil.move(copy / "decoder_trunk.bin", outside)
    (copy / "decoder_trunk.bin").symlink_to(outside)  # same bytes, so only the location gives it away
    out = assert_refused(infer(copy, sample_png), "decoder_trunk.bin", "outside the engine directory")
    assert str(outside) in out
    for verify in ("size", False):  # also without hashing: Manifest.path itself refuses to hand it out
        with pytest.raises(ManifestError, match="outside the engine directory"):
            Manifest.load(copy, verify=verify).path("decoder_trunk.bin")


def test_symlink_inside_the_directory_is_fine(copy, sample_png):
    (copy / "weights").mkdir()
    shutil.move(copy / "decoder_expert1.bin", copy / "weights" / "decoder_expert1.bin")
    (copy / "decoder_expert1.bin").symlink_to(Path("weights") / "decoder_expert1.bin")
    result = infer(copy, sample_png)
    assert result.exit_code == 0, result.output


def test_altered_expert_file_fails_its_hash(copy, sample_png):
    path = copy / "decoder_expert1.bin"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    assert_refused(infer(copy, sample_png), str(path), "sha256")


@pytest.mark.parametrize("key,value,needles", [
    ("hidden_size", 512, ["embedding.onnx", "hidden_size = 512", "256"]),
    ("vocab_size", 5000, ["decoder_expert0.onnx", "logits", "vocab_size = 5000"]),
    ("num_layers", 6, ["decoder_expert0.onnx", "4 layers", "num_layers is 6"]),
    ("num_kv_heads", 4, ["decoder_expert0.onnx", "past_key_0", "num_kv_heads = 4"]),
    ("image_size", 160, ["vision_encoder.onnx", "stem_pixels", "image_size = 160"]),
])
def test_model_config_that_does_not_match_the_graphs(copy, sample_png, key, value, needles):
    edit_manifest(copy, lambda d: d["model_config"].__setitem__(key, value))
    assert_refused(infer(copy, sample_png), "does not match the graphs", *needles)


def test_manifest_edited_to_agree_with_a_wrong_config_still_disagrees_with_the_graph(copy, sample_png):
    """model_config and the recorded shapes both say vocab 5000: the graph's own output shape gives it away."""
    def change(data):
        data["model_config"]["vocab_size"] = 5000
        for name in data["experts"]["components"]:
            for out in data["components"][name]["outputs"]:
                if out["name"] == "logits":
                    out["shape"][-1] = 5000
    edit_manifest(copy, change)
    assert_refused(infer(copy, sample_png), "decoder_expert0.onnx", "'logits'", "5000", "4096",
                   "does not match the graph")


@pytest.mark.parametrize("name", ["embedding.onnx", "decoder_expert0.onnx"])
def test_truncated_graph_fails_its_hash(copy, sample_png, name):
    path = copy / name
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert_refused(infer(copy, sample_png), str(path), "sha256")


@pytest.mark.parametrize("name", ["embedding.onnx", "decoder_expert0.onnx", "vision_encoder.onnx"])
def test_truncated_graph_with_a_matching_manifest_is_named_by_the_runtime_error(copy, sample_png, name):
    """A broken export (the manifest vouches for the truncated file): ONNX Runtime's parse error, with the file."""
    path = copy / name
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    rehash(copy, name)
    assert_refused(infer(copy, sample_png), str(path))
