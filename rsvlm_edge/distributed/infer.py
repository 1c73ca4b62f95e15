"""``rsvlm-edge infer ... --ray``: the batches of a folder run answered by a Ray actor pool.

Each batch is answered on an actor by the local code (:func:`rsvlm_edge.infer_command.answer_batch`), and the
driver prints what comes back with the local printer, in input order, so stdout is the local run's, line for line
(timings aside). Masks are written by the driver, under the names the local run gives them. Input images must be
readable at the same paths on every node (one machine, or a shared filesystem); the engine dir need not be.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import click
from tqdm import tqdm

from rsvlm_edge.cli_options import UserError
from rsvlm_edge.config import ModelConfig
from rsvlm_edge.distributed.executor import RayExecutor
from rsvlm_edge.distributed.settings import RaySettings
from rsvlm_edge.infer_command import Inputs, MaskNames, Outcome, Output, TileFailure, _report, answer_batch
from rsvlm_edge.sampling import SamplingConfig
from rsvlm_edge.tasks import check_image_count, split_tag


def infer_batch(pipe: Any, job: tuple[list[list[str]], str | None, str, SamplingConfig, bool]) -> list[Outcome]:
    """The work of one batch on an actor: the local ``answer_batch``, with the preprocessed pixels dropped from
    the results (the driver prints and saves from the answer, and they are most of a result's bytes)."""
    chunk, sensor, instruction, sampling, default_tokens = job
    outcomes = answer_batch(pipe, chunk, sensor, instruction, sampling, None, default_tokens)
    for outcome in outcomes:
        if not isinstance(outcome, TileFailure):
            outcome.tile.pixels = []
    return outcomes


def _check_tokens(model_dir: str, sampling: SamplingConfig, default_tokens: bool) -> None:
    """The local run's --max-new-tokens check, from the engine's config, before any actor starts."""
    from rsvlm_edge.manifest import Manifest

    if not Path(model_dir).is_dir():
        raise FileNotFoundError(f"model directory not found: {model_dir}")
    try:
        config = Manifest.load(model_dir, verify=False).config()
    except ValueError:  # a checkpoint dir: its config.json
        config = ModelConfig.load(f"{model_dir}/config.json")
    context = config.max_position_embeddings
    if not default_tokens and sampling.max_new_tokens >= context:
        raise UserError(f"--max-new-tokens {sampling.max_new_tokens} leaves no room for the prompt in the model's "
                        f"context of {context} tokens")


def run_infer_ray(*, model_dir: str, inputs: Inputs, instruction: str, sensor: str | None, backend: str,
                  options: dict, batch_size: int, sampling: SamplingConfig, output: Output, cluster: RaySettings,
                  fail_fast: bool = False, default_tokens: bool = False) -> None:
    """:func:`rsvlm_edge.infer_command.run_infer` on ``cluster``: same stdout, same exit rules; the progress bar
    counts tiles as any actor finishes them."""
    check_image_count(split_tag(instruction)[0], len(inputs.groups[0]))
    _check_tokens(model_dir, sampling, default_tokens)
    stop_on_error = fail_fast or not inputs.folder
    output.stream = False  # tokens stay on the actors
    masks = MaskNames(output.mask_dir, inputs.root) if output.mask_dir else None
    chunks = [inputs.groups[s:s + batch_size] for s in range(0, len(inputs.groups), batch_size)]
    jobs = [(chunk, sensor, instruction, sampling, default_tokens) for chunk in chunks]
    counts = {"answered": 0, "failed": 0}
    done: dict[int, list[Outcome]] = {}
    next_chunk = 0
    t0 = time.perf_counter()
    with RayExecutor(cluster, model_dir, backend, options) as pool:
        if output.verbose:
            click.echo(f"ray: {len(pool.actors)} actors x {cluster.threads_per_actor} threads, engine "
                       f"{pool.engine.digest[:12]} ({', '.join(sorted(set(pool.stats.sources)))})", err=True)
        with tqdm(total=len(inputs.groups), desc="infer", unit="tile", file=sys.stderr, dynamic_ncols=True,
                  disable=None if inputs.folder else True) as bar:
            for index, outcomes in pool.map(infer_batch, jobs):
                done[index] = outcomes
                bar.update(len(outcomes))
                with tqdm.external_write_mode(file=sys.stdout):
                    while next_chunk in done:  # print in input order
                        for outcome in done.pop(next_chunk):
                            if isinstance(outcome, TileFailure) and stop_on_error:
                                raise UserError(outcome.line())
                            _report(outcome, output, masks, False, inputs.folder)
                            counts["failed" if isinstance(outcome, TileFailure) else "answered"] += 1
                        next_chunk += 1
        if output.verbose and pool.stats.retried:
            click.echo(f"ray: {pool.stats.retried} batch(es) re-sent after an actor died", err=True)
    if inputs.folder:
        elapsed = time.perf_counter() - t0
        click.echo(f"infer: {counts['answered']} answered, {counts['failed']} failed of {len(inputs.groups)} tiles "
                   f"in {elapsed:.1f} s ({len(inputs.groups) / max(elapsed, 1e-9):.2f} tiles/s)", err=True)
    if counts["answered"] == 0:
        raise UserError(f"none of the {len(inputs.groups)} tiles could be answered (each has its error above)")
