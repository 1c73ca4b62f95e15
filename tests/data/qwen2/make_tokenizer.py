"""Rebuild ``tokenizer.json.xz`` (Qwen2's BPE tokenizer) from llama.cpp's ``ggml-vocab-qwen2.gguf``. Not run by the tests.

The GGUF file holds the vocabulary (token strings and types) and the merges of Qwen2's byte-level BPE; this script
reads them and writes the HF ``tokenizers`` pipeline Qwen2 uses (Qwen2TokenizerFast): a regex split, byte-level
symbols, BPE, a byte-level decoder, ``<|endoftext|>`` ``<|im_start|>`` ``<|im_end|>`` as special added tokens, no
normalizer and no BOS. It then checks the result against llama.cpp's own test vectors (``.inp`` / ``.out`` beside
the GGUF) and writes ``tokenizer.json.xz`` next to this script. See NOTICE for the source and licences.

    python tests/data/qwen2/make_tokenizer.py path/to/ggml-vocab-qwen2.gguf
"""

from __future__ import annotations

import lzma
import struct
import sys
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

HERE = Path(__file__).resolve().parent

#: Qwen2's pre-tokenizer pattern (its tokenizer.json's Split regex).
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
                 r"|\s+(?!\S)|\s+")
NORMAL_TOKEN = 1  # llama.cpp token type; the others are control tokens and unused [PAD] rows

# GGUF value types: struct format of the fixed-size ones; 8 is a string, 9 an array.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def read_gguf_metadata(path: Path) -> dict:
    """The key/value metadata of a GGUF v2/v3 file (the tensors that follow are not read)."""
    data = path.read_bytes()
    if data[:4] != b"GGUF":
        raise SystemExit(f"{path}: not a GGUF file")
    offset = 4

    def take(fmt: str):
        nonlocal offset
        (value,) = struct.unpack_from(fmt, data, offset)
        offset += struct.calcsize(fmt)
        return value

    def string() -> str:
        nonlocal offset
        n = take("<Q")
        offset += n
        return data[offset - n:offset].decode("utf-8")

    def value(kind: int):
        if kind in _SCALARS:
            return take(_SCALARS[kind])
        if kind == 8:
            return string()
        if kind == 9:
            item_kind, n = take("<I"), take("<Q")
            return [value(item_kind) for _ in range(n)]
        raise SystemExit(f"{path}: unknown GGUF value type {kind}")

    take("<I")  # version
    take("<Q")  # tensor count
    return {string(): value(take("<I")) for _ in range(take("<Q"))}


def build(gguf: Path) -> Tokenizer:
    meta = read_gguf_metadata(gguf)
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    vocab = {t: i for i, (t, kind) in enumerate(zip(tokens, types)) if kind == NORMAL_TOKEN}
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=False, unk_token=None))
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False, trim_offsets=False),
    ])
    tk.decoder = decoders.ByteLevel()
    controls = [(i, t) for i, (t, kind) in enumerate(zip(tokens, types)) if kind != NORMAL_TOKEN and t.startswith("<|")]
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for _, t in controls])
    for i, t in controls:
        assert tk.token_to_id(t) == i, (t, i, tk.token_to_id(t))
    return tk


def check_vectors(tk: Tokenizer, gguf: Path) -> int:
    """llama.cpp's vectors: texts separated by ``__ggml_vocab_test__`` lines, one line of ids per text."""
    texts = gguf.with_suffix(".gguf.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    expected = gguf.with_suffix(".gguf.out").read_text(encoding="utf-8").split("\n")
    for text, ids in zip(texts, expected):
        got = tk.encode(text, add_special_tokens=False).ids
        if got != [int(i) for i in ids.split()]:
            raise SystemExit(f"mismatch on {text!r}: {got} != {ids}")
    return min(len(texts), len(expected))


def main(gguf: Path) -> None:
    tk = build(gguf)
    print(f"{check_vectors(tk, gguf)} llama.cpp test vectors match")
    out = HERE / "tokenizer.json.xz"
    out.write_bytes(lzma.compress(tk.to_str().encode("utf-8"), preset=9 | lzma.PRESET_EXTREME))
    print(f"wrote {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
