"""OpenAI's HTTP API as plain data: request checking and the response, chunk and error bodies.

No web framework here: :func:`parse_chat` and :func:`parse_completion` take the decoded JSON body
and return a :class:`ParsedRequest` (or raise :class:`APIError` naming the field); the builders
return dicts shaped as OpenAI's. ``minillama.serve`` puts them on the wire.

Checking is strict, as the API is: a field OpenAI does not define is an error, and so is a defined
one this server does not implement unless it has its neutral value (chat's ``echo: false``,
``best_of: 1``, ...). ``top_k``, ``min_p``, ``repetition_penalty``, ``min_tokens``, ``ignore_eos`` and
``stop_token_ids`` are accepted as extras (as vLLM does), and on chat vLLM's ``add_generation_prompt``
and ``continue_final_message`` (assistant prefill). vLLM's ``skip_special_tokens`` too, default false
here (vLLM's default is true): the text keeps what special tokens the model writes (Llama 3's
``<|python_tag|>``, a reserved token) unless it is true. Stop ids (``<|eot_id|>``) are never text.
"""
import json
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

from minillama.sampling import REPETITION_RANGE, SamplingParams
from minillama.scheduler import MAX_LOGPROBS
from minillama.tool_calls import ToolCall

MAX_N = 16  # choices per request at most
MAX_STOP = 16  # stop strings per request at most
# stop ids per request at most: 4x Llama 3's 256 special tokens (clients send a few: <|eot_id|>,
# <|eom_id|>); each id is checked and put in the min_tokens mask per request, so the count is bounded
MAX_STOP_TOKEN_IDS = 1024
MAX_COMPLETION_LOGPROBS = 5  # OpenAI's limit for /v1/completions


