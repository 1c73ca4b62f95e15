"""Bar charts of the bench result (matplotlib, from the ``dev`` extra): speed, memory and fractions of limits."""

from __future__ import annotations

from pathlib import Path
from typing import Any

PANELS = [  # title, getter (None: the fractions panel)
    ("decode tok/s (batch 1)", lambda r: r["metrics"]["decode_tok_s"]),
    ("end-to-end s/tile", lambda r: r["metrics"]["e2e_s_per_tile"]),
    ("time to first token ms", lambda r: r["metrics"]["ttft_ms"]),
    ("vision encoder ms", lambda r: r["metrics"]["vision_ms"]),
    ("peak RSS MB", lambda r: r["metrics"]["peak_rss_mb"]),
    ("fraction of limit", None),
]


class PlotUnavailable(RuntimeError):
    """matplotlib is not installed."""


def plot(result: dict[str, Any], path: str | Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotUnavailable("--plot needs matplotlib: pip install matplotlib (or pip install -e '.[dev]')") from None
    rows = result["engines"]
    names = [r["name"] for r in rows]
    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    for ax, (title, get) in zip(axes.flat, PANELS):
        if get is None:
            keys = ["decode_bandwidth_frac", "prefill_gemm_frac", "vision_gemm_frac"]
            width = 0.8 / len(keys)
            for k, key in enumerate(keys):
                ax.bar([i + k * width for i in range(len(rows))], [r["fractions"][key] for r in rows], width,
                       label=key.replace("_frac", "").replace("_", " "))
            ax.set_xticks([i + width for i in range(len(rows))], names)
            ax.legend(fontsize=7)
        else:
            ax.bar(names, [get(r) for r in rows], color="tab:blue")
        ax.set_title(title, fontsize=10)
        ax.tick_params(axis="x", labelrotation=20, labelsize=8)
    fig.suptitle(f"rsvlm-edge bench: {result['model']['name']} ({result['settings']['threads']} threads, "
                 f"{result['settings']['new_tokens']} new tokens)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
