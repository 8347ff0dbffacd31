"""Generation users rely on: ragged batches equal solo runs, stop ids and stop strings, streaming
text that is exact to the character, and context limits checked before any work.

Two kinds of model are used: tiny random-weight checkpoints (real forward passes, for the batch
and cache behaviour) and the same checkpoint with a scripted forward that emits a chosen token
sequence (for text: emoji and CJK spelled with byte-fallback tokens, stop strings across tokens).
The bundled demo model, which ends its stories with its EOS, tests ``ignore_eos`` and ``min_tokens``.
"""
import json
import random
import shutil

import pytest
import torch

from minillama import Llama
from minillama.hub import DEMO_MODEL_DIR
from minillama.streaming import IncrementalDecoder, StopStrings
from tests.checkpoints import EOM, EOT, END_OF_TEXT, write_checkpoint
from tests.reference_sampling import reference_logits

BOS_SP = 1  # <s> of the SentencePiece test tokenizer
EOS_SP = 2  # </s>
TEXT = "Lily said: 😀 猫 and 日本, ok 🦙!"  # 4-byte emoji, 3-byte CJK, none in the test vocabularies


@pytest.fixture(scope="module")
def sp_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sp")
    write_checkpoint(folder, tokenizer="sentencepiece", n_heads=4, n_kv_heads=2, seed=1)
    return folder


@pytest.fixture(scope="module")
def sp(sp_folder):
    return Llama.from_pretrained(sp_folder, device="cpu")


