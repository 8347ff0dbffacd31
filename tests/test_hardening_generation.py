"""Generation never returns silent garbage: NaN/Inf logits stop it with an error that says where to
look (found with no extra host sync), a temperature however small is never NaN, a padded
vocabulary never samples an id the tokenizer cannot decode, and odd arguments (bytes prompts,
unknown devices, seeds out of range) are clear errors. One model or one conversation used from
two threads at once is serialized or refused, never a half-updated cache.
"""
import json
import shutil
import sys
import threading
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from minillama import Llama
from minillama.concurrency import ConcurrentUseError
from minillama.conversation import Conversation
from minillama.errors import NonFiniteLogitsError
from minillama.sampling import NON_FINITE, SamplingParams, filtered_probs, sample
from tests.checkpoints import checkpoint_factory, llama3_tokenizer_json  # noqa: F401  (fixture)

SP = dict(hidden_size=32, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=64, tokenizer="sentencepiece")


@pytest.fixture(scope="module")
def sp_folder(checkpoint_factory):  # noqa: F811
    return checkpoint_factory(seed=3, **SP)[0]


@pytest.fixture(scope="module")
def llm(sp_folder):
    return Llama.from_pretrained(sp_folder, device="cpu")


def broken_copy(source, tmp_path, edit):
    """A copy of the checkpoint whose tensors ``edit(state)`` changed in place."""
    folder = tmp_path / "broken"
    shutil.copytree(source, folder)
    state = load_file(str(folder / "model.safetensors"))
    edit(state)
    save_file(state, str(folder / "model.safetensors"))
    return folder


# -- NaN / Inf ---------------------------------------------------------------------------------

def test_sampler_marks_rows_with_nan_or_inf_logits():
    nan, inf = float("nan"), float("inf")
    logits = torch.tensor([[0.0, 1.0, 2.0],  # fine
                           [0.0, nan, 2.0],  # a NaN
                           [0.0, inf, 2.0],  # +inf
                           [-inf, -inf, -inf],  # nothing to choose
                           [-inf, 1.0, 0.5]])  # -inf alone is a token never chosen: fine
    for params in (SamplingParams(), SamplingParams(temperature=1.0, seed=0),
                   SamplingParams(temperature=0.7, top_k=2, top_p=0.9, min_p=0.1, seed=0)):
        ids = sample(logits, params, params.generator("cpu")).tolist()
        assert ids[1:4] == [NON_FINITE] * 3
        assert ids[0] in (1, 2) and ids[4] in (1, 2)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nan_weight_stops_generation_and_names_the_tensor(sp_folder, tmp_path, bad):
    def edit(state):
        state["model.layers.1.mlp.up_proj.weight"][5, 7] = bad

    llm = Llama.from_pretrained(broken_copy(sp_folder, tmp_path, edit), device="cpu")
    expected = ("the model produced NaN/Inf logits (row 0, reading the prompt): these weights hold NaN/Inf values: "
                "model.layers.1.mlp.up_proj.weight (1 of 2048 values); fix or download the checkpoint again")
    with pytest.raises(NonFiniteLogitsError) as e:
        llm.generate(["Lily"], max_new_tokens=4)
    assert str(e.value) == expected
    with pytest.raises(NonFiniteLogitsError, match="model.layers.1.mlp.up_proj.weight"):
        "".join(llm.stream("Lily", max_new_tokens=4, temperature=0.8, seed=1))
    with pytest.raises(NonFiniteLogitsError, match="model.layers.1.mlp.up_proj.weight"):
        Conversation(llm).send("Lily", max_new_tokens=4)


def test_nan_in_one_head_row_only_when_sampled_rows_reach_it(sp_folder, tmp_path):
    """A NaN in the lm_head row of one id makes every row's logits non-finite: error for the live row."""
    def edit(state):
        state["lm_head.weight"][100, 0] = float("nan")

    llm = Llama.from_pretrained(broken_copy(sp_folder, tmp_path, edit), device="cpu")
    with pytest.raises(NonFiniteLogitsError, match=r"row 0, reading the prompt.*lm_head.weight \(1 of"):
        llm.generate(["Lily", "Tom"], max_new_tokens=3)


