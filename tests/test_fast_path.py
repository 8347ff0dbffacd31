"""The GPU fast path (fused projections + Triton elementwise/GEMV kernels + CUDA-graph decode)
computes the plain model's function.

CPU tests run the fused kernels in Triton's interpreter in float32 against the plain model (same
weights). GPU tests (``gpu`` marker) run bfloat16 on CUDA: the fast path against the plain path
on the same weights, and against the plain model in float32 on the CPU, teacher-forced along the
float32 greedy sequence so one ambiguous step cannot derail the comparison.
"""
import pytest
import torch

from minillama.config import LlamaConfig
from minillama.cuda_graphs import DecodeGraphs
from minillama.fused import FusedTransformer
from minillama.generate import TokenLoop
from minillama.kv_cache import KVCache
from minillama.model import Transformer

LLAMA31_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64}


def tiny_model(seed: int, hidden=64, layers=2, heads=4, kv_heads=2, head_dim=None, ffn=160, vocab=320,
               dtype=torch.float32, device="cpu") -> Transformer:
    config = LlamaConfig(
        hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, head_dim=head_dim, vocab_size=vocab, rms_norm_eps=1e-5,
        rope_theta=10000.0, rope_scaling=dict(LLAMA31_ROPE), max_position_embeddings=4096,
    )
    gen = torch.Generator().manual_seed(seed)
    model = Transformer(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))  # gains matter
            elif "tok_embeddings" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5)
    return model.to(device=device, dtype=dtype).eval()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).norm() / b.norm()).item()


def prompts_for(seed: int, lengths, vocab: int):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in lengths]


def teacher_forced_logits(forward, model: Transformer, prompts, continuations, device):
    """Logits (steps, B, V) float32: prefill the prompts, then feed ``continuations`` (B, steps)."""
    cache = KVCache.allocate(model.config, len(prompts), max(map(len, prompts)) + continuations.shape[1] + 1,
                             device, model.tok_embeddings.weight.dtype)
    width = max(map(len, prompts))
    tokens = torch.zeros(len(prompts), width, dtype=torch.long)
    for b, p in enumerate(prompts):
        tokens[b, : len(p)] = torch.tensor(p)
    last = torch.tensor([len(p) - 1 for p in prompts])
    out = []
    with torch.inference_mode():
        logits = forward(tokens.to(device), cache.k, cache.v, cache.seq_lens,
                         seq_lens_cpu=cache.lengths, logits_at=last.to(device))
        cache.advance([len(p) for p in prompts])
        out.append(logits[:, -1].float().cpu())
        for t in range(continuations.shape[1] - 1):
            step = continuations[:, t : t + 1].to(device)
            logits = forward(step, cache.k, cache.v, cache.seq_lens, seq_lens_cpu=cache.lengths)
            cache.advance(1)
            out.append(logits[:, -1].float().cpu())
    return torch.stack(out)


def greedy(model: Transformer, prompts, steps: int) -> torch.Tensor:
    """(B, steps) greedy continuation by the plain model (no stop ids)."""
    loop = TokenLoop(model, prompts, steps)
    for _ in loop:
        pass
    return torch.tensor(loop.new_tokens)


def check_agreement(logits: torch.Tensor, ref: torch.Tensor, rel_tol: float, margin_factor: float = 4.0):
    """Per step and row: relative error <= rel_tol, and the same argmax where ref's top-2 margin is
    clear (> margin_factor x the largest absolute error seen). Returns the number of steps compared."""
    errors = (logits - ref).abs().amax(dim=-1)  # (steps, B)
    worst = rel_err(logits, ref)
    assert worst <= rel_tol, f"logits relative error {worst:.2e} > {rel_tol:.0e}"
    top2 = ref.topk(2, dim=-1).values
    margin = top2[..., 0] - top2[..., 1]
    clear = margin > margin_factor * errors.max()
    same = logits.argmax(-1) == ref.argmax(-1)
    assert bool(same[clear].all()), f"argmax differs at clear-margin steps {(~same & clear).nonzero().tolist()}"
    return int(clear.sum())


# -- CPU: fused kernels in the interpreter, float32 --------------------------------------------


@pytest.mark.parametrize("lengths", [[5], [7, 3]])
def test_fused_forward_matches_plain_float32(lengths):
    model = tiny_model(0)
    cont = torch.tensor(prompts_for(1, [4] * len(lengths), model.config.vocab_size))
    prompts = prompts_for(2, lengths, model.config.vocab_size)
    ref = teacher_forced_logits(model, model, prompts, cont, "cpu")
    fused = FusedTransformer(model)  # re-points the model's weights to the fused matrices
    plain_again = teacher_forced_logits(model, model, prompts, cont, "cpu")
    assert torch.equal(plain_again, ref), "fusing the weights changed the plain model"
    out = teacher_forced_logits(fused, model, prompts, cont, "cpu")
    assert rel_err(out, ref) < 1e-5


