"""Answer scores: token log-probabilities recorded by the sampler, mapped to answers, boxes, detections and mask
labels; and the reliability curve / ECE that tells whether they mean anything.

Hand-made generations check the arithmetic exactly; the shipped demo model checks the plumbing end to end (scores
in range, one per item, the pointer's probability for pointed boxes). Nothing compares a model score with a fixed
float, so nothing depends on a CPU's floats."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from rsvlm_edge import Pipeline
from rsvlm_edge.cli import main
from rsvlm_edge.formats import format_detections, format_mask, parse_answer
from rsvlm_edge.generation import Generation, Pointing, Routing
from rsvlm_edge.sampling import SamplingConfig, TokenSampler, token_logprob
from rsvlm_edge.scores import answer_scores, geometric_mean_probability, tokens_in
from rsvlm_edge.tokenizer import Tokenizer, token_char_ends
from rsvlm_edge.training.reliability import auroc, reliability

DEMO = Path(__file__).resolve().parents[1] / "models" / "tiny-demo"


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.load(DEMO / "tokenizer.json")


@pytest.fixture(scope="module")
def pipe():
    with Pipeline(DEMO, threads=1) as p:
        yield p


def _generation(tokenizer: Tokenizer, text: str, logprob_of) -> Generation:
    """A generation of ``text`` whose token k has log-probability ``logprob_of(k, piece)``."""
    ids = tokenizer.encode(text)
    ends = token_char_ends(tokenizer, ids)
    starts = [0] + ends[:-1]
    decoded = tokenizer.decode(ids)
    logprobs = [logprob_of(k, decoded[a:b]) for k, (a, b) in enumerate(zip(starts, ends))]
    return Generation(decoded, ids, Routing(0, "tag"), 10, "stop", token_logprobs=logprobs, token_ends=ends)


def test_token_char_ends_cover_the_decoded_text(tokenizer):
    for text in ["plane [1, 2, 3, 4]; ship [5, 6, 7, 8]", "others*24\nsea ice*3, others*21", "héllo wörld ✓"]:
        ids = tokenizer.encode(text)
        ends = token_char_ends(tokenizer, ids)
        assert len(ends) == len(ids) and ends == sorted(ends)
        assert ends[-1] == len(tokenizer.decode(ids))


def test_token_logprob_is_the_log_softmax_over_allowed_tokens():
    logits = np.array([2.0, 1.0, -np.inf, 0.0], dtype=np.float32)
    expected = 2.0 - math.log(math.exp(2) + math.exp(1) + 1)
    assert token_logprob(logits, 0) == pytest.approx(expected, rel=1e-6)
    assert token_logprob(logits, 2) == float("-inf")


def test_sampler_scores_do_not_depend_on_temperature():
    logits = np.log(np.array([0.5, 0.3, 0.2], dtype=np.float32))
    greedy = TokenSampler(SamplingConfig(), 3)
    hot = TokenSampler(SamplingConfig(temperature=5.0, seed=3), 3)
    token = hot(logits)
    greedy(logits)
    assert greedy.last_logprob == pytest.approx(math.log(0.5), rel=1e-5)
    assert hot.last_logprob == pytest.approx(math.log([0.5, 0.3, 0.2][token]), rel=1e-5)


def test_detection_scores_are_the_geometric_mean_over_their_own_label_and_box(tokenizer):
    text = format_detections([("plane", [1, 2, 3, 4]), ("plane", [10, 20, 30, 40]), ("ship", [5, 6, 7, 8])])
    # tokens inside "ship [5, 6, 7, 8]" get log p = -2, everything else -0.1
    ship_at = text.index("ship")
    gen = _generation(tokenizer, text, lambda k, piece: 0.0)
    ends = gen.token_ends
    ship_tokens = set(tokens_in(ends, [(ship_at, len(text))]))
    gen.token_logprobs = [-2.0 if k in ship_tokens else -0.1 for k in range(len(ends))]
    scores = answer_scores(gen, parse_answer("[DET]", gen.text))
    assert scores.items is not None and len(scores.items) == 3
    assert scores.items[0] == pytest.approx(math.exp(-0.1))
    assert scores.items[1] == pytest.approx(math.exp(-0.1))
    assert scores.items[2] == pytest.approx(math.exp(-2.0))
    assert scores.answer == pytest.approx(geometric_mean_probability(gen.token_logprobs))


def test_mask_label_scores_come_from_that_labels_runs(tokenizer):
    grid = [["others"] * 24 for _ in range(24)]
    grid[2][3:7] = ["ship"] * 4
    text = format_mask(grid)
    gen = _generation(tokenizer, text, lambda k, piece: 0.0)
    ends = gen.token_ends
    line = text.splitlines()[2]
    line_at = text.index(line)
    run_at = line_at + line.index("ship")
    ship_tokens = set(tokens_in(ends, [(run_at, run_at + len("ship*4"))]))
    gen.token_logprobs = [-1.5 if k in ship_tokens else 0.0 for k in range(len(ends))]
    scores = answer_scores(gen, parse_answer("[SEG]", gen.text))
    assert scores.mask_labels is not None
    assert scores.mask_labels["ship"] == pytest.approx(math.exp(-1.5))
    assert scores.mask_labels["others"] > scores.mask_labels["ship"]


def test_a_pointed_box_scores_the_pointer_probability(tokenizer):
    gen = _generation(tokenizer, "[1, 2, 3, 4]", lambda k, piece: -5.0)
    gen.pointer = Pointing(3, 0.83, [1, 2, 3, 4])
    scores = answer_scores(gen, parse_answer("[VG]", gen.text))
    assert scores.answer == 0.83 and scores.items == [0.83]


def test_a_generation_without_logprobs_has_no_score(tokenizer):
    gen = Generation("industrial", tokenizer.encode("industrial"), Routing(0, "tag"), 10, "stop")
    assert answer_scores(gen, parse_answer("[CLS]", gen.text)).answer is None


@pytest.mark.parametrize("task", ["det", "obb", "seg", "vg", "cls", "cap"])
def test_pipeline_results_carry_scores_in_range(pipe, task):
    rng = np.random.default_rng(11)
    tile = rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)
    result = pipe(tile, task, prompt="the plane" if task == "vg" else None, constrain=True)
    record = result.to_dict()
    assert 0.0 <= record["score"] <= 1.0
    if result.detections:
        assert all(0.0 <= d["score"] <= 1.0 for d in record["detections"])
    if result.oriented_detections:
        assert all(0.0 <= d["score"] <= 1.0 for d in record["oriented_detections"])
    if result.boxes_px:
        assert len(record["box_scores"]) == len(result.boxes_px)
        if result.pointer is not None:
            assert record["box_scores"][0] == pytest.approx(result.pointer.probability, abs=1e-4)
    if result.mask_labels is not None:
        assert set(record["mask_label_scores"]) >= set(result.mask_labels)
    json.dumps(record)


def test_infer_json_prints_scores(sample_png):
    out = CliRunner().invoke(main, ["infer", str(DEMO), str(sample_png), "--task", "det", "--json",
                                    "--max-new-tokens", "40"])
    assert out.exit_code == 0, out.output
    record = json.loads(out.output.strip().splitlines()[-1])
    assert 0.0 <= record["score"] <= 1.0
    assert all("score" in d for d in record.get("detections", []))


def test_reliability_curve_and_ece_by_hand():
    units = [(0.9, True)] * 9 + [(0.9, False)] + [(0.15, False)] * 8 + [(0.15, True)] * 2
    report = reliability(units, bins=10)
    assert report["n"] == 20
    assert report["ece"] == pytest.approx(0.5 * abs(0.9 - 0.9) + 0.5 * abs(0.15 - 0.2))
    assert [row[2] for row in report["curve"]] == [10, 10]
    assert report["auroc"] == pytest.approx((9 * 8 + 9 * 1 * 0.5 + 2 * 8 * 0.5) / (11 * 9))  # right vs wrong pairs


def test_auroc_is_one_for_a_perfect_ranking_and_half_for_ties():
    assert auroc(np.array([0.9, 0.8, 0.2, 0.1]), np.array([True, True, False, False])) == 1.0
    assert auroc(np.array([0.5] * 4), np.array([True, False, True, False])) == 0.5
    assert auroc(np.array([0.5]), np.array([True])) is None


def test_tokens_in_skips_empty_tokens_and_empty_spans():
    ends = [2, 5, 6, 7, 7, 10]  # token 4 covers no character (a byte held back for a multi-byte character)
    assert tokens_in(ends, [(4, 8), (0, 0)]) == [1, 2, 3, 5]
    assert tokens_in(ends, [(0, 1)], shift=5) == [2]  # spans in the stripped answer, 5 characters later
    assert tokens_in(ends, [(10, 12)]) == []
