"""Llama 3.1 tool calls in a reply: the model's JSON back to OpenAI's ``tool_calls``.

Given tools through its chat template, Llama 3.1 answers a call with one JSON object,
``{"name": "get_weather", "parameters": {"city": "Paris"}}``, sometimes after ``<|python_tag|>``,
and ends the turn with ``<|eom_id|>`` or ``<|eot_id|>`` (stop ids: not part of the reply text). A
few replies hold several objects separated by ``;``. Anything else (prose, prose around JSON, JSON
without a name or without "parameters" / "arguments") is an ordinary reply.
"""
import json
from dataclasses import dataclass
from typing import Collection, List, Optional, Tuple

PYTHON_TAG = "<|python_tag|>"


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict  # the model's "parameters" (or "arguments")


def could_be_tool_call(text: str) -> bool:
    """False once the start of a reply shows it is not a tool call (for streaming: stop holding text)."""
    head = text.lstrip()
    if head.startswith(PYTHON_TAG):
        head = head[len(PYTHON_TAG):].lstrip()
    elif PYTHON_TAG.startswith(head):  # "" or the start of the tag
        return True
    return head == "" or head.startswith("{")


def _not_json(constant: str):
    raise ValueError(f"{constant} is not JSON")


def parse_tool_calls(text: str, names: Optional[Collection[str]] = None) -> Optional[List[ToolCall]]:
    """The tool calls that make up the whole reply ``text``, or None when it is not (only) tool calls.

    ``names``: the functions the request declared; a reply calling any other is not a call (None: any name)."""
    located = locate_tool_calls(text, names)
    return None if located is None else [call for call, _ in located]


def locate_tool_calls(text: str, names: Optional[Collection[str]] = None) -> Optional[List[Tuple[ToolCall, int]]]:
    """:func:`parse_tool_calls`'s calls, each with the offset in ``text`` just past its JSON object (its
    closing brace), e.g. to cut a reply after its first call; None when ``text`` is not (only) tool calls."""
    rest = text.lstrip()  # a suffix of text, for the offsets (trailing space goes with the lstrip after a call)
    if rest.startswith(PYTHON_TAG):
        rest = rest[len(PYTHON_TAG):].lstrip()
    decoder = json.JSONDecoder(parse_constant=_not_json)  # NaN / Infinity: arguments must stay valid JSON
    calls: List[Tuple[ToolCall, int]] = []
    while rest:
        if not rest.startswith("{"):
            return None
        try:
            obj, end = decoder.raw_decode(rest)
        except (ValueError, RecursionError):  # not JSON (JSONDecodeError), an int over 4300 digits, deep nesting
            return None
        arguments = obj.get("parameters", obj.get("arguments"))  # None: neither key, so not a call
        if not isinstance(obj.get("name"), str) or not obj["name"] or not isinstance(arguments, dict):
            return None
        if names is not None and obj["name"] not in names:
            return None
        calls.append((ToolCall(obj["name"], arguments), len(text) - len(rest) + end))
        rest = rest[end:].lstrip()
        if rest.startswith(";"):
            rest = rest[1:].lstrip()
    return calls or None
