"""Where the exported model comes from: a checkpoint directory, or a random-init preset (benchmarks, tests)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from rsvlm_edge.config import ModelConfig


class SourceError(ValueError):
    """The checkpoint cannot be read (missing files, config/weights mismatch)."""


def load_checkpoint(directory: str | Path):
    """(model, tokenizer.json path or None) from a dir written by ``save_model`` (config.json + model.safetensors)."""
    from rsvlm_edge.modeling import load_model

    directory = Path(directory)
    if not directory.is_dir():
        raise SourceError(f"checkpoint directory not found: {directory}")
    if not (directory / "config.json").is_file():
        raise SourceError(f"{directory} has no config.json: not a checkpoint directory (see `rsvlm-edge init`)")
    try:
        model = load_model(directory)
    except (FileNotFoundError, ValueError) as exc:
        raise SourceError(f"cannot load the checkpoint in {directory}: {exc}") from None
    tokenizer = directory / "tokenizer.json"
    return model, (tokenizer if tokenizer.is_file() else None)


def small_corpus() -> list[str]:
    """A few chat-formatted texts of every task: enough for a small BPE when the synthetic corpus is unavailable."""
    from rsvlm_edge.tasks import DEFAULT_PROMPTS, END, Turn, build_prompt

    answers = ["A harbour with several ships and a long pier.", "[12, 34, 56, 78]", "[8, 15, 40, 60] [50, 50, 90, 95]",
               "others*24\nwater*12, others*12", "There are 3 ships.", "airport", "[40, 52, 20, 10, -30]",
               "A new building appeared in the top left corner."]
    texts = []
    for tag, prompt in DEFAULT_PROMPTS.items():
        for answer in answers:
            images = 2 if tag == "[CCD]" else 1
            texts.append(build_prompt([Turn(f"{tag} {prompt}")], num_images=images) + answer + END)
    return texts * 4


def random_init_tokenizer(cfg: ModelConfig, seed: int = 0, directory: str | Path | None = None) -> Path:
    """Train a small tokenizer for a random-init model (the synthetic corpus when present, else a built-in one)."""
    from rsvlm_edge.templates import get_template
    from rsvlm_edge.tokenizer import MIN_VOCAB_SIZE, Tokenizer

    vocab = max(MIN_VOCAB_SIZE, min(cfg.vocab_size, 4096))
    try:
        from rsvlm_edge.training.bootstrap import train_tokenizer

        tokenizer = train_tokenizer(vocab, n_synthetic=300, seed=seed)
    except ImportError:
        tokenizer = Tokenizer.train(small_corpus(), vocab_size=min(vocab, 1024))
    control = get_template(cfg.prompt_template).control
    tokenizer = with_special_tokens(tokenizer, control.required)  # e.g. ChatML's for a qwen_1_5 model
    if tokenizer.vocab_size > cfg.vocab_size:
        raise SourceError(f"the tokenizer has {tokenizer.vocab_size} tokens, more than the model's {cfg.vocab_size}")
    out = Path(directory or tempfile.mkdtemp(prefix="rsvlm-tokenizer-")) / "tokenizer.json"
    tokenizer.save(out)
    return out


def with_special_tokens(tokenizer, tokens: tuple[str, ...]):
    """``tokenizer`` with ``tokens`` added as special tokens where it lacks them (a random-init model whose prompt
    template uses other control tokens than the trained tokenizer's)."""
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as HFTokenizer

    from rsvlm_edge.tokenizer import Tokenizer

    backend = HFTokenizer.from_str(tokenizer.to_str())
    missing = [t for t in tokens if backend.token_to_id(t) is None]
    if not missing:
        return tokenizer
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
    return Tokenizer.from_str(backend.to_str(), tokenizer.control)


def random_model(cfg: ModelConfig, seed: int = 0):
    from rsvlm_edge.modeling import build_model

    return build_model(cfg, seed=seed).eval()