@pytest.fixture(scope="module")
def llama3(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama3")
    write_checkpoint(folder, tokenizer="llama3", n_heads=4, n_kv_heads=1, seed=2)
    return Llama.from_pretrained(folder, device="cpu")


def script_forward(monkeypatch, llm, script):
    """Make the model emit ``script`` (the same ids in every row), one id per forward; each
    generation (its prefill passes ``logits_at``) starts the script again."""
    calls = []

    def forward(tokens, cache=None, logits_at=None):
        if logits_at is not None:
            calls.clear()
        step = len(calls)
        calls.append(tuple(tokens.shape))
        logits = torch.zeros(tokens.shape[0], 1, llm.config.vocab_size)
        logits[:, 0, script[min(step, len(script) - 1)]] = 1.0
        return logits

    monkeypatch.setattr(llm.model, "forward", forward)
    return calls


def continuation(tok, prompt_text, full_text):
    """Prompt ids and the ids that continue them into ``full_text`` (the prompt's ids are a prefix)."""
    prompt = tok.encode(prompt_text, bos=True)
    full = tok.encode(full_text, bos=True)
    assert full[: len(prompt)] == prompt, "test texts must tokenize with the prompt as a prefix"
    return prompt, full[len(prompt):]


def outcome(result):
    return result.token_ids, result.text, result.finish_reason, result.stop


# -- ragged batches --------------------------------------------------------------------------


def random_prompts(llm, lengths, seed=0):
    rng = random.Random(seed)
    return [[BOS_SP] + [rng.randrange(3, llm.config.vocab_size) for _ in range(n - 1)] for n in lengths]


def test_ragged_batch_equals_each_prompt_alone(sp):
    prompts = random_prompts(sp, (1, 7, 30, 100, 12))
    batch = sp.generate(prompts, max_new_tokens=20)
    for prompt, row in zip(prompts, batch):
        (alone,) = sp.generate([prompt], max_new_tokens=20)
        assert row.token_ids == alone.token_ids
        assert outcome(row) == outcome(alone)
        assert row.prompt_ids == prompt


def test_prefill_in_chunks_equals_one_forward(monkeypatch, sp):
    """A prompt longer than ``prefill_tokens`` is prefilled in chunks of columns: each row's fill
    advances by its own tokens, the first logits and all tokens equal one forward's, and no forward
    takes more than max(prefill_tokens, rows) tokens; also after fills of earlier turns."""
    from minillama.generate import TokenLoop

    forward, shapes = sp.model.forward, []

    def counting(tokens, *args, **kwargs):
        shapes.append(tuple(tokens.shape))
        return forward(tokens, *args, **kwargs)

    monkeypatch.setattr(sp.model, "forward", counting)
    history = random_prompts(sp, (5, 1, 9), seed=3)
    prompts = random_prompts(sp, (30, 1, 17), seed=4)

    def cache_after(turn):
        cache = sp.new_cache(3, 80)
        if turn:  # each row continues an earlier turn of its own length
            list(TokenLoop(sp.runner, history, 1, cache=cache))
        return cache

    for turn in (False, True):
        fills = [len(h) for h in history] if turn else [0, 0, 0]
        results = {}
        for prefill_tokens, columns in ((10**6, 30), (40, 13), (9, 3), (2, 1)):
            cache = cache_after(turn)
            shapes.clear()
            first = TokenLoop(sp.runner, prompts, 6, cache=cache, prefill_tokens=prefill_tokens)._prefill()
            assert [s[1] for s in shapes] == [columns] * (30 // columns) + [30 % columns] * (30 % columns > 0)
            assert cache.seq_lens_cpu == [f + len(p) for f, p in zip(fills, prompts)]
            loop = TokenLoop(sp.runner, prompts, 6, cache=cache_after(turn), prefill_tokens=prefill_tokens)
            list(loop)
            results[prefill_tokens] = first, loop.new_tokens
        whole, whole_tokens = results.pop(10**6)
        for first, new_tokens in results.values():
            assert torch.allclose(first, whole, rtol=1e-4, atol=1e-4)
            assert new_tokens == whole_tokens


def test_finished_row_changes_nothing_and_loop_stops_when_all_done(sp):
    prompts = random_prompts(sp, (1, 7, 30, 100), seed=1)
    solo = [sp.generate([p], max_new_tokens=12)[0].token_ids for p in prompts]
    stop = solo[1][2]  # row 1 stops at its third token; others stop there too if they produce it
    batch = sp.generate(prompts, max_new_tokens=12, stop_ids=[stop])
    for ids, row in zip(solo, batch):
        expected = ids[: ids.index(stop)] if stop in ids else ids
        assert row.token_ids == expected
        assert row.finish_reason == ("stop" if stop in ids else "length")
    assert batch[1].decode_steps == 2

    # every row stops on its first token: one forward (the prefill), no decode step
    firsts = [ids[0] for ids in solo]
    done = sp.generate(prompts, max_new_tokens=12, stop_ids=firsts)
    assert [r.token_ids for r in done] == [[]] * 4
    assert [r.decode_steps for r in done] == [0] * 4


def test_next_step_launched_before_the_ids_are_read_changes_nothing(monkeypatch, sp):
    """On CUDA the loop launches step n + 1 before the host reads step n's ids, and takes it back
    when every row turns out to be done. Forced here on the CPU: the same tokens, finish reasons and
    steps as the plain loop, and the cache left as the plain loop leaves it (fills, and every cached
    key / value), whether rows end by stop ids at different steps, by length, by the caller's
    finish() (a stop string), or by sampling with penalties, and a second turn on that cache
    continues alike; a Ctrl-C while the host waits takes the step back too. A caller that stops
    iterating keeps the launched step: its cache is the plain loop's one step later."""
    assert_overlapped_loop_equals_plain(monkeypatch, sp)


@pytest.mark.gpu
def test_next_step_launched_before_the_ids_are_read_changes_nothing_on_gpu(monkeypatch, sp_folder):
    """The same on CUDA, where the ids reach the host by a pinned copy while the next step runs."""
    assert_overlapped_loop_equals_plain(monkeypatch, Llama.from_pretrained(sp_folder, device="cuda"))


def assert_overlapped_loop_equals_plain(monkeypatch, sp):
    from minillama.generate import TokenLoop
    from minillama.sampling import SamplingParams

    prompts = random_prompts(sp, (1, 7, 30), seed=7)
    solo = [sp.generate([p], max_new_tokens=12)[0].token_ids for p in prompts]
    stop = solo[1][3]  # row 1 ends at its fourth token, the others where they produce it, if they do
    penalized = SamplingParams(temperature=1.0, top_p=0.9, seed=3, frequency_penalty=1.0)

    def run(overlap, make_loop, finish_at=None, close_at=(None, None)):
        monkeypatch.setattr(TokenLoop, "_overlaps", staticmethod(lambda ids: overlap))
        sp.runner.clear()  # both runs meet eager steps, captures and replays (other kernels) alike
        cache = sp.new_cache(len(prompts), 100)
        turns = []
        for turn in range(2):
            loop = make_loop(cache, turn)
            for step, out in enumerate(loop):
                if step == finish_at:
                    loop.finish(0)
                    loop.finish(2)
                if step == close_at[turn]:
                    break
            fills = list(cache.seq_lens_cpu)
            assert cache.seq_lens.tolist() == fills
            keys = [(cache.k[:, b, :n].clone(), cache.v[:, b, :n].clone()) for b, n in enumerate(fills)]
            turns.append((loop.new_tokens, loop.finish_reason, loop.stop_token, loop.finish_step, fills, keys))
        return turns

    cases = {
        "stop ids": (lambda cache, turn: TokenLoop(sp.runner, prompts, 12, stop_ids=[stop], cache=cache), {}),
        "length": (lambda cache, turn: TokenLoop(sp.runner, prompts, 5 + turn, cache=cache), {}),
        "finish()": (lambda cache, turn: TokenLoop(sp.runner, prompts, 9, stop_ids=[stop], cache=cache),
                     dict(finish_at=4)),
        "penalties": (lambda cache, turn: TokenLoop(sp.runner, prompts, 8, penalized, cache=cache), {}),
    }
    for name, (make_loop, stops) in cases.items():
        plain, overlapped = run(False, make_loop, **stops), run(True, make_loop, **stops)
        for (*outcome_a, keys_a), (*outcome_b, keys_b) in zip(plain, overlapped):
            assert outcome_a == outcome_b, name
            for (k_a, v_a), (k_b, v_b) in zip(keys_a, keys_b):
                assert torch.equal(k_a, k_b) and torch.equal(v_a, v_b), name
    assert any(len(t) < 12 for t in run(True, cases["stop ids"][0])[0][0])  # a stop id did end a row

    # the caller stops at step 3 of the first turn: the overlapped loop had launched step 4 (which
    # feeds the last yielded token) and keeps it, so its cache is the plain loop's after step 4;
    # the second turn, run to its end, continues alike from both
    def stop_early(cache, turn):
        return TokenLoop(sp.runner, prompts, 12, cache=cache)

    plain, overlapped = run(False, stop_early, close_at=(4, None)), run(True, stop_early, close_at=(3, None))
    assert [t[:4] for t in plain[0][0]] == overlapped[0][0] and all(len(t) == 4 for t in overlapped[0][0])
    assert plain[0][4] == overlapped[0][4] == [len(p) + 4 for p in prompts]
    assert plain[1][:5] == overlapped[1][:5]
    for turn in range(2):
        for (k_a, v_a), (k_b, v_b) in zip(plain[turn][5], overlapped[turn][5]):
            assert torch.equal(k_a, k_b) and torch.equal(v_a, v_b)

    # a Ctrl-C while the host waits for step 2's ids (step 3 launched in the overlapped loop)
    fills = {}
    for overlap in (False, True):
        monkeypatch.setattr(TokenLoop, "_overlaps", staticmethod(lambda ids: overlap))
        cache = sp.new_cache(len(prompts), 100)
        loop = TokenLoop(sp.runner, prompts, 12, cache=cache)
        steps = iter(loop)
        next(steps), next(steps)
        reads, tolist = [], torch.Tensor.tolist

        def interrupted(t):
            reads.append(t)
            raise KeyboardInterrupt

        monkeypatch.setattr(torch.Tensor, "tolist", interrupted)
        with pytest.raises(KeyboardInterrupt):
            next(steps)
        monkeypatch.setattr(torch.Tensor, "tolist", tolist)
        assert len(reads) == 1
        fills[overlap] = (list(cache.seq_lens_cpu), cache.seq_lens.tolist())
    assert fills[True] == fills[False] and fills[True][0] == fills[True][1]


def test_sampling_in_a_batch_is_seeded(sp):
    prompts = random_prompts(sp, (3, 9))
    kwargs = dict(max_new_tokens=10, temperature=1.0, top_p=0.9, seed=5)
    a = sp.generate(prompts, **kwargs)
    b = sp.generate(prompts, **kwargs)
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    assert a[0].token_ids != sp.generate(prompts, **{**kwargs, "seed": 6})[0].token_ids


# -- logit bias and penalties ---------------------------------------------------------------


def test_frequency_penalty_moves_greedy_away_from_repeats(sp):
    """Greedy on a random model repeats ids; a frequency penalty of 2 follows it up to the first
    repeat, then avoids repeats altogether; -2 repeats one id over and over."""
    (prompt,) = random_prompts(sp, (5,))
    plain = sp.generate([prompt], max_new_tokens=24)[0].token_ids
    away = sp.generate([prompt], max_new_tokens=24, frequency_penalty=2.0)[0].token_ids
    toward = sp.generate([prompt], max_new_tokens=24, frequency_penalty=-2.0)[0].token_ids
    first_repeat = next(i for i, t in enumerate(plain) if t in plain[:i])
    assert away[:first_repeat] == plain[:first_repeat] and away[first_repeat] != plain[first_repeat]
    assert len(set(away)) == 24 > len(set(plain)) > len(set(toward))
    assert toward[-10:] == [toward[-1]] * 10


@pytest.mark.parametrize("kwargs", [
    dict(frequency_penalty=2.0),
    dict(presence_penalty=1.5, repetition_penalty=1.3),
    dict(repetition_penalty=0.5, frequency_penalty=-0.3),
    dict(logit_bias={27: -100.0, 332: 5.0}, presence_penalty=-1.0),
])
def test_greedy_tokens_are_the_argmax_of_the_reference_logits(sp, kwargs):
    """Each greedy token is the argmax of one full forward's logits, biased and penalized in float64
    (the prompt counts for the repetition penalty only); a batch's rows equal their solo runs."""
    prompts = random_prompts(sp, (5, 12))
    batch = sp.generate(prompts, max_new_tokens=16, **kwargs)
    assert any(r.token_ids != sp.generate([p], max_new_tokens=16)[0].token_ids for p, r in zip(prompts, batch))
    for prompt, row in zip(prompts, batch):
        assert row.token_ids == sp.generate([prompt], max_new_tokens=16, **kwargs)[0].token_ids
        logits = sp.logits(prompt + row.token_ids)[len(prompt) - 1:]
        for i, t in enumerate(row.token_ids):
            expected = reference_logits(logits[i], prompt=prompt, output=row.token_ids[:i],
                                        **{k: list(v.items()) if k == "logit_bias" else v for k, v in kwargs.items()})
            assert t == int(expected.argmax()), f"step {i}"


# -- stop ids --------------------------------------------------------------------------------


def test_stop_ids_come_from_generation_config_and_tokenizer(llama3, sp):
    assert llama3.stop_ids == [END_OF_TEXT, EOM, EOT]  # <|end_of_text|>, <|eom_id|>, <|eot_id|>
    assert sp.stop_ids == [EOS_SP]


@pytest.mark.parametrize("stop_id", [END_OF_TEXT, EOM, EOT])
def test_each_llama3_eos_stops(monkeypatch, llama3, stop_id):
    prompt, ids = continuation(llama3.tokenizer, "Lily", "Lily and Tom")
    script_forward(monkeypatch, llama3, ids + [stop_id, 500, 501])
    (r,) = llama3.generate(["Lily"], max_new_tokens=20)
    assert (r.token_ids, r.text, r.finish_reason, r.stop) == (ids, " and Tom", "stop", stop_id)


def test_stop_id_of_the_checkpoint_ends_generation(sp_folder, sp, tmp_path):
    """A stop id written in generation_config.json stops the real model where it samples it."""
    prompt = random_prompts(sp, (5,))[0]
    (free,) = sp.generate([prompt], max_new_tokens=10)
    stop = free.token_ids[4]
    folder = tmp_path / "ckpt"
    shutil.copytree(sp_folder, folder)
    gen = json.loads((folder / "generation_config.json").read_text())
    gen["eos_token_id"] = [EOS_SP, stop]
    (folder / "generation_config.json").write_text(json.dumps(gen))
    llm = Llama.from_pretrained(folder, device="cpu")
    (r,) = llm.generate([prompt], max_new_tokens=10)
    cut = free.token_ids.index(stop)
    assert r.token_ids == free.token_ids[:cut]
    assert (r.finish_reason, r.stop) == ("stop", stop)


def test_length_finish(monkeypatch, sp):
    prompt, ids = continuation(sp.tokenizer, "Lily", "Lily and Tom")
    script_forward(monkeypatch, sp, ids + ids)
    (r,) = sp.generate(["Lily"], max_new_tokens=len(ids))
    assert (r.token_ids, r.text, r.finish_reason, r.stop) == (ids, " and Tom", "length", None)
    (r,) = sp.generate(["Lily"], max_new_tokens=0)
    assert (r.token_ids, r.text, r.finish_reason) == ([], "", "length")


# -- text and streaming ----------------------------------------------------------------------


@pytest.mark.parametrize("model", ["sp", "llama3"])
def test_continuation_keeps_its_leading_space(request, monkeypatch, model):
    llm = request.getfixturevalue(model)
    prompt, ids = continuation(llm.tokenizer, "Lily", "Lily and Tom")
    script_forward(monkeypatch, llm, ids + [llm.stop_ids[0]])
    (r,) = llm.generate(["Lily"], max_new_tokens=20)
    assert r.text == " and Tom"
    (r,) = llm.generate([prompt[:1]], max_new_tokens=20)  # a bare BOS: the text starts here
    assert r.text.lstrip() == "and Tom" and not r.text.startswith("<")


@pytest.mark.parametrize("model", ["sp", "llama3"])
def test_stream_is_exact_for_multibyte_characters(request, monkeypatch, model):
    llm = request.getfixturevalue(model)
    prompt, ids = continuation(llm.tokenizer, "Lily said:", TEXT)
    assert len(ids) > len(TEXT[len("Lily said:"):]), "the emoji and CJK must be spelled in bytes"
    script_forward(monkeypatch, llm, ids + [llm.stop_ids[0]])
    stream = llm.stream("Lily said:", max_new_tokens=100)
    assert stream.result is None
    deltas = list(stream)
    expected = " 😀 猫 and 日本, ok 🦙!"
    assert "".join(deltas) == expected == stream.result.text
    assert all("\ufffd" not in d for d in deltas)
    assert "😀" in deltas or any(d.endswith("😀") for d in deltas)  # the emoji comes out whole
    assert len(deltas) < len(ids)  # byte tokens of a character were held back, not emitted empty
    assert (stream.result.token_ids, stream.result.finish_reason) == (ids, "stop")
    (r,) = llm.generate(["Lily said:"], max_new_tokens=100)
    assert (r.text, r.token_ids) == (expected, ids)


@pytest.mark.parametrize("model", ["sp", "llama3"])
def test_decoder_deltas_equal_full_decode(request, model):
    """Any split of a text into prompt and continuation: deltas join to decode(all) - decode(prompt)."""
    tok = request.getfixturevalue(model).tokenizer
    rng = random.Random(0)
    alphabet = list("ab z.,\n") + ["😀", "猫", "é", "日本", "🦙", "Lily", " Tom"]
    for _ in range(200):
        ids = tok.encode("".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 25))), bos=True)
        k = rng.randrange(1, len(ids) + 1)
        context = ids[1:k]  # the decoder leaves a leading BOS out
        before = tok.decode(context)
        if before.endswith("\ufffd"):  # a prompt of ids that ends inside a character
            continue
        decoder = IncrementalDecoder(tok, ids[:k])
        deltas = [decoder.push(t) for t in ids[k:]] + [decoder.flush()]
        assert "".join(deltas) == tok.decode(context + ids[k:])[len(before):] == decoder.text


