"""Tool calling through the server: tools rendered by Llama 3.1's template, the model's JSON call
returned as ``tool_calls`` (whole and streamed), tool results sent back in. The model is a tiny
Llama-3-tokenizer checkpoint whose forward is scripted to say a given reply, so the test pins the
server's handling rather than a model's whims."""
import json

import pytest
import torch

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

from minillama import Llama  # noqa: E402
from minillama.scheduler import Scheduler  # noqa: E402
from minillama.serve import create_app  # noqa: E402
from tests.checkpoints import EOM, EOT, PYTHON_TAG, checkpoint_factory  # noqa: E402,F401

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": {"type": "object",
                                                           "properties": {"city": {"type": "string"}}}}}
ASK = [{"role": "user", "content": "Weather in Paris?"}]
CALL = '{"name": "get_weather", "parameters": {"city": "Paris"}}'


class Scripted:
    """A runner that makes the model say ``reply_ids`` after a prompt of ``prompt_len`` tokens."""

    def __init__(self, runner, vocab):
        self.runner, self.vocab, self.prompt_len, self.reply_ids = runner, vocab, 0, []

    def say(self, prompt_len, reply_ids):
        self.prompt_len, self.reply_ids = prompt_len, reply_ids

    def new_cache(self, batch, max_len):
        return self.runner.new_cache(batch, max_len)

    def next_logits(self, position):
        """(V,): the reply token that follows the token at ``position``."""
        logits = torch.zeros(self.vocab)
        i = position + 1 - self.prompt_len  # index of the reply token that comes next
        logits[self.reply_ids[i] if 0 <= i < len(self.reply_ids) else EOT] = 1.0
        return logits

    def __call__(self, tokens, cache, logits_at=None):
        B, S = tokens.shape
        lasts = [cache.seq_lens_cpu[b] + (int(logits_at[b]) if logits_at is not None else S - 1) for b in range(B)]
        return torch.stack([self.next_logits(p) for p in lasts])[:, None]  # (B, 1, V)

    def forward_packed(self, tokens, spans, cache, logits_rows=None):
        positions = [cache.seq_lens_cpu[row] + s for row, n in spans for s in range(n)]
        rows = range(len(positions)) if logits_rows is None else logits_rows
        logits = torch.zeros(len(rows), self.vocab)  # (N, V); N may be 0
        for n, t in enumerate(rows):
            logits[n] = self.next_logits(positions[t])
        return logits


@pytest.fixture(scope="module")
def setup(checkpoint_factory):
    folder, config = checkpoint_factory(tokenizer="llama3", max_position_embeddings=4096)
    llm = Llama.from_pretrained(folder, device="cpu")
    script = Scripted(llm.runner, config["vocab_size"])
    llm.runner = script
    scheduler = Scheduler(llm, max_batch=2, max_seq_len=2048)
    with TestClient(create_app(llm, scheduler, "tiny")) as client:
        yield llm, script, client
    scheduler.close()


def post(client, **body):
    r = client.post("/v1/chat/completions", json={"model": "tiny", "max_tokens": 64, "temperature": 0, **body})
    assert r.status_code == 200, r.text
    return r.json()


def test_tool_call_comes_back_as_tool_calls(setup):
    llm, script, client = setup
    ids = llm.tokenizer.encode_chat(ASK, tools=[WEATHER])
    script.say(len(ids), llm.tokenizer.encode(CALL, bos=False) + [EOM])
    out = post(client, messages=ASK, tools=[WEATHER])
    choice = out["choices"][0]
    assert out["usage"]["prompt_tokens"] == len(ids)
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    (call,) = choice["message"]["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call-")
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}

    # with <|python_tag|> in front, streamed: the JSON is held back, then sent as one tool_calls delta
    script.say(len(ids), [PYTHON_TAG] + llm.tokenizer.encode(CALL, bos=False) + [EOT])
    with client.stream("POST", "/v1/chat/completions", json={
            "model": "tiny", "messages": ASK, "tools": [WEATHER], "stream": True, "temperature": 0}) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert deltas[0] == {"role": "assistant", "content": ""}
    assert not any(d.get("content") for d in deltas)
    (streamed,) = [d["tool_calls"] for d in deltas if "tool_calls" in d]
    assert streamed[0]["index"] == 0 and streamed[0]["function"]["name"] == "get_weather"
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "tool_calls"


