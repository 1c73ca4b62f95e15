"""What `rsvlm-edge infer` does: resolve inputs, run the pipeline, print text or JSON lines, save masks."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from rsvlm_edge.pipeline import InferenceResult, Pipeline, list_images, save_mask_png
from rsvlm_edge.sampling import SamplingConfig
from rsvlm_edge.tasks import make_instruction


def parse_budget(text: str | None) -> dict:
    """``--expert-budget``: a number of experts (``1``) or a byte size (``300MB``, ``1.5GB``)."""
    if text is None:
        return {}
    t = text.strip().upper()
    units = {"KB": 1e3, "MB": 1e6, "GB": 1e9, "B": 1}
    for unit, scale in units.items():
        if t.endswith(unit):
            try:
                return {"expert_budget_bytes": int(float(t[: -len(unit)]) * scale)}
            except ValueError:
                break
    if t.isdigit() and int(t) >= 1:
        return {"expert_budget_experts": int(t)}
    raise ValueError(f"--expert-budget {text!r}: give a number of experts (e.g. 1) or a size (e.g. 300MB)")


def _describe(result: InferenceResult, verbose: bool) -> str:
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
    if verbose:
        routing = result.generation.routing
        probs = f" probs={d['router_probs']}" if "router_probs" in d else ""
        lines.append(f"  expert: {result.expert_name} (from {routing.source}){probs}")
        if "pointer" in d:
            lines.append(f"  box from the box pointer: patch {d['pointer']['patch']}, "
                         f"probability {d['pointer']['probability']:.3f}")
        t = d["timings_ms"]
        lines.append(f"  vision {t['vision_ms']:.1f} ms, first token {t['ttft_ms']:.1f} ms, "
                     f"decode {t['decode_tok_s']:.1f} tok/s, {d['generated_tokens']} tokens ({d['finish_reason']})")
    return "\n".join(lines)


def run_infer(*, model_dir, images, task, prompt, sensor, backend, batch_size, as_json, mask_dir, stream,
              expert_budget, threads, verbose, sampling: SamplingConfig, pinned: list[int] | None = None) -> None:
    instruction = make_instruction(task, prompt)
    options = parse_budget(expert_budget)
    if pinned:
        if backend != "ort":
            raise ValueError("--pin-expert works with the ort backend (its expert cache)")
        options["pinned_experts"] = tuple(pinned)
    if threads:
        options["threads"] = threads
    pipe = Pipeline(model_dir, backend=backend, **options)
    try:
        groups = _request_groups(images)
        single = len(groups) == 1
        show_stream = stream and single and not as_json
        progress = None
        if not single:
            progress = click.progressbar(length=len(groups), label="tiles", file=sys.stderr)
            progress.__enter__()
        mask_count = 0
        for start in range(0, len(groups), batch_size):
            chunk = groups[start:start + batch_size]
            tiles = [pipe.tile(paths, sensor) for paths in chunk]
            on_token = (lambda _i, piece: click.echo(piece, nl=False)) if show_stream else None
            results = pipe.run(tiles, instruction, sampling, on_token=on_token)
            for result in results:
                if mask_dir and result.parsed.mask is not None:
                    stem = Path(result.tile.paths[0]).stem
                    path = Path(mask_dir) / f"{stem}_mask.png"
                    save_mask_png(result.parsed.mask, None, result.tile.sizes[0], path)
                    result.extras["mask_png"] = str(path)
                    mask_count += 1
                if as_json:
                    click.echo(json.dumps(result.to_dict()))
                else:
                    if show_stream:
                        click.echo()
                    else:
                        header = " + ".join(result.tile.paths) if not single else None
                        if header:
                            click.echo(f"== {header}")
                        click.echo(result.generation.text)
                    extra = _describe(result, verbose)
                    if extra:
                        click.echo(extra)
            if progress is not None:
                progress.update(len(chunk))
        if progress is not None:
            progress.__exit__(None, None, None)
        if verbose and not as_json:
            stats = pipe.backend.stats()
            if stats:
                click.echo(f"backend {pipe.backend.name}: " + ", ".join(f"{k}={v}" for k, v in stats.items()), err=True)
    finally:
        pipe.close()


def _request_groups(images: list[str]) -> list[list[str]]:
    """One image, two images (a change pair), or folders of tiles (each tile its own request)."""
    paths = [Path(p) for p in images]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise FileNotFoundError(f"no such image or folder: {', '.join(missing)}")
    if len(paths) == 1 and paths[0].is_dir():
        return [[str(p)] for p in list_images(paths[0])]
    if any(p.is_dir() for p in paths):
        if len(paths) == 2 and all(p.is_dir() for p in paths):
            before, after = list_images(paths[0]), list_images(paths[1])
            by_name = {p.name: p for p in after}
            pairs = [[str(b), str(by_name[b.name])] for b in before if b.name in by_name]
            if not pairs:
                raise FileNotFoundError(f"no files with matching names in {paths[0]} and {paths[1]}")
            return pairs
        raise ValueError("give one folder of tiles, two folders of before/after pairs, or 1-2 image files")
    if len(paths) > 2:
        raise ValueError(f"a request takes 1 image (2 for a change pair), got {len(paths)}; pass a folder for many tiles")
    return [[str(p) for p in paths]]


__all__ = ["run_infer", "parse_budget"]
