"""The torch-free generation loop over the torch reference backend: batching, routing, seeds, chat KV reuse."""

from __future__ import annotations

import numpy as np
import pytest

from rsvlm_edge.backends.base import BackendError
from rsvlm_edge.generation import ChatSession, Generator, Request
from rsvlm_edge.pipeline import load_backend, load_tokenizer
from rsvlm_edge.sampling import SamplingConfig


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
