"""The peer table (Markdown, as docs/benchmarks.md shows it) and the machine line above it. Formatting only."""

from __future__ import annotations

from rsvlm_edge.bench.peers.rounds import EngineFigures, Span


def span_text(span: Span, fmt: str) -> str:
    """``low-high`` over the rounds, or one value when they print the same; ``-`` when nothing was measured."""
    if not span.values:
        return "-"
    low, high = fmt.format(span.low), fmt.format(span.high)
    return low if low == high else f"{low}-{high}"


def bytes_text(n: int | None) -> str:
    """Decimal units, as the issue's table: 317 MB, 1.98 GB."""
    if n is None:
        return "-"
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"


def format_table(figures: list[EngineFigures], prompt_tokens: int) -> str:
    """One Markdown row per engine: prefill seconds and decode tok/s as ranges over the rounds, the highest peak
    RSS of any round, weight bytes read per generated token."""
    lines = [f"| engine | prefill, {prompt_tokens} tokens (s) | decode tok/s | peak RSS (MB) | weight bytes / token |",
             "|---|---|---|---|---|"]
    for f in figures:
        rss = f"{f.peak_rss_mb.high:,.0f}" if f.peak_rss_mb.values else "-"
        lines.append(f"| {f.name} | {span_text(f.prefill_s, '{:.2f}')} | {span_text(f.decode_tok_s, '{:.1f}')} | "
                     f"{rss} | {bytes_text(f.weight_bytes_per_token)} |")
    return "\n".join(lines)


def format_header(cpu: str, cores: int, threads: int, rounds: int, prompt_tokens: int, new_tokens: int,
                  load_avg: float | None = None) -> str:
    """``cpu``: :func:`rsvlm_edge.machine.cpu_description` (model and the ISA flags that pick kernels). The load
    average says how many other runnable processes shared the cores: above the core count, every figure is slowed."""
    load = "" if load_avg is None else f"; load average {load_avg:.1f} over the last 15 minutes of the run"
    return (f"machine: {cpu}, {cores} cores; {threads} threads per engine, batch 1, "
            f"{rounds} interleaved round{'s' if rounds != 1 else ''}, {prompt_tokens}-token prompt, "
            f"{new_tokens} new tokens (greedy){load}")


def format_errors(figures: list[EngineFigures]) -> str:
    return "\n".join(f"{f.name}: {err}" for f in figures for err in f.errors)


def format_notes(figures: list[EngineFigures]) -> str:
    return "\n".join(f"{f.name}: {note}" for f in figures for note in f.notes)


def bit_width(name: str) -> int | None:
    """4 or 8 from an engine's label (INT4, int8, Q4_0, Q8_0 ...); None for FP32 engines."""
    label = name.lower()
    for bits in (4, 8):
        if f"int{bits}" in label or f"q{bits}_" in label:
            return bits
    return None


def format_ratios(figures: list[EngineFigures], ours: str = "rsvlm-edge") -> str:
    """Each of this project's quantized engines against the best peer of its bit width, round by round (the same
    machine state): decode tok/s over the fastest peer's, the fastest peer's prefill seconds over ours. Rounds where
    an engine failed leave its values out of step, so such engines get no line."""
    lines = []
    for f in figures:
        bits = bit_width(f.name)
        if not f.name.startswith(ours) or bits is None:
            continue
        peers = [p for p in figures if not p.name.startswith(ours) and bit_width(p.name) == bits]
        rounds = len(f.decode_tok_s.values)
        if not peers or rounds == 0 or any(len(p.decode_tok_s.values) != rounds or p.errors for p in peers) or f.errors:
            continue
        decode = [f.decode_tok_s.values[r] / max(p.decode_tok_s.values[r] for p in peers) for r in range(rounds)]
        prefill = [min(p.prefill_s.values[r] for p in peers) / f.prefill_s.values[r] for r in range(rounds)]
        lines.append(f"{f.name} against the best {bits}-bit peer, per round: decode "
                     f"{', '.join(f'{x:.2f}' for x in decode)}x; prefill {', '.join(f'{x:.2f}' for x in prefill)}x")
    return "\n".join(lines)


def figures_from_json(result: dict) -> list[EngineFigures]:
    """The engines of a saved ``bench-peers --json`` result."""
    out = []
    for e in result["engines"]:
        f = EngineFigures(e["name"], weight_bytes_per_token=e.get("weight_bytes_per_token"),
                          errors=list(e.get("errors", [])), notes=list(e.get("notes", [])))
        f.prefill_s.values, f.decode_tok_s.values = list(e["prefill_s"]), list(e["decode_tok_s"])
        f.peak_rss_mb.values = list(e["peak_rss_mb"])
        out.append(f)
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m rsvlm_edge.bench.peers.table RESULT.json``: the table and the per-round ratios of a saved run."""
    import json
    import sys

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m rsvlm_edge.bench.peers.table RESULT.json", file=sys.stderr)
        return 2
    with open(args[0]) as fh:
        result = json.load(fh)
    figures = figures_from_json(result)
    print(result.get("header", ""))
    print()
    print(format_table(figures, int(result["settings"]["prompt_tokens"])))
    print(format_ratios(figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
