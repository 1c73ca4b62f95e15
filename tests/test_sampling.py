import numpy as np
import pytest

from rsvlm_edge.sampling import SamplingConfig, TokenSampler, filter_top_k_top_p, penalize_repeats


def test_greedy_picks_argmax():
    s = TokenSampler(SamplingConfig(), vocab_size=5)
    assert s(np.array([0.1, 2.0, -1.0, 1.9, 0.0])) == 1


def test_repetition_penalty_changes_choice():
    logits = np.array([2.0, 1.9, -1.0])
    seen = np.array([True, False, False])
    out = penalize_repeats(logits, seen, 1.5)
    assert out[0] == pytest.approx(2.0 / 1.5) and out[1] == 1.9
    s = TokenSampler(SamplingConfig(repetition_penalty=1.5), vocab_size=3)
    s.observe([0])
    assert s(logits) == 1


def test_top_k_and_top_p_filtering():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    assert np.isfinite(filter_top_k_top_p(logits, 2, 1.0)).tolist() == [True, True, False, False]
    assert np.isfinite(filter_top_k_top_p(logits, 0, 0.7)).tolist() == [True, True, False, False]
    assert np.isfinite(filter_top_k_top_p(logits, 0, 0.1)).tolist() == [True, False, False, False]


def test_sampling_is_seeded_and_respects_top_k():
    logits = np.zeros(50)
    cfg = SamplingConfig(temperature=1.0, top_k=3, seed=7)
    a = [TokenSampler(cfg, 50)(logits + np.arange(50) * 0.01) for _ in range(1)]
    b = [TokenSampler(cfg, 50)(logits + np.arange(50) * 0.01) for _ in range(1)]
    assert a == b
    draws = {TokenSampler(SamplingConfig(temperature=1.0, top_k=3, seed=i), 50)(np.arange(50) * 0.01) for i in range(40)}
    assert draws <= {47, 48, 49} and len(draws) > 1


@pytest.mark.parametrize("kw", [dict(temperature=-1), dict(top_p=0), dict(top_k=-2), dict(max_new_tokens=0),
                                dict(repetition_penalty=0), dict(repetition_penalty=float("nan")),
                                dict(temperature=float("inf")), dict(temperature=float("nan")),
                                dict(top_p=float("nan")), dict(seed=-1), dict(max_new_tokens=2.5),
                                dict(top_k="3")])
def test_invalid_configs_are_rejected(kw):
    with pytest.raises(ValueError):
        SamplingConfig(**kw).validate()
