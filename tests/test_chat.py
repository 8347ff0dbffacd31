"""Conversation and chat CLI: the cache across turns equals a fresh prefill, overflow, /save and /load,
piped standard input, and Ctrl-C in a terminal."""
import gc
import json
import os
import pty
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import minillama.generate
from minillama import Llama
from minillama.conversation import ContextOverflowError, Conversation
from tests.checkpoints import EOT, checkpoint_factory  # noqa: F401  (fixture)

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def chat_folder(checkpoint_factory):  # noqa: F811
    return checkpoint_factory(tokenizer="llama3", seed=5)[0]


@pytest.fixture(scope="module")
def llm(chat_folder):
    return Llama.from_pretrained(chat_folder, device="cpu")


@pytest.fixture
def scripted(monkeypatch, llm):
    """Replace the sampler's choice by scripted replies (the model still runs and fills the cache)."""
    queue = []

    def reply(*texts):
        for text in texts:
            ids = llm.tokenizer.encode(text, bos=False)
            assert llm.tokenizer.encode(llm.tokenizer.decode(ids), bos=False) == ids
            queue.extend(ids + [EOT])

    def fake_sample(logits, params, generator=None):
        return torch.tensor([queue.pop(0)], device=logits.device)

    monkeypatch.setattr(minillama.generate, "sample", fake_sample)
    return reply


def next_logits_match_fresh_prefill(llm, conv, text, reuse_all=True):
    """Prefill the next user turn onto the kept cache, as a turn does, and compare with one full forward.

    ``reuse_all``: the whole cache is a prefix of the new encoding (else it is cut back to the
    common prefix first, as Conversation.send does).
    """
    target = conv.encode(conv.messages + [{"role": "user", "content": text}])
    keep = 0
    while keep < min(len(conv.cached_ids), len(target) - 1) and conv.cached_ids[keep] == target[keep]:
        keep += 1
    if reuse_all:
        assert keep == len(conv.cached_ids)
    conv._reserve(len(target))
    cache = conv.cache
    cache.set_lengths([keep])
    new = torch.tensor([target[keep:]])
    with torch.inference_mode():
        cached = llm.model(new, cache)[0, -1]
    fresh = llm.logits(target)[-1]
    torch.testing.assert_close(cached, fresh, atol=1e-5, rtol=1e-5)


def test_three_turns_reuse_the_cache(llm, scripted):
    conv = Conversation(llm, system="You are Max.")
    scripted("Lily ran to the park.", "The ball was red.", "Yes, you can.")
    before = conv.encode(conv.messages, add_generation_prompt=False)
    for turn, text in enumerate(["Hi Max!", "What did she see?", "Can I play?"]):
        stats = conv.send(text, max_new_tokens=16)
        assert stats.finish_reason == "stop"
        if turn == 0:
            assert stats.reused_tokens == 0
        else:
            # only the new turn is prefilled: the cache kept all but the last reply's <|eot_id|>
            assert stats.reused_tokens == len(before) - 1
            assert stats.prefill_tokens == len(conv.encode(conv.messages[:-1])) - stats.reused_tokens
        before = conv.encode(conv.messages, add_generation_prompt=False)
    assert [m["content"] for m in conv.messages[2::2]] == ["Lily ran to the park.", "The ball was red.", "Yes, you can."]
    # the cache holds the encoding of the whole conversation, but for the final (sampled) <|eot_id|>
    assert conv.cached_ids + [EOT] == conv.encode(conv.messages, add_generation_prompt=False)
    assert conv.cache.seq_lens_cpu == [len(conv.cached_ids)]
    next_logits_match_fresh_prefill(llm, conv, "Where is the dog?")


def test_replies_that_reencode_differently_are_reprefilled(llm):
    """Random weights sample ids whose text re-encodes to other ids: the cache is cut back and fixed."""
    conv = Conversation(llm)
    held = []
    for text in ["Hi", "Once upon a time", "The end"]:
        stats = conv.send(text, max_new_tokens=6)
        if held:
            # the reply's sampled ids are not its re-encoding: reuse stops where they differ
            assert stats.reused_tokens < len(held)
            assert conv.cached_ids[: stats.reused_tokens] == held[: stats.reused_tokens]
        prompt = conv.encode(conv.messages[:-1])  # up to this reply's header
        assert conv.cached_ids[: len(prompt)] == prompt and len(conv.cached_ids) == len(prompt) + 5
        held = conv.cached_ids
    next_logits_match_fresh_prefill(llm, conv, "And then?", reuse_all=False)


