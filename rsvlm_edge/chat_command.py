"""`rsvlm-edge chat`: multi-turn dialogue about one tile, reusing the KV cache while the expert is unchanged."""

from __future__ import annotations

import sys

import click

from rsvlm_edge.config import EXPERT_NAMES


@click.command("chat")
@click.argument("model_dir", type=click.Path())
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--sensor", type=click.Choice(["rgb", "sar", "ir", "ms"]), help="Input sensor (default: guessed).")
@click.option("--backend", type=click.Choice(["ort", "torch", "trt"]), default="ort", show_default=True)
@click.option("--max-new-tokens", default=256, show_default=True)
@click.option("--temperature", default=0.0, show_default=True)
@click.option("--top-p", default=1.0, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("-v", "--verbose", is_flag=True, help="Show the expert per turn and how many cached tokens were reused.")
def chat_command(model_dir, images, sensor, backend, max_new_tokens, temperature, top_p, seed, verbose) -> None:
    """Talk about a tile. Each line you type is a turn; start it with a tag ([VG], [SEG], ...) or let the router
    choose. Type /reset to forget the conversation, /quit (or end of input) to stop.

    \b
    Example:
      rsvlm-edge chat MODEL tile.png
      you> [CAP] Describe the image.
      you> How many ships are there?
    """
    from rsvlm_edge.generation import ChatSession
    from rsvlm_edge.pipeline import Pipeline
    from rsvlm_edge.sampling import SamplingConfig

    if len(images) > 2:
        raise click.UsageError("chat takes one image (or a before/after pair)")
    try:
        sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed).validate()
        pipe = Pipeline(model_dir, backend=backend)
        tile = pipe.tile(list(images), sensor)
    except (ValueError, OSError, RuntimeError) as exc:
        raise click.ClickException(str(exc)) from None
    session = ChatSession(pipe.generator, tile.pixels, tile.sensor)
    interactive = sys.stdin.isatty()
    try:
        while True:
            if interactive:
                click.echo("you> ", nl=False)
            line = sys.stdin.readline()
            if not line or line.strip() == "/quit":
                break
            text = line.strip()
            if not text:
                continue
            if text == "/reset":
                session = ChatSession(pipe.generator, tile.pixels, tile.sensor)
                click.echo("(conversation cleared)")
                continue
            click.echo("model> ", nl=False)
            try:
                result = session.ask(text, sampling, on_token=lambda _i, piece: click.echo(piece, nl=False))
            except ValueError as exc:
                click.echo(f"\nerror: {exc}")
                continue
            click.echo()
            if verbose:
                c = session.counters
                click.echo(f"  [expert {EXPERT_NAMES[result.routing.expert]} ({result.routing.source}); "
                           f"first token {result.timings['ttft_ms']:.0f} ms; reused {c['reused_tokens']} cached tokens "
                           f"so far, {c['reprefills']} re-prefills]")
    finally:
        pipe.close()
