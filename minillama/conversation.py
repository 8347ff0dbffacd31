"""A multi-turn conversation that keeps its KV cache between turns.

One invariant makes every operation simple: ``cached_ids`` are exactly the token ids whose keys and
values the cache holds (``len(cached_ids) == cache.seq_lens_cpu[0]``). A turn encodes the whole
conversation plus the new user message, keeps the longest cached prefix of it, and prefills only
the rest onto the cache. Normally that rest is the new turn alone: the reply's stop token (sampled
but never fed to the model, e.g. ``<|eot_id|>``), the user message, the assistant header. When a
reply's sampled ids differ from how its text re-encodes (or the template trims it), the cache is
cut back to the common prefix and the difference is prefilled, so after any turn the cache equals a
fresh prefill of the conversation's encoding. Editing history (/system, /load, dropping old turns)
needs nothing special for the same reason.

With a chat template (``tokenizer.chat_template``) messages are encoded by
``Tokenizer.encode_chat``; without one (a base model) the conversation is plain continuation: the
messages' texts, concatenated, are the document the model continues.

The library never prints: replies stream through an ``on_text`` callback, and each turn returns its
:class:`TurnStats`.
"""
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Union

from minillama.chat_format import ROLES, ChatTemplateError
from minillama.concurrency import exclusive
from minillama.files import atomic_write_text
from minillama.kv_cache import KVCache
from minillama.sampling import SamplingParams

OVERFLOW_POLICIES = ("drop", "error")
MIN_CACHE = 256  # first allocation, in tokens; the cache doubles as needed up to the context


class ContextOverflowError(ValueError):
    """The next turn does not fit the context (and old turns may not, or cannot, be dropped)."""


@dataclass
class TurnStats:
    prefill_tokens: int  # tokens this turn ran through the model before the first reply token
    reused_tokens: int  # tokens kept in the cache from earlier turns
    new_tokens: int  # reply tokens (a stop token not counted)
    ttft_s: float  # time to the first reply token
    decode_s: float  # time of the decode steps after it
    finish_reason: str  # "stop", "length" or "interrupted"
    dropped_turns: int  # oldest turns dropped so that this one fits the context

    @property
    def tokens_per_s(self) -> float:
        steps = self.new_tokens - 1
        return steps / self.decode_s if steps > 0 and self.decode_s > 0 else 0.0


