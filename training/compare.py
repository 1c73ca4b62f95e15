"""Compare two engine dirs (e.g. FP32 vs INT8) on the same held-out samples: per-task metric deltas and greedy
token agreement.

Agreement is teacher-forced: model B is fed model A's greedy answer token by token (A's expert, forced) and each
step counts whether B's argmax is A's next token (the stop token included). Free-running comparisons collapse after
the first differing token; this one measures every position. Answers decoded under their grammar (``constrain``)
are compared under it too: B's argmax is taken over the tokens the grammar allowed A at that step. Answers a head
wrote (the box pointer, the dense heads) were never the LM's argmax: they count as ``head_answers_same``, the share
whose text B's own heads wrote identically.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np

from rsvlm_edge.generation import Generator, Request
from rsvlm_edge.preprocess import prepare_image
from rsvlm_edge.sampling import SamplingConfig
from rsvlm_edge.training.evaluate import Prediction, loaded_suites, predict, router_accuracy, score


def prefill(gen: Generator, request: Request, expert: int, extra_capacity: int = 0):
    """Run one request's prompt (image tokens spliced in) through ``expert``: (cache with room for
    ``extra_capacity`` more tokens, the first step's logits (1, V), prompt length)."""
    batch = gen.splice_images([gen.prompt(request)], gen.encode_images([request]))
    cache = gen.backend.new_cache(1, batch.width + extra_capacity, expert)
    logits, _ = gen.prefill(cache, batch.embeds, batch.positions, batch.mask)
    return cache, logits, batch.width


def forced_agreement(gen: Generator, request: Request, expert: int, reference: list[int],
                     constrain: bool = False) -> tuple[int, int]:
    """(steps where ``gen``'s argmax equals ``reference``, steps) with ``reference`` fed back as the answer;
    ``constrain``: the argmax over the tokens the answer's grammar allows at each step."""
    if not reference:
        return 0, 0
    backend = gen.backend
    cache, logits, n = prefill(gen, request, expert, len(reference))
    agree, vocab = 0, gen.tokenizer.vocab_size  # the sampler never picks ids past the tokenizer's vocabulary
    grammar = gen.constraint(SamplingConfig(constrain=constrain), request.prompt)
    for k, token in enumerate(reference):
        step = logits[0, :vocab]
        if grammar is not None:
            step = np.where(grammar.allowed(), step, -np.inf)
            grammar.advance(token)
        agree += int(int(np.argmax(step)) == token)
        if k + 1 == len(reference):
            break
        logits = backend.forward(cache, backend.embed(np.asarray([[token]], np.int32)),
                                 np.asarray([[n + k]], np.int32), np.ones((1, cache.length + 1), np.float32))
    return agree, len(reference)


def agreement(gen_b: Generator, preds_a: list[Prediction], progress: Callable[[int], None] | None = None,
              constrain: bool = False, preds_b: list[Prediction] | None = None) -> dict[str, float]:
    size, mode = gen_b.config.image_size, gen_b.config.image_preprocess  # the model's own preprocessing
    end = gen_b.tokenizer.end_id
    agree = total = exact = 0
    others: list[Prediction | None] = list(preds_b) if preds_b is not None else [None] * len(preds_a)
    headed = [(p, b) for p, b in zip(preds_a, others) if p.headed]
    for p in preds_a:
        if p.headed:
            if progress:
                progress(1)
            continue
        request = Request(pixels=[prepare_image(im, p.sample.sensor, size, mode=mode) for im in p.sample.images],
                          sensor=p.sample.sensor, prompt=p.sample.prompt, expert=p.expert)
        reference = list(p.token_ids) + ([end] if p.finish_reason == "stop" else [])
        a, t = forced_agreement(gen_b, request, p.expert, reference, constrain)
        agree, total, exact = agree + a, total + t, exact + int(a == t)
        if progress:
            progress(1)
    out: dict[str, float] = {"token_agreement": agree / total if total else 1.0,
                             "exact_answers": exact / max(1, len(preds_a) - len(headed)), "tokens": total}
    if headed and preds_b is not None:
        out["head_answers_same"] = sum(b is not None and b.text == p.text for p, b in headed) / len(headed)
    return out


def compare(gen_a: Generator, gen_b: Generator, suites: list[str], limit: int | None = None,
            data_root: Path | None = None, batch_size: int = 8, progress: bool = True,
            constrain: bool = True) -> dict[str, Any]:
    """``{suite/metric: {"a", "b", "delta"}}`` plus ``{suite}/token_agreement`` etc. (B fed A's answers);
    ``constrain``: both decode under the answer grammars, and agreement is counted under them."""
    from tqdm import tqdm

    report: dict[str, Any] = {}
    agree_all = tokens_all = 0.0
    for suite, samples in loaded_suites(suites, limit, data_root, report):
        if suite == "router":
            a, b = router_accuracy(gen_a, samples), router_accuracy(gen_b, samples)
            report.update(_deltas(a, b))
            continue
        with tqdm(total=3 * len(samples), desc=f"compare {suite}", disable=not progress, dynamic_ncols=True) as bar:
            preds_a = predict(gen_a, samples, batch_size=batch_size, progress=bar.update, constrain=constrain)
            preds_b = predict(gen_b, samples, batch_size=batch_size, progress=bar.update, constrain=constrain)
            agr = agreement(gen_b, preds_a, progress=bar.update, constrain=constrain, preds_b=preds_b)
        report.update({f"{suite}/{k}": v for k, v in _deltas(score(preds_a), score(preds_b)).items()})
        report.update({f"{suite}/{k}": v for k, v in agr.items()})
        agree_all += float(agr["token_agreement"]) * agr["tokens"]
        tokens_all += agr["tokens"]
    if tokens_all:
        report["all/token_agreement"] = agree_all / tokens_all
    return report


def _deltas(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in a:
        va, vb = a[key], b.get(key)
        if key.endswith("/n") or not isinstance(va, float) or not isinstance(vb, float):
            continue
        out[key] = {"a": va, "b": vb, "delta": vb - va}
    return out


def format_comparison(report: dict[str, Any], name_a: str, name_b: str) -> str:
    rows = [(k, v) for k, v in report.items()]
    width = max((len(k) for k, _ in rows), default=10)
    lines = [f"{'metric':<{width}}  {'A':>8}  {'B':>8}  {'B - A':>8}    A = {name_a}, B = {name_b}"]
    for key, value in rows:
        if isinstance(value, dict):
            lines.append(f"{key:<{width}}  {value['a']:8.4f}  {value['b']:8.4f}  {value['delta']:+8.4f}")
        elif isinstance(value, float):
            lines.append(f"{key:<{width}}  {value:8.4f}")
        else:
            lines.append(f"{key:<{width}}  {value}")
    return "\n".join(lines)
