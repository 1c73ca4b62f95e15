"""Compare two backends on the same random requests: per-component max abs diff and greedy token agreement.

Used for FP16-vs-FP32 reports (``TorchBackend`` in FP32 as the reference, the FP16 ``OrtBackend`` as candidate)
and works for any pair of :class:`~rsvlm_edge.backends.base.Backend` s: it only uses the Backend interface, so it
needs no tokenizer (prompts are random token ids with one image's visual tokens spliced in front).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from rsvlm_edge.backends.base import Backend


def _prompt(backend: Backend, ids: np.ndarray, pixels: np.ndarray, sensor: str) -> tuple[np.ndarray, np.ndarray]:
    visual = backend.encode_images(pixels[None], sensor)
    embeds = backend.embed(ids[None])
    embeds[0, : visual.shape[1]] = visual[0]
    return embeds, visual


def _greedy(backend: Backend, embeds: np.ndarray, expert: int, steps: int, forced: list[int] | None = None):
    """Greedy decode; with ``forced`` feed those tokens instead of the argmax. Returns argmaxes and logits."""
    s = embeds.shape[1]
    cache = backend.new_cache(1, s + steps + 1, expert)
    mask = np.ones((1, s + steps + 1), dtype=np.float32)
    logits = backend.forward(cache, embeds, np.arange(s, dtype=np.int32)[None], mask[:, :s])
    tokens, all_logits = [], [logits[0].copy()]
    for step in range(steps):
        tok = int(np.argmax(logits[0]))
        tokens.append(tok)
        feed = forced[step] if forced is not None else tok
        pos = np.array([[s + step]], dtype=np.int32)
        logits = backend.forward(cache, backend.embed(np.array([[feed]], dtype=np.int32)), pos, mask[:, : s + step + 1])
        all_logits.append(logits[0].copy())
    return tokens, all_logits


def compare_backends(reference: Backend, candidate: Backend, prompts: int = 3, steps: int = 8, text_tokens: int = 12,
                     seed: int = 0, sensor: str | None = None) -> dict[str, Any]:
    """Max abs diffs (visual tokens, embeddings, router logits of models with a router, decoder logits) and greedy
    agreement.

    ``token_agreement``: fraction of positions where the two free-running greedy sequences agree (up to the first
    divergence everything after counts as disagreement). ``teacher_forced_agreement``: both fed the reference's
    tokens, fraction of steps whose argmax agrees (insensitive to one early flip).
    """
    cfg = reference.config
    rng = np.random.default_rng(seed)
    sensor = sensor or next(iter(cfg.sensors))
    diffs = {"visual_tokens": 0.0, "embedding": 0.0, **({"router_logits": 0.0} if cfg.router else {}), "logits": 0.0}
    same_seq = agree = forced_agree = total = 0
    for p in range(prompts):
        expert = p % cfg.num_experts
        pixels = rng.normal(size=(cfg.sensors[sensor], cfg.image_size, cfg.image_size)).astype(np.float32)
        ids = rng.integers(0, cfg.vocab_size, size=cfg.num_visual_tokens + text_tokens).astype(np.int32)
        ref_embeds, ref_visual = _prompt(reference, ids, pixels, sensor)
        cand_embeds, cand_visual = _prompt(candidate, ids, pixels, sensor)
        diffs["visual_tokens"] = max(diffs["visual_tokens"], float(np.abs(ref_visual - cand_visual).max()))
        text = ids[None, cfg.num_visual_tokens:]
        diffs["embedding"] = max(diffs["embedding"], float(np.abs(reference.embed(text) - candidate.embed(text)).max()))
        if cfg.router:
            mask = np.ones(text.shape, dtype=np.float32)
            r = reference.route(reference.embed(text), mask) - candidate.route(candidate.embed(text), mask)
            diffs["router_logits"] = max(diffs["router_logits"], float(np.abs(r).max()))
        ref_tokens, ref_logits = _greedy(reference, ref_embeds, expert, steps)
        forced_tokens, forced_logits = _greedy(candidate, cand_embeds, expert, steps, forced=ref_tokens)
        free_tokens, _ = _greedy(candidate, cand_embeds, expert, steps)
        for a, b in zip(ref_logits, forced_logits):
            diffs["logits"] = max(diffs["logits"], float(np.abs(a - b).max()))
        same_seq += ref_tokens == free_tokens
        prefix = next((i for i, (a, b) in enumerate(zip(ref_tokens, free_tokens)) if a != b), steps)
        agree += prefix
        forced_agree += sum(a == b for a, b in zip(ref_tokens, forced_tokens))
        total += steps
    return {"max_abs_diff": diffs,
            "greedy": {"prompts": prompts, "steps": steps, "sequences_identical": same_seq,
                       "token_agreement": agree / total if total else 1.0,
                       "teacher_forced_agreement": forced_agree / total if total else 1.0}}


def format_comparison(report: dict[str, Any], what: str = "fp16 vs fp32") -> str:
    d, g = report["max_abs_diff"], report["greedy"]
    router = f"router logits {d['router_logits']:.3g}, " if "router_logits" in d else ""
    return (f"{what}: max abs diff visual tokens {d['visual_tokens']:.3g}, embedding {d['embedding']:.3g}, "
            f"{router}decoder logits {d['logits']:.3g}; greedy: "
            f"{g['sequences_identical']}/{g['prompts']} sequences identical, token agreement "
            f"{g['token_agreement']:.1%}, teacher-forced top-1 agreement {g['teacher_forced_agreement']:.1%} "
            f"({g['steps']} steps each)")
