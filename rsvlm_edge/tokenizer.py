"""The runtime tokenizer: a thin wrapper on a HF ``tokenizers`` tokenizer (any ``tokenizer.json``). Torch-free.

What is generic and what is ours
--------------------------------
:class:`Tokenizer` loads any ``tokenizer.json`` (ours, or a converted model's, e.g. Qwen2's byte-level BPE whose
merges are ``"a b"`` strings or ``["a", "b"]`` pairs: ``tokenizers`` reads both). The only model-specific knowledge
is a :class:`ControlTokens`: the control tokens the model's prompt template (:mod:`rsvlm_edge.templates`) gives a
role - what pads a batch, what ends a turn, what marks an image slot - checked at load. :data:`RSVLM_CONTROL`, the
default, is the template of the models trained here.

Layout of a tokenizer trained by :meth:`Tokenizer.train`
-------------------------------------------------------
* ids ``0 .. len(SPECIAL_TOKENS)-1`` are :data:`rsvlm_edge.tasks.SPECIAL_TOKENS` in that order (so ``<pad>`` is 0),
  registered as *special* added tokens: they are atomic and recognised wherever they occur in the text.
* then the byte-level BPE vocabulary: 256 byte symbols plus learned merges, so any UTF-8 text round-trips exactly.
* last, the numbers ``"10" .. "100"`` as regular added tokens (``"0" .. "9"`` are byte symbols already). Every ASCII
  digit in a text is covered by these tokens, matched leftmost-longest, so each of ``"0" .. "100"`` (the box
  coordinate range) is exactly one token and longer digit runs split into chunks (``"2024"`` -> ``20 24``).

Pre-tokenisation is GPT-2-like (letters keep a leading space, whitespace runs stay together) except that
punctuation followed by a space at the end of a piece keeps that space: the pieces between the number tokens of
``[12, 34, 56, 78]`` are ``[``, ``, `` ... so the whole box is 9 tokens once BPE has learned ``", "``.
"""

from __future__ import annotations

import codecs
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as _HFTokenizer

from rsvlm_edge.fileio import atomic_write_text
from rsvlm_edge.tasks import END, IMAGE, PAD, SPECIAL_TOKENS

__all__ = ["NUMBER_TOKENS", "RSVLM_CONTROL", "TOKENIZER_FILE", "ControlTokens", "StreamDecoder", "Tokenizer",
           "TokenizerError"]

TOKENIZER_FILE = "tokenizer.json"

#: Strings that always encode as a single token (box coordinates are integers in 0..100).
NUMBER_TOKENS: tuple[str, ...] = tuple(str(i) for i in range(101))

#: Our pre-tokeniser pattern (see the module docstring). ``\z`` is the end of the piece between added tokens.
_PRETOKENIZE_PATTERN = r"'(?:[sdmt]|ll|ve|re)| ?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+(?: \z)?|\s+(?!\S)|\s+"

#: The smallest useful vocabulary: special tokens + 256 byte symbols + the 91 multi-digit number tokens.
MIN_VOCAB_SIZE = len(SPECIAL_TOKENS) + 256 + (len(NUMBER_TOKENS) - 10)


class TokenizerError(ValueError):
    """A tokenizer file is missing, corrupt or incomplete, or a token is unknown."""


@dataclass(frozen=True)
class ControlTokens:
    """The control tokens a prompt template relies on, by role. Each must be a *special* added token of the
    tokenizer (atomic, recognised only where the template puts it, skipped when decoding answers)."""

    pad: str  # fills batch padding (masked out) and image slots before the visual tokens overwrite them
    end: str  # ends every turn; generation stops on it
    image: str | None  # the token that marks an image slot, or None when the template's image slots have no token
    required: tuple[str, ...]  # every control token the template emits (pad, end and image included)


#: The template of the models trained here: :data:`rsvlm_edge.tasks.SPECIAL_TOKENS`.
RSVLM_CONTROL = ControlTokens(pad=PAD, end=END, image=IMAGE, required=SPECIAL_TOKENS)


