"""The OpenAI-compatible server end to end: a real server process on 127.0.0.1 serving the demo model,
driven by the official ``openai`` client. Every output is compared with a solo ``Llama.generate``
run of the same prompt in this process."""
import json
import math
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from minillama import Llama  # noqa: E402
from minillama.hub import DEMO_MODEL_DIR  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MODEL = "demo_model"
PROMPTS = ["Once upon a time", "One day, Lily found a", "Tom had a big red ball.", "The cat sat on the",
           "Max the dog was", "It was a sunny day.", "Mia wanted to", "In the park,"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(*args):
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "minillama.serve", "--port", str(port), "--device", "cpu", *args],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited: {proc.stdout.read()}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("the server did not start within 60 s")


def _stop(proc):
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def server():
    proc, url = _start_server("--max-batch", "8", "--max-queue", "64", "--prefill-chunk", "16",
                              "--request-timeout", "120")
    yield url
    _stop(proc)
    assert proc.returncode is not None


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="none", timeout=60, max_retries=0)


@pytest.fixture(scope="module")
def llm():
    return Llama.from_pretrained(DEMO_MODEL_DIR, device="cpu")  # exact float32 equality, on any machine


@pytest.fixture(scope="module")
def app(llm):
    """The app in this process (a 500 raises here, with its traceback)."""
    from fastapi.testclient import TestClient

    from minillama.scheduler import Scheduler
    from minillama.serve import create_app

    scheduler = Scheduler(llm, max_batch=2)
    try:
        with TestClient(create_app(llm, scheduler, MODEL)) as client:
            yield client
    finally:
        scheduler.close()


def solo(llm, prompt, max_tokens, **kw):
    return llm.generate([prompt], max_new_tokens=max_tokens, **kw)[0]


@pytest.mark.parametrize("signals", [["SIGINT"], ["SIGTERM"], ["SIGINT", "SIGINT"]])
def test_signals_shut_the_server_down_with_status_0(signals):
    """Ctrl-C (once or twice, as a terminal sends it to the whole group) and SIGTERM (systemd, docker stop):
    a clean shutdown, status 0, no traceback, the port free again at once."""
    import signal

    proc, url = _start_server()
    try:
        for name in signals:
            proc.send_signal(getattr(signal, name))
            time.sleep(0.05)  # two signals sent at once are delivered as one
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0 and "Traceback" not in out, (proc.returncode, out)
    assert out.count("\n") == 1 and "serving 'demo_model' on " + url in out, out
    port = int(url.rsplit(":", 1)[1])
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))  # a restart can take the port at once


LONG = {"prompt": "Once upon a time, " * 90, "max_tokens": 50, "temperature": 0}  # 450 steps with --prefill-chunk 1


def _wait_running(url, n):
    deadline = time.monotonic() + 10
    while httpx.get(url + "/health").json()["running"] < n and time.monotonic() < deadline:
        time.sleep(0.01)


def test_shutdown_lets_requests_finish_and_refuses_new_ones(llm):
    """SIGTERM: a request in flight finishes (within --shutdown-timeout); meanwhile new requests and
    /health get a 503, so a load balancer sends them elsewhere; then status 0."""
    import signal

    proc, url = _start_server("--max-batch", "2", "--prefill-chunk", "1", "--shutdown-timeout", "60")
    try:
        done = []
        holder = threading.Thread(target=lambda: done.append(httpx.post(url + "/v1/completions", json=LONG,
                                                                         timeout=60)))
        holder.start()
        _wait_running(url, 1)
        proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        while (health := httpx.get(url + "/health")).status_code == 200 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert health.status_code == 503 and health.json()["status"] == "shutting down" and health.json()["running"]
        r = httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 2})
        assert r.status_code == 503 and "shutting down" in r.json()["error"]["message"]
        holder.join(timeout=60)
        assert done[0].status_code == 200 and done[0].json()["choices"][0]["text"] == solo(llm, LONG["prompt"], 50).text
        out, _ = proc.communicate(timeout=30)
    finally:
        _stop(proc)
    assert proc.returncode == 0 and out.count("\n") == 1 and "Traceback" not in out, out


@pytest.mark.parametrize("signals, timeout", [(["SIGTERM"], "0.3"), (["SIGINT", "SIGINT"], "60")])
def test_shutdown_cancels_what_runs_past_the_timeout(signals, timeout):
    """Past --shutdown-timeout (or at a second Ctrl-C) the requests still running are cancelled: a
    503 for a whole response, an error chunk and [DONE] for a stream, then status 0 (the server
    waited for every request, however long)."""
    import signal

    proc, url = _start_server("--max-batch", "2", "--prefill-chunk", "1", "--shutdown-timeout", timeout)
    try:
        answers = {}

        def whole():
            answers["whole"] = httpx.post(url + "/v1/completions", json=LONG, timeout=60)

        def streamed():
            with httpx.stream("POST", url + "/v1/completions", json={**LONG, "stream": True}, timeout=60) as r:
                answers["stream"] = [line for line in r.iter_lines() if line.startswith("data: ")]

        threads = [threading.Thread(target=whole), threading.Thread(target=streamed)]
        for t in threads:
            t.start()
        _wait_running(url, 2)
        start = time.monotonic()
        for name in signals:
            proc.send_signal(getattr(signal, name))
            time.sleep(0.2)  # two signals sent at once are delivered as one
        for t in threads:
            t.join(timeout=30)
        out, _ = proc.communicate(timeout=30)
    finally:
        _stop(proc)
    assert time.monotonic() - start < 10
    assert answers["whole"].status_code == 503 and "shutting down" in answers["whole"].json()["error"]["message"]
    assert "shutting down" in json.loads(answers["stream"][-2][6:])["error"]["message"]
    assert answers["stream"][-1] == "data: [DONE]"
    assert proc.returncode == 0 and "Traceback" not in out, out
    assert out.splitlines()[1:] == ["(shutting down: cancelled 2 request(s) still running)"], out


def test_chat_completion_equals_solo_run(client, llm):
    messages = [{"role": "user", "content": "Tell me a story about a cat."}]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=40, temperature=0)
    ids = llm.tokenizer.encode_chat(messages)
    ref = solo(llm, ids, 40)
    choice = r.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == ref.text
    assert choice.finish_reason == ref.finish_reason == "length"
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 40 == len(ref.token_ids)
    assert r.usage.total_tokens == len(ids) + 40
    assert r.id.startswith("chatcmpl-") and r.model == MODEL and r.object == "chat.completion"


def test_completion_stop_and_logprobs(client, llm):
    r = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=60, temperature=0,
                                  stop=["Kai", "mom"], logprobs=3)
    ref = solo(llm, "Once upon a time", 60, stop=["Kai", "mom"])
    choice = r.choices[0]
    assert ref.finish_reason == "stop" and choice.finish_reason == "stop"
    assert choice.text == ref.text and "Kai" not in choice.text
    # the real log-probabilities of the chosen tokens: log-softmax of one full forward's logits
    prompt = llm.tokenizer.encode("Once upon a time")
    logits = llm.logits(prompt + ref.token_ids).double()
    expected = [float(logits[len(prompt) - 1 + i].log_softmax(-1)[t]) for i, t in enumerate(ref.token_ids)]
    lp = choice.logprobs
    assert len(lp.token_logprobs) == len(ref.token_ids) == r.usage.completion_tokens
    assert max(abs(a - b) for a, b in zip(lp.token_logprobs, expected)) < 1e-4
    assert "".join(lp.tokens).startswith(ref.text)
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert len(top) == 3 and max(top.values()) == pytest.approx(chosen, abs=1e-6)  # greedy: the best


def test_streaming_chat_with_usage_and_logprobs(client, llm):
    messages = [{"role": "system", "content": "You tell short stories."}, {"role": "user", "content": "A dog?"}]
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=30, temperature=0,
                                            stream=True, stream_options={"include_usage": True},
                                            logprobs=True, top_logprobs=2)
    chunks = list(stream)
    ref = solo(llm, llm.tokenizer.encode_chat(messages), 30)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == ref.text
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"]
    logprobs = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert len(logprobs) == 30 and all(len(e.top_logprobs) == 2 and e.logprob <= 0 for e in logprobs)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 30


def test_seeded_sampling_and_n(client, llm):
    kw = dict(temperature=0.9, top_p=0.9, seed=11)
    r = client.completions.create(model=MODEL, prompt="Max the dog was", max_tokens=30, n=2, **kw)
    for k, choice in enumerate(r.choices):  # choice k is the same request with seed + k
        ref = solo(llm, "Max the dog was", 30, temperature=0.9, top_p=0.9, seed=11 + k)
        assert choice.index == k and choice.text == ref.text
    assert r.choices[0].text != r.choices[1].text
    assert r.usage.prompt_tokens == len(llm.tokenizer.encode("Max the dog was"))
    texts = ["", ""]  # the same two choices, streamed: chunks of both, told apart by index
    for chunk in client.completions.create(model=MODEL, prompt="Max the dog was", max_tokens=30, n=2, stream=True,
                                           **kw):
        for c in chunk.choices:
            texts[c.index] += c.text
    assert texts == [c.text for c in r.choices]


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == [MODEL]
    health = httpx.get(server + "/health").json()
    assert health["status"] == "ok" and 0.0 <= health["prefix_hit_rate"] <= 1.0


def test_chat_prefix_reuse(client, server, llm):
    """A chat client resends the conversation: the second turn reuses the first turn's row."""
    messages = [{"role": "user", "content": "Tell me about a bird named Pip."}]
    first = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0)
    messages += [{"role": "assistant", "content": first.choices[0].message.content},
                 {"role": "user", "content": "What did Pip eat?"}]
    second = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0)
    ids = llm.tokenizer.encode_chat(messages)
    assert second.choices[0].message.content == solo(llm, ids, 20).text
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens - 1


