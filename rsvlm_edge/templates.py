"""Prompt templates: how a conversation and its images become token ids, one template per model family.

A model dir's ``config.json`` names its template (``prompt_template``):

* ``rsvlm`` - the models trained here: ``<|user|>\\n<image>\\n[TAG] text<|end|>\\n<|assistant|>\\n``; the turn
  markers, the image token and a leading task tag are special tokens of our tokenizer.
* ``qwen_1_5`` - RSUniVLM (LLaVA's ``conv_qwen``, rendered by its ``app.py``): ChatML with the system turn
  ``You are a helpful assistant.``, the images as ``<image>\\n`` (two: ``<image> <image>\\n``) before the first
  message, no BOS. Task tags are plain text of the message. LLaVA's ``tokenizer_image_token`` tokenizes the text
  between image slots chunk by chunk and puts one id (-200) per slot that the visual tokens replace; we do the same
  with the slot expanded to the model's visual-token count, so the ids are the ones the reference runs.

A template renders :class:`~rsvlm_edge.tasks.Turn` s as segments ``(piece, is_control)``. Control pieces come only
from the template: ``IMAGE`` is an image slot, any other control piece is that special token. Every other piece (user
text, earlier answers, the template's own words) is joined up to the next control piece and encoded as plain text,
so a user who types ``<|im_end|>`` or ``<image>`` gets those characters, never a turn or an image slot.

Image slots need no vocabulary token (Qwen2's base vocabulary has no ``<image>``): :class:`PromptIds` carries the
slot positions as a mask, and the slot ids are a placeholder that is valid for the embedding table (the template's
image token when it has one, else its pad token) until the visual tokens overwrite those positions.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

import numpy as np

from rsvlm_edge.tasks import ASSISTANT, END, IMAGE, Segment, Turn, check_turns, prompt_segments, user_segments
from rsvlm_edge.tokenizer import RSVLM_CONTROL, ControlTokens, Tokenizer

__all__ = ["TEMPLATES", "PromptIds", "PromptTemplate", "QwenTemplate", "RsvlmTemplate", "get_template"]

# ChatML (Qwen) control tokens and RSUniVLM's system prompt (LLaVA conversation.py, conv_qwen).
IM_START, IM_END, ENDOFTEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
QWEN_SYSTEM_PROMPT = "You are a helpful assistant."


@dataclass(frozen=True)
class PromptIds:
    """A prompt's token ids with every image slot expanded to the model's visual tokens."""

    ids: list[int]  # image slots hold the placeholder id
    image_slots: np.ndarray  # bool (S,): True where a visual token goes, images in order

    def __len__(self) -> int:
        return len(self.ids)


class PromptTemplate(abc.ABC):
    """Renders conversations for one model family; :meth:`encode` turns the rendering into :class:`PromptIds`."""

    name: str
    control: ControlTokens  # the tokenizer must hold these (checked when it is loaded for this template)
    #: Whether the repetition penalty counts the prompt's ids, as the family's reference generation does.
    penalty_covers_prompt: bool

    @abc.abstractmethod
    def segments(self, turns: list[Turn], num_images: int) -> list[Segment]:
        """The whole conversation; images in the first user turn; ends ready for the assistant's answer."""

    @abc.abstractmethod
    def next_turn(self, text: str) -> list[Segment]:
        """What follows an answer already in a chat's KV cache: close that answer, add the user turn ``text``
        (no images), open the next answer. Joined to the earlier rendering it equals :meth:`segments`."""

    def render(self, turns: list[Turn], num_images: int) -> str:
        """The prompt as one string (for display; ``<image>`` marks each slot)."""
        return "".join(piece for piece, _ in self.segments(turns, num_images))

    def encode(self, tokenizer: Tokenizer, segments: list[Segment], num_visual_tokens: int) -> PromptIds:
        """Token ids of ``segments``: text between control pieces encoded together as plain text (one chunk, as
        ``tokenizer_image_token`` does between slots), control pieces as their special token, each image slot as
        ``num_visual_tokens`` placeholder ids."""
        placeholder = tokenizer.pad_id if self.control.image is None else tokenizer.token_id(self.control.image)
        ids: list[int] = []
        slots: list[bool] = []
        run: list[Segment] = []  # the pieces since the last image slot

        def flush() -> None:
            chunk = tokenizer.encode_segments(run)
            ids.extend(chunk)
            slots.extend([False] * len(chunk))
            run.clear()

        for piece, control in segments:
            if control and piece == IMAGE:
                flush()
                ids.extend([placeholder] * num_visual_tokens)
                slots.extend([True] * num_visual_tokens)
            else:
                run.append((piece, control))
        flush()
        return PromptIds(ids, np.asarray(slots, dtype=bool))


class RsvlmTemplate(PromptTemplate):
    """The template of the models trained here (:func:`rsvlm_edge.tasks.prompt_segments`)."""

    name = "rsvlm"
    control = RSVLM_CONTROL
    penalty_covers_prompt = True

    def segments(self, turns: list[Turn], num_images: int) -> list[Segment]:
        return prompt_segments(turns, num_images)

    def next_turn(self, text: str) -> list[Segment]:
        return [(END, True), ("\n", False)] + user_segments(text, 0) + [(ASSISTANT, True), ("\n", False)]


def _open(role: str) -> list[Segment]:
    return [(IM_START, True), (f"{role}\n", False)]


_CLOSE: list[Segment] = [(IM_END, True), ("\n", False)]


class QwenTemplate(PromptTemplate):
    """LLaVA's ``qwen_1_5`` conversation as RSUniVLM's ``app.py`` fills it: the message is the user's text as
    typed (tags included), preceded in the first turn by ``<image>`` slots separated by a space and ended by a
    newline. Earlier answers are rendered as text, ChatML style."""

    name = "qwen_1_5"
    control = ControlTokens(pad=ENDOFTEXT, end=IM_END, image=None, required=(ENDOFTEXT, IM_START, IM_END))
    # LLaVA generates from inputs_embeds: HF's input_ids start empty, so its penalty sees generated ids only.
    penalty_covers_prompt = False

    def segments(self, turns: list[Turn], num_images: int) -> list[Segment]:
        check_turns(turns, num_images)
        out = _open("system") + [(QWEN_SYSTEM_PROMPT, False)] + _CLOSE
        for i, turn in enumerate(turns):
            out += self._user(turn.user, num_images if i == 0 else 0) + _open("assistant")
            if turn.assistant is not None:
                out += [(turn.assistant, False)] + _CLOSE
        return out

    def next_turn(self, text: str) -> list[Segment]:
        return _CLOSE + self._user(text, 0) + _open("assistant")

    @staticmethod
    def _user(text: str, num_images: int) -> list[Segment]:
        images: list[Segment] = []
        for k in range(num_images):
            images += ([(" ", False)] if k else []) + [(IMAGE, True)]
        if images:
            images.append(("\n", False))
        return _open("user") + images + [(text, False)] + _CLOSE


TEMPLATES: dict[str, PromptTemplate] = {t.name: t for t in (RsvlmTemplate(), QwenTemplate())}


def get_template(name: str) -> PromptTemplate:
    try:
        return TEMPLATES[name]
    except KeyError:
        raise ValueError(f"unknown prompt_template {name!r}; known: {', '.join(TEMPLATES)}") from None
