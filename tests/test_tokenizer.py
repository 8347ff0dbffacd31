"""The tokenizer classes on their own: ids they cannot decode, and which file decides the BOS."""
import pytest

from minillama.streaming import IncrementalDecoder
from minillama.tokenizer import Tokenizer
from tests.checkpoints import LLAMA3_VOCAB_SIZE, sentencepiece_vocab_size, write_llama3_tokenizer, \
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
