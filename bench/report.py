"""The bench result as a side-by-side table (one column per engine) and as JSON. Formatting only."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from rsvlm_edge.fileio import atomic_write_text

Row = tuple[str, Callable[[dict[str, Any]], Any], str]  # label, getter, format


def _m(key: str) -> Callable[[dict[str, Any]], Any]:
    return lambda r: r["metrics"].get(key)


def _f(key: str) -> Callable[[dict[str, Any]], Any]:
    return lambda r: r["fractions"].get(key)


def _vs(key: str) -> Callable[[dict[str, Any]], Any]:
    return lambda r: (r.get("vs_torch") or {}).get(key)


ROWS: list[Row] = [
    ("precision", lambda r: r["precision"], "{}"),
    ("load (s)", _m("load_s"), "{:.2f}"),
    ("first request (s, cold)", _m("first_request_s"), "{:.2f}"),  # ORT opens sessions lazily: load shows here
    ("vision encoder (ms/image)", _m("vision_ms"), "{:.1f}"),
    ("  of GEMM peak", _f("vision_gemm_frac"), "{:.1%}"),
    ("time to first token (ms)", _m("ttft_ms"), "{:.1f}"),
    ("prefill (ms)", _m("prefill_ms"), "{:.1f}"),
    ("  of GEMM peak", _f("prefill_gemm_frac"), "{:.1%}"),
    ("decode (tok/s, batch 1)", _m("decode_tok_s"), "{:.1f}"),
    ("  of bandwidth limit", _f("decode_bandwidth_frac"), "{:.1%}"),
    ("decode (tok/s, batched)", _m("batch_decode_tok_s"), "{:.1f}"),
    ("end-to-end (s/tile)", _m("e2e_s_per_tile"), "{:.3f}"),
    ("tiles/s (batched)", _m("tiles_per_s"), "{:.2f}"),
    ("peak RSS (MB)", _m("peak_rss_mb"), "{:.0f}"),
    ("active weights/token (MB)", lambda r: r["fractions"]["active_weight_bytes"] / 2**20, "{:.1f}"),
    ("expert load (ms)", _m("expert_load_ms"), "{:.1f}"),
    ("expert switch (ms)", _m("expert_switch_ms"), "{:.1f}"),
    ("expert cache hit rate", _m("expert_hit_rate"), "{:.1%}"),
    ("decode vs torch", _vs("decode_tok_s"), "{:.2f}x"),
    ("end-to-end vs torch", _vs("e2e_s_per_tile"), "{:.2f}x"),
    ("tiles/s vs torch", _vs("tiles_per_s"), "{:.2f}x"),
]


def _cell(value: Any, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def _samples(mach: dict[str, Any]) -> str:
    samples = (mach.get("detail") or {}).get("bandwidth_samples_gbs") or []
    if len(samples) < 2:
        return ""
    return f" (best of {len(samples)} samples, {min(samples):.1f}-{max(samples):.1f})"


def format_table(result: dict[str, Any]) -> str:
    rows, s, mach = result["engines"], result["settings"], result["machine"]
    head = [
        f"model {result['model']['name']}: {s['tiles']} tiles, {s['new_tokens']} new tokens ({s['sampling']}), "
        f"batch {s['batch']}, {s['threads']} threads; prompt {rows[0]['metrics']['prompt_tokens'] if rows else '?'} tokens",
        f"machine: {mach['cpu_count']} CPUs, load avg {mach['load_avg'][0]:.2f}; copy bandwidth "
        f"{mach['bandwidth_gbs']:.1f} GB/s{_samples(mach)}, GEMM fp32 {mach['gemm_fp32_gflops']:.0f} GFLOP/s"
        + (f", int8 {mach['gemm_int8_gops']:.0f} GOP/s" if mach.get("gemm_int8_gops") else ""),
    ]
    table = [["metric"] + [r["name"] for r in rows]]
    table += [[label] + [_cell(get(r), fmt) for r in rows] for label, get, fmt in ROWS]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in table]
    lines.insert(1, "-" * len(lines[0]))
    tail = []
    for name, t in result["targets"].items():
        state = "n/a (needs that engine)" if t["met"] is None else ("met" if t["met"] else "NOT met")
        value = "-" if t["value"] is None else f"{t['value']:.2f}"
        tail.append(f"target {name} >= {t['target']}: {value} -> {state}")
    return "\n".join(head + [""] + lines + [""] + tail)


def write_json(result: dict[str, Any], path: str | Path) -> None:
    atomic_write_text(path, json.dumps(result, indent=2) + "\n")
