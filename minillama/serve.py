"""An OpenAI-compatible HTTP server over the continuous-batching scheduler.

    python -m minillama.serve                       # the bundled demo model, on the CPU too
    python -m minillama.serve --model meta-llama/Llama-3.1-8B-Instruct --max-batch 64 --port 8000

Endpoints: ``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /v1/models``,
``GET /health`` (status plus the scheduler's counters, the prefix-cache hit rate among them),
``GET /metrics`` (vLLM's Prometheus metrics, named ``minillama:...``: :mod:`minillama.metrics`), and
vLLM's ``POST /tokenize``, ``POST /detokenize``, ``GET /tokenizer_info``.
With an API key (``--api-key`` or ``MINILLAMA_API_KEY``), every route but ``/health`` and ``/metrics``
needs the header ``Authorization: Bearer <key>``.
Requests are checked by :mod:`minillama.openai_protocol`; errors answer in OpenAI's error JSON
(400 naming the field, 401 missing or wrong API key, 404 unknown model, 413 body too large, 429
queue full, 504 timeout). Each choice of a request is one scheduler request; a client that
disconnects cancels them. Streaming is server-sent events (``data: {chunk}`` lines, then
``data: [DONE]``). On SIGTERM or Ctrl-C new requests get a 503 while those in flight have
``--shutdown-timeout`` seconds to finish; the rest are cancelled (a 503, or an error chunk).

With ``tools`` (and ``tool_choice`` "auto"), messages go through the chat template's tools branch
and a reply that is a Llama 3.1 tool call (JSON, maybe after ``<|python_tag|>``, ended by a stop
id) of declared functions comes back as ``tool_calls`` with finish_reason "tool_calls" (a call to
a function the request did not declare stays text, as OpenAI never returns one). A reply holding
several calls gives several, or the first with ``parallel_tool_calls: false`` (and the logprobs of
its tokens only). When streaming, text that may still become a tool call is held back until it is decided.

Needs the ``serve`` extra: ``pip install -e '.[serve]'`` (FastAPI and uvicorn).
"""
import argparse
import asyncio
import bisect
import contextlib
import dataclasses
import hashlib
import hmac
import json
import os
import signal
import socket
import sys
import time
from functools import partial
from itertools import accumulate
from typing import AsyncIterator, Callable, List, Optional, Tuple

from minillama import cli
from minillama import openai_protocol as proto
from minillama.chat_format import named_templates
from minillama.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE, RequestTimer, ServerMetrics
from minillama.openai_protocol import APIError
from minillama.scheduler import Failed, Finished, PromptLogprobs, QueueFull, Request, Token
from minillama.tool_calls import ToolCall, could_be_tool_call, locate_tool_calls


SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy may hold chunks back
ERROR_HEADERS = {401: {"WWW-Authenticate": "Bearer"}, 429: {"Retry-After": "1"}}
API_KEY_ENV = "MINILLAMA_API_KEY"  # the API key when --api-key is not given (as vLLM reads VLLM_API_KEY)
SHUTDOWN_GRACE = 5  # seconds the answers of the requests cancelled at shutdown get, at most


class _Submission:
    """The scheduler requests of one HTTP request (one per choice), their events in one asyncio queue,
    each measured by ``timer`` on its way in; ``param`` is the field a request the scheduler refuses is
    blamed on (its prompt)."""

    def __init__(self, scheduler, requests: List[Request], param: str, timer: RequestTimer):
        self.scheduler = scheduler
        self.timer = timer
        self.queue: asyncio.Queue = asyncio.Queue()
        self.ids: List[int] = []
        self.open = len(requests)
        self.loop = asyncio.get_running_loop()
        # with the app's lifespan, the scheduler hands events over on this loop; without it (the
        # app run by a server that skips lifespans), each event crosses threads on its own
        put = self._put if scheduler.deliver is not None else self._put_threadsafe
        try:
            for i, r in enumerate(requests):
                self.ids.append(scheduler.submit(r, partial(put, i)))
        except QueueFull as e:
            self.cancel()
            raise APIError(429, f"the server is busy: {e}", type="rate_limit_error", code="queue_full") from None
        except ValueError as e:
            self.cancel()
            raise APIError(400, str(e), param=param) from None

    def _put(self, index: int, event) -> None:  # called on the event loop (the scheduler's deliver hook)
        self.timer.record(index, event)  # also the events that come after the handler stopped reading
        self.queue.put_nowait((index, event))

    def _put_threadsafe(self, index: int, event) -> None:  # called from the scheduler thread
        self.loop.call_soon_threadsafe(self._put, index, event)

    def cancel(self) -> None:
        for rid in self.ids:
            self.scheduler.cancel(rid)

    async def events(self, deadline: float) -> AsyncIterator[Tuple[int, object]]:
        """(choice index, event) until every choice has finished; APIError 504 past ``deadline``."""
        while self.open:
            remaining = deadline - time.monotonic()
            try:
                index, event = await asyncio.wait_for(self.queue.get(), timeout=max(remaining, 0.0))
            except asyncio.TimeoutError:
                self.cancel()
                raise APIError(504, "the request ran out of time (--request-timeout)", type="timeout") from None
            if isinstance(event, Failed):
                self.cancel()
                raise APIError(500, f"generation failed: {event.message}", type="server_error")
            if isinstance(event, Finished):
                self.open -= 1
                if event.finish_reason == "cancelled":
                    raise APIError(503, "the request was cancelled (the server is shutting down)",
                                   type="server_error")
            yield index, event


