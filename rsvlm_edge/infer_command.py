"""What `rsvlm-edge infer` does: resolve inputs, run the pipeline, print text or JSON lines, save masks.

A folder run answers every tile it can: a tile that cannot be read or answered gets an error record in place of
its answer (``{"images": [...], "error": "..."}`` with ``--json``; ``== path`` then ``  error: ...`` in text, both
on stdout in input order), and a summary goes to stderr.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import click
from tqdm import tqdm

from rsvlm_edge.cli_options import UserError, message, threads_line
from rsvlm_edge.distributed.settings import RaySettings
from rsvlm_edge.pipeline import InferenceResult, Pipeline, Tile, list_images, save_mask_png
from rsvlm_edge.results import save_class_mask_png
from rsvlm_edge.sampling import SamplingConfig
from rsvlm_edge.scene.source import polarisations
from rsvlm_edge.tasks import check_image_count, split_tag


def parse_budget(text: str | None) -> dict:
    """``--expert-budget``: a number of experts (``1``) or a byte size (``300MB``, ``1.5GB``), positive and finite."""
    if text is None:
        return {}
    t = text.strip().upper()
    units = {"KB": 1e3, "MB": 1e6, "GB": 1e9, "B": 1}
    for unit, scale in units.items():
        if t.endswith(unit):
            try:
                size = float(t[: -len(unit)]) * scale
            except ValueError:
                break
            if not math.isfinite(size) or size < 1:
                raise ValueError(f"--expert-budget {text!r}: a size must be positive and finite (e.g. 300MB)")
            return {"expert_budget_bytes": int(size)}
    if t.isdigit() and int(t) >= 1:
        return {"expert_budget_experts": int(t)}
    raise ValueError(f"--expert-budget {text!r}: give a number of experts (e.g. 1) or a size (e.g. 300MB)")


def describe(result: InferenceResult, verbose: bool) -> str:
    """The parsed structure of an answer (boxes, labels, mask file) and, with ``verbose``, routing and timings, as
    indented lines under its text; used by ``infer`` and ``chat``."""
    lines = []
    parsed = result.parsed
    if parsed.error:
        lines.append(f"  (answer does not parse as {parsed.task}: {parsed.error})")
    d = result.to_dict()
    for det in d.get("detections", []):
        lines.append(f"  {det['label']}: box_px={[round(v, 1) for v in det['box_px']]}")
    for det in d.get("oriented_detections", []):
        lines.append(f"  {det['label']}: obb_px={[round(v, 1) for v in det['obb_px']]}")
    for box in d.get("boxes_px", []):
        lines.append(f"  box_px={[round(v, 1) for v in box]}")
    if "labels" in d:
        lines.append(f"  labels: {', '.join(d['labels']) or '(none)'}")
    if "mask_labels" in d:
        lines.append(f"  mask labels: {', '.join(d['mask_labels']) or '(background only)'}")
    if "mask_png" in d:
        lines.append(f"  mask written to {d['mask_png']}")
    if "mask_class_png" in d:
        lines.append(f"  class mask written to {d['mask_class_png']} (values: "
                     f"{', '.join(f'{i} {name}' for i, name in enumerate(d['mask_classes']))})")
    if d.get("partial"):
        cut = " (cut by --max-new-tokens)" if d["finish_reason"] == "length" else ""
        lines.append(f"  partial answer{cut}: {d.get('dropped', 0)} malformed item(s) left out")
    if verbose:
        reason = result.tile.sensor_reason
        lines.append(f"  sensor: {result.sensor}" + (f" ({reason}; --sensor to override)" if reason.startswith("guessed")
                                                    else f" ({reason})" if reason else ""))
        routing = result.generation.routing
        probs = f" probs={d['router_probs']}" if "router_probs" in d else ""
        lines.append(f"  expert: {result.expert_name} (from {routing.source}){probs}")
        if "pointer" in d:
            lines.append(f"  box from the box pointer: patch {d['pointer']['patch']}, "
                         f"probability {d['pointer']['probability']:.3f}")
        t = d["timings_ms"]  # a chat turn that reuses the cache has no vision step
        vision = f"vision {t['vision_ms']:.1f} ms, " if "vision_ms" in t else ""
        steps = t.get("decode_steps", 0.0)
        rate = t.get("decode_tok_s", steps / (t["decode_ms"] / 1e3) if steps and t.get("decode_ms") else 0.0)
        lines.append(f"  {vision}first token {t['ttft_ms']:.1f} ms, decode {rate:.1f} tok/s, "
                     f"{d['generated_tokens']} tokens ({d['finish_reason']})")
    return "\n".join(lines)


# Errors that belong to one request (its file, its pixels, its generation): in a folder run the other tiles go on.
REQUEST_ERRORS = (ValueError, OSError, RuntimeError, MemoryError)


@dataclass
class Inputs:
    """What IMAGES named: the requests (1 image or a before/after pair each) and the folder their names are relative to."""

    groups: list[list[str]]
    root: Path
    folder: bool  # many requests: per-tile error records, a progress bar and a summary


@dataclass
class Output:
    as_json: bool = False
    mask_dir: str | None = None
    stream: bool = True
    verbose: bool = False


@dataclass
class TileFailure:
    """A request that got no answer: its images and why, in one line."""

    paths: list[str]
    error: str

    def to_dict(self) -> dict:
        return {"images": self.paths, "error": self.error}

    def line(self) -> str:
        """The error with the file named, for a one-line message."""
        named = " + ".join(self.paths)
        return self.error if any(p in self.error for p in self.paths) else f"{named}: {self.error}"


Outcome = InferenceResult | TileFailure


class MaskNames:
    """``<mask-dir>/<image path relative to the input folder>_mask.png`` (binary) and ``..._mask_classes.png``
    (class-indexed): tiles that share a stem in different folders or with different suffixes (a/x.jpg, a/x.png,
    b/x.jpg) get different files, and no file is written twice in one run (names are compared case-folded, as a
    case-insensitive mask dir would; both names of a tile are reserved together)."""

    def __init__(self, mask_dir: str | Path, root: Path):
        self.mask_dir, self.root = Path(mask_dir), root
        self.used: set[str] = set()

    @staticmethod
    def class_path(mask_path: Path) -> Path:
        """The class-indexed PNG beside a binary mask: ``x_mask.png`` -> ``x_mask_classes.png``."""
        return mask_path.with_name(f"{mask_path.stem}_classes.png")

    def __call__(self, image: str) -> Path:
        try:
            rel = Path(image).relative_to(self.root)
        except ValueError:  # an image from elsewhere (chat's /image): its file name
            rel = Path(Path(image).name)
        path, n = self.mask_dir / rel.parent / f"{rel.name}_mask.png", 1
        while {str(path).casefold(), str(self.class_path(path)).casefold()} & self.used:
            n += 1
            path = self.mask_dir / rel.parent / f"{rel.name}_mask-{n}.png"
        self.used |= {str(path).casefold(), str(self.class_path(path)).casefold()}
        return path


def run_infer(*, model_dir: str, inputs: Inputs, instruction: str, sensor: str | None, backend: str,
              options: dict, batch_size: int, sampling: SamplingConfig, output: Output,
              fail_fast: bool = False, default_tokens: bool = False, cluster: RaySettings | None = None) -> None:
    """Answer every request of ``inputs``. A folder run gives each tile an answer or an error record and exits
    non-zero only when nothing was answered (or at the first failure with ``fail_fast``); one image or pair fails
    the run on its error. ``default_tokens``: --max-new-tokens was not given, each answer gets its task's length.
    ``cluster``: answer the batches on a Ray actor pool instead (:mod:`rsvlm_edge.distributed.infer`)."""
    if cluster is not None:
        from rsvlm_edge.distributed.infer import run_infer_ray

        return run_infer_ray(model_dir=model_dir, inputs=inputs, instruction=instruction, sensor=sensor,
                             backend=backend, options=options, batch_size=batch_size, sampling=sampling,
                             output=output, cluster=cluster, fail_fast=fail_fast, default_tokens=default_tokens)
    check_image_count(split_tag(instruction)[0], len(inputs.groups[0]))  # before the model loads
    stop_on_error = fail_fast or not inputs.folder
    with Pipeline(model_dir, backend=backend, **options) as pipe:
        if output.verbose:
            line = threads_line(pipe, options.get("threads"))
            if line:
                click.echo(line, err=True)
        context = pipe.config.max_position_embeddings
        if not default_tokens and sampling.max_new_tokens >= context:
            raise UserError(f"--max-new-tokens {sampling.max_new_tokens} leaves no room for the prompt in the "
                            f"model's context of {context} tokens")
        show_stream = output.stream and not inputs.folder and not output.as_json
        on_token = (lambda _i, piece: click.echo(piece, nl=False)) if show_stream else None
        masks = MaskNames(output.mask_dir, inputs.root) if output.mask_dir else None
        counts = {"answered": 0, "failed": 0}
        t0 = time.perf_counter()
        with tqdm(total=len(inputs.groups), desc="infer", unit="tile", file=sys.stderr, dynamic_ncols=True,
                  disable=None if inputs.folder else True) as bar:  # None: only on a terminal
            for start in range(0, len(inputs.groups), batch_size):
                chunk = inputs.groups[start:start + batch_size]
                outcomes = answer_batch(pipe, chunk, sensor, instruction, sampling, on_token, default_tokens)
                with tqdm.external_write_mode(file=sys.stdout):
                    for outcome in outcomes:
                        if isinstance(outcome, TileFailure) and stop_on_error:
                            raise UserError(outcome.line())
                        _report(outcome, output, masks, show_stream, inputs.folder)
                        counts["failed" if isinstance(outcome, TileFailure) else "answered"] += 1
                bar.update(len(chunk))
        if inputs.folder:
            elapsed = time.perf_counter() - t0
            click.echo(f"infer: {counts['answered']} answered, {counts['failed']} failed of {len(inputs.groups)} tiles "
                       f"in {elapsed:.1f} s ({len(inputs.groups) / max(elapsed, 1e-9):.2f} tiles/s)", err=True)
        if output.verbose and not output.as_json:
            stats = pipe.backend.stats()
            if stats:
                click.echo(f"backend {pipe.backend.name}: " + ", ".join(f"{k}={v}" for k, v in stats.items()), err=True)
    if counts["answered"] == 0:
        raise UserError(f"none of the {len(inputs.groups)} tiles could be answered (each has its error above)")


def answer_batch(pipe: Pipeline, chunk: list[list[str]], sensor: str | None, instruction: str,
                 sampling: SamplingConfig, on_token=None, default_tokens: bool = False) -> list[Outcome]:
    """One outcome per request of ``chunk``, in order: a tile that cannot be read, or whose generation fails,
    gets a :class:`TileFailure` and the others are still answered."""
    outcomes: list[Outcome | None] = [None] * len(chunk)
    tiles = {}
    for i, paths in enumerate(chunk):
        try:
            tiles[i] = pipe.tile(paths, sensor)
        except REQUEST_ERRORS as exc:
            outcomes[i] = TileFailure(paths, message(exc))
    for i, outcome in _generate(pipe, tiles, instruction, sampling, on_token, default_tokens).items():
        outcomes[i] = outcome
    return [o for o in outcomes if o is not None]


def _generate(pipe: Pipeline, tiles: dict[int, Tile], instruction: str, sampling: SamplingConfig,
              on_token, default_tokens: bool = False) -> dict[int, Outcome]:
    """Run the tiles as one batch; if the batch fails, run each alone so only the request at fault fails."""
    if not tiles:
        return {}
    try:
        return dict(zip(tiles, pipe.run(list(tiles.values()), instruction, sampling, on_token=on_token,
                                        default_tokens=default_tokens)))
    except REQUEST_ERRORS as exc:
        if len(tiles) == 1:
            (i, tile), = tiles.items()
            return {i: TileFailure(tile.paths, message(exc))}
    out: dict[int, Outcome] = {}
    for i, tile in tiles.items():
        out.update(_generate(pipe, {i: tile}, instruction, sampling, on_token, default_tokens))
    return out


def _report(outcome: Outcome, output: Output, masks: MaskNames | None, streamed: bool, folder: bool) -> None:
    """Print one outcome: a JSON line, or text (``== path`` heads each request of a folder run)."""
    if isinstance(outcome, TileFailure):
        if output.as_json:
            click.echo(json.dumps(outcome.to_dict()))
        else:
            click.echo(f"== {' + '.join(outcome.paths)}\n  error: {outcome.error}")
        return
    result = outcome
    save_mask(result, masks)
    if output.as_json:
        click.echo(json.dumps(result.to_dict()))
        return
    if streamed:
        click.echo()
    else:
        if folder:
            click.echo(f"== {' + '.join(result.tile.paths)}")
        click.echo(result.generation.text)
    extra = describe(result, output.verbose)
    if extra:
        click.echo(extra)


def save_mask(result: InferenceResult, masks: MaskNames | None) -> None:
    """Write a [SEG] answer's masks (input pixel size) under the names ``masks`` gives its first image: the binary
    PNG (255 = any label) and the class-indexed palette PNG; record them as the result's ``mask_png``,
    ``mask_class_png`` and ``mask_classes`` (class name by pixel value). Nothing without a mask dir or a mask."""
    if masks is None or result.parsed.mask is None:
        return
    path = masks(result.tile.paths[0])
    save_mask_png(result.parsed.mask, None, result.tile.sizes[0], path)
    classes = save_class_mask_png(result.parsed.mask, result.tile.sizes[0], MaskNames.class_path(path))
    result.extras.update(mask_png=str(path), mask_class_png=str(MaskNames.class_path(path)), mask_classes=classes)


def resolve_inputs(images: list[str]) -> Inputs:
    """One image, two images (a change pair), or folders of tiles (each tile its own request)."""
    paths = [Path(p) for p in images]
    if not paths:
        raise ValueError("give an image, a before/after pair, or a folder of tiles")
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise FileNotFoundError(f"no such image or folder: {', '.join(missing)}")
    if len(paths) == 1 and paths[0].is_dir():
        return Inputs([[str(p)] for p in list_images(paths[0])], paths[0], folder=True)
    if any(p.is_dir() for p in paths):
        if len(paths) == 2 and all(p.is_dir() for p in paths):
            before, after = list_images(paths[0]), list_images(paths[1])
            by_name = {p.relative_to(paths[1]): p for p in after}
            pairs = [[str(b), str(by_name[b.relative_to(paths[0])])] for b in before
                     if b.relative_to(paths[0]) in by_name]
            if not pairs:
                raise FileNotFoundError(f"no files with matching names in {paths[0]} and {paths[1]}")
            return Inputs(pairs, paths[0], folder=True)
        raise ValueError("give one folder of tiles, two folders of before/after pairs, or 1-2 image files")
    if len(paths) > 2:
        raise ValueError(f"a request takes 1 image (2 for a change pair), got {len(paths)}; pass a folder for many tiles")
    if len(paths) == 2 and polarisations(paths):
        raise ValueError(f"{paths[0].name} and {paths[1].name} look like the VV and VH bands of one SAR scene, not a "
                         f"before/after pair: stack them with `rsvlm-edge scene MODEL {paths[0].name} {paths[1].name}`")
    return Inputs([[str(p) for p in paths]], paths[0].parent, folder=False)


__all__ = ["run_infer", "parse_budget", "resolve_inputs", "answer_batch", "Inputs", "Output", "TileFailure"]