def test_decoder_flushes_an_unfinished_character(sp):
    tok = sp.tokenizer
    emoji = tok.encode("😀", bos=False)[-4:]  # <0xF0> <0x9F> <0x98> <0x80>
    decoder = IncrementalDecoder(tok, tok.encode("Lily", bos=True))
    assert [decoder.push(t) for t in emoji[:2]] == ["", ""]
    assert "\ufffd" in decoder.flush()  # the bytes never formed a character
    # random ids (invalid byte runs included) still give deltas that join to .text
    rng = random.Random(1)
    decoder = IncrementalDecoder(tok, [BOS_SP, 300])
    deltas = [decoder.push(rng.randrange(3, 512)) for _ in range(300)] + [decoder.flush()]
    assert "".join(deltas) == decoder.text


def test_decoder_keeps_the_space_after_a_control_token(sp):
    """A control token decodes as its piece, as transformers decodes it (SentencePiece itself decodes
    <s> and </s> to nothing), and the piece after it keeps its leading space, also where a decode (a
    streaming window) begins at the control token: SentencePiece drops the leading space of what it
    decodes, so such a window lost the space of " and"."""
    tok = sp.tokenizer
    prompt, and_tom = continuation(tok, "Lily", "Lily and Tom")
    for control, piece in ((BOS_SP, "<s>"), (EOS_SP, "</s>")):
        ids = [control] + and_tom
        assert tok.decode(prompt[1:] + ids) == f"Lily{piece} and Tom"
        assert tok.decode(ids) == f"{piece} and Tom"
        decoder = IncrementalDecoder(tok, prompt)
        deltas = [decoder.push(t) for t in ids] + [decoder.flush()]
        assert "".join(deltas) == f"{piece} and Tom"
        decoder = IncrementalDecoder(tok, prompt + [control])  # the prompt ends with one
        assert "".join([decoder.push(t) for t in and_tom] + [decoder.flush()]) == " and Tom"


