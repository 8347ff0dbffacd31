"""The tokenizer classes on their own: ids they cannot decode, and which file decides the BOS."""
import json
import shutil

import pytest
from tokenizers import Tokenizer as RustTokenizer

from minillama.streaming import IncrementalDecoder
from minillama.tokenizer import Tokenizer
from tests.checkpoints import BEGIN_OF_TEXT, LLAMA3_VOCAB_SIZE, sentencepiece_vocab_size, write_llama3_tokenizer, \
    write_sentencepiece_tokenizer


@pytest.fixture(scope="module")
def llama3_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama3_tok")
    write_llama3_tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def tokenizers(llama3_folder, tmp_path_factory):
    sp_folder = tmp_path_factory.mktemp("sp_tok")
    write_sentencepiece_tokenizer(sp_folder)
    return {"llama3": Tokenizer.from_dir(llama3_folder), "sentencepiece": Tokenizer.from_dir(sp_folder)}


# -- ids outside the vocabulary ------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["llama3", "sentencepiece"])
def test_an_id_outside_the_vocabulary_is_a_value_error_naming_it(tokenizers, kind):
    """SentencePiece raised a bare IndexError; the tokenizers library skipped the id (or raised
    OverflowError for a negative one), so both now raise the same ValueError before decoding."""
    tok = tokenizers[kind]
    n = {"llama3": LLAMA3_VOCAB_SIZE, "sentencepiece": sentencepiece_vocab_size()}[kind]
    assert tok.vocab_size == n
    lily = tok.encode("Lily", bos=False)
    assert tok.decode(lily + [n - 1])  # the last id decodes
    for bad in (n, n + 1000, -1):
        message = (f"cannot decode token id {bad}: the tokenizer's vocab_size is {n} (ids 0..{n - 1}); "
                   f"is it an id of another tokenizer or model?")
        with pytest.raises(ValueError) as e:
            tok.decode(lily + [bad])
        assert str(e.value) == message
        with pytest.raises(ValueError) as e:
            IncrementalDecoder(tok, lily + [bad])
        assert str(e.value) == message
        # streaming: the same error, and the decoder is left as it was
        decoder = IncrementalDecoder(tok, tok.encode("Lily", bos=True))
        and_tom = tok.encode("Lily and Tom", bos=False)[len(lily):]
        first = decoder.push(and_tom[0])
        with pytest.raises(ValueError) as e:
            decoder.push(bad)
        assert str(e.value) == message
        rest = [decoder.push(t) for t in and_tom[1:]] + [decoder.flush()]
        assert first + "".join(rest) == decoder.text == " and Tom"
        assert decoder.token_ids == and_tom


# -- who decides the BOS -------------------------------------------------------------------------

@pytest.mark.parametrize("add_bos_token, post_processor_bos", [(False, True), (True, False)])
def test_tokenizer_json_post_processor_decides_the_bos_over_add_bos_token(llama3_folder, tmp_path, add_bos_token,
                                                                          post_processor_bos):
    """transformers 5 drops tokenizer_config.json's add_bos_token when a tokenizer.json is there:
    AutoTokenizer adds <|begin_of_text|> exactly when the post-processor does, whatever the flag says
    (checked with transformers 5.24 for PreTrainedTokenizerFast, LlamaTokenizerFast, LlamaTokenizer)."""
    folder = tmp_path / "tok"
    shutil.copytree(llama3_folder, folder)
    spec = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    byte_level, template = spec["post_processor"]["processors"]  # Llama 3.1's: ByteLevel, then the BOS template
    assert template["single"][0] == {"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}}
    if not post_processor_bos:
        spec["post_processor"]["processors"] = [byte_level]
    (folder / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert "add_bos_token" not in config  # as in Llama-3.1-8B-Instruct
    (folder / "tokenizer_config.json").write_text(json.dumps(dict(config, add_bos_token=add_bos_token)))

    tok = Tokenizer.from_dir(folder)
    text = tok.encode("Lily", bos=False)
    assert tok.add_bos is post_processor_bos
    assert tok.bos_id == BEGIN_OF_TEXT
    assert tok.encode("Lily", bos=tok.add_bos) == ([BEGIN_OF_TEXT] if post_processor_bos else []) + text
    assert tok.encode("Lily", bos=tok.add_bos) == RustTokenizer.from_file(str(folder / "tokenizer.json")).encode(
        "Lily").ids  # what the post-processor itself gives


# -- special tokens in decoded text -----------------------------------------------------------------

def test_sentencepiece_decodes_special_tokens_as_transformers_does(tokenizers):
    """Control and unknown ids decode as their pieces, each run of other pieces keeps its leading
    space but at the start of the text: what transformers 5.24 decodes for a SentencePiece vocabulary
    (checked by hand on 2000 random id sequences of Llama 2's tokenizer.model; they differed only
    where byte pieces are not UTF-8). SentencePiece drops <s> and </s> and writes <unk> as " ⁇ "."""
    tok = tokenizers["sentencepiece"]
    lily, tom = tok.encode("Lily", bos=False), tok.encode("and Tom", bos=False)
    bos, eos, unk = tok.bos_id, tok.eos_id, 0
    assert tok.decode([bos] + lily) == "<s> Lily"
    assert tok.decode(lily + [eos]) == "Lily</s>"
    assert tok.decode(lily + [eos] + tom) == "Lily</s> and Tom"
    assert tok.decode(lily + [unk, eos, bos] + tom) == "Lily<unk></s><s> and Tom"
    assert tok.decode(lily + tom) == "Lily and Tom"  # no special token: SentencePiece's own decode


# -- special tokens left out of the text (vLLM's skip_special_tokens) -------------------------------

@pytest.mark.parametrize("kind", ["llama3", "sentencepiece"])
def test_a_decoder_that_skips_special_ids_gives_the_text_without_them(tokenizers, llama3_folder, kind):
    """``special_ids`` are what transformers' skip_special_tokens leaves out: Llama 3's 256 added
    tokens (checked against the tokenizers library's own decode), SentencePiece's control and
    unknown pieces. A decoder told to skip them streams the text of the other new ids."""
    tok = tokenizers[kind]
    if kind == "llama3":
        assert tok.special_ids == frozenset(range(128000, 128256))
        rust = RustTokenizer.from_file(str(llama3_folder / "tokenizer.json"))

        def without_specials(ids):
            return rust.decode(ids, skip_special_tokens=True)
    else:
        sp = tok._sp
        assert tok.special_ids == {sp.unk_id(), sp.bos_id(), sp.eos_id()}

        def without_specials(ids):
            return tok.decode([i for i in ids if i not in tok.special_ids])
    s0, s1, s2 = sorted(tok.special_ids)[:3]
    prompt = tok.encode("Once upon a time", bos=True)
    space = " " if kind == "llama3" else ""  # SentencePiece starts each encoded text with one
    new = (tok.encode(space + "Lily and", bos=False) + [s1] + tok.encode(space + "Tom ran", bos=False) + [s2, s0]
           + tok.encode(space + "home!", bos=False) + [s1])
    decoder = IncrementalDecoder(tok, prompt, skip_special_tokens=True)
    text = "".join(decoder.push(i) for i in new) + decoder.flush()
    assert text == without_specials(prompt + new)[len(without_specials(prompt)):] == " Lily and Tom ran home!"
    assert decoder.token_ids == new
    kept = IncrementalDecoder(tok, prompt)  # the default: special tokens' text included
    text = "".join(kept.push(i) for i in new) + kept.flush()
    assert text == tok.decode(prompt + new)[len(tok.decode(prompt)):] and tok.decode([s1]) in text
