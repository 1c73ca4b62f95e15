"""Decode-step time of engine dirs, interleaved, for A/B comparisons on a noisy (shared) machine.

``python -m rsvlm_edge.bench.decode_steps DIR_A DIR_B --rounds 6 --threads 2``: each round measures the copy
bandwidth, then opens every engine in turn in a fresh process, prefills ``--prompt`` random embeddings and times
``--steps`` batch-1 decode steps through the ``ort`` backend. Alternating engines within a round puts them in the
same machine state, so their difference is trustworthy where two back-to-back `rsvlm-edge bench` runs can differ by
30%: this shared 2-core VM switches between phases in which both copy bandwidth and decode speed change.

Printed per engine: the median over rounds of each round's median step, tokens/s, and weight bytes read per token
x tokens/s as a fraction of the copy bandwidth measured at the start of the same round (the median over rounds).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from rsvlm_edge.bench.fresh import call_fresh
from rsvlm_edge.bench.limits import bandwidth_sample


def time_steps(engine_dir: str, threads: int, prompt: int, steps: int, warmup: int = 5) -> list[float]:
    """Seconds of each of ``steps`` batch-1 decode steps after a ``prompt``-token prefill (random embeddings)."""
    from rsvlm_edge.backends.ort_backend import OrtBackend

    backend = OrtBackend.from_dir(engine_dir, threads=threads, verify=False)
    cfg, rng = backend.config, np.random.default_rng(0)
    capacity = prompt + warmup + steps
    cache = backend.new_cache(1, capacity, expert=0)
    mask = np.ones((1, capacity), np.float32)
    embeds = (0.1 * rng.standard_normal((1, prompt, cfg.hidden_size))).astype(np.float32)
    backend.forward(cache, embeds, np.arange(prompt, dtype=np.int32)[None], mask[:, :prompt])
    times = []
    for i in range(warmup + steps):
        step = (0.1 * rng.standard_normal((1, 1, cfg.hidden_size))).astype(np.float32)
        t0 = time.perf_counter()
        backend.forward(cache, step, np.array([[cache.length]], np.int32), mask[:, :cache.length + 1])
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    backend.close()
    return times


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("engines", nargs="+", help="ONNX engine dirs (their manifests give the weight bytes per token)")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--steps", type=int, default=32, help="timed decode steps per engine and round")
    ap.add_argument("--prompt", type=int, default=742, help="prefill length (742: an rsunivlm-1b tile prompt)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, help="write the per-round figures here")
    args = ap.parse_args(argv)
    from rsvlm_edge.bench.weights import EngineDirError, engine_active_bytes

    try:
        weights = {d: engine_active_bytes(d) for d in args.engines}
    except EngineDirError as exc:
        ap.error(str(exc))
    rounds: list[dict[str, Any]] = []
    for r in range(args.rounds):
        bandwidth = bandwidth_sample(args.threads)
        step_ms = {d: 1e3 * statistics.median(call_fresh("rsvlm_edge.bench.decode_steps", "time_steps", d,
                                                                    args.threads, args.prompt, args.steps))
                   for d in args.engines}
        rounds.append({"bandwidth_gbs": bandwidth, "step_ms": step_ms})
        print(f"round {r + 1}/{args.rounds}: copy {rounds[-1]['bandwidth_gbs']:.1f} GB/s; "
              + ", ".join(f"{Path(d).name} {ms:.2f} ms" for d, ms in step_ms.items()), flush=True)
    summary = {}
    for d in args.engines:
        ms = [r["step_ms"][d] for r in rounds]
        frac = [weights[d] / (r["step_ms"][d] / 1e3) / (r["bandwidth_gbs"] * 1e9) for r in rounds]
        summary[d] = {"step_ms": statistics.median(ms), "tok_s": 1e3 / statistics.median(ms),
                      "weight_mb_per_token": weights[d] / 1e6, "of_bandwidth": statistics.median(frac),
                      "of_bandwidth_range": [min(frac), max(frac)]}
        print(f"{d}: {summary[d]['step_ms']:.2f} ms/step ({summary[d]['tok_s']:.1f} tok/s), "
              f"{summary[d]['weight_mb_per_token']:.1f} MB/token, {100 * summary[d]['of_bandwidth']:.1f}% of the copy "
              f"bandwidth (rounds {100 * min(frac):.1f}-{100 * max(frac):.1f}%)")
    if args.json:
        from rsvlm_edge.fileio import atomic_write_text

        atomic_write_text(args.json, json.dumps({"threads": args.threads, "prompt": args.prompt, "steps": args.steps,
                                                 "rounds": rounds, "summary": summary}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