def test_stop_strings_unit():
    s = StopStrings(["Tom", "\n\n"])
    assert s.push("Lily and T") == ("Lily and ", None)  # "T" may start "Tom": held back
    assert s.push("o") == ("", None)
    assert s.push("m went") == ("", "Tom")
    assert s.push("more") == ("", "Tom") and s.flush() == ""
    s = StopStrings(["Tom"])
    assert s.push("a T") == ("a ", None)
    assert s.push("im") == ("Tim", None)
    assert s.push(" T") == (" ", None) and s.flush() == "T"
    s = StopStrings(["abcd", "bc"])  # the stop that completes first wins, however the text is split
    assert s.push("xabc") == ("xa", "bc")
    s = StopStrings(["abcd", "bc"])
    assert s.push("xab") == ("x", None) and s.push("cd") == ("a", "bc")
    # text pushed with may_stop False (the first min_tokens tokens') ends no stop string; one may begin there
    s = StopStrings(["Tom"])
    assert s.push("a Tom", may_stop=False) == ("a Tom", None) and s.push(" T") == (" ", None)
    assert s.push("om") == ("", "Tom")
    s = StopStrings(["Tom"])
    assert s.push("a T", may_stop=False) == ("a ", None) and s.push("o", may_stop=False) == ("", None)
    assert s.push("m") == ("", "Tom")
    s = StopStrings(["b", "abc"])  # "ab" is held back (it may begin "abc"); its "b" ends in the first text
    assert s.push("ab", may_stop=False) == ("", None) and s.push("x") == ("abx", None)
    s = StopStrings(["b", "abc"])
    assert s.push("ab", may_stop=False) == ("", None) and s.push("ab") == ("aba", "b")
    for bad in ("", None, 3):
        with pytest.raises(ValueError, match="stop strings"):
            StopStrings([bad])


