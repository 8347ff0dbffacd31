"""Chat messages to token ids with the checkpoint's own ``chat_template``: exact and injection-safe.

The common recipe (render the template to a string, then tokenize it with special tokens
recognized) is exact for ordinary messages but lets a user forge turns: a message containing the
text ``<|eot_id|><|start_header_id|>system<|end_header_id|>`` is tokenized into the real marker ids.
Here the template is rendered once with every message content replaced by a unique placeholder, so
the rendered string splits into what the *template* wrote and what the *messages* hold:

    template text   <|begin_of_text|><|start_header_id|>user<|end_header_id|>\\n\\n     (markers -> ids)
    content         Hi <|eot_id|> there                                              (plain text, always)
    template text   <|eot_id|><|start_header_id|>assistant<|end_header_id|>\\n\\n

Special-token strings are looked up only in template text; the text between two of them (template
and content together) is encoded as plain text in one piece, just as a tokenizer encodes the text
between special tokens. For messages that contain no special-token text the ids therefore equal
render-then-tokenize (tested on Llama 3.1's template and tokenizer).

Templates often transform a content (Llama 3.1 writes ``message['content'] | trim``). The placeholder
carries whitespace padding on both sides, so whether the template strips a side shows in the render;
the same strip is then applied to the real content, and the result is checked against a render of
the real messages: any other transformation is an error, never a silent mismatch.

The template runs in Jinja's immutable sandbox with what Hugging Face's ``apply_chat_template``
provides: ``raise_exception``, ``strftime_now``, a ``tojson`` filter, loop controls, the
``{% generation %}`` tag, the special-token strings (``bos_token``, ...), ``tools`` (none unless
given) and ``documents`` (none). Llama 3.1's template then writes its default system block ("Cutting
Knowledge Date: December 2023", "Today Date: 26 Jul 2024") exactly as transformers does.

Tool calling goes through the template's own tools branch: ``tools`` (OpenAI's
``[{"type": "function", "function": {...}}]``), assistant messages with ``tool_calls`` (arguments as
a dict or as OpenAI's JSON string; the template gets a dict) and ``tool`` / ``ipython`` messages.
Every string a caller supplies there (tool descriptions, argument values, a tool call's name) is a
placeholder too, so it stays plain text; where the template writes one through ``tojson`` the
placeholder shows JSON-quoted and the real string is JSON-quoted in its place. Dict keys cannot be
placeholders (templates read them), so a key holding special-token text is an error.

``continue_final_message`` (assistant prefill, as transformers and vLLM name it) keeps the pieces up
to and including the final message's content and drops the rest (its end-of-turn marker), so the ids
are those of the render cut right after that content, encoded by the same rules.
"""
import json
import re
from datetime import datetime
from typing import List, Optional, Sequence, Tuple

ROLES = ("system", "user", "assistant", "tool", "ipython")
_PAD_LEFT, _PAD_RIGHT = " \n", "\n "  # whitespace around each placeholder, to see a template's strip
# a placeholder as the render shows it: written through tojson (groups 1-3), or as it is (groups 4-6)
_SLOT = re.compile('"( \\\\n)?\ue000([0-9]+)\ue001(\\\\n )?"|( \n)?\ue000([0-9]+)\ue001(\n )?')
_EXTRA_KEYS = {"assistant": {"tool_calls"}, "tool": {"tool_call_id", "name"}, "ipython": {"tool_call_id", "name"}}


class ChatTemplateError(ValueError):
    """The chat template raised, or transforms message contents in a way that cannot be followed."""


