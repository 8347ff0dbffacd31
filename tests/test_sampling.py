"""Sampling on known logits: each filter keeps exactly the right tokens, draws follow the
filtered distribution, a seed reproduces them, and bad settings are errors naming the value."""
import math

import pytest
import torch

from minillama.sampling import SamplingParams, filtered_probs, sample

PROBS = torch.tensor([0.5, 0.3, 0.15, 0.05])  # token 0 is the most likely
LOGITS = PROBS.log()[None]  # (1, 4)
N = 40000  # draws per frequency check: the standard error of a frequency is <= 0.0025


def frequencies(params: SamplingParams, logits=LOGITS, n=N) -> torch.Tensor:
    """How often each token is drawn, over n independent rows of the same logits."""
    ids = sample(logits.expand(n, -1), params, params.generator("cpu"))
    return torch.bincount(ids, minlength=logits.shape[-1]).float() / n


@pytest.mark.parametrize(
    "params, expected",
    [
        (dict(), [0.5, 0.3, 0.15, 0.05]),
        (dict(top_k=2), [0.625, 0.375, 0.0, 0.0]),  # 0.5 / 0.8, 0.3 / 0.8
        (dict(top_k=4), [0.5, 0.3, 0.15, 0.05]),
        (dict(top_p=0.75), [0.625, 0.375, 0.0, 0.0]),  # smallest set with mass >= 0.75: {0, 1}
        (dict(top_p=0.85), [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0.0]),  # {0, 1, 2} holds 0.95
        (dict(top_p=0.4), [1.0, 0.0, 0.0, 0.0]),  # the most likely token alone holds 0.5
        (dict(min_p=0.2), [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0.0]),  # floor 0.2 * 0.5 = 0.1
        (dict(min_p=0.5), [0.625, 0.375, 0.0, 0.0]),  # floor 0.25
        (dict(top_k=3, top_p=0.7), [0.625, 0.375, 0.0, 0.0]),  # top-k first: {0,1,2} of mass 0.95
    ],
)
def test_filters_keep_the_right_tokens(params, expected):
    probs = filtered_probs(LOGITS, SamplingParams(temperature=1.0, **params))
    torch.testing.assert_close(probs[0], torch.tensor(expected), rtol=1e-5, atol=1e-6)


def test_temperature_sharpens_and_flattens():
    for t in (0.5, 2.0):
        expected = torch.softmax(LOGITS[0] / t, dim=-1)
        torch.testing.assert_close(filtered_probs(LOGITS, SamplingParams(temperature=t))[0], expected)


@pytest.mark.parametrize("params", [dict(), dict(top_k=2), dict(top_p=0.85), dict(min_p=0.2), dict(temperature=2.0)])
def test_draws_follow_the_filtered_distribution(params):
    full = {"temperature": 1.0, "seed": 1234, **params}
    sp = SamplingParams(**full)
    expected = filtered_probs(LOGITS, sp)[0]
    freq = frequencies(sp)
    assert (freq[expected == 0] == 0).all(), "a filtered-out token was drawn"
    torch.testing.assert_close(freq, expected, rtol=0, atol=0.012)  # ~5 standard errors


def test_top_k_1_equals_greedy():
    logits = torch.randn(64, 1000, generator=torch.Generator().manual_seed(0))
    greedy = sample(logits, SamplingParams())
    assert torch.equal(greedy, logits.argmax(-1))
    for seed in range(3):
        sp = SamplingParams(temperature=1.5, top_k=1, seed=seed)
        assert torch.equal(sample(logits, sp, sp.generator("cpu")), greedy)
    # the filter itself, not only the greedy shortcut, keeps one token
    probs = filtered_probs(logits, SamplingParams(temperature=1.5, top_k=1))
    assert torch.equal(probs.argmax(-1), greedy) and torch.equal(probs.max(-1).values, torch.ones(64))


def test_seed_reproduces_and_rows_are_independent():
    logits = torch.zeros(8, 50)  # uniform: any dependence between rows would show
    sp = SamplingParams(temperature=1.0, seed=7)
    a = sample(logits, sp, sp.generator("cpu"))
    b = sample(logits, sp, sp.generator("cpu"))
    c = sample(logits, SamplingParams(temperature=1.0, seed=8), SamplingParams(seed=8).generator("cpu"))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert len(set(a.tolist())) > 1, "rows of a batch drew the same token"


def test_zero_probability_is_never_drawn():
    logits = torch.full((N, 6), float("-inf"))
    logits[:, 2] = 0.0
    logits[:, 4] = 0.0
    sp = SamplingParams(temperature=1.0, seed=0)
    ids = sample(logits, sp, sp.generator("cpu"))
    assert set(ids.tolist()) == {2, 4}


@pytest.mark.parametrize(
    "kwargs, named",
    [
        (dict(temperature=-0.5), "-0.5"),
        (dict(temperature=float("nan")), "nan"),
        (dict(temperature=math.inf), "inf"),
        (dict(top_k=-1), "-1"),
        (dict(top_k=2.5), "2.5"),
        (dict(top_p=0.0), "0.0"),
        (dict(top_p=1.5), "1.5"),
        (dict(min_p=1.0), "1.0"),
        (dict(min_p=-0.1), "-0.1"),
        (dict(seed="7"), "'7'"),
    ],
)
def test_invalid_values_raise_naming_the_value(kwargs, named):
    (name,) = kwargs
    with pytest.raises(ValueError) as err:
        SamplingParams(**kwargs)
    assert name in str(err.value) and named in str(err.value)