class APIError(Exception):
    """An error answer: HTTP status, message, and the request field it is about."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, type: str = "invalid_request_error",
                 code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(param: str, message: str) -> APIError:
    return APIError(400, message, param=param)


# fields OpenAI defines that change nothing here at these values (anything else is an error)
_NEUTRAL = {
    "echo": (False, None),
    "suffix": (None, ""),
    "best_of": (1, None),
    "response_format": (None, {"type": "text"}),
    "store": (False, None),
}
_IGNORED = {"user", "metadata", "service_tier", "prompt_cache_key", "safety_identifier"}
_CHAT_FIELDS = {"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "stop", "seed",
                "stream", "stream_options", "logprobs", "top_logprobs", "n", "tools", "tool_choice",
                "parallel_tool_calls", "top_k", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty",
                "logit_bias", "min_tokens", "ignore_eos", "stop_token_ids", "add_generation_prompt",
                "continue_final_message", "skip_special_tokens"}
_COMPLETION_FIELDS = {"model", "prompt", "max_tokens", "temperature", "top_p", "stop", "seed", "stream",
                      "stream_options", "logprobs", "n", "echo", "top_k", "min_p", "presence_penalty",
                      "frequency_penalty", "repetition_penalty", "logit_bias", "min_tokens", "ignore_eos",
                      "stop_token_ids", "skip_special_tokens"}


@dataclass
class ParsedRequest:
    model: Optional[str]
    prompts: List[Any]  # chat: one list of messages; completions: strings or token-id lists
    max_tokens: Optional[int]  # None: as many as fit
    sampling: SamplingParams
    stop: List[str]
    stop_token_ids: List[int]  # ids that end a choice, besides the checkpoint's (vLLM's extra)
    n: int
    stream: bool
    include_usage: bool
    logprobs: Optional[int]  # None: off; k: the chosen token's and the k best
    tools: Optional[List[dict]] = None  # chat: rendered and parsed (None with tool_choice "none")
    parallel_tool_calls: bool = True  # chat: False keeps the first of the calls a reply holds
    echo: bool = False  # completions: each choice starts with its prompt (its tokens' logprobs too)
    add_generation_prompt: bool = True  # chat: the prompt ends with the header opening the assistant's turn
    continue_final_message: bool = False  # chat: the prompt ends inside the final message, for the model to continue
    skip_special_tokens: bool = False  # the text leaves out special tokens' (vLLM's extra)
    extra: Dict[str, Any] = field(default_factory=dict)


def _check_fields(body, allowed: set) -> None:
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    for key, value in body.items():
        if key in allowed or key in _IGNORED:
            continue
        if key in _NEUTRAL:
            if value not in _NEUTRAL[key] or (value is not None
                                              and isinstance(value, bool) != isinstance(_NEUTRAL[key][0], bool)):
                raise bad(key, f"{key}={json.dumps(value)} is not supported by this server; "
                               f"leave it out or use {json.dumps(_NEUTRAL[key][0])}")
            continue
        raise bad(key, f"unknown field {key!r}")


def _int(body, key, low, high=None, default=None):
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad(key, f"{key} must be an integer, got {json.dumps(value)}")
    if value < low or (high is not None and value > high):
        raise bad(key, f"{key} must be in [{low}, {high}], got {value}" if high is not None
                  else f"{key} must be >= {low}, got {value}")
    return value


def _number(body, key, default, low, high, low_open=False):
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise bad(key, f"{key} must be a number, got {json.dumps(value)}")
    if value < low or value > high or (low_open and value == low):
        raise bad(key, f"{key} must be in {'(' if low_open else '['}{low}, {high}], got {value}")
    return float(value)


def _bool(body, key, default=False):
    value = body.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad(key, f"{key} must be true or false, got {json.dumps(value)}")
    return value


def _common(body) -> dict:
    """Fields both endpoints share: sampling, stop, n, stream."""
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0, low_open=True)
    top_k = body.get("top_k")
    if top_k is None or top_k == -1:  # -1: vLLM's spelling of "off"
        top_k = 0
    top_k = _int({"top_k": top_k}, "top_k", 0)
    min_p = _number(body, "min_p", 0.0, 0.0, 1.0)
    if min_p == 1.0:
        raise bad("min_p", "min_p must be in [0, 1), got 1")
    presence_penalty = _number(body, "presence_penalty", 0.0, -2.0, 2.0)
    frequency_penalty = _number(body, "frequency_penalty", 0.0, -2.0, 2.0)
    repetition_penalty = _number(body, "repetition_penalty", 1.0, -math.inf, math.inf)
    if not REPETITION_RANGE[0] <= repetition_penalty <= REPETITION_RANGE[1]:
        raise bad("repetition_penalty", f"repetition_penalty must be > 0 (1 turns it off) and at most "
                                        f"{REPETITION_RANGE[1]:.3g}, at least {REPETITION_RANGE[0]:.3g}; got {repetition_penalty}")
    logit_bias = _logit_bias(body.get("logit_bias"))
    min_tokens = _int(body, "min_tokens", 0, default=0)
    ignore_eos = _bool(body, "ignore_eos")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise bad("seed", f"seed must be an integer, got {json.dumps(seed)}")
    if seed is not None and not -2 ** 63 <= seed < 2 ** 64:
        raise bad("seed", f"seed must fit in 64 bits, got {seed}")
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise bad("stop", f"stop must be a non-empty string or a list of them, got {json.dumps(body.get('stop'))}")
    if len(stop) > MAX_STOP:
        raise bad("stop", f"stop holds {len(stop)} strings, at most {MAX_STOP} are allowed")
    stop_token_ids = _stop_token_ids(body.get("stop_token_ids"))
    stream = _bool(body, "stream")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise bad("stream_options", "stream_options is only allowed with stream: true")
        # include_obfuscation (OpenAI: random padding against length side channels) is read and not applied
        if not isinstance(options, dict) or set(options) - {"include_usage", "continuous_usage_stats",
                                                             "include_obfuscation"}:
            raise bad("stream_options", f"stream_options must be {{\"include_usage\": bool}}, got {json.dumps(options)}")
        include_usage = _bool(options, "include_usage")
        _bool(options, "include_obfuscation")
        if _bool(options, "continuous_usage_stats"):  # vLLM's usage in every chunk
            raise bad("stream_options", "stream_options.continuous_usage_stats=true is not supported by this server; "
                                        "leave it out or use include_usage for the usage in the last chunk")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad("model", f"model must be a string, got {json.dumps(model)}")
    sampling = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seed=seed,
                              presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
                              repetition_penalty=repetition_penalty, logit_bias=logit_bias, min_tokens=min_tokens,
                              ignore_eos=ignore_eos)
    return dict(model=model, sampling=sampling, stop=stop, stop_token_ids=stop_token_ids,
                n=_int(body, "n", 1, MAX_N, default=1), stream=stream, include_usage=include_usage,
                skip_special_tokens=_bool(body, "skip_special_tokens"))


def _check_min_tokens(sampling: SamplingParams, key: str, max_tokens: Optional[int]) -> None:
    """A 400 for ``min_tokens`` above the request's max_tokens (None: as many as fit, checked by the
    server against the room the prompt leaves)."""
    if max_tokens is not None and sampling.min_tokens > max_tokens:
        raise bad("min_tokens", f"min_tokens {sampling.min_tokens} is more than {key} {max_tokens}: lower "
                                f"min_tokens or raise {key}")


def _stop_token_ids(value) -> List[int]:
    """vLLM's ``stop_token_ids``: a list of token ids (null: none). Whether the ids are in the
    vocabulary is the server's check, as for ``logit_bias``."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise bad("stop_token_ids", f"stop_token_ids must be a list of token ids (integers >= 0), "
                                    f"got {json.dumps(value)}")
    if len(value) > MAX_STOP_TOKEN_IDS:
        raise bad("stop_token_ids", f"stop_token_ids holds {len(value)} ids, at most {MAX_STOP_TOKEN_IDS} are "
                                    "allowed")
    for i, t in enumerate(value):
        if isinstance(t, bool) or not isinstance(t, int) or t < 0:
            raise bad("stop_token_ids", f"stop_token_ids[{i}] must be a token id (an integer >= 0), "
                                        f"got {json.dumps(t)}")
    return value


