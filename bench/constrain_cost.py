"""What grammar-constrained decoding and answer scores add to each decode step, per task tag, for a tokenizer.

``python -m rsvlm_edge.bench.constrain_cost --tokenizer DIR/tokenizer.json [--step-ms 14.7] [--json out.json]``

The cost depends on the tokenizer (llguidance walks its token trie each step), not on the model's weights, so it is
measured without an engine: each tag's well-formed answer (the formatters' output for a dense scene: 40 detections,
a 3-label mask ...) is replayed token by token through :class:`~rsvlm_edge.sampling.TokenSampler` with random
logits of the tokenizer's vocabulary size, once with the grammar and once without. Printed per tag: the sampler
time per step both ways (the mean over the answer's tokens) and their difference, the constraint's overhead, and, given
``--step-ms`` (a decode step of the engine it is compared with, e.g. from ``rsvlm-edge bench``), that overhead as
a share of the step. ``--outlines`` also times outlines-core's regex index on the [VG] box list, as the alternative
engine (its grammars are regular expressions: the mask's per-row cell count and the detection lists' labels make
DFAs that its whole-vocabulary index has to cover up front).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from typing import Any

import numpy as np

from rsvlm_edge import formats
from rsvlm_edge.constrain import CONSTRAINED_TAGS, Constraints
from rsvlm_edge.machine import cpu_description
from rsvlm_edge.sampling import SamplingConfig, TokenSampler
from rsvlm_edge.templates import get_template
from rsvlm_edge.tokenizer import Tokenizer


def dense_answers(seed: int = 0) -> dict[str, str]:
    """Per constrained tag, a long well-formed answer: the replayed token stream."""
    rng = np.random.default_rng(seed)
    labels = ["small-vehicle", "storage tank", "plane"]

    def box() -> list[int]:
        x, y = rng.integers(0, 90, 2)
        return [int(x), int(y), int(x + rng.integers(1, 10)), int(y + rng.integers(1, 10))]

    grid = [["others"] * formats.MASK_SIZE for _ in range(formats.MASK_SIZE)]
    for r in range(formats.MASK_SIZE):
        a, b = sorted(rng.integers(0, formats.MASK_SIZE, 2))
        grid[r][a:b + 1] = [labels[r % 3]] * (b + 1 - a)
    return {
        "[VG]": formats.format_box(box()),
        "[CLS]": "airport, dense residential",
        "[DET]": formats.format_detections([(labels[i % 3], box()) for i in range(40)]),
        "[OBB]": formats.format_oriented_detections(
            [(labels[i % 3], [*box()[:2], 6, 3, int(rng.integers(-90, 90))]) for i in range(40)]),
        "[SEG]": formats.format_mask(grid),
    }


def replay_ms(tokenizer: Tokenizer, ids: list[int], constraints: Constraints | None, tag: str,
              rng: np.random.Generator) -> list[float]:
    """Milliseconds the greedy sampler spends on each token of ``ids``: the mask (with ``constraints``), the pick and
    the score. Random logits, with the replayed token's made the largest, so the sampler picks it."""
    sampler = TokenSampler(SamplingConfig(), tokenizer.vocab_size,
                           constraint=constraints.matcher(tag) if constraints else None)
    times = []
    for token in ids:
        logits = rng.standard_normal(tokenizer.vocab_size).astype(np.float32)
        logits[token] = logits.max() + 1.0
        t0 = time.perf_counter()
        picked = sampler(logits)
        times.append((time.perf_counter() - t0) * 1e3)
        if picked != token:
            raise RuntimeError(f"{tag}: the replayed answer left the grammar at token {token}")
    return times


