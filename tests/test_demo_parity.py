"""The shipped demo model: the exported ONNX graphs give the same greedy tokens as the PyTorch reference.

Default run: 3 prompts of every task; `-m slow`: 20 prompts of every task (issue #4's parity bar).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from rsvlm_edge.generation import Generator, Request
from rsvlm_edge.pipeline import load_backend, load_tokenizer
from rsvlm_edge.preprocess import prepare_image
from rsvlm_edge.sampling import SamplingConfig
from rsvlm_edge.tasks import TAGS

DEMO = Path(__file__).resolve().parents[1] / "models" / "tiny-demo"
pytestmark = pytest.mark.skipif(not (DEMO / "manifest.json").exists(), reason="demo model not built")


@pytest.fixture(scope="module")
def generators():
    tok = load_tokenizer(DEMO)
    return Generator(load_backend(DEMO, "torch"), tok), Generator(load_backend(DEMO, "ort"), tok)


def requests_for(tag: str, n: int) -> list[Request]:
    from rsvlm_edge.training.synthetic import SyntheticGenerator

    gen = SyntheticGenerator(seed=4242)
    out = []
    for _ in range(n):
        s = gen.sample(task=tag)
        out.append(Request([prepare_image(im, s.sensor, 128) for im in s.images], s.sensor, s.prompt))
    return out


def check_parity(generators, n: int, max_new_tokens: int) -> None:
    torch_gen, ort_gen = generators
    sampling = SamplingConfig(max_new_tokens=max_new_tokens)
    mismatches = []
    for tag in TAGS:
        reqs = requests_for(tag, n)
        a = torch_gen.generate(reqs, sampling)
        b = ort_gen.generate(reqs, sampling)
        for req, x, y in zip(reqs, a, b):
            assert x.routing.expert == y.routing.expert
            if x.token_ids != y.token_ids:
                mismatches.append((req.prompt, x.text, y.text))
    assert not mismatches, mismatches[:3]


def test_parity_3_prompts_per_task(generators):
    check_parity(generators, 3, 24)


@pytest.mark.slow
def test_parity_20_prompts_per_task(generators):
    check_parity(generators, 20, 64)
