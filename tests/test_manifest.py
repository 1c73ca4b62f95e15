"""manifest.json: round trip, validation, sha256/size verification, TensorRT engine compatibility. Torch-free."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rsvlm_edge.config import tiny_config
from rsvlm_edge.manifest import (
    FORMAT_VERSION,
    Component,
    EngineCompatError,
    ExpertLayout,
    Manifest,
    ManifestError,
    TensorLayout,
    TensorSpec,
    check_engine_compat,
    dumps,
    sha256_file,
)

MODELS = Path(__file__).resolve().parents[1] / "models"


def write(path, data: bytes):
    path.write_bytes(data)
    return path


@pytest.fixture
def engine_dir(tmp_path):
    files = {"tokenizer.json": b'{"tok": 1}', "a.onnx": b"graph-a", "shared.bin": b"\x01" * 5000, "b.onnx": b"graph-b",
             "b.bin": b"\x02" * 100}
    for name, data in files.items():
        write(tmp_path / name, data)
    sha = {n: sha256_file(tmp_path / n) for n in files}
    size = {n: len(d) for n, d in files.items()}

    def comp(name, graph, data):
        return Component(name=name, file=graph, precision="fp32",
                         inputs=[TensorSpec("x", "float32", ["batch", "seq", 4])], outputs=[TensorSpec("y", "float32", ["batch", 2])],
                         sha256={f: sha[f] for f in [graph, *data]}, external_data=list(data),
                         extra={"kind": "test", "bytes": {f: size[f] for f in [graph, *data]}})

    manifest = Manifest(model_config=tiny_config().to_dict(),
                        components={"a": comp("a", "a.onnx", ["shared.bin"]), "b": comp("b", "b.onnx", ["shared.bin", "b.bin"])},
                        tokenizer={"file": "tokenizer.json", "sha256": sha["tokenizer.json"], "bytes": size["tokenizer.json"]},
                        experts=ExpertLayout(num_experts=3), extra={"export": {"tool": "test"}})
    manifest.save(tmp_path)
    return tmp_path


def test_round_trip_and_layout(engine_dir):
    m = Manifest.load(engine_dir)
    data = json.loads((engine_dir / "manifest.json").read_text())
    assert data["format_version"] == FORMAT_VERSION == 1
    assert set(data) >= {"model_config", "tokenizer", "components", "experts", "engine", "export"}
    assert data["engine"] == {"kind": "onnx", "trt_version": None, "compute_capability": None}
    b = data["components"]["b"]
    assert b["inputs"][0] == {"name": "x", "dtype": "float32", "shape": ["batch", "seq", 4]}
    assert set(b["sha256"]) == {"b.onnx", "shared.bin", "b.bin"} and b["external_data"] == ["shared.bin", "b.bin"]
    assert m.components["b"].extra["kind"] == "test" and m.component("a").files == ["a.onnx", "shared.bin"]
    assert m.config() == tiny_config()
    assert Manifest.from_dict(m.to_dict()).to_dict() == m.to_dict()
    assert not list(engine_dir.glob(".*.tmp"))  # atomic save leaves no temporaries


def test_tampered_byte_is_caught_and_named(engine_dir):
    blob = bytearray((engine_dir / "shared.bin").read_bytes())
    blob[1234] ^= 0xFF
    (engine_dir / "shared.bin").write_bytes(bytes(blob))
    with pytest.raises(ManifestError, match="shared.bin fails its sha256"):
        Manifest.load(engine_dir)
    Manifest.load(engine_dir, verify="size")  # same size: the fast mode does not hash
    Manifest.load(engine_dir, verify=False)


def test_missing_and_truncated_files(engine_dir):
    (engine_dir / "b.bin").write_bytes(b"\x02" * 99)
    with pytest.raises(ManifestError, match="b.bin has 99 bytes"):
        Manifest.load(engine_dir, verify="size")
    (engine_dir / "b.bin").unlink()
    for mode in (True, "size"):
        with pytest.raises(ManifestError, match="b.bin is missing"):
            Manifest.load(engine_dir, verify=mode)
    (engine_dir / "tokenizer.json").write_text("{}")
    with pytest.raises(ManifestError, match="tokenizer.json"):
        Manifest.load(engine_dir).verify(files=["tokenizer.json"])


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(format_version=2), "format_version 2 is not supported"),
    (lambda d: d.pop("components"), "lacks 'components'"),
    (lambda d: d["components"]["a"].update(precision="int2"), "precision must be one of"),
    (lambda d: d["components"]["a"]["sha256"].pop("a.onnx"), "sha256 must map every file"),
    (lambda d: d["components"]["a"]["external_data"].append("other.bin"), "other.bin' has no sha256"),
    (lambda d: d["components"]["a"]["sha256"].update({"../escape.bin": "0"}), "stay inside the directory"),
    (lambda d: d["components"]["a"]["inputs"][0].update(dtype="complex64"), "unknown dtype"),
    (lambda d: d.update(engine={"kind": "tensorrt"}), "must record trt_version and compute_capability"),
    (lambda d: d.update(engine={"kind": "tensorrt", "trt_version": "10.3.0", "compute_capability": "sm_87"}), "major.minor"),
    (lambda d: d.update(engine={"kind": "openvino"}), "engine.kind must be one of"),
])
def test_malformed_manifests_are_refused(engine_dir, edit, message):
    data = json.loads((engine_dir / "manifest.json").read_text())
    edit(data)
    (engine_dir / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ManifestError, match=message):
        Manifest.load(engine_dir)


def with_experts(data):
    """The fixture's components as three decoder experts (a, b, b) over one trunk (shared.bin)."""
    data["experts"] = {"num_experts": 3, "components": ["a", "b", "b"], "expert_files": ["shared.bin", "b.bin", "b.bin"],
                       "trunk": {"file": "shared.bin", "bytes": 5000, "tensors": {
                           "w": {"offset": 0, "length": 16, "dtype": "float32", "shape": [2, 2]}}},
                       "expert_tensors": {}, "expert_bytes": 100}


