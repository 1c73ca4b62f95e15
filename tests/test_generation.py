"""The torch-free generation loop over the torch reference backend: batching, routing, seeds, chat KV reuse."""

from __future__ import annotations

import numpy as np
import pytest
from chatml_model import make_chatml_model_dir

from rsvlm_edge.backends.base import BackendError
from rsvlm_edge.generation import ChatSession, Generator, Request
from rsvlm_edge.pipeline import load_backend, load_tokenizer
from rsvlm_edge.sampling import SamplingConfig
from rsvlm_edge.tasks import Turn


@pytest.fixture(scope="module")
def generator(tiny_model_dir):
    return Generator(load_backend(tiny_model_dir, "torch"), load_tokenizer(tiny_model_dir))


def pixels(seed, bands=3, size=128):
    return np.random.default_rng(seed).normal(size=(bands, size, size)).astype(np.float32)


def test_batch_equals_single_requests(generator):
    reqs = [Request([pixels(1)], "rgb", "[CAP] Describe the image."),
            Request([pixels(2)], "rgb", "[VQA] How many ships are there in the harbour today?"),
            Request([pixels(3, 2)], "sar", "[CAP] Describe.")]
    sampling = SamplingConfig(max_new_tokens=6)
    batched = generator.generate(reqs, sampling)
    for req, out in zip(reqs, batched):
        alone = generator.generate([req], sampling)[0]
        assert alone.token_ids == out.token_ids


def test_routing_sources_and_expert_groups(generator):
    reqs = [Request([pixels(1)], "rgb", "[SEG] Segment the water."),
            Request([pixels(1)], "rgb", "[VG] Locate the ship."),
            Request([pixels(1)], "rgb", "Describe the image."),
            Request([pixels(1)], "rgb", "Describe the image.", expert=2)]
    outs = generator.generate(reqs, SamplingConfig(max_new_tokens=2))
    assert [o.routing.source for o in outs] == ["tag", "tag", "router", "forced"]
    assert [o.routing.expert for o in outs[:2]] + [outs[3].routing.expert] == [2, 1, 2]
    assert outs[2].routing.probs is not None and abs(sum(outs[2].routing.probs) - 1) < 1e-5


def test_sampling_is_reproducible_by_seed(generator):
    req = [Request([pixels(4)], "rgb", "[CAP] Describe the image.")]
    a = generator.generate(req, SamplingConfig(max_new_tokens=8, temperature=1.0, seed=3))[0].token_ids
    b = generator.generate(req, SamplingConfig(max_new_tokens=8, temperature=1.0, seed=3))[0].token_ids
    c = generator.generate(req, SamplingConfig(max_new_tokens=8, temperature=1.0, seed=4))[0].token_ids
    assert a == b and a != c


def test_streaming_matches_final_text(generator):
    pieces = []
    out = generator.generate([Request([pixels(5)], "rgb", "[CAP] Describe.")], SamplingConfig(max_new_tokens=10),
                             on_token=lambda i, p: pieces.append(p))[0]
    assert "".join(pieces) == out.text


def test_context_overflow_is_refused(generator):
    with pytest.raises(ValueError, match="exceeds the model's context"):
        generator.generate([Request([pixels(1)], "rgb", "[CAP] x")], SamplingConfig(max_new_tokens=5000))


def test_cache_refuses_another_expert(generator):
    cache = generator.backend.new_cache(1, 8, expert=0)
    with pytest.raises(BackendError, match="re-prefill"):
        cache.check(1, 1)


def test_chat_reuses_cache_until_the_expert_changes(generator):
    session = ChatSession(generator, [pixels(6)], "rgb")
    s = SamplingConfig(max_new_tokens=5)
    session.ask("[CAP] Describe the image.", s)
    length_after_first = session.cache.length
    session.ask("[VQA] Is there a ship?", s)  # same expert (image): reuse
    assert session.counters["reused_tokens"] == length_after_first
    assert session.counters["reprefills"] == 0
    second = session.ask("[SEG] Segment the water.", s)  # pixel expert: re-prefill the whole conversation
    assert session.counters["reprefills"] == 1 and session.cache.expert == 2
    assert second.routing.expert == 2
    # A reused-cache turn gives the same tokens as answering the whole conversation from scratch.
    fresh = ChatSession(generator, [pixels(6)], "rgb")
    fresh.turns = list(session.turns[:1])
    reused = ChatSession(generator, [pixels(6)], "rgb")
    reused.ask("[CAP] Describe the image.", s)
    t1 = reused.ask("[VQA] Is there a ship?", s)
    fresh.turns = [reused.turns[0]]
    t2 = fresh.ask("[VQA] Is there a ship?", s)
    assert t1.token_ids == t2.token_ids


def test_ignore_stop_decodes_exactly_max_new_tokens(generator):
    """Benchmarks need a fixed decode length: with ignore_stop the end token is fed back like any other."""
    req = Request([pixels(21)], "rgb", "[CAP] Describe the image.")
    stop_all = SamplingConfig(max_new_tokens=5, stop_ids=list(range(generator.config.vocab_size)))
    assert generator.generate([req], stop_all)[0].token_ids == []  # every token stops it
    forced = generator.generate([req], SamplingConfig(max_new_tokens=5, ignore_stop=True,
                                                      stop_ids=list(range(generator.config.vocab_size))))[0]
    assert len(forced.token_ids) == 5 and forced.finish_reason == "length"
    assert forced.timings["decode_steps"] == 4


