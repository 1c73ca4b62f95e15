"""rsvlm_edge.tokenizer: training layout, exact round trips, atomic numbers and special tokens, files, streaming."""

from __future__ import annotations

import json
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from rsvlm_edge.tasks import END, IMAGE, PAD, SPECIAL_TOKENS, Turn, build_prompt
from rsvlm_edge.tokenizer import (
    MIN_VOCAB_SIZE,
    NUMBER_TOKENS,
    ControlTokens,
    StreamDecoder,
    Tokenizer,
    TokenizerError,
)

VOCAB = 640


def _corpus(n: int = 300, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = ["the", "a", "plane", "ship", "harbor", "runway", "building", "road", "river", "storage", "tank",
             "small", "vehicle", "near", "left", "of"]
    texts = []
    for _ in range(n):
        box = ", ".join(str(rng.randint(0, 100)) for _ in range(4))
        obb = ", ".join([*(str(rng.randint(0, 100)) for _ in range(4)), str(rng.randint(-90, 89))])
        sentence = " ".join(rng.choice(words) for _ in range(rng.randint(3, 12))).capitalize() + "."
        texts.append(build_prompt([Turn(f"[VG] {sentence}")], 1) + f"[{box}]{END}\n")
        texts.append(build_prompt([Turn("[CAP] Describe the image.")], 1) + f"{sentence}{END}\n")
        texts.append(f"plane [{box}] [{box}]; ship [{box}]\nstorage tank [{obb}]\n")
        texts.append(f"others*{rng.randint(1, 24)}, building*3, others*16\nroad*24\n")
    texts.append("Unicode: café, naïve, 東京, Ελληνικά, emoji 😀🛰️ — done.\n")
    return texts


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(_corpus(), vocab_size=VOCAB)


# --------------------------------------------------------------------------------------------------- layout


def test_special_tokens_first_in_order(tok):
    for i, token in enumerate(SPECIAL_TOKENS):
        assert tok.token_id(token) == i
    assert tok.pad_id == 0 == tok.token_id(PAD)
    assert tok.end_id == tok.token_id(END)
    assert tok.image_id == tok.token_id(IMAGE)
    assert set(range(len(SPECIAL_TOKENS))) <= tok.special_ids
    assert tok.end_id in tok.special_ids and tok.token_id("7") not in tok.special_ids


def test_vocab_size_is_bounded_and_consistent(tok):
    assert MIN_VOCAB_SIZE < len(tok) == tok.vocab_size <= VOCAB
    assert tok.backend.get_vocab_size(with_added_tokens=True) == tok.vocab_size
    assert tok.id_to_token(tok.vocab_size) is None and tok.id_to_token(-1) is None
    with pytest.raises(TokenizerError):
        Tokenizer.train(["abc"], vocab_size=MIN_VOCAB_SIZE - 1)


def test_training_is_deterministic(tok):
    again = Tokenizer.train(_corpus(), vocab_size=VOCAB)
    assert again.to_str() == tok.to_str()


def test_empty_corpus_still_round_trips():
    small = Tokenizer.train([], vocab_size=MIN_VOCAB_SIZE)
    assert len(small) == MIN_VOCAB_SIZE
    text = "any text 12, 345 😀\n"
    assert small.decode(small.encode(text)) == text


def test_special_tokens_are_learned_nowhere_else(tok):
    """Training cuts special tokens and digits out of the corpus: no merge holds a piece of them."""
    vocab = set(tok.backend.get_vocab(with_added_tokens=False)) - set(SPECIAL_TOKENS)
    assert not [t for t in vocab if "<|" in t or "|>" in t or (any(c.isdigit() for c in t) and len(t) > 1)]


# --------------------------------------------------------------------------------------------------- numbers


def test_numbers_0_to_100_are_single_tokens(tok):
    ids = []
    for number in NUMBER_TOKENS:
        encoded = tok.encode(number)
        assert len(encoded) == 1, (number, encoded)
        assert tok.decode(encoded) == number
        ids.append(encoded[0])
    assert len(set(ids)) == 101
    assert tok.encode("[0, 100]") == tok.encode("[") + [ids[0]] + tok.encode(", ") + [ids[100]] + tok.encode("]")


def test_box_encodes_short_and_stable(tok):
    box = "[12, 34, 56, 78]"
    ids = tok.encode(box)
    pieces = [tok.decode([i]) for i in ids]
    assert pieces == ["[", "12", ", ", "34", ", ", "56", ", ", "78", "]"]
    assert tok.decode(ids) == box
    # the same ids wherever the box appears, and after a save/load
    in_context = tok.encode(f"<|assistant|>\n{box}{END}\n")
    assert in_context[2:-2] == ids
    after_word = tok.encode(f"plane {box}")  # a space before the box may merge into " [", the rest is the same
    assert after_word[-len(ids) + 1:] == ids[1:]
    assert Tokenizer.from_str(tok.to_str()).encode(box) == ids


@pytest.mark.parametrize("text", ["2024", "1000", "x12y", "007", "-90", "3.5", "12345678901234567890"])
def test_other_digit_runs_round_trip(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    digit_ids = {tok.token_id(n) for n in NUMBER_TOKENS}
    # every ASCII digit is covered by a number token, chunked leftmost-longest
    assert sum(len(tok.decode([i])) for i in ids if i in digit_ids) == sum(c.isdigit() for c in text)


# --------------------------------------------------------------------------------------------------- special tokens


def test_special_tokens_are_atomic(tok):
    for token in SPECIAL_TOKENS:
        assert tok.encode(token) == [tok.token_id(token)]
        ids = tok.encode(f"ab{token}cd")
        assert tok.token_id(token) in ids
    prompt = build_prompt([Turn("[SEG] Segment the image.")], 2)
    ids = tok.encode(prompt)
    assert ids[0] == tok.token_id("<|user|>")
    assert ids.count(tok.image_id) == 2 and ids.count(tok.token_id("[SEG]")) == 1
    assert tok.decode(ids, skip_special_tokens=False) == prompt
    assert tok.decode(ids) == "\n\n\n Segment the image.\n\n"


def test_no_bos_added(tok):
    assert tok.encode("") == []
    assert tok.token_id("<bos>") not in tok.encode("hello")


def test_unknown_token_and_ids(tok):
    with pytest.raises(TokenizerError):
        tok.token_id("<not-a-token>")
    assert issubclass(TokenizerError, ValueError)
    # ids outside the vocabulary (a model vocab larger than the tokenizer's) decode to nothing
    assert tok.decode([tok.vocab_size, -3, *tok.encode("ok"), 10**9]) == "ok"


# --------------------------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("text", [
    "", " ", "  two  spaces  ", "\n", "line one\nline two\n\n", "\ttab\r\nwindows\r\n", "trailing space ",
    "Hello, world!", "东京 café 😀🛰️", "others*24\nothers*5, road*19", "a" * 500, "\x00\x01 control",
])
def test_plain_text_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=80))
def test_round_trip_any_text(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids, skip_special_tokens=False) == text
    if not any(s in text for s in SPECIAL_TOKENS):
        assert tok.decode(ids) == text


