"""Partial answers: a cut-off or partly malformed [DET]/[OBB]/[VG] list or [SEG] mask keeps its well-formed part
and says what it dropped; masks are also written as class-indexed palette PNGs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rsvlm_edge import formats as F
from rsvlm_edge.generation import Generation, Routing
from rsvlm_edge.infer_command import MaskNames, save_mask
from rsvlm_edge.inputs import Tile
from rsvlm_edge.results import Result, class_palette
from rsvlm_edge.tasks import DEFAULT_PROMPTS, TAGS, TASK_MAX_NEW_TOKENS, max_new_tokens_for

# ------------------------------------------------------------------------------------------------ box lists


def test_obb_list_cut_mid_box_keeps_the_complete_boxes():
    boxes = [("small-vehicle", (10 + i, 20 + i, 3, 4, -45)) for i in range(21)]
    text = F.format_oriented_detections(boxes) + " [70, 71, 3"  # cut by max_new_tokens inside the 22nd box
    answer = F.parse_answer("[OBB]", text)
    assert answer.error is None and answer.obbs == boxes
    assert answer.partial and answer.dropped == 1 and "unfinished" in answer.notes[0]


def test_one_malformed_box_drops_only_itself():
    answer = F.parse_answer("[DET]", "plane [1, 2, 3, 4] [5, 6, 7]; ship [10, 10, 200, 20] [30, 30, 40, 40]")
    assert answer.detections == [("plane", (1, 2, 3, 4)), ("ship", (30, 30, 40, 40))]
    assert answer.partial and answer.dropped == 2 and len(answer.notes) == 2


def test_inverted_box_is_kept_with_its_corners_swapped():
    answer = F.parse_answer("[DET]", "ship [10, 40, 20, 30]")
    assert answer.detections == [("ship", (10, 30, 20, 40))] and not answer.partial
    assert answer.detections[0][1] == F.parse_detections("ship [10, 40, 20, 30]")[0][1]


def test_bad_label_drops_its_boxes_and_cut_label_is_noted():
    answer = F.parse_answer("[DET]", "Plane! [1, 2, 3, 4] [5, 6, 7, 8]; ship [1, 1, 2, 2]; harb")
    assert answer.detections == [("ship", (1, 1, 2, 2))]
    assert answer.dropped == 3 and "harb" in answer.notes[-1]


def test_nothing_well_formed_is_still_an_error_with_the_first_problem():
    answer = F.parse_answer("[DET]", "plane [1, 2, 3]")
    assert answer.error and "needs 4 numbers" in answer.error
    assert answer.detections is None and not answer.partial
    assert F.parse_answer("[DET]", "none").detections == []


def test_vg_keeps_the_well_formed_box():
    answer = F.parse_answer("[VG]", "[1, 2, 3, 4] [5, 6")
    assert answer.boxes == [(1, 2, 3, 4)] and answer.partial and answer.dropped == 1


def test_strict_parsers_still_refuse_partial_text():
    with pytest.raises(F.BoxFormatError):
        F.parse_oriented_detections("ship [50, 50, 20, 10, 30] [1, 2")


# ------------------------------------------------------------------------------------------------ masks


def _grid(rows: int) -> list[list[str]]:
    return [["water"] * 6 + ["others"] * 18 for _ in range(rows)]


def test_cut_mask_pads_missing_rows_with_background():
    text = F.format_mask(_grid(24)).splitlines()
    answer = F.parse_answer("[SEG]", "\n".join(text[:20]) + "\nwater*6, oth")  # cut in row 21
    assert answer.error is None and len(answer.mask) == 24 and all(len(r) == 24 for r in answer.mask)
    assert answer.mask[:20] == _grid(20)
    assert answer.mask[20] == ["water"] * 6 + ["others"] * 18  # leading well-formed run kept, rest background
    assert answer.mask[21:] == [["others"] * 24] * 3
    assert answer.filled_rows == [20, 21, 22, 23] and answer.partial and answer.dropped == 1


def test_extra_mask_rows_are_dropped():
    answer = F.parse_answer("[SEG]", F.format_mask(_grid(24)) + "\nothers*24" * 5)
    assert answer.mask == _grid(24) and answer.dropped == 5 and answer.filled_rows == []
    assert answer.partial


def test_mask_with_too_few_good_rows_is_an_error():
    text = "\n".join(F.format_mask(_grid(24)).splitlines()[: F.MIN_MASK_ROWS - 1])
    answer = F.parse_answer("[SEG]", text)
    assert answer.mask is None and "24 rows" in answer.error


def test_whole_mask_is_not_partial():
    answer = F.parse_answer("[SEG]", F.format_mask(_grid(24)))
    assert answer.mask == _grid(24) and not answer.partial and answer.filled_rows == []


# ------------------------------------------------------------------------------------------------ results and JSON


def _result(tag: str, text: str, finish_reason: str, size=(48, 32), path="tile.png") -> Result:
    tile = Tile(paths=[path], pixels=[np.zeros((3, 8, 8), np.float32)], sensor="rgb", sizes=[size])
    gen = Generation(text=text, token_ids=[1, 2], finish_reason=finish_reason, routing=Routing(0, "tag"),
                     prompt_tokens=5, timings={})
    return Result(tile, f"{tag} go", gen, F.parse_answer(tag, text))


def test_to_dict_reports_partial_and_dropped():
    d = _result("[DET]", "plane [1, 2, 3, 4] [5, 6", "length").to_dict()
    assert d["partial"] is True and d["dropped"] == 1 and "unfinished" in d["partial_notes"][0]
    assert len(d["detections"]) == 1 and "parse_error" not in d
    assert json.loads(json.dumps(d)) == d


def test_cut_at_an_item_boundary_is_partial_without_drops():
    d = _result("[DET]", "plane [1, 2, 3, 4]", "length").to_dict()
    assert d["partial"] is True and d["dropped"] == 0
    assert _result("[DET]", "plane [1, 2, 3, 4]", "stop").to_dict()["partial"] is False


def test_mask_rows_filled_in_json():
    text = "\n".join(F.format_mask(_grid(24)).splitlines()[:22])
    d = _result("[SEG]", text, "length").to_dict()
    assert d["partial"] and d["mask_rows_filled"] == [22, 23]


# ------------------------------------------------------------------------------------------------ class masks


def test_class_png_indexes_labels_in_first_appearance_order(tmp_path):
    grid = [["others"] * 24 for _ in range(24)]
    for r in range(12):
        grid[r][:8] = ["water"] * 8
    for r in range(12, 24):
        grid[r][16:] = ["building"] * 8
    grid[0][20] = "road"
    result = _result("[SEG]", F.format_mask(grid), "stop", path=str(tmp_path / "t.png"))
    save_mask(result, MaskNames(tmp_path / "masks", tmp_path))
    d = result.to_dict()
    assert d["mask_classes"] == ["others", "water", "road", "building"] == result.mask_classes
    png = Image.open(d["mask_class_png"])
    assert png.mode == "P" and png.size == (48, 32)
    values = np.array(png)
    assert np.array_equal(values, result.class_mask_image())
    assert values[0, 0] == 1 and values[-1, -1] == 3 and values[-1, 0] == 0 and values[0, 41] == 2
    assert png.getpalette()[:12] == class_palette(4)
    assert len({tuple(class_palette(4)[i:i + 3]) for i in range(0, 12, 3)}) == 4  # distinct colours
    binary = np.array(Image.open(d["mask_png"]))
    assert np.array_equal(binary == 255, values > 0)


def test_class_png_names_are_unique_and_reserved_with_the_binary_name(tmp_path):
    names = MaskNames(tmp_path, tmp_path)
    first = names(str(tmp_path / "x"))
    second = names(str(tmp_path / "x"))
    assert first.name == "x_mask.png" and MaskNames.class_path(first).name == "x_mask_classes.png"
    assert second.name == "x_mask-2.png" and MaskNames.class_path(second).name == "x_mask-2_classes.png"


# ------------------------------------------------------------------------------------------------ answer lengths

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "models" / "tiny-demo"


def test_task_lengths_hold_the_longest_synthetic_answers():
    from rsvlm_edge.tokenizer import Tokenizer
    from rsvlm_edge.training.synthetic.generator import generate

    tokenizer = Tokenizer.load(DEMO / "tokenizer.json")
    for task in ("seg", "det", "obb", "cls", "vg", "cap", "ref", "ccd"):
        for sample in generate(40, seed=3, size=128, tasks=[task]):
            tag = sample.prompt.split()[0]
            need = len(tokenizer.encode(sample.answer)) + 1  # + the end token
            assert need <= TASK_MAX_NEW_TOKENS[tag], (tag, need)
    assert TASK_MAX_NEW_TOKENS["[DET]"] > 256 and TASK_MAX_NEW_TOKENS["[OBB]"] > 256  # dense scenes
    assert all(TASK_MAX_NEW_TOKENS.get(tag) for tag in TAGS)


def test_max_new_tokens_for_caps_at_the_room_left():
    assert max_new_tokens_for("[SEG]") == TASK_MAX_NEW_TOKENS["[SEG]"]
    assert max_new_tokens_for("[DET]", room=100) == 100
    assert max_new_tokens_for("[CLS]", room=1000) == TASK_MAX_NEW_TOKENS["[CLS]"]
    assert max_new_tokens_for(None) == TASK_MAX_NEW_TOKENS[None] and max_new_tokens_for("[DET]", room=-5) == 1


@pytest.fixture
def recorded(monkeypatch):
    """The max_new_tokens each generate call got; generation itself is skipped (an empty answer)."""
    from rsvlm_edge.generation import Generator

    seen: list[int] = []

    def fake_generate(self, requests, sampling=None, on_token=None):
        seen.append(sampling.max_new_tokens)
        return [Generation(text="none", token_ids=[], routing=Routing(0, "tag"), prompt_tokens=1, finish_reason="stop")
                for _ in requests]

    monkeypatch.setattr(Generator, "generate", fake_generate)
    return seen


@pytest.fixture(scope="module")
def pipe():
    from rsvlm_edge import Pipeline

    with Pipeline(DEMO, threads=1) as p:
        yield p


def _room(pipe, tag_prompt: str, images: int = 1) -> int:
    from rsvlm_edge.generation import Request

    pixels = [np.zeros((3, pipe.config.image_size, pipe.config.image_size), np.float32)] * images
    request = Request(pixels=pixels, sensor="rgb", prompt=tag_prompt)
    return pipe.config.max_position_embeddings - len(pipe.generator.prompt_ids(request))


def test_api_uses_the_task_length_unless_told(pipe, recorded):
    from rsvlm_edge.sampling import SamplingConfig

    image = np.zeros((64, 64, 3), np.uint8)
    pipe(image, task="cls")
    pipe(image, task="seg")
    pipe(image, task="obb", max_new_tokens=5)
    pipe(image, task="det", sampling=SamplingConfig(max_new_tokens=7))
    pipe(image, task="det", temperature=0.5)
    det_room = _room(pipe, "[DET] " + DEFAULT_PROMPTS["[DET]"])
    seg = min(TASK_MAX_NEW_TOKENS["[SEG]"], _room(pipe, "[SEG] " + DEFAULT_PROMPTS["[SEG]"]))
    assert recorded == [TASK_MAX_NEW_TOKENS["[CLS]"], seg, 5, 7, min(TASK_MAX_NEW_TOKENS["[DET]"], det_room)]


def test_cli_uses_the_task_length_unless_told(recorded, tmp_path):
    from click.testing import CliRunner

    from rsvlm_edge.cli import main

    tile = tmp_path / "t.png"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tile)
    for extra in ([], ["--max-new-tokens", "9"]):
        res = CliRunner().invoke(main, ["infer", str(DEMO), str(tile), "--task", "cls", "--json", *extra],
                                 catch_exceptions=False)
        assert res.exit_code == 0, res.output
    assert recorded == [TASK_MAX_NEW_TOKENS["[CLS]"], 9]


def test_chat_turns_get_their_task_length(pipe, tmp_path):
    from rsvlm_edge.chat_command import Chat
    from rsvlm_edge.cli_options import sampling_config

    tile = tmp_path / "t.png"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tile)
    kw = {"max_new_tokens": None, "temperature": 0.0, "top_k": 0, "top_p": 1.0, "repetition_penalty": None, "seed": 0}
    chat = Chat(pipe, sampling_config(kw), None, default_tokens=True)
    chat.open_images([str(tile)])
    assert chat.turn_sampling("[CLS] what?", "[CLS]").max_new_tokens == TASK_MAX_NEW_TOKENS["[CLS]"]
    assert chat.turn_sampling("hello", None).max_new_tokens == TASK_MAX_NEW_TOKENS[None]
    fixed = Chat(pipe, sampling_config({**kw, "max_new_tokens": 11}), None)
    assert fixed.turn_sampling("[SEG] go", "[SEG]").max_new_tokens == 11


def test_notes_are_capped_but_dropped_counts_everything():
    text = "ship " + " ".join(["[1, 2, 3]"] * 30) + " [1, 2, 3, 4]"
    answer = F.parse_answer("[DET]", text)
    assert answer.detections == [("ship", (1, 2, 3, 4))] and answer.dropped == 30
    assert len(answer.notes) == 11 and answer.notes[-1] == "... and 20 more"


def test_class_mask_of_an_answer_without_mask_names_the_image():
    result = _result("[SEG]", "others*24", "stop", path="tile.png")
    with pytest.raises(ValueError, match="tile.png: the answer has no mask"):
        result.class_mask_image()