@pytest.mark.parametrize("model", ["sp", "llama3"])
def test_stop_string_spanning_tokens(request, monkeypatch, model):
    llm = request.getfixturevalue(model)
    prompt, ids = continuation(llm.tokenizer, "Lily", "Lily and Tom went to the park.")
    script_forward(monkeypatch, llm, ids + [llm.stop_ids[0]])
    stops = ["om we", "park"]  # "om we" spans the tokens of " Tom" and " went"
    (r,) = llm.generate(["Lily"], max_new_tokens=50, stop=stops)
    assert (r.text, r.finish_reason, r.stop) == (" and T", "stop", "om we")
    # token_ids run up to and including the token that completed the stop string
    assert "om we" in llm.tokenizer.decode(r.token_ids) and "om we" not in llm.tokenizer.decode(r.token_ids[:-1])
    stream = llm.stream("Lily", max_new_tokens=50, stop=stops)
    deltas = list(stream)
    assert "".join(deltas) == " and T"
    assert outcome(stream.result) == outcome(r)
    (r,) = llm.generate(["Lily"], max_new_tokens=50, stop="nowhere")
    assert (r.text, r.finish_reason, r.stop) == (" and Tom went to the park.", "stop", llm.stop_ids[0])


@pytest.mark.parametrize("min_tokens, stop, tokens, text", [
    (0, "Tom", 2, " and "),
    (1, "Tom", 2, " and "),  # " Tom", the second token, ends it
    (2, "Tom", 4, " and Tom and "),  # the first "Tom" ends in the text of the first 2 tokens
    (2, "m an", 3, " and To"),  # begins in the second token's text, ends in the third's
    (4, "Tom", 7, " and Tom and Tom went home"),  # then </s> ends the row
])
def test_no_stop_string_ends_in_the_first_min_tokens_tokens(monkeypatch, sp, min_tokens, stop, tokens, text):
    """As vLLM's detokenizer: a stop string counts only where it ends in the text of a token after
    the first min_tokens; streamed the same."""
    prompt, ids = continuation(sp.tokenizer, "Lily", "Lily and Tom and Tom went home")
    assert len(ids) == 7  # " and", " Tom", " and", " Tom", " w", "ent", " home"
    script_forward(monkeypatch, sp, ids + [EOS_SP])
    (r,) = sp.generate(["Lily"], max_new_tokens=20, stop=stop, min_tokens=min_tokens)
    expected_stop = stop if tokens < 7 else EOS_SP
    assert (r.token_ids, r.text, r.finish_reason, r.stop) == (ids[:tokens], text, "stop", expected_stop)
    stream = sp.stream("Lily", max_new_tokens=20, stop=stop, min_tokens=min_tokens)
    assert "".join(stream) == text and outcome(stream.result) == outcome(r)