def _byte_symbols() -> dict[str, int]:
    """The byte-level BPE alphabet: one printable character per byte value, mapped back to the byte.

    Printable Latin-1 bytes stand for themselves; the remaining 68 byte values (controls, space, ...) take the
    characters from U+0100 on, in byte order.
    """
    direct = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {chr(b): b for b in direct}
    extra = 0
    for b in range(256):
        if b not in direct:
            table[chr(256 + extra)] = b
            extra += 1
    return table


_BYTE_OF_SYMBOL = _byte_symbols()


def _symbols_to_bytes(token: str) -> bytes:
    """Raw bytes of one token, as the byte-level decoder sees them (a token with foreign characters: its UTF-8)."""
    out = bytearray()
    for ch in token:
        b = _BYTE_OF_SYMBOL.get(ch)
        if b is None:
            return token.encode("utf-8")
        out.append(b)
    return bytes(out)


def _training_pieces(texts: Iterable[str]) -> Iterator[str]:
    """Cut training texts where encoding will cut them: at special tokens and ASCII digits (both are added tokens).

    ``tokenizers`` does not split added tokens out of the training corpus, so without this BPE would waste merges
    on pieces of ``<|user|>`` and on digit runs that can never reach the model.
    """
    specials = "|".join(re.escape(t) for t in sorted(SPECIAL_TOKENS, key=len, reverse=True))
    cut = re.compile(f"(?:{specials}|[0-9]+)")
    for text in texts:
        if not isinstance(text, str):
            raise TypeError(f"tokenizer training texts must be str, got {type(text).__name__}")
        for piece in cut.split(text):
            if piece:
                yield piece


