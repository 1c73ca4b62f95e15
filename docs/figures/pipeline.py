"""Draw the README's pipeline picture: components, routing, the expert cache and the engines per target.

Drawn from code rather than by hand so the picture changes with the components in a reviewed diff.

    python docs/figures/pipeline.py            # writes docs/figures/pipeline.png beside this script

Needs matplotlib (in the ``dev`` extra).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on build machines

import matplotlib.pyplot as plt  # noqa: E402  (after the backend choice)
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

# One colour per role, so the eye groups the boxes: inputs, vision, text/routing, decoding, cache, output, engines.
COLOURS = {
    "input": "#eeeeee",
    "vision": "#cfe2f3",
    "text": "#fce5cd",
    "decoder": "#d9ead3",
    "cache": "#fff2cc",
    "output": "#ead1dc",
    "engine": "#d0e0e3",
}


def box(ax, x: float, y: float, w: float, h: float, title: str, body: str = "", role: str = "input") -> None:
    """A rounded box with a bold title line and an optional smaller body (the component's graph file or role)."""
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.02,rounding_size=0.08",
                                fc=COLOURS[role], ec="#444444", lw=1.0))
    if body:
        ax.text(x + w / 2, y + h - 0.16, title, ha="center", va="top", fontsize=9.5, fontweight="bold")
        ax.text(x + w / 2, y + h - 0.45, body, ha="center", va="top", fontsize=7.6, linespacing=1.35)
    else:
        ax.text(x + w / 2, y + h / 2, title, ha="center", va="center", fontsize=9.5, fontweight="bold")


def arrow(ax, start: tuple[float, float], end: tuple[float, float], label: str = "",
          at: tuple[float, float] | None = None) -> None:
    """An arrow between two points, with an optional label at ``at`` (default: above its middle)."""
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=12, lw=1.1, color="#333333"))
    if label:
        x, y = at or ((start[0] + end[0]) / 2, (start[1] + end[1]) / 2 + 0.12)
        ax.text(x, y, label, ha="center", va="bottom", fontsize=7.4, style="italic")


def draw(out: Path) -> None:
    """Lay the pipeline out left to right (image path on top, text path below) and the engine targets underneath."""
    fig, ax = plt.subplots(figsize=(13.5, 7.6))
    ax.set_xlim(0, 13.5)
    ax.set_ylim(0, 7.6)
    ax.axis("off")

    # Image path.
    box(ax, 0.2, 5.6, 1.8, 1.4, "tile(s)", "RGB / SAR / IR /\nmultispectral;\none, or before+after", "input")
    box(ax, 2.5, 5.6, 2.0, 1.4, "sensor stems", "vision_stem_{rgb,sar,\nir,ms}.onnx\nbands -> 3 channels", "vision")
    box(ax, 5.0, 5.6, 2.1, 1.4, "vision encoder", "vision_encoder.onnx\nViT + CNN branch\n+ projector", "vision")
    arrow(ax, (2.0, 6.3), (2.5, 6.3))
    arrow(ax, (4.5, 6.3), (5.0, 6.3))

    # Text path.
    box(ax, 0.2, 3.3, 1.8, 1.4, "instruction", "\"[VG] Locate the\nplane.\" or\nuntagged text", "input")
    box(ax, 2.5, 3.3, 2.0, 1.4, "embedding", "embedding.onnx\ntoken ids -> vectors", "text")
    box(ax, 5.0, 3.3, 2.1, 1.4, "routing", "task tag (as given)\nrouter.onnx (no tag)\ntag rule (converted,\nno router)", "text")
    arrow(ax, (2.0, 4.0), (2.5, 4.0))
    arrow(ax, (4.5, 4.0), (5.0, 4.0))

    # Expert cache with the decoders: one trunk, three expert FFN files.
    ax.add_patch(FancyBboxPatch((7.9, 3.0), 3.1, 4.2, boxstyle="round,pad=0.02,rounding_size=0.1",
                                fc=COLOURS["cache"], ec="#444444", lw=1.0, ls="--"))
    ax.text(9.45, 7.05, "expert cache", ha="center", va="top", fontsize=9.5, fontweight="bold")
    ax.text(9.45, 6.75, "LRU under --expert-budget;\nrouted expert loads while the\nvision encoder runs",
            ha="center", va="top", fontsize=7.4, linespacing=1.3)
    for i, name in enumerate(["image  (expert 0)", "region  (expert 1)", "pixel  (expert 2)"]):
        box(ax, 8.1, 5.1 - i * 0.55, 2.7, 0.45, name, "", "decoder")
    box(ax, 8.1, 3.15, 2.7, 0.7, "shared trunk", "decoder_trunk.bin, mapped once", "decoder")
    ax.text(7.95, 2.88, "decoder_expert{e}.onnx = trunk (attention, norms,\nlm_head) + expert e's FFN file; KV cache\n"
            "preallocated, new entries written in place", ha="left", va="top", fontsize=7.2, linespacing=1.3)

    # Visual tokens and instruction embeddings feed the routed decoder.
    arrow(ax, (7.1, 6.3), (8.1, 5.35), "visual tokens", at=(7.5, 6.4))
    arrow(ax, (7.1, 4.0), (8.1, 4.55), "picks expert", at=(7.5, 3.7))

    # Outputs.
    box(ax, 11.5, 5.6, 1.8, 1.4, "text", "caption, answer,\nclass, boxes,\n24x24 mask runs", "output")
    box(ax, 11.5, 3.3, 1.8, 1.5, "box pointer",
        "box_pointer.onnx\n[VG]: answer state\nscores the patches;\nthat patch's box", "output")
    arrow(ax, (10.8, 5.5), (11.5, 6.1), "tokens", at=(11.0, 5.95))
    arrow(ax, (10.8, 4.5), (11.5, 4.05), "states", at=(11.25, 4.35))
    arrow(ax, (12.4, 4.8), (12.4, 5.6), "box as text", at=(12.95, 5.1))

    # Engines per target.
    ax.plot([0.2, 13.3], [1.95, 1.95], color="#999999", lw=0.8)
    ax.text(0.2, 1.8, "one engine dir per target (manifest.json: files, sha256, shapes, precision)",
            ha="left", va="top", fontsize=8.5, fontweight="bold")
    box(ax, 0.2, 0.15, 4.2, 1.3, "ONNX Runtime, CPU  (backend ort)",
        "x86-64 / ARM64; FP32, INT8 Q/DQ (calibrate),\nINT8 weight-only (MatMulNBits)", "engine")
    box(ax, 4.65, 0.15, 4.2, 1.3, "TensorRT, Jetson Orin  (backend trt)",
        "presets orin-nano / orin-nx / orin-agx;\nFP16 / INT8; DLA for the vision encoder", "engine")
    box(ax, 9.1, 0.15, 4.2, 1.3, "TensorRT, datacenter GPU  (backend trt)",
        "preset datacenter: batch up to 16,\nfull context; FP16 / INT8", "engine")

    fig.savefig(out, dpi=110, bbox_inches="tight", facecolor="white")
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("pipeline.png"), help="PNG to write")
    draw(parser.parse_args().out)


if __name__ == "__main__":
    main()