def test_tool_results_go_back_in(setup):
    llm, script, client = setup
    messages = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call-1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call-1", "content": '{"temp_c": 21}'},
    ]
    ids = llm.tokenizer.encode_chat(messages, tools=[WEATHER])
    script.say(len(ids), llm.tokenizer.encode("It is 21 C in Paris.", bos=False) + [EOT])
    out = post(client, messages=messages, tools=[WEATHER])
    assert out["usage"]["prompt_tokens"] == len(ids)
    assert out["choices"][0]["message"] == {"role": "assistant", "content": "It is 21 C in Paris."}
    assert out["choices"][0]["finish_reason"] == "stop"


def test_prose_streams_at_once_and_tool_choice_none(setup):
    llm, script, client = setup
    ids = llm.tokenizer.encode_chat(ASK, tools=[WEATHER])
    script.say(len(ids), llm.tokenizer.encode("I cannot tell.", bos=False) + [EOT])
    with client.stream("POST", "/v1/chat/completions", json={
            "model": "tiny", "messages": ASK, "tools": [WEATHER], "stream": True, "temperature": 0}) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    texts = [c["choices"][0]["delta"].get("content") for c in chunks]
    assert "".join(t or "" for t in texts) == "I cannot tell." and texts.count("I cannot tell.") == 0
    # tool_choice "none": no tools in the prompt, and a JSON reply stays text
    plain = llm.tokenizer.encode_chat(ASK)
    script.say(len(plain), llm.tokenizer.encode(CALL, bos=False) + [EOT])
    out = post(client, messages=ASK, tools=[WEATHER], tool_choice="none")
    assert out["usage"]["prompt_tokens"] == len(plain)
    assert out["choices"][0]["message"]["content"] == CALL and out["choices"][0]["finish_reason"] == "stop"
    r = client.post("/v1/chat/completions", json={"messages": ASK, "tools": [WEATHER], "tool_choice": "required"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice"


def test_tool_choice_auto_needs_tools(setup):
    """As OpenAI and vLLM: tool_choice "auto" without tools is a 400 naming it ("none" is harmless)."""
    llm, script, client = setup
    r = client.post("/v1/chat/completions", json={"messages": ASK, "tool_choice": "auto", "max_tokens": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice"
    assert '"auto"' in r.json()["error"]["message"]
    r = client.post("/v1/chat/completions", json={"messages": ASK, "tool_choice": "none", "max_tokens": 1})
    assert r.status_code == 200


def test_a_call_to_an_undeclared_function_is_text(setup):
    """OpenAI's tool_calls only name functions the request declared (a client could not run another):
    a reply calling anything else comes back as content, whole and streamed."""
    llm, script, client = setup
    ids = llm.tokenizer.encode_chat(ASK, tools=[WEATHER])
    other = '{"name": "launch_rockets", "parameters": {}}; ' + CALL
    script.say(len(ids), llm.tokenizer.encode(other, bos=False) + [EOM])
    choice = post(client, messages=ASK, tools=[WEATHER], max_tokens=200)["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": other} and choice["finish_reason"] == "stop"
    with client.stream("POST", "/v1/chat/completions", json={
            "model": "tiny", "messages": ASK, "tools": [WEATHER], "stream": True, "temperature": 0}) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == other
    assert not any("tool_calls" in c["choices"][0]["delta"] for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_streamed_tool_call_keeps_logprobs(setup):
    """The tokens held back while a reply may be a call carry their logprobs on the tool_calls chunk,
    as the whole response has them; the stop id that ended the reply comes last (in the last chunk)."""
    llm, script, client = setup
    ids = llm.tokenizer.encode_chat(ASK, tools=[WEATHER])
    reply = llm.tokenizer.encode(CALL, bos=False)
    script.say(len(ids), reply + [EOM])
    whole = post(client, messages=ASK, tools=[WEATHER], logprobs=True)["choices"][0]
    assert whole["finish_reason"] == "tool_calls" and len(whole["logprobs"]["content"]) == len(reply) + 1
    assert "".join(e["token"] for e in whole["logprobs"]["content"]) == CALL + "<|eom_id|>"
    assert whole["logprobs"]["content"][-1]["bytes"] == list(b"<|eom_id|>")
    with client.stream("POST", "/v1/chat/completions", json={
            "model": "tiny", "messages": ASK, "tools": [WEATHER], "stream": True, "temperature": 0,
            "logprobs": True}) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    streamed = [e for c in chunks if c["choices"][0]["logprobs"] for e in c["choices"][0]["logprobs"]["content"]]
    assert streamed == whole["logprobs"]["content"]


def test_parallel_tool_calls(setup):
    """Llama 3.1 calls one function per reply as a rule; a reply holding several calls (";" between
    them) gives several tool_calls, and parallel_tool_calls false keeps the first, as vLLM does. The
    field was read and ignored, whatever its value (and on /v1/completions, which has no tools)."""
    llm, script, client = setup
    ids = llm.tokenizer.encode_chat(ASK, tools=[WEATHER])
    rome = CALL.replace("Paris", "Rome")
    script.say(len(ids), llm.tokenizer.encode(f"{CALL}; {rome}", bos=False) + [EOM])
    for parallel, cities in ((None, ["Paris", "Rome"]), (True, ["Paris", "Rome"]), (False, ["Paris"])):
        body = {"messages": ASK, "tools": [WEATHER], "max_tokens": 200, "temperature": 0,
                "parallel_tool_calls": parallel}
        calls = post(client, **body)["choices"][0]["message"]["tool_calls"]
        assert [json.loads(c["function"]["arguments"])["city"] for c in calls] == cities, parallel
        with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
            chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
        (streamed,) = [d["tool_calls"] for d in (c["choices"][0]["delta"] for c in chunks) if "tool_calls" in d]
        assert [c["index"] for c in streamed] == list(range(len(cities)))
    r = client.post("/v1/chat/completions", json={"messages": ASK, "tools": [WEATHER], "parallel_tool_calls": "no"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "parallel_tool_calls"
    assert r.json()["error"]["message"] == 'parallel_tool_calls must be true or false, got "no"'
    r = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1, "parallel_tool_calls": False})
    assert r.status_code == 400 and r.json()["error"]["param"] == "parallel_tool_calls"
    assert r.json()["error"]["message"] == "unknown field 'parallel_tool_calls'"


def test_parallel_tool_calls_false_lists_the_logprobs_of_the_kept_call(setup):
    """parallel_tool_calls false returns the first of several calls, so the logprobs stop with it: the
    entries of the tokens up to the one whose text completes that call, neither the dropped calls' nor
    the stop id after them (usage.completion_tokens still counts every token generated), whole and
    streamed. Where that token's text holds more than the call (here: a stop string that the call's end
    may begin holds "}}" back until ";" comes), the entries run up to it: the tokens whose text makes up
    the call, as the server released it."""
    llm, script, client = setup
    ids = llm.tokenizer.encode_chat(ASK, tools=[WEATHER])
    rome = CALL.replace("Paris", "Rome")
    first = [PYTHON_TAG] + llm.tokenizer.encode(" " + CALL, bos=False)
    reply = [PYTHON_TAG] + llm.tokenizer.encode(f" {CALL}; {rome}", bos=False)
    assert reply[:len(first)] == first and llm.tokenizer.decode(reply[len(first):len(first) + 1]) == ";"
    script.say(len(ids), reply + [EOM])
    body = {"messages": ASK, "tools": [WEATHER], "max_tokens": 200, "temperature": 0, "logprobs": True,
            "top_logprobs": 2}
    every = post(client, **body)["choices"][0]["logprobs"]["content"]  # parallel: both calls, then <|eom_id|>
    assert len(every) == len(reply) + 1 and every[-1]["token"] == "<|eom_id|>"
    for stop, kept in ((None, len(first)), (["}}}"], len(first) + 1)):
        out = post(client, **body, parallel_tool_calls=False, stop=stop)
        choice = out["choices"][0]
        assert choice["finish_reason"] == "tool_calls" and len(choice["message"]["tool_calls"]) == 1
        assert json.loads(choice["message"]["tool_calls"][0]["function"]["arguments"]) == {"city": "Paris"}
        content = choice["logprobs"]["content"]
        assert content == every[:kept], stop
        assert "".join(e["token"] for e in content) == "<|python_tag|> " + CALL + ";" * (kept - len(first))
        assert out["usage"]["completion_tokens"] == len(reply) + 1
        with client.stream("POST", "/v1/chat/completions", json={**body, "parallel_tool_calls": False, "stop": stop,
                                                                 "stream": True}) as r:
            chunks = [json.loads(line[6:])["choices"][0] for line in r.iter_lines() if line.startswith("data: {")]
        assert [e for c in chunks if c["logprobs"] for e in c["logprobs"]["content"]] == content
        assert chunks[-1]["finish_reason"] == "tool_calls" and chunks[-1]["logprobs"] is None
