"""The peer table (Markdown, as docs/benchmarks.md shows it) and the machine line above it. Formatting and
/proc/cpuinfo parsing only."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rsvlm_edge.bench.peers.rounds import EngineFigures, Span

#: ISA extensions that decide which kernels the engines pick (x86: AVX2 / AVX512 / VNNI / AMX; ARM: dot product,
#: int8 matrix multiply, SVE), in the order printed.
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_int8", "amx_bf16",
             "asimd", "asimddp", "i8mm", "sve", "sve2", "bf16")


@dataclass(frozen=True)
class CpuInfo:
    model: str
    isa: tuple[str, ...]

    def describe(self) -> str:
        return f"{self.model} ({', '.join(self.isa) or 'no SIMD extensions listed'})"


def parse_cpuinfo(text: str) -> CpuInfo:
    """CPU model and the :data:`ISA_FLAGS` it lists, from /proc/cpuinfo text (x86 ``model name`` / ``flags``;
    ARM ``Features``, with ``Hardware`` or the CPU part as the model when there is no model name)."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip().lower(), value.strip())
    model = fields.get("model name") or fields.get("hardware") or (
        f"ARM CPU part {fields['cpu part']}" if "cpu part" in fields else "unknown CPU")
    flags = set((fields.get("flags") or fields.get("features") or "").split())
    return CpuInfo(model, tuple(f for f in ISA_FLAGS if f in flags))


def read_cpuinfo(path: str | Path = "/proc/cpuinfo") -> CpuInfo:
    try:
        return parse_cpuinfo(Path(path).read_text())
    except OSError:
        import platform

        return CpuInfo(platform.processor() or platform.machine() or "unknown CPU", ())


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


def format_header(cpu: CpuInfo, cores: int, threads: int, rounds: int, prompt_tokens: int, new_tokens: int) -> str:
    return (f"machine: {cpu.describe()}, {cores} cores; {threads} threads per engine, batch 1, "
            f"{rounds} interleaved round{'s' if rounds != 1 else ''}, {prompt_tokens}-token prompt, "
            f"{new_tokens} new tokens (greedy)")


def format_errors(figures: list[EngineFigures]) -> str:
    return "\n".join(f"{f.name}: {err}" for f in figures for err in f.errors)