# ------------------------------------------------------------------ a converted-style model: qwen_1_5, no router


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    """Tiny shapes, qwen_1_5 template, no router, a 32k context like RSUniVLM's; generation_config.json with the
    eos list and repetition penalty 1.1."""
    return make_chatml_model_dir(tmp_path_factory.mktemp("tiny-qwen"))


@pytest.fixture(scope="module")
def qwen_gen(qwen_dir):
    from rsvlm_edge.pipeline import Pipeline

    with Pipeline(qwen_dir, backend="torch") as pipe:
        yield pipe.generator


def scripted_logits(monkeypatch, backend, script):
    """Make the backend's decoder return the logits rows of ``script`` in turn (the last one repeats); the real
    forward still runs, so the KV cache advances as usual. Returns the list of embeds each call received."""
    calls: list[np.ndarray] = []
    forward = backend.forward

    def fake(cache, embeds, positions, mask):
        logits = forward(cache, embeds, positions, mask)
        calls.append(embeds)
        return np.broadcast_to(script[min(len(calls) - 1, len(script) - 1)], logits.shape).copy()

    monkeypatch.setattr(backend, "forward", fake)
    return calls


def one_hot(vocab, *pairs):
    row = np.full(vocab, -1.0, dtype=np.float32)
    for token, value in pairs:
        row[token] = value
    return row


def test_qwen_model_splices_one_and_two_images_at_their_slots(qwen_gen, monkeypatch):
    from rsvlm_edge.templates import QwenTemplate

    calls = scripted_logits(monkeypatch, qwen_gen.backend, [one_hot(qwen_gen.config.vocab_size, (qwen_gen.tokenizer.end_id, 1.0))])
    nv = qwen_gen.config.num_visual_tokens
    for images in (1, 2):
        req = Request([pixels(30 + k) for k in range(images)], "rgb", "[CCD] Describe the changes.")
        prompt = qwen_gen.prompt(req)
        template = QwenTemplate()
        assert prompt.ids == template.encode(qwen_gen.tokenizer, template.segments([Turn(req.prompt)], images), nv).ids
        assert int(prompt.image_slots.sum()) == images * nv
        out = qwen_gen.generate([req], SamplingConfig(max_new_tokens=4))[0]
        assert (out.routing.source, out.routing.expert) == ("rule", 0)
        assert out.prompt_tokens == len(prompt) and out.finish_reason == "stop" and out.token_ids == []
        visual = qwen_gen.backend.encode_images(np.stack(req.pixels), "rgb").reshape(images * nv, -1)
        np.testing.assert_array_equal(calls[-1][0, prompt.image_slots], visual)  # the prefill got the images
        text = calls[-1][0, ~prompt.image_slots]
        np.testing.assert_array_equal(text, qwen_gen.backend.embed(np.asarray([prompt.ids]))[0, ~prompt.image_slots])


def test_qwen_model_routes_by_the_tag_rule_without_a_router(qwen_gen, monkeypatch):
    def no_router(*_args):
        raise AssertionError("a model without a router must not call backend.route")

    monkeypatch.setattr(qwen_gen.backend, "route", no_router)
    routings = qwen_gen.route(["[SEG] water.", "Where is the [VG] windmill?", "[REF] this [10, 20, 30, 40]",
                               "[VG] and [SEG]", "[CAP] Describe.", "untagged"])
    assert [(r.expert, r.source) for r in routings] == [(2, "rule"), (1, "rule"), (1, "rule"), (2, "rule"),
                                                       (0, "rule"), (0, "rule")]
    out = qwen_gen.generate([Request([pixels(1)], "rgb", "Segment the [SEG] water")], SamplingConfig(max_new_tokens=1))
    assert out[0].routing.expert == 2


def test_qwen_model_stops_on_im_end_and_the_generation_config_eos(qwen_gen, monkeypatch):
    tok, vocab = qwen_gen.tokenizer, qwen_gen.config.vocab_size
    word = tok.encode_text(" harbour")[0]
    req = [Request([pixels(2)], "rgb", "[CAP] Describe.")]
    for stop in ("<|im_end|>", "<|endoftext|>"):
        scripted_logits(monkeypatch, qwen_gen.backend, [one_hot(vocab, (word, 5.0)),
                                                        one_hot(vocab, (tok.token_id(stop), 5.0))])
        out = qwen_gen.generate(req, SamplingConfig(max_new_tokens=8))[0]
        assert (out.token_ids, out.finish_reason, out.text) == ([word], "stop", tok.decode([word]))
    # <|endoftext|> stops only because generation_config.json lists it; the template alone ends on <|im_end|>
    bare = Generator(qwen_gen.backend, tok)
    out = bare.generate(req, SamplingConfig(max_new_tokens=4))[0]
    assert out.finish_reason == "length" and out.token_ids[1:] == [tok.token_id("<|endoftext|>")] * 3


