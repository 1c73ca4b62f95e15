"""High-level inference: images in, parsed answers out. The CLI and the Python API both go through here.

A :class:`Pipeline` opens a model directory once and answers requests: one image (a path, a PIL image or a numpy
array ``H x W x C`` of any band count and dtype), a ``(before, after)`` tuple, or a list of either (a batch, run
through the engines ``batch_size`` requests at a time). Each answer is a :class:`~rsvlm_edge.results.Result`.

>>> import numpy as np
>>> from rsvlm_edge import Pipeline
>>> rng = np.random.default_rng(0)
>>> tile = rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)       # an 8-bit RGB tile, channels last
>>> with Pipeline("models/tiny-demo", threads=1) as pipe:
...     r = pipe(tile, task="cls", max_new_tokens=8)
...     batch = pipe([tile, tile[:, :, 0]], task="cap", max_new_tokens=4)   # a list: a batch of two requests
...     pair = pipe((tile, tile), task="ccd", max_new_tokens=4)             # a tuple: one before/after request
...     ms = pipe(rng.integers(0, 10000, (64, 64, 12), dtype=np.uint16), task="cls", max_new_tokens=4)
...     routed = pipe(tile, prompt="Is there a ship?", max_new_tokens=4)   # no task: the router picks the expert
>>> type(r).__name__, r.task, r.expert, r.expert_source, r.images
('Result', '[CLS]', 'image', 'tag', ['<array 0>'])
>>> sorted(r.to_dict())[:3]
['expert', 'expert_source', 'finish_reason']
>>> [(b.images, b.sensor) for b in batch]                           # a 1-band array is guessed infrared
[(['<array 0>'], 'rgb'), (['<array 1>'], 'ir')]
>>> pair.images, ms.sensor, routed.expert_source
(['<array 0>', '<array 1>'], 'ms', 'router')

Files and PIL images work the same way; a PIL image is converted by its mode as a file of that mode would be read
(``I;16`` stays 16-bit, alpha is dropped):

>>> from PIL import Image
>>> with Pipeline("models/tiny-demo", threads=1) as pipe:
...     r = pipe(Image.fromarray(tile).convert("RGBA"), task="seg", max_new_tokens=4)
>>> r.images, r.sensor, r.task
(['<PIL 0>'], 'rgb', '[SEG]')
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Sequence, overload

from rsvlm_edge import formats
from rsvlm_edge.backends.base import Backend, BackendError
from rsvlm_edge.config import PRESETS
from rsvlm_edge.generation import Generation, Generator, Request, TokenCallback
from rsvlm_edge.inputs import ImageInput, RequestInput, Tile, image_names, load, prepare_tile, read_tile, split_requests
from rsvlm_edge.results import InferenceResult, Result, save_mask_png
from rsvlm_edge.sampling import GenerationDefaults, SamplingConfig
from rsvlm_edge.tasks import PAIR_TASKS, TaskError, check_image_count, make_instruction, max_new_tokens_for, split_tag
from rsvlm_edge.templates import get_template
from rsvlm_edge.tokenizer import Tokenizer
from rsvlm_edge.validate import cap_threads, require_text

BACKENDS = ("ort", "torch", "trt")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")


def load_backend(model_dir: str | Path, backend: str = "ort", **options: Any) -> Backend:
    """Open ``model_dir`` with the named backend; errors say what the directory lacks."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise BackendError(f"model directory not found: {model_dir}")
    if backend == "torch":
        from rsvlm_edge.backends.torch_backend import TorchBackend

        return TorchBackend.from_dir(model_dir, threads=options.get("threads"))
    if backend == "ort":
        from rsvlm_edge.backends.ort_backend import OrtBackend  # type: ignore[import-not-found]

        return OrtBackend.from_dir(model_dir, **options)
    if backend == "trt":
        from rsvlm_edge.backends.trt_backend import TrtBackend  # type: ignore[import-not-found]

        return TrtBackend.from_dir(model_dir, **options)
    raise BackendError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")


def load_tokenizer(model_dir: str | Path, template: str = "rsvlm") -> Tokenizer:
    """``<model_dir>/tokenizer.json``, checked for the control tokens of the prompt template the model uses
    (``config.prompt_template``)."""
    return Tokenizer.load(Path(model_dir) / "tokenizer.json", get_template(template).control)


def list_images(folder: str | Path) -> list[Path]:
    files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {folder}")
    return files