def _logit_bias(value) -> Dict[int, float]:
    """OpenAI's ``logit_bias``: a JSON object of token ids (as strings) to biases in [-100, 100]. Whether
    the ids are in the vocabulary is the server's check."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise bad("logit_bias", f"logit_bias must be an object {{\"token id\": bias}}, got {json.dumps(value)}")
    out = {}
    for key, bias in value.items():
        if not (key.isascii() and key.isdigit() and len(key) <= 18):  # 18 digits: past any vocabulary already
            shown = json.dumps(key if len(key) <= 40 else key[:40] + "...")
            raise bad("logit_bias", f"logit_bias key {shown} is not a token id (a non-negative integer)")
        if isinstance(bias, bool) or not isinstance(bias, (int, float)) or not -100 <= bias <= 100:
            raise bad("logit_bias", f"logit_bias[{json.dumps(key)}] must be a number in [-100, 100], "
                                    f"got {json.dumps(bias)}")
        if int(key) in out:
            raise bad("logit_bias", f"logit_bias names token id {int(key)} twice")
        out[int(key)] = float(bias)
    return out


def _message(i: int, m) -> dict:
    """One OpenAI chat message as minillama's encode_chat takes it."""
    where = f"messages[{i}]"
    if not isinstance(m, dict):
        raise bad(where, f"{where} must be an object with 'role' and 'content', got {json.dumps(m)}")
    role = m.get("role")
    if role == "developer":  # OpenAI's newer name for the system role
        role = "system"
    if role not in ("system", "user", "assistant", "tool", "ipython"):
        raise bad(f"{where}.role", f"{where}.role must be system, developer, user, assistant or tool, got {json.dumps(role)}")
    allowed = {"role", "content", "name"} | ({"tool_calls", "refusal"} if role == "assistant" else set()) \
        | ({"tool_call_id"} if role in ("tool", "ipython") else set())
    unknown = set(m) - allowed
    if unknown:
        raise bad(where, f"{where} has unknown field(s) {sorted(unknown)}")
    content = m.get("content")
    if isinstance(content, list):  # content parts: only text is understood
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad(f"{where}.content[{j}]", f"{where}.content[{j}] must be a {{\"type\": \"text\", \"text\": str}} "
                                                   "part; this server reads text only")
            texts.append(part["text"])
        content = "".join(texts)
    out = {"role": role, "content": content}
    if content is None and not (role == "assistant" and m.get("tool_calls")):
        raise bad(f"{where}.content", f"{where}.content is missing (only an assistant message with tool_calls may omit it)")
    if content is not None and not isinstance(content, str):
        raise bad(f"{where}.content", f"{where}.content must be a string or a list of text parts, got {json.dumps(content)}")
    if m.get("tool_calls"):
        if not isinstance(m["tool_calls"], list):
            raise bad(f"{where}.tool_calls", f"{where}.tool_calls must be a list")
        out["tool_calls"] = m["tool_calls"]
    if role in ("tool", "ipython"):
        for key in ("tool_call_id", "name"):
            if isinstance(m.get(key), str):
                out[key] = m[key]
    return out