def _run_callbacks(batch) -> None:
    for callback, event in batch:
        callback(event)


class _Choice:
    """What one choice has produced so far; with tools, the text held back while it may be a tool call."""

    def __init__(self, tool_names: Optional[set], parallel_tool_calls: bool = True):
        self.tool_names = tool_names  # the declared functions; None: no tools, nothing held
        self.parallel_tool_calls = parallel_tool_calls
        self.text: List[str] = []
        self.tokens: List[Token] = []
        self.prompt_tokens: List[Token] = []  # an echo's first choice, with logprobs: the prompt's from its second on
        self.held: Optional[List[str]] = [] if tool_names is not None else None  # None: nothing held
        self.held_tokens: List[Token] = []
        self.finished: Optional[Finished] = None
        self.tool_calls: Optional[List[ToolCall]] = None
        self.calls_dropped = False  # parallel_tool_calls false kept the first of several calls

    def add(self, event) -> Tuple[str, List[Token]]:
        """Take one event; return the text and tokens that may be shown now."""
        if isinstance(event, PromptLogprobs):  # shown with the echoed prompt
            self.prompt_tokens.extend(event.tokens)
            return "", []
        if isinstance(event, Token):
            self.tokens.append(event)
            text, tokens = event.text, [event]
        else:
            self.finished = event
            text, tokens = event.text, []
        self.text.append(text)
        if self.held is None:
            return text, tokens
        self.held.append(text)
        self.held_tokens.extend(tokens)
        whole = "".join(self.held)
        if isinstance(event, Finished):
            if event.finish_reason == "stop" and isinstance(event.stop, int):
                self.tool_calls = self._tool_calls(whole)
            if self.tool_calls:  # the held tokens go out with the tool_calls delta (their logprobs)
                tokens, self.held_tokens = self.held_tokens, []
                return "", tokens
        elif could_be_tool_call(whole):
            return "", []
        tokens, self.held, self.held_tokens = self.held_tokens, None, []
        return whole, tokens

    def _tool_calls(self, reply: str) -> Optional[List[ToolCall]]:
        """The calls the whole ``reply`` makes (None: it is not calls). With ``parallel_tool_calls``
        false, the first of several (as vLLM), and the tokens shown (their logprobs) cut to what is
        returned: up to the token whose released text completes that call; neither the dropped calls'
        tokens nor the stop id after them (``usage.completion_tokens`` still counts every token made).
        That last token's text may hold more than the call: a token spanning its end ("};"), or, when
        a stop string that the call's end may begin held that end back, all the text released once
        the hold was decided (";" releasing "}};"). So the tokens listed are never fewer than those
        whose text makes up the call, as the server released it, and end where that release did."""
        located = locate_tool_calls(reply, self.tool_names)
        if located is None:
            return None
        if self.parallel_tool_calls or len(located) == 1:
            return [call for call, _ in located]
        call, end = located[0]
        released = list(accumulate(len(t.text) for t in self.tokens))  # the reply's text up to each token
        kept = bisect.bisect_left(released, end) + 1  # the token that released the call's last character
        del self.tokens[kept:], self.held_tokens[kept:]  # held from the start: the same tokens
        self.calls_dropped = True
        return [call]

    @property
    def finish_reason(self) -> str:
        return "tool_calls" if self.tool_calls else self.finished.finish_reason

    @property
    def stop_tokens(self) -> List[Token]:
        """The stop id that ended the choice, with its logprob: the last entry of the logprobs, chat's and
        completions' (as vLLM's, whose outputs hold the id; ``usage.completion_tokens`` counts it too).
        None listed after dropped tool calls: the reply returned ends with the first call, not with the id."""
        stop = self.finished.stop_token
        return [] if stop is None or self.calls_dropped else [stop]


