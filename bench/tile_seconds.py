"""Steady-state seconds per tile of ONNX engine dirs: vision encoder + prefill + a short answer, interleaved.

``python -m rsvlm_edge.bench.tile_seconds DIR_A DIR_B ... --rounds 2 --threads 2``: each round opens every engine
in turn in a fresh process (sessions preloaded), runs one warm-up tile, then times ``--tiles`` tiles of a random
image with a ``[CLS]`` prompt and ``--new-tokens`` forced answer tokens (the ground-station cost per tile: the
vision encoder and the prefill dominate, not the decode). Alternating engines within a round puts them in the same
machine state. Printed per engine: the median over rounds of vision, prefill, decode and total seconds, peak RSS,
and the machine (CPU model and ISA).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from rsvlm_edge.bench.fresh import call_fresh


def time_tiles(engine_dir: str, threads: int, tiles: int, new_tokens: int) -> dict[str, float]:
    """Median vision / prefill / decode / total seconds over ``tiles`` tiles after one warm-up tile."""
    import resource

    import numpy as np

    from rsvlm_edge.backends.ort_backend import OrtBackend
    from rsvlm_edge.generation import Generator, Request
    from rsvlm_edge.pipeline import load_tokenizer
    from rsvlm_edge.sampling import SamplingConfig

    backend = OrtBackend.from_dir(engine_dir, threads=threads, verify=False)
    gen = Generator(backend, load_tokenizer(engine_dir, backend.config.prompt_template))
    size = backend.config.image_size
    rng = np.random.default_rng(0)
    sampling = SamplingConfig(max_new_tokens=new_tokens, ignore_stop=True)
    rows = []
    for _ in range(tiles + 1):
        pixels = rng.normal(size=(3, size, size)).astype(np.float32)
        t = gen.generate([Request([pixels], "rgb", "[CLS] What kind of scene is this?")], sampling)[0].timings
        rows.append({"vision_s": t["vision_ms"] / 1e3, "prefill_s": t["prefill_ms"] / 1e3,
                     "decode_s": t["decode_ms"] / 1e3,
                     "tile_s": (t["vision_ms"] + t["prefill_ms"] + t["decode_ms"]) / 1e3})
    backend.close()
    out = {k: statistics.median(r[k] for r in rows[1:]) for k in rows[0]}
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def main(argv: list[str] | None = None) -> int:
    from rsvlm_edge.machine import cpu_description

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("engines", nargs="+", help="ONNX engine dirs")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--tiles", type=int, default=2, help="timed tiles per engine and round (after one warm-up)")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    print(f"machine: {cpu_description()}, {args.threads} threads", flush=True)
    rounds: list[dict[str, Any]] = []
    for r in range(args.rounds):
        rounds.append({d: call_fresh("rsvlm_edge.bench.tile_seconds", "time_tiles", d, args.threads, args.tiles,
                                     args.new_tokens) for d in args.engines})
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{Path(d).name} {v['tile_s']:.2f} s"
                                                         for d, v in rounds[-1].items()), flush=True)
    for d in args.engines:
        med = {k: statistics.median(rnd[d][k] for rnd in rounds) for k in rounds[0][d]}
        print(f"{Path(d).name:24s} vision {med['vision_s']:.2f} s, prefill {med['prefill_s']:.2f} s, "
              f"decode {med['decode_s']:.2f} s, tile {med['tile_s']:.2f} s, peak RSS {med['peak_rss_mb']:.0f} MB")
    if args.json:
        args.json.write_text(json.dumps({"machine": cpu_description(), "threads": args.threads, "rounds": rounds},
                                        indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