@pytest.mark.parametrize("edit, message", [
    (lambda e: e["trunk"].update(file="../escape.bin"), "experts.trunk.file.*stay inside the directory"),
    (lambda e: e["trunk"].update(file="/etc/passwd"), "experts.trunk.file.*stay inside the directory"),
    (lambda e: e["trunk"].update(file="b.bin"), "experts.trunk.file = 'b.bin' is not in the sha256 table of a"),
    (lambda e: e["trunk"].update(file=7), "file names must be non-empty strings"),
    (lambda e: e.update(expert_files=["shared.bin", "tokenizer.json", "b.bin"]), r"expert_files\[1\] = 'tokenizer.json'"),
    (lambda e: e.update(expert_files=["shared.bin", "../b.bin", "b.bin"]), r"expert_files\[1\].*stay inside"),
    (lambda e: e.update(expert_files="b.bin"), "experts.expert_files must be a list of strings"),
    (lambda e: e.update(expert_files=["b.bin"]), "experts.expert_files lists 1 entries for num_experts = 3"),
    (lambda e: e.update(components=["a", "zzz", "b"]), r"expert_files\[1\] = 'b.bin' is not in the sha256 table of "
                                                       r"component 'zzz'"),
    (lambda e: e.update(num_experts=True), "num_experts must be a positive integer"),
    (lambda e: e.update(expert_bytes="100"), "expert_bytes must be a non-negative integer"),
    (lambda e: e["trunk"]["tensors"]["w"].update(shape=[2, "2"]), r"trunk.tensors\['w'\].shape"),
    (lambda e: e["trunk"]["tensors"]["w"].update(dtype="complex64"), r"trunk.tensors\['w'\].dtype"),
    (lambda e: e["trunk"]["tensors"]["w"].update(offset=-1), r"trunk.tensors\['w'\].offset"),
    (lambda e: e["trunk"]["tensors"]["w"].update(length="16"), r"trunk.tensors\['w'\].length"),
    (lambda e: e["trunk"]["tensors"]["w"].update(source=3), r"trunk.tensors\['w'\].source"),
])
def test_expert_section_is_checked(engine_dir, edit, message):
    data = json.loads((engine_dir / "manifest.json").read_text())
    with_experts(data)
    (engine_dir / "manifest.json").write_text(json.dumps(data))
    trunk = Manifest.load(engine_dir).experts.trunk
    assert trunk is not None and trunk.file == "shared.bin"  # the well-formed section loads
    edit(data["experts"])
    (engine_dir / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ManifestError, match=message) as info:
        Manifest.load(engine_dir)
    assert str(engine_dir / "manifest.json") in str(info.value)


def test_paths_stay_inside_the_directory_after_symlinks(engine_dir, tmp_path_factory):
    outside = tmp_path_factory.mktemp("outside") / "b.bin"
    outside.write_bytes((engine_dir / "b.bin").read_bytes())  # the right bytes, in the wrong place
    (engine_dir / "b.bin").unlink()
    (engine_dir / "b.bin").symlink_to(outside)
    for verify in (True, "size"):
        with pytest.raises(ManifestError, match="b.bin resolves to .*outside the engine directory"):
            Manifest.load(engine_dir, verify=verify)
    m = Manifest.load(engine_dir, verify=False)
    with pytest.raises(ManifestError, match="outside the engine directory"):
        m.path("b.bin")
    (engine_dir / "b.bin").unlink()
    (engine_dir / "data").mkdir()
    (engine_dir / "data" / "b.bin").write_bytes(outside.read_bytes())
    (engine_dir / "b.bin").symlink_to("data/b.bin")  # a link within the directory is fine
    assert Manifest.load(engine_dir).path("b.bin") == engine_dir / "b.bin"
    for name in ("../x", "/etc/passwd", ""):
        with pytest.raises(ManifestError, match="inside the directory|non-empty"):
            m.path(name)


