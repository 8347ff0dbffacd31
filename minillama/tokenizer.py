"""Tokenizers of Hugging Face checkpoints: ``tokenizer.json`` through the `tokenizers` library, or a
SentencePiece ``tokenizer.model`` when that is all a checkpoint ships.

``encode`` treats its text as plain text: a string such as ``<|eot_id|>`` or ``<s>`` inside it is
spelled out as ordinary tokens, never turned into a special id. Special ids are inserted only by
code that means to (BOS here, turn markers in the chat encoder).
"""
import functools
import re
from pathlib import Path
from typing import Dict, FrozenSet, List, Optional, Sequence, Tuple

from minillama.files import checkpoint_file, read_json, read_text

SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")
_SURROGATE = re.compile("[\ud800-\udfff]")


def _token_content(value) -> Optional[str]:
    """tokenizer_config.json stores special tokens as strings or as {"content": ...} dicts."""
    if isinstance(value, dict):
        return value.get("content")
    return value


class Tokenizer:
    """Common interface. Subclasses implement _encode_plain, _decode, token_to_id, vocab_size, special_ids."""

    def __init__(self, tokenizer_config: dict, bos_id: Optional[int], eos_id: Optional[int], add_bos: bool):
        self.tokenizer_config = tokenizer_config
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.add_bos = add_bos  # what the checkpoint's tokenizer does by default
        self.chat_template = tokenizer_config.get("chat_template")
        self._chat_format = None  # built on the first encode_chat

    def encode(self, text: str, bos: bool = True) -> List[int]:
        """Token ids of ``text`` as plain text, with the BOS id first when ``bos`` and the tokenizer has one."""
        if not isinstance(text, str):
            raise TypeError(f"encode takes a str, got {type(text).__name__}")
        bad = _SURROGATE.search(text)
        if bad:
            raise ValueError(
                f"text holds a lone surrogate U+{ord(bad.group()):04X} at index {bad.start()} (bytes that were not "
                f"UTF-8, decoded with surrogateescape?); it is not text: decode such input with errors='replace'"
            )
        ids = self._encode_plain(text)
        if bos and self.bos_id is not None:
            ids = [self.bos_id] + ids
        return ids

    def encode_chat(self, messages: List[dict], add_generation_prompt: bool = True,
                    tools: Optional[List[dict]] = None, continue_final_message: bool = False) -> List[int]:
        """Token ids of ``{"role", "content"}`` messages through the checkpoint's chat template.

        Exact for ordinary messages; special-token text inside a content stays plain text.
        ``tools`` (OpenAI-style definitions) go through the template's tools branch; assistant
        ``tool_calls`` and ``tool`` messages too. ``continue_final_message`` (with
        ``add_generation_prompt=False``) ends the ids with the final message's content, its
        end-of-turn dropped, for the model to continue it. See :mod:`minillama.chat_format`. Raises
        ValueError when there is no chat template.
        """
        if self._chat_format is None:
            from minillama.chat_format import ChatFormat

            self._chat_format = ChatFormat(self)
        return self._chat_format.encode(messages, add_generation_prompt, tools, continue_final_message)

    def _encode_plain(self, text: str) -> List[int]:
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        """The text of ``ids``, special tokens included. An id outside [0, vocab_size) is a ValueError,
        raised before anything is decoded (SentencePiece would raise IndexError, the tokenizers library
        would skip the id or raise OverflowError)."""
        ids = list(ids)
        n = self.vocab_size
        bad = next((t for t in ids if not 0 <= t < n), None)
        if bad is not None:
            raise ValueError(f"cannot decode token id {bad}: the tokenizer's vocab_size is {n} (ids 0..{n - 1}); "
                             f"is it an id of another tokenizer or model?")
        return self._decode(ids)

    def _decode(self, ids: List[int]) -> str:
        raise NotImplementedError

    def token_to_id(self, token: str) -> Optional[int]:
        raise NotImplementedError

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for inside a text (its leading space included; a byte-fallback
        token is its one byte, maybe part of a character), e.g. for reporting log-probabilities."""
        raise NotImplementedError

    def added_tokens(self) -> Dict[str, Tuple[int, bool, bool]]:
        """Text of every special/added token -> (id, lstrip, rstrip), from tokenizer_config.json."""
        config = self.tokenizer_config
        found: Dict[str, Tuple[int, bool, bool]] = {}
        for i, tok in config.get("added_tokens_decoder", {}).items():
            found[tok["content"]] = (int(i), bool(tok.get("lstrip")), bool(tok.get("rstrip")))
        for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
            text = _token_content(config.get(key))
            if text and text not in found and self.token_to_id(text) is not None:
                found[text] = (self.token_to_id(text), False, False)
        return found

    @property
    def vocab_size(self) -> int:
        """One more than the largest id the tokenizer knows: ids >= this cannot be decoded."""
        raise NotImplementedError

    @property
    def special_ids(self) -> FrozenSet[int]:
        """The ids of special tokens (markers such as BOS, end of turn, headers, reserved ones): what
        a decode with transformers' ``skip_special_tokens=True`` leaves out."""
        raise NotImplementedError

    def undecodable_ids(self) -> List[int]:
        """Ids below ``vocab_size`` that the tokenizer does not know (holes in its id range)."""
        return []

    @classmethod
    def from_dir(cls, folder) -> "Tokenizer":
        folder = Path(folder)
        config_path = checkpoint_file(folder, "tokenizer_config.json")
        config = read_json(config_path) if config_path is not None else {}
        _check_tokenizer_config(config, config_path)
        # newer checkpoints keep the template apart; as in transformers, that file wins over tokenizer_config.json's
        template_path = checkpoint_file(folder, "chat_template.jinja")
        if template_path is not None:
            config["chat_template"] = read_text(template_path)
        named = sorted((folder / "additional_chat_templates").glob("*.jinja"))  # transformers 5: one file per name
        if named:
            base, names = config.get("chat_template"), {p.stem for p in named}
            templates = ([{"name": "default", "template": base}] if isinstance(base, str) else
                         [t for t in base if not (isinstance(t, dict) and t.get("name") in names)]
                         if isinstance(base, list) else [])
            config["chat_template"] = templates + [{"name": p.stem, "template": read_text(p)} for p in named]
        if checkpoint_file(folder, "tokenizer.json") is not None:
            return HFTokenizer(folder / "tokenizer.json", config)
        if checkpoint_file(folder, "tokenizer.model") is not None:
            return SentencePieceTokenizer(folder / "tokenizer.model", config)
        raise FileNotFoundError(
            f"no tokenizer.json or tokenizer.model in {folder}: the checkpoint must ship its tokenizer"
        )