class Conversation:
    """Messages plus the KV cache that holds their encoding.

    Args:
        llm: a loaded ``minillama.Llama``.
        system: optional system prompt (the first message; a text prefix for a base model).
        max_context: the most tokens the conversation may hold; None: the model's
            max_position_embeddings. The cache grows to this size as the conversation does.
        on_overflow: "drop" the oldest turns (keeping the system prompt) when the next turn does
            not fit, or "error": raise :class:`ContextOverflowError`.
    """

    def __init__(self, llm, system: Optional[str] = None, max_context: Optional[int] = None,
                 on_overflow: str = "drop"):
        limit = llm.config.max_position_embeddings
        if max_context is None:
            max_context = limit
        if isinstance(max_context, bool) or not isinstance(max_context, int) or not 0 < max_context <= limit:
            raise ValueError(f"max_context must be an integer in [1, {limit}] (the model's context), got {max_context!r}")
        if on_overflow not in OVERFLOW_POLICIES:
            raise ValueError(f"on_overflow must be one of {OVERFLOW_POLICIES}, got {on_overflow!r}")
        self.llm = llm
        self.max_context = max_context
        self.on_overflow = on_overflow
        self.chat = bool(llm.tokenizer.chat_template)  # False: plain continuation of a base model
        self.messages: List[dict] = []
        self.cache: Optional[KVCache] = None
        self.cached_ids: List[int] = []
        if system:
            self.set_system(system)

    # -- history ------------------------------------------------------------------------------

    @property
    def system(self) -> Optional[str]:
        return self.messages[0]["content"] if self.messages and self.messages[0]["role"] == "system" else None

    @exclusive
    def set_system(self, text: Optional[str]) -> None:
        """Set (or with None / "" remove) the system prompt; the rest of the history stays."""
        if text is not None and not isinstance(text, str):
            raise TypeError(f"the system prompt must be a string or None, got {type(text).__name__}")
        rest = self.messages[1:] if self.system is not None else self.messages
        self.messages = ([{"role": "system", "content": text}] if text else []) + rest

    @exclusive
    def reset(self) -> None:
        """Forget every turn; the system prompt stays."""
        self.messages = self.messages[:1] if self.system is not None else []

    def to_json(self) -> str:
        return json.dumps({"messages": self.messages}, ensure_ascii=False, indent=2) + "\n"

    def save(self, path) -> None:
        """Write the history as JSON, atomically: a temporary file in the same folder renamed over
        ``path``, so a failed save leaves the previous file as it was. An existing file is replaced
        only when it is a conversation written by :meth:`save` (or empty): anything else is a
        ValueError and stays untouched."""
        atomic_write_text(path, self.to_json(), may_replace=_check_replaceable)

    @exclusive
    def load(self, path) -> None:
        """Replace the history with a file written by :meth:`save`; a bad file raises ValueError,
        and so does a conversation that the chat template refuses (also when a user message follows
        it). The history is unchanged by a failed load."""
        messages = read_messages(path)
        try:
            if messages or not self.chat:  # no message at all (a fresh or /reset conversation) is always valid
                self.encode(messages, add_generation_prompt=False)
            if self.chat:
                self.encode(messages + [{"role": "user", "content": "Hello"}])
        except ChatTemplateError as e:
            raise ChatTemplateError(f"{path}: the chat template cannot continue this conversation: {e}") from None
        except ValueError as e:  # text that cannot be encoded
            raise ValueError(f"{path}: {e}") from None
        self.messages = [dict(m) for m in messages]

    def encode(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> List[int]:
        """Token ids of ``messages`` as this conversation feeds them to the model."""
        tok = self.llm.tokenizer
        if self.chat:
            return tok.encode_chat(list(messages), add_generation_prompt)
        return tok.encode("".join(m["content"] for m in messages), bos=tok.add_bos)

    # -- a turn -------------------------------------------------------------------------------

    @exclusive
    def send(
        self,
        text: str,
        max_new_tokens: int = 256,
        sampling: SamplingParams = SamplingParams(),
        on_text: Optional[Callable[[str], None]] = None,
        should_stop: Optional[Callable[[], bool]] = None,
        stop: Union[str, Sequence[str], None] = (),
    ) -> TurnStats:
        """Add a user message, generate the reply, and keep both in the history and the cache.

        The reply runs through ``Llama.stream`` on this conversation's cache (the same text path
        as ``Llama.generate``: stop ids, stop strings, whole characters).

        Args:
            on_text: called with each piece of reply text as it is decoded.
            should_stop: polled after each piece of text; True ends the reply ("interrupted"), which
                is kept as it stands. A KeyboardInterrupt inside also keeps the partial reply, then
                propagates.
            stop: a stop string or a list of them (as ``Llama.generate``); the reply is cut before
                the first one found.
        Raises:
            ContextOverflowError: the turn does not fit (policy "error", or too long on its own).
        """
        if not isinstance(text, str):
            raise TypeError(f"send takes a str, got {type(text).__name__}")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        if sampling.repetition_penalty != 1.0:  # it would see only the part of the history not cached
            raise ValueError(f"repetition_penalty {sampling.repetition_penalty} is not supported in a "
                             f"Conversation (a turn prefills only what the cache lacks); use 1, or "
                             f"presence_penalty / frequency_penalty, which see the reply's tokens")
        messages, target, dropped = self._fit(self.messages + [{"role": "user", "content": text}], max_new_tokens)
        keep = 0
        for a, b in zip(self.cached_ids, target[:-1]):  # at least one token is prefilled, for logits
            if a != b:
                break
            keep += 1
        self._cut(keep)
        self._reserve(len(target) + max_new_tokens)

        stream = self.llm.stream(
            target[keep:], max_new_tokens, temperature=sampling.temperature, top_k=sampling.top_k,
            top_p=sampling.top_p, min_p=sampling.min_p, seed=sampling.seed, stop=stop, cache=self.cache,
            presence_penalty=sampling.presence_penalty, frequency_penalty=sampling.frequency_penalty,
            logit_bias=dict(sampling.logit_bias),
        )
        pieces: List[str] = []
        start = time.perf_counter()
        try:
            for delta in stream:
                pieces.append(delta)
                if on_text is not None:
                    on_text(delta)
                if should_stop is not None and not stream.done and should_stop():
                    stream.interrupt()
        finally:
            # keep what the cache holds, whatever stopped the reply (an interrupt may fall between
            # the two updates of KVCache.advance, so set the device copy from the host copy)
            self.cache.set_lengths(self.cache.seq_lens_cpu)
            reply = target + stream.token_ids
            self.cached_ids = reply[: self.cache.seq_lens_cpu[0]]
            self.messages = messages + [{"role": "assistant", "content": "".join(pieces)}]
        end = time.perf_counter()
        times = stream.times
        first = start + times.prefill_s if times.step_s else end
        return TurnStats(
            prefill_tokens=len(target) - keep,
            reused_tokens=keep,
            new_tokens=len(stream.token_ids),
            ttft_s=first - start,
            decode_s=end - first,
            finish_reason=stream.result.finish_reason,
            dropped_turns=dropped,
        )

    def _fit(self, messages: List[dict], max_new_tokens: int):
        """(messages, their ids with the assistant header, turns dropped) that leave room for the reply."""
        dropped = 0
        while True:
            target = self.encode(messages)
            need = len(target) + max_new_tokens
            if need <= self.max_context:
                return messages, target, dropped
            if self.on_overflow == "error":
                raise ContextOverflowError(
                    f"the conversation needs {len(target)} tokens + max_new_tokens {max_new_tokens} = {need}, "
                    f"more than the context of {self.max_context}; start over (/reset) or allow dropping old turns"
                )
            first = 1 if messages[0]["role"] == "system" else 0
            if len(messages) - first <= 1:
                raise ContextOverflowError(
                    f"this message needs {len(target)} tokens + max_new_tokens {max_new_tokens} = {need}, more "
                    f"than the context of {self.max_context} even without history; shorten it or lower max_new_tokens"
                )
            end = first + 1  # drop the oldest user message and the replies that follow it
            while end < len(messages) - 1 and messages[end]["role"] != "user":
                end += 1
            messages = messages[:first] + messages[end:]
            dropped += 1

    def _cut(self, keep: int) -> None:
        """Keep only the first ``keep`` cached tokens."""
        self.cached_ids = self.cached_ids[:keep]
        if self.cache is not None:
            self.cache.set_lengths([keep])

    def _reserve(self, need: int) -> None:
        """Make the cache hold at least ``need`` tokens (<= max_context), keeping its contents."""
        if self.cache is not None and self.cache.max_len >= need:
            return
        size = min(self.max_context, max(need, MIN_CACHE, 2 * (self.cache.max_len if self.cache else 0)))
        if self.cache is None:
            self.cache = self.llm.new_cache(1, size)
        else:
            self.cache.grow(size)


def read_messages(path) -> List[dict]:
    """The messages of a conversation file written by :meth:`Conversation.save`; ValueError otherwise."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    messages = data.get("messages") if isinstance(data, dict) else None
    if not isinstance(messages, list):
        raise ValueError(f"{path} holds no 'messages' list; expected {{\"messages\": [{{\"role\", \"content\"}}, ...]}}")
    for i, m in enumerate(messages):
        if (not isinstance(m, dict) or set(m) != {"role", "content"} or m["role"] not in ROLES
                or not isinstance(m["content"], str)):
            raise ValueError(f"{path}: message {i} is not a {{\"role\": {'/'.join(ROLES)}, \"content\": str}} dict")
    return messages


def _check_replaceable(path: Path) -> None:
    """Refuse (ValueError) to overwrite a non-empty file that is not a saved conversation."""
    if path.stat().st_size == 0:
        return
    try:
        read_messages(path)
    except ValueError:
        raise ValueError(
            f"{path} exists and is not a conversation saved by /save; not overwriting it: pick another file name"
        ) from None
