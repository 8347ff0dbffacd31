"""Token ids to text, one token at a time, with the exact text of a full decode.

Two small pieces, used by ``Llama.generate``, ``Llama.stream`` and the chat front end:

- :class:`IncrementalDecoder` turns new token ids into text deltas. Decoding the new ids alone is
  wrong for SentencePiece / Llama-2-style tokenizers, which drop the leading space of the first
  piece ("Lily" + "▁and▁Tom" would give "and Tom", not " and Tom"). So each step decodes a short
  window that starts inside the text already known (the tail of the prompt, then the last emitted
  chunk) and emits only the suffix the new id adds. While the text ends in U+FFFD (an incomplete
  UTF-8 sequence, e.g. the first bytes of an emoji spelled with byte-fallback tokens) nothing is
  emitted; the character comes out whole once its last byte arrives. The deltas, followed by
  :meth:`IncrementalDecoder.flush`, concatenate to exactly ``decode(prompt + new)`` minus
  ``decode(prompt)`` (a leading BOS of the prompt is left out of both, so a continuation of a bare
  BOS reads as the start of a text). That holds whenever the decoded text only grows at its end,
  which is true of any valid UTF-8 output; for invalid byte sequences (random weights, a prompt
  of ids that ends inside a character) the deltas are the decoder's best reading and still
  concatenate to :attr:`IncrementalDecoder.text`.

- :class:`StopStrings` watches that text for stop strings. It holds back any tail that could be
  the start of a stop string until the next text decides it, and cuts the text before the first
  stop string found. Text pushed with ``may_stop=False`` (vLLM's ``min_tokens``: the text of a
  row's first tokens) ends no stop string, though one may begin in it.

Typical use (one row)::

    decoder = IncrementalDecoder(tokenizer, prompt_ids)
    stops = StopStrings(["\\n\\n", "THE END"])
    for token_id in new_ids:
        text, matched = stops.push(decoder.push(token_id))
        print(text, end="")
        if matched is not None:  # the row is done; ``matched`` is the stop string
            break
    else:
        print(stops.push(decoder.flush())[0] + stops.flush(), end="")
"""
from typing import AbstractSet, List, Optional, Sequence, Tuple

REPLACEMENT_CHAR = "\ufffd"  # what a decoder writes for bytes that are not (yet) valid UTF-8
PROMPT_CONTEXT = 8  # prompt ids decoded in front of the first new ids; any count >= 1 gives the same text