def _check_tokenizer_config(config: dict, path: Optional[Path]) -> None:
    """The keys of tokenizer_config.json that minillama reads, checked for their JSON types."""
    def fail(key, expected):
        raise ValueError(f"{path}: {key} must be {expected}, got {config[key]!r}")

    for key in SPECIAL_TOKEN_KEYS:
        value = config.get(key)
        if isinstance(value, dict):
            value = value.get("content")
        if value is not None and not isinstance(value, str):
            fail(key, 'a string, {"content": string, ...} or null')
    if config.get("add_bos_token") is not None and not isinstance(config["add_bos_token"], bool):
        fail("add_bos_token", "true, false or null")
    template = config.get("chat_template")
    if template is not None and not isinstance(template, str) and not (
            isinstance(template, list) and all(isinstance(t, dict) and isinstance(t.get("name"), str)
                                               and isinstance(t.get("template"), str) for t in template)):
        fail("chat_template", 'a string or a list of {"name": string, "template": string}')
    decoder = config.get("added_tokens_decoder")
    if decoder is not None and not (isinstance(decoder, dict) and all(
            k.isdigit() and isinstance(v, dict) and isinstance(v.get("content"), str) for k, v in decoder.items())):
        fail("added_tokens_decoder", 'an object {"<id>": {"content": string, ...}, ...}')


