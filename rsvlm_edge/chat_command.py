"""`rsvlm-edge chat`: multi-turn dialogue about a tile, reusing the KV cache while the expert is unchanged.

Lines that start with ``/`` are commands (:data:`COMMANDS`); every other line is a turn. A bad command or a failing
turn prints one error line on stderr and the session goes on, so a typo never costs the conversation. Answers are
printed like ``infer``'s: streamed text (with the parsed structure under it), or one JSON object per answer with
``--json`` (then everything else goes to stderr and stdout stays JSON lines).
"""

from __future__ import annotations

import json
import shlex
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import click

from rsvlm_edge.cli_options import UserError, default_tokens, message, sampling_config, sampling_options, threads_line, threads_option
from rsvlm_edge.config import DEFAULT_SENSORS, EXPERT_NAMES
from rsvlm_edge.pipeline import BACKENDS
from rsvlm_edge.tasks import TAGS, TaskError, check_image_count, normalize_tag, split_tag
from rsvlm_edge.validate import utf8_problem

if TYPE_CHECKING:
    from rsvlm_edge.generation import ChatSession
    from rsvlm_edge.infer_command import MaskNames
    from rsvlm_edge.inputs import Tile
    from rsvlm_edge.pipeline import Pipeline
    from rsvlm_edge.sampling import SamplingConfig

TASK_NAMES = [t.strip("[]").lower() for t in TAGS]


class CommandError(ValueError):
    """A command line the chat cannot follow (unknown command, bad argument): reported, and the chat goes on."""


@dataclass
class Chat:
    """One chat's state: the pipeline, the tile being talked about, its session, the task tag that prefixes
    untagged questions, and how answers are shown."""

    pipe: Pipeline
    sampling: SamplingConfig
    sensor: str | None
    as_json: bool = False
    verbose: bool = False
    masks: MaskNames | None = None  # None without --mask-dir
    task: str | None = None  # "[CLS]" ...
    default_tokens: bool = False  # no --max-new-tokens: each turn gets its task's answer length
    tile: Tile | None = None  # set by open_images before the first line is read
    session: ChatSession | None = None
    done: bool = False

    # ------------------------------------------------------------------ images and turns
    def open_images(self, paths: list[str]) -> None:
        """Read the tile(s) and start a fresh session on them; on an error the current tile and session stay."""
        from rsvlm_edge.generation import ChatSession

        if len(paths) not in (1, 2):
            raise CommandError(f"a chat is about one image (or a before/after pair), got {len(paths)}")
        tile = self.pipe.tile(paths, self.sensor)
        self.tile, self.session = tile, ChatSession(self.pipe.generator, tile.pixels, tile.sensor)

    def instruction(self, text: str) -> str:
        """The turn's text with the /task tag in front, unless the line brings its own tag."""
        if self.task is None or split_tag(text)[0] is not None:
            return text
        return f"{self.task} {text}"

    def turn_sampling(self, instruction: str, tag: str | None) -> SamplingConfig:
        """The turn's sampling: with ``default_tokens``, its task's answer length within the context the whole
        conversation so far leaves (the turn may re-prefill it all)."""
        if not self.default_tokens:
            return self.sampling
        from rsvlm_edge.generation import Request

        assert self.tile is not None and self.session is not None
        request = Request(pixels=self.tile.pixels, sensor=self.tile.sensor, prompt=instruction,
                          history=list(self.session.turns))
        return self.pipe.task_sampling(self.sampling, tag, [request])

    def ask(self, text: str) -> None:
        from rsvlm_edge.formats import parse_answer
        from rsvlm_edge.infer_command import describe, save_mask
        from rsvlm_edge.pipeline import Result, _tag_for_expert_guess

        assert self.tile is not None and self.session is not None
        instruction = self.instruction(text)
        tag = split_tag(instruction)[0]
        check_image_count(tag, len(self.tile.pixels))
        streaming = not self.as_json
        if streaming:
            click.echo("model> ", nl=False)
        on_token = (lambda _i, piece: click.echo(piece, nl=False)) if streaming else None
        try:
            gen = self.session.ask(instruction, self.turn_sampling(instruction, tag), on_token=on_token)
        finally:
            if streaming:
                click.echo()
        result = Result(self.tile, instruction, gen, parse_answer(tag or _tag_for_expert_guess(gen), gen.text))
        save_mask(result, self.masks)
        if self.as_json:
            click.echo(json.dumps(result.to_dict()))
            return
        extra = describe(result, self.verbose)
        if extra:
            click.echo(extra)
        if self.verbose:
            c = self.session.counters
            click.echo(f"  [expert {EXPERT_NAMES[gen.routing.expert]} ({gen.routing.source}); reused "
                       f"{c['reused_tokens']} cached tokens so far, {c['reprefills']} re-prefills]")

    # ------------------------------------------------------------------ commands
    def command(self, line: str) -> None:
        try:
            name, *args = shlex.split(line)
        except ValueError as exc:  # an unclosed quote
            raise CommandError(f"cannot read that command: {exc}") from None
        entry = COMMANDS.get(name.lower())
        if entry is None:
            raise CommandError(f"unknown command {name}; type /help for the list")
        entry.run(self, args)

    def note(self, text: str) -> None:
        """A message about the session (not an answer): stderr under --json, so stdout stays JSON lines."""
        click.echo(text, err=self.as_json)


@dataclass(frozen=True)
class Command:
    usage: str
    help: str
    run: Callable[[Chat, list[str]], None]