def test_interrupted_reply_is_kept(llm, scripted):
    conv = Conversation(llm)
    scripted("Lily ran to the park and saw a big red ball under a tall tree.", "Yes.")
    pieces = []
    stats = conv.send("Tell me.", max_new_tokens=64, on_text=pieces.append, should_stop=lambda: len(pieces) >= 3)
    assert stats.finish_reason == "interrupted" and stats.new_tokens == 3
    assert conv.messages[-1] == {"role": "assistant", "content": "".join(pieces)}
    assert conv.cached_ids == conv.encode(conv.messages, add_generation_prompt=False)[: len(conv.cached_ids)]

    def ctrl_c(text):
        raise KeyboardInterrupt

    scripted("Then it rained.")
    with pytest.raises(KeyboardInterrupt):
        conv.send("More.", max_new_tokens=64, on_text=ctrl_c)
    assert conv.messages[-2]["content"] == "More."
    assert conv.cache.seq_lens_cpu == [len(conv.cached_ids)]
    assert conv.cached_ids == conv.encode(conv.messages, add_generation_prompt=False)[: len(conv.cached_ids)]
    next_logits_match_fresh_prefill(llm, conv, "Go on.")


def test_ctrl_c_with_the_next_step_launched_keeps_cache_and_ids_in_step(monkeypatch, llm, scripted):
    """On CUDA the generate loop launches the next step before the caller sees a token (forced
    here on the CPU). A Ctrl-C in ``on_text`` suspends the loop with that step cached, and closing
    the loop later (whenever it is collected) leaves the cache alone: the conversation's ids and its
    cache agree before and after, and the next turn reads as a fresh prefill of the history."""
    monkeypatch.setattr(minillama.generate.TokenLoop, "_overlaps", staticmethod(lambda ids: True))
    conv = Conversation(llm)
    scripted("Lily ran to the park and saw a big red ball under a tall tree.", "Yes.")
    pieces = []

    def ctrl_c_at_the_third_piece(text):
        pieces.append(text)
        if len(pieces) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        conv.send("Tell me.", max_new_tokens=64, on_text=ctrl_c_at_the_third_piece)
    assert conv.cache.seq_lens_cpu == [len(conv.cached_ids)]
    gc.collect()
    held = [len(conv.cached_ids)]
    assert conv.cache.seq_lens_cpu == held and conv.cache.seq_lens.tolist() == held
    assert conv.cached_ids == conv.encode(conv.messages, add_generation_prompt=False)[: len(conv.cached_ids)]
    next_logits_match_fresh_prefill(llm, conv, "Go on.")


def test_overflow_drops_oldest_turns_and_keeps_the_system_prompt(llm, scripted):
    system_len = len(Conversation(llm, system="Be brief.").encode([{"role": "system", "content": "Be brief."}]))
    conv = Conversation(llm, system="Be brief.", max_context=system_len + 60)
    scripted(*["The dog ran."] * 8)
    dropped = 0
    for i in range(8):
        stats = conv.send(f"Turn {i}, go.", max_new_tokens=8)
        dropped += stats.dropped_turns
        if stats.dropped_turns:  # the system block stays cached; the rest is read again
            assert stats.reused_tokens >= system_len
        assert len(conv.cached_ids) <= conv.max_context
        assert conv.cached_ids == conv.encode(conv.messages, add_generation_prompt=False)[: len(conv.cached_ids)]
    assert dropped > 0
    assert conv.messages[0] == {"role": "system", "content": "Be brief."}
    assert conv.messages[1]["role"] == "user" and conv.messages[1]["content"] != "Turn 0, go."
    assert conv.messages[-2]["content"] == "Turn 7, go."

    strict = Conversation(llm, system="Be brief.", max_context=system_len + 60, on_overflow="error")
    scripted(*["The dog ran."] * 8)
    with pytest.raises(ContextOverflowError, match="more than the context"):
        for i in range(8):
            strict.send(f"Turn {i}, go.", max_new_tokens=8)
    assert strict.messages[1]["content"] == "Turn 0, go."  # nothing dropped, the failing turn not added
    with pytest.raises(ContextOverflowError, match="even without history"):
        conv.send("word " * 100, max_new_tokens=8)
    with pytest.raises(ValueError, match="max_context"):
        Conversation(llm, max_context=llm.config.max_position_embeddings + 1)