def test_stop_strings_per_row_of_a_batch(monkeypatch, sp):
    prompt, ids = continuation(sp.tokenizer, "Lily", "Lily and Tom went home")
    script_forward(monkeypatch, sp, ids + [EOS_SP])
    rows = sp.generate(["Lily", [BOS_SP, 300, 301]], max_new_tokens=50, stop=["went"])
    assert [r.stop for r in rows] == ["went", "went"]
    assert rows[0].text == " and Tom "


# -- ignore_eos and min_tokens (vLLM's) ------------------------------------------------------


@pytest.fixture(scope="module")
def demo():
    return Llama.from_pretrained(DEMO_MODEL_DIR, device="cpu")  # trained: greedy ends its stories with </s>


def greedy_loop(llm, prompt, steps, held=(), held_steps=0):
    """Greedy ids of a plain loop of full forwards (no cache, nothing stops it): the logits of the
    ``held`` ids -inf for the first ``held_steps`` steps."""
    out = []
    for step in range(steps):
        logits = llm.logits(prompt + out)[-1].clone()
        if step < held_steps:
            logits[list(held)] = float("-inf")
        out.append(int(logits.argmax()))
    return out


def new_text(tok, prompt, ids):
    """What ``ids`` add to the decoded prompt (its BOS left out)."""
    before, after = tok.decode(prompt[1:]), tok.decode(prompt[1:] + ids)
    assert after.startswith(before)
    return after[len(before):]


