"""`rsvlm-edge scene` (a whole georeferenced scene, tiled, merged, written as GeoJSON / GeoTIFF) and
`rsvlm-edge scene-bench` (tiles/s and peak memory on a large synthetic scene)."""

from __future__ import annotations

import json

import click

from rsvlm_edge.cli_options import (
    FiniteFloat,
    UserError,
    default_tokens,
    message,
    prompt_option,
    ray_options,
    ray_settings,
    sampling_config,
    sampling_options,
    threads_option,
)
from rsvlm_edge.config import DEFAULT_SENSORS
from rsvlm_edge.pipeline import BACKENDS
from rsvlm_edge.tasks import TASK_CHOICES, TASK_HELP, TaskError

SCENE_ERRORS = (TaskError, ValueError, OSError, RuntimeError, MemoryError)


def _layouts_help() -> str:
    from rsvlm_edge.scene.source import LAYOUTS

    return ", ".join(f"{name} ({layout.title})" for name, layout in LAYOUTS.items())


@click.command("scene")
@click.argument("model_dir", type=click.Path())
@click.argument("scene", nargs=-1, required=True, type=click.Path())
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Output folder: <stem>.geojson (WGS84), <stem>.crs.geojson, <stem>.tiles.geojson, <stem>.mask.tif, "
                   "<stem>.summary.json and the resume journal.")
@click.option("--task", type=click.Choice(TASK_CHOICES, case_sensitive=False), help="Task tag: "
              + TASK_HELP + ".")
@prompt_option("Instruction text (each task has a default).")
@click.option("--bands", help="Band files to stack, in model order: names (B04,B03,B02; VV,VH), a layout "
              "(s2-l2a, s2-l1c, s2-rgb, s1), or band numbers of one raster (3,2,1).")
@click.option("--pair", is_flag=True, help="The two SCENEs are before and after (implied by --task ccd; with --task seg "
              "the mask is a change mask).")
@click.option("--sensor", type=click.Choice(list(DEFAULT_SENSORS)),
              help="Input sensor (default: from the band layout, else guessed from a sample; always printed).")
@click.option("--tile", help="Tile side: pixels (128) or metres (1280m).  [default: the model's input size]")
@click.option("--overlap", help="Tile overlap: pixels (32), metres (320m) or a fraction of the tile (0.25).  "
              "[default: 0]")
@click.option("--gsd", type=FiniteFloat(min=0.0, min_open=True),
              help="Resample so the model sees this many metres per pixel (default: native resolution).")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True, help="Tiles per batch.")
@click.option("--min-score", type=FiniteFloat(0.0, 1.0), help="Drop objects, tile answers and mask labels scoring "
              "below this (0..1).")
@click.option("--merge", type=click.Choice(["nms", "nmm"]), default="nms", show_default=True,
              help="Objects seen by overlapping tiles: keep the best (nms) or merge them (nmm).")