def create_app(llm, scheduler, model_name: str, max_body_bytes: int = 8 << 20, request_timeout: float = 600.0,
               api_key: Optional[str] = None):
    """The FastAPI app serving ``llm`` through ``scheduler`` under the name ``model_name``; with
    ``api_key``, the /v1 routes answer only requests with the header ``Authorization: Bearer <api_key>``."""
    from fastapi import APIRouter, Depends, FastAPI, Request as HTTPRequest
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from starlette.exceptions import HTTPException

    @contextlib.asynccontextmanager
    async def lifespan(app):
        loop = asyncio.get_running_loop()

        def deliver(batch):  # one wake-up of the event loop per scheduler iteration, not per token
            loop.call_soon_threadsafe(_run_callbacks, batch)

        scheduler.deliver = deliver
        try:
            yield
        except asyncio.CancelledError:  # uvicorn skips the lifespan's end on a forced exit (a second Ctrl-C)
            pass  # and cancels it as the loop closes: also an end, not an error to log with a traceback

    app = FastAPI(title="minillama", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    created = proto.now()
    tokenizer = llm.tokenizer
    metrics = ServerMetrics(scheduler.max_seq_len)

    def error(e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=ERROR_HEADERS.get(e.status))

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return error(e)

    @app.exception_handler(HTTPException)
    async def _http_error(request, e: HTTPException):
        path = request.url.path
        if path == "/v1" or path.startswith("/v1/"):  # no path or method under /v1 answers before the key, as vLLM's
            try:
                await authorize(request)
            except APIError as denied:
                return error(denied)
        return error(APIError(e.status_code, str(e.detail), type="invalid_request_error"))

    @app.exception_handler(Exception)
    async def _internal_error(request, e: Exception):
        return error(APIError(500, f"internal error: {type(e).__name__}: {e}", type="server_error"))

    key_digest = None if api_key is None else hashlib.sha256(api_key.encode()).digest()

    async def authorize(request: HTTPRequest) -> None:
        """401 for a request without the API key (OpenAI's type and codes; no key is ever echoed)."""
        if key_digest is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given:
            raise APIError(401, "no API key given: send it in the header 'Authorization: Bearer <key>'")
        # digests of equal length, compared in constant time: the time taken tells nothing of the key
        if not hmac.compare_digest(hashlib.sha256(given.encode()).digest(), key_digest):
            raise APIError(401, "incorrect API key provided", code="invalid_api_key")

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(authorize)])

    async def read_json(request: HTTPRequest):
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > max_body_bytes:
            raise APIError(413, f"the request body has {length} bytes, more than the limit of {max_body_bytes}")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_body_bytes:
                raise APIError(413, f"the request body is larger than the limit of {max_body_bytes} bytes")
            chunks.append(chunk)
        try:
            return json.loads(b"".join(chunks))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON: {e}") from None
        except ValueError as e:  # an integer literal longer than Python reads
            raise APIError(400, f"the request body holds a number too long to read: {str(e).split(';')[0]}") from None
        except RecursionError:
            raise APIError(400, "the request body nests JSON too deeply") from None

    live = set()  # the submissions in flight: a shutdown waits for them, then cancels them
    app.state.draining = False

    async def drain(timeout: float, force: Callable[[], bool]) -> int:
        """Begin a shutdown: refuse new requests (503), let those in flight run for up to ``timeout``
        seconds (less once ``force()``), then cancel the rest and wait for their answers: 503, or,
        streaming, an error chunk and ``[DONE]``. Returns how many were cancelled."""
        app.state.draining = True
        deadline = time.monotonic() + timeout
        while live and time.monotonic() < deadline and not force():
            await asyncio.sleep(0.05)
        cancelled = len(live)
        for submission in live:
            submission.cancel()
        deadline = time.monotonic() + SHUTDOWN_GRACE
        while live and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return cancelled

    app.state.drain = drain

    def submit(parsed, prompt_ids: List[List[int]], param: str, arrival: float) -> _Submission:
        """Submit the request that arrived at ``arrival`` (``time.monotonic()``)."""
        if app.state.draining:
            raise APIError(503, "the server is shutting down; send the request to another one", type="server_error")
        requests = engine_requests(parsed, prompt_ids, param)
        submission = _Submission(scheduler, requests, param, RequestTimer(metrics, arrival, len(requests)))
        live.add(submission)
        return submission

    def check_model(model) -> None:
        """404 for a request that names another model than this server's (None: names none)."""
        if model is not None and model != model_name:
            raise APIError(404, f"the model {model!r} does not exist; this server serves {model_name!r}",
                           param="model", code="model_not_found")

    def engine_requests(parsed, prompt_ids: List[List[int]], param: str) -> List[Request]:
        try:
            parsed.sampling.check_vocabulary(tokenizer.vocab_size)
        except ValueError as e:
            raise APIError(400, str(e), param="logit_bias") from None
        outside = [t for t in parsed.stop_token_ids if t >= tokenizer.vocab_size]
        if outside:
            raise APIError(400, f"stop_token_ids has token id(s) {outside[:5]} outside the vocabulary "
                                f"[0, {tokenizer.vocab_size}); give ids of this model's tokenizer (POST /tokenize)",
                           param="stop_token_ids")
        out = []
        for ids in prompt_ids:
            room = scheduler.max_seq_len - len(ids)
            if room < (0 if parsed.max_tokens == 0 else 1):  # max_tokens 0: an echo that generates nothing
                raise APIError(400, f"the prompt has {len(ids)} tokens; this server holds at most "
                                    f"{scheduler.max_seq_len} tokens per request (prompt + output)",
                               param=param, code="context_length_exceeded")
            max_tokens = parsed.max_tokens if parsed.max_tokens is not None else room
            if max_tokens > room:
                raise APIError(400, f"the prompt has {len(ids)} tokens and max_tokens is {max_tokens}: "
                                    f"{len(ids) + max_tokens} tokens, more than the {scheduler.max_seq_len} this "
                                    f"server holds per request; ask for at most {room}",
                               param="max_tokens", code="context_length_exceeded")
            if parsed.sampling.min_tokens > max_tokens:  # max_tokens not given: the room the prompt leaves
                raise APIError(400, f"the prompt has {len(ids)} tokens and min_tokens is {parsed.sampling.min_tokens}: "
                                    f"more than the {room} tokens this server can add to it (it holds "
                                    f"{scheduler.max_seq_len} per request); ask for at most {room}",
                               param="min_tokens", code="context_length_exceeded")
            for k in range(parsed.n):
                sampling = parsed.sampling
                if k and sampling.seed is not None:  # choice k: the same request with seed + k
                    seed = sampling.seed + k
                    sampling = dataclasses.replace(sampling, seed=seed if seed < 2 ** 64 else seed - 2 ** 64)
                # an echo's prompt logprobs are the same for every choice: the first scores the prompt, the
                # others only prefill it (and may take a cached prefix); each choice echoes the first's
                out.append(Request(ids, max_tokens, sampling, stop=parsed.stop, stop_ids=parsed.stop_token_ids,
                                   logprobs=parsed.logprobs,
                                   prompt_logprobs=parsed.echo and parsed.logprobs is not None and k == 0,
                                   skip_special_tokens=parsed.skip_special_tokens))
        return out

    async def watch_disconnect(request: HTTPRequest, submission: _Submission) -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                submission.cancel()
                return

    async def collect(request: HTTPRequest, submission: _Submission, choices: List[_Choice]) -> None:
        watcher = asyncio.ensure_future(watch_disconnect(request, submission))
        try:
            async for index, event in submission.events(time.monotonic() + request_timeout):
                choices[index].add(event)
        finally:
            watcher.cancel()
            submission.cancel()
            live.discard(submission)

    def sse(obj) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    async def stream(submission: _Submission, choices: List[_Choice], chunk, final_usage) -> AsyncIterator[str]:
        """SSE lines: ``chunk(index, text, tokens, choice_or_None)`` builds each; usage at the end if asked."""
        try:
            for i in range(len(choices)):
                first = chunk(i, None, [], None)
                if first is not None:
                    yield sse(first)
            async for index, event in submission.events(time.monotonic() + request_timeout):
                choice = choices[index]
                text, tokens = choice.add(event)
                if text or (tokens and tokens[0].logprob is not None) or choice.tool_calls:
                    yield sse(chunk(index, text, tokens, None))
                if choice.finished is not None:
                    yield sse(chunk(index, "", [], choice))
            if final_usage is not None:
                yield sse(final_usage(choices))
        except APIError as e:
            yield sse(e.body())
        finally:
            submission.cancel()
            live.discard(submission)
        yield "data: [DONE]\n\n"

    def total_usage(choices: List[_Choice], n: int) -> dict:
        done = [c.finished for c in choices]
        prompt = sum(f.prompt_tokens for f in done[::n])  # each prompt counted once
        cached = sum(f.cached_tokens for f in done[::n])
        return proto.usage(prompt, sum(f.completion_tokens for f in done), cached)

    @app.get("/health")
    async def health():
        draining = app.state.draining
        body = {"status": "shutting down" if draining else "ok", "model": model_name, **scheduler.stats()}
        return JSONResponse(body, status_code=503 if draining else 200)

    @app.get("/metrics")  # open, as /health and vLLM's /metrics: Prometheus scrapes without a key
    async def prometheus_metrics():
        text = metrics.render(model_name, scheduler.stats(), scheduler.max_batch)
        return Response(text, media_type=METRICS_CONTENT_TYPE)

    # vLLM's tokenizer endpoints (at the root, as vLLM's; behind the API key when one is set), which
    # lm-evaluation-harness uses in place of a Hugging Face tokenizer when the server has them
    @app.post("/tokenize", dependencies=[Depends(authorize)])
    async def tokenize(request: HTTPRequest):
        body = await read_json(request)
        kind, value, flag = proto.parse_tokenize(body)
        check_model(body.get("model"))
        try:
            if kind == "messages":
                ids = tokenizer.encode_chat(value, add_generation_prompt=flag)
            else:
                ids = tokenizer.encode(value, bos=flag and tokenizer.add_bos)
        except (ValueError, TypeError) as e:
            raise APIError(400, str(e), param=kind) from None
        return {"count": len(ids), "max_model_len": scheduler.max_seq_len, "tokens": ids, "token_strs": None}

    @app.post("/detokenize", dependencies=[Depends(authorize)])
    async def detokenize(request: HTTPRequest):
        body = await read_json(request)
        ids = proto.parse_detokenize(body)
        check_model(body.get("model"))
        try:
            return {"prompt": tokenizer.decode(ids)}
        except ValueError as e:  # an id outside the vocabulary
            raise APIError(400, str(e), param="tokens") from None

    @app.get("/tokenizer_info", dependencies=[Depends(authorize)])
    async def tokenizer_info():
        def token(i: Optional[int]) -> Optional[str]:
            return None if i is None else tokenizer.decode([i])

        template = named_templates(tokenizer.chat_template).get("default") if tokenizer.chat_template else None
        return {"tokenizer_class": type(tokenizer).__name__, "bos_token": token(tokenizer.bos_id),
                "eos_token": token(tokenizer.eos_id), "pad_token": None, "add_bos_token": tokenizer.add_bos,
                "chat_template": template, "model_max_length": scheduler.max_seq_len}

    @v1.get("/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "minillama", "max_model_len": scheduler.max_seq_len}]}

    @v1.post("/chat/completions")
    async def chat_completions(request: HTTPRequest):
        arrival = time.monotonic()
        parsed = proto.parse_chat(await read_json(request))
        check_model(parsed.model)
        if not tokenizer.chat_template:
            raise APIError(400, "this model has no chat template (a base model); use /v1/completions",
                           param="messages")
        try:
            ids = tokenizer.encode_chat(parsed.prompts[0], add_generation_prompt=parsed.add_generation_prompt,
                                        tools=parsed.tools, continue_final_message=parsed.continue_final_message)
        except (ValueError, TypeError) as e:  # about the tools: "tools..." or "... does not render tools"
            param = "tools" if str(e).startswith("tools") or str(e).endswith("no tools branch") else "messages"
            if str(e).startswith("continue_final_message"):
                param = "continue_final_message"
            raise APIError(400, str(e), param=param) from None
        submission = submit(parsed, [ids], "messages", arrival)
        names = None if parsed.tools is None else {t["function"]["name"] for t in parsed.tools}
        choices = [_Choice(names, parsed.parallel_tool_calls) for _ in range(parsed.n)]
        rid, when = proto.new_id("chatcmpl"), proto.now()
        head = {"id": rid, "created": when, "model": model_name, "system_fingerprint": None}

        if not parsed.stream:
            await collect(request, submission, choices)
            out = []
            for i, c in enumerate(choices):
                message = {"role": "assistant", "content": None if c.tool_calls else "".join(c.text)}
                if c.tool_calls:
                    message["tool_calls"] = proto.tool_calls_json(c.tool_calls)
                out.append({"index": i, "message": message, "finish_reason": c.finish_reason,
                            "logprobs": proto.chat_logprobs(tokenizer, c.tokens + c.stop_tokens)})
            return {**head, "object": "chat.completion", "choices": out, "usage": total_usage(choices, parsed.n)}

        def chunk(index, text, tokens, done):
            if text is None:
                delta = {"role": "assistant", "content": ""}
            elif done is not None:
                delta, tokens = {}, tokens + done.stop_tokens
            elif choices[index].tool_calls and not text:
                delta = {"tool_calls": proto.tool_calls_json(choices[index].tool_calls, stream=True)}
            else:
                delta = {"content": text}
            body = {**head, "object": "chat.completion.chunk",
                    "choices": [{"index": index, "delta": delta, "logprobs": proto.chat_logprobs(tokenizer, tokens),
                                 "finish_reason": done.finish_reason if done is not None else None}]}
            if parsed.include_usage:
                body["usage"] = None
            return body

        def final_usage(choices):
            return {**head, "object": "chat.completion.chunk", "choices": [], "usage": total_usage(choices, parsed.n)}

        return StreamingResponse(stream(submission, choices, chunk, final_usage if parsed.include_usage else None),
                                 media_type="text/event-stream", headers=SSE_HEADERS)

    @v1.post("/completions")
    async def completions(request: HTTPRequest):
        arrival = time.monotonic()
        parsed = proto.parse_completion(await read_json(request))
        check_model(parsed.model)
        try:
            ids = [tokenizer.encode(p, bos=tokenizer.add_bos) if isinstance(p, str) else p for p in parsed.prompts]
        except ValueError as e:  # e.g. a lone surrogate: not text
            raise APIError(400, str(e), param="prompt") from None
        submission = submit(parsed, ids, "prompt", arrival)
        choices = [_Choice(None) for _ in range(len(ids) * parsed.n)]
        rid, when = proto.new_id("cmpl"), proto.now()
        head = {"id": rid, "created": when, "model": model_name, "system_fingerprint": None}

        def logprobs_of(tokens: List[Token], offset: int) -> Optional[dict]:
            return proto.completion_logprobs(tokenizer, tokens, offset) if parsed.logprobs is not None else None

        def echoed(index: int, text: str, tokens: List[Token]) -> Tuple[str, List[Token]]:
            """Choice ``index``'s prompt before ``text`` and ``tokens``: its text (as given, or its ids'),
            and its tokens, the first without a logprob (nothing predicts it), the others with those the
            prompt's first choice got. It has them all before any other choice of the prompt has a token:
            the scheduler prefills the oldest request first and sends a step's prompt logprobs before
            its tokens, and a request's before its first token."""
            prompt, prompt_ids = parsed.prompts[index // parsed.n], ids[index // parsed.n]
            prompt_text = prompt if isinstance(prompt, str) else tokenizer.decode(prompt)
            scorer = choices[index - index % parsed.n]
            assert scorer.tokens or scorer.finished is not None, "a choice overtook its prompt's scoring"
            return prompt_text + text, [Token(prompt_ids[0], "")] + scorer.prompt_tokens + tokens

        if not parsed.stream:
            await collect(request, submission, choices)
            out = []
            for i, c in enumerate(choices):
                text, tokens = "".join(c.text), c.tokens + c.stop_tokens
                if parsed.echo:
                    text, tokens = echoed(i, text, tokens)
                out.append({"index": i, "text": text, "finish_reason": c.finish_reason,
                            "logprobs": logprobs_of(tokens, 0)})
            return {**head, "object": "text_completion", "choices": out, "usage": total_usage(choices, parsed.n)}

        offsets = [0] * len(choices)
        unechoed = set(range(len(choices))) if parsed.echo else set()

        def chunk(index, text, tokens, done):
            if text is None:
                return None  # completions have no opening chunk
            if index in unechoed:  # the prompt first, in the choice's first chunk (as vLLM's)
                unechoed.discard(index)
                text, tokens = echoed(index, text, tokens)
            if done is not None:
                tokens = tokens + done.stop_tokens
            logprobs = logprobs_of(tokens, offsets[index])
            if logprobs is not None:  # offsets count the tokens' text, as in the whole response: ``text``
                # lags behind the tokens while it is held back (a possible stop string, a partial character)
                offsets[index] = logprobs["text_offset"][-1] + len(logprobs["tokens"][-1])
            body = {**head, "object": "text_completion",
                    "choices": [{"index": index, "text": text, "logprobs": logprobs,
                                 "finish_reason": done.finish_reason if done is not None else None}]}
            if parsed.include_usage:
                body["usage"] = None
            return body

        def final_usage(choices):
            return {**head, "object": "text_completion", "choices": [], "usage": total_usage(choices, parsed.n)}

        return StreamingResponse(stream(submission, choices, chunk, final_usage if parsed.include_usage else None),
                                 media_type="text/event-stream", headers=SSE_HEADERS)

    app.include_router(v1)
    return app


def parse_args(argv=None) -> argparse.Namespace:
    from minillama.hub import DEMO_MODEL_DIR

    p = cli.ArgumentParser(prog="python -m minillama.serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(DEMO_MODEL_DIR),
                   help="local checkpoint folder or hub repo id (default: the bundled demo model)")
    p.add_argument("--served-model-name", default=None,
                   help="the name clients pass as 'model' (default: the folder's name or the repo id)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="0: a free port (the startup line names it)")
    p.add_argument("--max-batch", type=int, default=16,
                   help="cache rows: requests decoding at once (CUDA graphs come in buckets of 1, 2, 4, ..., 64, "
                        "then multiples of 64: the pool is allocated up to the next one)")
    p.add_argument("--max-queue", type=int, default=256, help="requests waiting for a row at most (then 429)")
    p.add_argument("--max-seq-len", type=int, default=None,
                   help="tokens per request, prompt + output (default: the model's context, at most 8192)")
    p.add_argument("--prefill-chunk", type=int, default=512,
                   help="prompt tokens prefilled per step at most, over all requests")
    p.add_argument("--max-body-bytes", type=int, default=8 << 20, help="largest request body")
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds a request may take")
    p.add_argument("--shutdown-timeout", type=float, default=25.0,
                   help="on SIGTERM or Ctrl-C, seconds the requests in flight may take to finish (new ones get "
                        "503) before they are cancelled; a second Ctrl-C cancels them at once (default: 25, within "
                        "the 30 s that Kubernetes gives before SIGKILL; under --tp, torch's launcher is told to "
                        f"wait this plus {SHUTDOWN_GRACE} s before it kills the processes)")
    p.add_argument("--api-key", default=None,
                   help=f"/v1 answers only requests with the header 'Authorization: Bearer KEY' (default: "
                        f"${API_KEY_ENV}, safer than a flag that process listings show; neither: open to all)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", default=None, choices=("float32", "float16", "bfloat16"),
                   help="default: the checkpoint's on the GPU, float32 on the CPU")
    p.add_argument("--tp", type=int, default=None,
                   help="tensor-parallel degree: N processes (one per GPU) through torch's launcher; rank 0 "
                        "serves HTTP and schedules, the others follow its steps")
    cli.add_quantize_arguments(p)
    p.add_argument("--backend", default="auto", choices=("auto", "triton", "torch"),
                   help="the kernels that run the model (default: Triton on CUDA, torch elsewhere)")
    p.add_argument("--log-level", default="warning", choices=("critical", "error", "warning", "info", "debug", "trace"),
                   help="uvicorn's log level")
    args = p.parse_args(argv)
    cli.check_quantize_arguments(p, args)
    if not 0 <= args.port <= 65535:
        p.error(f"--port must be in [0, 65535], got {args.port}")
    for name in ("max_batch", "prefill_chunk", "max_body_bytes"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.max_queue < 0:
        p.error(f"--max-queue must be >= 0, got {args.max_queue}")
    if not args.request_timeout > 0:  # also NaN, which timed every request out at once
        p.error(f"--request-timeout must be > 0 seconds, got {args.request_timeout}")
    if not args.shutdown_timeout >= 0:  # also NaN
        p.error(f"--shutdown-timeout must be >= 0 seconds, got {args.shutdown_timeout}")
    if args.max_seq_len is not None and args.max_seq_len < 2:  # 0 was taken as "not given"
        p.error(f"--max-seq-len must be >= 2 (a prompt token and an output token), got {args.max_seq_len}")
    if args.served_model_name is not None and not args.served_model_name.strip():  # was taken as "not given"
        p.error(f"--served-model-name must not be empty, got {args.served_model_name!r}")
    if args.tp is not None and args.tp < 1:
        p.error(f"--tp must be >= 1, got {args.tp}")
    where = "--api-key"
    if args.api_key is None and API_KEY_ENV in os.environ:
        args.api_key, where = os.environ[API_KEY_ENV], API_KEY_ENV
    key = args.api_key  # never echoed
    if key is not None and not (key and key == key.strip() and key.isascii() and key.isprintable()):
        p.error(f"{where} must be printable ASCII, not empty and without spaces at its ends (clients send it "
                "in an HTTP header)")
    return args


def _server_class(app, shutdown_timeout: float):
    import uvicorn

    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None) -> None:
            # uvicorn's shutdown stops listening, then waits for the connections to close: the app drains
            # first, so that new requests get a 503 rather than a refused connection
            cancelled = await app.state.drain(shutdown_timeout, lambda: self.force_exit)  # a second Ctrl-C
            if cancelled:
                cli.note(f"(shutting down: cancelled {cancelled} request(s) still running)")
            await super().shutdown(sockets=sockets)

    return Server


def _listen(host: str, port: int) -> socket.socket:
    """A socket bound to ``host``:``port`` (not yet listening): taken before the model loads, so that a
    host that does not resolve or a port in use is an error at once, not after a long load."""
    try:
        family, kind, proto_, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                              flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as e:
        raise cli.CommandError(f"--host {host!r} does not resolve: {e.strerror}") from None
    sock = socket.socket(family, kind, proto_)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart need not wait out TIME_WAIT
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise cli.CommandError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def main(argv=None) -> int:
    """Exit status: 0 after a clean shutdown (Ctrl-C or SIGTERM while serving: requests in flight
    get --shutdown-timeout seconds to finish, then are cancelled), 2 after a one-line error (a bad
    flag, a port in use, a missing model or extra, a cache pool that does not fit, ...), 130 on
    Ctrl-C while loading (see ``minillama/cli.py``). Under --tp the launcher's status: 128 + the
    signal that stopped it."""
    return cli.run(_main, argv)


def _main(argv) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    try:
        import uvicorn
    except ImportError:
        raise cli.CommandError("the server needs FastAPI and uvicorn: pip install -e '.[serve]'") from None
    from pathlib import Path

    from minillama import Llama
    from minillama.parallel import is_follower, launched_by_torchrun
    from minillama.scheduler import Scheduler

    if args.max_seq_len is not None and not launched_by_torchrun():  # before any load or launch: from config.json
        from minillama.config import LlamaConfig
        from minillama.hub import resolve_checkpoint

        context = LlamaConfig.from_file(resolve_checkpoint(args.model) / "config.json").max_position_embeddings
        if args.max_seq_len > context:
            raise cli.CommandError(f"--max-seq-len {args.max_seq_len} is more than the model's context of {context}")
    if args.tp and args.tp > 1 and not launched_by_torchrun():
        from torch.distributed.elastic.multiprocessing.api import SignalException

        # the launcher passes SIGTERM / SIGINT on to the processes and kills them after a grace: rank 0 needs
        # --shutdown-timeout, then SHUTDOWN_GRACE to answer the requests it cancels and close
        grace = args.shutdown_timeout + SHUTDOWN_GRACE
        fixed = cli.fixed_launcher_grace()
        if fixed is not None and grace > fixed:
            raise cli.CommandError(
                f"--shutdown-timeout {args.shutdown_timeout:g} does not fit under --tp: this torch's launcher kills "
                f"the processes {fixed} s after passing SIGTERM on and the server needs {SHUTDOWN_GRACE} s more to "
                f"close; give --shutdown-timeout {fixed - SHUTDOWN_GRACE} or less, or upgrade torch to a release "
                "whose launcher takes a shutdown_timeout")
        try:
            return cli.launch_tensor_parallel(args.tp, args.model, ["-m", "minillama.serve"], cli.without_tp(argv),
                                              shutdown_timeout=grace if fixed is None else None)
        except SignalException as e:  # SIGTERM / SIGINT stopped the launcher, which stopped the workers
            return 128 + int(e.sigval)
    cli.silence_followers()
    sock = None if is_follower() else _listen(args.host, args.port)  # rank 0 serves HTTP
    start = time.perf_counter()
    llm = Llama.from_pretrained(args.model, device=args.device, dtype=args.dtype, backend=args.backend, tp=args.tp,
                                quantize=args.quantize,
                                quantize_lm_head=args.quantize_lm_head)
    max_seq_len = args.max_seq_len if args.max_seq_len is not None else min(llm.config.max_position_embeddings, 8192)
    scheduler = Scheduler(llm, max_batch=args.max_batch, max_seq_len=max_seq_len, max_queue=args.max_queue,
                          prefill_chunk=args.prefill_chunk)
    if is_follower():  # rank > 0: no HTTP; run rank 0's steps until its scheduler closes
        # The launcher passes SIGTERM / SIGINT to every rank: rank 0 shuts down gracefully and then
        # closes its scheduler, which this rank must still be here to hear (dead, rank 0's close
        # failed with a gloo traceback); it ends when rank 0's close reaches it.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
        scheduler.follow()
        return 0
    # The scheduler thread (launching device steps) and the event loop (HTTP) share the GIL; with
    # Python's default 5 ms switch interval a busy event loop could hold up the next decode step.
    sys.setswitchinterval(0.0005)
    name = args.served_model_name
    if name is None:
        name = Path(args.model).name if Path(args.model).exists() else args.model
    app = create_app(llm, scheduler, name, max_body_bytes=args.max_body_bytes, request_timeout=args.request_timeout,
                     api_key=args.api_key)
    host, port = sock.getsockname()[:2]  # the port taken, with --port 0
    url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
    cli.note(f"(loaded {args.model} on {llm.device} in {time.perf_counter() - start:.1f} s; serving {name!r} on "
             f"{url} with {args.max_batch} rows of {max_seq_len} tokens)")
    config = uvicorn.Config(app, host=args.host, port=port, log_level=args.log_level, timeout_keep_alive=5,
                            limit_concurrency=4 * (args.max_batch + args.max_queue) + 16,
                            timeout_graceful_shutdown=SHUTDOWN_GRACE)
    # uvicorn shuts down gracefully on SIGINT / SIGTERM, then raises the signal again for the handler
    # it replaced: with Python's, SIGTERM killed the process (status -15, the scheduler never closed)
    # and a second Ctrl-C raised KeyboardInterrupt into the loop (a traceback). The shutdown done,
    # the signal asks for nothing more: exit 0.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    try:
        _server_class(app, args.shutdown_timeout)(config).run(sockets=[sock])
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        sock.close()
        scheduler.close()
    return 0


if __name__ == "__main__":
    cli.exit_with(main())