@pytest.mark.parametrize("key, value, message", [
    ("hidden_size", 512, "embedding.onnx: inputs_embeds has shape .* hidden_size = 512"),
    ("vocab_size", 8192, "dec.onnx: logits has shape .* vocab_size = 8192"),
    ("num_layers", 2, "dec.onnx takes a KV cache for 4 layers.*num_layers is 2"),
    ("num_kv_heads", 4, "dec.onnx: past_key_0 has shape .* num_kv_heads = 4"),
])
def test_model_config_is_checked_against_the_component_shapes(engine_dir, key, value, message):
    cfg = tiny_config()
    data = json.loads((engine_dir / "manifest.json").read_text())
    spec = lambda name, shape: {"name": name, "dtype": "float32", "shape": shape}  # noqa: E731
    data["components"]["embedding"] = {**data["components"]["a"], "file": "embedding.onnx", "sha256": {"embedding.onnx": "0"},
                                       "external_data": [], "outputs": [spec("inputs_embeds", ["batch", "seq", cfg.hidden_size])]}
    kv = [spec(f"past_key_{i}", ["past_seq", "batch", cfg.num_kv_heads, cfg.head_dim]) for i in range(cfg.num_layers)]
    data["components"]["dec"] = {**data["components"]["a"], "file": "dec.onnx", "sha256": {"dec.onnx": "0"},
                                 "external_data": [], "inputs": kv, "outputs": [spec("logits", ["batch", cfg.vocab_size])]}
    data["experts"] = {"num_experts": 3, "components": ["dec"] * 3}
    (engine_dir / "manifest.json").write_text(json.dumps(data))
    Manifest.load(engine_dir, verify=False)  # consistent
    data["model_config"][key] = value
    (engine_dir / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ManifestError, match=message):
        Manifest.load(engine_dir, verify=False)


def test_not_an_engine_dir(tmp_path):
    with pytest.raises(ManifestError, match="has no manifest.json"):
        Manifest.load(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ManifestError, match="not valid JSON"):
        Manifest.load(tmp_path)
    with pytest.raises(ValueError):  # ManifestError is a ValueError: the CLI reports it as a user error
        Manifest.load(tmp_path)


def test_unknown_component_message(engine_dir):
    with pytest.raises(ManifestError, match="no component 'router'.*it has a, b"):
        Manifest.load(engine_dir).component("router")


def test_engine_compat(engine_dir):
    m = Manifest.load(engine_dir)
    check_engine_compat(m, None, None)  # ONNX dirs are portable
    m.engine = {"kind": "tensorrt", "trt_version": "8.5.2.2", "compute_capability": "8.7"}
    check_engine_compat(m, "8.5.2", (8, 7))
    with pytest.raises(EngineCompatError, match=r"built with TensorRT 8.5.2.2, but this machine has TensorRT 10.3.0"):
        check_engine_compat(m, "10.3.0", "8.7")
    with pytest.raises(EngineCompatError, match="compute capability 8.7, but this GPU is 8.6"):
        check_engine_compat(m, "8.5.2", "8.6")
    with pytest.raises(EngineCompatError, match="TensorRT is not installed"):
        check_engine_compat(m, None, "8.7")
    m.engine.update(version_compatible=True, hardware_compatible=True, compute_capability="8.0")
    check_engine_compat(m, "8.6.1", "8.9")
    with pytest.raises(EngineCompatError, match=">= 8.0"):
        check_engine_compat(m, "8.6.1", "7.2")
    assert issubclass(EngineCompatError, ManifestError)


@pytest.mark.parametrize("name", ["tiny-demo", "tiny-demo-int8"])
def test_shipped_expert_sections_read_back_to_the_same_json(name):
    """The typed experts section (ExpertLayout, TrunkLayout, TensorLayout) writes back every key it read, in the
    same order: the FP32 export's and the INT8 writer's (with its quantization / of fields)."""
    text = (MODELS / name / "manifest.json").read_text()
    manifest = Manifest.from_dict(json.loads(text))
    assert manifest.to_dict() == json.loads(text)
    assert dumps(manifest.to_dict()["experts"]) == dumps(json.loads(text)["experts"])
    layout = manifest.experts
    assert layout.trunk is not None and layout.expert_tensors is not None and layout.expert_files is not None
    assert len(layout.decoders) == len(layout.expert_files) == layout.num_experts
    assert all(isinstance(t, TensorLayout) and t.source for t in layout.expert_tensors.values())


def test_an_expert_layout_keeps_keys_it_does_not_know():
    data = {"num_experts": 1, "components": ["a"], "future_key": {"x": 1},
            "expert_tensors": {"w": {"offset": 64, "length": 8, "dtype": "float32", "shape": [2], "source": "p",
                                     "transform": None, "quantization": "scale"}}}
    layout = ExpertLayout.from_dict(data, components={})
    assert layout.expert_tensors is not None and layout.expert_tensors["w"].offset == 64
    assert layout.expert_tensors["w"].extra == {"quantization": "scale"} and layout.extra == {"future_key": {"x": 1}}
    assert layout.to_dict() == data
    assert list(layout.to_dict()["expert_tensors"]["w"]) == list(data["expert_tensors"]["w"])  # key order kept
    assert ExpertLayout.from_dict(None, components={}).to_dict() == {}