class HFTokenizer(Tokenizer):
    def __init__(self, path: Path, tokenizer_config: dict):
        from tokenizers import Tokenizer as RustTokenizer, decoders

        try:
            self._tok = RustTokenizer.from_file(str(path))
        except Exception as e:  # the library raises a bare Exception for bad files
            raise ValueError(f"{path} is not a valid tokenizer.json: {e}") from None
        self._tok.encode_special_tokens = True  # text is text: "<|eot_id|>" in a message is not a marker
        _check_added_token_ids(path, self._tok)
        self._ids = None  # (vocab_size, undecodable ids), see _id_range
        # read once for token_bytes, which runs for every token of a logprobs response: the library
        # builds a new dict of every added token on each get_added_tokens_decoder() (~0.2 ms)
        self._added_ids = frozenset(self._tok.get_added_tokens_decoder())
        self._byte_level = isinstance(self._tok.decoder, decoders.ByteLevel)  # GPT-2 style: a character per byte
        bos = _token_content(tokenizer_config.get("bos_token"))
        eos = _token_content(tokenizer_config.get("eos_token"))
        bos_id = self._tok.token_to_id(bos) if bos else None
        eos_id = self._tok.token_to_id(eos) if eos else None
        # The post-processor alone decides, as in transformers 5: with a tokenizer.json, from_pretrained
        # drops tokenizer_config.json's add_bos_token (Llama 3.1 has none; its TemplateProcessing adds
        # <|begin_of_text|>), so a BOS comes first exactly when the post-processor puts one there.
        with_special = self._tok.encode("a", add_special_tokens=True).ids
        plain = self._tok.encode("a", add_special_tokens=False).ids
        add_bos = len(with_special) > len(plain) and with_special[0] != plain[0]
        if add_bos and bos_id is None:
            bos_id = with_special[0]
        super().__init__(tokenizer_config, bos_id, eos_id, add_bos)

    def _encode_plain(self, text: str) -> List[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def _decode(self, ids: List[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=False)

    def token_to_id(self, token: str) -> Optional[int]:
        return self._tok.token_to_id(token)

    def added_tokens(self) -> Dict[str, Tuple[int, bool, bool]]:
        return {t.content: (i, t.lstrip, t.rstrip) for i, t in self._tok.get_added_tokens_decoder().items()}

    @functools.cached_property
    def special_ids(self) -> FrozenSet[int]:
        """The added tokens marked special in tokenizer.json (Llama 3: all 256 of 128000-128255)."""
        return frozenset(i for i, t in self._tok.get_added_tokens_decoder().items() if t.special)

    def token_bytes(self, token_id: int) -> bytes:
        piece = self._tok.id_to_token(int(token_id)) or ""
        if int(token_id) in self._added_ids:
            return piece.encode()
        if self._byte_level:
            table = _byte_level_decoder()
            return bytes(table[c] for c in piece) if all(c in table for c in piece) else piece.encode()
        return _piece_bytes(piece)

    @property
    def vocab_size(self) -> int:
        return self._id_range()[0]

    def undecodable_ids(self) -> List[int]:
        return self._id_range()[1]

    def _id_range(self) -> Tuple[int, List[int]]:
        """(largest id + 1, the ids below it that no token has), computed once."""
        if self._ids is None:
            known = set(self._tok.get_vocab(with_added_tokens=True).values())
            size = max(known) + 1 if known else 0
            self._ids = (size, [] if len(known) == size else sorted(set(range(size)) - known))
        return self._ids


def _check_added_token_ids(path: Path, tok) -> None:
    """Every added token has the id tokenizer.json gives it. The tokenizers library numbers an added
    token that model.vocab lacks from len(model.vocab) on, whatever the file says (it only logs a
    warning), so holes in the vocabulary or a gap before an added token shift ids silently."""
    import json

    for entry in json.loads(path.read_text(encoding="utf-8")).get("added_tokens") or []:
        content, file_id = entry.get("content"), entry.get("id")
        if isinstance(content, str) and isinstance(file_id, int):
            got = tok.token_to_id(content)
            if got != file_id:
                raise ValueError(
                    f"{path}: added token {content!r} has id {file_id} in the file, but the tokenizers library "
                    f"gives it {got} (it numbers added tokens that model.vocab lacks from len(model.vocab) on, so "
                    f"holes in the vocabulary or a gap before the added tokens shift them); list such a token in "
                    f"model.vocab with its id"
                )


class SentencePieceTokenizer(Tokenizer):
    def __init__(self, path: Path, tokenizer_config: dict):
        import sentencepiece as spm

        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.Load(str(path))
        except (OSError, RuntimeError) as e:
            raise ValueError(f"{path} is not a valid SentencePiece model: {e}") from None
        bos_id = self._sp.bos_id() if self._sp.bos_id() >= 0 else None
        eos_id = self._sp.eos_id() if self._sp.eos_id() >= 0 else None
        # absent: True, the default transformers' LlamaTokenizer documents and Llama 2 uses (a choice: the code
        # of transformers 5.24 adds no BOS then, against its docstring)
        add_bos = tokenizer_config.get("add_bos_token", True)
        super().__init__(tokenizer_config, bos_id, eos_id, bool(add_bos))
        self._anchor: Optional[Tuple[int, str]] = None  # see _anchor_piece

    def _encode_plain(self, text: str) -> List[int]:
        return self._sp.EncodeAsIds(text)

    def _decode(self, ids: List[int]) -> str:
        """As transformers decodes a SentencePiece vocabulary: control and unknown ids as their piece
        ("<s>", "</s>", "<unk>"; SentencePiece drops the first two and shows the last as " ⁇ "), the
        ids between them by SentencePiece, which drops the leading space of the text only. (Byte
        pieces that are not UTF-8 stay SentencePiece's: fewer U+FFFD than transformers' one per byte.)"""
        sp, text, run = self._sp, [], []
        for i in ids + [None]:
            if i is not None and not (sp.IsControl(i) or sp.IsUnknown(i)):
                run.append(i)
                continue
            if run:
                if text:  # within the text: decoded after a piece of no space, which is then cut off
                    anchor, anchor_text = self._anchor_piece()
                    text.append(sp.DecodeIds([anchor] + run)[len(anchor_text):])
                else:
                    text.append(sp.DecodeIds(run))
                run = []
            if i is not None:
                text.append(sp.IdToPiece(i))
        return "".join(text)

    def _anchor_piece(self) -> Tuple[int, str]:
        """A normal piece that does not begin with a space (SentencePiece's "\u2581"): its id and text."""
        if self._anchor is None:
            sp = self._sp
            anchor = next(i for i in range(sp.GetPieceSize())
                          if not (sp.IsControl(i) or sp.IsUnknown(i) or sp.IsByte(i) or sp.IsUnused(i))
                          and not sp.IdToPiece(i).startswith("\u2581"))
            self._anchor = (anchor, sp.DecodeIds([anchor]))
        return self._anchor

    def token_bytes(self, token_id: int) -> bytes:
        return _piece_bytes(self._sp.IdToPiece(int(token_id)))

    def token_to_id(self, token: str) -> Optional[int]:
        i = self._sp.PieceToId(token)
        return None if i == self._sp.unk_id() and token != self._sp.IdToPiece(i) else i

    @property
    def vocab_size(self) -> int:
        return self._sp.GetPieceSize()

    @functools.cached_property
    def special_ids(self) -> FrozenSet[int]:
        """Control and unknown pieces ("<s>", "</s>", "<unk>"), as transformers' LlamaTokenizer skips them."""
        sp = self._sp
        return frozenset(i for i in range(sp.GetPieceSize()) if sp.IsControl(i) or sp.IsUnknown(i))


def _piece_bytes(piece: str) -> bytes:
    """SentencePiece-style piece: "<0x0A>" is one byte, "\u2581" a space."""
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        try:
            return bytes([int(piece[3:5], 16)])
        except ValueError:
            pass
    return piece.replace("\u2581", " ").encode()


@functools.cache
def _byte_level_decoder() -> Dict[str, int]:
    """GPT-2's byte-to-unicode table, inverted: the character a byte-level piece uses -> the byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) \
        + list(range(ord("\xae"), ord("\xff") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[chr(b)] = b
        else:
            table[chr(256 + extra)] = b
            extra += 1
    return table