def test_float16_overflow_with_finite_weights_says_so(sp_folder, tmp_path):
    def edit(state):
        state["model.layers.0.mlp.down_proj.weight"] *= 100000.0  # |w| <= 22000: finite in float16, x @ w is not

    llm = Llama.from_pretrained(broken_copy(sp_folder, tmp_path, edit), device="cpu", dtype="float16")
    with pytest.raises(NonFiniteLogitsError) as e:
        llm.generate(["Lily and Tom went to the park"], max_new_tokens=3)
    assert str(e.value).endswith("every weight is finite, so the activations overflowed float16 (largest value "
                                 "65504): load the model with dtype='bfloat16' or 'float32'")


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.triton)])
def test_float32_overflow_in_a_norm_is_an_error_not_silent_zeros(sp_folder, tmp_path, backend):
    """Finite float32 weights far out of scale: mean(x^2) overflows inside RMSNorm. The norm gives
    NaN there (not rsqrt(inf) = 0, which turned every logit equal and printed garbage)."""
    def edit(state):
        state["model.embed_tokens.weight"] *= 1e30  # |x|^2 ~ 1e60: beyond float32's 3.4e38

    llm = Llama.from_pretrained(broken_copy(sp_folder, tmp_path, edit), device="cpu", backend=backend)
    with pytest.raises(NonFiniteLogitsError) as e:
        llm.generate(["Lily"], max_new_tokens=2)
    assert "every weight is finite, so the activations overflowed float32" in str(e.value)


def test_nan_appearing_during_decode_names_the_step(llm, monkeypatch):
    real = llm.model.forward
    calls = []

    def forward(*args, **kwargs):
        logits = real(*args, **kwargs)
        calls.append(1)
        if len(calls) == 3:  # prefill, decode 1, decode 2: NaN
            logits = logits.clone()
            logits[0, -1, 0] = float("nan")
        return logits

    monkeypatch.setattr(llm.model, "forward", forward)
    with pytest.raises(NonFiniteLogitsError, match=r"^the model produced NaN/Inf logits \(row 0, at new token 2\): "
                                                   r"every weight is finite, so the activations overflowed float32"):
        llm.generate(["Lily"], max_new_tokens=8)


def test_finished_rows_may_go_non_finite_without_harm(llm, monkeypatch):
    """A row that is done keeps running; a NON_FINITE mark there is ignored (and not fed back as an id)."""
    real = llm.model.forward
    alone = llm.generate(["Tom"], max_new_tokens=6)[0]

    def forward(tokens, *args, **kwargs):
        assert (tokens >= 0).all()
        logits = real(tokens, *args, **kwargs).clone()
        if kwargs.get("logits_at") is not None:  # prefill: row 0 samples </s> (2) and is done
            logits[0] = 0.0
            logits[0, :, 2] = 1.0
        else:
            logits[0] = float("nan")
        return logits

    monkeypatch.setattr(llm.model, "forward", forward)
    done, live = llm.generate(["Lily", "Tom"], max_new_tokens=6)
    assert (done.token_ids, done.finish_reason, done.stop) == ([], "stop", 2)
    assert live.token_ids == alone.token_ids and len(live.token_ids) == 6


@pytest.mark.parametrize("sampling", [
    dict(temperature=0.8, seed=2),
    dict(temperature=0.8, seed=2, presence_penalty=0.5, frequency_penalty=1.0, repetition_penalty=1.2,
         logit_bias={5: -3.0}),
    dict(repetition_penalty=1.2),
])
def test_non_finite_check_costs_no_host_sync(llm, monkeypatch, sampling):
    """The loop reads tensors back once per step (the sampled ids), nothing more: the NaN/Inf check
    rides on that read, and the penalties count the ids on the device. (flashcore's reference
    attention, used on the CPU, reads lengths itself.)"""
    reads = []
    for name in ("tolist", "item", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _name=name, _original=original, **kwargs):
            if "flashcore" not in sys._getframe(1).f_code.co_filename:
                reads.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    results = llm.generate(["Lily", "One day"], max_new_tokens=7, **sampling)
    steps = 1 + max(r.decode_steps for r in results)
    assert reads == ["tolist"] * steps