def parse_chat(body) -> ParsedRequest:
    """Check a /v1/chat/completions body."""
    _check_fields(body, _CHAT_FIELDS)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("messages", "messages must be a non-empty list of {\"role\", \"content\"} objects")
    messages = [_message(i, m) for i, m in enumerate(messages)]
    common = _common(body)
    if body.get("max_tokens") is not None and body.get("max_completion_tokens") is not None:
        raise bad("max_tokens", "give max_tokens or max_completion_tokens, not both")
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _int(body, key, 1)
    _check_min_tokens(common["sampling"], key, max_tokens)
    logprobs = _bool(body, "logprobs")
    top = _int(body, "top_logprobs", 0, MAX_LOGPROBS)
    if top is not None and not logprobs:
        raise bad("top_logprobs", "top_logprobs needs logprobs: true")
    tools = body.get("tools")
    if tools is not None and (not isinstance(tools, list) or not all(
            isinstance(t, dict) and t.get("type") == "function" and isinstance(t.get("function"), dict)
            and isinstance(t["function"].get("name"), str) for t in tools)):
        raise bad("tools", "tools must be a list of {\"type\": \"function\", \"function\": {\"name\": str, ...}}")
    choice = body.get("tool_choice")
    if choice not in (None, "auto", "none"):
        raise bad("tool_choice", f"tool_choice {json.dumps(choice)} is not supported (nothing forces a call "
                                 "here); use \"auto\" or \"none\"")
    if choice == "auto" and not tools:
        raise bad("tool_choice", "tool_choice \"auto\" needs tools; give tools or leave tool_choice out")
    if choice == "none" or not tools:
        tools = None
    # vLLM's: add_generation_prompt defaults to true, and to false with continue_final_message; both true is an error
    continue_final = _bool(body, "continue_final_message")
    add_generation_prompt = _bool(body, "add_generation_prompt", None)
    if continue_final and add_generation_prompt:
        raise bad("continue_final_message", "continue_final_message and add_generation_prompt cannot both be true: "
                                            "set add_generation_prompt to false (or leave it out) to continue the "
                                            "final message")
    if add_generation_prompt is None:
        add_generation_prompt = not continue_final
    return ParsedRequest(prompts=[messages], max_tokens=max_tokens, logprobs=(top or 0) if logprobs else None,
                         tools=tools, parallel_tool_calls=_bool(body, "parallel_tool_calls", True),
                         add_generation_prompt=add_generation_prompt, continue_final_message=continue_final, **common)


def parse_completion(body) -> ParsedRequest:
    """Check a /v1/completions body."""
    _check_fields(body, _COMPLETION_FIELDS)
    prompt = body.get("prompt")
    if isinstance(prompt, str) or _is_ids(prompt):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) or _is_ids(p) for p in prompt):
        prompts = list(prompt)
    else:
        raise bad("prompt", "prompt must be a string, a list of token ids, or a non-empty list of either")
    common = _common(body)
    echo = _bool(body, "echo")
    max_tokens = _int(body, "max_tokens", 0, default=16)  # OpenAI's default for completions
    if max_tokens == 0 and not echo:
        raise bad("max_tokens", "max_tokens=0 generates nothing: it needs echo: true (the prompt back, scored with "
                                "logprobs); ask for at least 1 token")
    _check_min_tokens(common["sampling"], "max_tokens", max_tokens)
    logprobs = _int(body, "logprobs", 0, MAX_COMPLETION_LOGPROBS)
    if len(prompts) * common["n"] > MAX_N:
        raise bad("n", f"{len(prompts)} prompts x n={common['n']} choices is more than {MAX_N} per request")
    return ParsedRequest(prompts=prompts, max_tokens=max_tokens, logprobs=logprobs, echo=echo, **common)


