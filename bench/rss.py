"""Resident memory of an ONNX engine dir against the bytes of the weights it uses.

``python -m rsvlm_edge.bench.rss ENGINE_DIR --prompt 742 --steps 16``: in this process, opens the engine (no
preloaded vision sessions: this is the decoder's memory), loads expert 0, prefills ``--prompt`` random embeddings and
decodes ``--steps`` tokens, printing after each phase the resident set (all, anonymous) from
``/proc/self/smaps_rollup`` and the peak (``ru_maxrss``), beside the weights in use: the trunk + one expert file +
the embedding table. Linux only. Run one engine per process (the peak is the process's). ``--prefill-chunk N``
runs the prompt N positions per decoder run (0: all at once; default: the backend's ``PREFILL_CHUNK``); the prefill's
seconds are printed beside its memory.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import numpy as np


def rss_mib() -> dict[str, int]:
    """Resident (all, anonymous) and peak resident MiB of this process."""
    out = {"rss": 0, "anon": 0}
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("Rss", "Anonymous"):
            out["rss" if key == "Rss" else "anon"] = int(value.split()[0]) // 1024
    out["peak"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    return out


def weights_in_use(engine_dir: Path) -> int:
    """Bytes of the trunk, one expert file and the embedding graph's data."""
    manifest = json.loads((engine_dir / "manifest.json").read_text())
    layout = manifest["experts"]
    files = [layout["trunk"]["file"], layout["expert_files"][0]]
    files += manifest["components"]["embedding"].get("external_data", [])
    return sum((engine_dir / f).stat().st_size for f in files)


def main(argv: list[str] | None = None) -> int:
    from rsvlm_edge.backends.ort_backend import PREFILL_CHUNK, OrtBackend
    from rsvlm_edge.machine import cpu_description

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("engine", type=Path)
    ap.add_argument("--prompt", type=int, default=742)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prefill-chunk", type=int, default=PREFILL_CHUNK, help="0: the whole prompt in one run")
    args = ap.parse_args(argv)
    marks = {"start": rss_mib()}
    backend = OrtBackend.from_dir(args.engine, threads=args.threads, verify=False, preload=False,
                                  prefill_chunk=args.prefill_chunk or None)
    with backend.expert_cache.hold(0):
        marks["expert loaded"] = rss_mib()
    cfg, rng = backend.config, np.random.default_rng(0)
    cache = backend.new_cache(1, args.prompt + args.steps, expert=0)
    mask = np.ones((1, args.prompt + args.steps), np.float32)
    embeds = (0.1 * rng.standard_normal((1, args.prompt, cfg.hidden_size))).astype(np.float32)
    t0 = time.perf_counter()
    backend.forward(cache, embeds, np.arange(args.prompt, dtype=np.int32)[None], mask[:, :args.prompt])
    prefill_s = time.perf_counter() - t0
    marks["prefill"] = rss_mib()
    for _ in range(args.steps):
        backend.forward(cache, embeds[:, :1], np.array([[cache.length]], np.int32), mask[:, :cache.length + 1])
    marks["decode"] = rss_mib()
    weights = weights_in_use(args.engine) / 2**20
    chunk = args.prefill_chunk or "whole prompt"
    print(f"machine: {cpu_description()}; {args.engine}: weights in use {weights:.0f} MiB; prefill {args.prompt} "
          f"positions, chunk {chunk}: {prefill_s:.2f} s (first run: includes the arena's growth)")
    for name, m in marks.items():
        print(f"  {name:14s} RSS {m['rss']:5d} MiB (anonymous {m['anon']:5d}), peak {m['peak']:5d} MiB "
              f"= {m['peak'] / weights:.2f}x the weights")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
