"""Answer confidences from the tokens' log-probabilities: one score per answer, per box or detection, per mask label.

A score is the geometric mean of the probabilities the model gave the tokens that wrote the thing scored
(:func:`rsvlm_edge.sampling.token_logprob`: temperature 1, over the tokens the answer grammar allows). The mean, not
the product, so a detection written in 12 tokens is not ranked below one written in 9 for its length alone; a box the
box pointer wrote scores the pointer's softmax probability instead, and an answer the dense heads wrote
(:mod:`rsvlm_edge.dense`) their probabilities, since no token of those was sampled.

Scores rank answers (a ground station triages by them; ``--min-score`` filters scene features): a higher score is
more often right. How well they match the frequency of being right is measured per model, not assumed: see
``rsvlm-edge eval --reliability`` (:mod:`rsvlm_edge.training.reliability`) and the model card.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

from rsvlm_edge.formats import ParsedAnswer, Span

if TYPE_CHECKING:
    from rsvlm_edge.generation import Generation


@dataclass(frozen=True)
class AnswerScores:
    """``answer``: the whole answer; ``items``: per kept box / detection / oriented detection, in the parsed
    structure's order; ``mask_labels``: per label of a mask answer. None where the answer has no such part."""

    answer: float | None
    items: list[float] | None = None
    mask_labels: dict[str, float] | None = None


def geometric_mean_probability(logprobs: Sequence[float]) -> float | None:
    """exp(mean log p): None for no tokens, 0 when a token was impossible under the model (-inf)."""
    if not logprobs:
        return None
    mean = sum(logprobs) / len(logprobs)
    return 0.0 if math.isinf(mean) else math.exp(mean)


def tokens_in(ends: Sequence[int], spans: Sequence[Span], shift: int = 0) -> list[int]:
    """Indices of the tokens whose characters overlap any of ``spans`` (token k covers ``[ends[k-1], ends[k])``;
    ``shift`` moves the spans into the tokens' text). ``ends`` is sorted, so each span is two binary searches: a
    long detection list scores its items without a pass over every token per item."""
    picked: set[int] = set()
    for a, b in spans:
        k = bisect.bisect_right(ends, a + shift)  # the first token ending after the span starts
        while k < len(ends) and (start := ends[k - 1] if k else 0) < b + shift:
            if ends[k] > start:  # a token that covers no character is no part of it
                picked.add(k)
            k += 1
    return sorted(picked)


def span_score(logprobs: Sequence[float], ends: Sequence[int], spans: Sequence[Span], shift: int = 0) -> float | None:
    return geometric_mean_probability([logprobs[k] for k in tokens_in(ends, spans, shift)])


def answer_scores(generation: Generation, parsed: ParsedAnswer) -> AnswerScores:
    """The scores of ``generation``'s answer as ``parsed`` (its spans index ``parsed.text``, the answer stripped
    of leading white space)."""
    if generation.pointer is not None:
        probability = generation.pointer.probability
        return AnswerScores(probability, [probability] if parsed.boxes else None)
    dense = generation.dense
    if dense is not None:  # the dense heads wrote it: their probabilities, one per item in text order
        probabilities = [p for _, p in dense.items]
        kept = parsed.detections if parsed.detections is not None else parsed.obbs
        return AnswerScores(dense.probability,
                            probabilities if kept is not None and len(probabilities) == len(kept) else None,
                            dict(dense.items) if parsed.mask is not None else None)
    logprobs, ends = generation.token_logprobs, generation.token_ends
    if not logprobs or len(logprobs) != len(generation.token_ids) or len(ends) != len(logprobs):
        return AnswerScores(None)  # a generation made without scores (an older caller building Generation itself)
    shift = len(generation.text) - len(generation.text.lstrip())
    answer = geometric_mean_probability(logprobs)
    items: list[float] | None = None
    if parsed.item_spans and any(s is not None for s in (parsed.boxes, parsed.detections, parsed.obbs)):
        items = [span_score(logprobs, ends, spans, shift) or 0.0 for spans in parsed.item_spans]
    mask_labels = None
    if parsed.mask is not None:
        mask_labels = {label: span_score(logprobs, ends, spans, shift) or 0.0
                       for label, spans in parsed.label_spans.items()}
    return AnswerScores(answer, items, mask_labels)
