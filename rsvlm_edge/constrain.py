"""Grammar-constrained decoding: a token mask per step so a tagged answer always parses (llguidance, torch-free).

One Lark grammar per task tag, written from the conventions in :mod:`rsvlm_edge.formats`; llguidance's
:class:`~llguidance.LLMatcher` turns it into the set of tokens allowed next, for any tokenizer, and allows the end
token only once the answer is complete. Free-text tags ([CAP], [VQA], [REF], [CCD]) are not constrained.

What the grammars enforce, and what they leave to the parsers
--------------------------------------------------------------
* Coordinates are integers 0..100; OBB angles whole degrees in [-90, 90); labels ``a-z0-9`` words joined by one
  space, ``-`` or ``_``; ``none`` for an empty answer. A label and the space after it are one lexeme: llguidance's
  lexer is greedy, so a separate ``" "`` after a label that may itself contain spaces would never match.
* Box corner order (x1 <= x2, y1 <= y2) is *not* in the grammar: it is finite, but a grammar that remembers x1 and
  y1 across the box needs ~10^4 productions per box for a check that :func:`rsvlm_edge.formats.parse_boxes` already
  does by ordering the corners (an inverted box parses as the same box).
* Masks: exactly 24 rows, each of ``label*count`` runs whose counts sum to exactly 24 (one nonterminal per number of
  cells left: 24 nonterminals, ~300 alternatives, cheap for llguidance's Earley parser).
* [CLS]: a comma-separated label list, or one label of ``classes`` when the caller knows the model's vocabulary.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np

from rsvlm_edge.formats import LABEL_PATTERN, MASK_SIZE, NONE_TEXT
from rsvlm_edge.tokenizer import Tokenizer

#: Tags whose answer has a grammar here.
CONSTRAINED_TAGS: tuple[str, ...] = ("[VG]", "[CLS]", "[DET]", "[OBB]", "[SEG]")

#: llguidance's slicer: token sets it precomputes and adds whole when a lexer state allows all of them. These two
#: cover the labels, where a mask step otherwise walks most of a 152k vocabulary (Qwen2: ~46k tokens allowed); its
#: default slices are JSON strings', which these grammars never have. On Qwen2's vocabulary (bench.constrain_cost)
#: this halved the mean mask time of [SEG] and cut [CLS] by a third. Only speed depends on them, never the mask.
LABEL_SLICES = [r"[a-z0-9]{1,30}", r" [a-z0-9]{1,30}"]

_COMMON = r"""
NUM: /100|[1-9]?[0-9]/
ANGLE: /-(90|[1-8][0-9]|[1-9])|[1-8]?[0-9]/
LABEL: /{label}/
LABEL_SPACE: /{label} /
box: "[" NUM ", " NUM ", " NUM ", " NUM "]"
obb: "[" NUM ", " NUM ", " NUM ", " NUM ", " ANGLE "]"
""".replace("{label}", LABEL_PATTERN.pattern)  # the parsers' label grammar, so both accept the same labels


def _mask_rules() -> str:
    """``cells_n``: runs covering exactly n cells; a row is ``cells_24``, the mask 24 rows joined by newlines."""
    lines = []
    for n in range(1, MASK_SIZE + 1):
        alternatives = [f'LABEL "*{n}"'] + [f'LABEL "*{k}, " cells_{n - k}' for k in range(1, n)]
        lines.append(f"cells_{n}: " + " | ".join(alternatives))
    rows = ' "\\n" '.join(["cells_24"] * MASK_SIZE)
    return f"start: {rows}\n" + "\n".join(lines)


def grammar_lark(tag: str, classes: Sequence[str] | None = None) -> str:
    """The Lark grammar of ``tag``'s answer (see the module docstring); KeyError for a tag without one."""
    none = json.dumps(NONE_TEXT)
    if tag == "[VG]":
        body = f'start: box (" " box)* | {none}'
    elif tag == "[DET]":
        body = f'start: group ("; " group)* | {none}\ngroup: LABEL_SPACE box (" " box)*'
    elif tag == "[OBB]":
        body = f'start: group ("; " group)* | {none}\ngroup: LABEL_SPACE obb (" " obb)*'
    elif tag == "[CLS]":
        label = " | ".join(json.dumps(c) for c in classes) if classes else "LABEL"
        body = f'start: item (", " item)* | {none}\nitem: {label}'
    elif tag == "[SEG]":
        body = _mask_rules()
    else:
        raise KeyError(f"no answer grammar for {tag!r}; constrained tags: {' '.join(CONSTRAINED_TAGS)}")
    return body + "\n" + _COMMON