class IncrementalDecoder:
    """Text deltas of a growing sequence of token ids.

    Args:
        tokenizer: a ``minillama.tokenizer.Tokenizer`` (anything with ``decode(ids) -> str`` and
            ``bos_id``).
        prompt_ids: the ids the new ones continue (the prompt, or a whole conversation so far);
            only their last few are decoded.
        skip_special_tokens: new ids of ``tokenizer.special_ids`` add no text, as transformers'
            ``skip_special_tokens=True`` decodes: the text is that of the other new ids.
    """

    def __init__(self, tokenizer, prompt_ids: Sequence[int] = (), skip_special_tokens: bool = False):
        self.tokenizer = tokenizer
        self.skip_ids: AbstractSet[int] = tokenizer.special_ids if skip_special_tokens else frozenset()
        context = list(prompt_ids)
        if context and tokenizer.bos_id is not None and context[0] == tokenizer.bos_id:
            context = context[1:]  # "<s>" is not text, though decode writes it
        start = max(0, len(context) - PROMPT_CONTEXT)
        while start > 0 and tokenizer.decode(context[start:]).startswith(REPLACEMENT_CHAR):
            start -= 1  # begin at a character, not inside the bytes of one
        self._ids: List[int] = context[start:]
        self._start = 0  # the window decoded each step begins here
        self._read = len(self._ids)  # the text of ids before this index has been emitted
        self._window_text = tokenizer.decode(self._ids)  # decode(ids[_start:_read])
        self.token_ids: List[int] = []  # the new ids pushed so far
        self.text = ""  # everything emitted so far

    def push(self, token_id: int) -> str:
        """Add one new id; return the text it completes ("" while a character is incomplete). An id
        the tokenizer cannot decode raises its ValueError and leaves the decoder as it was."""
        token_id = int(token_id)
        if token_id in self.skip_ids:
            self.token_ids.append(token_id)
            return ""
        full = self.tokenizer.decode(self._ids[self._start:] + [token_id])
        self._ids.append(token_id)
        self.token_ids.append(token_id)
        if full.endswith(REPLACEMENT_CHAR):
            return ""  # possibly the first bytes of a character: wait for the rest (or flush)
        return self._emit(full)

    def flush(self) -> str:
        """The text held back at the end (bytes that never formed a character decode as U+FFFD)."""
        if self._read == len(self._ids):
            return ""
        return self._emit(self.tokenizer.decode(self._ids[self._start:]))

    def _emit(self, full: str) -> str:
        if full.startswith(self._window_text):
            delta = full[len(self._window_text):]
        else:
            # Only invalid bytes get here: the prompt ended inside a character, or a byte run
            # that later turned invalid (HF's ByteFallback then rewrites the whole run as U+FFFD).
            # Emitted text cannot be taken back, so the new ids are decoded on their own.
            delta = self.tokenizer.decode(self._ids[self._read:])
        # the next window starts at the ids of this delta: a character boundary inside known text.
        # Not at ids that added no text (SentencePiece's <s>, </s>): a decode that begins there
        # drops the leading space of the piece after them, as it does at the start of a text.
        if delta:
            self._start = self._read
        self._read = len(self._ids)
        self._window_text = self.tokenizer.decode(self._ids[self._start:self._read])
        self.text += delta
        return delta


class StopStrings:
    """Find the first of several stop strings in text that arrives in pieces.

    ``push`` returns the text that is now safe to show and the stop string when one was found (then
    the returned text is everything before it, and later pushes return nothing). When several stop
    strings occur, the one whose last character comes first wins. Text that might
    be the start of a stop string is held back until it is decided; :meth:`flush` releases it at
    the end of generation. A stop string counts only where it ends in text pushed with ``may_stop``
    (as vLLM's detokenizer searches for them after ``min_tokens`` tokens: from the first character
    that may end one).
    """

    def __init__(self, stops: Sequence[str] = ()):
        stops = list(stops)
        for s in stops:
            if not isinstance(s, str) or s == "":
                raise ValueError(f"stop strings must be non-empty strings, got {s!r}")
        self.stops = stops
        self.matched: Optional[str] = None
        self._pending = ""  # text received but not yet returned
        self._no_end = 0  # characters at the start of _pending that end no stop string (pushed without may_stop)

    def push(self, text: str, may_stop: bool = True) -> Tuple[str, Optional[str]]:
        """Take the next text; ``may_stop`` False: no stop string may end in it."""
        if self.matched is not None:
            return "", self.matched
        pending = self._pending + text
        if not self.stops:
            self._pending = ""
            return pending, None
        no_end = self._no_end if may_stop else len(pending)
        # the stop that is complete first (smallest end; then the longest) wins, however the
        # text was split into pieces
        first = None  # (end, -len, start, stop)
        for s in self.stops:
            i = pending.find(s, max(no_end - len(s) + 1, 0))  # the first one that ends past no_end
            if i >= 0:
                key = (i + len(s), -len(s), i, s)
                first = key if first is None else min(first, key)
        if first is not None:
            self.matched = first[3]
            self._pending = ""
            return pending[: first[2]], self.matched
        hold = self._partial_len(pending)
        self._pending = pending[len(pending) - hold:]
        self._no_end = max(no_end - (len(pending) - hold), 0)
        return pending[: len(pending) - hold], None

    def flush(self) -> str:
        """Release held-back text once no more text will come."""
        out, self._pending = self._pending, ""
        return "" if self.matched is not None else out

    def _partial_len(self, text: str) -> int:
        """Length of the longest tail of ``text`` that is a proper prefix of some stop string."""
        best = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best
