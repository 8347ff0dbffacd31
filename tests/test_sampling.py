"""Sampling on known logits: each filter keeps exactly the right tokens, draws follow the
filtered distribution, a seed reproduces them, the logit bias and penalties match a float64
reference, and bad settings are errors naming the value."""
import math
import random

import numpy as np
import pytest
import torch

from minillama.sampling import NON_FINITE, LogitsProcessor, SamplingParams, filtered_probs, sample
from tests.reference_sampling import reference_logits

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
        (dict(presence_penalty=2.5), "2.5"),
        (dict(frequency_penalty=-2.01), "-2.01"),
        (dict(frequency_penalty=math.nan), "nan"),
        (dict(repetition_penalty=0.0), "0.0"),
        (dict(repetition_penalty=-1), "-1"),
        (dict(repetition_penalty=math.inf), "inf"),
        (dict(repetition_penalty=1e-39), "1e-39"),  # 0 or subnormal in float32
        (dict(repetition_penalty=1e39), "1e+39"),  # inf in float32
        (dict(logit_bias={5: 100.5}), "100.5"),
        (dict(logit_bias={-1: 1.0}), "-1"),
        (dict(logit_bias={"5": 1.0}), "'5'"),
        (dict(logit_bias={5: math.nan}), "nan"),
        (dict(logit_bias=[(5, 1.0), (5, 2.0)]), "[5]"),
        (dict(min_tokens=-1), "-1"),
        (dict(min_tokens=2.0), "2.0"),
        (dict(min_tokens=True), "True"),
        (dict(ignore_eos=1), "1"),
        (dict(ignore_eos="true"), "'true'"),
    ],
)
def test_invalid_values_raise_naming_the_value(kwargs, named):
    (name,) = kwargs
    with pytest.raises(ValueError) as err:
        SamplingParams(**kwargs)
    assert name in str(err.value) and named in str(err.value)


def reference(logits, params: SamplingParams, prompt, output, min_tokens_ids=()):
    return reference_logits(logits, params.logit_bias, params.repetition_penalty, params.presence_penalty,
                            params.frequency_penalty, prompt, output, params.min_tokens, min_tokens_ids)


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    processor = LogitsProcessor(1, 5, "cpu")
    processor.start([0], [SamplingParams(repetition_penalty=2.0)], [[0, 1, 2, 4]], [()])
    got = processor(torch.tensor([[2.0, -1.5, 0.0, 3.0, -0.25]]))
    assert got.tolist() == [[1.0, -3.0, 0.0, 3.0, -0.5]]  # id 3 is not in the prompt


def test_an_extreme_repetition_penalty_keeps_finite_logits_finite():
    """The smallest and largest repetition penalties push a seen logit past float32's range: it is held
    at float32's largest magnitude, so that sample() does not report the model's logits as non-finite;
    the model's own non-finite logits stay as they are, and are reported."""
    largest, tiny = torch.finfo(torch.float32).max, torch.finfo(torch.float32).tiny
    logits = torch.tensor([[10.0, -1.5, 0.0, 3.0]])  # ids 0-2 in the prompt
    for r, held, greedy in ((tiny, (0, largest), 0), (largest, (1, -largest), 3)):
        processor = LogitsProcessor(1, 4, "cpu")
        processor.start([0], [SamplingParams(repetition_penalty=r)], [[0, 1, 2]], [()])
        got = processor(logits)
        assert torch.isfinite(got).all() and got[0, held[0]].item() == held[1] and got[0, 3].item() == 3.0
        assert sample(got, SamplingParams()).item() == greedy
    got = processor(torch.tensor([[math.inf, math.nan, 1.0, 0.5]]))
    assert got[0, 0].item() == math.inf and math.isnan(got[0, 1].item())
    assert sample(got, SamplingParams()).item() == NON_FINITE