def _stream_text(url, body, out, i):
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=120) as r:
        assert r.status_code == 200
        parts, reasons = [], []
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            assert "error" not in chunk, chunk
            for c in chunk["choices"]:
                parts.append(c["delta"].get("content") or "")
                reasons.append(c["finish_reason"])
        out[i] = ("".join(parts), [x for x in reasons if x])


def _disconnect_midway(url, body, got):
    if not body["stream"]:  # a client that stops waiting for its (long) answer
        try:
            httpx.post(url + "/v1/chat/completions", json=body, timeout=0.3)
        except httpx.TimeoutException:
            got.append(0)
        return
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=120) as r:
        n = 0
        for line in r.iter_lines():
            n += line.startswith("data: ")
            if n >= 3:
                got.append(n)
                break  # leaving the block closes the connection mid-stream


def test_32_streaming_clients_and_8_disconnects(server, client, llm):
    requests = []
    for i in range(32):
        messages = [{"role": "user", "content": f"{PROMPTS[i % 8]} {i}"}]
        sampled = i % 3 == 0
        body = {"model": MODEL, "messages": messages, "max_tokens": 8 + (i * 7) % 40, "stream": True,
                "temperature": 0.8 if sampled else 0, "seed": i if sampled else None}
        requests.append(body)
    quitters = [{"model": MODEL, "messages": [{"role": "user", "content": f"A long story {i}"}],
                 "max_tokens": 400, "stream": i % 2 == 0, "temperature": 0} for i in range(8)]
    out, got = [None] * 32, []
    threads = [threading.Thread(target=_stream_text, args=(server, b, out, i)) for i, b in enumerate(requests)]
    threads += [threading.Thread(target=_disconnect_midway, args=(server, b, got)) for b in quitters]
    for k, t in enumerate(threads):
        t.start()
    for t in threads:
        t.join(timeout=180)
    assert not any(t.is_alive() for t in threads), "a client hung"
    assert len(got) == 8
    for i, body in enumerate(requests):
        ids = llm.tokenizer.encode_chat(body["messages"])
        ref = solo(llm, ids, body["max_tokens"], temperature=body["temperature"], seed=body["seed"])
        assert out[i] == (ref.text, [ref.finish_reason]), i
    deadline = time.monotonic() + 30  # the disconnected requests are cancelled, their rows freed
    while True:
        health = httpx.get(server + "/health").json()
        if health["running"] == 0 and health["waiting"] == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert health["running"] == 0 and health["waiting"] == 0 and health["cancelled"] >= 8
    assert health["failed"] == 0
    # /metrics (through uvicorn) counts the disconnected requests as aborted: their ends reach the server
    # after their handlers stopped reading; every request's end is counted once, as the scheduler did
    r = httpx.get(server + "/metrics")
    assert r.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    ended = {labels["finished_reason"]: value for labels, value in parse_metrics(r.text)["request_success_total"]}
    assert ended == {"stop": ended["stop"], "length": ended["length"], "abort": health["cancelled"], "error": 0}
    assert ended["stop"] + ended["length"] == health["finished"]
    # and the server serves afterwards
    r = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=10, temperature=0)
    assert r.choices[0].text == solo(llm, "Once upon a time", 10).text


@pytest.mark.parametrize("body, param, words", [
    ({"messages": "hi"}, "messages", "non-empty list"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": "ten"}, "max_tokens", "integer"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, "temperature", "number"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": 3}, "temperature", "[0.0, 2.0]"),
    ({"messages": [{"role": "user", "content": "hi"}], "stop": 5}, "stop", "string"),
    ({"messages": [{"role": "user", "content": "hi"}], "bogus_field": 1}, "bogus_field", "unknown field"),
    ({"messages": [{"role": "user", "content": "hi"}], "presence_penalty": 2.5}, "presence_penalty", "[-2.0, 2.0]"),
    ({"messages": [{"role": "user", "content": "hi"}], "frequency_penalty": "x"}, "frequency_penalty", "number"),
    ({"messages": [{"role": "user", "content": "hi"}], "repetition_penalty": 0}, "repetition_penalty", "> 0"),
    ({"messages": [{"role": "user", "content": "hi"}], "repetition_penalty": 1e-39}, "repetition_penalty", "1e-39"),
    ({"messages": [{"role": "user", "content": "hi"}], "repetition_penalty": 1e39}, "repetition_penalty", "at most 3.4e+38"),
    ({"messages": [{"role": "user", "content": "hi"}], "logit_bias": [1]}, "logit_bias", "object"),
    ({"messages": [{"role": "user", "content": "hi"}], "logit_bias": {"cat": 1}}, "logit_bias", '"cat"'),
    ({"messages": [{"role": "user", "content": "hi"}], "logit_bias": {"-3": 1}}, "logit_bias", '"-3"'),
    ({"messages": [{"role": "user", "content": "hi"}], "logit_bias": {"9" * 5000: 1}}, "logit_bias", "not a token id"),
    ({"messages": [{"role": "user", "content": "hi"}], "logit_bias": {"7": -100.5}}, "logit_bias", "[-100, 100]"),
    ({"messages": [{"role": "user", "content": "hi"}], "logit_bias": {"7": 1, "07": 2}}, "logit_bias", "twice"),
    ({"messages": [{"role": "user", "content": "hi"}], "logit_bias": {"1024": 1}}, "logit_bias", "[1024]"),
    ({"messages": [{"role": "user", "content": "hi"}], "min_tokens": "5"}, "min_tokens", "must be an integer"),
    ({"messages": [{"role": "user", "content": "hi"}], "min_tokens": -1}, "min_tokens", "min_tokens must be >= 0"),
    ({"messages": [{"role": "user", "content": "hi"}], "ignore_eos": "yes"}, "ignore_eos", "true or false"),
    ({"messages": [{"role": "user", "content": "hi"}], "min_tokens": 20, "max_tokens": 10}, "min_tokens",
     "min_tokens 20 is more than max_tokens 10: lower min_tokens or raise max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "min_tokens": 20, "max_completion_tokens": 10}, "min_tokens",
     "more than max_completion_tokens 10"),
    ({"messages": [{"role": "user", "content": "hi"}], "min_tokens": 600}, "min_tokens",
     "min_tokens is 600: more than"),  # no max_tokens: more than fit in the 512 tokens of a request
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role", "role"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10 ** 9}, "max_tokens", "at most"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 100}, "n", "[1, 16]"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, "top_logprobs", "logprobs: true"),
    ({"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function", "function": {"name": "f"}}]},
     "tools", "does not render tools"),  # the demo model's template has no tools branch
    ({"messages": [{"role": "user", "content": "hi " * 600}]}, "messages", "512"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, "messages", "roles must alternate"),
    ({"messages": [{"role": "user", "content": "hi"}], "continue_final_message": True, "add_generation_prompt": True},
     "continue_final_message", "cannot both be true"),
    ({"messages": [{"role": "user", "content": "hi"}], "continue_final_message": 1}, "continue_final_message",
     "true or false"),
    ({"messages": [{"role": "user", "content": "hi"}], "add_generation_prompt": "no"}, "add_generation_prompt",
     "true or false"),
    ({"messages": [{"role": "user", "content": "hi"}], "skip_special_tokens": 0}, "skip_special_tokens",
     "true or false"),
    ({"messages": [{"role": "system", "content": "Be brief."}], "continue_final_message": True},
     "continue_final_message", "does not write the final message's content"),  # the demo template: no turn, no system
])
def test_bad_chat_requests(server, body, param, words):
    r = httpx.post(server + "/v1/chat/completions", json={"model": MODEL, **body}, timeout=30)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and words in error["message"] and error["type"] == "invalid_request_error"


def test_bad_bodies(server, client):
    url = server + "/v1/completions"
    r = httpx.post(url, content=b'{"prompt": "x",', headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = httpx.post(url, json=["prompt"])
    assert r.status_code == 400 and "JSON object" in r.json()["error"]["message"]
    r = httpx.post(url, content=b"x" * (9 << 20))
    assert r.status_code == 413
    r = httpx.post(url, content=b"[" * 100000 + b"]" * 100000)
    assert r.status_code == 400 and "too deeply" in r.json()["error"]["message"]
    r = httpx.post(url, content=b'{"prompt": "a \\ud800 b", "max_tokens": 2}')  # JSON allows a lone surrogate
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt" and "surrogate" in r.text
    r = httpx.post(server + "/v1/chat/completions", content=b'{"messages": [{"role": "user", "content": "\\ud800"}]}')
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages" and "surrogate" in r.text
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="gpt-4", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model=MODEL, prompt="x", max_tokens=100000)
    with pytest.raises(openai.BadRequestError, match="outside the vocabulary"):
        client.completions.create(model=MODEL, prompt=[1, 5, 99999], max_tokens=2)
    assert httpx.get(server + "/v1/nothing").status_code == 404
    assert httpx.get(server + "/health").json()["status"] == "ok"  # still serving


def test_full_queue_answers_429():
    # one row, no queue, one prompt token prefilled per step: a 450-token prompt holds the row a while
    proc, url = _start_server("--max-batch", "1", "--max-queue", "0", "--prefill-chunk", "1")
    try:
        long = {"prompt": "Once upon a time, " * 90, "max_tokens": 50}
        holder = threading.Thread(target=httpx.post, args=(url + "/v1/completions",), kwargs={"json": long,
                                                                                          "timeout": 60})
        holder.start()
        deadline = time.monotonic() + 10
        while httpx.get(url + "/health").json()["running"] < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        r = httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=60)
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert "max_queue 0" in r.json()["error"]["message"]
        with pytest.raises(openai.RateLimitError):
            openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0).completions.create(
                model=MODEL, prompt="x", max_tokens=2)
        holder.join(timeout=60)
        assert httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 2}).status_code == 200
    finally:
        _stop(proc)