def test_ignore_eos_runs_to_max_new_tokens_with_the_eos_as_text(demo):
    """The demo model's greedy story ends with </s> after 27 tokens; with ignore_eos it goes on to
    max_new_tokens, the tokens of a plain forward loop, the </s> among them (its text "</s>"), whole
    and streamed, alone and in a batch. The call's own stop ids and stop strings still stop it."""
    prompt = demo.tokenizer.encode("The cat sat on the")
    (plain,) = demo.generate([prompt], max_new_tokens=40)
    assert (len(plain.token_ids), plain.finish_reason, plain.stop) == (27, "stop", EOS_SP)
    reference = greedy_loop(demo, prompt, 40)
    assert reference[:27] == plain.token_ids and reference[27] == EOS_SP and EOS_SP not in reference[28:]
    (r,) = demo.generate([prompt], max_new_tokens=40, ignore_eos=True)
    assert (r.token_ids, r.finish_reason, r.stop) == (reference, "length", None)
    assert r.text == new_text(demo.tokenizer, prompt, reference) and r.text.startswith(plain.text + "</s><s> Once")
    stream = demo.stream(prompt, max_new_tokens=40, ignore_eos=True)
    assert "".join(stream) == r.text and outcome(stream.result) == outcome(r)
    other = demo.tokenizer.encode("It was a sunny day.")  # greedy: </s> first
    batch = demo.generate([other, prompt], max_new_tokens=40, ignore_eos=True)
    assert outcome(batch[1]) == outcome(r) and batch[0].token_ids == greedy_loop(demo, other, 40)
    assert batch[0].token_ids[0] == EOS_SP and batch[0].text.startswith("</s>")
    stop = reference[30]
    (r,) = demo.generate([prompt], max_new_tokens=40, ignore_eos=True, stop_ids=[stop])
    cut = reference.index(stop)
    assert cut > 27 and (r.token_ids, r.finish_reason, r.stop) == (reference[:cut], "stop", stop)
    (r,) = demo.generate([prompt], max_new_tokens=40, ignore_eos=True, stop="</s>")
    assert (r.token_ids, r.text, r.finish_reason, r.stop) == (reference[:28], plain.text, "stop", "</s>")


@pytest.mark.parametrize("min_tokens, ends_after", [(27, 27), (28, 33), (30, 33)])
def test_min_tokens_holds_the_eos_back_then_lets_it_end(demo, min_tokens, ends_after):
    """Greedy, the demo model's story ends with </s> after 27 tokens. min_tokens 27 lets it end there;
    28 and 30 take the tokens of a forward loop with the EOS -inf for their first min_tokens steps,
    up to the </s> it then samples (after 33 tokens). Whole and streamed."""
    prompt = demo.tokenizer.encode("The cat sat on the")
    reference = greedy_loop(demo, prompt, ends_after + 1, held=[EOS_SP], held_steps=min_tokens)
    assert reference[ends_after] == EOS_SP and EOS_SP not in reference[:ends_after]
    (r,) = demo.generate([prompt], max_new_tokens=60, min_tokens=min_tokens)
    assert (r.token_ids, r.finish_reason, r.stop) == (reference[:ends_after], "stop", EOS_SP)
    assert r.text == new_text(demo.tokenizer, prompt, reference[:ends_after])
    stream = demo.stream(prompt, max_new_tokens=60, min_tokens=min_tokens)
    assert "".join(stream) == r.text and outcome(stream.result) == outcome(r)


def test_min_tokens_holds_back_the_calls_stop_ids_and_the_eos_with_ignore_eos(demo):
    """min_tokens holds back every id that may end a row: the call's stop_ids too, and the EOS also
    with ignore_eos (as vLLM's); rows of a batch count their own tokens."""
    prompt = demo.tokenizer.encode("It was a sunny day.")  # greedy: </s> first
    stop = demo.tokenizer.encode("a")[-1]  # "▁a"
    free = greedy_loop(demo, prompt, 16, held=[EOS_SP], held_steps=1)
    assert free.index(stop) == 4  # "[/INST] Once upon a"
    (r,) = demo.generate([prompt], max_new_tokens=16, min_tokens=1, stop_ids=[stop])
    assert (r.token_ids, r.stop) == (free[:4], stop)
    reference = greedy_loop(demo, prompt, 16, held=[EOS_SP, stop], held_steps=6)
    assert reference.index(stop) == 9 and EOS_SP not in reference  # "... upon ite story, there was a"
    (r,) = demo.generate([prompt], max_new_tokens=16, min_tokens=6, stop_ids=[stop])
    assert (r.token_ids, r.finish_reason, r.stop) == (reference[:9], "stop", stop)
    cat = demo.tokenizer.encode("The cat sat on the")
    rows = demo.generate([cat, prompt], max_new_tokens=40, min_tokens=30, ignore_eos=True)
    assert rows[0].token_ids == greedy_loop(demo, cat, 40, held=[EOS_SP], held_steps=30)
    assert rows[0].token_ids[33] == EOS_SP and rows[0].finish_reason == "length"  # text once past min_tokens
    assert rows[1].token_ids == greedy_loop(demo, prompt, 40, held=[EOS_SP], held_steps=30)