class Tokenizer:
    """Encode / decode text; ``Tokenizer.train`` builds one, ``load`` / ``save`` use ``tokenizer.json``.

    ``control`` names the prompt template's control tokens; loading refuses a file that lacks one of them."""

    def __init__(self, backend: _HFTokenizer, control: ControlTokens = RSVLM_CONTROL):
        self._tk = backend
        self.control = control
        self._check_special_tokens()
        self._special_ids = frozenset(i for i, tok in backend.get_added_tokens_decoder().items() if tok.special)
        self._pad_id = self.token_id(control.pad)
        self._end_id = self.token_id(control.end)
        self._image_id = None if control.image is None else self.token_id(control.image)
        self._size = backend.get_vocab_size(with_added_tokens=True)
        self._bytes_cache: dict[int, bytes] = {}
        # A second copy that reads special-token strings as plain text: user text goes through it (prompt injection).
        # A copy, not a flag toggled per call, so one Tokenizer is safe to share between threads.
        self._text_tk = _HFTokenizer.from_str(backend.to_str())
        self._text_tk.encode_special_tokens = True

    # ------------------------------------------------------------------ construction

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 4096, min_frequency: int = 2) -> Tokenizer:
        """Train a byte-level BPE on ``texts``; the result has at most ``vocab_size`` tokens (exactly that many when
        the corpus holds enough distinct merges), laid out as the module docstring describes."""
        if vocab_size < MIN_VOCAB_SIZE:
            raise TokenizerError(f"vocab_size must be at least {MIN_VOCAB_SIZE} (special tokens, 256 bytes, "
                                 f"numbers 10..100), got {vocab_size}")
        tk = _HFTokenizer(models.BPE())
        tk.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_PRETOKENIZE_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        tk.decoder = decoders.ByteLevel()
        multi_digit = [t for t in NUMBER_TOKENS if len(t) > 1]
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size - len(multi_digit),
            min_frequency=min_frequency,
            special_tokens=[AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tk.train_from_iterator(_training_pieces(texts), trainer=trainer)
        # Single digits are byte symbols already; adding them too makes the digit matcher cover every ASCII digit.
        tk.add_tokens([AddedToken(t, special=False, normalized=False, single_word=False) for t in NUMBER_TOKENS])
        for i, tok in enumerate(SPECIAL_TOKENS):
            if tk.token_to_id(tok) != i:  # a bug in this function, not a user error
                raise AssertionError(f"special token {tok} got id {tk.token_to_id(tok)}, expected {i}")
        return cls(tk)

    @classmethod
    def from_str(cls, text: str, control: ControlTokens = RSVLM_CONTROL) -> Tokenizer:
        """From the JSON text of a ``tokenizer.json``."""
        try:
            backend = _HFTokenizer.from_str(text)
        except Exception as exc:  # tokenizers raises a plain Exception on bad JSON
            raise TokenizerError(f"not a valid tokenizer.json: {exc}") from exc
        return cls(backend, control)

    @classmethod
    def load(cls, path: str | Path, control: ControlTokens = RSVLM_CONTROL) -> Tokenizer:
        """Load ``tokenizer.json`` (or ``<dir>/tokenizer.json`` when ``path`` is a directory)."""
        path = Path(path)
        if path.is_dir():
            path = path / TOKENIZER_FILE
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise TokenizerError(f"tokenizer file not found: {path}") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise TokenizerError(f"cannot read tokenizer file {path}: {exc}") from exc
        try:
            return cls.from_str(text, control)
        except TokenizerError as exc:
            raise TokenizerError(f"{path}: {exc}") from None

    def save(self, path: str | Path) -> Path:
        """Write ``tokenizer.json`` atomically; returns the path written."""
        path = Path(path)
        atomic_write_text(path, self.to_str())
        return path

    def to_str(self) -> str:
        return self._tk.to_str(pretty=True)

    def _check_special_tokens(self) -> None:
        added = {tok.content: tok for tok in self._tk.get_added_tokens_decoder().values()}
        required = self.control.required
        missing = [t for t in required if self._tk.token_to_id(t) is None]
        if missing:
            raise TokenizerError(f"tokenizer lacks required special token(s): {' '.join(missing)}")
        not_special = [t for t in required if t not in added or not added[t].special]
        if not_special:
            raise TokenizerError(f"token(s) not registered as special (atomic) tokens: {' '.join(not_special)}")

    # ------------------------------------------------------------------ properties

    @property
    def backend(self) -> _HFTokenizer:
        """The underlying ``tokenizers.Tokenizer``."""
        return self._tk

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (valid ids are ``0 .. vocab_size - 1``)."""
        return self._size

    def __len__(self) -> int:
        return self._size

    @property
    def pad_id(self) -> int:
        return self._pad_id

    @property
    def end_id(self) -> int:
        """The template's end-of-turn token (``<|end|>``, ``<|im_end|>``): generation stops on it."""
        return self._end_id

    @property
    def image_id(self) -> int:
        """``<image>``: the token of an image slot, for templates that have one (the models trained here)."""
        if self._image_id is None:
            raise TokenizerError("this prompt template marks image slots without a token (no image_id)")
        return self._image_id

    @property
    def special_ids(self) -> frozenset[int]:
        """Ids of every special token (the template's control tokens, plus any other special token in the file)."""
        return self._special_ids

    def token_id(self, token: str) -> int:
        tid = self._tk.token_to_id(token)
        if tid is None:
            raise TokenizerError(f"unknown token {token!r}")
        return tid

    def id_to_token(self, token_id: int) -> str | None:
        """The token's vocabulary string (byte-level symbols), or None for an id outside the vocabulary."""
        token_id = int(token_id)
        return self._tk.id_to_token(token_id) if 0 <= token_id < self._size else None

    # ------------------------------------------------------------------ encode / decode

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; special tokens in it are recognised; no BOS/EOS is added."""
        return self._tk.encode(text, add_special_tokens=False).ids

    def encode_text(self, text: str) -> list[int]:
        """Token ids of untrusted ``text``: ``<|end|>``, ``<image>`` or ``[SEG]`` in it are plain characters, never
        control tokens (the number tokens still apply). Same ids as :meth:`encode` for text without special tokens."""
        return self._text_tk.encode(text, add_special_tokens=False).ids

    def encode_segments(self, segments: Iterable[tuple[str, bool]]) -> list[int]:
        """Ids of a rendered prompt (:func:`rsvlm_edge.tasks.prompt_segments`): control pieces become their special
        token; the text between two control pieces is joined and encoded by :meth:`encode_text`. Equals
        :meth:`encode` of the joined string when no text piece holds a special token, because the tokenizer cuts a
        text at special tokens before anything else."""
        ids: list[int] = []
        text: list[str] = []
        for piece, control in segments:
            if not control:
                text.append(piece)
                continue
            if text:
                ids.extend(self.encode_text("".join(text)))
                text.clear()
            ids.append(self.token_id(piece))
        if text:
            ids.extend(self.encode_text("".join(text)))
        return ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tk.encode_batch(list(texts), add_special_tokens=False)]

    def _valid_ids(self, ids: Iterable[int]) -> list[int]:
        return [i for i in map(int, ids) if 0 <= i < self._size]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``. Ids outside the vocabulary are skipped; invalid UTF-8 becomes U+FFFD.

        ``decode(encode(text), skip_special_tokens=False) == text`` for every string, and also with the default
        ``skip_special_tokens=True`` when ``text`` holds no special token.
        """
        return self._tk.decode(self._valid_ids(ids), skip_special_tokens=skip_special_tokens)

    def decode_batch(self, batch: Iterable[Iterable[int]], skip_special_tokens: bool = True) -> list[str]:
        return [self.decode(ids, skip_special_tokens) for ids in batch]

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes token ``token_id`` contributes to decoded text (b"" for an id outside the vocabulary)."""
        token_id = int(token_id)
        cached = self._bytes_cache.get(token_id)
        if cached is None:
            token = self.id_to_token(token_id)
            if token is None:
                return b""
            if isinstance(self._tk.decoder, decoders.ByteLevel):
                cached = _symbols_to_bytes(token)
            else:  # a non-byte-level tokenizer (not produced by train): fall back to its own decoder
                cached = self._tk.decode([token_id], skip_special_tokens=False).encode("utf-8")
            self._bytes_cache[token_id] = cached
        return cached

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self._size})"


class StreamDecoder:
    """Decode generated tokens one at a time without ever emitting half a character.

    A byte-level token may end in the middle of a multi-byte UTF-8 character; :meth:`push` holds such bytes back
    until the character is complete. Joining every :meth:`push` result and :meth:`finish` gives exactly
    ``tokenizer.decode(all_ids, skip_special_tokens)`` (a character left incomplete at the end becomes U+FFFD).
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._parts: list[str] = []

    def push(self, token_id: int) -> str:
        """Feed one id; returns the text it completes ('' while a character is still incomplete)."""
        token_id = int(token_id)
        if self.skip_special_tokens and token_id in self.tokenizer.special_ids:
            return ""
        text = self._utf8.decode(self.tokenizer.token_bytes(token_id))
        if text:
            self._parts.append(text)
        return text

    def finish(self) -> str:
        """End of stream: returns what was held back (U+FFFD for a truncated character) and resets the decoder."""
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        if text:
            self._parts.append(text)
        return text

    flush = finish

    @property
    def text(self) -> str:
        """Everything emitted so far."""
        return "".join(self._parts)



def token_char_ends(tokenizer: Tokenizer, ids: list[int]) -> list[int]:
    """Where each token of ``ids`` ends in ``tokenizer.decode(ids)``, in characters: token k covers
    ``[ends[k-1], ends[k])``. A token that ends inside a multi-byte character covers nothing; the token that completes
    the character covers all of it (as :class:`StreamDecoder` emits it)."""
    stream = StreamDecoder(tokenizer)
    ends, length = [], 0
    for token in ids:
        length += len(stream.push(token))
        ends.append(length)
    tail = len(stream.finish())
    if ends and tail:
        ends[-1] += tail
    return ends
