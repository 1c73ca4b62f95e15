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