class Pipeline:
    """Model dir + backend + tokenizer, ready to answer images.

    ``backend``: ``ort`` (ONNX Runtime engine dir), ``trt`` (TensorRT engine dir) or ``torch`` (a checkpoint dir;
    needs PyTorch). ``threads``: CPU threads; None = auto on the ort backend (one for a small decoder, all free
    cores for a large one: :func:`rsvlm_edge.threads.default_threads`), PyTorch's default on the torch backend.
    Other ``options`` go to the backend (``expert_budget_experts``, ``expert_budget_bytes``, ``verify`` ...).

    Use it as a context manager (``with Pipeline(dir) as pipe:``) or call :meth:`close`; a closed pipeline
    refuses further calls.

    Threads may share one pipeline: calls (``pipe(...)``, :meth:`run`, chat turns) are safe from any thread and
    give the answers they give alone. They take turns on the backend (its ``lock``, held for a whole request
    batch), each using all the backend's threads; an expert is never evicted while a decoder step runs on it,
    so a one-expert budget holds under threads too. For requests that run in parallel, open one pipeline per
    worker (each loads its own sessions) or batch the tiles into one call. :meth:`close` waits for the request
    in flight on the ort and trt backends.
    """

    def __init__(self, model_dir: str | Path, backend: str = "ort", threads: int | None = None, **options: Any):
        if not isinstance(model_dir, (str, os.PathLike)):
            raise TypeError(f"Pipeline(model_dir): give the model directory as a path, got {type(model_dir).__name__} "
                            f"(images go to the call: pipe('tile.png', task='cap'))")
        threads = cap_threads(threads)
        if threads is not None:
            options["threads"] = threads
        self.model_dir = Path(model_dir)
        self.backend = load_backend(model_dir, backend, **options)
        self._closed = False
        try:
            self.config = self.backend.config
            check_context(self.config, self.model_dir)
            self.tokenizer = load_tokenizer(model_dir, self.config.prompt_template)
            self.generator = Generator(self.backend, self.tokenizer, GenerationDefaults.load(model_dir))
        except BaseException:
            self.close()
            raise

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("pipeline is closed; create a new Pipeline to run more requests")

    @overload
    def __call__(self, images: list[RequestInput], task: str | None = None, prompt: str | None = None,
                 sensor: str | None = None, sampling: SamplingConfig | None = None, batch_size: int = 4,
                 **sampling_options: Any) -> list[Result]: ...

    @overload
    def __call__(self, images: RequestInput, task: str | None = None, prompt: str | None = None,
                 sensor: str | None = None, sampling: SamplingConfig | None = None, batch_size: int = 4,
                 **sampling_options: Any) -> Result: ...

    def __call__(self, images: Any, task: str | None = None, prompt: str | None = None, sensor: str | None = None,
                 sampling: SamplingConfig | None = None, batch_size: int = 4,
                 **sampling_options: Any) -> Result | list[Result]:
        """Answer ``images``: one image (path, PIL image, numpy array), a ``(before, after)`` tuple, or a list of
        those (a batch: a list of results, in order).

        ``task``: ``cap``, ``vqa``, ``cls``, ``vg``, ``ref``, ``seg``, ``ccd``, ``det``, ``obb`` (or ``[CAP]`` ...);
        ``prompt``: the instruction (each task has a default one). With no task, the router (or the model's tag
        rule) picks the expert. ``sensor``: ``rgb``, ``sar``, ``ir`` or ``ms``, for every image of the call;
        None guesses it per request from its first image's bands and dtype. ``sampling`` (a
        :class:`~rsvlm_edge.sampling.SamplingConfig`) and keyword overrides of its fields (``max_new_tokens=8``,
        ``temperature=0.7`` ...) set the decoding; the default is greedy and grammar-constrained (``constrain=False``
        turns it off), with the task's answer length (:data:`rsvlm_edge.tasks.TASK_MAX_NEW_TOKENS`) unless
        ``sampling`` or ``max_new_tokens=`` is given."""
        self._check_open()
        batched, requests = split_requests(images)
        if prompt is not None:
            require_text(prompt, "prompt")
        instruction = make_instruction(task, prompt)
        default_tokens = sampling is None and "max_new_tokens" not in sampling_options
        if sampling is None:  # tagged answers follow their grammar unless told otherwise, as on the command line
            sampling_options.setdefault("constrain", True)
        sampling = _sampling(sampling, sampling_options)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a whole number >= 1, got {batch_size!r}")
        _check_counts(split_tag(instruction)[0], requests, batched)
        names = image_names(requests)
        results: list[Result] = []
        for start in range(0, len(requests), batch_size):
            tiles = [self.prepare(request, row, sensor) for request, row in
                     zip(requests[start:start + batch_size], names[start:start + batch_size])]
            results += self.run(tiles, instruction, sampling, default_tokens=default_tokens)
        return results if batched else results[0]

    def prepare(self, images: Sequence[ImageInput], names: Sequence[str], sensor: str | None = None) -> Tile:
        """One request's images (paths, PIL images, arrays), read and prepared for this model; ``names`` name
        them in errors and results."""
        self._check_open()
        return prepare_tile([load(image, name) for image, name in zip(images, names)], sensor,
                            self.config.image_size, self.config.sensors, self.config.image_preprocess)

    def tile(self, paths: Sequence[str | Path] | str | Path, sensor: str | None = None) -> Tile:
        """One request's image files (one path, or a list of one or two), read and prepared."""
        self._check_open()
        return read_tile(image_list(paths), sensor, self.config.image_size, self.config.sensors,
                         self.config.image_preprocess)

    def run(self, tiles: list[Tile], instruction: str, sampling: SamplingConfig | None = None,
            on_token: TokenCallback | None = None, history=None, default_tokens: bool | None = None) -> list[Result]:
        """Answer prepared tiles with one instruction, as one batch through the engines.

        ``default_tokens`` (default: when ``sampling`` is None) gives the answers their task's length
        (:data:`rsvlm_edge.tasks.TASK_MAX_NEW_TOKENS`: a [SEG] mask or a dense [DET] list needs far more than a
        [CLS] label), capped at the context the longest prompt leaves, in place of ``sampling.max_new_tokens``."""
        self._check_open()
        require_text(instruction, "the prompt")
        tag, _ = split_tag(instruction)
        for tile in tiles:
            check_image_count(tag, len(tile.pixels))
        requests = [Request(pixels=t.pixels, sensor=t.sensor, prompt=instruction, history=list(history or []))
                    for t in tiles]
        if default_tokens or (default_tokens is None and sampling is None):
            sampling = self.task_sampling(sampling, tag, requests)
        gens = self.generator.generate(requests, sampling, on_token=on_token)
        results = []
        for tile, gen in zip(tiles, gens):
            answer_tag = tag or _tag_for_expert_guess(gen)
            results.append(Result(tile, instruction, gen, formats.parse_answer(answer_tag, gen.text)))
        return results

    def task_sampling(self, sampling: SamplingConfig | None, tag: str | None,
                      requests: list[Request]) -> SamplingConfig:
        """``sampling`` (default greedy) with the task's answer length, within the room the longest of
        ``requests``' prompts leaves in the model's context."""
        room = self.config.max_position_embeddings - max(len(self.generator.prompt_ids(r)) for r in requests)
        return dataclasses.replace(sampling or SamplingConfig(), max_new_tokens=max_new_tokens_for(tag, room))

    def close(self) -> None:
        """Free the backend's sessions and memory maps; calling it again does nothing."""
        if self._closed:
            return
        self._closed = True
        self.backend.close()

    def __enter__(self) -> "Pipeline":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _sampling(sampling: SamplingConfig | None, overrides: dict[str, Any]) -> SamplingConfig | None:
    """``sampling`` with keyword overrides of its fields; unknown names fail as Python's own keywords do."""
    if sampling is not None and not isinstance(sampling, SamplingConfig):
        raise TypeError(f"sampling: give a SamplingConfig, got {type(sampling).__name__}")
    if not overrides:
        return sampling
    fields = {f.name for f in dataclasses.fields(SamplingConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise TypeError(f"Pipeline call got unexpected keyword argument(s) {', '.join(unknown)}; sampling options "
                        f"are {', '.join(sorted(fields))}")
    return dataclasses.replace(sampling or SamplingConfig(), **overrides).validate()


def _check_counts(tag: str | None, requests: list[list[Any]], batched: bool) -> None:
    """Each request's image count fits the task, before any image is read."""
    for i, request in enumerate(requests):
        try:
            check_image_count(tag, len(request))
        except TaskError as exc:
            where = f"images[{i}]: " if batched else ""
            hint = ""
            if tag in PAIR_TASKS and len(request) == 1:
                hint = ("; a list is a batch of separate requests, give a pair as a tuple (before, after)" if batched
                        else "; give a pair as a tuple (before, after)")
            raise TaskError(f"{where}{exc}{hint}") from None


def image_list(images: Sequence[str | Path] | str | Path) -> list[str | Path]:
    """One path (str or PathLike) is one image, never a sequence of letters; a list must name at least one."""
    if isinstance(images, (str, os.PathLike)):
        return [images]  # type: ignore[list-item]
    if not isinstance(images, (list, tuple)):
        raise TypeError(f"images: give a path or a list of paths, got {type(images).__name__}")
    if not images:
        raise ValueError("no images given: pass a path, or a list of 1 path (2 for a before/after pair)")
    bad = [p for p in images if not isinstance(p, (str, os.PathLike))]
    if bad:
        raise TypeError(f"images: each must be a path, got {type(bad[0]).__name__} {bad[0]!r}")
    return list(images)


def check_context(config, model_dir: Path) -> None:
    """The context length (``max_position_embeddings``) must not exceed the one the model's preset was trained for:
    positions past it were never seen in training (rotary angles the attention never learned), and the KV cache a
    chat session reserves is sized by it."""
    trained = PRESETS[config.name]().max_position_embeddings if config.name in PRESETS else None
    if trained is not None and config.max_position_embeddings > trained:
        raise BackendError(f"{model_dir}: max_position_embeddings {config.max_position_embeddings} is above the "
                           f"{trained} positions the {config.name} model was trained for; set it to at most {trained} "
                           f"(config.json, and manifest.json's model_config in an engine dir)")


def _tag_for_expert_guess(gen: Generation) -> str:
    """Untagged prompts: parse the answer by the shape of the text (mask rows, boxes) since no tag says which."""
    text = gen.text
    if "*" in text and "\n" in text:
        return "[SEG]"
    if text.lstrip().startswith("["):
        return "[VG]"
    return "[CAP]"


__all__ = ["Pipeline", "Result", "InferenceResult", "Tile", "load_backend", "load_tokenizer", "read_tile",
           "list_images", "save_mask_png", "BACKENDS", "IMAGE_SUFFIXES"]
