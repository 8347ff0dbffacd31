"""Every layer of the model calls flashcore's Triton kernel under the Triton backend (CUDA, or the CPU
under TRITON_INTERPRET=1) and flashcore's reference under the torch backend: chosen at construction."""
import pytest
import torch

import flashcore
import flashcore.triton_attention as triton_attention
from flashcore import reference
from minillama.runner import Runner
from tests.test_backends import interpreted, tiny_model, with_backend


def count_calls(monkeypatch):
    """Wrap the kernel entry and the reference; return their call counters."""
    calls = {"triton": 0, "reference": 0}
    kernel, ref = triton_attention.triton_attention_with_kv_cache, reference.attention_with_kv_cache

    def counted_kernel(*args, **kwargs):
        calls["triton"] += 1
        return kernel(*args, **kwargs)

    def counted_reference(*args, **kwargs):
        calls["reference"] += 1
        return ref(*args, **kwargs)

    monkeypatch.setattr(triton_attention, "triton_attention_with_kv_cache", counted_kernel)
    monkeypatch.setattr(flashcore.reference, "attention_with_kv_cache", counted_reference)
    return calls


def prefill_and_decode(model):
    """Logits of a 5-token prefill and one decode step, through a cache (eager: no graphs)."""
    runner = Runner(model, cuda_graphs=False)
    device = runner.device
    cache = runner.new_cache(2, 8)
    tokens = torch.tensor([[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]], device=device)
    first = runner(tokens, cache)
    cache.advance(5)
    second = runner(tokens[:, :1], cache)
    cache.advance(1)
    return torch.cat([first, second], dim=1).float()


def check_dispatch(monkeypatch, device):
    model = tiny_model(seed=0, layers=3, head_dim=16, device=device, backend="triton")
    calls = count_calls(monkeypatch)
    kernel_logits = prefill_and_decode(model)
    assert calls == {"triton": 2 * 3, "reference": 0}  # 2 forwards x 3 layers

    reference_logits = prefill_and_decode(with_backend(model, "torch"))
    assert calls == {"triton": 6, "reference": 6}
    torch.testing.assert_close(kernel_logits, reference_logits, rtol=1e-4, atol=1e-4)


@pytest.mark.triton
@interpreted
def test_model_calls_the_kernel_in_every_layer_on_cpu_interpreter(monkeypatch):
    check_dispatch(monkeypatch, "cpu")


@pytest.mark.gpu
def test_model_calls_the_kernel_in_every_layer_on_cuda(monkeypatch):
    check_dispatch(monkeypatch, "cuda")


@pytest.mark.gpu
def test_generate_on_cuda_uses_triton_and_matches_torch(tmp_path):
    from minillama import Llama
    from tests.checkpoints import write_checkpoint

    write_checkpoint(tmp_path, hidden_size=128, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=256,
                     tokenizer="sentencepiece", rope_scaling="llama3")
    prompts = ["the quick brown fox", "a"]
    fast = Llama.from_pretrained(tmp_path, device="cuda", dtype="float32")
    assert fast.model.backend.name == "triton" and fast.runner.cuda_graphs
    plain = Llama.from_pretrained(tmp_path, device="cuda", dtype="float32", backend="torch")
    assert plain.model.backend.name == "torch"
    got = [r.token_ids for r in fast.generate(prompts, max_new_tokens=24)]
    want = [r.token_ids for r in plain.generate(prompts, max_new_tokens=24)]
    assert got == want
