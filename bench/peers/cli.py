"""`rsvlm-edge bench-peers`: thin click front end of :mod:`rsvlm_edge.bench.peers.run`."""

from __future__ import annotations

import os
from pathlib import Path

import click

from rsvlm_edge.bench.peers.exports import available
from rsvlm_edge.fileio import atomic_write_text


class PeersUsageError(click.ClickException):
    exit_code = 2


@click.command("bench-peers", context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--work", "work", type=click.Path(file_okay=False), default="peers-work", show_default=True,
              help="Folder for the decoder and every engine (about 20 GB); engines already there are re-used.")
@click.option("--rounds", default=3, show_default=True, type=click.IntRange(1), help="Interleaved rounds.")
@click.option("--threads", type=click.IntRange(1), help="Threads per engine (default: all cores).")
@click.option("--prompt-tokens", default=740, show_default=True, type=click.IntRange(17),
              help="Prompt length prefilled (740: a tile's visual tokens and instruction in rsunivlm-1b).")
@click.option("--new-tokens", default=64, show_default=True, type=click.IntRange(1), help="Greedy decode steps.")
@click.option("--llama-cpp", "llama_cpp_dir", type=click.Path(exists=True, file_okay=False),
              help="llama.cpp source tree (or unpacked llama-cpp-python sdist) for convert_hf_to_gguf.py.")
@click.option("--only", multiple=True, metavar="TEXT",
              help="Run only engines whose name contains TEXT (case-insensitive). Repeatable.")
@click.option("--timeout", "timeout_s", default=1800.0, show_default=True, type=float,
              help="Seconds one measurement may take before it is killed.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="Write every round's figures as JSON here.")
def bench_peers_command(work, rounds, threads, prompt_tokens, new_tokens, llama_cpp_dir, only, timeout_s,
                        json_out) -> None:
    """This project's engines against ONNX Runtime GenAI, llama.cpp and PyTorch eager on one decoder.

    Writes a random-init Qwen2 decoder of the rsunivlm-1b shape (Qwen2-0.5B: 24 layers, hidden 896, vocab 151,936)
    with transformers, builds it with `rsvlm-edge convert/export/build/calibrate` (FP32, INT8 weight-only, INT8
    Q/DQ, INT4 where this checkout has it), ONNX Runtime GenAI's model builder (int4, int8) and llama.cpp's
    converter and quantizer (Q4_0, Q8_0), then runs each engine once per round, every round in a rotated order, in
    its own process: prefill seconds for the prompt, decode tokens/s, peak RSS, weight bytes read per token.
    Prints a Markdown table (ranges over the rounds) under the CPU model and ISA. Peers not installed are left
    out and named; `pip install 'rsvlm-edge[peers]'` (llama-cpp-python builds from source) or scripts/peers.sh.

    \b
    Examples:
      rsvlm-edge bench-peers --work /tmp/peers --llama-cpp /tmp/llama_cpp_python-0.3.36 --rounds 3 --threads 2
      rsvlm-edge bench-peers --work /tmp/peers --only rsvlm-edge --only GenAI --rounds 1
    """
    missing = [m for m in ("torch", "transformers") if not available(m)]
    if missing:
        raise PeersUsageError(f"bench-peers needs {' and '.join(missing)} to write the decoder: "
                              f"pip install 'rsvlm-edge[peers]'")
    from rsvlm_edge.bench.peers.run import PeerSettings, run_peers

    settings = PeerSettings(Path(work), rounds=rounds, threads=threads or os.cpu_count() or 1,
                            prompt_tokens=prompt_tokens, new_tokens=new_tokens,
                            llama_cpp_dir=Path(llama_cpp_dir) if llama_cpp_dir else None, only=tuple(only),
                            timeout_s=timeout_s)
    try:
        result = run_peers(settings, lambda line: click.echo(line, err=True))
    except (RuntimeError, OSError, ValueError) as exc:
        raise PeersUsageError(str(exc)) from None
    click.echo(result["header"])
    click.echo("")
    click.echo(result["table"])
    if result["ratios"]:
        click.echo(result["ratios"])
    if result["notes"]:
        click.echo(result["notes"])
    for line in result["skipped"]:
        click.echo(f"left out: {line}")
    if result["errors"]:
        click.echo("failed:\n" + result["errors"])
    if json_out:
        import json

        atomic_write_text(json_out, json.dumps(result, indent=2) + "\n")
        click.echo(f"wrote {json_out}", err=True)