def test_skip_special_tokens_leaves_their_text_out(app, llm):
    """vLLM's skip_special_tokens: special tokens the model writes (forced here by logit_bias: the
    demo tokenizer's <s>, a control piece) are in the text by default and left out with true, in
    the text, the stream and a chat reply alike; they still count as completion tokens."""
    bos = llm.tokenizer.bos_id
    assert bos in llm.tokenizer.special_ids
    lily = llm.tokenizer.encode("Lily", bos=False)[0]
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 4, "temperature": 0,
            "logit_bias": {str(bos): 100}}
    kept = app.post("/v1/completions", json=body).json()
    skipped = app.post("/v1/completions", json={**body, "skip_special_tokens": True}).json()
    assert kept["choices"][0]["text"] == "<s>" * 4 and kept["usage"]["completion_tokens"] == 4
    assert skipped["choices"][0]["text"] == "" and skipped["usage"]["completion_tokens"] == 4
    # no special token written: the same text either way
    body = {**body, "logit_bias": {str(lily): 100}, "max_tokens": 2}
    two_lily = app.post("/v1/completions", json={**body, "skip_special_tokens": True}).json()["choices"][0]["text"]
    assert two_lily == app.post("/v1/completions", json=body).json()["choices"][0]["text"] and "Lily" in two_lily
    with app.stream("POST", "/v1/completions", json={**body, "logit_bias": {str(bos): 100}, "stream": True,
                                                      "skip_special_tokens": True}) as r:
        chunks = [line for line in r.iter_lines() if line.startswith("data: {")]
    assert chunks and all('"text":""' in c.replace(" ", "") for c in chunks)
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "temperature": 0,
            "logit_bias": {str(bos): 100}}
    assert app.post("/v1/chat/completions", json=chat).json()["choices"][0]["message"]["content"] == "<s>" * 3
    reply = app.post("/v1/chat/completions", json={**chat, "skip_special_tokens": True}).json()
    assert reply["choices"][0]["message"]["content"] == "" and reply["usage"]["completion_tokens"] == 3


def test_logprob_values_are_probabilities(client):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=5,
                                       temperature=1.0, seed=3, logprobs=True, top_logprobs=5)
    for entry in r.choices[0].logprobs.content:
        tops = [t.logprob for t in entry.top_logprobs]
        assert tops == sorted(tops, reverse=True) and sum(math.exp(t) for t in tops) <= 1 + 1e-6
        assert bytes(entry.bytes).decode("utf-8", errors="replace") == entry.token


def test_timeout_answers_504_and_cancels(llm):
    from fastapi.testclient import TestClient

    from minillama.scheduler import Scheduler
    from minillama.serve import create_app

    scheduler = Scheduler(llm, max_batch=2)
    try:
        with TestClient(create_app(llm, scheduler, MODEL, request_timeout=0.02)) as client:
            r = client.post("/v1/completions", json={"prompt": "Once upon a time", "max_tokens": 500,
                                                     "temperature": 0.7, "seed": 1})
            assert r.status_code == 504 and "out of time" in r.json()["error"]["message"]
            with client.stream("POST", "/v1/completions", json={"prompt": "Once", "max_tokens": 500, "seed": 2,
                                                                 "temperature": 0.7, "stream": True}) as s:
                assert s.headers["cache-control"] == "no-cache"
                lines = [line for line in s.iter_lines() if line.startswith("data: ")]
            assert "out of time" in json.loads(lines[-2][6:])["error"]["message"] and lines[-1] == "data: [DONE]"
        deadline = time.monotonic() + 10
        while scheduler.stats()["running"] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert scheduler.stats()["cancelled"] == 2
    finally:
        scheduler.close()


METRIC_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
SAMPLE = re.compile(rf"({METRIC_NAME})\{{(.*)\}} (\S+)")
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"')  # a value: \\, \" and \n escaped
GO_FLOAT = re.compile(r"[+-]?(?:Inf|NaN|[0-9]+(?:\.[0-9]*)?(?:[eE][+-]?[0-9]+)?)")


def parse_metrics(text):
    """The samples of a Prometheus text exposition (format 0.0.4), checked strictly: each family is a
    '# HELP name text' line, a '# TYPE name kind' line, then its samples 'name{labels} value'; every name
    starts with 'minillama:', a counter's ends with '_total', every sample has model_name="demo_model"; a
    histogram's _bucket samples have increasing 'le' bounds up to +Inf and cumulative counts, the last
    equal to its _count. Returns {name without the prefix: [(labels but model_name, value)]}."""
    assert text.endswith("\n") and "\n\n" not in text
    families, samples, family = {}, {}, None
    for line in text[:-1].split("\n"):
        if line.startswith("# HELP "):
            family, help_text = line[len("# HELP "):].split(" ", 1)
            assert family.startswith("minillama:") and family not in families and help_text.strip(), line
            families[family] = None
        elif line.startswith("# TYPE "):
            name, kind = line[len("# TYPE "):].split(" ")
            assert name == family and families[name] is None and kind in ("counter", "gauge", "histogram"), line
            assert kind != "counter" or name.endswith("_total"), line
            families[name] = kind
        else:
            name, labels, value = SAMPLE.fullmatch(line).groups()
            parts = ("_bucket", "_sum", "_count") if families[family] == "histogram" else ("",)
            assert name in [family + part for part in parts], (family, line)
            pairs = LABEL.findall(labels)
            assert ",".join(f'{k}="{v}"' for k, v in pairs) == labels, line
            labels = dict(pairs)
            assert len(labels) == len(pairs) and labels.pop("model_name") == MODEL, line
            assert GO_FLOAT.fullmatch(value), line
            samples.setdefault(name[len("minillama:"):], []).append((labels, float(value)))
    for family, kind in families.items():
        name = family[len("minillama:"):]
        if kind != "histogram":
            assert samples[name], family
            continue
        bounds = [float(labels.pop("le")) for labels, _ in samples[f"{name}_bucket"]]
        counts = [count for _, count in samples[f"{name}_bucket"]]
        assert all(labels == {} for labels, _ in samples[f"{name}_bucket"]), family
        assert bounds == sorted(set(bounds)) and bounds[-1] == math.inf, family
        assert counts == sorted(counts) and samples[f"{name}_count"] == [({}, counts[-1])], family
        (labels, total), = samples[f"{name}_sum"]
        assert labels == {} and total >= 0, family
    return samples


def metric(samples, name, **labels):
    (value,) = [v for got, v in samples[name] if got == labels]
    return value


def test_metrics_text_escapes_label_values_and_buckets_by_upper_bound():
    """A served name with a quote, a backslash and a newline is escaped in the label; an observation
    equal to a bound counts in that bound's bucket (le: less or equal); the KV-cache usage is rows in use
    over the pool's rows."""
    from minillama.metrics import ServerMetrics

    metrics = ServerMetrics(max_seq_len=512)
    metrics.time_to_first_token.observe(0.01)
    metrics.time_to_first_token.observe(3000.0)
    stats = {"running": 1, "waiting": 2, "prompt_tokens": 0, "generated_tokens": 0, "cached_tokens": 0}
    lines = metrics.render('say "hi"\\\n', stats, max_batch=4).splitlines()
    label = 'model_name="say \\"hi\\"\\\\\\n"'
    assert f"minillama:num_requests_waiting{{{label}}} 2" in lines
    assert f"minillama:kv_cache_usage_perc{{{label}}} 0.25" in lines
    ttft = "minillama:time_to_first_token_seconds"
    assert [line for line in lines if line.startswith(ttft)][1:5] == [
        f'{ttft}_bucket{{{label},le="0.005"}} 0', f'{ttft}_bucket{{{label},le="0.01"}} 1',
        f'{ttft}_bucket{{{label},le="0.02"}} 1', f'{ttft}_bucket{{{label},le="0.04"}} 1']
    assert f'{ttft}_bucket{{{label},le="2560.0"}} 1' in lines and f'{ttft}_bucket{{{label},le="+Inf"}} 2' in lines
    assert f"{ttft}_sum{{{label}}} 3000.01" in lines and f"{ttft}_count{{{label}}} 2" in lines
    assert [line for line in lines if line.startswith("minillama:request_prompt_tokens_bucket")][-2:] == [
        f'minillama:request_prompt_tokens_bucket{{{label},le="500.0"}} 0',
        f'minillama:request_prompt_tokens_bucket{{{label},le="+Inf"}} 0']  # 1, 2, 5, ... up to the context