def test_min_tokens_bias_and_penalties_match_a_float64_reference():
    """Rows of a pool, each its own parameters, prompt, ids held back by min_tokens (one of them also
    biased, one a prompt id) and generated ids (a NON_FINITE id counts nothing), processed in an order
    other than the pool's; rows never started are left out."""
    vocab, rng = 40, random.Random(0)
    params = {
        1: SamplingParams(presence_penalty=1.5, frequency_penalty=0.5, repetition_penalty=1.3, min_tokens=5),
        4: SamplingParams(frequency_penalty=-2.0, logit_bias={3: -100.0, 7: 2.5, 39: 0.75}, min_tokens=9),
        2: SamplingParams(repetition_penalty=0.7, presence_penalty=-0.5),
        0: SamplingParams(logit_bias={0: 100.0}),
    }
    held = {r: params[r].min_tokens_ids([2], [7, r]) for r in params}  # an EOS id 2, a stop id per row
    assert held == {1: {1, 2, 7}, 4: {2, 4, 7}, 2: set(), 0: set()}
    rows = list(params)
    prompts = {r: [rng.randrange(vocab) for _ in range(rng.randrange(1, 12))] + [7] for r in rows}
    outputs = {r: [] for r in rows}
    processor = LogitsProcessor(6, vocab, "cpu")
    processor.start(rows, [params[r] for r in rows], [prompts[r] for r in rows], [held[r] for r in rows])
    index = torch.tensor(rows)
    generator = torch.Generator().manual_seed(0)
    for step in range(12):
        logits = torch.randn(len(rows), vocab, generator=generator) * 4
        got = processor(logits, index)
        assert got.dtype == torch.float32
        for i, r in enumerate(rows):
            expected = reference(logits[i], params[r], prompts[r], outputs[r], held[r])
            torch.testing.assert_close(got[i].double(), expected, rtol=1e-6, atol=1e-5)
            assert got[i, 7].item() == -math.inf if r in (1, 4) and len(outputs[r]) < params[r].min_tokens \
                else math.isfinite(got[i, 7].item())
        ids = [rng.randrange(8) if step % 2 else rng.randrange(vocab) for _ in rows]  # repeats often
        ids[0] = NON_FINITE if step == 3 else ids[0]
        processor.add(torch.tensor(ids), index)
        for r, t in zip(rows, ids):
            if t != NON_FINITE:
                outputs[r].append(t)
    assert processor.counts[[3, 5]].sum() == 0  # rows not in the step are untouched
    assert processor.generated.tolist() == [12, 11, 12, 0, 12, 0]  # row 1's NON_FINITE counts nothing
    # starting a row again forgets its prompt and output, and min_tokens holds its ids back again
    processor.start([1], [params[1]], [[5]], [held[1]])
    logits = torch.randn(1, vocab, generator=generator)
    torch.testing.assert_close(processor(logits, torch.tensor([1]))[0].double(),
                               reference(logits[0], params[1], [5], [], held[1]), rtol=1e-6, atol=1e-5)
    assert processor(logits, torch.tensor([1]))[0, [1, 2, 7]].tolist() == [-math.inf] * 3


def test_all_rows_in_order_equal_the_same_rows_by_index():
    params = SamplingParams(frequency_penalty=1.0, repetition_penalty=1.2, logit_bias={1: -3.0})
    processor = LogitsProcessor(3, 16, "cpu")
    processor.start(range(3), [params] * 3, [[1, 2], [3], [4, 4, 5]], [()] * 3)
    processor.add(torch.tensor([6, 6, 1]))
    logits = torch.randn(3, 16, generator=torch.Generator().manual_seed(1))
    assert torch.equal(processor(logits), processor(logits, torch.arange(3)))
    assert torch.equal(processor(logits)[2:], processor(logits[2:], torch.tensor([2])))


def test_min_tokens_holds_its_ids_back_from_greedy_until_then():
    """Greedy takes the next best id while the argmax is held back: for min_tokens tokens; then the
    argmax again. A NaN or +inf of the model at a held-back id is still reported as non-finite."""
    params = SamplingParams(min_tokens=2)
    logits = torch.tensor([[0.0, 1.0, 5.0, 4.0, 2.0]])  # id 2: the EOS, the argmax
    processor = LogitsProcessor(1, 5, "cpu")
    processor.start([0], [params], [[1]], [params.min_tokens_ids([2], [3])])
    chosen = []
    for _ in range(3):
        ids = sample(processor(logits), params)
        processor.add(ids)
        chosen += ids.tolist()
    assert chosen == [4, 4, 2]  # neither 2 (EOS) nor 3 (a stop id) for 2 tokens
    processor.start([0], [params], [[1]], [{2}])
    for bad in (math.nan, math.inf):
        poisoned = logits.clone()
        poisoned[0, 2] = bad
        assert sample(processor(poisoned), params).item() == NON_FINITE