def test_save_and_load(llm, scripted, tmp_path):
    conv = Conversation(llm, system="You are Max.")
    scripted("Woof.", "Woof woof.")
    conv.send("Hi Max!", max_new_tokens=8)
    path = tmp_path / "chat.json"
    conv.save(path)
    other = Conversation(llm)
    other.load(path)
    assert other.messages == conv.messages
    assert json.loads(path.read_text())["messages"][0] == {"role": "system", "content": "You are Max."}
    other.send("Sit!", max_new_tokens=8)
    assert other.messages[-1]["content"] == "Woof woof."
    next_logits_match_fresh_prefill(llm, other, "Good dog.")

    for bad in ["{not json", '{"turns": []}', '{"messages": [{"role": "king", "content": "x"}]}',
                '{"messages": [{"role": "user"}]}', "[1, 2]"]:
        path.write_text(bad)
        with pytest.raises(ValueError):
            other.load(path)
    with pytest.raises(ValueError, match="cannot read"):
        other.load(tmp_path / "missing.json")
    assert other.messages[-1]["content"] == "Woof woof."  # a bad file changes nothing


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.pop("HF_HUB_OFFLINE", None)
    return env


def test_piped_stdin_end_to_end(llm, chat_folder, tmp_path):
    expected = Conversation(llm)
    replies = []
    for text in ["Hi Lily", "The dog ran."]:
        expected.send(text, max_new_tokens=5, on_text=lambda s: None)
        replies.append(expected.messages[-1]["content"])
    saved = tmp_path / "saved.json"
    stdin = f"Hi Lily\r\n/save {saved}\n\n/load {tmp_path / 'nope.json'}\nThe dog ran.\n"  # CRLF: the same message
    proc = subprocess.run(
        [sys.executable, "-m", "minillama.chat", "--model", str(chat_folder), "--max-new-tokens", "5", "--device", "cpu"],
        input=stdin, capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "".join(r + "\n" for r in replies)  # replies only, nothing else
    assert "error: cannot read" in proc.stderr and "first token" in proc.stderr
    assert json.loads(saved.read_text())["messages"] == expected.messages[:2]


def test_base_model_is_plain_continuation(checkpoint_factory):  # noqa: F811
    folder = checkpoint_factory(tokenizer="sentencepiece", seed=1)[0]
    proc = subprocess.run(
        [sys.executable, "-m", "minillama.chat", "--model", str(folder), "--max-new-tokens", "4"],
        input="Once upon a time\n", capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("plain continuation mode") == 1
    llm = Llama.from_pretrained(folder, device="cpu")
    (out,) = llm.generate(["Once upon a time"], max_new_tokens=4)
    assert proc.stdout == out.text + "\n"  # continuation of the text, like generate



def test_bad_model_is_one_line(tmp_path, capsys):
    from minillama.chat import main

    assert main(["--model", str(tmp_path / "none")]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("error: ") and err.count("\n") == 1


def _read_until(fd, buffer: bytearray, marker: bytes, timeout: float, start: int = 0) -> int:
    deadline = time.monotonic() + timeout
    while buffer.find(marker, start) < 0:
        left = deadline - time.monotonic()
        assert left > 0, f"no {marker!r} in {bytes(buffer[start:])!r}"
        if select.select([fd], [], [], left)[0]:
            try:
                buffer += os.read(fd, 4096)
            except OSError:  # the child closed the terminal
                assert buffer.find(marker, start) >= 0, f"no {marker!r} in {bytes(buffer[start:])!r}"
    return buffer.find(marker, start) + len(marker)


def test_ctrl_c_in_a_terminal_keeps_a_usable_session(chat_folder, tmp_path):
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "minillama.chat", "--model", str(chat_folder), "--max-new-tokens", "150", "--device", "cpu"],
        stdin=slave, stdout=slave, stderr=slave, env=_env(), cwd=ROOT, start_new_session=True,
    )
    os.close(slave)
    out = bytearray()
    try:
        pos = _read_until(master, out, b">>> ", 120)
        os.write(master, b"Hi Lily\n")
        pos = _read_until(master, out, "\u2400".encode(), 60, pos)  # the reply is streaming
        proc.send_signal(signal.SIGINT)
        pos = _read_until(master, out, b"(stopped; the partial reply is kept)", 60, pos)
        pos = _read_until(master, out, b">>> ", 60, pos)
        os.write(master, b"And then?\n")
        pos = _read_until(master, out, b"tok/s]", 120, pos)
        pos = _read_until(master, out, b">>> ", 60, pos)
        os.write(master, f"/save {tmp_path / 'c.json'}\n".encode())
        pos = _read_until(master, out, b">>> ", 60, pos)
        os.write(master, b"/exit\n")
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    messages = json.loads((tmp_path / "c.json").read_text())["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    assert messages[0]["content"] == "Hi Lily" and messages[2]["content"] == "And then?"
    assert messages[1]["content"]  # the partial reply is in the history
    assert b"Traceback" not in out


def test_an_empty_conversation_saves_and_loads(llm, tmp_path):
    """A conversation with no message yet (a fresh one, or /reset without a system prompt) loads back."""
    path = tmp_path / "empty.json"
    Conversation(llm).save(path)
    other = Conversation(llm, system="You are Max.")
    other.load(path)
    assert other.messages == []
    other.send("Hi", max_new_tokens=2)
    assert [m["role"] for m in other.messages] == ["user", "assistant"]


def test_a_stop_string_given_as_a_str_is_one_stop_string(llm, scripted):
    """send(stop="park") stops at "park", as Llama.generate does; it stopped at its first letter found."""
    conv = Conversation(llm)
    scripted("Lily ran to the park.")
    stats = conv.send("Hi", max_new_tokens=16, stop="park")
    assert stats.finish_reason == "stop"
    assert conv.messages[-1]["content"] == "Lily ran to the "


def test_odd_conversation_arguments_are_named(llm):
    with pytest.raises(ValueError, match=r"max_context must be an integer in \[1, \d+\] .*, got True"):
        Conversation(llm, max_context=True)  # a bool is not a token count
    conv = Conversation(llm, system="Be brief.")
    with pytest.raises(TypeError, match="^the system prompt must be a string or None, got int$"):
        conv.set_system(5)
    assert conv.system == "Be brief."  # unchanged


def test_a_turn_passes_the_bias_and_penalties_and_refuses_repetition_penalty(monkeypatch, llm):
    """send(sampling=...) passes the logit bias and the presence / frequency penalties to the reply
    (they see the reply's tokens only); the repetition penalty, which would see only the part of the
    history that is not cached, is refused before any work."""
    from minillama.sampling import SamplingParams

    stream, seen = llm.stream, []

    def spy(*args, **kwargs):
        seen.append(kwargs)
        return stream(*args, **kwargs)

    monkeypatch.setattr(llm, "stream", spy)
    sampling = SamplingParams(presence_penalty=0.5, frequency_penalty=-0.25, logit_bias={7: -100.0, 3: 2.5})
    Conversation(llm).send("Hi", max_new_tokens=4, sampling=sampling)
    assert {k: seen[0][k] for k in ("presence_penalty", "frequency_penalty", "logit_bias")} == dict(
        presence_penalty=0.5, frequency_penalty=-0.25, logit_bias={3: 2.5, 7: -100.0})
    conv = Conversation(llm)
    with pytest.raises(ValueError, match="repetition_penalty 1.3 is not supported in a Conversation"):
        conv.send("Hi", max_new_tokens=4, sampling=SamplingParams(repetition_penalty=1.3))
    assert conv.messages == [] and len(seen) == 1
