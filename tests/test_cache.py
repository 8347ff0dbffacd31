"""Cache consistency: generating with the cache equals re-scoring the whole sequence without it."""
import pytest
import torch

from minillama import Llama
from minillama.kv_cache import KVCache
from tests.checkpoints import write_checkpoint


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cache")
    write_checkpoint(folder, hidden_size=64, n_layers=2, n_heads=8, n_kv_heads=2, intermediate_size=96,
                     tokenizer="sentencepiece", rope_scaling="llama3", seed=3)
    return Llama.from_pretrained(folder, device="cpu")


def test_greedy_with_cache_equals_rescoring(llm):
    prompt = llm.tokenizer.encode("the cat sat on the mat", bos=True)
    (out,) = llm.generate([prompt], max_new_tokens=24)
    ids = prompt + out.token_ids
    logits = llm.logits(ids)  # one forward over everything, no cache kept
    rescored = logits[len(prompt) - 1 : -1].argmax(-1).tolist()
    assert rescored == out.token_ids


def test_decode_logits_equal_full_forward(llm):
    """Step-by-step decode through the cache gives the same logits as one forward, at every position."""
    ids = torch.randint(0, llm.config.vocab_size, (1, 20), generator=torch.Generator().manual_seed(0))
    full = llm.model(ids)[0]
    cache = KVCache.allocate(llm.config, 1, 32, "cpu", torch.float32)
    steps = []
    with torch.inference_mode():
        first = llm.model(ids[:, :7], cache)
        cache.advance(7)
        steps.append(first[0])
        for t in range(7, 20):
            steps.append(llm.model(ids[:, t : t + 1], cache)[0])
            cache.advance(1)
    stepped = torch.cat(steps)
    assert cache.seq_lens_cpu == [20] and cache.seq_lens.tolist() == [20]
    torch.testing.assert_close(stepped, full, rtol=1e-5, atol=1e-5)


def test_cache_sized_from_request(llm):
    """An 131072-position model with a short request allocates only what the request needs."""
    from minillama.generate import TokenLoop
    from minillama.sampling import SamplingParams

    loop = TokenLoop(llm.runner, [[1, 2, 3], [4] * 10], max_new_tokens=5, sampling=SamplingParams())
    assert llm.config.max_position_embeddings == 131072
    assert loop.cache.max_len == 15
    assert loop.cache.k.shape == (2, 2, 15, 2, 8)


def test_generate_continues_from_a_cache(llm):
    """Two calls on one cache give the tokens of one longer call; the cache holds all but the last."""
    prompt = llm.tokenizer.encode("the cat sat", bos=True)
    (whole,) = llm.generate([prompt], max_new_tokens=20)
    cache = llm.new_cache(1, 64)
    (first,) = llm.generate([prompt], max_new_tokens=8, cache=cache)
    assert cache.seq_lens_cpu == [len(prompt) + 7]  # the 8th token is sampled, not yet fed
    (second,) = llm.generate([first.token_ids[-1:]], max_new_tokens=12, cache=cache)
    assert first.token_ids + second.token_ids == whole.token_ids
    with pytest.raises(ValueError, match=r"cache has 1 row\(s\) but 2 prompt\(s\) were given"):
        llm.generate([prompt, prompt], max_new_tokens=2, cache=cache)
    with pytest.raises(ValueError, match="row 0: 26 cached \\+ 1 prompt tokens \\+ 40 new tokens need 66 cache slots"):
        llm.generate([[5]], max_new_tokens=40, cache=cache)
