"""One engine, one measurement, in its own process (``python -m rsvlm_edge.bench.peers.worker SPEC_JSON``), so
peak RSS is that engine's alone and each runtime loads nothing of the others.

Every engine gets the same token ids: a short warm-up (its first run pays for allocations and kernel set-up), then
a prefill of the prompt and ``new_tokens`` greedy decode steps of one token each. Prints one ``@@result <json>``
line: prefill seconds, decode tokens/s, peak RSS.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import numpy as np

from rsvlm_edge.bench.worker import RESULT, _peak_rss_bytes
from rsvlm_edge.export.rsunivlm_testing import QWEN2_BPE_TOKENS

WARMUP_TOKENS, WARMUP_STEPS = 16, 2


@dataclass
class PeerSpec:
    name: str
    kind: str  # "rsvlm" (engine dir), "genai" (model builder dir), "llama" (GGUF file), "torch" (HF dir)
    path: str
    prompt_tokens: int = 740
    new_tokens: int = 64
    threads: int = 2
    seed: int = 0
    vocab: int = QWEN2_BPE_TOKENS  # prompt ids are drawn below it: ordinary tokens in every engine's vocab
    extra_bufts: bool = True  # llama.cpp: its extra CPU buffer types (AMX, repacked Q4_0/Q8_0 weights)

    @classmethod
    def from_json(cls, text: str) -> "PeerSpec":
        return cls(**json.loads(text))

    def to_json(self) -> str:
        return json.dumps(asdict(self))


def prompt_ids(count: int, vocab: int, seed: int = 0) -> list[int]:
    """The prompt every engine prefills: ordinary-token ids drawn once from ``seed`` (special ids lie above)."""
    return np.random.default_rng(seed).integers(0, vocab, count).tolist()


#: A runner takes the prompt ids and the decode step count; returns (prefill seconds, decode seconds).
Runner = Callable[[list[int], int], tuple[float, float]]


def _rsvlm(spec: PeerSpec) -> Runner:
    """This project's ONNX Runtime engine dir, decoder only, expert 0, through the backend the pipeline uses."""
    from rsvlm_edge.pipeline import Pipeline

    backend = Pipeline(spec.path, "ort", threads=spec.threads, verify="size").backend

    def run(ids: list[int], steps: int) -> tuple[float, float]:
        t0 = time.perf_counter()
        cache = backend.new_cache(1, len(ids) + steps, 0)
        arr = np.asarray([ids], dtype=np.int32)
        logits = backend.forward(cache, backend.embed(arr), np.arange(len(ids), dtype=np.int32)[None],
                                 np.ones(arr.shape, dtype=np.float32))
        t1 = time.perf_counter()
        for pos in range(len(ids), len(ids) + steps):
            nxt = np.argmax(logits, axis=-1).astype(np.int32)[:, None]  # (1, 1)
            logits = backend.forward(cache, backend.embed(nxt), np.full((1, 1), pos, dtype=np.int32),
                                     np.ones((1, pos + 1), dtype=np.float32))
        return t1 - t0, time.perf_counter() - t1

    return run


def _genai(spec: PeerSpec) -> Runner:
    """ONNX Runtime GenAI: append_tokens is the prefill; generate_next_token runs one step and picks greedily."""
    import onnxruntime_genai as og

    config = og.Config(spec.path)
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {
        "intra_op_num_threads": spec.threads, "inter_op_num_threads": 1}}}}))
    model = og.Model(config)

    def run(ids: list[int], steps: int) -> tuple[float, float]:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(ids) + steps + 2, do_sample=False)
        gen = og.Generator(model, params)
        t0 = time.perf_counter()
        gen.append_tokens(np.asarray(ids, dtype=np.int32))
        gen.generate_next_token()  # picks the first token from the prefill's logits; each later call runs a step
        t1 = time.perf_counter()
        for _ in range(steps):
            gen.generate_next_token()
        elapsed = time.perf_counter() - t1
        del gen
        return t1 - t0, elapsed

    return run


def _llama(spec: PeerSpec) -> Runner:
    """llama.cpp through llama-cpp-python, with llama.cpp's own batch defaults (2048 logical, 512 physical)."""
    import llama_cpp
    import llama_cpp.llama

    if not spec.extra_bufts:  # Llama() takes no such argument: its default model params are the only way in
        defaults = llama_cpp.llama_model_default_params

        def without_extra_bufts() -> Any:
            params = defaults()
            params.use_extra_bufts = False
            return params

        llama_cpp.llama.llama_cpp.llama_model_default_params = without_extra_bufts
    llm = llama_cpp.Llama(spec.path, n_ctx=spec.prompt_tokens + spec.new_tokens + 16, n_batch=2048, n_ubatch=512,
                          n_threads=spec.threads, n_threads_batch=spec.threads, verbose=False)
    vocab = llm.n_vocab()

    def greedy() -> int:
        # the last position's logits straight from the context (Llama.eval keeps scores only with logits_all)
        return int(np.argmax(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(vocab,))))

    def run(ids: list[int], steps: int) -> tuple[float, float]:
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids)
        t1 = time.perf_counter()
        for _ in range(steps):
            llm.eval([greedy()])
        return t1 - t0, time.perf_counter() - t1

    return run


def _torch(spec: PeerSpec) -> Runner:
    """PyTorch eager FP32 with transformers' KV cache, as a user without this project runs the model."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(spec.threads)
    model = AutoModelForCausalLM.from_pretrained(spec.path, dtype=torch.float32).eval()

    @torch.inference_mode()
    def run(ids: list[int], steps: int) -> tuple[float, float]:
        t0 = time.perf_counter()
        out = model(torch.tensor([ids]), use_cache=True)
        t1 = time.perf_counter()
        for _ in range(steps):
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            out = model(nxt, cache=out.cache, use_cache=True)
        return t1 - t0, time.perf_counter() - t1

    return run


RUNNERS: dict[str, Callable[[PeerSpec], Runner]] = {"rsvlm": _rsvlm, "genai": _genai, "llama": _llama, "torch": _torch}


def measure(spec: PeerSpec) -> dict[str, Any]:
    if spec.kind not in RUNNERS:
        raise ValueError(f"unknown engine kind {spec.kind!r}; one of {', '.join(RUNNERS)}")
    t0 = time.perf_counter()
    run = RUNNERS[spec.kind](spec)
    load_s = time.perf_counter() - t0
    ids = prompt_ids(spec.prompt_tokens, spec.vocab, spec.seed)
    run(ids[:WARMUP_TOKENS], WARMUP_STEPS)
    prefill_s, decode_s = run(ids, spec.new_tokens)
    return {"name": spec.name, "load_s": load_s, "prefill_s": prefill_s, "decode_tok_s": spec.new_tokens / decode_s,
            "peak_rss_mb": _peak_rss_bytes() / 2**20}


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m rsvlm_edge.bench.peers.worker SPEC_JSON", file=sys.stderr)
        return 2
    result = measure(PeerSpec.from_json(argv[0]))
    print(f"{RESULT} {json.dumps(result)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