def test_metrics_count_what_the_responses_got(llm, monkeypatch):
    """GET /metrics after whole and streamed requests of both endpoints, ended by a stop id, a stop string,
    max_tokens and a failing step: valid exposition; the token counters are the responses' usage (a prompt
    counted once per choice), the requests by finished_reason their finish_reasons; TTFT, e2e and the
    per-request histograms count the choices, ITL the gaps between their tokens; the gauges are 0 when idle."""
    from fastapi.testclient import TestClient

    from minillama.scheduler import Scheduler
    from minillama.serve import create_app

    scheduler = Scheduler(llm, max_batch=2)
    try:
        with TestClient(create_app(llm, scheduler, MODEL)) as client:
            r = client.get("/metrics")
            assert r.status_code == 200 and r.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
            idle = parse_metrics(r.text)
            assert all(value == 0 for name, got in idle.items() for _, value in got), r.text
            assert [labels["finished_reason"] for labels, _ in idle["request_success_total"]] == \
                ["stop", "length", "abort", "error"]
            got = []  # (path, body, usage, finish_reasons) of each request

            def whole(path, body):
                response = client.post(path, json=body).json()
                got.append((body, response["usage"], [c["finish_reason"] for c in response["choices"]]))

            def streamed(path, body):
                body = {**body, "stream": True, "stream_options": {"include_usage": True}}
                with client.stream("POST", path, json=body) as s:
                    chunks = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
                got.append((body, chunks[-1]["usage"], [c["finish_reason"] for chunk in chunks
                                                        for c in chunk["choices"] if c["finish_reason"]]))

            greedy = {"temperature": 0}
            whole("/v1/completions", {"prompt": PROMPTS[3], "max_tokens": 100, **greedy})  # the stop id
            streamed("/v1/completions", {"prompt": "Once upon a time", "max_tokens": 60, "stop": ["Kai", "mom"],
                                         **greedy})  # a stop string
            whole("/v1/chat/completions", {"messages": [{"role": "user", "content": "Who is Lily?"}], "n": 2,
                                           "max_tokens": 100, **greedy})  # the stop id, twice
            streamed("/v1/chat/completions", {"messages": [{"role": "user", "content": "A dog?"}], "max_tokens": 5,
                                              **greedy})
            whole("/v1/completions", {"prompt": PROMPTS[:2], "max_tokens": 3, **greedy})
            assert [reasons for _, _, reasons in got] == [["stop"], ["stop"], ["stop", "stop"], ["length"],
                                                          ["length", "length"]]
            failing = llm.tokenizer.encode(PROMPTS[5])
            launch = scheduler._launch

            def launch_failing():  # the step that would prefill the failing prompt raises
                if any(row.seq is not None and row.seq.prompt == failing for row in scheduler.rows):
                    raise RuntimeError("simulated")
                return launch()

            monkeypatch.setattr(scheduler, "_launch", launch_failing)
            assert client.post("/v1/completions", json={"prompt": failing, "max_tokens": 5}).status_code == 500
            samples = parse_metrics(client.get("/metrics").text)
    finally:
        scheduler.close()
    for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc"):
        assert metric(samples, name) == 0, name
    choices = sum(len(reasons) for _, _, reasons in got)
    prompt_tokens = sum(usage["prompt_tokens"] * body.get("n", 1) for body, usage, _ in got)  # once per prompt
    completion_tokens = sum(usage["completion_tokens"] for _, usage, _ in got)
    assert metric(samples, "prompt_tokens_total") == prompt_tokens + len(failing)  # the failed one took a row
    assert metric(samples, "prefix_cache_queries_total") == prompt_tokens + len(failing)
    assert metric(samples, "prefix_cache_hits_total") == scheduler.stats()["cached_tokens"] >= \
        sum(usage["prompt_tokens_details"]["cached_tokens"] for _, usage, _ in got)
    assert metric(samples, "generation_tokens_total") == completion_tokens
    ended = {labels["finished_reason"]: value for labels, value in samples["request_success_total"]}
    assert ended == {"stop": 4, "length": 3, "abort": 0, "error": 1}
    for name in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_prompt_tokens",
                 "request_generation_tokens"):
        assert metric(samples, f"{name}_count") == choices, name
    assert metric(samples, "inter_token_latency_seconds_count") == completion_tokens - choices
    assert metric(samples, "request_prompt_tokens_sum") == prompt_tokens
    assert metric(samples, "request_generation_tokens_sum") == completion_tokens
    e2e = metric(samples, "e2e_request_latency_seconds_sum")
    assert 0 < metric(samples, "time_to_first_token_seconds_sum") < e2e
    assert 0 < metric(samples, "inter_token_latency_seconds_sum") < e2e


def test_metrics_count_timed_out_requests_as_aborted(llm):
    """Requests cancelled at their timeout (a 504, and an error chunk) end as finished_reason abort, their
    end counted once it reaches the server (after their handlers stopped reading); their tokens as any."""
    from fastapi.testclient import TestClient

    from minillama.scheduler import Scheduler
    from minillama.serve import create_app

    scheduler = Scheduler(llm, max_batch=2)
    try:
        with TestClient(create_app(llm, scheduler, MODEL, request_timeout=0.02)) as client:
            body = {"prompt": "Once upon a time", "max_tokens": 500, "temperature": 0.7, "seed": 1}
            assert client.post("/v1/completions", json=body).status_code == 504
            with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as s:
                assert "out of time" in [line for line in s.iter_lines() if line.startswith("data: ")][-2]
            deadline = time.monotonic() + 10
            while True:
                samples = parse_metrics(client.get("/metrics").text)
                if metric(samples, "request_success_total", finished_reason="abort") == 2:
                    break
                assert time.monotonic() < deadline, "the cancelled requests did not end"
                time.sleep(0.01)
    finally:
        scheduler.close()
    ended = {labels["finished_reason"]: value for labels, value in samples["request_success_total"]}
    assert ended == {"stop": 0, "length": 0, "abort": 2, "error": 0}
    assert metric(samples, "num_requests_running") == 0 and metric(samples, "kv_cache_usage_perc") == 0
    assert metric(samples, "e2e_request_latency_seconds_count") == 2
    generated = metric(samples, "generation_tokens_total")
    assert metric(samples, "request_generation_tokens_sum") == generated
    tokens_timed = metric(samples, "time_to_first_token_seconds_count") + \
        metric(samples, "inter_token_latency_seconds_count")
    assert tokens_timed == generated


def test_penalties_and_logit_bias_equal_solo(app, llm):
    """Both endpoints take presence_penalty, frequency_penalty, logit_bias and the extra
    repetition_penalty, as Llama.generate does; a bias of -100 on the greedy token removes it."""
    penalties = dict(presence_penalty=1.0, frequency_penalty=2.0, repetition_penalty=1.3)
    prompt = "Mia wanted to"
    r = app.post("/v1/completions", json={"prompt": prompt, "max_tokens": 20, "temperature": 0, **penalties})
    assert r.status_code == 200, r.text
    text = r.json()["choices"][0]["text"]
    assert text == solo(llm, prompt, 20, **penalties).text != solo(llm, prompt, 20).text

    messages = [{"role": "user", "content": "Tell me a story about a cat."}]
    ids = llm.tokenizer.encode_chat(messages)
    first = solo(llm, ids, 1).token_ids[0]
    body = {"messages": messages, "max_tokens": 12, "temperature": 0, "logit_bias": {str(first): -100}}
    r = app.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    ref = solo(llm, ids, 12, logit_bias={first: -100.0})
    assert ref.token_ids[0] != first and r.json()["choices"][0]["message"]["content"] == ref.text
    r = app.post("/v1/chat/completions", json={**body, "presence_penalty": 0, "frequency_penalty": None,
                                                "logit_bias": {}})  # the neutral values
    assert r.json()["choices"][0]["message"]["content"] == solo(llm, ids, 12).text


def test_continue_final_message_and_add_generation_prompt_equal_solo(app, llm):
    """vLLM's assistant prefill: with continue_final_message the prompt ends inside the final message
    (its end-of-turn cut) and the reply is only the continuation; add_generation_prompt: false
    encodes without the assistant header (the demo model's Llama 2 template writes none either way)."""
    tok = llm.tokenizer
    messages = [{"role": "user", "content": "Tell me a story about a cat."},
                {"role": "assistant", "content": "Once upon a time, there was a cat named"}]
    ids = tok.encode_chat(messages, add_generation_prompt=False, continue_final_message=True)
    assert tok.decode(ids).endswith("[/INST] Once upon a time, there was a cat named")  # no " </s>" after it
    ref = solo(llm, ids, 20)
    for extra in ({"continue_final_message": True}, {"continue_final_message": True, "add_generation_prompt": False}):
        r = app.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 20, "temperature": 0, **extra})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == ref.text
        usage = r.json()["usage"]
        assert (usage["prompt_tokens"], usage["completion_tokens"]) == (len(ids), len(ref.token_ids))
    assert ref.text != solo(llm, tok.encode_chat(messages, add_generation_prompt=False), 20).text

    ids = tok.encode_chat(messages[:1], add_generation_prompt=False)
    r = app.post("/v1/chat/completions", json={"messages": messages[:1], "max_tokens": 12, "temperature": 0,
                                                "add_generation_prompt": False})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == solo(llm, ids, 12).text
    assert r.json()["usage"]["prompt_tokens"] == len(ids)


def test_ignore_eos_and_min_tokens_equal_solo(app, llm):
    """vLLM's extras on both endpoints, whole and streamed, as Llama.generate: ignore_eos runs to
    max_tokens, the demo model's </s> a token of the text, the logprobs and the usage; min_tokens holds
    the </s> back, then lets it end the choice; null is off."""
    def streamed(path, body):
        with app.stream("POST", path, json={**body, "stream": True}) as s:
            return [json.loads(line[6:])["choices"][0] for line in s.iter_lines() if line.startswith("data: {")]

    prompt = PROMPTS[3]  # greedy: </s> after 27 tokens
    ref = solo(llm, prompt, 40, ignore_eos=True)
    assert (ref.finish_reason, ref.token_ids[27]) == ("length", 2) and solo(llm, prompt, 40).finish_reason == "stop"
    body = {"prompt": prompt, "max_tokens": 40, "temperature": 0, "ignore_eos": True, "logprobs": 0}
    r = app.post("/v1/completions", json=body).json()
    (choice,) = r["choices"]
    assert (choice["text"], choice["finish_reason"], r["usage"]["completion_tokens"]) == (ref.text, "length", 40)
    tokens = choice["logprobs"]["tokens"]
    assert "</s>" in choice["text"] and tokens[27] == "</s>" and len(tokens) == 40
    chunks = streamed("/v1/completions", body)
    assert "".join(c["text"] for c in chunks) == ref.text and chunks[-1]["finish_reason"] == "length"
    ref = solo(llm, prompt, 60, min_tokens=30)
    assert (ref.finish_reason, len(ref.token_ids)) == ("stop", 33)
    body = {"prompt": prompt, "max_tokens": 60, "temperature": 0, "min_tokens": 30}
    r = app.post("/v1/completions", json=body).json()
    assert r["choices"][0]["text"] == ref.text and r["usage"]["completion_tokens"] == 34  # with the </s>

    messages = [{"role": "user", "content": "Who is Lily?"}]
    ids = llm.tokenizer.encode_chat(messages)
    plain = solo(llm, ids, 100)
    assert (plain.finish_reason, len(plain.token_ids)) == ("stop", 37)
    for extras, max_tokens in ((dict(ignore_eos=True), 47), (dict(min_tokens=40), 100)):
        ref = solo(llm, ids, max_tokens, **extras)
        body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0, **extras}
        r = app.post("/v1/chat/completions", json=body).json()
        (choice,) = r["choices"]
        assert choice["message"]["content"] == ref.text != plain.text and choice["finish_reason"] == ref.finish_reason
        assert r["usage"]["completion_tokens"] == len(ref.token_ids) + (ref.finish_reason == "stop")
        chunks = streamed("/v1/chat/completions", body)
        assert "".join(c["delta"].get("content", "") for c in chunks) == ref.text
        assert chunks[-1]["finish_reason"] == ref.finish_reason
    assert solo(llm, ids, 47, ignore_eos=True).text.startswith(plain.text + "</s>")
    body = {"messages": messages, "max_tokens": 100, "temperature": 0, "ignore_eos": None, "min_tokens": None}
    assert app.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"] == plain.text