def test_fused_gemv_off_matches_plain_float32():
    model = tiny_model(3, head_dim=32, heads=4, kv_heads=1)
    prompts = prompts_for(4, [6], model.config.vocab_size)
    cont = torch.tensor(prompts_for(5, [3], model.config.vocab_size))
    ref = teacher_forced_logits(model, model, prompts, cont, "cpu")
    out = teacher_forced_logits(FusedTransformer(model, gemv_max_tokens=0), model, prompts, cont, "cpu")
    assert rel_err(out, ref) < 1e-5


def test_fused_rejects_bias_models():
    model = tiny_model(0)
    model.config.attention_bias = True
    with pytest.raises(ValueError, match="biases"):
        FusedTransformer(model)


# -- GPU: bfloat16 on CUDA ----------------------------------------------------------------------


GPU_MODEL = dict(hidden=256, layers=2, heads=8, kv_heads=2, ffn=512, vocab=1000)


@pytest.mark.gpu
@pytest.mark.parametrize("lengths", [[9], [12, 5, 30]])
def test_fast_path_matches_plain_and_float32_on_gpu(lengths):
    """bf16 fast path (graphs) vs bf16 plain path vs fp32 CPU, along the fp32 greedy sequence."""
    steps = 24
    cpu32 = tiny_model(10, **GPU_MODEL)
    prompts = prompts_for(11, lengths, cpu32.config.vocab_size)
    cont = greedy(cpu32, prompts, steps)
    ref = teacher_forced_logits(cpu32, cpu32, prompts, cont, "cpu")

    device = torch.device("cuda")
    gpu = tiny_model(10, **GPU_MODEL, dtype=torch.bfloat16, device=device)
    plain = teacher_forced_logits(gpu, gpu, prompts, cont, device)
    fast = teacher_forced_logits(DecodeGraphs(FusedTransformer(gpu)), gpu, prompts, cont, device)
    print(f"relative error vs fp32: plain bf16 {rel_err(plain, ref):.2e}, fast bf16 {rel_err(fast, ref):.2e}; "
          f"fast vs plain {rel_err(fast, plain):.2e}")
    n_fast = check_agreement(fast, ref, 1e-2)
    check_agreement(plain, ref, 1e-2)
    check_agreement(fast, plain.float(), 1e-2)
    assert n_fast >= steps * len(lengths) // 2, "too few clear-margin steps to test anything"


@pytest.mark.gpu
def test_fast_path_generates_plain_tokens_on_gpu():
    """Free-running greedy generation through TokenLoop: fast path == plain path, token for token,
    except from a step whose top-2 margin is within 4x the fast/plain logit difference."""
    device = torch.device("cuda")
    model = tiny_model(20, **GPU_MODEL, dtype=torch.bfloat16, device=device)
    prompts = prompts_for(21, [17], model.config.vocab_size)
    plain_tokens = greedy(model, prompts, 32)[0].tolist()
    forced = torch.tensor([plain_tokens])
    plain = teacher_forced_logits(model, model, prompts, forced, device)[:, 0]
    runner = DecodeGraphs(FusedTransformer(model))
    fast = teacher_forced_logits(runner, model, prompts, forced, device)[:, 0]
    top2 = plain.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 4 * (fast - plain).abs().amax()
    loop = TokenLoop(model, prompts, 32, forward=runner)
    for _ in loop:
        pass
    fast_tokens = loop.new_tokens[0]
    assert len(fast_tokens) == len(plain_tokens) == 32
    diverged = [t for t in range(32) if fast_tokens[t] != plain_tokens[t]]
    # both paths saw the same prefix up to the first difference: there the margin must be unclear
    if diverged:
        assert not bool(clear[diverged[0]]), f"fast and plain differ at step {diverged[0]} with a clear margin"
    assert int(clear.sum()) >= 8, "the test model's margins are too small to compare anything"


@pytest.mark.gpu
def test_decode_graph_checks_capacity_on_the_host():
    device = torch.device("cuda")
    model = tiny_model(30, dtype=torch.bfloat16, device=device)
    runner = DecodeGraphs(FusedTransformer(model))
    cache = KVCache.allocate(model.config, 1, 4, device, torch.bfloat16)
    cache.reset([4])
    with pytest.raises(ValueError, match="4 cached \\+ 1 new token = 5 exceeds the cache capacity S_max=4"):
        runner(torch.zeros(1, 1, dtype=torch.long, device=device), cache.k, cache.v, cache.seq_lens,
               seq_lens_cpu=cache.lengths)


def test_fast_forward_switch_on_cpu():
    from minillama.fused import fast_forward

    model = tiny_model(0)
    assert fast_forward(model, None) is None  # auto: off on the CPU
    assert fast_forward(model, False) is None
    with pytest.raises(ValueError, match="fast=True but the model is on cpu"):
        fast_forward(model, True)
