"""One engine, measured in its own process (``python -m rsvlm_edge.bench.worker SPEC_JSON``), so peak RSS is
that engine's alone and torch is imported only where the torch-eager reference runs.

Everything goes through :class:`~rsvlm_edge.pipeline.Pipeline` and the torch-free generation loop, with the same
prompt, greedy sampling and ``ignore_stop`` (exactly ``new_tokens`` tokens) for every engine. Protocol on stdout:
``@@progress <label>`` per finished step, then one ``@@result <json>`` line.
"""

from __future__ import annotations

import json
import resource
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

PROGRESS, RESULT = "@@progress", "@@result"


@dataclass
class WorkerSpec:
    name: str
    backend: str  # "ort" or "torch"
    model_dir: str
    images: list[str]  # one path per tile (already cycled to the tile count)
    instruction: str = "[CAP] Describe the image."
    new_tokens: int = 16
    batch: int = 4
    threads: int | None = None
    vision_reps: int = 3
    expert_budget: int | None = None  # experts resident at once (ort); None = all
    options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, text: str) -> "WorkerSpec":
        return cls(**json.loads(text))

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    def steps(self) -> int:
        """Progress steps this worker reports (the parent sizes its bar with it)."""
        return 4 + len(self.images) + -(-len(self.images) // self.batch)


def _progress(label: str) -> None:
    print(f"{PROGRESS} {label}", flush=True)


def _median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else 0.0


def _peak_rss_bytes() -> int:
    """This process's RSS high-water mark. VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent
    across fork + exec, so a parent that once held 1 GB would make every worker report 1 GB."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux; bytes on macOS (rarely run)


def _open(spec: WorkerSpec):
    from rsvlm_edge.pipeline import Pipeline

    options: dict[str, Any] = {"threads": spec.threads}
    if spec.backend == "ort":
        options.update(verify="size", expert_budget_experts=spec.expert_budget, **spec.options)
    return Pipeline(spec.model_dir, spec.backend, **options)


def _vision_ms(pipe, tile, reps: int) -> list[float]:
    """Stem + encoder for one image, batch 1: ``reps`` timings after a warm-up."""
    pixels = tile.pixels[0][None].astype(np.float32)
    pipe.backend.encode_images(pixels, tile.sensor)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        pipe.backend.encode_images(pixels, tile.sensor)
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def _text_forward_ms(backend, expert: int, ids: np.ndarray) -> float:
    t0 = time.perf_counter()
    cache = backend.new_cache(1, ids.shape[1], expert)
    backend.forward(cache, backend.embed(ids), np.arange(ids.shape[1], dtype=np.int32)[None],
                    np.ones(ids.shape, dtype=np.float32))
    return (time.perf_counter() - t0) * 1e3


def _expert_switch(pipe, resident: int) -> dict[str, float]:
    """Switch cost: a short text-only prefill on each other expert, cold (first use) minus warm (right after);
    then back to ``resident`` (a cache hit unless the budget evicted it)."""
    ids = np.asarray([pipe.tokenizer.encode("switch experts now")[:8] or [pipe.tokenizer.pad_id]], dtype=np.int32)
    others = [e for e in range(pipe.config.num_experts) if e != resident]
    warm_same = _text_forward_ms(pipe.backend, resident, ids)
    switches = []
    for expert in others:
        cold = _text_forward_ms(pipe.backend, expert, ids)
        warm = _text_forward_ms(pipe.backend, expert, ids)
        switches.append(max(cold - warm, 0.0))
    back = _text_forward_ms(pipe.backend, resident, ids)
    return {"expert_switch_ms": _median(switches), "expert_switch_back_ms": max(back - warm_same, 0.0)}


def run(spec: WorkerSpec) -> dict[str, Any]:
    from rsvlm_edge.sampling import SamplingConfig

    t0 = time.perf_counter()
    pipe = _open(spec)
    load_s = time.perf_counter() - t0
    _progress("load")
    sampling = SamplingConfig(max_new_tokens=spec.new_tokens, ignore_stop=True)
    first = pipe.tile([spec.images[0]])
    t0 = time.perf_counter()
    warm = pipe.run([first], spec.instruction, SamplingConfig(max_new_tokens=2, ignore_stop=True))[0]
    first_request_s = time.perf_counter() - t0  # includes the routed expert's first load
    expert = warm.generation.routing.expert
    _progress("warm-up")
    vision_ms = _vision_ms(pipe, first, spec.vision_reps)
    _progress("vision")
    per_tile: list[dict[str, float]] = []
    for path in spec.images:
        t0 = time.perf_counter()
        result = pipe.run([pipe.tile([path])], spec.instruction, sampling)[0]
        timings = dict(result.generation.timings)
        timings["e2e_s"] = time.perf_counter() - t0
        timings["prompt_tokens"] = result.generation.prompt_tokens
        timings["new_tokens"] = len(result.generation.token_ids)
        per_tile.append(timings)
        _progress("tile")
    batch_s, batch_decode = 0.0, []
    for start in range(0, len(spec.images), spec.batch):
        t0 = time.perf_counter()
        tiles = [pipe.tile([p]) for p in spec.images[start:start + spec.batch]]
        results = pipe.run(tiles, spec.instruction, sampling)
        batch_s += time.perf_counter() - t0
        batch_decode.append(results[0].generation.timings["decode_tok_s"])
        _progress("batch")
    switch = _expert_switch(pipe, expert)
    _progress("experts")
    stats = pipe.backend.stats()
    loaded = stats.get("experts_loaded") or 0
    metrics = {
        "load_s": load_s,
        "first_request_s": first_request_s,
        # with the per-tile encoder timings of the generation loop: more samples on a noisy machine, and the
        # same population as time to first token (which contains it)
        "vision_ms": _median(vision_ms + [t["vision_ms"] for t in per_tile]),
        "ttft_ms": _median([t["ttft_ms"] for t in per_tile]),
        "prefill_ms": _median([t["prefill_ms"] for t in per_tile]),
        "decode_tok_s": _median([t["decode_tok_s"] for t in per_tile]),
        "e2e_s_per_tile": _median([t["e2e_s"] for t in per_tile]),
        "tiles_per_s": len(spec.images) / batch_s,
        "batch_decode_tok_s": _median(batch_decode),
        "batch_size": min(spec.batch, len(spec.images)),
        "peak_rss_mb": _peak_rss_bytes() / 2**20,
        "expert_load_ms": stats["expert_load_ms"] / loaded if loaded else None,
        "expert_hit_rate": stats.get("expert_hit_rate"),
        **switch,
        "prompt_tokens": int(per_tile[0]["prompt_tokens"]),
        "new_tokens": int(per_tile[0]["new_tokens"]),
        "decode_steps": int(per_tile[0]["decode_steps"]),
    }
    pipe.close()
    return {"name": spec.name, "backend": spec.backend, "model_dir": spec.model_dir, "expert": expert,
            "metrics": metrics, "per_tile": per_tile, "backend_stats": _jsonable(stats)}


def _jsonable(stats: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(stats, default=str))


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m rsvlm_edge.bench.worker SPEC_JSON", file=sys.stderr)
        return 2
    result = run(WorkerSpec.from_json(argv[0]))
    print(f"{RESULT} {json.dumps(result)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