# -- context limits and argument errors ------------------------------------------------------


@pytest.fixture(scope="module")
def short(tmp_path_factory):
    folder = tmp_path_factory.mktemp("short")
    write_checkpoint(folder, tokenizer="sentencepiece", max_position_embeddings=64, seed=4)
    return Llama.from_pretrained(folder, device="cpu")


def no_work(monkeypatch, llm):
    def forward(*args, **kwargs):
        raise AssertionError("the model ran before the arguments were checked")

    monkeypatch.setattr(llm.model, "forward", forward)


def test_context_errors_name_the_numbers_before_any_work(monkeypatch, short):
    no_work(monkeypatch, short)
    long_prompt = [BOS_SP] + [300] * 69  # 70 tokens
    with pytest.raises(ValueError, match=r"70 tokens.*context of 64"):
        short.generate([long_prompt], max_new_tokens=1)
    with pytest.raises(ValueError, match=r"40 tokens \+ max_new_tokens 30 = 70 exceeds.*64.*at most 24"):
        short.generate([[BOS_SP] * 40], max_new_tokens=30)
    with pytest.raises(ValueError, match="70 tokens"):
        short.stream(long_prompt, max_new_tokens=1)
    with pytest.raises(ValueError, match="max_new_tokens 64 leaves no room"):
        short.generate(["Lily"], max_new_tokens=64, truncate_prompt="left")


def test_truncate_left_keeps_bos_and_the_newest_tokens(monkeypatch, short):
    calls = script_forward(monkeypatch, short, [300] * 20)
    long_prompt = [BOS_SP] + list(range(3, 72))  # 70 tokens
    (r,) = short.generate([long_prompt], max_new_tokens=10, truncate_prompt="left")
    assert r.prompt_ids == [BOS_SP] + long_prompt[-53:]  # 54 + 10 = 64
    assert calls[0] == (1, 54) and len(r.token_ids) == 10


@pytest.mark.parametrize(
    "kwargs, named",
    [
        (dict(temperature=-1.0), "temperature"),
        (dict(top_p=1.5), "1.5"),
        (dict(top_k=-2), "-2"),
        (dict(min_p=2.0), "2.0"),
        (dict(max_new_tokens=-1), "-1"),
        (dict(stop=[""]), "stop strings"),
        (dict(stop_ids=[10**9]), "1000000000"),
        (dict(truncate_prompt="right"), "'right'"),
        (dict(seed=1.5), "1.5"),
        (dict(presence_penalty=3.0), "3.0"),
        (dict(repetition_penalty=0), "repetition_penalty"),
        (dict(logit_bias={7: -101}), "-101"),
        (dict(logit_bias={10**6: 1.0}), "1000000"),
        (dict(min_tokens=-1), "min_tokens must be an integer >= 0"),
        (dict(min_tokens=11, max_new_tokens=10), "min_tokens 11 is more than max_new_tokens 10"),
        (dict(ignore_eos="yes"), "'yes'"),
    ],
)
def test_bad_arguments_raise_before_any_work(monkeypatch, short, kwargs, named):
    no_work(monkeypatch, short)
    for call in (lambda: short.generate(["Lily"], **kwargs), lambda: short.stream("Lily", **kwargs)):
        with pytest.raises(ValueError, match=named.replace("(", r"\(")) as err:
            call()
        assert named in str(err.value)


def test_skip_special_tokens_leaves_their_text_out(demo):
    """With ignore_eos the demo story runs past its </s> and the <s> after it; skip_special_tokens
    leaves their text out (the text of the other tokens, as decoded without them), whole and
    streamed, and keeps the tokens."""
    prompt = demo.tokenizer.encode("The cat sat on the")
    special = demo.tokenizer.special_ids
    (kept,) = demo.generate([prompt], max_new_tokens=40, ignore_eos=True)
    (skipped,) = demo.generate([prompt], max_new_tokens=40, ignore_eos=True, skip_special_tokens=True)
    assert skipped.token_ids == kept.token_ids and EOS_SP in kept.token_ids
    others = [t for t in kept.token_ids if t not in special]
    assert skipped.text == new_text(demo.tokenizer, prompt, others)
    assert "</s><s>" in kept.text and "</s>" not in skipped.text and "<s>" not in skipped.text
    stream = demo.stream(prompt, max_new_tokens=40, ignore_eos=True, skip_special_tokens=True)
    assert "".join(stream) == skipped.text and stream.result.token_ids == kept.token_ids
    with pytest.raises(TypeError, match="skip_special_tokens must be True or False, got 'yes'"):
        demo.generate([prompt], skip_special_tokens="yes")
