"""`rsvlm-edge chat` driven through click's CliRunner on the shipped demo engines (ONNX Runtime): the commands
(/help, /image, /task, /quit), JSON answers, [SEG] masks, and errors that leave the session going.

Assertions use what does not depend on the CPU's floats: which image and instruction a turn answered, token counts
of the prompt (a fresh session re-reads the image; a continued one sends only the new turn), files written.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from rsvlm_edge.cli import main
from rsvlm_edge.tasks import DEFAULT_PROMPTS

DEMO = Path(__file__).resolve().parents[1] / "models" / "tiny-demo"
pytestmark = pytest.mark.skipif(not (DEMO / "manifest.json").exists(), reason="demo model not built")

AID = ["aid/Airport/airport_1.jpg", "aid/Beach/beach_35.jpg", "aid/Desert/desert_283.jpg"]


@pytest.fixture(scope="module")
def tiles(data_root) -> list[Path]:
    return [data_root / t for t in AID]


def chat(*args, lines: list[str]):
    res = CliRunner().invoke(main, ["chat", str(DEMO), *[str(a) for a in args]], input="\n".join(lines) + "\n",
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "Traceback" not in res.output
    return res


def answers(res) -> list[dict]:
    """--json: stdout holds only JSON objects, one per answered turn."""
    return [json.loads(line) for line in res.stdout.splitlines() if line.strip()]


def test_help_lists_the_commands(tiles):
    res = chat(tiles[0], lines=["/help"])
    for command in ("/help", "/image PATH", "/task NAME", "/reset", "/quit"):
        assert command in res.output


def test_image_switches_the_tile_and_clears_the_history(tiles):
    question = "[CAP] Describe the image."
    res = chat(tiles[0], "--json", "--max-new-tokens", "6",
               lines=[question, question, f"/image {tiles[1]}", question])
    first, continued, switched = answers(res)
    assert first["images"] == continued["images"] == [str(tiles[0])]
    assert switched["images"] == [str(tiles[1])]
    # A continued turn sends only its own tokens; after /image the turn is a fresh prompt with the image again.
    assert continued["prompt_tokens"] < first["prompt_tokens"] == switched["prompt_tokens"]
    assert "conversation cleared" in res.stderr


def test_task_tags_the_following_questions(tiles):
    res = chat(tiles[0], "--json", "--max-new-tokens", "4",
               lines=["/task cls", "What is in the image?", "[CAP] Describe it.", "/task none", "What is this?"])
    tagged, own_tag, untagged = answers(res)
    assert tagged["instruction"] == "[CLS] What is in the image?" and tagged["task"] == "[CLS]"
    assert own_tag["instruction"] == "[CAP] Describe it."  # a question's own tag wins
    assert untagged["instruction"] == "What is this?" and untagged["expert_source"] != "tag"


def test_text_mode_streams_answers_and_quit_ends_the_session(tiles):
    res = chat(tiles[0], "--max-new-tokens", "4", "--task", "cap", lines=["Describe the image.", "/quit", "never"])
    assert res.stdout.count("model> ") == 1


def test_mask_dir_writes_seg_masks_at_the_image_size(tiles, tmp_path):
    masks = tmp_path / "masks"
    question = f"[SEG] {DEFAULT_PROMPTS['[SEG]']}"
    lines = [question]
    for tile in tiles[1:]:
        lines += [f"/image {tile}", question]
    records = answers(chat(tiles[0], "--json", "--mask-dir", masks, lines=lines))
    assert [r["images"] for r in records] == [[str(t)] for t in tiles]
    written = [r for r in records if "mask_png" in r]
    # Every answer that parses as a mask is written; the demo model parses on these tiles (a near-tie on some CPU
    # may spoil one answer, not all three).
    assert written and all("mask_labels" in r for r in written)
    assert all(("mask_png" in r) == ("parse_error" not in r) for r in records)
    for record in written:
        path = Path(record["mask_png"])
        assert path.parent == masks and path.name == Path(record["images"][0]).name + "_mask.png"
        with Image.open(path) as mask, Image.open(record["images"][0]) as image:
            assert mask.size == image.size and mask.mode == "L"


@pytest.mark.parametrize("bad", ["/image /no/such/tile.png", "/image", "/task bogus", "/frobnicate", '/image "open'])
def test_a_bad_command_is_reported_and_the_session_goes_on(tiles, bad):
    question = "[CAP] Describe the image."
    res = chat(tiles[0], "--json", "--max-new-tokens", "4", lines=[question, bad, question])
    before, after = answers(res)
    assert after["images"] == [str(tiles[0])]
    assert after["prompt_tokens"] < before["prompt_tokens"]  # the conversation was kept
    assert "error: " in res.stderr


def test_a_failing_turn_is_reported_and_the_session_goes_on(tiles):
    # [CCD] compares two images; this chat has one, so that turn fails and the next one is answered.
    res = chat(tiles[0], "--json", "--max-new-tokens", "4",
               lines=["[CCD] What changed?", "[CAP] Describe the image."])
    assert "error: " in res.stderr and "two images" in res.stderr
    (answer,) = answers(res)
    assert answer["task"] == "[CAP]"


def test_verbose_shows_the_thread_choice(tiles, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    res = chat(tiles[0], "-v", "--max-new-tokens", "2", lines=["[CAP] Describe."])
    assert "threads: 1 (auto: small decoder" in res.stderr
    res = chat(tiles[0], "-v", "--threads", "1", "--max-new-tokens", "2", lines=["[CAP] Describe."])
    assert "threads: 1 (--threads)" in res.stderr
