"""Task tags, tag -> expert routing, and the chat template every component agrees on.

Everything the model does is text: a user turn starts with a task tag (``[CAP]``, ``[VG]`` ...) and the image
placeholders; the answer is generated text that :mod:`rsvlm_edge.formats` parses.
"""

from __future__ import annotations

from dataclasses import dataclass

from rsvlm_edge.config import EXPERT_NAMES

#: Task tags in the order RSUniVLM lists them, plus detection ([DET], [OBB]) added by this project.
TAGS: tuple[str, ...] = ("[CAP]", "[VQA]", "[CLS]", "[VG]", "[REF]", "[SEG]", "[CCD]", "[DET]", "[OBB]")

TAG_DESCRIPTIONS: dict[str, str] = {
    "[CAP]": "caption the image",
    "[VQA]": "answer a question about the image",
    "[CLS]": "classify the scene",
    "[VG]": "visual grounding: box of the described object",
    "[REF]": "describe the object in the given box",
    "[SEG]": "24x24 segmentation mask (two images: change mask)",
    "[CCD]": "change captioning of an image pair",
    "[DET]": "detect objects as horizontal boxes",
    "[OBB]": "detect objects as oriented boxes",
}

#: The ``--task`` names of the command line (``cap`` for ``[CAP]`` ...) and their one-line help.
TASK_CHOICES = [t.strip("[]").lower() for t in TAG_DESCRIPTIONS]
TASK_HELP = "; ".join(f"{t.strip('[]').lower()}: {d}" for t, d in TAG_DESCRIPTIONS.items())

#: The instruction used when the user gives a task but no prompt (the demo model is trained on these phrasings too).
DEFAULT_PROMPTS: dict[str, str] = {
    "[CAP]": "Describe the image.",
    "[VQA]": "What is in the image?",
    "[CLS]": "Classify the scene.",
    "[VG]": "Locate the object.",
    "[REF]": "What is in the region [25, 25, 75, 75]?",
    "[SEG]": "Segment the image.",
    "[CCD]": "Describe the changes between the two images.",
    "[DET]": "Detect all objects.",
    "[OBB]": "Detect all objects with oriented boxes.",
}

#: How many tokens an answer may take when the user sets no ``max_new_tokens``: what each answer format needs.
#: Measured with the demo tokenizer on 300 synthetic training answers per task (seed 1): [SEG] masks take a median
#: of 160 tokens and up to 548 (fragmented land cover); a box is 9 tokens and an oriented box 12 plus its label, so
#: a dense [OBB] scene of 21 vehicles already needs 255 and 768 holds about 60; [CLS] took at most 3, [VG] 10,
#: [CAP] 36, [CCD] 14. Free-text tasks get room for a long paragraph. Untagged prompts (None) keep 256.
#: :func:`max_new_tokens_for` caps each value at the room the model's context leaves after the prompt.
TASK_MAX_NEW_TOKENS: dict[str | None, int] = {
    "[CAP]": 128,
    "[VQA]": 64,
    "[CLS]": 32,
    "[VG]": 32,
    "[REF]": 64,
    "[SEG]": 640,
    "[CCD]": 128,
    "[DET]": 768,
    "[OBB]": 768,
    None: 256,
}


def max_new_tokens_for(tag: str | None, room: int | None = None) -> int:
    """The default answer length of a task (:data:`TASK_MAX_NEW_TOKENS`), at most ``room`` (the context left after
    the prompt) and at least 1, so a default never makes a request fail for lack of context."""
    wanted = TASK_MAX_NEW_TOKENS.get(tag, TASK_MAX_NEW_TOKENS[None])
    return max(1, wanted if room is None else min(wanted, room))


#: Tasks that compare two images (a change pair); [SEG] takes one image, or two for a change mask.
PAIR_TASKS = ("[CCD]",)

IMAGE_EXPERT, REGION_EXPERT, PIXEL_EXPERT = 0, 1, 2
_TAG_EXPERT = {"[SEG]": PIXEL_EXPERT, "[VG]": REGION_EXPERT, "[REF]": REGION_EXPERT}

# Special tokens of the chat template (the tokenizer registers them, plus every tag, as atomic tokens).
PAD, UNK, BOS = "<pad>", "<unk>", "<bos>"
USER, ASSISTANT, END = "<|user|>", "<|assistant|>", "<|end|>"
IMAGE = "<image>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, UNK, BOS, USER, ASSISTANT, END, IMAGE) + TAGS


class TaskError(ValueError):
    """A request names an unknown task or carries the wrong number of images."""


def expert_for_tag(tag: str) -> int:
    """docs/design.md routing: [SEG] -> pixel, [VG]/[REF] -> region, every other tag -> image."""
    if tag not in TAGS:
        raise TaskError(f"unknown task tag {tag!r}; known tags: {' '.join(TAGS)}")
    return _TAG_EXPERT.get(tag, IMAGE_EXPERT)