# -- temperature --------------------------------------------------------------------------------

@pytest.mark.parametrize("temperature", [1e-45, 5e-324, 1e-38, 1e-30])
def test_tiny_temperature_is_greedy_never_nan(temperature):
    logits = torch.tensor([[1e4, -1e4, 1e4 - 1e-2, 3.0], [0.5, 0.25, -2.0, 0.0]])
    params = SamplingParams(temperature=temperature, seed=0)
    probs = filtered_probs(logits, params)
    assert torch.isfinite(probs).all()
    assert probs.argmax(-1).tolist() == [0, 0] and probs[:, 0].tolist() == [1.0, 1.0]
    assert sample(logits, params, params.generator("cpu")).tolist() == [0, 0]


def test_tiny_temperature_generates_the_greedy_tokens(llm):
    greedy = llm.generate(["Lily and"], max_new_tokens=8)[0].token_ids
    assert llm.generate(["Lily and"], max_new_tokens=8, temperature=1e-300, seed=1)[0].token_ids == greedy


# -- padded vocabularies ------------------------------------------------------------------------

def test_padded_vocab_loads_and_never_samples_undecodable_ids(checkpoint_factory, tmp_path):  # noqa: F811
    source, config = checkpoint_factory(vocab_size=640, seed=4, **SP)  # the tokenizer has fewer ids
    n = Llama.from_pretrained(source, device="cpu").tokenizer.vocab_size
    assert n < 640

    def edit(state):
        state["lm_head.weight"][n:] = 50.0 * state["lm_head.weight"][:1].sign()  # padded ids would always win

    llm = Llama.from_pretrained(broken_copy(source, tmp_path, edit), device="cpu")
    assert llm.logits([1, 5, 9])[:, n:].max() > llm.logits([1, 5, 9])[:, :n].max()  # they would, unmasked
    for kwargs in (dict(), dict(temperature=1.0, seed=0), dict(temperature=2.0, top_k=50, seed=1)):
        for r in llm.generate(["Lily", "The ball", "One"], max_new_tokens=12, **kwargs):
            assert r.token_ids and max(r.token_ids) < n
    stats = Conversation(llm).send("Lily", max_new_tokens=5)
    assert stats.new_tokens == 5
    with pytest.raises(ValueError, match=rf"token id\(s\) \[{n}\] are outside the vocabulary \[0, {n}\)"):
        llm.generate([[1, n]], max_new_tokens=1)