@click.option("--vectorise", is_flag=True, help="Also write the [SEG] mask as polygons (<stem>.mask.geojson).")
@click.option("--stem", default="scene", show_default=True, help="Output file name stem.")
@click.option("--restart", is_flag=True, help="Ignore the resume journal and answer every tile again.")
@click.option("--max-tiles", type=click.IntRange(min=1), help="Stop after this many tiles (row-major): a preview.")
@click.option("--backend", type=click.Choice(BACKENDS), default="ort", show_default=True)
@threads_option
@click.option("--json", "as_json", is_flag=True, help="Print the run summary as JSON on stdout.")
@sampling_options
@ray_options
def scene_command(model_dir, scene, out_dir, task, prompt, bands, pair, sensor, tile, overlap, gsd, batch_size, min_score,
                  merge, vectorise, stem, restart, max_tiles, backend, threads, as_json, ray_address, actors,
                  threads_per_actor, **sampling_kw) -> None:
    """Answer a whole scene tile by tile and write georeferenced outputs.

    \b
    SCENE is one raster (GeoTIFF, COG, JPEG 2000, PNG...), band files of one scene (or their folder) stacked
    with --bands, or a before/after pair (--pair, implied by --task ccd; each a raster or a band folder), read
    on the extent both cover.
    \b
    Examples:
      rsvlm-edge scene MODEL scene.tif --task det --overlap 0.25 -o out/
      rsvlm-edge scene MODEL S2_granule/ --bands s2-l2a --task seg --tile 1280m -o out/
      rsvlm-edge scene MODEL vv.tif vh.tif --task cls --gsd 20 -o out/
      rsvlm-edge scene MODEL before.tif after.tif --task ccd -o out/
      rsvlm-edge scene MODEL before.tif after.tif --pair --task seg -o out/
      rsvlm-edge scene MODEL scene.tif --task det -o out/ --ray auto --actors 8   # tiles over a Ray cluster

    \b
    The scene is read window by window (never whole). An interrupted run resumes where it stopped when run again
    with the same options (the journal in the output folder); outputs are written only when every tile is in.
    """
    from rsvlm_edge.pipeline import Pipeline
    from rsvlm_edge.scene.runner import SceneOptions, run_scene
    from rsvlm_edge.scene.source import resolve_scene
    from rsvlm_edge.tasks import PAIR_TASKS, make_instruction, split_tag

    cluster = ray_settings(ray_address, actors, threads_per_actor, threads)
    try:
        instruction = make_instruction(task, prompt)
        options = SceneOptions(task=task, prompt=prompt, tile=tile, overlap=overlap, gsd=gsd, batch_size=batch_size,
                               sampling=sampling_config(sampling_kw), default_tokens=default_tokens(sampling_kw),
                               resume=not restart, stem=stem, min_score=min_score, merge=merge, vectorise=vectorise,
                               max_tiles=max_tiles).check()
        pair = pair or split_tag(instruction)[0] in PAIR_TASKS
        spec = resolve_scene(list(scene), bands=bands, pair=pair, sensor=sensor)
        if cluster is not None:  # the same run, its batches on Ray actors (rsvlm_edge.distributed)
            from rsvlm_edge.distributed.scene import run_scene_ray

            run = run_scene_ray(model_dir, spec, out_dir, options, cluster=cluster, backend=backend,
                                log=lambda line: click.echo(line, err=True))
        else:
            with Pipeline(model_dir, backend=backend, threads=threads) as pipe:
                run = run_scene(pipe, spec, out_dir, options, log=lambda line: click.echo(line, err=True))
    except SCENE_ERRORS as exc:
        raise UserError(message(exc)) from None
    summary = run.summary
    if run.ran and not any(r.status == "ok" for r in run.records):
        raise UserError(f"none of the {run.ran} tiles could be answered; first error: "
                        f"{next((r.error for r in run.records if r.error), 'every tile was nodata')}")
    click.echo(f"scene: {len(run.records):,} tile(s): {run.ran:,} answered now in {run.seconds:.1f} s "
               f"({run.tiles_per_second:.2f} tiles/s), {run.resumed:,} resumed, {summary.get('tiles_nodata', 0):,} "
               f"nodata, {summary.get('tiles_failed', 0):,} failed", err=True)
    counts = summary.get("counts") or {}
    if counts:
        click.echo("found: " + ", ".join(f"{label} {n}" for label, n in counts.items()), err=True)
    for kind, path in (summary.get("outputs") or {}).items():
        click.echo(f"  {kind}: {path}", err=True)
    if as_json:
        click.echo(json.dumps(summary))


@click.command("scene-bench")
@click.argument("model_dir", type=click.Path())
@click.option("--size", type=click.IntRange(min=64), default=20000, show_default=True, help="Scene side in pixels.")
@click.option("--bands", "band_count", type=click.IntRange(1, 13), default=3, show_default=True)
@click.option("--tiles", type=click.IntRange(min=0), default=256, show_default=True,
              help="Tiles to answer (row-major from the top; 0 = the whole scene).")
@click.option("--task", type=click.Choice(TASK_CHOICES, case_sensitive=False), default="cls", show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--scene", "scene_path", type=click.Path(dir_okay=False),
              help="Where the synthetic GeoTIFF goes (kept; reused when it exists with this size). Default: a "
                   "temporary file.")
@threads_option
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def scene_bench_command(model_dir, size, band_count, tiles, task, batch_size, scene_path, threads, as_json) -> None:
    """Tiles/s and peak memory of `scene` on a synthetic SIZE x SIZE uint16 GeoTIFF (written block by block)."""
    from rsvlm_edge.scene.bench import run_bench

    try:
        result = run_bench(model_dir, size=size, bands=band_count, tiles=tiles or None, task=task,
                           batch_size=batch_size, scene_path=scene_path, threads=threads,
                           log=lambda line: click.echo(line, err=True))
    except SCENE_ERRORS as exc:
        raise UserError(message(exc)) from None
    if as_json:
        click.echo(json.dumps(result))
    else:
        click.echo(f"{result['tiles']} tiles of {result['scene']}: {result['tiles_per_s']:.2f} tiles/s, peak RSS "
                   f"{result['peak_rss_mb']:.0f} MB ({result['cpu']}, {result['threads']} thread(s))")


__all__ = ["scene_command", "scene_bench_command"]
