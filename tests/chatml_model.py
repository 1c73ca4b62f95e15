"""A small model dir shaped like a converted RSUniVLM one: the tiny config with the ``qwen_1_5`` template, no router
and a 32k context, random weights, a Qwen-like ChatML tokenizer and an HF ``generation_config.json``."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from rsvlm_edge.tasks import DEFAULT_PROMPTS
from rsvlm_edge.templates import ENDOFTEXT, IM_END, IM_START

#: Qwen2's pre-tokenizer pattern.
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
                 r"|\s+(?!\S)|\s+")


def chatml_tokenizer(vocab_size: int = 600) -> HFTokenizer:
    """A byte-level BPE with Qwen2's pre-tokenizer and the ChatML control tokens (ids 0-2 here, not Qwen's)."""
    tk = HFTokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated"),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  special_tokens=[AddedToken(t, special=True, normalized=False)
                                                  for t in (ENDOFTEXT, IM_START, IM_END)],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = [f"{tag} {p}" for tag, p in DEFAULT_PROMPTS.items()]
    corpus += ["system\nYou are a helpful assistant.", "user\n", "assistant\n", "[12, 34, 56, 78]"]
    tk.train_from_iterator(corpus * 20, trainer=trainer)
    return tk


def make_chatml_model_dir(out: Path, repetition_penalty: float = 1.1) -> Path:
    from rsvlm_edge.config import tiny_config
    from rsvlm_edge.modeling import build_model, save_model

    cfg = dataclasses.replace(tiny_config(), name="tiny-qwen", prompt_template="qwen_1_5", router=False,
                              max_position_embeddings=32768).validate()
    save_model(build_model(cfg, seed=0), out)
    tk = chatml_tokenizer()
    tk.save(str(out / "tokenizer.json"))
    eos = [tk.token_to_id(IM_END), tk.token_to_id(ENDOFTEXT)]
    (out / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": eos, "pad_token_id": eos[1], "repetition_penalty": repetition_penalty, "do_sample": True,
         "temperature": 0.7, "top_k": 20, "top_p": 0.8}), encoding="utf-8")
    return out
