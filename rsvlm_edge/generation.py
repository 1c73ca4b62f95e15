"""Torch-free generation loop: route, encode images, splice visual tokens, prefill, decode with a KV cache.

Works on any :class:`~rsvlm_edge.backends.base.Backend`. Requests in one call are batched by expert (a decoder
step runs one expert) with left padding; each request keeps its own seeded sampler, so a request gives the same
tokens alone or in a batch. The model's prompt template (:mod:`rsvlm_edge.templates`, ``config.prompt_template``)
builds the prompt ids; its end token and the model dir's ``generation_config.json`` eos ids stop generation.

Routing: a model with a learned router (``config.router``) takes the expert from a leading task tag, else from the
router; a model without one (RSUniVLM) from :func:`~rsvlm_edge.tasks.expert_by_rule` over the whole message.

Grounding by pointing: on a backend whose model has a box pointer, a ``[VG]`` answer is not sampled. The prefill's
last hidden state points at one image patch, that patch's box is written as the answer text (``[x1, y1, x2, y2]``)
and its tokens are fed through the decoder like sampled ones, so a chat continues from them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import numpy as np

from rsvlm_edge import dense as dense_heads
from rsvlm_edge.backends.base import Backend, CacheHandle
from rsvlm_edge.formats import format_box
from rsvlm_edge.sampling import GenerationDefaults, SamplingConfig, TokenSampler
from rsvlm_edge.tasks import Turn, expert_by_rule, expert_for_tag, split_tag
from rsvlm_edge.templates import PromptIds, get_template
from rsvlm_edge.tokenizer import StreamDecoder, Tokenizer, token_char_ends

if TYPE_CHECKING:  # llguidance loads only when a request is constrained
    from rsvlm_edge.constrain import Constraints


@dataclass
class Request:
    """One tile (or tile pair) and an instruction. ``pixels`` are prepared (C, S, S) float32 arrays."""

    pixels: list[np.ndarray]
    sensor: str
    prompt: str
    history: list[Turn] = field(default_factory=list)  # earlier (user, assistant) turns, for chat
    expert: int | None = None  # force an expert; None = tag, else router


@dataclass
class Routing:
    expert: int
    source: str  # "tag", "router", "rule" (models without a router) or "forced"
    probs: list[float] | None = None


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    routing: Routing
    prompt_tokens: int
    finish_reason: str  # "stop" or "length"
    timings: dict[str, float] = field(default_factory=dict)
    pointer: "Pointing | None" = None  # set when the box pointer wrote the answer
    dense: "dense_heads.DenseAnswer | None" = None  # set when the dense heads wrote it ([DET], [OBB], [SEG])
    #: per token of ``token_ids``: its log-probability (:func:`rsvlm_edge.sampling.token_logprob`) and where it ends
    #: in ``text`` (characters); what :mod:`rsvlm_edge.scores` turns into per-answer and per-item confidences
    #: (NaN for a token a head wrote: that answer scores the head's probability)
    token_logprobs: list[float] = field(default_factory=list)
    token_ends: list[int] = field(default_factory=list)


@dataclass
class Decoded:
    """What :meth:`Generator.decode` produced per row: the tokens (stop token left out), why the row ended, the
    tokens' log-probabilities; and how many decoder steps ran."""

    generated: list[list[int]]
    reasons: list[str]
    logprobs: list[list[float]]
    steps: int


@dataclass
class Pointing:
    """Where the box pointer pointed: the patch index (row-major over the grid) and its softmax probability."""

    patch: int
    probability: float
    box: list[float]  # x1, y1, x2, y2 in 0-100 units, before rounding


@dataclass
class PromptBatch:
    """Prompts with their images spliced in, left-padded to one width: what :meth:`Generator.prefill` feeds."""

    prompts: list[PromptIds]
    ids: np.ndarray  # (B, S) int32, pad ids on the left
    mask: np.ndarray  # (B, S) float32, 1 on real tokens
    slots: np.ndarray  # (B, S) bool, where each row's visual tokens went
    embeds: np.ndarray  # (B, S, D) token embeddings, visual tokens in the slots
    positions: np.ndarray  # (B, S) int32 position ids, 0 at each row's first real token

    @property
    def width(self) -> int:
        return int(self.ids.shape[1])


