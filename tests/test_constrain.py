"""Grammar-constrained decoding on the shipped demo model: every constrained token is grammatical, every answer that
ends parses, and turning the constraint off leaves generation as it was.

Random tiles stand in for real ones: the point is the grammar, not the answers' content, so nothing here depends on
a CPU's floats (answers are checked against the grammar and the parser, never against fixed text)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from rsvlm_edge import Pipeline
from rsvlm_edge.constrain import CONSTRAINED_TAGS, Constraints
from rsvlm_edge.formats import format_detections, format_mask, format_oriented_detections, parse_answer
from rsvlm_edge.tokenizer import Tokenizer

DEMO = Path(__file__).resolve().parents[1] / "models" / "tiny-demo"
TILES = 20


@pytest.fixture(scope="module")
def pipe():
    with Pipeline(DEMO, threads=1) as p:
        yield p


@pytest.fixture(scope="module")
def constraints():
    return Constraints(Tokenizer.load(DEMO / "tokenizer.json"))


@pytest.fixture(scope="module")
def tiles():
    rng = np.random.default_rng(5)
    return [rng.integers(0, 256, (96, 96, 3), dtype=np.uint8) for _ in range(TILES)]


def _grid():
    grid = [["others"] * 24 for _ in range(24)]
    grid[3][5:9] = ["storage tank"] * 4
    grid[23][:24] = ["small-vehicle"] * 24
    return grid


WELL_FORMED = {
    "[VG]": "[1, 2, 30, 100] [5, 5, 6, 6]",
    "[DET]": format_detections([("plane", [1, 2, 3, 4]), ("storage tank", [10, 10, 20, 20])]),
    "[OBB]": format_oriented_detections([("small-vehicle", [50, 50, 10, 5, -90]), ("ship", [1, 1, 1, 1, 89])]),
    "[CLS]": "airport, dense residential",
    "[SEG]": format_mask(_grid()),
}


def _accepts(constraints: Constraints, tag: str, ids: list[int]) -> bool:
    matcher = constraints.matcher(tag)
    for token in ids:
        if not matcher.allowed()[token] or not matcher.advance(token):
            return False
    return True


@pytest.mark.parametrize("tag", CONSTRAINED_TAGS)
def test_each_grammar_accepts_the_formatters_output_and_then_only_the_end(constraints, tag):
    tok = Tokenizer.load(DEMO / "tokenizer.json")
    matcher = constraints.matcher(tag)
    for token in tok.encode(WELL_FORMED[tag]):
        assert matcher.allowed()[token], tok.decode([token])
        assert matcher.advance(token)
    assert matcher.complete
    assert matcher.allowed()[tok.end_id]


@pytest.mark.parametrize("text", ["[101, 2, 3, 4]", "[1, 2, 3]", "plane [1, 2, 3, 4]"])
def test_the_box_grammar_refuses_out_of_range_and_malformed_boxes(constraints, text):
    tok = Tokenizer.load(DEMO / "tokenizer.json")
    assert not _accepts(constraints, "[VG]", tok.encode(text) + [tok.end_id])


def test_a_mask_row_must_cover_exactly_24_cells(constraints):
    tok = Tokenizer.load(DEMO / "tokenizer.json")
    short = "others*23\n" + "\n".join(["others*24"] * 23)
    extra = "\n".join(["others*24"] * 25)
    assert not _accepts(constraints, "[SEG]", tok.encode(short) + [tok.end_id])
    assert not _accepts(constraints, "[SEG]", tok.encode(extra) + [tok.end_id])


@pytest.mark.parametrize("task", ["vg", "det", "obb", "cls", "seg"])
def test_constrained_answers_are_grammatical_and_parse_when_they_end(pipe, constraints, tiles, task):
    tag = f"[{task.upper()}]"
    # [SEG] gets its default length (a mask of many short runs needs more than 300 tokens)
    results = pipe(tiles, task=task, constrain=True, **({} if task == "seg" else {"max_new_tokens": 300}))
    for result in results:
        ids = result.generation.token_ids
        assert _accepts(constraints, tag, ids), result.text  # a cut answer is still a grammatical prefix
        if result.finish_reason == "stop":
            assert parse_answer(tag, result.text).error is None, result.text
    if task in ("vg", "cls"):  # short formats: every demo answer ends well inside the budget
        assert all(r.finish_reason == "stop" for r in results)


def test_without_constrain_generation_is_unchanged(pipe, tiles):
    """constrain=False decodes as a plain SamplingConfig does (the loop without any grammar)."""
    from rsvlm_edge.sampling import SamplingConfig

    plain = pipe(tiles[:4], task="obb", sampling=SamplingConfig(max_new_tokens=40))
    off = pipe(tiles[:4], task="obb", max_new_tokens=40, constrain=False)
    on = pipe(tiles[:4], task="obb", max_new_tokens=40)
    assert [r.generation.token_ids for r in plain] == [r.generation.token_ids for r in off]
    assert all(r.parse_error is None for r in on if r.finish_reason == "stop")


def test_chat_turns_are_constrained_too(pipe, tiles):
    """A chat turn follows its tag's grammar like a one-shot request: a [SEG] turn after a caption is a 24-row mask."""
    from rsvlm_edge.generation import ChatSession
    from rsvlm_edge.sampling import SamplingConfig

    tile = pipe.prepare([tiles[0]], ["<array 0>"], None)
    session = ChatSession(pipe.generator, tile.pixels, tile.sensor)
    sampling = SamplingConfig(max_new_tokens=640, constrain=True)
    session.ask("[CAP] Describe the image.", sampling)
    answer = session.ask("[SEG] Segment the image.", sampling)
    assert answer.finish_reason == "stop"
    parsed = parse_answer("[SEG]", answer.text)
    assert parsed.error is None and not parsed.partial and len(parsed.mask) == 24


def test_a_class_list_limits_cls_answers_to_it(pipe, tiles):
    classes = ("harbor", "farmland", "bare land")
    for result in pipe(tiles[:6], task="cls", classes=classes):
        assert result.parse_error is None
        assert set(result.labels or []) <= set(classes), result.text


def test_infer_classes_option(sample_png):
    from click.testing import CliRunner

    from rsvlm_edge.cli import main

    run = CliRunner().invoke(main, ["infer", str(DEMO), str(sample_png), "--task", "cls", "--json",
                                    "--classes", "harbor, farmland"])
    assert run.exit_code == 0, run.output
    import json

    assert json.loads(run.output.strip().splitlines()[-1])["labels"][0] in ("harbor", "farmland")
    for args, message in [(["--classes", "Harbor"], "not a label"), (["--classes", ","], "at least one class"),
                          (["--classes", "harbor", "--no-constrain"], "needs the grammar")]:
        run = CliRunner().invoke(main, ["infer", str(DEMO), str(sample_png), "--task", "cls", *args])
        assert run.exit_code != 0 and message in run.output, run.output
        assert "Traceback" not in run.output
