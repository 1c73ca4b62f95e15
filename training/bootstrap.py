"""Random-init model directories and the tokenizer corpus (shared by `rsvlm-edge init` and training)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Iterable, Iterator

from rsvlm_edge.config import ModelConfig
from rsvlm_edge.tasks import DEFAULT_PROMPTS, END, Turn, build_prompt
from rsvlm_edge.tokenizer import Tokenizer


def sample_texts(samples: Iterable) -> Iterator[str]:
    """Chat-formatted texts of samples: what the tokenizer must encode compactly."""
    for sample in samples:
        yield build_prompt([Turn(sample.prompt)], num_images=len(sample.images)) + sample.answer + END


def tokenizer_corpus(n_synthetic: int = 2000, seed: int = 0, extra: Iterable[str] = ()) -> Iterator[str]:
    from rsvlm_edge.training.synthetic import SyntheticGenerator

    gen = SyntheticGenerator(seed=seed)
    yield from sample_texts(gen.sample() for _ in range(n_synthetic))
    yield from (f"{tag} {prompt}" for tag, prompt in DEFAULT_PROMPTS.items())
    yield from extra


def train_tokenizer(vocab_size: int, n_synthetic: int = 2000, seed: int = 0, extra: Iterable[str] = ()) -> Tokenizer:
    return Tokenizer.train(tokenizer_corpus(n_synthetic, seed, extra), vocab_size=vocab_size)


def init_model_dir(out_dir: str | Path, cfg: ModelConfig, seed: int = 0, tokenizer_path: str | Path | None = None,
                   n_synthetic: int = 300) -> Path:
    """config.json + random-init model.safetensors + tokenizer.json: enough for `infer --backend torch`."""
    from rsvlm_edge.modeling import build_model, save_model

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer_path is not None:
        tokenizer = Tokenizer.load(tokenizer_path)
        shutil.copyfile(tokenizer_path, out / "tokenizer.json")
    else:
        tokenizer = train_tokenizer(min(cfg.vocab_size, 4096), n_synthetic=n_synthetic, seed=seed)
        tokenizer.save(out / "tokenizer.json")
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens, more than the model's vocab {cfg.vocab_size}")
    save_model(build_model(cfg, seed=seed), out)
    return out