def test_stop_token_ids_equal_solo(app, llm):
    """vLLM's stop_token_ids on both endpoints, whole and streamed, as Llama.generate's stop_ids: the id
    ends the choice with finish_reason "stop", is left out of the text (as an EOS), listed last in the
    logprobs and counted in usage; min_tokens holds it back; with ignore_eos, the EOS given here ends."""
    def streamed(path, body):
        stream = {**body, "stream": True, "stream_options": {"include_usage": True}}
        with app.stream("POST", path, json=stream) as s:
            chunks = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
        return [c["choices"][0] for c in chunks[:-1]], chunks[-1]["usage"]

    prompt = PROMPTS[0]
    plain = solo(llm, prompt, 40)
    kai = 656  # "Kai": the greedy reply's 8th token (index 7), first there
    assert plain.token_ids.index(kai) == 7
    ref = solo(llm, prompt, 40, stop_ids=[kai])
    assert (ref.token_ids, ref.finish_reason, ref.stop) == (plain.token_ids[:7], "stop", kai)
    body = {"prompt": prompt, "max_tokens": 40, "temperature": 0, "stop_token_ids": [kai], "logprobs": 0}
    r = app.post("/v1/completions", json=body).json()
    (choice,) = r["choices"]
    assert (choice["text"], choice["finish_reason"], r["usage"]["completion_tokens"]) == (ref.text, "stop", 8)
    assert choice["logprobs"]["tokens"][-1] == " Kai" and len(choice["logprobs"]["tokens"]) == 8
    chunks, usage = streamed("/v1/completions", body)
    assert "".join(c["text"] for c in chunks) == ref.text and chunks[-1]["finish_reason"] == "stop"
    assert chunks[-1]["logprobs"]["tokens"] == [" Kai"] and usage["completion_tokens"] == 8
    ref = solo(llm, prompt, 40, stop_ids=[kai], min_tokens=10)  # "Theo" in place of the first Kai; the next ends
    assert (len(ref.token_ids), ref.finish_reason, ref.stop) == (34, "stop", kai) and "Theo" in ref.text
    r = app.post("/v1/completions", json={**body, "min_tokens": 10}).json()
    assert (r["choices"][0]["text"], r["choices"][0]["finish_reason"]) == (ref.text, "stop")
    assert r["usage"]["completion_tokens"] == 35
    ref = solo(llm, PROMPTS[3], 40, ignore_eos=True, stop_ids=[2])  # </s> ends the choice again
    r = app.post("/v1/completions", json={"prompt": PROMPTS[3], "max_tokens": 40, "temperature": 0,
                                          "ignore_eos": True, "stop_token_ids": [2]}).json()
    assert (r["choices"][0]["text"], r["choices"][0]["finish_reason"]) == (ref.text, "stop") == \
        (solo(llm, PROMPTS[3], 40).text, "stop")

    messages = [{"role": "user", "content": "Who is Lily?"}]
    ids = llm.tokenizer.encode_chat(messages)
    plain = solo(llm, ids, 100)
    about = 430  # "about": the greedy reply's 9th token (index 8), first there
    assert plain.token_ids.index(about) == 8
    ref = solo(llm, ids, 100, stop_ids=[about])
    assert (ref.token_ids, ref.finish_reason) == (plain.token_ids[:8], "stop")
    body = {"messages": messages, "max_tokens": 100, "temperature": 0, "stop_token_ids": [about], "logprobs": True}
    r = app.post("/v1/chat/completions", json=body).json()
    (choice,) = r["choices"]
    assert (choice["message"]["content"], choice["finish_reason"], r["usage"]["completion_tokens"]) == \
        (ref.text, "stop", 9)
    assert [e["token"] for e in choice["logprobs"]["content"]][-1] == " about"
    chunks, usage = streamed("/v1/chat/completions", body)
    assert "".join(c["delta"].get("content", "") for c in chunks) == ref.text
    assert chunks[-1]["finish_reason"] == "stop" and usage["completion_tokens"] == 9
    body = {"messages": messages, "max_tokens": 100, "temperature": 0, "stop_token_ids": None}
    assert app.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"] == plain.text


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize("value, words", [
    (5, "stop_token_ids must be a list of token ids (integers >= 0), got 5"),
    ([1, "2"], 'stop_token_ids[1] must be a token id (an integer >= 0), got "2"'),
    ([-1], "stop_token_ids[0] must be a token id (an integer >= 0), got -1"),
    ([True], "stop_token_ids[0] must be a token id (an integer >= 0), got true"),
    ([3, 1024, 5000], "stop_token_ids has token id(s) [1024, 5000] outside the vocabulary [0, 1024); give ids of "
                      "this model's tokenizer"),
    ([7] * 1025, "stop_token_ids holds 1025 ids, at most 1024 are allowed"),
])
def test_bad_stop_token_ids_are_a_400(app, path, value, words):
    prompt = {"prompt": "x"} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "hi"}]}
    r = app.post(path, json={**prompt, "max_tokens": 2, "stop_token_ids": value})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "stop_token_ids" and words in error["message"], error


def test_min_tokens_past_the_completions_default_max_tokens_is_a_400(app):
    r = app.post("/v1/completions", json={"prompt": "x", "min_tokens": 17})
    assert r.status_code == 400 and r.json()["error"]["param"] == "min_tokens"
    assert "min_tokens 17 is more than max_tokens 16" in r.json()["error"]["message"]


def test_integer_literal_too_long_to_read_is_a_400(app):
    # Python reads at most 4300 digits of an integer literal; json.loads raises ValueError beyond
    r = app.post("/v1/completions", content=b'{"prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}")
    assert r.status_code == 400 and "4300 digits" in r.json()["error"]["message"]
    assert app.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}).status_code == 200


def test_null_top_k_means_off(app):
    body = {"prompt": "Max the dog was", "max_tokens": 8, "temperature": 0.9, "seed": 4}
    r = app.post("/v1/completions", json={**body, "top_k": None})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == app.post("/v1/completions", json=body).json()["choices"][0]["text"]


def test_null_is_the_neutral_value_of_boolean_fields(app):
    # OpenAI's echo and store are "boolean or null"; null is listed among their neutral values
    r = app.post("/v1/completions", json={"prompt": "x", "max_tokens": 2, "echo": None})
    assert r.status_code == 200, r.text
    r = app.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                                               "store": None})
    assert r.status_code == 200, r.text
    r = app.post("/v1/completions", json={"prompt": "x", "max_tokens": 2, "echo": 0})
    assert r.status_code == 400 and r.json()["error"]["param"] == "echo"


def test_null_max_tokens_beside_max_completion_tokens(app):
    messages = [{"role": "user", "content": "hi"}]
    for body in ({"max_tokens": None, "max_completion_tokens": 3}, {"max_tokens": 3, "max_completion_tokens": None}):
        r = app.post("/v1/chat/completions", json={"messages": messages, **body})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 3 and r.json()["choices"][0]["finish_reason"] == "length"


def test_prompts_the_scheduler_refuses_name_the_field(app):
    r = app.post("/v1/completions", json={"prompt": [1, -1], "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt" and "vocabulary" in r.text
    # the demo model's template writes nothing for a lone system message
    r = app.post("/v1/chat/completions", json={"messages": [{"role": "system", "content": "Be kind."}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages" and "empty" in r.text


def test_bad_tool_call_in_messages_names_messages(app):
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "not json"}}
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "user", "content": "b"}]
    r = app.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 2})
    assert r.status_code == 400 and "arguments are not valid JSON" in r.text
    assert r.json()["error"]["param"] == "messages"


def test_deeply_nested_tool_calls_and_tools_are_a_400(app):
    deep = "[" * 600 + "]" * 600  # within the body's JSON depth, beyond what rendering recurses through
    turns = ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": null, "tool_calls": '
             '[{"id": "c1", "type": "function", "function": {"name": "f", "arguments": %s}}]}, '
             '{"role": "user", "content": "b"}], "max_tokens": 2}')
    for arguments in (json.dumps("[" * 100000 + "]" * 100000), '{"x": %s}' % deep):  # as JSON text; as an object
        r = app.post("/v1/chat/completions", content=(turns % arguments).encode())
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages", r.text
        assert "too deeply" in r.json()["error"]["message"]
    tools = ('{"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function", "function": '
             '{"name": "f", "parameters": {"x": %s}}}]}')
    r = app.post("/v1/chat/completions", content=(tools % deep).encode())
    assert r.status_code == 400 and r.json()["error"]["param"] == "tools" and "too deeply" in r.text, r.text
    assert app.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}).status_code == 200


def test_completion_top_logprobs_hold_the_sampled_token(app):
    # OpenAI: "the API will always return the logprob of the sampled token, so there may be up to logprobs+1
    # elements"; at temperature 2 some sampled tokens are not among the best one
    r = app.post("/v1/completions", json={"prompt": "Once upon a time", "max_tokens": 20, "temperature": 2.0,
                                          "seed": 7, "logprobs": 1}).json()
    lp = r["choices"][0]["logprobs"]
    for token, logprob, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
        assert top[token] == logprob and 1 <= len(top) <= 2
    assert any(len(top) == 2 for top in lp["top_logprobs"])


