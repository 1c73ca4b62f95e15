"""Write a model dir's MODEL_CARD.md from an eval report (JSON written by `rsvlm-edge eval --out`).

Every metric in the card is copied from the report, and the card names the command that produced it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rsvlm_edge.config import ModelConfig
from rsvlm_edge.fileio import atomic_write_text

#: (report key, label, issue target or None) in card order.
HEADLINE = [
    ("aid/cls/accuracy", "AID scene classification top-1 (real, held-out)", 0.60),
    ("rsvqa_lr/vqa/accuracy_presence", "RSVQA-LR presence accuracy (real, held-out images)", 0.75),
    ("rsvqa_lr/vqa/accuracy_comp", "RSVQA-LR comparison accuracy", 0.75),
    ("rsvqa_lr/vqa/accuracy_count", "RSVQA-LR count accuracy", None),
    ("rsvqa_lr/vqa/accuracy_rural_urban", "RSVQA-LR rural/urban accuracy", None),
    ("levir_cd/seg/change_f1", "LEVIR-CD change F1 (pixel level, real)", 0.30),
    ("detection/det/f1", "Synthetic detection F1@0.5 (held-out [DET] samples)", 0.50),
    ("oriented/obb/f1", "Synthetic oriented detection F1@0.5, rotated IoU (held-out [OBB] samples)", 0.40),
    ("segmentation/seg/miou", "Synthetic mask mIoU (held-out one-image [SEG] samples)", 0.40),
    ("change/seg/change_f1", "Synthetic change-mask F1 (held-out two-image [SEG] samples)", 0.40),
    ("hrsid/det/f1", "HRSID SAR ship detection F1@0.5 (real, held-out crops)", None),
    ("sirst/seg/miou", "SIRST infrared small-target IoU (real, held-out)", None),
    ("sirst/det/f1", "SIRST infrared small-target detection F1@0.5", None),
    ("grounding/vg/acc@0.5", "Synthetic grounding Acc@0.5 (held-out [VG] samples)", 0.50),
    ("synthetic/vg/acc@0.5", "Synthetic grounding Acc@0.5 (the [VG] share of the synthetic mix)", None),
    ("router/accuracy", "Router picks the tag's expert for untagged prompts", 0.95),
]


def train_log_summary(rows: list[dict[str, Any]], log_every: int) -> list[str]:
    """Steps, step time and losses from ``train_log.jsonl`` (one row every ``log_every`` steps, each with its
    step's seconds, data drawing included): the compute figure is the logged steps' mean times the step count."""
    lines = []
    for stage in ("vision", "align", "instruct"):
        stage_rows = [r for r in rows if r.get("stage") == stage]
        if not stage_rows:
            continue
        secs = [float(r["sec"]) for r in stage_rows]
        steps = max(int(r["step"]) for r in stage_rows) - (min(int(r["step"]) for r in stage_rows) - log_every)
        tail = stage_rows[-10:]
        key = "loss" if stage == "vision" else "lm_loss"  # the vision stage has no language-model loss
        lines.append(f"- {stage}: {steps} steps, {sum(secs) / len(secs):.2f} s per step (mean of {len(secs)} logged), "
                     f"about {steps * sum(secs) / len(secs) / 60:.0f} min; final loss "
                     f"{sum(float(r[key]) for r in tail) / len(tail):.3f} (mean of the last {len(tail)} logged)")
        pointed = [r for r in stage_rows if "pointer_acc" in r][-10:]
        if pointed:  # training batches, not held out: the eval report has the held-out figure
            lines.append(f"- {stage}: box pointer on its training batches' [VG] rows: patch accuracy "
                         f"{sum(float(r['pointer_acc']) for r in pointed) / len(pointed):.3f}, box L1 "
                         f"{sum(float(r['box_l1']) for r in pointed) / len(pointed):.4f} (image sizes; mean of the last "
                         f"{len(pointed)} logged)")
    walls = [float(r["wall_s"]) for r in rows if "wall_s" in r]
    if walls:
        lines.append(f"- wall time of the whole run (every stage, data drawing and checkpoints included, summed over "
                     f"resumes): {max(walls) / 60:.0f} min")
    for r in rows:
        if r.get("stage") == "vision_eval" and "heldout_scene_acc" in r:
            lines.append(f"- after the vision stage, the training-only scene head scored "
                         f"{float(r['heldout_scene_acc']):.3f} top-1 on {r['heldout_n']} held-out AID tiles")
    return lines


def render(model_dir: Path, report: dict[str, Any], command: str, train_config: dict[str, Any] | None,
           train_log: list[dict[str, Any]] | None = None) -> str:
    cfg = ModelConfig.load(model_dir / "config.json")
    lines = [
        f"# {cfg.name} demo model",
        "",
        "A small RSUniVLM-style MoE VLM (ViT + CNN vision branch, sensor stems for RGB/SAR/IR/multispectral, "
        f"{cfg.num_layers}-layer Qwen2-style decoder with 3 granularity experts, instruction router), trained from "
        "scratch on CPU by `scripts/train_demo.sh` on the synthetic multi-sensor generator plus the real sample sets "
        "(AID, RSVQA-LR, LEVIR-CD, SIRST, BigEarthNet, DOTA, HRSID train splits).",
        "",
        f"Shapes: {cfg.image_size}px input, {cfg.num_visual_tokens} visual tokens per image, hidden {cfg.hidden_size}, "
        f"vocab {cfg.vocab_size}. Weights: fp16 safetensors.",
        "",
        "It is a demonstration model: it learns the task formats and the sensors, not world knowledge. Captions of real "
        "images come only from templates over labels (no real caption set was available).",
        "",
    ]
    if cfg.box_pointer:
        lines += [
            f"Grounding ([VG]) answers come from its box pointer, not from sampled text: the state that starts the "
            f"answer points at one of the {cfg.grid_size}x{cfg.grid_size} image patches, and that patch's box head "
            f"gives the box, which the runtime writes as `[x1, y1, x2, y2]` and feeds back through the decoder. "
            f"`vg/pointer_share` in the report is the share of [VG] answers written this way.",
            "",
        ]
    if cfg.dense_heads:
        lines += [
            f"[DET], [OBB] and [SEG] answers (change masks on image pairs) come from its dense heads, trained on the "
            f"frozen trunk by `scripts/train_dense.sh`: per patch the objects centred in it (label probability, box, "
            f"oriented box) and its mask cells' label and change probabilities, plus the labels the instruction asks "
            f"for; the runtime writes them as the task's text (labels: {', '.join(cfg.dense_labels)}).",
            "",
        ]
    lines += [
        "## Measured metrics",
        "",
        f"Produced by: `{command}`",
        "",
        "| metric | value | target |",
        "|---|---|---|",
    ]
    for key, label, target in HEADLINE:
        if key in report:
            value = report[key]
            met = "" if target is None else (f"{target:.2f} ({'met' if value >= target else 'not met'})")
            lines.append(f"| {label} | {value:.3f} | {met} |")
        else:
            lines.append(f"| {label} | not measured | |")
    lines += ["", "## Full report", "", "| key | value |", "|---|---|"]
    for key, value in report.items():
        shown = f"{value:.4f}" if isinstance(value, float) else str(value)
        lines.append(f"| {key} | {shown} |")
    if train_log:
        lines += ["", "## Training run", "", *train_log_summary(train_log, (train_config or {}).get("log_every", 10))]
    if train_config:
        lines += ["", "## Training", "", "```json", json.dumps(train_config, indent=2), "```"]
    return "\n".join(lines) + "\n"


def write_card(model_dir: str | Path, report_path: str | Path, command: str) -> Path:
    model_dir = Path(model_dir)
    report = json.loads(Path(report_path).read_text())
    train_cfg_path = model_dir / "train_config.json"
    train_cfg = json.loads(train_cfg_path.read_text()) if train_cfg_path.exists() else None
    log_path = model_dir / "train_log.jsonl"
    train_log = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()] if log_path.exists() else None
    out = model_dir / "MODEL_CARD.md"
    atomic_write_text(out, render(model_dir, report, command, train_cfg, train_log))
    return out


if __name__ == "__main__":  # pragma: no cover
    import sys

    if len(sys.argv) != 4:
        raise SystemExit("usage: python -m rsvlm_edge.training.model_card MODEL_DIR REPORT_JSON 'COMMAND'")
    print(write_card(sys.argv[1], sys.argv[2], sys.argv[3]))
