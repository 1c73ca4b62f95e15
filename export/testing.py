"""Helpers for tests and benchmarks: a random-init tiny checkpoint and its engine directory, built in seconds."""

from __future__ import annotations

from pathlib import Path

from rsvlm_edge.config import ModelConfig, tiny_config


def make_checkpoint(directory: str | Path, cfg: ModelConfig | None = None, seed: int = 0) -> Path:
    """config.json + random-init model.safetensors (fp16, as ``save_model`` writes) + a small tokenizer.json."""
    from rsvlm_edge.export.sources import small_corpus
    from rsvlm_edge.modeling import build_model, save_model
    from rsvlm_edge.tokenizer import Tokenizer

    directory = Path(directory)
    cfg = cfg or tiny_config()
    save_model(build_model(cfg, seed=seed), directory)
    Tokenizer.train(small_corpus(), vocab_size=min(cfg.vocab_size, 1024)).save(directory / "tokenizer.json")
    return directory


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, precision: str = "fp32", check: bool = False,
                      **options) -> Path:
    """Export a checkpoint dir (reloaded with ``load_model``, so the weights are exactly what the torch backend uses)."""
    from rsvlm_edge.export.exporter import ExportOptions, export_model
    from rsvlm_edge.modeling import load_model
    from rsvlm_edge.sampling import GENERATION_CONFIG_FILE

    checkpoint = Path(checkpoint)
    generation = checkpoint / GENERATION_CONFIG_FILE
    export_model(load_model(checkpoint), out_dir, checkpoint / "tokenizer.json",
                 ExportOptions(precision=precision, check=check, **options),
                 generation_config_file=generation if generation.is_file() else None)
    return Path(out_dir)