_TOKENIZE_FIELDS = {"model", "prompt", "add_special_tokens"}
_TOKENIZE_CHAT_FIELDS = {"model", "messages", "add_generation_prompt"}


def parse_tokenize(body) -> Tuple[str, Any, bool]:
    """Check a /tokenize body (vLLM's): ``{"prompt": text, "add_special_tokens": true}`` or
    ``{"messages": [...], "add_generation_prompt": true}``. Returns ("prompt", text,
    add_special_tokens) or ("messages", messages, add_generation_prompt)."""
    if isinstance(body, dict) and "messages" in body:
        _check_fields(body, _TOKENIZE_CHAT_FIELDS)
        messages = body["messages"]
        if not isinstance(messages, list) or not messages:
            raise bad("messages", "messages must be a non-empty list of {\"role\", \"content\"} objects")
        return "messages", [_message(i, m) for i, m in enumerate(messages)], _bool(body, "add_generation_prompt", True)
    _check_fields(body, _TOKENIZE_FIELDS)
    if not isinstance(body.get("prompt"), str):
        raise bad("prompt", f"prompt must be a string (or give messages), got {json.dumps(body.get('prompt'))}")
    return "prompt", body["prompt"], _bool(body, "add_special_tokens", True)


def parse_detokenize(body) -> List[int]:
    """Check a /detokenize body (vLLM's): ``{"tokens": [ids]}``."""
    _check_fields(body, {"model", "tokens"})
    tokens = body.get("tokens")
    if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
        raise bad("tokens", "tokens must be a list of token ids (integers)")
    return tokens


def _is_ids(p) -> bool:
    return isinstance(p, list) and bool(p) and all(isinstance(t, int) and not isinstance(t, bool) for t in p)


# -- responses ---------------------------------------------------------------------------------

def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def tool_calls_json(calls: Sequence[ToolCall], stream: bool = False) -> List[dict]:
    out = []
    for i, c in enumerate(calls):
        item = {"id": new_id("call"), "type": "function",
                "function": {"name": c.name, "arguments": json.dumps(c.arguments, ensure_ascii=False)}}
        out.append({"index": i, **item} if stream else item)
    return out


LOGPROB_FLOOR = -9999.0  # what a log-probability of -inf is sent as (JSON has no infinity), as vLLM's


def _wire(logprob: Optional[float]) -> Optional[float]:
    """A log-probability as JSON carries it: -inf (an id the tokenizer cannot decode, in an echoed
    prompt) becomes LOGPROB_FLOOR."""
    return logprob if logprob is None else max(logprob, LOGPROB_FLOOR)


def chat_logprobs(tokenizer, tokens) -> Optional[dict]:
    """OpenAI's chat ``logprobs`` for :class:`minillama.scheduler.Token` events (None when off)."""
    if not tokens or tokens[0].logprob is None:
        return None

    def entry(token_id: int, logprob: float) -> dict:
        raw = tokenizer.token_bytes(token_id)
        return {"token": raw.decode("utf-8", errors="replace"), "logprob": _wire(logprob), "bytes": list(raw)}

    return {"content": [{**entry(t.id, t.logprob), "top_logprobs": [entry(i, lp) for i, lp in t.top_logprobs]}
                        for t in tokens]}


def completion_logprobs(tokenizer, tokens, offset: int) -> Optional[dict]:
    """The legacy completions ``logprobs`` object of ``tokens`` (None for none); ``offset`` is the
    text offset of the first. A token without a logprob (an echoed prompt's first: nothing predicts
    it) has null ``token_logprobs`` and ``top_logprobs`` entries, as OpenAI's and vLLM's."""
    if not tokens:
        return None
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for t in tokens:
        text = tokenizer.token_bytes(t.id).decode("utf-8", errors="replace")
        out["tokens"].append(text)
        out["token_logprobs"].append(_wire(t.logprob))
        top: Optional[Dict[str, float]] = None
        if t.logprob is not None:
            top = {}
            for i, lp in t.top_logprobs:
                top.setdefault(tokenizer.token_bytes(i).decode("utf-8", errors="replace"), _wire(lp))
            top.setdefault(text, _wire(t.logprob))  # the chosen token always, as OpenAI's (up to logprobs + 1)
        out["top_logprobs"].append(top)
        out["text_offset"].append(offset)
        offset += len(text)
    return out
