"""Weight bytes one decode step must read, per engine, in that engine's precision: the trunk file + one expert
file + one embedding row for ONNX engine dirs (from the manifest), the FP32 in-memory sizes for torch eager."""

from __future__ import annotations

import json
from pathlib import Path

from rsvlm_edge.bench.model_cost import active_bytes_fp32
from rsvlm_edge.config import ModelConfig

PRECISION_BYTES = {"fp32": 4, "fp16": 2, "int8": 1}


class EngineDirError(ValueError):
    """A directory is not what the bench expects (no manifest, no expert layout, no safetensors)."""


def read_manifest(engine_dir: str | Path) -> dict:
    path = Path(engine_dir) / "manifest.json"
    if not path.is_file():
        raise EngineDirError(f"{engine_dir} has no manifest.json; give an exported engine dir (rsvlm-edge export)")
    return json.loads(path.read_text())


def engine_precision(manifest: dict) -> str:
    """The decoder's precision: what decode speed depends on."""
    comps = manifest.get("components", {})
    names = manifest.get("experts", {}).get("components") or ["decoder_expert0"]
    return str(comps.get(names[0], {}).get("precision", "fp32"))


def engine_active_bytes(engine_dir: str | Path) -> int:
    manifest = read_manifest(engine_dir)
    layout = manifest.get("experts") or {}
    if "trunk" not in layout or not layout.get("expert_files"):
        raise EngineDirError(f"{engine_dir}: the manifest has no decoder expert layout (trunk + expert files)")
    directory = Path(engine_dir)
    trunk = (directory / layout["trunk"]["file"]).stat().st_size
    expert = (directory / layout["expert_files"][0]).stat().st_size
    cfg = ModelConfig.from_dict(manifest["model_config"])
    embedding = manifest.get("components", {}).get("embedding", {})
    row = cfg.hidden_size * PRECISION_BYTES.get(embedding.get("precision", "fp32"), 4)
    return int(trunk + expert + row)


def engine_config(path: str | Path) -> ModelConfig:
    """The ModelConfig of an engine dir (manifest) or a model dir (config.json)."""
    path = Path(path)
    if (path / "manifest.json").is_file():
        return ModelConfig.from_dict(read_manifest(path)["model_config"])
    if (path / "config.json").is_file():
        return ModelConfig.load(path / "config.json")
    raise EngineDirError(f"{path} has neither manifest.json nor config.json")


def torch_active_bytes(model_dir: str | Path) -> int:
    """torch eager loads the safetensors as FP32 (``load_model``), whatever they are stored as."""
    if not (Path(model_dir) / "model.safetensors").is_file():
        raise EngineDirError(f"{model_dir} has no model.safetensors; --torch takes a model dir (rsvlm-edge init/train)")
    return active_bytes_fp32(engine_config(model_dir))
