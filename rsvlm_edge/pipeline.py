"""High-level inference: files in, parsed answers out. The CLI and the Python API both go through here."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from rsvlm_edge import formats
from rsvlm_edge.backends.base import Backend, BackendError
from rsvlm_edge.config import EXPERT_NAMES, PRESETS
from rsvlm_edge.generation import Generation, Generator, Request, TokenCallback
from rsvlm_edge.imageio import read_image_with_meta
from rsvlm_edge.preprocess import guess_sensor, prepare_image
from rsvlm_edge.sampling import GenerationDefaults, SamplingConfig
from rsvlm_edge.tasks import check_image_count, make_instruction, split_tag
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


@dataclass
class Tile:
    """One request's images, read and prepared."""

    paths: list[str]
    sensor: str
    pixels: list[np.ndarray]
    sizes: list[tuple[int, int]]  # (width, height) of each original image


@dataclass
class InferenceResult:
    tile: Tile
    instruction: str
    generation: Generation
    parsed: formats.ParsedAnswer
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def expert_name(self) -> str:
        return EXPERT_NAMES[self.generation.routing.expert]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: boxes in pixels of the (first) input image, masks as file paths when saved."""
        width, height = self.tile.sizes[0]
        parsed = self.parsed
        out: dict[str, Any] = {
            "images": self.tile.paths,
            "sensor": self.tile.sensor,
            "instruction": self.instruction,
            "task": parsed.task,
            "text": self.generation.text,
            "expert": self.expert_name,
            "expert_source": self.generation.routing.source,
            "finish_reason": self.generation.finish_reason,
            "prompt_tokens": self.generation.prompt_tokens,
            "generated_tokens": len(self.generation.token_ids),
            "timings_ms": {k: round(v, 3) for k, v in self.generation.timings.items()},
        }
        if self.generation.routing.probs is not None:
            out["router_probs"] = dict(zip(EXPERT_NAMES, (round(p, 4) for p in self.generation.routing.probs)))
        if self.generation.pointer is not None:  # the box came from the box pointer, not from sampled text
            pointing = self.generation.pointer
            out["pointer"] = {"patch": pointing.patch, "probability": round(pointing.probability, 4)}
        if parsed.error:
            out["parse_error"] = parsed.error
        if parsed.boxes is not None:
            out["boxes_px"] = [list(formats.box_to_pixels(b, width, height)) for b in parsed.boxes]
        if parsed.detections is not None:
            out["detections"] = [{"label": lab, "box_px": list(formats.box_to_pixels(b, width, height))}
                                 for lab, b in parsed.detections]
        if parsed.obbs is not None:
            out["oriented_detections"] = [{"label": lab, "obb_px": list(formats.obb_to_pixels(o, width, height))}
                                          for lab, o in parsed.obbs]
        if parsed.labels is not None:
            out["labels"] = parsed.labels
        if parsed.mask is not None:
            out["mask_labels"] = formats.grid_labels(parsed.mask)
        out.update(self.extras)
        return out


def read_tile(paths: list[str | Path], sensor: str | None, image_size: int, known_sensors: dict[str, int],
              image_preprocess: str = "rsvlm") -> Tile:
    """Read and prepare one request's images; ``image_preprocess`` is the model config's (see preprocess.py)."""
    arrays, sizes, nodatas = [], [], []
    for path in paths:
        array, meta = read_image_with_meta(path)
        arrays.append(array)
        nodatas.append(meta.get("nodata"))
        sizes.append((array.shape[1], array.shape[0]))
    chosen = sensor or guess_sensor(arrays[0], image_preprocess)
    if chosen not in known_sensors:
        raise ValueError(f"sensor {chosen!r} is not one this model has a stem for ({', '.join(known_sensors)})")
    pixels = [prepare_image(a, chosen, image_size, nodata=nd, source=p, mode=image_preprocess)
              for a, nd, p in zip(arrays, nodatas, paths)]
    return Tile(paths=[str(p) for p in paths], sensor=chosen, pixels=pixels, sizes=sizes)


def list_images(folder: str | Path) -> list[Path]:
    files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {folder}")
    return files


def save_mask_png(grid: list[list[str]], label: str | None, size: tuple[int, int], path: str | Path) -> None:
    """Write a parsed 24x24 mask, upsampled to the input's pixel size, as an 8-bit PNG (255 = label / foreground)."""
    from PIL import Image

    from rsvlm_edge.fileio import atomic_path

    labels = formats.grid_labels(grid)
    mask24 = np.zeros((formats.MASK_SIZE, formats.MASK_SIZE), dtype=bool)
    for lab in labels if label is None else [label]:
        mask24 |= formats.grid_to_mask(grid, lab)
    full = formats.upsample_grid_mask(mask24, size[1], size[0])
    with atomic_path(path) as tmp:
        Image.fromarray((full * 255).astype(np.uint8)).save(tmp, format="PNG")


class Pipeline:
    """Model dir + backend + tokenizer, ready to answer tiles.

    Use it as a context manager (``with Pipeline(dir) as pipe:``) or call :meth:`close`; a closed pipeline
    refuses further calls.

    Threads may share one pipeline: calls (``pipe(...)``, :meth:`run`, chat turns) are safe from any thread and
    give the answers they give alone. They take turns on the backend (its ``lock``, held for a whole request
    batch), each using all the backend's threads; an expert is never evicted while a decoder step runs on it,
    so a one-expert budget holds under threads too. For requests that run in parallel, open one pipeline per
    worker (each loads its own sessions) or batch the tiles into one :meth:`run` call. :meth:`close` waits for
    the request in flight on the ort and trt backends.
    """

    def __init__(self, model_dir: str | Path, backend: str = "ort", **options: Any):
        if not isinstance(model_dir, (str, os.PathLike)):
            raise TypeError(f"Pipeline(model_dir): give the model directory as a path, got {type(model_dir).__name__} "
                            f"(images go to the call: pipe('tile.png', task='cap'))")
        if "threads" in options:
            options["threads"] = cap_threads(options["threads"])
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

    def tile(self, paths: Sequence[str | Path] | str | Path, sensor: str | None = None) -> Tile:
        self._check_open()
        return read_tile(image_list(paths), sensor, self.config.image_size, self.config.sensors,
                         self.config.image_preprocess)

    def run(self, tiles: list[Tile], instruction: str, sampling: SamplingConfig | None = None,
            on_token: TokenCallback | None = None, history=None) -> list[InferenceResult]:
        self._check_open()
        require_text(instruction, "the prompt")
        tag, _ = split_tag(instruction)
        for tile in tiles:
            check_image_count(tag, len(tile.pixels))
        requests = [Request(pixels=t.pixels, sensor=t.sensor, prompt=instruction, history=list(history or []))
                    for t in tiles]
        gens = self.generator.generate(requests, sampling, on_token=on_token)
        results = []
        for tile, gen in zip(tiles, gens):
            answer_tag = tag or _tag_for_expert_guess(gen)
            results.append(InferenceResult(tile, instruction, gen, formats.parse_answer(answer_tag, gen.text)))
        return results

    def __call__(self, images: Sequence[str | Path] | str | Path, task: str | None = None, prompt: str | None = None,
                 sensor: str | None = None, sampling: SamplingConfig | None = None) -> InferenceResult:
        """Answer one request: ``images`` is one path, or a list of one path (two for a before/after pair)."""
        self._check_open()
        paths = image_list(images)
        if prompt is not None:
            require_text(prompt, "prompt")
        instruction = make_instruction(task, prompt)
        return self.run([self.tile(paths, sensor)], instruction, sampling)[0]

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