def test_ids_missing_inside_the_tokenizer_are_never_sampled(checkpoint_factory, tmp_path):  # noqa: F811
    source = checkpoint_factory(tokenizer="llama3", n_layers=1, seed=6)[0]
    folder = tmp_path / "holes"
    shutil.copytree(source, folder)
    spec = json.loads(llama3_tokenizer_json())
    holes = [1000, 1001, 5000]
    spec["model"]["vocab"] = {t: i for t, i in spec["model"]["vocab"].items() if i not in holes}
    # the special tokens listed in model.vocab too: else the tokenizers library numbers them from
    # len(model.vocab) on, 3 below their ids (an error at load)
    spec["model"]["vocab"].update({t["content"]: t["id"] for t in spec["added_tokens"]})
    (folder / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    state = load_file(str(folder / "model.safetensors"))
    state["lm_head.weight"][holes] = 50.0 * state["lm_head.weight"][:1].sign()
    save_file(state, str(folder / "model.safetensors"))
    llm = Llama.from_pretrained(folder, device="cpu")
    assert llm.tokenizer.undecodable_ids() == holes and llm.tokenizer.bos_id == 128000
    for kwargs in (dict(), dict(temperature=1.0, seed=0)):
        (r,) = llm.generate(["Lily"], max_new_tokens=6, **kwargs)
        assert len(r.token_ids) == 6 and not set(r.token_ids) & set(holes)


# -- odd arguments -------------------------------------------------------------------------------

@pytest.mark.parametrize("prompt, named", [
    (b"Lily", "got bytes"), (bytearray(b"Lily"), "got bytes"), ([1.5, 2.0], "list of int token ids, got list"),
    ([1, True], "list of int token ids"), ([1, "2"], "list of int token ids"), (None, "got NoneType None"),
])
def test_prompts_that_are_not_text_or_ids_are_type_errors(llm, prompt, named):
    for call in (lambda: llm.generate([prompt], max_new_tokens=1), lambda: llm.logits(prompt)):
        with pytest.raises(TypeError, match=named):
            call()
    with pytest.raises(TypeError):  # stream says "a string or a list of token ids" for some of them
        llm.stream(prompt, max_new_tokens=1)


def test_integer_like_ids_are_fine(llm):
    ids = [1, 5, 9]
    expected = llm.generate([ids], max_new_tokens=3)[0].token_ids
    assert llm.generate([np.array(ids)], max_new_tokens=3)[0].token_ids == expected
    assert llm.generate([torch.tensor(ids)], max_new_tokens=3)[0].token_ids == expected
    for ids_like in (np.array(ids), torch.tensor(ids)):  # stream takes what generate takes
        stream = llm.stream(ids_like, max_new_tokens=3)
        list(stream)
        assert stream.result.token_ids == expected
    with pytest.raises(TypeError, match="use generate for a batch"):
        llm.stream(["Lily", "Tom"], max_new_tokens=3)


@pytest.mark.parametrize("kwargs, error, named", [
    (dict(stop=5), TypeError, "stop must be a list (or None), got int"),
    (dict(stop_ids=5), TypeError, "stop_ids must be a list (or None), got int"),
    (dict(stop_ids=b"\x02"), TypeError, "stop_ids must be a list (or None), got bytes"),
    (dict(seed=2 ** 64), ValueError, "seed must be an integer in [-2**63, 2**64) or None, got 18446744073709551616"),
    (dict(seed=-(2 ** 63) - 1), ValueError, "seed must be an integer in [-2**63, 2**64)"),
])
def test_odd_generation_arguments(llm, kwargs, error, named):
    with pytest.raises(error) as e:
        llm.generate(["Lily"], max_new_tokens=2, temperature=1.0, **kwargs)
    assert named in str(e.value)


@pytest.mark.parametrize("device, named", [
    ("gpu0", "device 'gpu0' is not a device name; this machine has: cpu"),
    ("", "device '' is not a device name; this machine has: cpu"),
    ("meta", "device meta cannot run minillama; this machine has: cpu"),
    ([0], "device [0] is not a device name"),
])
def test_unknown_devices_say_what_exists(sp_folder, device, named):
    with pytest.raises(ValueError) as e:
        Llama.from_pretrained(sp_folder, device=device)
    assert str(e.value).startswith(named)



@pytest.mark.parametrize("kwargs, named", [
    (dict(tp=0), "tp must be None or an integer >= 1, got 0"),  # was: "launch with torchrun --nproc-per-node 0"
    (dict(tp="2"), "tp must be None or an integer >= 1, got '2'"),
    (dict(quantize=["int8"]), "quantize must be None or one of ['fp8', 'int8'], got ['int8']"),  # was: unhashable type
])
def test_odd_loading_arguments_are_named(sp_folder, kwargs, named):
    with pytest.raises(ValueError) as e:
        Llama.from_pretrained(sp_folder, device="cpu", **kwargs)
    assert str(e.value) == named


def test_a_progress_that_is_not_callable_is_named_before_loading(sp_folder):
    with pytest.raises(TypeError, match=r"^progress must be None or a callable .*, got str$"):
        Llama.from_pretrained(sp_folder, device="cpu", progress="yes")


def test_an_empty_list_of_ids_is_named_as_such(llm):
    """Not "a prompt encodes to 0 tokens and the tokenizer adds no BOS": no text was given."""
    for call in (lambda: llm.logits([]), lambda: llm.generate([[]], max_new_tokens=1),
                 lambda: llm.stream([], max_new_tokens=1)):
        with pytest.raises(ValueError, match=r"^a prompt of token ids is empty: give at least one id$"):
            call()


def test_a_cache_that_does_not_fit_the_call_is_named_before_any_work(llm, sp_folder):
    with pytest.raises(ValueError) as e:
        llm.generate(["Lily"], max_new_tokens=2, cache=llm.new_cache(2, 16))
    assert str(e.value) == "cache has 2 row(s) but 1 prompt(s) were given: make it with Llama.new_cache(1)"
    with pytest.raises(TypeError, match=r"^cache must be a KVCache \(Llama.new_cache\), got str$"):
        llm.generate(["Lily"], max_new_tokens=2, cache="cache")
    other = Llama.from_pretrained(sp_folder, device="cpu", dtype="bfloat16")  # the same model in another dtype
    cache = other.new_cache(1, 16)
    with pytest.raises(ValueError) as e:
        llm.generate(["Lily"], max_new_tokens=2, cache=cache)
    assert str(e.value).startswith("cache was made for another model (torch.bfloat16 on cpu, K/V (2, 1, 16, 2, 8)); "
                                   "this one needs torch.float32 on cpu, K/V (2, rows, tokens, 2, 8)")
    assert cache.seq_lens_cpu == [0]


def test_a_given_cache_is_checked_without_allocating_one(llm, monkeypatch):
    """The check of a cache passed in compares shapes, dtype and device; it used to allocate a
    1-token cache of every layer on each call to learn this model's layout."""
    (alone,) = llm.generate(["Lily"], max_new_tokens=3)
    cache = llm.new_cache(1, 16)

    def new_cache(batch, max_len):
        raise AssertionError(f"new_cache({batch}, {max_len}) while a cache was given")

    monkeypatch.setattr(llm.runner, "new_cache", new_cache)
    (r,) = llm.generate(["Lily"], max_new_tokens=3, cache=cache)
    assert r.token_ids == alone.token_ids


# -- threads ------------------------------------------------------------------------------------

def test_generations_in_two_threads_equal_running_alone(llm, monkeypatch):
    prompts = [["Lily and Tom"], ["Once upon a time", "The"]]
    alone = [[r.token_ids for r in llm.generate(p, max_new_tokens=10)] for p in prompts]
    inside, overlaps = [0], []
    real = llm.model.forward

    def forward(*args, **kwargs):  # slow, and records whether two forwards ever overlap
        inside[0] += 1
        overlaps.append(inside[0] > 1)
        time.sleep(0.002)
        try:
            return real(*args, **kwargs)
        finally:
            inside[0] -= 1

    monkeypatch.setattr(llm.model, "forward", forward)
    got = [None, None]

    def work(i):
        got[i] = [r.token_ids for r in llm.generate(prompts[i], max_new_tokens=10)]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == alone
    assert overlaps and not any(overlaps)


def test_a_conversation_refuses_a_second_caller(llm):
    conv = Conversation(llm)
    entered, release = threading.Event(), threading.Event()

    def slow(text):
        entered.set()
        release.wait(10)

    first = threading.Thread(target=lambda: conv.send("Lily", max_new_tokens=4, on_text=slow))
    first.start()
    assert entered.wait(30)
    for call in (lambda: conv.send("Tom", max_new_tokens=4), conv.reset, lambda: conv.set_system("x")):
        with pytest.raises(ConcurrentUseError, match="this Conversation is busy with another call"):
            call()
    release.set()
    first.join()
    assert [m["role"] for m in conv.messages] == ["user", "assistant"] and conv.messages[0]["content"] == "Lily"
    assert conv.cache.seq_lens_cpu == [len(conv.cached_ids)]
    assert len(conv.cached_ids) == len(conv.encode(conv.messages[:1])) + 3  # the last token is never fed
    conv.send("Tom", max_new_tokens=4)  # free again
    assert len(conv.messages) == 4
    with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 1, got True"):
        conv.send("Tom", max_new_tokens=True)


def test_a_callback_cannot_reenter_its_conversation(llm):
    conv = Conversation(llm)
    seen = []

    def reenter(text):
        try:
            conv.reset()
        except ConcurrentUseError as e:
            seen.append(e)

    conv.send("Lily", max_new_tokens=3, on_text=reenter)
    assert seen and len(conv.messages) == 2