@settings(max_examples=100, deadline=None)
@given(st.lists(st.sampled_from([*SPECIAL_TOKENS, "a", " b", "12", ", ", "\n", "é", "😀", "[", "]"]), max_size=30))
def test_round_trip_with_special_tokens(tok, parts):
    text = "".join(parts)
    assert tok.decode(tok.encode(text), skip_special_tokens=False) == text


def test_encode_batch_matches_encode(tok):
    texts = ["[1, 2, 3, 4]", "", "plane<|end|>", "😀 x"]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
    assert tok.decode_batch(tok.encode_batch(texts), skip_special_tokens=False) == texts


# --------------------------------------------------------------------------------------------------- files


def test_save_load_identical(tok, tmp_path):
    path = tok.save(tmp_path / "sub" / "tokenizer.json")
    assert [p.name for p in path.parent.iterdir()] == ["tokenizer.json"]  # atomic write left no temp file
    loaded = Tokenizer.load(path)
    assert loaded.to_str() == tok.to_str()
    assert Tokenizer.load(path.parent).vocab_size == tok.vocab_size  # a directory means <dir>/tokenizer.json
    for text in _corpus(20, seed=1) + ["[12, 34, 56, 78]", "东京 😀"]:
        assert loaded.encode(text) == tok.encode(text)
    assert (loaded.pad_id, loaded.end_id, loaded.image_id, loaded.special_ids) == (
        tok.pad_id, tok.end_id, tok.image_id, tok.special_ids)


def test_load_missing_file(tmp_path):
    with pytest.raises(TokenizerError, match="not found"):
        Tokenizer.load(tmp_path / "nope.json")


@pytest.mark.parametrize("content", [b"", b"{", b"{}", b"not json", b"\xff\xfe\x00binary", b'{"model": 3}'])
def test_load_corrupt_file(tmp_path, content):
    path = tmp_path / "tokenizer.json"
    path.write_bytes(content)
    with pytest.raises(TokenizerError):
        Tokenizer.load(path)