def expert_by_rule(text: str) -> int:
    """RSUniVLM's routing (its ``app.py``), for models without a learned router: a substring test on the whole
    message, wherever the tag stands. ``[SEG]`` -> pixel, else ``[VG]`` or ``[REF]`` -> region, else image."""
    if "[SEG]" in text:
        return PIXEL_EXPERT
    if "[VG]" in text or "[REF]" in text:
        return REGION_EXPERT
    return IMAGE_EXPERT


def expert_name(index: int) -> str:
    return EXPERT_NAMES[index]


def split_tag(text: str) -> tuple[str | None, str]:
    """Return (tag, rest) when ``text`` starts with a known tag, else (None, text)."""
    stripped = text.lstrip()
    for tag in TAGS:
        if stripped.startswith(tag):
            return tag, stripped[len(tag):].strip()
    return None, text.strip()


def normalize_tag(task: str) -> str:
    """Accept ``cap``, ``CAP`` or ``[CAP]`` and return ``[CAP]``."""
    tag = task.strip().upper()
    if not tag.startswith("["):
        tag = f"[{tag}]"
    if tag not in TAGS:
        raise TaskError(f"unknown task {task!r}; choose one of {', '.join(t.strip('[]').lower() for t in TAGS)}")
    return tag


def make_instruction(task: str | None, prompt: str | None) -> str:
    """User text from ``--task`` / ``--prompt``: the tag goes first; no task and an untagged prompt -> router decides."""
    if task is None:
        if not prompt or not prompt.strip():
            raise TaskError("give a --task, a --prompt, or both")
        return prompt.strip()
    tag = normalize_tag(task)
    if prompt:
        given, rest = split_tag(prompt)
        if given is not None and given != tag:
            raise TaskError(f"--task {tag} conflicts with the tag {given} in the prompt")
        text = rest
    else:
        text = DEFAULT_PROMPTS[tag]
    return f"{tag} {text}"


def check_image_count(tag: str | None, num_images: int) -> None:
    if tag in PAIR_TASKS and num_images != 2:
        raise TaskError(f"{tag} compares two images (before, after); got {num_images}")
    if num_images not in (1, 2):
        raise TaskError(f"a request takes 1 image (2 for change tasks), got {num_images}")


@dataclass(frozen=True)
class Turn:
    user: str  # instruction text, tag included when there is one
    assistant: str | None = None  # None for the turn being generated


#: A piece of a rendered prompt: (text, is_control). Control pieces are template tokens (turn markers, image slots,
#: the leading task tag) and encode as their special token; every other piece is user or answer text and encodes as
#: plain text, so ``<|end|>`` or ``<image>`` typed by a user can never open a turn or an image slot.
Segment = tuple[str, bool]


def _text_segments(text: str) -> list[Segment]:
    """An instruction: its leading task tag (if any) is a control token; the rest, later tags included, is text."""
    stripped = text.strip()
    for tag in TAGS:
        if stripped.startswith(tag):
            rest = stripped[len(tag):]
            return [(tag, True)] + ([(rest, False)] if rest else [])
    return [(stripped, False)] if stripped else []


def user_segments(text: str, num_images: int) -> list[Segment]:
    """One user turn; images (only in the first turn) come before the instruction, one placeholder each."""
    segments: list[Segment] = [(USER, True), ("\n", False)]
    for _ in range(num_images):
        segments += [(IMAGE, True), ("\n", False)]
    return segments + _text_segments(text) + [(END, True), ("\n", False)]


def check_turns(turns: list[Turn], num_images: int) -> None:
    """What every prompt template needs: at least one turn, 1-2 images, and the last turn the one to answer."""
    if not turns:
        raise TaskError("a prompt needs at least one turn")
    if num_images not in (1, 2):
        raise TaskError(f"a request takes 1 image (2 for change tasks), got {num_images}")
    if turns[-1].assistant is not None:
        raise TaskError("the last turn must be the one to answer (assistant=None)")


def prompt_segments(turns: list[Turn], num_images: int) -> list[Segment]:
    """Render a conversation; the last turn has no answer yet and the prompt ends ready for the assistant."""
    check_turns(turns, num_images)
    segments: list[Segment] = []
    for i, turn in enumerate(turns):
        segments += user_segments(turn.user, num_images if i == 0 else 0)
        segments += [(ASSISTANT, True), ("\n", False)]
        if turn.assistant is not None:
            segments += [(turn.assistant.strip(), False), (END, True), ("\n", False)]
    return segments


def user_block(text: str, num_images: int) -> str:
    """:func:`user_segments` as one string (for display and for training on trusted text)."""
    return "".join(piece for piece, _ in user_segments(text, num_images))


def build_prompt(turns: list[Turn], num_images: int) -> str:
    """:func:`prompt_segments` as one string (for display and for training on trusted text)."""
    return "".join(piece for piece, _ in prompt_segments(turns, num_images))