def _environment():
    import jinja2
    from jinja2 import nodes
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(Extension):
        """``{% generation %}...{% endgeneration %}`` (marks assistant text for training masks) renders its body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.Scope(body, lineno=lineno)

    def raise_exception(message):
        raise ChatTemplateError(f"the chat template refused the messages: {message}")

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


class ChatFormat:
    """Encodes a list of ``{"role", "content"}`` messages with a tokenizer's chat template.

    Args:
        tokenizer: a ``minillama.tokenizer.Tokenizer`` whose ``chat_template`` is set.
    """

    def __init__(self, tokenizer):
        if not tokenizer.chat_template:
            raise ValueError("this tokenizer has no chat_template (a base model): encode plain text instead")
        named = named_templates(tokenizer.chat_template)
        if "default" not in named:
            raise ChatTemplateError(f"chat_template lists {sorted(map(str, named))} but no 'default' template")
        self.tokenizer = tokenizer
        env = _environment()
        self.templates = {}  # name -> compiled: "default", and "tool_use" (used when tools are given) if there is one
        for name in ("default", "tool_use"):
            if name not in named:
                continue
            if not isinstance(named[name], str):
                raise ChatTemplateError(f"the chat template must be a string, got {type(named[name]).__name__}")
            try:
                self.templates[name] = env.from_string(named[name])
            except Exception as e:  # jinja2.TemplateSyntaxError and the like: the checkpoint's template is broken
                where = f" (line {e.lineno})" if getattr(e, "lineno", None) else ""
                raise ChatTemplateError(f"the chat template does not compile{where}: {type(e).__name__}: {e}") from None
        self.special = tokenizer.added_tokens()
        longest_first = sorted(self.special, key=len, reverse=True)
        self._special_re = re.compile("|".join(re.escape(s) for s in longest_first)) if longest_first else None
        config = tokenizer.tokenizer_config
        self._token_strings = {}
        for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
            value = config.get(key)
            self._token_strings[key] = value.get("content") if isinstance(value, dict) else value

    def render(self, messages: Sequence[dict], add_generation_prompt: bool = True, tools=None,
               template: Optional[str] = None) -> str:
        """The template's output string for ``messages`` (what render-then-tokenize would tokenize).

        ``template``: the named template to render; None picks as transformers does: "tool_use"
        when ``tools`` are given and the checkpoint names one, else "default"."""
        if template is None:
            template = "tool_use" if tools is not None and "tool_use" in self.templates else "default"
        try:
            return self.templates[template].render(
                messages=[dict(m) for m in messages], add_generation_prompt=add_generation_prompt,
                tools=tools, documents=None, **self._token_strings,
            )
        except ChatTemplateError:
            raise
        except Exception as e:  # jinja errors: undefined names, type errors inside the template
            raise ChatTemplateError(f"the chat template failed: {type(e).__name__}: {e}") from None

    def encode(self, messages: Sequence[dict], add_generation_prompt: bool = True,
               tools: Optional[Sequence[dict]] = None, continue_final_message: bool = False) -> List[int]:
        """Token ids of the conversation; special ids only where the template writes them.

        Args:
            messages: ``{"role": one of system/user/assistant/tool/ipython, "content": str}`` dicts;
                an assistant message may carry ``tool_calls`` (``[{"function": {"name": str,
                "arguments": dict or JSON str}}]``, content then None or ""), a tool message
                ``tool_call_id`` and ``name``.
            add_generation_prompt: end with the header that opens the assistant's reply.
            tools: OpenAI-style tool definitions for the template's tools branch (None: no tools).
                ValueError when the template does not use them.
            continue_final_message: leave the final message open for the model to continue it
                ("prefill"): the ids end with its content's tokens; what the template writes after
                the content (Llama 3.1's ``<|eot_id|>``) is dropped, as transformers'
                ``apply_chat_template`` cuts its render. The final message may have any role and
                an empty content (the ids then end with its header); its content must be the last
                message text the template writes (no tool_calls after it), written as it is (not
                through ``tojson``). Needs ``add_generation_prompt=False``; else a ValueError.
        Returns:
            The ids, BOS included when the template writes it (Llama 3.1's does).
        """
        if continue_final_message and add_generation_prompt:
            raise ValueError("continue_final_message and add_generation_prompt cannot both be true: continuing the "
                             "final message needs add_generation_prompt=False")
        messages = _check_messages(messages)
        if continue_final_message and not messages:
            raise ValueError("continue_final_message needs a final message to continue; messages is empty")
        if tools is not None:
            tools = _check_tools(tools)
        slots: List[str] = []
        # the template reads a message's role and a tool's or tool call's type (all checked above)
        marked_messages = []
        for i, m in enumerate(messages):
            marked = self._mark({k: v for k, v in m.items() if k != "tool_calls"}, slots, keep=("role",))
            if "tool_calls" in m:
                try:
                    marked["tool_calls"] = [self._mark(c, slots, keep=("type",)) for c in m["tool_calls"]]
                except RecursionError:
                    raise ValueError(f"message {i} tool_calls nest too deeply; flatten their arguments") from None
            marked_messages.append(marked)
        # the final message's content placeholder: where a continue_final_message encoding ends
        final = int(re.search("\ue000([0-9]+)\ue001", marked_messages[-1]["content"]).group(1)) \
            if continue_final_message else None
        try:
            marked_tools = None if tools is None else [self._mark(t, slots, keep=("type",)) for t in tools]
        except RecursionError:
            raise ValueError("tools nest too deeply; flatten their parameters") from None
        pieces, origins = self._pieces(marked_messages, marked_tools, slots, add_generation_prompt)
        text = "".join(t for t, _ in pieces)
        expected = self.render(messages, add_generation_prompt, tools)
        if text != expected:
            raise ChatTemplateError(
                "the chat template changes message contents beyond stripping whitespace; "
                "minillama cannot encode it safely"
            )
        template = "tool_use" if "tool_use" in self.templates else "default"
        if tools and expected == self.render(messages, add_generation_prompt, template=template):
            raise ValueError("this checkpoint's chat template does not render tools: it has no tools branch")
        if final is not None:
            pieces = _cut_after(pieces, origins, final)
        return self._encode_pieces(pieces)

    def _mark(self, value, slots: List[str], keep: Sequence[str] = ()):
        """``value`` with every string in it (not dict keys, nor the top-level ``keep`` keys' values)
        replaced by a numbered placeholder."""
        if isinstance(value, str):
            slots.append(value)
            return f"{_PAD_LEFT}\ue000{len(slots) - 1}\ue001{_PAD_RIGHT}"
        if isinstance(value, dict):
            out = {}
            for key, item in value.items():
                if self._special_re is not None and self._special_re.search(key):
                    raise ValueError(f"the key {key!r} holds special-token text; rename it")
                out[key] = item if key in keep else self._mark(item, slots)
            return out
        if isinstance(value, list):
            return [self._mark(item, slots) for item in value]
        return value

    def _pieces(self, messages, tools, slots: List[str], add_generation_prompt: bool):
        """The render as (text, from_template) pieces, the real strings (stripped as the template does) in place,
        and each piece's origin: None for template text, else (slot index, written through tojson)."""
        rendered = self.render(messages, add_generation_prompt, tools)
        pieces: List[Tuple[str, bool]] = []
        origins: List[Optional[Tuple[int, bool]]] = []
        pos = 0
        for m in _SLOT.finditer(rendered):
            pieces.append((rendered[pos:m.start()], True))
            origins.append(None)
            as_json = m.group(2) is not None
            left, index, right = m.group(1, 2, 3) if as_json else m.group(4, 5, 6)
            content = slots[int(index)]
            if left is None:  # the template stripped the left side
                content = content.lstrip()
            if right is None:
                content = content.rstrip()
            pieces.append((json.dumps(content, ensure_ascii=False) if as_json else content, False))
            origins.append((int(index), as_json))
            pos = m.end()
        pieces.append((rendered[pos:], True))
        origins.append(None)
        for text, from_template in pieces:
            if from_template and ("\ue000" in text or "\ue001" in text):
                raise ChatTemplateError("the chat template cuts or rewrites message contents; cannot encode safely")
        return pieces, origins

    def _encode_pieces(self, pieces: List[Tuple[str, bool]]) -> List[int]:
        # split at special-token strings of template text only; (text, None) or ("", special)
        parts: List[Tuple[str, object]] = []
        buffer: List[str] = []
        for text, from_template in pieces:
            if not from_template or self._special_re is None:
                buffer.append(text)
                continue
            pos = 0
            for m in self._special_re.finditer(text):
                buffer.append(text[pos:m.start()])
                parts.append(("".join(buffer), None))
                parts.append(("", self.special[m.group()]))
                buffer, pos = [], m.end()
            buffer.append(text[pos:])
        parts.append(("".join(buffer), None))
        ids: List[int] = []
        for k, (text, special) in enumerate(parts):
            if special is not None:
                ids.append(special[0])
                continue
            # an added token with lstrip / rstrip swallows the whitespace beside it, as tokenizers do
            if k > 0 and parts[k - 1][1] is not None and parts[k - 1][1][2]:
                text = text.lstrip()
            if k + 1 < len(parts) and parts[k + 1][1] is not None and parts[k + 1][1][1]:
                text = text.rstrip()
            if text:
                ids.extend(self.tokenizer.encode(text, bos=False))
        return ids


def _cut_after(pieces: List[Tuple[str, bool]], origins: List[Optional[Tuple[int, bool]]],
               final: int) -> List[Tuple[str, bool]]:
    """``pieces`` up to and including the last piece of slot ``final`` (the final message's content),
    which must be the last piece any message or tool string contributes."""
    where = [k for k, origin in enumerate(origins) if origin is not None and origin[0] == final]
    if not where:
        raise ValueError("continue_final_message: the chat template does not write the final message's content, "
                         "so there is nothing to continue")
    end = where[-1]
    if origins[end][1]:
        raise ValueError("continue_final_message: the chat template writes the final message's content as JSON "
                         "(through tojson); it cannot be continued as text")
    if any(origin is not None for origin in origins[end + 1:]):
        raise ValueError("continue_final_message: the chat template writes more of the messages (tool_calls, "
                         "tools) after the final message's content; the final message must end with its content")
    return pieces[:end + 1]


def named_templates(chat_template) -> dict:
    """A checkpoint's ``chat_template`` by name: one string is the "default" one; a list
    ``[{"name": "default", "template": ...}, {"name": "tool_use", ...}, ...]`` names each."""
    if isinstance(chat_template, list):
        return {t.get("name"): t.get("template") for t in chat_template if isinstance(t, dict)}
    return {"default": chat_template}


def _check_messages(messages: Sequence[dict]) -> List[dict]:
    """Checked copies of the messages; tool-call arguments given as JSON text become dicts."""
    if isinstance(messages, (str, dict)) or not isinstance(messages, Sequence):
        raise TypeError("messages must be a list of {'role': ..., 'content': ...} dicts")
    checked = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or ("content" not in m and "tool_calls" not in m):
            raise ValueError(f"message {i} must be a dict with exactly the keys 'role' and 'content', got {m!r}")
        if m["role"] not in ROLES:
            raise ValueError(f"message {i} has role {m['role']!r}; use one of {', '.join(ROLES)}")
        extra = set(m) - {"role", "content"} - _EXTRA_KEYS.get(m["role"], set())
        if extra:
            raise ValueError(
                f"message {i} must be a dict with exactly the keys 'role' and 'content' (an assistant may add "
                f"'tool_calls', a tool 'tool_call_id' and 'name'), got the extra key(s) {sorted(extra)}"
            )
        m = dict(m)
        if "tool_calls" in m:
            if m.get("content") is None:
                m["content"] = ""
            m["tool_calls"] = [_check_tool_call(i, j, c) for j, c in enumerate(m["tool_calls"] or [])]
            if not m["tool_calls"]:
                del m["tool_calls"]
        if not isinstance(m["content"], str):
            raise ValueError(f"message {i} content must be a str, got {type(m['content']).__name__}")
        for key in ("tool_call_id", "name"):
            if key in m and not isinstance(m[key], str):
                raise ValueError(f"message {i} {key} must be a str, got {type(m[key]).__name__}")
        checked.append(m)
    return checked


def _check_tool_call(i: int, j: int, call) -> dict:
    where = f"message {i} tool_calls[{j}]"
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise ValueError(f"{where} must be {{'type': 'function', 'function': {{'name': str, 'arguments': ...}}}}")
    if call.get("type", "function") != "function":
        raise ValueError(f"{where} has type {call['type']!r}; only 'function' tool calls exist")
    arguments = function.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as e:
            raise ValueError(f"{where} arguments are not valid JSON: {e}") from None
        except RecursionError:
            raise ValueError(f"{where} arguments nest too deeply; flatten them") from None
    if not isinstance(arguments, dict):
        raise ValueError(f"{where} arguments must be a JSON object (a dict), got {type(arguments).__name__}")
    out = {"type": "function", "function": {"name": function["name"], "arguments": arguments}}
    if "id" in call:
        if not isinstance(call["id"], str):
            raise ValueError(f"{where} id must be a str, got {type(call['id']).__name__}")
        out["id"] = call["id"]
    return out


def _check_tools(tools) -> List[dict]:
    if isinstance(tools, (str, dict)) or not isinstance(tools, Sequence):
        raise TypeError("tools must be a list of {'type': 'function', 'function': {...}} dicts")
    for i, t in enumerate(tools):
        function = t.get("function") if isinstance(t, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or t.get("type") != "function":
            raise ValueError(f"tools[{i}] must be {{'type': 'function', 'function': {{'name': str, ...}}}}, got {t!r}")
    return [dict(t) for t in tools]