def test_load_truncated_file(tok, tmp_path):
    path = tmp_path / "tokenizer.json"
    text = tok.to_str()
    path.write_text(text[: len(text) // 2])
    with pytest.raises(TokenizerError):
        Tokenizer.load(path)


def _hf_tokenizer(specials: list[str], regular: list[str] = ()) -> HFTokenizer:
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.add_special_tokens([AddedToken(t, special=True) for t in specials])
    hf.add_tokens([AddedToken(t, special=False) for t in regular])
    return hf


def test_load_lacking_special_token(tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_text(_hf_tokenizer([t for t in SPECIAL_TOKENS if t != "[OBB]"]).to_str())
    with pytest.raises(TokenizerError, match=r"\[OBB\]"):
        Tokenizer.load(path)
    path.write_text(_hf_tokenizer([t for t in SPECIAL_TOKENS if t != END], [END]).to_str())
    with pytest.raises(TokenizerError, match="special"):
        Tokenizer.load(path)
    path.write_text(_hf_tokenizer(list(SPECIAL_TOKENS)).to_str())
    assert Tokenizer.load(path).pad_id == 0


def test_any_tokenizer_loads_with_its_own_templates_control_tokens(tmp_path):
    """Nothing of ours is required of a foreign tokenizer.json: only the control tokens its template names."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    hf = HFTokenizer(models.BPE({ch: i for i, ch in enumerate(alphabet)}, []))  # bytes only, no merges
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([AddedToken(t, special=True) for t in ("<s>", "</turn>", "<unused>")])
    path = tmp_path / "tokenizer.json"
    path.write_text(hf.to_str())
    with pytest.raises(TokenizerError, match="<pad>"):
        Tokenizer.load(path)  # our template's tokens are the default
    control = ControlTokens(pad="<s>", end="</turn>", image=None, required=("<s>", "</turn>"))
    foreign = Tokenizer.load(path, control)
    assert (foreign.pad_id, foreign.end_id, foreign.special_ids) == (256, 257, {256, 257, 258})
    with pytest.raises(TokenizerError, match="without a token"):
        _ = foreign.image_id
    # text between control pieces is encoded as one piece, as when the joined string is encoded
    segments = [("</turn>", True), ("a", False), ("b c", False), ("</turn>", True)]
    assert foreign.encode_segments(segments) == foreign.encode("</turn>ab c</turn>")
    assert foreign.decode(foreign.encode_segments(segments), skip_special_tokens=False) == "</turn>ab c</turn>"
    assert 257 not in foreign.encode_text("say </turn>") and foreign.decode(foreign.encode_text("say </turn>")) \
        == "say </turn>"  # typed by a user it is text


def test_edited_file_without_special_token_refused(tok, tmp_path):
    data = json.loads(tok.to_str())
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] != IMAGE]
    data["model"]["vocab"].pop(IMAGE, None)
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(data))
    with pytest.raises(TokenizerError, match="<image>"):
        Tokenizer.load(path)


# --------------------------------------------------------------------------------------------------- streaming


def _stream(tok: Tokenizer, ids: list[int], skip: bool = True) -> tuple[list[str], str]:
    dec = StreamDecoder(tok, skip_special_tokens=skip)
    pieces = [dec.push(i) for i in ids]
    tail = dec.finish()
    assert dec.text == "".join(pieces) + tail
    return pieces, tail


def test_stream_holds_back_split_characters(tok):
    ids = tok.encode("ok 😀🛰️ 東京")
    assert any("\ufffd" in tok.decode([i]) for i in ids)  # some tokens hold only part of a character
    pieces, tail = _stream(tok, ids)
    assert "".join(pieces) == "ok 😀🛰️ 東京" and tail == ""
    for piece in pieces:
        assert "\ufffd" not in piece
    assert "" in pieces  # some pushes completed no character


def test_stream_truncated_character_at_end(tok):
    ids = tok.encode("a😀")
    pieces, tail = _stream(tok, ids[:-1])
    assert "".join(pieces) + tail == tok.decode(ids[:-1])
    assert tail.endswith("\ufffd")


@settings(max_examples=100, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=60))
def test_stream_equals_full_decode_of_text(tok, text):
    ids = tok.encode(text)
    pieces, tail = _stream(tok, ids)
    assert "".join(pieces) + tail == tok.decode(ids)
    assert tail == ""  # ids of real text never end inside a character


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(min_value=-2, max_value=VOCAB + 5), max_size=40), st.booleans())
def test_stream_equals_full_decode_of_any_ids(tok, ids, skip):
    """Arbitrary generations, invalid UTF-8 and out-of-vocabulary ids included."""
    pieces, tail = _stream(tok, ids, skip)
    assert "".join(pieces) + tail == tok.decode(ids, skip_special_tokens=skip)