def _help(chat: Chat, args: list[str]) -> None:
    lines = ["Commands:"] + [f"  {c.usage:<22} {c.help}" for c in COMMANDS.values()]
    lines.append("Any other line is a question; start it with a tag ([CAP], [VG], [SEG] ...) or let /task or the "
                 "router choose the expert.")
    chat.note("\n".join(lines))


def _image(chat: Chat, args: list[str]) -> None:
    if not args:
        raise CommandError("/image needs a path: /image PATH (or /image BEFORE AFTER)")
    chat.open_images(args)
    chat.note(f"(now talking about {' + '.join(args)}; conversation cleared)")


def _task(chat: Chat, args: list[str]) -> None:
    if len(args) != 1:
        raise CommandError(f"/task takes one name: {', '.join(TASK_NAMES)}, or none")
    if args[0].lower() == "none":
        chat.task = None
        chat.note("(no task: each question's own tag, or the router, picks the expert)")
        return
    try:
        chat.task = normalize_tag(args[0])
    except TaskError as exc:
        raise CommandError(f"/task: {exc}") from None
    chat.note(f"(questions without a tag now start with {chat.task})")


def _reset(chat: Chat, args: list[str]) -> None:
    assert chat.tile is not None
    chat.open_images(chat.tile.paths)
    chat.note("(conversation cleared)")


def _quit(chat: Chat, args: list[str]) -> None:
    chat.done = True


COMMANDS: dict[str, Command] = {
    "/help": Command("/help", "show this list", _help),
    "/image": Command("/image PATH [PATH2]", "talk about another image (or pair); clears the conversation", _image),
    "/task": Command("/task NAME|none", f"tag questions that have none ({', '.join(TASK_NAMES)})", _task),
    "/reset": Command("/reset", "forget the conversation, keep the image", _reset),
    "/quit": Command("/quit", "leave (so does end of input)", _quit),
}


@click.command("chat")
@click.argument("model_dir", type=click.Path())
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--task", type=click.Choice(TASK_NAMES, case_sensitive=False),
              help="Tag for questions that have none (as /task NAME).")
@click.option("--sensor", type=click.Choice(list(DEFAULT_SENSORS)), help="Input sensor (default: guessed).")
@click.option("--backend", type=click.Choice(BACKENDS), default="ort", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print each answer as one JSON object (as infer --json).")
@click.option("--mask-dir", type=click.Path(file_okay=False),
              help="Write [SEG] answers' masks as PNGs here (IMAGE_mask.png and the class-indexed "
                   "IMAGE_mask_classes.png, then IMAGE_mask-2.png ...).")
@click.option("--expert-budget", type=str, help="Expert cache budget, e.g. 1 (experts) or 300MB (ort backend).")
@threads_option
@click.option("-v", "--verbose", is_flag=True, help="Show threads, the expert per turn and how many cached tokens "
              "were reused.")
@sampling_options
def chat_command(model_dir, images, task, sensor, backend, as_json, mask_dir, expert_budget, threads, verbose,
                 **sampling_kw) -> None:
    """Talk about a tile. Each line you type is a turn; start it with a tag ([VG], [SEG], ...), set one with
    /task, or let the router choose. /help lists the commands (/image, /task, /reset, /quit).

    \b
    Example:
      rsvlm-edge chat MODEL tile.png
      you> [CAP] Describe the image.
      you> How many ships are there?
      you> /image other.png
      you> /task seg
      you> the buildings
    """
    from rsvlm_edge.infer_command import MaskNames, parse_budget
    from rsvlm_edge.pipeline import Pipeline

    if len(images) > 2:
        raise click.UsageError("chat takes one image (or a before/after pair)")
    sampling = sampling_config(sampling_kw)
    try:
        options = parse_budget(expert_budget)
    except ValueError as exc:
        raise UserError(message(exc)) from None
    if threads:
        options["threads"] = threads
    try:
        pipe = Pipeline(model_dir, backend=backend, **options)
    except (ValueError, OSError, RuntimeError, MemoryError) as exc:
        raise UserError(message(exc)) from None
    with pipe:
        if verbose and (line := threads_line(pipe, threads)):
            click.echo(line, err=True)
        masks = MaskNames(mask_dir, Path(images[0]).parent) if mask_dir else None
        chat = Chat(pipe, sampling, sensor, as_json=as_json, verbose=verbose, masks=masks,
                    task=normalize_tag(task) if task else None, default_tokens=default_tokens(sampling_kw))
        try:
            chat.open_images(list(images))
        except (ValueError, OSError, RuntimeError, MemoryError) as exc:
            raise UserError(message(exc)) from None
        _loop(chat)


def _loop(chat: Chat) -> None:
    interactive = sys.stdin.isatty()
    while not chat.done:
        if interactive:
            click.echo("you> ", nl=False)
        line = _read_line(sys.stdin)
        if line is None:
            break
        text = line.strip()
        problem = utf8_problem(text)
        if problem:
            click.echo(f"error: that line is {problem}; type it again", err=True)
            continue
        if not text:
            continue
        try:
            chat.command(text) if text.startswith("/") else chat.ask(text)
        except (ValueError, OSError, RuntimeError, MemoryError) as exc:  # this line failed; the chat goes on
            click.echo(f"error: {message(exc)}", err=True)


def _read_line(stream) -> str | None:
    """The next line of input, None at its end. Bytes that are not UTF-8 come back as lone surrogates (to be
    refused by the caller) rather than a decode error that would end the session."""
    raw = getattr(stream, "buffer", None)
    if raw is None:
        line = stream.readline()
        return line or None
    data = raw.readline()
    return data.decode("utf-8", "surrogateescape") if data else None