def test_streamed_text_offsets_equal_the_whole_responses(app):
    """text_offset counts each token's text from the start of the completion (vLLM's offsets without
    echo), streamed or not. A stop string that may be starting holds the streamed text back while its
    tokens' logprobs go out: the streamed offsets counted only the text shown, so the tokens after a
    held-back one got its offset."""
    body = {"prompt": "Once upon a time", "max_tokens": 40, "temperature": 0, "logprobs": 0,
            "stop": ["was a clever girl"]}  # "was a clever" is generated, then "boy": held back, then shown
    whole = app.post("/v1/completions", json=body).json()["choices"][0]["logprobs"]
    assert whole["text_offset"][0] == 0
    for offset, token, following in zip(whole["text_offset"], whole["tokens"], whole["text_offset"][1:]):
        assert following == offset + len(token)
    streamed = {"tokens": [], "text_offset": []}
    with app.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    for lp in [c["choices"][0]["logprobs"] for c in chunks if c["choices"][0]["logprobs"]]:
        streamed["tokens"] += lp["tokens"]
        streamed["text_offset"] += lp["text_offset"]
    assert "".join(whole["tokens"][:6]) == ", there was a clever boy"
    assert streamed == {"tokens": whole["tokens"], "text_offset": whole["text_offset"]}


def lm_eval_loglikelihoods(response, ctxlens):
    """What lm-evaluation-harness's local-completions model reads from an echo response
    (lm_eval/models/openai_completions.py, parse_logprobs): per choice, the sum of the continuation's
    token_logprobs and whether each is the largest of its top_logprobs (greedy)."""
    out = []
    for choice, ctxlen in zip(sorted(response["choices"], key=lambda c: c["index"]), ctxlens):
        logprobs = choice["logprobs"]["token_logprobs"][ctxlen:-1]
        tops = choice["logprobs"]["top_logprobs"][ctxlen:-1]
        out.append((sum(logprobs), all(lp == max(top.values()) for lp, top in zip(logprobs, tops))))
    return out


def reference_loglikelihood(llm, context, continuation):
    """(log-likelihood of ``continuation`` after ``context``, whether it is greedy) from one full
    forward: ``llm.logits``, log-softmax in float64."""
    lp = llm.logits(context + continuation).double().log_softmax(-1)[len(context) - 1: -1]
    target = torch.tensor(continuation)
    return float(lp.gather(1, target[:, None]).sum()), bool((lp.argmax(-1) == target).all())


def test_lm_eval_loglikelihood_requests(app, llm):
    """lm-eval's log-likelihood request (token ids, echo, max_tokens 1, logprobs 1) gives the model's
    log-likelihoods and greedy flags: a greedy continuation, another, a prompt longer than the
    scheduler's prefill chunk (256), and one whose next token is the stop id, which the logprobs
    list last so that lm-eval's [ctxlen:-1] still drops only the generated token."""
    encode = llm.tokenizer.encode
    cat = encode(PROMPTS[3])
    pairs = [(encode(PROMPTS[0]), solo(llm, encode(PROMPTS[0]), 6).token_ids),
             (cat, encode(" big red ball.", bos=False)),
             (encode("Once upon a time, " * 60), encode(" there was a dog.", bos=False)),
             (cat, solo(llm, cat, 100).token_ids)]  # then the stop id 2, greedy
    assert len(pairs[2][0]) > 256 and solo(llm, cat, 100).finish_reason == "stop"
    prompts = [c + x for c, x in pairs]
    body = {"model": MODEL, "prompt": prompts, "temperature": 0, "max_tokens": 1, "logprobs": 1, "seed": 1234,
            "echo": True}
    r = app.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    got = lm_eval_loglikelihoods(r.json(), [len(c) for c, _ in pairs])
    for (ll, greedy), (context, continuation) in zip(got, pairs):
        ref_ll, ref_greedy = reference_loglikelihood(llm, context, continuation)
        assert ll == pytest.approx(ref_ll, abs=1e-4) and greedy == ref_greedy
    assert [greedy for _, greedy in got] == [True, False, False, True]
    for choice, ids in zip(r.json()["choices"], prompts):
        lp, ref = choice["logprobs"], solo(llm, ids, 1)
        assert choice["text"] == llm.tokenizer.decode(ids) + ref.text
        assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(ids) + 1
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        assert lp["text_offset"][0] == 0
        for offset, token, following in zip(lp["text_offset"], lp["tokens"], lp["text_offset"][1:]):
            assert following == offset + len(token)
    last = r.json()["choices"][3]
    assert last["finish_reason"] == "stop" and last["logprobs"]["tokens"][-1] == "</s>" and last["text"] == \
        llm.tokenizer.decode(prompts[3])


def test_echo_of_a_text_prompt_and_max_tokens_0(app, llm):
    """A text prompt comes back as given before the completion; max_tokens 0 with echo scores the
    prompt and generates nothing."""
    prompt = "Once upon a time"
    ids = llm.tokenizer.encode(prompt)
    r = app.post("/v1/completions", json={"prompt": prompt, "max_tokens": 0, "echo": True, "logprobs": 2}).json()
    (choice,) = r["choices"]
    assert choice["text"] == prompt and choice["finish_reason"] == "length"
    assert r["usage"]["prompt_tokens"] == len(ids) and r["usage"]["completion_tokens"] == 0
    lp = llm.logits(ids).double().log_softmax(-1)
    expected = [None] + [float(lp[j - 1, t]) for j, t in enumerate(ids) if j]
    assert choice["logprobs"]["token_logprobs"] == pytest.approx(expected, abs=1e-5)
    assert all(2 <= len(top) <= 3 for top in choice["logprobs"]["top_logprobs"][1:])
    r = app.post("/v1/completions", json={"prompt": prompt, "max_tokens": 0, "echo": True}).json()
    assert r["choices"][0]["text"] == prompt and r["choices"][0]["logprobs"] is None
    r = app.post("/v1/completions", json={"prompt": prompt, "max_tokens": 12, "temperature": 0, "echo": True}).json()
    assert r["choices"][0]["text"] == prompt + solo(llm, prompt, 12).text


def test_echo_streams_the_prompt_first(app):
    """Streaming with echo: the choice's first chunk starts with its prompt and its logprobs; the
    chunks add up to the whole response."""
    body = {"prompt": "The cat sat on the", "max_tokens": 10, "temperature": 0, "logprobs": 1, "echo": True}
    whole = app.post("/v1/completions", json=body).json()["choices"][0]
    with app.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        chunks = [json.loads(line[6:])["choices"][0] for line in r.iter_lines() if line.startswith("data: {")]
    assert chunks[0]["text"].startswith("The cat sat on the") and chunks[0]["logprobs"]["token_logprobs"][0] is None
    assert "".join(c["text"] for c in chunks) == whole["text"]
    for key in ("tokens", "text_offset", "token_logprobs", "top_logprobs"):
        assert [x for c in chunks if c["logprobs"] for x in c["logprobs"][key]] == whole["logprobs"][key]


def test_echo_with_several_prompts_and_n(app, llm):
    """Each choice echoes its own prompt: text prompts as given, token ids as their text."""
    ids = llm.tokenizer.encode(PROMPTS[5])
    body = {"prompt": [PROMPTS[0], ids], "n": 2, "max_tokens": 6, "temperature": 0.8, "seed": 5}
    plain = app.post("/v1/completions", json=body).json()["choices"]
    echoed = app.post("/v1/completions", json={**body, "echo": True}).json()["choices"]
    prompts = [PROMPTS[0], PROMPTS[0], llm.tokenizer.decode(ids), llm.tokenizer.decode(ids)]
    assert [c["text"] for c in echoed] == [p + c["text"] for p, c in zip(prompts, plain)]


def assert_same_completion_choice(got, expected):
    """Two completions choices alike: text, finish_reason and tokens exactly, logprobs to float32
    rounding (the same tokens scored in other batches, which the requests' timing decides: 1.1e-5
    apart on logprobs near -4 in one CI run)."""
    assert {k: got[k] for k in ("text", "finish_reason")} == {k: expected[k] for k in ("text", "finish_reason")}
    got, expected = got["logprobs"], expected["logprobs"]
    assert {k: got[k] for k in ("tokens", "text_offset")} == {k: expected[k] for k in ("tokens", "text_offset")}
    assert got["token_logprobs"][0] is None and expected["token_logprobs"][0] is None
    assert got["token_logprobs"][1:] == pytest.approx(expected["token_logprobs"][1:], abs=1e-4)
    assert got["top_logprobs"][0] is None and expected["top_logprobs"][0] is None
    for top, expected_top in zip(got["top_logprobs"][1:], expected["top_logprobs"][1:]):
        assert top == pytest.approx(expected_top, abs=1e-4)