def outlines_ms(tokenizer: Tokenizer, text: str, regex: str) -> dict[str, float]:
    """outlines-core: seconds to build the regex's token index, and the median per-step mask time replaying ``text``."""
    from outlines_core import Guide, Index, Vocabulary

    vocab: dict[str, list[int]] = {}
    for i in range(tokenizer.vocab_size):
        if i in tokenizer.special_ids:
            continue
        vocab.setdefault(tokenizer.token_bytes(i).decode("latin-1"), []).append(i)
    t0 = time.perf_counter()
    index = Index(regex, Vocabulary(tokenizer.end_id, vocab))
    build = time.perf_counter() - t0
    guide = Guide(index)
    steps = []
    for token in tokenizer.encode(text):
        t0 = time.perf_counter()
        allowed = np.zeros(tokenizer.vocab_size, dtype=bool)
        allowed[np.asarray(guide.get_tokens(), dtype=np.int64)] = True
        steps.append((time.perf_counter() - t0) * 1e3)
        guide.advance(token)
    return {"index_build_s": build, "mask_ms_median": statistics.median(steps)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizer", required=True, help="tokenizer.json of the model to price the grammar for")
    parser.add_argument("--template", default="rsvlm", help="the model's prompt template (qwen_1_5 for RSUniVLM)")
    parser.add_argument("--step-ms", type=float, help="a decode step of the compared engine, in milliseconds")
    parser.add_argument("--outlines", action="store_true", help="also time outlines-core on [VG]")
    parser.add_argument("--json", dest="json_path", help="write the results here too")
    args = parser.parse_args(argv)
    tokenizer = Tokenizer.load(args.tokenizer, get_template(args.template).control)
    constraints = Constraints(tokenizer)
    rng = np.random.default_rng(0)
    report: dict[str, Any] = {"tokenizer": args.tokenizer, "vocab_size": tokenizer.vocab_size, "cpu": cpu_description(),
                              "python": platform.python_version(), "step_ms": args.step_ms, "tags": {}}
    print(f"{report['cpu']}\ntokenizer {args.tokenizer}: {tokenizer.vocab_size} tokens")
    print("sampler time per step, mean over the answer's tokens (max: the slowest grammar step)")
    print(f"{'tag':6} {'tokens':>6} {'free ms':>8} {'grammar ms':>10} {'max ms':>7} {'overhead ms':>11}"
          + (f" {'% of step':>9}" if args.step_ms else ""))
    for tag, text in dense_answers().items():
        assert tag in CONSTRAINED_TAGS
        ids = tokenizer.encode(text)
        free_steps = replay_ms(tokenizer, ids, None, tag, rng)
        masked_steps = replay_ms(tokenizer, ids, constraints, tag, rng)
        # the mean: an answer pays for every step, including the few slow ones where a label starts
        free, masked = statistics.fmean(free_steps), statistics.fmean(masked_steps)
        row = {"tokens": len(ids), "free_ms": free, "grammar_ms": masked, "overhead_ms": masked - free,
               "grammar_ms_median": statistics.median(masked_steps), "grammar_ms_max": max(masked_steps)}
        if args.step_ms:
            row["overhead_share"] = (masked - free) / args.step_ms
        report["tags"][tag] = row
        print(f"{tag:6} {len(ids):6d} {free:8.3f} {masked:10.3f} {max(masked_steps):7.2f} {masked - free:11.3f}"
              + (f" {100 * row['overhead_share']:8.1f}%" if args.step_ms else ""))
    if args.outlines:
        num = r"(100|[1-9]?[0-9])"
        box = rf"\[{num}, {num}, {num}, {num}\]"
        regexes = {"[VG]": rf"{box}( {box})*"}
        answers = dense_answers()
        for tag, regex in regexes.items():
            row = outlines_ms(tokenizer, answers[tag], regex)
            report.setdefault("outlines_core", {})[tag] = row
            print(f"outlines-core {tag}: index {row['index_build_s']:.2f} s, mask {row['mask_ms_median']:.3f} ms/step")
    if args.json_path:
        from rsvlm_edge.fileio import atomic_write_text

        atomic_write_text(args.json_path, json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