class Constraints:
    """The llguidance tokenizer of one model's tokenizer (built once: it indexes every token's bytes) and a
    compiled grammar per tag; :meth:`matcher` gives a fresh per-request :class:`Constraint`."""

    def __init__(self, tokenizer: Tokenizer, classes: Sequence[str] | None = None):
        """``classes``: the default [CLS] vocabulary (a request's own, given to :meth:`matcher`, wins)."""
        import llguidance  # imported here so that unconstrained generation does not load the native library

        self._llg = llguidance
        self.vocab_size = tokenizer.vocab_size
        self.end_id = tokenizer.end_id
        self.ll_tokenizer = llguidance.LLTokenizer(tokenizer.to_str(), n_vocab=tokenizer.vocab_size,
                                                   eos_token=tokenizer.end_id, slices=LABEL_SLICES)
        self.classes = [str(c) for c in classes] if classes else None
        self._grammars: dict[tuple[str, tuple[str, ...] | None], str] = {}

    def grammar(self, tag: str, classes: Sequence[str] | None = None) -> str:
        classes = tuple(classes) if classes else (tuple(self.classes) if self.classes else None)
        key = (tag, classes if tag == "[CLS]" else None)
        if key not in self._grammars:
            text = self._llg.LLMatcher.grammar_from_lark(grammar_lark(tag, key[1]))
            problem = self._llg.LLMatcher.validate_grammar(text, self.ll_tokenizer)
            if problem:
                raise ValueError(f"answer grammar of {tag}: {problem}")
            self._grammars[key] = text
        return self._grammars[key]

    def matcher(self, tag: str | None, classes: Sequence[str] | None = None) -> Constraint | None:
        """A new constraint for one answer of ``tag`` (``classes``: this request's [CLS] vocabulary); None for
        untagged prompts and free-text tags."""
        if tag not in CONSTRAINED_TAGS:
            return None
        return Constraint(self._llg.LLMatcher(self.ll_tokenizer, self.grammar(tag, classes), log_level=0),
                          self.vocab_size, self.end_id)


class Constraint:
    """One answer's matcher: :meth:`allowed` before each pick, :meth:`advance` with the token picked or forced."""

    def __init__(self, matcher, vocab_size: int, end_id: int):
        self._matcher = matcher
        self._vocab_size = vocab_size
        self._end_id = end_id
        self.mask_seconds = 0.0  # time spent computing masks, for the overhead report
        self.steps = 0

    def allowed(self) -> np.ndarray:
        """(vocab_size,) bool: the tokens that keep the answer in the grammar (only the end token once complete).

        A matcher in its error state (a token it refused was forced on it) allows only the end token, so the answer
        stops where it went wrong instead of running on unconstrained."""
        import time

        t0 = time.perf_counter()
        if self._matcher.is_error():
            allowed = np.zeros(self._vocab_size, dtype=bool)
            allowed[self._end_id] = True
        else:
            bits = np.frombuffer(self._matcher.compute_bitmask(), dtype=np.uint8)
            allowed = np.unpackbits(bits, bitorder="little")[: self._vocab_size].astype(bool)
        self.mask_seconds += time.perf_counter() - t0
        self.steps += 1
        return allowed

    def advance(self, token: int) -> bool:
        """Feed the token the answer took; False when the grammar refuses it (the matcher then stays in error)."""
        return bool(self._matcher.consume_token(int(token)))

    @property
    def error(self) -> str:
        return self._matcher.get_error()

    @property
    def complete(self) -> bool:
        return bool(self._matcher.is_accepting())


__all__ = ["CONSTRAINED_TAGS", "Constraint", "Constraints", "grammar_lark"]
