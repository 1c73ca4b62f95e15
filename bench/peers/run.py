"""The peer harness end to end: write the decoder, build every engine, measure them in interleaved rounds, and
print the table with the machine it ran on."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

from rsvlm_edge.bench.peers.exports import Engine, Step, plan, run_step
from rsvlm_edge.bench.peers.rounds import EngineFigures, collect, schedule
from rsvlm_edge.bench.peers.table import format_errors, format_header, format_notes, format_ratios, format_table
from rsvlm_edge.bench.peers.weights import bytes_per_token
from rsvlm_edge.bench.peers.worker import PeerSpec
from rsvlm_edge.bench.worker import RESULT
from rsvlm_edge.machine import cpu_description


@dataclass
class PeerSettings:
    work: Path
    rounds: int = 3
    threads: int = 2
    prompt_tokens: int = 740
    new_tokens: int = 64
    llama_cpp_dir: Path | None = None
    only: tuple[str, ...] = ()  # engine name substrings to keep (case-insensitive); empty: all
    timeout_s: float = 1800.0


def prepare(settings: PeerSettings, say: Callable[[str], None]) -> tuple[list[Engine], list[str]]:
    """Write the decoder (once per work dir) and build whatever engine is missing."""
    from rsvlm_edge.bench.peers.model import write_hf_model, write_rsunivlm_source

    work = settings.work
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "hf" / "model.safetensors").is_file():
        say("writing the random-init Qwen2 decoder")
        write_hf_model(work / "hf")
    if not (work / "src" / "model.safetensors").is_file():
        write_rsunivlm_source(work / "hf", work / "src")
    steps, engines, skipped = plan(work, calibration_tiles(work), settings.llama_cpp_dir)
    keep = [e for e in engines if selected(e.name, settings.only)]
    for step in needed_steps(steps, [e.path for e in keep]):
        if not step.out.exists():
            say(f"building {step.out.relative_to(work)}")
            run_step(step, work / "build.log")
    return keep, skipped


def needed_steps(steps: list[Step], targets: list[Path]) -> list[Step]:
    """The steps that make ``targets`` and everything they read (a step reads another's output when that path is
    one of its arguments), in plan order. Pure: tested without building anything."""
    outs = {str(s.out): s for s in steps}
    needed: set[Path] = set()
    todo = [str(t) for t in targets]
    while todo:
        step = outs.get(todo.pop())
        if step is not None and step.out not in needed:
            needed.add(step.out)
            todo.extend(a for a in step.command if a in outs)
    return [s for s in steps if s.out in needed]


def selected(name: str, only: tuple[str, ...]) -> bool:
    return not only or any(o.lower() in name.lower() for o in only)


def calibration_tiles(work: Path) -> list[str]:
    """Two tiles for the Q/DQ engine's activation ranges: the shared AID samples when present, else random pixels
    (the table measures speed, and Q/DQ speed does not depend on the ranges)."""
    from rsvlm_edge.bench.runner import BenchError, default_images

    try:
        return default_images()[:2]
    except BenchError:
        import numpy as np
        from PIL import Image

        paths = []
        for i in range(2):
            path = work / f"calib{i}.png"
            if not path.is_file():
                pixels = np.random.default_rng(i).integers(0, 255, (384, 384, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(path)
            paths.append(str(path))
        return paths


def run_worker(spec: PeerSpec, timeout_s: float) -> dict[str, Any] | str:
    """One measurement in a fresh interpreter: the result, or the error to show in the table's notes."""
    cmd = [sys.executable, "-m", "rsvlm_edge.bench.peers.worker", spec.to_json()]
    with tempfile.TemporaryFile(mode="w+") as err:
        try:
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return f"killed after {timeout_s:g} s"
        for line in proc.stdout.splitlines():
            if line.startswith(RESULT):
                return json.loads(line[len(RESULT):])
        err.seek(0)
        return f"exit code {proc.returncode}: {err.read()[-1500:].strip()}"


#: llama.cpp's extra CPU buffer types (AMX tiles, repacked weights) crash some builds on AMX CPUs (SIGSEGV in the
#: first decode); such a round is run again without them, and the table says so.
NO_EXTRA_BUFTS = "measured without llama.cpp's extra CPU buffer types (AMX / repacked weights): with them it crashed"


def measure_engine(spec: PeerSpec, timeout_s: float) -> dict[str, Any] | str:
    result = run_worker(spec, timeout_s)
    if spec.kind == "llama" and isinstance(result, str) and result.startswith(f"exit code {-signal.SIGSEGV}"):
        result = run_worker(replace(spec, extra_bufts=False), timeout_s)
        if not isinstance(result, str):
            result["note"] = NO_EXTRA_BUFTS
    return result


def measure(engines: list[Engine], settings: PeerSettings, say: Callable[[str], None]) -> list[EngineFigures]:
    by_name = {e.name: e for e in engines}
    results: list[tuple[str, dict[str, Any] | str]] = []
    for rnd, name in schedule(list(by_name), settings.rounds):
        e = by_name[name]
        say(f"round {rnd + 1}/{settings.rounds}: {name}")
        spec = PeerSpec(name, e.kind, str(e.path), settings.prompt_tokens, settings.new_tokens, settings.threads)
        results.append((name, measure_engine(spec, settings.timeout_s)))
    figures = collect(list(by_name), results)
    for f in figures:
        f.weight_bytes_per_token = bytes_per_token(by_name[f.name].kind, by_name[f.name].path)
    return figures


def run_peers(settings: PeerSettings, say: Callable[[str], None]) -> dict[str, Any]:
    engines, skipped = prepare(settings, say)
    figures = measure(engines, settings, say)
    cpu = cpu_description()
    header = format_header(cpu, os.cpu_count() or 1, settings.threads, settings.rounds, settings.prompt_tokens,
                           settings.new_tokens, os.getloadavg()[2])
    return {"header": header, "table": format_table(figures, settings.prompt_tokens), "errors": format_errors(figures),
            "ratios": format_ratios(figures),
            "notes": format_notes(figures),
            "skipped": skipped, "cpu": cpu,
            "load_avg": list(os.getloadavg()), "engines": [f.to_dict() for f in figures],
            "settings": {"rounds": settings.rounds, "threads": settings.threads,
                         "prompt_tokens": settings.prompt_tokens, "new_tokens": settings.new_tokens}}
