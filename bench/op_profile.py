"""Where one decode step's time goes (``rsvlm-edge profile``): ONNX Runtime's own per-node timings of the decoder,
grouped by op type, set against the step's wall time.

The bench says how far decode is from the bandwidth limit; this says why. For each op type it gives the time per
decode step, its share of the step, and the weight bytes its nodes read per step divided by their time (so a
weight-streaming kernel can be read against the machine's copy bandwidth on its own). What is not in any node is
split into ORT's own time between nodes (``model_run`` minus the nodes) and everything outside the decoder session:
the Python loop, the embedding session, sampling and cache binding.

ORT's profiler adds a little time to every node, so absolute figures run slower than ``rsvlm-edge bench``; the
shares and the per-op bandwidths are what to compare between two engines.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

KERNEL_SUFFIX = "_kernel_time"


@dataclass
class Run:
    ts: int
    dur: int

    def holds(self, event: dict[str, Any]) -> bool:
        return self.ts <= int(event["ts"]) < self.ts + self.dur


def decoder_runs(events: list[dict[str, Any]]) -> list[Run]:
    """Every ``model_run`` of one session's trace, in time order."""
    runs = [Run(int(e["ts"]), int(e["dur"])) for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    return sorted(runs, key=lambda r: r.ts)


def weight_bytes_by_node(onnx_path: str | Path) -> dict[str, int]:
    """Graph node name -> bytes of the initializers it reads. ORT's trace counts only the initializers stored in the
    graph (``parameter_size``), not the external ones the backend hands over with ``add_initializer``, so the
    weights come from the graph file. Empty where the ``onnx`` package is missing (then the trace's figure stands)."""
    try:
        import onnx
        from onnx.helper import tensor_dtype_to_np_dtype
    except ImportError:
        return {}
    model = onnx.load(str(onnx_path), load_external_data=False)
    sizes = {}
    for t in model.graph.initializer:
        count = 1
        for d in t.dims:
            count *= int(d)
        sizes[t.name] = count * tensor_dtype_to_np_dtype(t.data_type).itemsize
    return {n.name: sum(sizes[i] for i in n.input if i in sizes) for n in model.graph.node if n.name}


def summarize(events: list[dict[str, Any]], steps: int, wall_us_per_step: float,
              node_weights: dict[str, int] | None = None) -> dict[str, Any]:
    """Per-op-type figures over the last ``steps`` runs of a decoder trace (the decode steps of the measured
    generation), against ``wall_us_per_step`` (1e6 / decode tokens per second). ``node_weights`` (node name ->
    weight bytes, :func:`weight_bytes_by_node`) overrides the trace's own count for the nodes it names."""
    node_weights = node_weights or {}
    runs = decoder_runs(events)
    if steps < 1 or len(runs) < steps:
        raise ValueError(f"the trace has {len(runs)} decoder runs, fewer than the {steps} decode steps asked for")
    runs = runs[-steps:]
    ops: dict[str, dict[str, float]] = defaultdict(lambda: {"us": 0.0, "nodes": 0.0, "weight_bytes": 0.0})
    nodes_total = 0.0
    for e in events:
        if e.get("cat") != "Node" or not str(e.get("name", "")).endswith(KERNEL_SUFFIX):
            continue
        if not any(r.holds(e) for r in runs):
            continue
        args = e.get("args", {})
        row = ops[str(args.get("op_name", "?"))]
        row["us"] += float(e["dur"])
        row["nodes"] += 1
        node = str(e["name"])[: -len(KERNEL_SUFFIX)]
        row["weight_bytes"] += float(node_weights.get(node, args.get("parameter_size", 0) or 0))
        nodes_total += float(e["dur"])
    run_us = sum(r.dur for r in runs) / steps
    rows = []
    for op, row in sorted(ops.items(), key=lambda kv: -kv[1]["us"]):
        us = row["us"] / steps
        weight = row["weight_bytes"] / steps
        rows.append({"op": op, "us_per_step": us, "nodes_per_step": row["nodes"] / steps,
                     "share_of_step": us / wall_us_per_step,
                     "weight_mb_per_step": weight / 1e6,
                     "weight_gbs": weight / (us * 1e3) if us > 0 and weight > 0 else None})
    return {
        "steps": steps,
        "wall_us_per_step": wall_us_per_step,
        "ort_run_us_per_step": run_us,
        "nodes_us_per_step": nodes_total / steps,
        "ort_between_nodes_us_per_step": max(run_us - nodes_total / steps, 0.0),
        "outside_decoder_us_per_step": max(wall_us_per_step - run_us, 0.0),
        "ops": rows,
    }


def profile_decode(model_dir: str | Path, image: str | Path, instruction: str, new_tokens: int = 32,
                   threads: int | None = None, keep_traces: str | Path | None = None) -> dict[str, Any]:
    """Generate ``new_tokens`` tokens (greedy, stop ignored) on one tile with the profiler on, after a short
    warm-up generation, and summarise the routed decoder's trace."""
    from rsvlm_edge.pipeline import Pipeline
    from rsvlm_edge.sampling import SamplingConfig

    if new_tokens < 2:
        raise ValueError("profile at least 2 new tokens (the first comes from the prefill)")
    workdir = Path(tempfile.mkdtemp(prefix="rsvlm-profile-"))
    try:
        pipe = Pipeline(model_dir, "ort", threads=threads, verify="size", profile_prefix=str(workdir / "ort"))
        try:
            tile = pipe.tile([image])
            pipe.run([tile], instruction, SamplingConfig(max_new_tokens=2, ignore_stop=True))  # loads + warms up
            result = pipe.run([tile], instruction, SamplingConfig(max_new_tokens=new_tokens, ignore_stop=True))[0]
            traces = pipe.backend.end_profiling()  # type: ignore[attr-defined]
        finally:
            pipe.close()
        gen = result.generation
        backend = pipe.backend
        decoder = backend.experts.components[gen.routing.expert]  # type: ignore[attr-defined]
        events = json.loads(Path(traces[decoder]).read_text())
        steps = int(gen.timings["decode_steps"])
        graph = backend.manifest.path(backend.manifest.component(decoder).file)  # type: ignore[attr-defined]
        report = summarize(events, steps, 1e6 / float(gen.timings["decode_tok_s"]), weight_bytes_by_node(graph))
        report.update(model_dir=str(model_dir), decoder=decoder, threads=threads, new_tokens=new_tokens,
                      prompt_tokens=gen.prompt_tokens, decode_tok_s=float(gen.timings["decode_tok_s"]))
        if keep_traces:
            keep = Path(keep_traces)
            keep.mkdir(parents=True, exist_ok=True)
            for name, path in traces.items():
                shutil.copyfile(path, keep / f"{name}.json")
        return report
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def format_profile(report: dict[str, Any]) -> str:
    wall = report["wall_us_per_step"]
    lines = [f"{report['model_dir']} ({report['decoder']}), {report['steps']} decode steps after a "
             f"{report['prompt_tokens']}-token prompt: {report['decode_tok_s']:.1f} tok/s with the profiler on, "
             f"{wall / 1e3:.3f} ms per step",
             "",
             f"{'op type':<32} {'nodes':>6} {'us/step':>10} {'share':>7} {'weights MB':>11} {'GB/s':>7}"]
    for row in report["ops"]:
        gbs = f"{row['weight_gbs']:.1f}" if row["weight_gbs"] else ""
        mb = f"{row['weight_mb_per_step']:.1f}" if row["weight_mb_per_step"] else ""
        lines.append(f"{row['op']:<32} {row['nodes_per_step']:>6.0f} {row['us_per_step']:>10.1f} "
                     f"{row['share_of_step']:>6.1%} {mb:>11} {gbs:>7}")
    for key, label in (("ort_between_nodes_us_per_step", "ORT between nodes"),
                       ("outside_decoder_us_per_step", "outside the decoder session")):
        lines.append(f"{label:<32} {'':>6} {report[key]:>10.1f} {report[key] / wall:>6.1%}")
    return "\n".join(lines)