def test_echo_with_n_scores_each_prompt_once(app, llm, monkeypatch):
    """Echo with logprobs and n choices: a prompt's logprobs are the same for every choice, so only the
    first choice of each prompt asks the scheduler for them (the others prefill without scoring, and
    may take a cached prefix) and every choice echoes them: each choice is the one-choice request of
    its seed (seed + k), whole and streamed, for a prompt longer than the prefill chunk (256) too."""
    from minillama.scheduler import Scheduler

    submitted = []
    submit = Scheduler.submit

    def spy(self, request, on_event):
        submitted.append(request)
        return submit(self, request, on_event)

    monkeypatch.setattr(Scheduler, "submit", spy)
    long = llm.tokenizer.encode("Once upon a time, " * 60)
    assert len(long) > 256
    body = {"prompt": [PROMPTS[1], long], "n": 3, "max_tokens": 5, "temperature": 0.8, "seed": 5, "echo": True,
            "logprobs": 2}
    r = app.post("/v1/completions", json=body).json()
    assert [request.prompt_logprobs for request in submitted] == [True, False, False] * 2
    assert r["usage"]["prompt_tokens"] == len(llm.tokenizer.encode(PROMPTS[1])) + len(long)
    assert r["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}  # the scoring choices': none cached
    with app.stream("POST", "/v1/completions", json={**body, "stream": True}) as s:
        chunks = [json.loads(line[6:])["choices"][0] for line in s.iter_lines() if line.startswith("data: {")]
    assert [request.prompt_logprobs for request in submitted] == [True, False, False] * 4
    prompt_ids = [llm.tokenizer.encode(PROMPTS[1]), long]
    prompt_texts = [PROMPTS[1], llm.tokenizer.decode(long)]
    for i, choice in enumerate(r["choices"]):
        prompt, k = body["prompt"][i // 3], i % 3
        submitted.clear()
        one = app.post("/v1/completions", json={**body, "prompt": prompt, "n": 1, "seed": 5 + k}).json()["choices"][0]
        assert [request.prompt_logprobs for request in submitted] == [True]
        assert choice["index"] == i and choice["text"].startswith(prompt_texts[i // 3])
        assert_same_completion_choice(choice, one)
        mine = [c for c in chunks if c["index"] == i]  # the first holds the echoed prompt and its logprobs
        assert mine[0]["text"].startswith(prompt_texts[i // 3])
        assert len(mine[0]["logprobs"]["tokens"]) >= len(prompt_ids[i // 3])
        streamed = {"text": "".join(c["text"] for c in mine), "finish_reason": mine[-1]["finish_reason"],
                    "logprobs": {key: [x for c in mine if c["logprobs"] for x in c["logprobs"][key]]
                                 for key in ("tokens", "text_offset", "token_logprobs", "top_logprobs")}}
        assert_same_completion_choice(streamed, one)


def test_a_stop_id_is_listed_last_in_the_completions_logprobs(app, llm):
    """As vLLM's: the stop id that ends a completion has its entry in logprobs (streamed in the last
    chunk), though the text leaves it out."""
    body = {"prompt": PROMPTS[3], "max_tokens": 100, "temperature": 0, "logprobs": 1}
    ref = solo(llm, PROMPTS[3], 100)
    r = app.post("/v1/completions", json=body).json()
    (choice,) = r["choices"]
    assert choice["finish_reason"] == "stop" and choice["text"] == ref.text
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(ref.token_ids) + 1 == r["usage"]["completion_tokens"] and lp["tokens"][-1] == "</s>"
    expected = llm.logits(llm.tokenizer.encode(PROMPTS[3]) + ref.token_ids).double().log_softmax(-1)[-1, 2]
    assert lp["token_logprobs"][-1] == pytest.approx(float(expected), abs=1e-5)
    with app.stream("POST", "/v1/completions", json={**body, "stream": True}) as s:
        chunks = [json.loads(line[6:])["choices"][0] for line in s.iter_lines() if line.startswith("data: {")]
    assert chunks[-1]["finish_reason"] == "stop" and chunks[-1]["logprobs"]["tokens"] == ["</s>"]


def test_usage_counts_the_stop_id_that_ended_a_choice(app, llm):
    """As vLLM's usage (its outputs' token ids hold the stop id that ended them): completion_tokens
    counts the stop id, as many tokens as the completions' logprobs list; with and without logprobs,
    whole and streamed (include_usage), summed over n choices, for chat too; total_tokens follows."""
    def completion_tokens(path, body):
        """usage.completion_tokens of the whole response and of the streamed one; the whole response."""
        whole = app.post(path, json=body).json()
        stream = {**body, "stream": True, "stream_options": {"include_usage": True}}
        with app.stream("POST", path, json=stream) as r:
            chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
        assert chunks[-1]["choices"] == []
        usages = [whole["usage"], chunks[-1]["usage"]]
        for usage in usages:
            assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
        return [usage["completion_tokens"] for usage in usages], whole

    ref = solo(llm, PROMPTS[3], 100)
    assert ref.finish_reason == "stop" and ref.stop == 2  # the stop id, greedy
    with_stop_id = len(ref.token_ids) + 1
    body = {"prompt": PROMPTS[3], "max_tokens": 100, "temperature": 0}
    counts, whole = completion_tokens("/v1/completions", {**body, "logprobs": 1})
    assert counts == [with_stop_id] * 2 and len(whole["choices"][0]["logprobs"]["tokens"]) == with_stop_id
    assert completion_tokens("/v1/completions", body)[0] == [with_stop_id] * 2
    assert completion_tokens("/v1/completions", {**body, "n": 2})[0] == [2 * with_stop_id] * 2
    messages = [{"role": "user", "content": "Who is Lily?"}]
    ref = solo(llm, llm.tokenizer.encode_chat(messages), 100)
    assert ref.finish_reason == "stop" and ref.stop == 2
    body = {"messages": messages, "max_tokens": 100, "temperature": 0}
    for logprobs in (False, True):
        assert completion_tokens("/v1/chat/completions", {**body, "logprobs": logprobs})[0] == \
            [len(ref.token_ids) + 1] * 2


def test_a_stop_id_is_listed_last_in_the_chat_logprobs(app, llm):
    """As the completions' (and vLLM's chat): the stop id that ends a chat choice has the last entry of
    logprobs.content (streamed in the chunk with finish_reason), its token the id's text, so that the
    entries count usage.completion_tokens; a choice ended by a stop string or by max_tokens has none."""
    messages = [{"role": "user", "content": "Who is Lily?"}]
    ids = llm.tokenizer.encode_chat(messages)
    ref = solo(llm, ids, 100)
    assert ref.finish_reason == "stop" and ref.stop == 2  # </s>, the demo model's EOS, greedy
    body = {"messages": messages, "max_tokens": 100, "temperature": 0, "logprobs": True, "top_logprobs": 2}
    r = app.post("/v1/chat/completions", json=body).json()
    (choice,) = r["choices"]
    assert choice["finish_reason"] == "stop" and choice["message"]["content"] == ref.text
    content = choice["logprobs"]["content"]
    assert len(content) == len(ref.token_ids) + 1 == r["usage"]["completion_tokens"]
    lp = llm.logits(ids + ref.token_ids).double().log_softmax(-1)[-1]
    stop = content[-1]
    assert stop["token"] == "</s>" and stop["bytes"] == list(b"</s>")
    assert stop["logprob"] == pytest.approx(float(lp[2]), abs=1e-5)
    best = lp.topk(2).indices.tolist()
    assert best[0] == 2 and [e["logprob"] for e in stop["top_logprobs"]] == pytest.approx(lp[best].tolist(), abs=1e-5)
    assert stop["top_logprobs"][0] == {k: stop[k] for k in ("token", "logprob", "bytes")}
    assert [e["token"] for e in content[:-1]] == [llm.tokenizer.token_bytes(t).decode() for t in ref.token_ids]
    with app.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as s:
        chunks = [json.loads(line[6:])["choices"][0] for line in s.iter_lines() if line.startswith("data: {")]
    assert chunks[-1]["finish_reason"] == "stop" and chunks[-1]["delta"] == {}
    assert [e["token"] for e in chunks[-1]["logprobs"]["content"]] == ["</s>"]
    streamed = [e for c in chunks if c["logprobs"] for e in c["logprobs"]["content"]]
    # (the streamed request may take the cached prompt: the same tokens, the logprobs to float32 rounding)
    assert [e["token"] for e in streamed] == [e["token"] for e in content]
    assert [e["logprob"] for e in streamed] == pytest.approx([e["logprob"] for e in content], abs=1e-4)
    # ended by a stop string (the reply's fifth token completes it) or by max_tokens: no stop id to list
    stop_string = llm.tokenizer.decode(ref.token_ids[:5])[-3:]
    for ended in ({"stop": [stop_string]}, {"max_tokens": 5}):
        r = app.post("/v1/chat/completions", json={**body, **ended}).json()
        (choice,) = r["choices"]
        assert choice["finish_reason"] == ("stop" if "stop" in ended else "length")
        assert [e["token"] for e in choice["logprobs"]["content"]] == [e["token"] for e in content[:5]]
        assert r["usage"]["completion_tokens"] == 5


@pytest.mark.parametrize("path, body, param, words", [
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, "max_tokens", "echo: true"),
    ("/v1/completions", {"prompt": "x", "max_tokens": -1, "echo": True}, "max_tokens", ">= 0"),
    ("/v1/completions", {"prompt": "x", "echo": "yes"}, "echo", "true or false"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "echo": True}, "echo",
     "not supported"),
])
def test_bad_echo_requests(app, path, body, param, words):
    r = app.post(path, json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == param and words in r.json()["error"]["message"], r.text


def test_api_key_guards_the_v1_routes(llm):
    """With an API key every /v1 route answers 401 (OpenAI's error JSON, the key never echoed) unless
    the request carries 'Authorization: Bearer <key>'; /health and /metrics stay open; the server keeps serving."""
    from fastapi.testclient import TestClient

    from minillama.scheduler import Scheduler
    from minillama.serve import create_app

    key, wrong = "sk-the-right-key", "sk-a-wrong-key"
    scheduler = Scheduler(llm, max_batch=2)
    try:
        with TestClient(create_app(llm, scheduler, MODEL, api_key=key)) as client:
            assert client.get("/health").status_code == 200 and client.get("/metrics").status_code == 200
            body = {"prompt": "Once upon a time", "max_tokens": 3, "temperature": 0}
            for headers, code in (({}, None), ({"Authorization": key}, None), ({"Authorization": f"Basic {key}"}, None),
                                  ({"Authorization": f"Bearer {wrong}"}, "invalid_api_key"),
                                  ({"Authorization": f"Bearer {key}x"}, "invalid_api_key"),
                                  ({"Authorization": "Bearer \xe9".encode("latin-1")}, "invalid_api_key")):
                for r in (client.get("/v1/models", headers=headers), client.post("/v1/completions", json=body,
                                                                                 headers=headers)):
                    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", (headers, r.text)
                    error = r.json()["error"]
                    assert error["type"] == "invalid_request_error" and error["code"] == code and error["param"] is None
                    assert "key" in error["message"] and key not in r.text and wrong not in r.text
            for path in ("/v1/nothing", "/v1"):  # an unknown path under /v1 asks for the key first, as vLLM's
                assert client.get(path).status_code == 401
                assert client.get(path, headers={"Authorization": f"Bearer {key}"}).status_code == 404
            assert client.post("/v1/models").status_code == 401  # a wrong method too
            assert client.get("/nothing").status_code == 404
            assert client.post("/tokenize", json={"prompt": "x"}).status_code == 401  # the tokenizer's too
            assert client.get("/tokenizer_info", headers={"Authorization": f"Bearer {key}"}).status_code == 200
            r = client.post("/v1/completions", json=body, headers={"Authorization": f"bearer {key}"})  # any case
            assert r.status_code == 200 and r.json()["choices"][0]["text"] == solo(llm, body["prompt"], 3).text
            right = openai.OpenAI(base_url="http://testserver/v1", api_key=key, http_client=client, max_retries=0)
            assert [m.id for m in right.models.list().data] == [MODEL]
            with pytest.raises(openai.AuthenticationError, match="incorrect API key"):
                openai.OpenAI(base_url="http://testserver/v1", api_key=wrong, http_client=client,
                              max_retries=0).completions.create(model=MODEL, prompt="x", max_tokens=2)
            assert right.completions.create(model=MODEL, prompt="x", max_tokens=2).usage.completion_tokens == 2
    finally:
        scheduler.close()


def test_api_key_from_the_flag_or_the_environment(monkeypatch):
    from minillama.cli import CommandError
    from minillama.serve import API_KEY_ENV, parse_args

    monkeypatch.delenv(API_KEY_ENV, raising=False)
    assert parse_args([]).api_key is None
    monkeypatch.setenv(API_KEY_ENV, "from-env")
    assert parse_args([]).api_key == "from-env"
    assert parse_args(["--api-key", "from-flag"]).api_key == "from-flag"
    for value, where in (("", API_KEY_ENV), (" padded", API_KEY_ENV), ("caf\xe9", API_KEY_ENV)):
        monkeypatch.setenv(API_KEY_ENV, value)  # an empty variable must not leave the server open
        with pytest.raises(CommandError) as error:
            parse_args([])
        assert f"{where} must be printable ASCII, not empty" in str(error.value)
        assert not value or value not in str(error.value)
    with pytest.raises(CommandError, match="--api-key must be printable ASCII, not empty"):
        parse_args(["--api-key", ""])


@pytest.mark.slow
def test_tensor_parallel_server_answers_as_one_process(tmp_path):
    """--tp 2 on the CPU (gloo): rank 0 serves and schedules, rank 1 follows its steps; concurrent
    requests get the tokens of solo runs in one process."""
    from tests.checkpoints import write_checkpoint

    folder = tmp_path / "tp"
    write_checkpoint(folder, tokenizer="sentencepiece", n_heads=4, n_kv_heads=2, rope_scaling="llama3", seed=5)
    single = Llama.from_pretrained(folder, device="cpu")
    prompts = ["the cat", "and then", "one day a dog", "Lily"]
    refs = [single.generate([p], max_new_tokens=12 + 3 * i)[0] for i, p in enumerate(prompts)]
    proc, url = _start_server("--model", str(folder), "--tp", "2", "--max-seq-len", "256", "--max-batch", "2")
    try:
        out = [None] * len(prompts)

        def ask(i):
            r = httpx.post(url + "/v1/completions", json={"prompt": prompts[i], "max_tokens": 12 + 3 * i,
                                                          "temperature": 0}, timeout=60)
            out[i] = r.json()["choices"][0]["text"]

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert out == [r.text for r in refs]
    finally:
        _stop(proc)
    assert proc.returncode == 143  # SIGTERM: the launcher stopped both ranks
    out = proc.stdout.read()
    assert "Traceback" not in out and "Error" not in out, out  # rank 1 waited for rank 0's close


@pytest.mark.slow
def test_tensor_parallel_server_lets_a_request_finish_past_the_launchers_own_grace(tmp_path, monkeypatch):
    """torch's launcher kills the processes of --tp a grace after passing SIGTERM on (30 s, or
    TORCH_ELASTIC_SHUTDOWN_TIMEOUT: 0 here, which would cut the request in flight at once): the
    server tells it --shutdown-timeout plus SHUTDOWN_GRACE instead, and the request finishes."""
    import signal

    from tests.checkpoints import write_checkpoint

    folder = tmp_path / "tp"
    write_checkpoint(folder, tokenizer="sentencepiece", n_heads=4, n_kv_heads=2, rope_scaling="llama3", seed=5)
    prompt = "the cat " * 45  # 182 tokens: 242 steps with --prefill-chunk 1
    ref = Llama.from_pretrained(folder, device="cpu").generate([prompt], max_new_tokens=60)[0]
    monkeypatch.setenv("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "0")
    proc, url = _start_server("--model", str(folder), "--tp", "2", "--max-seq-len", "256", "--max-batch", "2",
                              "--prefill-chunk", "1", "--shutdown-timeout", "60")
    try:
        done = []
        body = {"prompt": prompt, "max_tokens": 60, "temperature": 0}
        holder = threading.Thread(target=lambda: done.append(httpx.post(url + "/v1/completions", json=body,
                                                                         timeout=60)))
        holder.start()
        _wait_running(url, 1)
        proc.send_signal(signal.SIGTERM)
        holder.join(timeout=60)
        assert done and done[0].status_code == 200 and done[0].json()["choices"][0]["text"] == ref.text
        code = proc.wait(timeout=30)
        assert code == 143, f"the server exited with {code}; its output ends:\n{proc.stdout.read()[-4000:]}"
    finally:
        _stop(proc)


def test_quantized_server_answers_as_the_quantized_model():
    """--quantize int8: the served completion is what Llama.generate gives with quantize="int8"."""
    quantized = Llama.from_pretrained(DEMO_MODEL_DIR, device="cpu", quantize="int8")
    expected = quantized.generate(["Once upon a time"], max_new_tokens=12)[0].text
    proc, url = _start_server("--quantize", "int8", "--max-batch", "2")
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", timeout=60, max_retries=0)
        done = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=12, temperature=0)
        assert done.choices[0].text == expected
    finally:
        _stop(proc)


def test_stream_options_continuous_usage_is_refused_and_obfuscation_read(app):
    """vLLM's continuous_usage_stats (usage in every chunk) is not served: a 400 naming it, not
    silently ignored; OpenAI's include_obfuscation (padding against side channels) is read."""
    body = {"prompt": "Max the dog was", "max_tokens": 2, "stream": True}
    r = app.post("/v1/completions", json={**body, "stream_options": {"continuous_usage_stats": True}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "stream_options", r.text
    assert "continuous_usage_stats=true is not supported" in r.json()["error"]["message"]
    for options in ({"continuous_usage_stats": False}, {"include_obfuscation": True, "include_usage": True}):
        r = app.post("/v1/completions", json={**body, "stream_options": options})
        assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]"), r.text
    r = app.post("/v1/completions", json={**body, "stream_options": {"include_obfuscation": "yes"}})
    assert r.status_code == 400 and "include_obfuscation must be true or false" in r.text


def test_an_infinite_logprob_goes_out_as_vllms_floor():
    """A log-probability of -inf (an echoed prompt's id that the tokenizer cannot decode) is sent as
    -9999.0, as vLLM's: JSON has no infinity, and the response must still encode strictly."""
    from minillama import openai_protocol as proto
    from minillama.scheduler import Token

    class Bytes:
        def token_bytes(self, i):
            return f"<{i}>".encode()

    tokens = [Token(5, "", None), Token(7, "", float("-inf"), [(3, -0.5), (7, float("-inf"))]),
              Token(9, "", -1.25, [(9, -1.25)])]
    out = proto.completion_logprobs(Bytes(), tokens, 0)
    assert out["token_logprobs"] == [None, -9999.0, -1.25]
    assert out["top_logprobs"] == [None, {"<3>": -0.5, "<7>": -9999.0}, {"<9>": -1.25}]
    chat = proto.chat_logprobs(Bytes(), tokens[1:])
    assert [c["logprob"] for c in chat["content"]] == [-9999.0, -1.25]
    assert chat["content"][0]["top_logprobs"][1]["logprob"] == -9999.0
    json.dumps([out, chat], allow_nan=False)


def test_tokenizer_endpoints_as_vllms(app, llm):
    """/tokenize, /detokenize and /tokenizer_info answer as vLLM's, which lm-evaluation-harness uses in
    place of a Hugging Face tokenizer when a server has them (its check: /tokenizer_info holds
    "eos_token", /tokenize gives a list of tokens)."""
    tok = llm.tokenizer
    text = "Once upon a time, Lily"
    r = app.post("/tokenize", json={"prompt": text})
    assert r.status_code == 200 and r.json()["tokens"] == tok.encode(text, bos=True)
    assert r.json()["count"] == len(r.json()["tokens"]) and r.json()["max_model_len"] > 0
    plain = app.post("/tokenize", json={"prompt": text, "add_special_tokens": False, "model": MODEL}).json()["tokens"]
    assert plain == tok.encode(text, bos=False)
    messages = [{"role": "user", "content": "Tell me a story."}]
    for add in (True, False):
        r = app.post("/tokenize", json={"messages": messages, "add_generation_prompt": add})
        assert r.json()["tokens"] == tok.encode_chat(messages, add_generation_prompt=add)
    assert app.post("/detokenize", json={"tokens": plain}).json() == {"prompt": tok.decode(plain)}
    info = app.get("/tokenizer_info").json()
    assert info["eos_token"] == tok.decode([tok.eos_id]) and info["bos_token"] == tok.decode([tok.bos_id])
    assert info["chat_template"] == tok.chat_template and info["add_bos_token"] is True
    for path, body, param in (("/tokenize", {"prompt": 5}, "prompt"), ("/tokenize", {"text": "x"}, "text"),
                              ("/tokenize", {"messages": []}, "messages"),
                              ("/tokenize", {"prompt": "x", "add_special_tokens": "yes"}, "add_special_tokens"),
                              ("/detokenize", {"tokens": [1, "2"]}, "tokens"),
                              ("/detokenize", {"tokens": [tok.vocab_size]}, "tokens")):
        r = app.post(path, json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (path, body, r.text)
    assert app.post("/tokenize", json={"prompt": "x", "model": "other"}).status_code == 404
