"""`rsvlm-edge train` and `rsvlm-edge eval` (torch is imported only when they run)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import click

from rsvlm_edge.config import PRESETS
from rsvlm_edge.pipeline import BACKENDS


def _data_root(value: str | None) -> Path | None:
    return Path(value) if value else None


@click.command("train")
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--config", "config_name", type=click.Choice(sorted(PRESETS)), default="tiny", show_default=True)
@click.option("--vision-steps", default=0, show_default=True,
              help="Stage 0: the vision encoder alone learns scene classes and per-patch boxes (training-only heads).")
@click.option("--vision-batch-size", default=64, show_default=True)
@click.option("--align-steps", default=300, show_default=True, help="Stage 1: captions/classes through expert 0.")
@click.option("--instruct-steps", default=1500, show_default=True, help="Stage 2: all tasks, tag-routed experts + router.")
@click.option("--batch-size", default=24, show_default=True)
@click.option("--lr", default=1e-3, show_default=True)
@click.option("--untagged-share", default=0.2, show_default=True, help="Share of prompts trained without their tag.")
@click.option("--data", "data_root", type=click.Path(file_okay=False), help="Real data root (default ../shared/data).")
@click.option("--real-limit", type=int, help="Use at most this many samples per real set (quick runs).")
@click.option("--threads", default=0, help="torch threads (0 = all cores).")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), default="auto", show_default=True,
              help="Compute precision: bf16 autocast (fp32 master weights) halves step time on CPUs with AVX512-BF16 "
              "or AMX; auto picks it where the CPU has it.")
@click.option("--token-pos-embed/--no-token-pos-embed", default=None,
              help="Add a learned 2-D position embedding to the visual tokens (default: as the preset says; tiny: off).")
@click.option("--box-pointer/--no-box-pointer", default=None,
              help="Train a pointer from a box answer's first state to the image patches, plus a per-patch box head "
              "(ModelConfig.box_pointer; exported as its own component, and the runtime writes [VG] boxes with it).")
@click.option("--seed", default=0, show_default=True)
@click.option("--save-every", default=100, show_default=True, help="Checkpoint every N steps (resume by re-running).")
def train_command(out_dir, config_name, vision_steps, vision_batch_size, align_steps, instruct_steps, batch_size, lr,
                  untagged_share, data_root, real_limit, threads, precision, token_pos_embed, box_pointer, seed,
                  save_every) -> None:
    """Train the MoE VLM (optional vision stage, then two stages) and write OUT_DIR/model (config, fp16 safetensors, tokenizer).

    Re-running the same command resumes from OUT_DIR/checkpoint.pt. The loss log is OUT_DIR/train_log.jsonl.
    """
    from rsvlm_edge.config import preset
    from rsvlm_edge.tokenizer import Tokenizer
    from rsvlm_edge.training.bootstrap import train_tokenizer
    from rsvlm_edge.training.recipe import Recipe
    from rsvlm_edge.training.train import TrainConfig, Trainer

    cfg = preset(config_name)
    if token_pos_embed is not None:
        cfg = dataclasses.replace(cfg, token_pos_embed=token_pos_embed).validate()
    if box_pointer is not None:
        cfg = dataclasses.replace(cfg, box_pointer=box_pointer).validate()
    out = Path(out_dir)
    tc = TrainConfig(vision_steps=vision_steps, vision_batch_size=vision_batch_size, align_steps=align_steps,
                     instruct_steps=instruct_steps, batch_size=batch_size, lr=lr, untagged_share=untagged_share,
                     threads=threads, precision=precision, seed=seed, save_every=save_every)
    tok_path = out / "tokenizer.json"
    recipe_args = dict(data_root=_data_root(data_root), seed=seed, untagged_share=untagged_share, real_limit=real_limit)
    recipe = Recipe(cfg, None, **recipe_args)  # type: ignore[arg-type]  # tokenizer set below
    if tok_path.exists():
        tokenizer = Tokenizer.load(tok_path)
    else:
        click.echo("training the tokenizer on synthetic + real prompts/answers ...", err=True)
        tokenizer = train_tokenizer(cfg.vocab_size, n_synthetic=3000, seed=seed, extra=recipe.real_texts())
        out.mkdir(parents=True, exist_ok=True)
        tokenizer.save(tok_path)
    recipe.tokenizer = tokenizer
    scenes = len(recipe.scene_vocabulary()) if vision_steps else 0
    model_dir = Trainer(out, cfg, tokenizer, tc, recipe, num_scene_classes=scenes).run()
    click.echo(f"model written to {model_dir}")


@click.command("eval")
@click.argument("model_dir", required=False, type=click.Path(exists=True, file_okay=False))
@click.option("--compare", "compare_dirs", nargs=2, type=click.Path(exists=True, file_okay=False),
              metavar="DIR_A DIR_B", help="Compare two engine dirs (e.g. fp32 and int8) on the same samples: per-task "
              "metrics of both, B - A deltas and teacher-forced greedy token agreement of B with A's answers.")
@click.option("--backend", type=click.Choice(BACKENDS), default="ort", show_default=True)
@click.option("--suite", "suites", multiple=True,
              type=click.Choice(["synthetic", "router", "grounding", "detection", "oriented", "segmentation", "change",
                                 "aid", "rsvqa_lr", "levir_cd", "sirst", "hrsid", "dota", "bigearthnet"]),
              help="Held-out sets to score (repeatable; default: synthetic, router, aid, rsvqa_lr, levir_cd). "
                   "grounding, detection, oriented: synthetic [VG], [DET], [OBB] samples only; segmentation, change: "
                   "synthetic one-image [SEG] masks, two-image change masks.")
@click.option("--limit", type=click.IntRange(min=1), default=200, show_default=True,
              help="Samples per suite (seeded subset).")
@click.option("--batch-size", default=8, show_default=True)
@click.option("--threads", type=click.IntRange(min=0), default=0,
              help="ONNX Runtime threads (0 = auto, as infer chooses for the model).")
@click.option("--data", "data_root", type=click.Path(file_okay=False), help="Real data root (default ../shared/data).")
@click.option("--out", "out_path", type=click.Path(dir_okay=False), help="Also write the report as JSON here.")
@click.option("--constrain/--no-constrain", default=True, show_default=True,
              help="Mask each tagged answer to its grammar, as infer does (--no-constrain: free decoding).")
@click.option("--reliability", is_flag=True,
              help="Also report how well answer scores track being right: a reliability curve, ECE and AUROC for "
                   "[CLS] answers, [VG] boxes and [DET]/[OBB] items.")
def eval_command(model_dir, compare_dirs, backend, suites, limit, batch_size, threads, data_root, out_path, constrain,
                 reliability) -> None:
    """Score a model per task: accuracy, BLEU-4/CIDEr, box Acc@0.5, detection F1, mask mIoU, change F1, router accuracy.

    \b
    rsvlm-edge eval engines/tiny --out report.json
    rsvlm-edge eval --compare engines/tiny engines/tiny-int8 --limit 50   # INT8 vs FP32: deltas + token agreement
    """
    from rsvlm_edge.fileio import atomic_write_text
    from rsvlm_edge.pipeline import Pipeline
    from rsvlm_edge.training.evaluate import evaluate, format_report

    if bool(model_dir) == bool(compare_dirs):
        raise click.UsageError("give MODEL_DIR, or --compare DIR_A DIR_B (not both)")
    suites = list(suites) or ["synthetic", "router", "aid", "rsvqa_lr", "levir_cd"]
    options = {"threads": threads} if threads and backend == "ort" else {}
    if compare_dirs:
        from rsvlm_edge.training.compare import compare, format_comparison

        pipes = [Pipeline(d, backend=backend, **options) for d in compare_dirs]
        try:
            report = compare(pipes[0].generator, pipes[1].generator, suites, limit=limit,
                             data_root=_data_root(data_root), batch_size=batch_size, constrain=constrain)
        finally:
            for pipe in pipes:
                pipe.close()
        report = {"a": str(compare_dirs[0]), "b": str(compare_dirs[1]), "backend": backend, "limit": limit, **report}
        click.echo(format_comparison(report, *compare_dirs))
    else:
        pipe = Pipeline(model_dir, backend=backend, **options)
        try:
            report = evaluate(pipe.generator, suites, limit=limit, data_root=_data_root(data_root), batch_size=batch_size,
                              constrain=constrain, reliability=reliability)
        finally:
            pipe.close()
        report = {"model": str(model_dir), "backend": backend, "limit": limit, "constrain": constrain, **report}
        click.echo(format_report(report))
    if out_path:
        atomic_write_text(out_path, json.dumps(report, indent=2) + "\n")