def test_ending_ids_and_min_tokens_ids():
    """The EOS ids end a row unless ignore_eos; a row's own stop ids always do. min_tokens holds back
    both, the EOS ids also with ignore_eos (as vLLM's); min_tokens 0 holds back nothing."""
    assert SamplingParams().ending_ids([2, 9], [5]) == {2, 5, 9}
    assert SamplingParams(ignore_eos=True).ending_ids([2, 9], [5, 9]) == {5, 9}
    assert SamplingParams(ignore_eos=True, min_tokens=3).min_tokens_ids([2, 9], [5]) == {2, 5, 9}
    assert SamplingParams(ignore_eos=True).min_tokens_ids([2, 9], [5]) == set()
    assert SamplingParams(min_tokens=1).changes_logits and not SamplingParams(ignore_eos=True).changes_logits


def test_logit_bias_is_kept_sorted_and_hashable():
    a = SamplingParams(logit_bias={9: 1, 2: -100})
    assert a.logit_bias == ((2, -100.0), (9, 1.0))
    b = SamplingParams(logit_bias=[(9, 1.0), (2, -100.0)])
    assert a == b and hash(a) == hash(b)
    c = SamplingParams(logit_bias={np.int64(9): np.float32(1.0), np.int32(2): -100})  # numpy ids, as prompts take
    assert c == a and all(type(t) is int and type(v) is float for t, v in c.logit_bias)
    assert not SamplingParams().changes_logits and SamplingParams(logit_bias=None).logit_bias == ()
    assert all(SamplingParams(**kw).changes_logits for kw in (dict(presence_penalty=0.1), dict(frequency_penalty=-1),
                                                              dict(repetition_penalty=1.1), dict(logit_bias={0: 0})))
    with pytest.raises(ValueError, match=r"\[30\].*\[0, 30\)"):
        SamplingParams(logit_bias={30: 1.0, 29: 1.0}).check_vocabulary(30)


def hard_logits(B, V, dtype, device="cpu", seed=0):
    """Logits (B, V) with the cases a max / argmax must get right: ties (the first index wins), a
    row with NaNs and +inf (the first NaN is the argmax, the max is NaN), a row of -inf only."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, V, generator=g).to(dtype)
    x[0, V // 3] = x[0, V // 2] = x[0, V - 1] = 30.0
    if B > 2:
        x[1, 3] = float("inf")
        x[1, 7] = x[1, V - 5] = float("nan")
        x[2] = float("-inf")
    return x.to(device)


def assert_max_argmax_equal(got, x):
    top, first = got
    assert top.dtype == torch.float32 and first.dtype == torch.int64
    assert torch.equal(first, x.argmax(-1))
    expected = x.amax(-1).float()
    assert torch.equal(top.isnan(), expected.isnan())
    assert torch.equal(top[~top.isnan()], expected[~expected.isnan()])


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,V,block", [(1, 1000, 64), (4, 257, 16), (3, 64, 64), (2, 1, 64)])
def test_max_argmax_kernel_equals_torch(dtype, B, V, block):
    """``kernels.max_argmax`` (the greedy pick on CUDA) gives torch's amax / argmax: ties, NaN, +inf,
    -inf rows, rows split over several programs, strided rows."""
    import flashcore

    if not flashcore.INTERPRET:
        pytest.skip("needs TRITON_INTERPRET=1 (set by conftest on the CPU)")
    from minillama import kernels

    x = hard_logits(B, V, dtype)
    assert_max_argmax_equal(kernels.max_argmax(x, block), x)
    wide = hard_logits(B, V + 9, dtype, seed=1)[:, :V]  # rows V + 9 apart
    assert_max_argmax_equal(kernels.max_argmax(wide, block), wide)
    if B > 3:
        x[3, 5] = float("inf")  # +inf alone: not finite either
    top, ids = kernels.max_argmax(x, block, non_finite=NON_FINITE)  # what a greedy sample() runs
    assert torch.equal(ids, torch.where(torch.isfinite(x.amax(-1)), x.argmax(-1), NON_FINITE))
    assert torch.equal(top.isnan(), x.amax(-1).isnan())
    assert (ids == NON_FINITE).sum().item() == {1: 0, 4: 3, 3: 2, 2: 0}[B]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_max_argmax_llama_vocab(dtype):
    """Llama 3's vocabulary, 1-64 rows, on the GPU: the kernel equals torch's amax / argmax, and a
    greedy sample() on the GPU picks what it picks on the CPU."""
    from minillama import kernels

    for B in (1, 3, 16, 64):
        x = hard_logits(B, 128256, dtype, "cuda", seed=B)
        assert_max_argmax_equal(kernels.max_argmax(x), x)
        assert torch.equal(sample(x, SamplingParams()).cpu(), sample(x.cpu(), SamplingParams()))