def test_qwen_model_repetition_penalty_covers_generated_tokens_only(qwen_gen, monkeypatch):
    """HF generate over inputs_embeds: the generation_config.json penalty (1.1) applies to generated ids only."""
    tok, vocab = qwen_gen.tokenizer, qwen_gen.config.vocab_size
    req = Request([pixels(3)], "rgb", "[CAP] Describe the image.")
    prompt = qwen_gen.prompt(req)
    in_prompt = tok.encode_text(" image")[0]
    assert in_prompt in prompt.ids
    fresh = next(i for i in range(3, vocab) if i not in prompt.ids)
    scripted_logits(monkeypatch, qwen_gen.backend, [one_hot(vocab, (in_prompt, 2.0), (fresh, 1.9))])
    a, b = in_prompt, fresh
    run = qwen_gen.generate
    # 2.0 wins; once generated it is 2.0/1.1 = 1.82 < 1.9; then both are penalised and 1.82 > 1.73 again
    assert run([req], SamplingConfig(max_new_tokens=4))[0].token_ids == [a, b, a, a]
    # counting the prompt too (as the models trained here do) penalises 2.0 from the start
    assert run([req], SamplingConfig(max_new_tokens=4, penalize_prompt=True))[0].token_ids == [b, a, a, a]
    # an explicit penalty (the CLI's --repetition-penalty) overrides the model's default
    assert run([req], SamplingConfig(max_new_tokens=4, repetition_penalty=1.0))[0].token_ids == [a, a, a, a]


def test_qwen_chat_appends_chatml_turns_and_keeps_the_cache_small(qwen_gen, monkeypatch):
    from rsvlm_edge.templates import QwenTemplate

    tok = qwen_gen.tokenizer
    seen: list[np.ndarray] = []
    embed = qwen_gen.backend.embed
    monkeypatch.setattr(qwen_gen.backend, "embed", lambda ids: (seen.append(np.asarray(ids)), embed(ids))[1])
    session = ChatSession(qwen_gen, [pixels(7)], "rgb")
    s = SamplingConfig(max_new_tokens=3)
    first = session.ask("[CAP] Describe the image.", s)
    needed = first.prompt_tokens + 3
    assert session.cache.capacity == 2 * needed < qwen_gen.config.max_position_embeddings  # not the 32k context
    seen.clear()
    session.ask("[VQA] Is there a ship?", s)  # same expert: the turn is appended to the cached conversation
    assert session.counters["reprefills"] == 0
    template = QwenTemplate()
    turn = template.encode(tok, template.next_turn("[VQA] Is there a ship?"), 1).ids
    pending = first.token_ids[-1:] if first.finish_reason == "length" else []
    assert list(seen[0][0]) == pending + turn
    assert tok.decode(turn, skip_special_tokens=False) == \
        "<|im_end|>\n<|im_start|>user\n[VQA] Is there a ship?<|im_end|>\n<|im_start|>assistant\n"
    seen.clear()
    third = session.ask("[SEG] the water", s)  # the pixel expert: re-prefill, earlier answers as ChatML text
    assert session.counters["reprefills"] == 1 and third.routing.expert == 2
    history = session.turns[:2]
    expected = qwen_gen.prompt(Request([pixels(7)], "rgb", "[SEG] the water", history=history)).ids
    assert list(seen[0][0]) == expected


def test_chat_grows_its_cache_by_re_prefilling(qwen_gen):
    session = ChatSession(qwen_gen, [pixels(8)], "rgb")
    session.ask("[CAP] Describe the image.", SamplingConfig(max_new_tokens=2, ignore_stop=True))
    small = session.cache.capacity
    long_turn = SamplingConfig(max_new_tokens=small, ignore_stop=True)  # cannot fit the cache any more
    grown = session.ask("[VQA] Is there a ship?", long_turn)
    assert session.counters["cache_grows"] == 1 and session.cache.capacity > small
    assert len(grown.token_ids) == small
    fresh = ChatSession(qwen_gen, [pixels(8)], "rgb")
    fresh.turns = session.turns[:1]
    assert fresh.ask("[VQA] Is there a ship?", long_turn).token_ids == grown.token_ids


def test_ids_the_tokenizer_lacks_are_never_sampled(qwen_gen, monkeypatch):
    """The tiny model has 4096 embedding rows for a 600-token tokenizer; a converted model's reference truncates
    its rows to len(tokenizer), so rows past it must never win."""
    tok, vocab = qwen_gen.tokenizer, qwen_gen.config.vocab_size
    assert len(tok) < vocab
    word = tok.encode_text(" ship")[0]
    scripted_logits(monkeypatch, qwen_gen.backend, [one_hot(vocab, (vocab - 1, 9.0), (len(tok), 8.0), (word, 1.0))])
    out = qwen_gen.generate([Request([pixels(4)], "rgb", "[CAP] Describe.")],
                            SamplingConfig(max_new_tokens=2, repetition_penalty=1.0))[0]
    assert out.token_ids == [word, word]
