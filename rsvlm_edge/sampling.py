"""Next-token selection in numpy: greedy, temperature, top-k, top-p and repetition penalty, seeded per request;
and the per-model defaults a converted model dir's ``generation_config.json`` sets."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

GENERATION_CONFIG_FILE = "generation_config.json"


@dataclass
class SamplingConfig:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    # 1 = off (CTRL-style: divide positive logits, multiply negative ones); None = the model's default (1, or its
    # generation_config.json's value)
    repetition_penalty: float | None = None
    # whether the penalty also counts the prompt's ids; None = as the model's reference does (its prompt template)
    penalize_prompt: bool | None = None
    seed: int = 0
    stop_ids: list[int] = field(default_factory=list)
    ignore_stop: bool = False  # benchmarks: never stop early, so every run decodes exactly max_new_tokens
    # mask each step to the task tag's answer grammar (rsvlm_edge.constrain), so tagged answers always parse
    constrain: bool = False
    # with constrain: the class names a [CLS] answer may use (one or more of them, comma-separated); None = any label
    classes: tuple[str, ...] | None = None

    def validate(self) -> "SamplingConfig":
        """Reject values that would silently misbehave: NaN compares false with every bound, so it is refused
        first (a NaN penalty empties the answer, a NaN or infinite temperature samples garbage)."""
        for name in ("max_new_tokens", "top_k", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise ValueError(f"{name} must be a whole number, got {value!r}")
        for name in ("temperature", "top_p", "repetition_penalty"):
            value = getattr(self, name)
            if value is None and name == "repetition_penalty":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
                raise ValueError(f"{name} must be a number, got {value!r}")
            if not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.penalize_prompt is not None and not isinstance(self.penalize_prompt, bool):
            raise ValueError(f"penalize_prompt must be True, False or None, got {self.penalize_prompt!r}")
        if self.repetition_penalty is not None and self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if self.classes is not None:
            self.classes = check_classes(self.classes)
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def check_classes(classes) -> tuple[str, ...]:
    """A [CLS] vocabulary: distinct class names in the label grammar (lower-case words joined by one space, ``-``
    or ``_``: what the model writes, and what :mod:`rsvlm_edge.constrain` can spell)."""
    from rsvlm_edge.formats import LABEL_PATTERN

    if isinstance(classes, str) or not isinstance(classes, (list, tuple)):
        raise ValueError(f"classes must be a list of class names, got {classes!r}")
    out = tuple(dict.fromkeys(classes))
    if not out:
        raise ValueError("classes must name at least one class")
    for name in out:
        if not isinstance(name, str) or not LABEL_PATTERN.fullmatch(name):
            raise ValueError(f"class name {name!r} is not a label: lower-case letters and digits, words joined by "
                             f"one space, '-' or '_'")
    return out


@dataclass(frozen=True)
class GenerationDefaults:
    """A model's own generation settings: what a request leaves unset (None) takes from here.

    Models trained here have none (penalty 1). A converted model dir carries the checkpoint's HF
    ``generation_config.json``: its ``eos_token_id`` (one id or a list) stop generation besides the template's end
    token, and its ``repetition_penalty`` applies even to greedy decoding, as HF ``generate`` applies it."""

    eos_token_ids: tuple[int, ...] = ()
    repetition_penalty: float = 1.0

    @classmethod
    def load(cls, model_dir: str | Path) -> GenerationDefaults:
        """``<model_dir>/generation_config.json``, or no defaults when the dir has none."""
        path = Path(model_dir) / GENERATION_CONFIG_FILE
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return cls()
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"cannot read {path}: {exc}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object")
        eos = data.get("eos_token_id")
        eos_ids = [] if eos is None else eos if isinstance(eos, list) else [eos]
        if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in eos_ids):
            raise ValueError(f"{path}: eos_token_id must be a token id or a list of them, got {eos!r}")
        penalty = data.get("repetition_penalty", 1.0)
        if isinstance(penalty, bool) or not isinstance(penalty, (int, float)) or not math.isfinite(penalty) \
                or penalty <= 0:
            raise ValueError(f"{path}: repetition_penalty must be a positive number, got {penalty!r}")
        return cls(tuple(eos_ids), float(penalty))

    def resolve(self, sampling: SamplingConfig, penalize_prompt: bool) -> SamplingConfig:
        """``sampling`` with its unset fields taken from these defaults (``penalize_prompt``: the template's)."""
        return dataclasses.replace(
            sampling,
            repetition_penalty=self.repetition_penalty if sampling.repetition_penalty is None
            else sampling.repetition_penalty,
            penalize_prompt=penalize_prompt if sampling.penalize_prompt is None else sampling.penalize_prompt,
        ).validate()


def penalize_repeats(logits: np.ndarray, seen: np.ndarray, penalty: float) -> np.ndarray:
    """Apply the repetition penalty to tokens already in the context (``seen`` is a bool mask over the vocab)."""
    if penalty == 1.0 or not seen.any():
        return logits
    out = logits.copy()
    picked = out[seen]
    out[seen] = np.where(picked > 0, picked / penalty, picked * penalty)
    return out


def filter_top_k_top_p(logits: np.ndarray, top_k: int, top_p: float) -> np.ndarray:
    """Set logits outside the top-k / nucleus to -inf (always keeps at least the best token)."""
    out = logits.astype(np.float64, copy=True)
    if 0 < top_k < out.size:
        kth = np.partition(out, -top_k)[-top_k]
        out[out < kth] = -np.inf
    if top_p < 1.0:
        order = np.argsort(-out, kind="stable")
        probs = np.exp(out[order] - out[order[0]])
        probs /= probs.sum()
        cumulative = np.cumsum(probs)
        drop = cumulative - probs >= top_p  # keep tokens until the mass before them reaches top_p
        out[order[drop]] = -np.inf
    return out


def token_logprob(logits: np.ndarray, token: int) -> float:
    """log p(token) under softmax(``logits``) at temperature 1: the model's own distribution over the tokens the
    grammar allows (masked ones are -inf), whatever temperature or top-k/top-p picked the token. Scores use this so
    that a request's confidence does not change with its sampling settings."""
    top = logits.max()
    if not np.isfinite(top) or not np.isfinite(logits[token]):
        return float("-inf")
    # float32 exp (SIMD in numpy; exp(-inf) = 0 drops masked tokens), float64 sum: ~0.05 ms over 152k logits
    return float(logits[token] - top) - float(np.log(np.exp(logits - top).sum(dtype=np.float64)))


class TokenSampler:
    """Picks tokens for one sequence; owns its RNG so batched requests stay reproducible one by one.

    Only ids below ``vocab_size`` are ever picked: logits past it (embedding rows a tokenizer has no token for)
    are ignored, as a reference that truncates its embeddings to ``len(tokenizer)`` never produces them."""

    def __init__(self, config: SamplingConfig, vocab_size: int, seed_offset: int = 0, constraint=None):
        self.config = config.validate()
        self.rng = np.random.default_rng(config.seed + seed_offset)
        self.seen = np.zeros(vocab_size, dtype=bool)
        #: a :class:`rsvlm_edge.constrain.Constraint`: masks each pick to the answer grammar; None = free text
        self.constraint = constraint
        #: log-probability of the last picked or accepted token (see :func:`token_logprob`): the answer scores' input
        self.last_logprob = 0.0

    def observe(self, token_ids) -> None:
        """Ids now in the context: the repetition penalty applies to them."""
        self.seen[np.asarray(token_ids, dtype=np.int64)] = True

    def observe_prompt(self, token_ids) -> None:
        """The prompt's text ids: observed unless ``penalize_prompt`` is False (the penalty then covers the
        generated ids only, as HF ``generate`` over ``inputs_embeds`` does)."""
        if self.config.penalize_prompt is not False:
            self.observe(token_ids)

    def accept(self, token: int) -> None:
        """A token the answer took without sampling (a head wrote it: the box pointer, the dense heads): in the
        context and through the grammar. Its :attr:`last_logprob` is NaN: the answer's score is the head's
        probability (:mod:`rsvlm_edge.scores`), so no mask or log-softmax is computed for it."""
        self.last_logprob = float("nan")
        self.observe([token])
        if self.constraint is not None:
            self.constraint.advance(token)

    def _scored_logits(self, logits: np.ndarray) -> np.ndarray:
        """The logits every choice starts from: repetition penalty applied, then the grammar's mask."""
        penalty = 1.0 if self.config.repetition_penalty is None else self.config.repetition_penalty
        logits = penalize_repeats(np.asarray(logits, dtype=np.float32)[: self.seen.size], self.seen, penalty)
        if self.constraint is not None:  # before any choice: greedy, top-k and top-p see only grammatical tokens
            logits = np.where(self.constraint.allowed(), logits, -np.inf)
        return logits

    def __call__(self, logits: np.ndarray) -> int:
        cfg = self.config
        logits = self._scored_logits(logits)
        if cfg.greedy:
            token = int(np.argmax(logits))
        else:
            scaled = filter_top_k_top_p(logits / cfg.temperature, cfg.top_k, cfg.top_p)
            probs = np.exp(scaled - scaled.max())
            probs /= probs.sum()
            token = int(self.rng.choice(probs.size, p=probs))
        self.last_logprob = token_logprob(logits, token)
        self.seen[token] = True
        if self.constraint is not None:
            self.constraint.advance(token)
        return token