#: Tasks whose answer the box pointer writes (one box about one image).
POINTER_TAGS = ("[VG]",)


def patch_positions(ids: np.ndarray, image_id: int, grid: int) -> np.ndarray:
    """Positions of the first image's ``grid`` x ``grid`` patch tokens in one row of ids (its newline token, which
    follows them, left out): where the box pointer reads, in training and at run time. Fewer when the row has none."""
    return np.nonzero(ids == image_id)[0][: grid * grid]


TokenCallback = Callable[[int, str], None]


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def chat_capacity(needed: int, context: int) -> int:
    """KV cache size for a chat turn that needs ``needed`` positions: room for about as much again (later turns
    reuse it), never the whole context up front (32k positions of a converted model are ~0.8 GB of fp32 K/V for
    a few hundred tokens used)."""
    return min(context, 2 * needed)


class Generator:
    """Generation over one backend. ``defaults``: the model dir's generation settings
    (:meth:`GenerationDefaults.load`); what a request's :class:`SamplingConfig` leaves unset comes from there."""

    def __init__(self, backend: Backend, tokenizer: Tokenizer, defaults: GenerationDefaults | None = None):
        self.backend = backend
        self.tokenizer = tokenizer
        self.config = backend.config
        self.template = get_template(self.config.prompt_template)
        self.defaults = defaults or GenerationDefaults()
        if tokenizer.control != self.template.control:
            raise ValueError(f"the tokenizer was loaded for another prompt template than the model's "
                             f"{self.template.name!r} (load it with that template's control tokens)")
        if tokenizer.vocab_size > self.config.vocab_size:
            raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens but the model only {self.config.vocab_size}")
        #: Generation stops on these: the template's end of turn, plus the model's own eos ids.
        self.stop_ids = frozenset({tokenizer.end_id, *self.defaults.eos_token_ids})
        self._constraints: Constraints | None = None  # answer grammars (rsvlm_edge.constrain), built on the first constrained request

    def sampling(self, sampling: SamplingConfig | None) -> SamplingConfig:
        """``sampling`` with what it leaves unset taken from the model's defaults and template."""
        return self.defaults.resolve(sampling or SamplingConfig(), self.template.penalty_covers_prompt)

    # ------------------------------------------------------------------ routing
    def route(self, prompts: list[str]) -> list[Routing]:
        """Without a router: RSUniVLM's substring rule. With one: a leading tag decides; untagged prompts go
        through the learned router in one batch."""
        if not self.config.router:
            return [Routing(expert_by_rule(prompt), "rule") for prompt in prompts]
        routings: list[Routing | None] = []
        untagged: list[int] = []
        for i, prompt in enumerate(prompts):
            tag, _ = split_tag(prompt)
            if tag is None:
                routings.append(None)
                untagged.append(i)
            else:
                routings.append(Routing(expert_for_tag(tag), "tag"))
        if untagged:
            ids = [self.tokenizer.encode_text(split_tag(prompts[i])[1]) or [self.tokenizer.pad_id] for i in untagged]
            batch, mask = self._pad(ids, left=False)
            probs = softmax(self.backend.route(self.backend.embed(batch), mask).astype(np.float64))
            for row, i in enumerate(untagged):
                routings[i] = Routing(int(np.argmax(probs[row])), "router", [float(p) for p in probs[row]])
        return [r for r in routings if r is not None]

    # ------------------------------------------------------------------ inputs
    def prompt(self, request: Request) -> PromptIds:
        """The template's token ids with each image slot expanded to the model's visual-token count; user text is
        encoded as text only, so it cannot add turns or image slots."""
        turns = request.history + [Turn(request.prompt)]
        segments = self.template.segments(turns, num_images=len(request.pixels))
        return self.template.encode(self.tokenizer, segments, self.config.num_visual_tokens)

    def prompt_ids(self, request: Request) -> list[int]:
        return self.prompt(request).ids

    def embed_prompts(self, ids: np.ndarray, slots: np.ndarray, visual: list[np.ndarray]) -> np.ndarray:
        """(B, S) ids -> (B, S, D) embeddings with each row's image slots (``slots``, bool (B, S)) overwritten by
        that row's visual tokens (n_images * Nv, D), images in order."""
        embeds = self.backend.embed(ids)
        for row, tokens in enumerate(visual):
            if int(slots[row].sum()) != tokens.shape[0]:
                raise ValueError(f"prompt has {int(slots[row].sum())} image slots for {tokens.shape[0]} visual tokens")
            embeds[row, slots[row]] = tokens
        return embeds

    def _pad(self, seqs: list[list[int]], left: bool = True) -> tuple[np.ndarray, np.ndarray]:
        width = max(len(s) for s in seqs)
        ids = np.full((len(seqs), width), self.tokenizer.pad_id, dtype=np.int32)
        mask = np.zeros((len(seqs), width), dtype=np.float32)
        for row, seq in enumerate(seqs):
            span = slice(width - len(seq), width) if left else slice(0, len(seq))
            ids[row, span] = seq
            mask[row, span] = 1.0
        return ids, mask

    def encode_images(self, requests: list[Request]) -> list[np.ndarray]:
        """Encode every request's images, batched per sensor; returns (n_images * Nv, D) per request."""
        flat: list[tuple[int, np.ndarray]] = [(r, px) for r, req in enumerate(requests) for px in req.pixels]
        out: list[list[np.ndarray]] = [[] for _ in requests]
        by_sensor: dict[str, list[int]] = {}
        for k, (r, _) in enumerate(flat):
            by_sensor.setdefault(requests[r].sensor, []).append(k)
        encoded: dict[int, np.ndarray] = {}
        for sensor, keys in by_sensor.items():
            tokens = self.backend.encode_images(np.stack([flat[k][1] for k in keys]).astype(np.float32), sensor)
            encoded.update({k: tokens[j] for j, k in enumerate(keys)})
        for k, (r, _) in enumerate(flat):
            out[r].append(encoded[k])
        return [np.concatenate(parts, axis=0) for parts in out]

    def splice_images(self, prompts: list[PromptIds], visual: list[np.ndarray]) -> PromptBatch:
        """Pad ``prompts`` on the left and put each row's visual tokens (:meth:`encode_images`) in its image slots."""
        ids, mask = self._pad([p.ids for p in prompts])
        slots = np.zeros(ids.shape, dtype=bool)
        for row, p in enumerate(prompts):  # left padding: each prompt sits at the row's end
            slots[row, ids.shape[1] - len(p):] = p.image_slots
        positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
        return PromptBatch(prompts, ids, mask, slots, self.embed_prompts(ids, slots, visual), positions)

    def constraint(self, sampling: SamplingConfig, prompt: str):
        """The answer grammar's matcher for ``prompt``'s task tag when ``sampling.constrain``; None for free text."""
        if not sampling.constrain:
            return None
        tag = split_tag(prompt)[0]
        if tag is None:
            return None
        if self._constraints is None:
            from rsvlm_edge.constrain import Constraints

            self._constraints = Constraints(self.tokenizer)
        return self._constraints.matcher(tag, sampling.classes)

    def new_sampler(self, sampling: SamplingConfig, ids: list[int], image_slots: np.ndarray | None = None,
                    constraint=None) -> TokenSampler:
        """A row's sampler, told the prompt's text ids (the repetition penalty's history; image slots left out)."""
        sampler = TokenSampler(sampling, self.tokenizer.vocab_size, constraint=constraint)
        sampler.observe_prompt(np.asarray(ids) if image_slots is None else np.asarray(ids)[~image_slots])
        return sampler

    # ------------------------------------------------------------------ box pointer
    def uses_pointer(self, prompt: str, num_images: int) -> bool:
        return self.backend.has_box_pointer and num_images == 1 and split_tag(prompt)[0] in POINTER_TAGS

    def patch_states(self, image_slots: np.ndarray, hidden: np.ndarray) -> np.ndarray:
        """The hidden states of the first image's patch tokens (grid^2, D; the newline token is left out) of one
        row; ``image_slots`` is the row's bool slot mask (the positions :func:`patch_positions` finds by id)."""
        n = self.config.grid_size ** 2
        slots = np.nonzero(image_slots)[0][:n]
        if len(slots) < n:
            raise ValueError(f"the box pointer needs {n} image patch tokens, the prompt has {len(slots)}")
        return hidden[slots]

    def point(self, queries: np.ndarray, patches: np.ndarray) -> list[tuple[list[int], Pointing]]:
        """(R, D) answer states + (R, grid^2, D) patch states -> per row the answer's token ids and where it pointed."""
        scores, boxes = self.backend.point(queries, patches)
        out = []
        for row in range(len(scores)):
            best = int(np.argmax(scores[row]))
            box = [float(v) * 100.0 for v in boxes[row, best]]
            probability = float(softmax(scores[row].astype(np.float64))[best])
            out.append((self.tokenizer.encode(format_box(box)), Pointing(best, probability, box)))
        return out

    # ------------------------------------------------------------------ generation
    def generate(self, requests: list[Request], sampling: SamplingConfig | None = None,
                 on_token: TokenCallback | None = None) -> list[Generation]:
        with self.backend.lock:  # threads sharing a backend take turns per call (see rsvlm_edge.backends.base)
            return self._generate(requests, sampling, on_token)

    def _generate(self, requests: list[Request], sampling: SamplingConfig | None = None,
                  on_token: TokenCallback | None = None) -> list[Generation]:
        sampling = self.sampling(sampling)
        if not requests:
            return []
        t0 = time.perf_counter()
        routings = [
            Routing(req.expert, "forced") if req.expert is not None else None for req in requests
        ]
        needs_route = [i for i, r in enumerate(routings) if r is None]
        for i, routing in zip(needs_route, self.route([requests[i].prompt for i in needs_route])):
            routings[i] = routing
        route_ms = (time.perf_counter() - t0) * 1e3
        routed = [r for r in routings if r is not None]  # all of them, now
        results: list[Generation | None] = [None] * len(requests)
        for expert in sorted({r.expert for r in routed}):
            group = [i for i, r in enumerate(routed) if r.expert == expert]
            self.backend.prefetch_expert(expert)  # loads while the vision encoder runs
            outs = self._generate_group([requests[i] for i in group], [routed[i] for i in group], route_ms, sampling,
                                        on_token, group)
            for i, out in zip(group, outs):
                results[i] = out
        return [r for r in results if r is not None]

    def _generate_group(self, requests: list[Request], routings: list[Routing], route_ms: float,
                        sampling: SamplingConfig, on_token: TokenCallback | None,
                        indices: list[int]) -> list[Generation]:
        """One expert's requests: encode images -> splice -> prefill (-> point) -> decode."""
        expert = routings[0].expert
        t0 = time.perf_counter()
        visual = self.encode_images(requests)
        t_vision = time.perf_counter()
        batch = self.splice_images([self.prompt(req) for req in requests], visual)
        capacity = batch.width + sampling.max_new_tokens
        if capacity > self.config.max_position_embeddings:
            raise ValueError(f"prompt ({batch.width} tokens) + max_new_tokens ({sampling.max_new_tokens}) exceeds the "
                             f"model's context of {self.config.max_position_embeddings}")
        cache = self.backend.new_cache(len(requests), capacity, expert)
        samplers = [self.new_sampler(sampling, p.ids, p.image_slots, self.constraint(sampling, req.prompt))
                    for p, req in zip(batch.prompts, requests)]
        full_mask = np.ones((len(requests), capacity), dtype=np.float32)  # grows by a view per step, never copied
        full_mask[:, : batch.width] = batch.mask
        pointed = [row for row, req in enumerate(requests) if self.uses_pointer(req.prompt, len(req.pixels))]
        densed = [row for row, req in enumerate(requests)
                  if dense_heads.uses_dense(self.backend, req.prompt, len(req.pixels))]
        logits, hidden = self.prefill(cache, batch.embeds, batch.positions, batch.mask,
                                      keep_hidden=bool(pointed or densed))
        forced: dict[int, list[int]] = {}
        pointings: dict[int, Pointing] = {}
        if pointed and hidden is not None:
            patches = np.stack([self.patch_states(batch.slots[r], hidden[r]) for r in pointed])
            for row, (answer_ids, pointing) in zip(pointed, self.point(hidden[pointed, -1], patches)):
                forced[row], pointings[row] = answer_ids, pointing
        dense_answers: dict[int, dense_heads.DenseAnswer] = {}
        if densed and hidden is not None:
            sets = [dense_heads.image_patches(self.config, batch.slots[r], hidden[r]) for r in densed]
            written = dense_heads.write_answers(self.backend, self.tokenizer, hidden[densed, -1], sets,
                                                [requests[r].prompt for r in densed])
            for row, (answer_ids, answer) in zip(densed, written):
                forced[row], dense_answers[row] = answer_ids, answer
        t_first = time.perf_counter()
        decoded = self.decode(cache, logits, full_mask, batch.positions[:, -1] + 1, samplers, sampling, on_token,
                              indices, forced)
        steps = decoded.steps
        t_end = time.perf_counter()
        timings = {
            "vision_ms": (t_vision - t0) * 1e3,
            "ttft_ms": (t_first - t0) * 1e3,
            "prefill_ms": (t_first - t_vision) * 1e3,
            "decode_ms": (t_end - t_first) * 1e3,
            "decode_steps": float(steps),
            "decode_tok_s": steps * len(requests) / (t_end - t_first) if steps else 0.0,
            "route_ms": route_ms,
        }
        out = [self.generation(decoded, row, routings[row], len(batch.prompts[row]), dict(timings),
                               pointings.get(row))
               for row in range(len(requests))]
        for row, answer in dense_answers.items():
            out[row].dense = answer
        return out

    def generation(self, decoded: Decoded, row: int, routing: Routing, prompt_tokens: int,
                   timings: dict[str, float], pointer: Pointing | None) -> Generation:
        """Row ``row`` of ``decoded`` as a :class:`Generation`: its text, and where each token ends in it."""
        ids = decoded.generated[row]
        return Generation(text=self.tokenizer.decode(ids), token_ids=ids, routing=routing,
                          prompt_tokens=prompt_tokens, finish_reason=decoded.reasons[row], timings=timings,
                          pointer=pointer, token_logprobs=decoded.logprobs[row],
                          token_ends=token_char_ends(self.tokenizer, ids))

    def prefill(self, cache: CacheHandle, embeds: np.ndarray, positions: np.ndarray, mask: np.ndarray,
                keep_hidden: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """Feed (B, S, D) ``embeds`` at (B, S) ``positions`` into ``cache`` (``mask``: (B, cache length + S), 1 on
        real tokens): the last position's logits (B, V), and with ``keep_hidden`` the final-norm states (B, S, D)
        that the box pointer reads; None without."""
        if keep_hidden:
            return self.backend.forward_hidden(cache, embeds, positions, mask)
        return self.backend.forward(cache, embeds, positions, mask), None

    def decode(self, cache: CacheHandle, logits: np.ndarray, full_mask: np.ndarray, next_pos: np.ndarray,
               samplers: list[TokenSampler], sampling: SamplingConfig, on_token: TokenCallback | None,
               indices: list[int], forced: dict[int, list[int]] | None = None) -> Decoded:
        """Sample from ``logits`` and feed tokens back until every row stops. The stop token is not fed.

        ``forced``: rows whose answer is given (the box pointer's): their tokens are fed in order instead of sampled,
        then the row stops (with ``ignore_stop``, sampling goes on after them)."""
        tok, backend = self.tokenizer, self.backend
        rows = len(samplers)
        stop = set() if sampling.ignore_stop else set(sampling.stop_ids) | self.stop_ids
        streams = [StreamDecoder(tok) for _ in range(rows)]
        generated: list[list[int]] = [[] for _ in range(rows)]
        logprobs: list[list[float]] = [[] for _ in range(rows)]
        finished = [False] * rows
        reasons = ["length"] * rows
        steps = 0
        while True:
            new_ids = np.full((rows, 1), tok.pad_id, dtype=np.int32)
            for row in range(rows):
                if finished[row]:
                    continue
                script = forced.get(row) if forced else None
                if script is not None and len(generated[row]) < len(script):
                    token = script[len(generated[row])]
                    samplers[row].accept(token)
                elif script is not None and stop:
                    finished[row], reasons[row] = True, "stop"
                    continue
                else:
                    token = samplers[row](logits[row])
                if token in stop:
                    finished[row], reasons[row] = True, "stop"
                    continue
                generated[row].append(token)
                logprobs[row].append(samplers[row].last_logprob)
                new_ids[row, 0] = token
                if on_token is not None:
                    piece = streams[row].push(token)
                    if piece:
                        on_token(indices[row], piece)
                if len(generated[row]) >= sampling.max_new_tokens:
                    finished[row] = True
            if all(finished) or cache.length >= cache.capacity:
                break
            logits = backend.forward(cache, backend.embed(new_ids), next_pos[:, None].astype(np.int32),
                                     full_mask[:, : cache.length + 1])
            next_pos = next_pos + 1
            steps += 1
        if on_token is not None:
            for row, stream in enumerate(streams):
                tail = stream.finish()  # bytes held back for an incomplete UTF-8 character
                if tail:
                    on_token(indices[row], tail)
        return Decoded(generated, reasons, logprobs, steps)


class ChatSession:
    """Multi-turn dialogue about one tile (or pair). The KV cache is reused while the expert stays the same and
    the turn fits; a turn routed to another expert re-prefills the whole conversation (a cache is only valid for its
    expert), and so does one that outgrows the cache (a new one of :func:`chat_capacity` is allocated)."""

    def __init__(self, generator: Generator, pixels: list[np.ndarray], sensor: str):
        self.generator, self.pixels, self.sensor = generator, pixels, sensor
        self.turns: list[Turn] = []
        self.cache: CacheHandle | None = None
        self.position = 0  # next position id
        self.pending: list[int] = []  # a generated token not yet in the cache (answer cut by max_new_tokens)
        self.patches: np.ndarray | None = None  # the image's patch states for the box pointer (from the prefill)
        self.image_patches: np.ndarray | None = None  # every image's patch states, for the dense heads
        self.counters = {"turns": 0, "reprefills": 0, "reused_tokens": 0, "cache_grows": 0}

    def ask(self, text: str, sampling: SamplingConfig | None = None,
            on_token: TokenCallback | None = None) -> Generation:
        with self.generator.backend.lock:  # a turn runs like one request (see rsvlm_edge.backends.base)
            return self._ask(text, sampling, on_token)

    def _continuation(self, text: str) -> list[int]:
        """The new turn's ids after the cached conversation (the last answer's uncached token first)."""
        gen = self.generator
        segments = gen.template.next_turn(text)
        return self.pending + gen.template.encode(gen.tokenizer, segments, gen.config.num_visual_tokens).ids

    def _check_context(self, needed: int) -> None:
        context = self.generator.config.max_position_embeddings
        if needed > context:
            raise ValueError(f"conversation exceeds the model's context of {context} tokens; start a new chat")

    def _reusable_turn(self, text: str, expert: int, sampling: SamplingConfig) -> list[int] | None:
        """The new turn's ids when the cache can take them (same expert, room left), else None (re-prefill)."""
        if self.cache is None or self.cache.expert != expert:
            return None
        ids = self._continuation(text)
        needed = self.cache.length + len(ids) + sampling.max_new_tokens
        self._check_context(needed)
        if needed > self.cache.capacity:
            self.counters["cache_grows"] += 1
            return None
        return ids

    def _prefill_inputs(self, text: str, expert: int, sampling: SamplingConfig) -> PromptBatch:
        """The whole conversation with the image spliced in, and a fresh cache of :func:`chat_capacity` for it."""
        gen = self.generator
        if self.cache is not None:
            self.counters["reprefills"] += 1
        request = Request(pixels=self.pixels, sensor=self.sensor, prompt=text, history=self.turns)
        prompt = gen.prompt(request)
        needed = len(prompt) + sampling.max_new_tokens
        self._check_context(needed)
        gen.backend.prefetch_expert(expert)
        batch = gen.splice_images([prompt], gen.encode_images([request]))
        self.cache = gen.backend.new_cache(1, chat_capacity(needed, gen.config.max_position_embeddings), expert)
        self.position = 0
        return batch

    def _ask(self, text: str, sampling: SamplingConfig | None = None,
             on_token: TokenCallback | None = None) -> Generation:
        gen = self.generator
        sampling = gen.sampling(sampling)
        routing = gen.route([text])[0]
        t0 = time.perf_counter()
        ids = self._reusable_turn(text, routing.expert, sampling)
        image_slots: np.ndarray | None = None  # set on a prefill: the conversation's image slots
        if ids is None:
            batch = self._prefill_inputs(text, routing.expert, sampling)
            ids, image_slots, embeds = batch.prompts[0].ids, batch.slots[0], batch.embeds
        else:
            embeds = gen.backend.embed(np.asarray([ids], dtype=np.int32))
        assert self.cache is not None  # both branches leave a cache
        if image_slots is None:
            self.counters["reused_tokens"] += self.cache.length
        positions = np.arange(self.position, self.position + len(ids), dtype=np.int32)[None]
        full_mask = np.ones((1, self.cache.capacity), dtype=np.float32)
        pointed = gen.uses_pointer(text, len(self.pixels))
        densed = dense_heads.uses_dense(gen.backend, text, len(self.pixels))
        # a prefill keeps the patch states: the image precedes every instruction, so later turns can point too
        keep_hidden = gen.backend.has_box_pointer and (image_slots is not None or pointed or densed)
        logits, hidden = gen.prefill(self.cache, embeds, positions, full_mask[:, : self.cache.length + len(ids)],
                                     keep_hidden=keep_hidden)
        pointing: Pointing | None = None
        written: dense_heads.DenseAnswer | None = None
        forced: dict[int, list[int]] = {}
        if hidden is not None:
            if image_slots is not None:
                self.patches = gen.patch_states(image_slots, hidden[0])
                if gen.backend.has_dense_heads:
                    self.image_patches = dense_heads.image_patches(gen.config, image_slots, hidden[0])
            if pointed and self.patches is not None:
                (answer_ids, pointing), = gen.point(hidden[:, -1], self.patches[None])
                forced[0] = answer_ids
            if densed and self.image_patches is not None:
                (answer_ids, written), = dense_heads.write_answers(gen.backend, gen.tokenizer, hidden[:, -1],
                                                                    [self.image_patches], [text])
                forced[0] = answer_ids
        t_first = time.perf_counter()
        sampler = gen.new_sampler(sampling, ids, image_slots, gen.constraint(sampling, text))
        decoded = gen.decode(self.cache, logits, full_mask, positions[:, -1] + 1, [sampler], sampling, on_token,
                             [0], forced)
        self.position = int(positions[0, -1]) + 1 + decoded.steps
        self.pending = decoded.generated[0][-1:] if decoded.reasons[0] == "length" else []
        t_end = time.perf_counter()
        answer = gen.generation(decoded, 0, routing, len(ids),
                                {"ttft_ms": (t_first - t0) * 1e3, "decode_ms": (t_end - t_first) * 1e3,
                                 "decode_steps": float(decoded.steps)}, pointing)
        answer.dense = written
        self.turns.append(Turn(text, answer.text))
        self.counters["turns"] += 1
        return answer
