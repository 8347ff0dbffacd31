"""The two backends compute one function: the Triton kernels (fused GEMV at single-token steps,
cuBLAS + Triton elementwise kernels otherwise, CUDA graphs on the GPU) against plain PyTorch.

CPU tests run the Triton backend in Triton's interpreter in float32 against the torch backend on
the same weights. GPU tests (``gpu`` marker) run bfloat16 on CUDA: Triton + graphs against torch,
and both against the torch backend in float32 on the CPU, teacher-forced along the float32
greedy sequence so one ambiguous step cannot derail the comparison.
"""
import copy

import pytest
import torch

import flashcore
from minillama.backend import NormedRows, TorchBackend, TritonBackend, make_backend
from minillama.config import LlamaConfig
from minillama.generate import TokenLoop
from minillama.kv_cache import KVCache
from minillama.layers import Linear
from minillama.model import Transformer
from minillama.runner import Runner, bucket

LLAMA31_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64}
interpreted = pytest.mark.skipif(not flashcore.INTERPRET and not torch.cuda.is_available(),
                                 reason="needs TRITON_INTERPRET=1 (set by conftest on the CPU)")


def tiny_model(seed: int, hidden=64, layers=2, heads=4, kv_heads=2, head_dim=None, ffn=160, vocab=320,
               dtype=torch.float32, device="cpu", backend="torch", bias=False) -> Transformer:
    config = LlamaConfig(
        hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, head_dim=head_dim, vocab_size=vocab, rms_norm_eps=1e-5,
        rope_theta=10000.0, rope_scaling=dict(LLAMA31_ROPE), max_position_embeddings=4096,
        attention_bias=bias, mlp_bias=bias,
    )
    gen = torch.Generator().manual_seed(seed)
    model = Transformer(config, make_backend(backend, device))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))  # gains matter
            elif "tok_embeddings" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5)
    return model.to(device=device, dtype=dtype).eval()


def with_backend(model: Transformer, backend: str) -> Transformer:
    """The same model under another backend, sharing the original's parameters (no copy of them)."""
    new = make_backend(backend, model.tok_embeddings.weight.device)
    params = dict(model.named_parameters(remove_duplicate=False))
    clone = copy.deepcopy(model)
    for name, module in clone.named_modules():
        if hasattr(module, "backend"):
            module.backend = new
        for pname, p in list(module._parameters.items()):
            if p is not None:
                module._parameters[pname] = params[f"{name}.{pname}" if name else pname]
    return clone


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).norm() / b.norm()).item()


def prompts_for(seed: int, lengths, vocab: int):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in lengths]


def teacher_forced_logits(runner: Runner, prompts, continuations):
    """Logits (steps, B, V) float32: prefill the prompts, then feed ``continuations`` (B, steps)."""
    device = runner.device
    width = max(map(len, prompts))
    cache = runner.new_cache(len(prompts), width + continuations.shape[1] + 1)
    tokens = torch.zeros(len(prompts), width, dtype=torch.long)
    for b, p in enumerate(prompts):
        tokens[b, : len(p)] = torch.tensor(p)
    last = torch.tensor([len(p) - 1 for p in prompts])
    out = [runner(tokens.to(device), cache, logits_at=last.to(device))[:, -1].float().cpu()]
    cache.advance([len(p) for p in prompts])
    for t in range(continuations.shape[1] - 1):
        logits = runner(continuations[:, t : t + 1].to(device), cache)
        cache.advance(1)
        out.append(logits[:, -1].float().cpu())
    return torch.stack(out)


def greedy(runner: Runner, prompts, steps: int) -> torch.Tensor:
    """(B, steps) greedy continuation (no stop ids)."""
    loop = TokenLoop(runner, prompts, steps)
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


class HalvedLinear(Linear):
    """A swapped-in layer that changes the math (its weight counts half) and counts its calls."""

    calls = 0

    def forward(self, x, rope=None):
        HalvedLinear.calls += 1
        return self.backend.linear(x, 0.5 * self.weight, self.bias, swiglu=self.swiglu, gemv_config=self.gemv_config,
                                   fuse_norm=self.fuse_norm, rope=rope)


def swap_in_halved(model: Transformer) -> None:
    for layer in model.layers:
        layer.attention.wo.__class__ = HalvedLinear
        layer.feed_forward.w13.__class__ = type("HalvedGateUp", (HalvedLinear,), {"swiglu": True})


# -- CPU: the Triton backend in the interpreter, float32 ----------------------------------------


@pytest.mark.triton
@interpreted
@pytest.mark.parametrize("lengths", [[5], [7, 3]])
def test_triton_backend_matches_torch_float32(lengths):
    model = tiny_model(0)
    cont = torch.tensor(prompts_for(1, [4] * len(lengths), model.config.vocab_size))
    prompts = prompts_for(2, lengths, model.config.vocab_size)
    ref = teacher_forced_logits(Runner(model), prompts, cont)
    out = teacher_forced_logits(Runner(with_backend(model, "triton")), prompts, cont)
    assert rel_err(out, ref) < 1e-5


def set_fuse_norm(model: Transformer, fuse_norm: bool) -> int:
    """Set ``fuse_norm`` on every linear layer that has a norm before it; returns how many."""
    linears = [m for layer in model.layers for m in (layer.attention.wqkv, layer.feed_forward.w13)] + [model.output]
    for lin in linears:
        lin.fuse_norm = fuse_norm
    return len(linears)


@pytest.mark.triton
@interpreted
def test_triton_backend_with_norms_apart_matches_torch_float32():
    """Single-token steps with each residual add + RMSNorm as its own kernel before a plain GEMV
    (``fuse_norm=False``, what the runner's tuning may pick) give the torch backend's logits, and
    write the same residual stream (the next layer reads it)."""
    model = tiny_model(12)
    prompts = prompts_for(13, [5, 3], model.config.vocab_size)
    cont = torch.tensor(prompts_for(14, [4, 4], model.config.vocab_size))
    ref = teacher_forced_logits(Runner(model), prompts, cont)
    apart = with_backend(model, "triton")
    assert set_fuse_norm(apart, False) == 2 * model.config.num_hidden_layers + 1
    assert rel_err(teacher_forced_logits(Runner(apart), prompts, cont), ref) < 1e-5


def set_norm_next(model: Transformer, norm_next: bool) -> int:
    """Set ``norm_next`` on o and down of every layer (what the runner's tuning may pick); returns how many."""
    linears = [m for layer in model.layers for m in (layer.attention.wo, layer.feed_forward.w2)]
    for lin in linears:
        lin.norm_next = norm_next
    return len(linears)


@pytest.mark.triton
@interpreted
def test_norms_in_the_producing_gemv_match_torch_float32():
    """Single-token steps with the residual add + RMSNorm after o and down run in that GEMV's
    epilogue (``norm_next``), the next GEMV applying the 1 / rms, give the torch backend's logits; a
    packed step of one token that asks for its logits row (the product indexed before the final
    norm) too."""
    model = tiny_model(15)
    vocab = model.config.vocab_size
    prompts = prompts_for(16, [5], vocab)
    cont = torch.tensor(prompts_for(17, [4], vocab))
    ref = teacher_forced_logits(Runner(model), prompts, cont)
    fast = with_backend(model, "triton")
    assert set_norm_next(fast, True) == 2 * model.config.num_hidden_layers
    assert rel_err(teacher_forced_logits(Runner(fast), prompts, cont), ref) < 1e-5

    want_runner, got_runner = Runner(model), Runner(fast)
    logits = []
    for runner in (want_runner, got_runner):
        cache = runner.new_cache(1, 8)
        runner(torch.tensor([prompts[0]]), cache)
        cache.advance(5)
        logits.append(runner.forward_packed(cont[0, :1], [(0, 1)], cache, [0]))
    assert logits[1].shape == (1, vocab)
    assert rel_err(logits[1], logits[0]) < 1e-5

    # the tuner's and the benchmarks' timing call of o runs the norm after it, as the forward does,
    # and the call of gate/up after it takes what that norm gives
    normed, h = got_runner.gemv_call("o", fast.layers[0].attention.wo, None)()
    assert isinstance(normed, NormedRows) and normed.shape == h.shape == (1, 1, model.config.hidden_size)
    w13 = fast.layers[0].feed_forward.w13
    assert got_runner.gemv_call("gate_up", w13, None, normed=normed)().shape == (1, 1, w13.out_features // 2)


@pytest.mark.triton
@interpreted
def test_triton_backend_without_gemv_matches_torch_float32():
    model = tiny_model(3, head_dim=32, heads=4, kv_heads=1)
    prompts = prompts_for(4, [6], model.config.vocab_size)
    cont = torch.tensor(prompts_for(5, [3], model.config.vocab_size))
    ref = teacher_forced_logits(Runner(model), prompts, cont)
    cublas = with_backend(model, "triton")
    for module in cublas.modules():
        if hasattr(module, "backend"):
            module.backend = TritonBackend(gemv=False)
    assert rel_err(teacher_forced_logits(Runner(cublas), prompts, cont), ref) < 1e-5


@pytest.mark.triton
@interpreted
def test_bfloat16_rows_run_the_triton_matmul_up_to_its_row_count(monkeypatch):
    """A bfloat16 model's projections of up to ``MODEL_DTYPE_ROWS`` rows (batched decode, short
    prompts) run ``kernels.matmul``, SiLU x up fused in gate/up's and RoPE in qkv's; gate/up (SiLU x
    up fused) and the matrices with rows at least twice as long as their columns (down; here o too)
    run it up to ``MODEL_DTYPE_LARGE_ROWS`` rows, qkv cuBLAS past 16; more rows run cuBLAS. The
    logits are the float32 model's within bfloat16's error (Triton's interpreter rounds to bfloat16
    by truncation: a 5e-2 bound, as for other bfloat16 checks)."""
    from minillama import kernels
    from minillama.backend import MODEL_DTYPE_LARGE_ROWS, MODEL_DTYPE_ROWS

    model = tiny_model(15, head_dim=32)  # heads of 32 dims or more: RoPE in the matmul's epilogue
    assert model.config.intermediate_size >= 2 * model.config.hidden_size  # down: a large matrix
    prompts = prompts_for(16, [5, 3], model.config.vocab_size)
    cont = torch.tensor(prompts_for(17, [3, 3], model.config.vocab_size))
    long_prompts = prompts_for(18, [9, 9], model.config.vocab_size)  # an 18-row prefill
    longer_prompts = prompts_for(19, [35, 35], model.config.vocab_size)  # a 70-row prefill
    refs = [teacher_forced_logits(Runner(model), p, cont) for p in (prompts, long_prompts, longer_prompts)]
    calls = []
    matmul = kernels.matmul
    monkeypatch.setattr(kernels, "matmul", lambda x, w, scale=None, **kw: calls.append(
        (x.shape[0], w.dtype, kw.get("swiglu", False), kw.get("rope") is not None)) or matmul(x, w, scale, **kw))
    fast = with_backend(model.to(torch.bfloat16), "triton")
    for p, ref in zip((prompts, long_prompts, longer_prompts), refs):
        assert rel_err(teacher_forced_logits(Runner(fast), p, cont), ref) < 5e-2
    assert all(w == torch.bfloat16 and rows <= MODEL_DTYPE_LARGE_ROWS for rows, w, _, _ in calls), calls
    assert all(not rope for rows, _, _, rope in calls if rows > MODEL_DTYPE_ROWS), calls
    layers = model.config.num_hidden_layers
    for swiglu, rope in ((True, False), (False, True)):  # gate/up, qkv
        assert calls.count((10, torch.bfloat16, swiglu, rope)) == layers  # the first prefill: 2 rows of 5 tokens
        assert calls.count((2, torch.bfloat16, swiglu, rope)) == 3 * 2 * layers  # two decode steps of 2 rows, 3 times
    # the 18-row prefill: gate/up, down, and o (128 -> 64 here: rows twice its columns, as down's);
    # qkv: cuBLAS. The 70-row one: cuBLAS only
    assert calls.count((18, torch.bfloat16, True, False)) == layers
    assert calls.count((18, torch.bfloat16, False, False)) == 2 * layers
    assert not any(rows == 70 for rows, _, _, _ in calls)


@pytest.mark.triton
@interpreted
@pytest.mark.parametrize("quantize", [None, "int8", "fp8"])
def test_steps_of_a_few_rows_run_the_norms_in_their_matmuls(monkeypatch, quantize):
    """In a step of a few rows (``TritonBackend.norm_in_matmuls``) of a bfloat16 model (8-bit
    weights too), o and down add the residual in their matmul's epilogue and write h * the next
    norm's gain; the next matmul (qkv, gate/up, the head) applies each row's 1 / rms in its own
    (``Linear.feeds_norm``): the norm's kernel runs on the first layer's input only (the embedding
    is no product), and before the head where a prefill picks its last rows. The logits are the
    float32 model's within bfloat16's error, no further from them than with the norms as kernels
    (h * gain is rounded once, the norm's output twice)."""
    from minillama import kernels
    from minillama.layers import Linear
    from minillama.quantization import quantize_model

    model = tiny_model(15, head_dim=32)
    prompts = prompts_for(16, [5, 3], model.config.vocab_size)
    cont = torch.tensor(prompts_for(17, [3, 3], model.config.vocab_size))
    reference = copy.deepcopy(model)
    if quantize:
        quantize_model(reference, quantize)  # float32 activations, dequantized weights
    ref = teacher_forced_logits(Runner(reference), prompts, cont)
    model.to(torch.bfloat16)
    if quantize:
        quantize_model(model, quantize)
    fused = with_backend(model, "triton")
    apart = with_backend(model, "triton")
    for module in apart.modules():
        if isinstance(module, Linear):
            module.feeds_norm = False
    norms = []
    add_rms_norm = kernels.add_rms_norm
    monkeypatch.setattr(kernels, "add_rms_norm", lambda x, *a, **kw: norms.append(x.shape) or add_rms_norm(x, *a, **kw))
    got = teacher_forced_logits(Runner(fused), prompts, cont)
    layers = model.config.num_hidden_layers
    assert len(norms) == 2 + 2  # the prefill: the first layer's, the final norm; each of 2 decode steps: the first
    norms.clear()
    want = teacher_forced_logits(Runner(apart), prompts, cont)
    assert len(norms) == 3 * (2 * layers + 1)
    # h * gain is rounded once where the norm's output is rounded twice: no further from the float32 model
    assert rel_err(got, ref) < 5e-2 and rel_err(got, ref) <= 1.25 * rel_err(want, ref)


@pytest.mark.triton
@interpreted
def test_bias_model_runs_under_triton():
    """Projections with biases take the plain ops inside the Triton backend: same function."""
    model = tiny_model(6, bias=True)
    prompts = prompts_for(7, [5], model.config.vocab_size)
    cont = torch.tensor(prompts_for(8, [3], model.config.vocab_size))
    ref = teacher_forced_logits(Runner(model), prompts, cont)
    assert rel_err(teacher_forced_logits(Runner(with_backend(model, "triton")), prompts, cont), ref) < 1e-5


@pytest.mark.triton
@interpreted
def test_swapped_linear_subclass_runs_under_both_backends():
    """A Linear subclass put into the model is what runs, under torch and under Triton (the GEMV
    at single-token steps included): nothing reads the weights behind the layer's back."""
    model = tiny_model(9)
    prompts = prompts_for(10, [5], model.config.vocab_size)
    cont = torch.tensor(prompts_for(11, [3], model.config.vocab_size))
    plain = teacher_forced_logits(Runner(model), prompts, cont)
    expected_model = copy.deepcopy(model)  # the same function written into the weights
    with torch.no_grad():
        for layer in expected_model.layers:
            layer.attention.wo.weight.mul_(0.5)
            layer.feed_forward.w13.weight.mul_(0.5)
    expected = teacher_forced_logits(Runner(expected_model), prompts, cont)
    assert rel_err(expected, plain) > 1e-2  # the swap changes the logits

    forwards = 3  # a prefill and two single-token steps
    for backend in ("torch", "triton"):
        swapped = with_backend(model, backend)
        swap_in_halved(swapped)
        HalvedLinear.calls = 0
        got = teacher_forced_logits(Runner(swapped), prompts, cont)
        assert HalvedLinear.calls == forwards * 2 * model.config.num_hidden_layers, backend
        assert rel_err(got, expected) < 1e-5, backend


@pytest.mark.triton
@interpreted
def test_elementwise_kernels_read_strided_rows():
    """add_rms_norm and silu_mul on rows whose last dimension is not contiguous (every other value,
    a transposed matrix) give the torch backend's numbers; they read such rows at consecutive
    addresses and returned other values (max error 2-9e34)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(0)
    T, N = 3, 40
    weight = (1 + 0.1 * torch.randn(2 * N, generator=g)).to(device)[::2]
    x = torch.randn(T, 2 * N, generator=g).to(device)[:, ::2]
    residual = torch.randn(N, T, generator=g).to(device).T
    triton_backend, torch_backend = TritonBackend(), TorchBackend()
    for res in (None, residual):
        got, got_h = triton_backend.kernels.add_rms_norm(x, res, weight, 1e-5)
        want, want_h = torch_backend.rms_norm(x, weight, 1e-5, res)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        assert torch.equal(got_h, want_h)
    gate_up = torch.randn(4 * N, T, generator=g).to(device).T
    torch.testing.assert_close(triton_backend.silu_mul(gate_up), torch_backend.silu_mul(gate_up), rtol=1e-6, atol=1e-6)


def _rope_tables_cases(device):
    """(positions, inv_freq, dtype) with positions up to Llama 3.1's 131072 (angles up to ~1.3e5
    rad, where approximate sin / cos would be off) and its scaled frequencies, fresh each call."""
    config = LlamaConfig(hidden_size=512, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=1, vocab_size=8, rope_theta=500000.0, max_position_embeddings=131072,
                         rope_scaling={**LLAMA31_ROPE, "original_max_position_embeddings": 8192})
    from minillama.model import rope_inv_freq

    inv_freq = rope_inv_freq(config).to(device)  # 64 frequencies: head_dim 128
    for T, index_dtype in ((1, torch.int32), (37, torch.int64), (300, torch.int32)):
        positions = torch.randint(0, 131072, (T,), dtype=index_dtype).to(device)
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            yield positions, inv_freq, dtype


@pytest.mark.triton
@interpreted
def test_rope_tables_match_torch():
    """kernels.rope_cos_sin (one launch) gives the torch backend's cos / sin tables: float32 angles,
    both halves of each row equal. Under the interpreter numpy's cos / sin may differ from torch's
    in the last float32 bit, so there within one unit in the last place of the dtype."""
    from minillama import kernels

    device = "cuda" if torch.cuda.is_available() else "cpu"
    for positions, inv_freq, dtype in _rope_tables_cases(device):
        cos, sin = kernels.rope_cos_sin(positions, inv_freq, dtype)
        want_cos, want_sin = TorchBackend().rope_cos_sin(positions, inv_freq, dtype)
        for got, want in ((cos, want_cos), (sin, want_sin)):
            assert got.dtype == dtype and got.shape == (positions.shape[0], 128) and got.is_contiguous()
            assert torch.equal(got[:, :64], got[:, 64:])
            ulp = torch.finfo(dtype).eps
            assert (got.float() - want.float()).abs().max().item() <= ulp, (dtype, positions.dtype)


@pytest.mark.gpu
def test_rope_tables_equal_torch_on_gpu():
    """On CUDA the kernel computes cos / sin with CUDA's cosf / sinf, as torch does: the tables are
    torch's bit for bit, in every dtype, at positions up to 131072."""
    from minillama import kernels

    for positions, inv_freq, dtype in _rope_tables_cases("cuda"):
        cos, sin = kernels.rope_cos_sin(positions, inv_freq, dtype)
        want_cos, want_sin = TorchBackend().rope_cos_sin(positions, inv_freq, dtype)
        assert torch.equal(cos, want_cos) and torch.equal(sin, want_sin), (dtype, positions.shape)


@pytest.mark.triton
@interpreted
def test_elementwise_launches_are_kept_per_specialization():
    """The elementwise kernels launch through one kept launch per specialization (dtypes, 16-byte
    alignment of each pointer, scalar values): other row counts share it; a misaligned view or
    another eps gets its own, and every call gives the torch backend's numbers."""
    from minillama import kernels

    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(1)
    N = 64
    weight = (1 + 0.1 * torch.randn(N, generator=g)).to(device)
    rows = torch.randn(9, N + 1, generator=g).to(device)
    torch_backend = TorchBackend()
    kernels._LAUNCHES.clear()
    cases = [(rows[:3, :N], 1e-5), (rows[:7, :N], 1e-5),  # one launch: other row counts
             (rows[:3, 1:], 1e-5), (rows[1:8, 1:], 1e-5),  # one more: bases 4 and 8 bytes past alignment
             (rows[:3, :N], 1e-6)]  # and another eps
    for x, eps in cases:
        got, _ = kernels.add_rms_norm(x, None, weight, eps)
        want, _ = torch_backend.rms_norm(x, weight, eps)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert [x.data_ptr() % 16 for x, _ in cases] == [0, 0, 4, 8, 0]  # rows of 65 floats = 260 bytes
    assert len(kernels._LAUNCHES) == 3
    x = rows[:4, :N].clone()
    for _ in range(2):
        torch.testing.assert_close(TritonBackend().silu_mul(x), torch_backend.silu_mul(x), rtol=1e-6, atol=1e-6)


def test_backend_choice():
    assert isinstance(make_backend("auto", "cpu"), TorchBackend)
    assert make_backend("torch", "cpu").name == "torch"
    with pytest.raises(ValueError, match="backend must be one of"):
        make_backend("fast", "cpu")


def test_triton_backend_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(flashcore, "INTERPRET", False)
    with pytest.raises(ValueError, match="backend='triton' cannot run on cpu: its kernels need a CUDA device"):
        make_backend("triton", "cpu")


def test_runner_rows_and_buckets():
    assert [bucket(b) for b in (1, 2, 3, 5, 16, 17, 64, 65, 130)] == [1, 2, 4, 8, 16, 32, 64, 128, 192]
    model = tiny_model(12)
    runner = Runner(model)
    assert not runner.cuda_graphs
    with pytest.raises(ValueError, match="cuda_graphs=True needs a CUDA model"):
        Runner(model, cuda_graphs=True)
    # tokens for the first rows of a larger cache: the other rows are untouched
    cache = runner.new_cache(3, 8)
    cache.k.normal_()
    cache.set_lengths([2, 0, 5])
    before_k = cache.k.clone()
    logits = runner(torch.tensor([[4, 5, 6]]), cache)
    assert logits.shape == (1, 3, model.config.vocab_size)
    assert torch.equal(cache.k[:, 1:], before_k[:, 1:]) and not torch.equal(cache.k[:, 0], before_k[:, 0])
    assert cache.seq_lens_cpu == [2, 0, 5]  # the caller advances
    with pytest.raises(ValueError, match="4 rows of tokens but the cache holds 3 rows"):
        runner(torch.zeros(4, 1, dtype=torch.long), cache)


def test_cache_row_operations():
    model = tiny_model(13)
    cache = KVCache.allocate(model.config, 3, 4, "cpu", torch.float32)
    cache.k.normal_()
    cache.set_lengths([1, 2, 3])
    cache.advance([1, 0, 1])
    assert cache.seq_lens_cpu == [2, 2, 4] and cache.seq_lens.tolist() == [2, 2, 4]
    cache.reset_row(1)
    assert cache.seq_lens_cpu == [2, 0, 4] and cache.seq_lens.tolist() == [2, 0, 4]
    kept = cache.k[:, :, :4].clone()
    cache.grow(10)
    assert cache.max_len == 10 and torch.equal(cache.k[:, :, :4], kept)
    with pytest.raises(ValueError, match=r"lengths \[11, 0, 0\] must be 3 fills in \[0, 10\]"):
        cache.set_lengths([11, 0, 0])


# -- GPU: bfloat16 on CUDA ----------------------------------------------------------------------


GPU_MODEL = dict(hidden=256, layers=2, heads=8, kv_heads=2, ffn=512, vocab=1000)


@pytest.mark.gpu
@pytest.mark.parametrize("lengths", [[9], [12, 5, 30]])
def test_triton_matches_torch_and_float32_on_gpu(lengths):
    """bf16 Triton backend (graphs) vs bf16 torch backend vs fp32 CPU, along the fp32 greedy sequence."""
    steps = 24
    cpu32 = tiny_model(10, **GPU_MODEL)
    prompts = prompts_for(11, lengths, cpu32.config.vocab_size)
    cont = greedy(Runner(cpu32), prompts, steps)
    ref = teacher_forced_logits(Runner(cpu32), prompts, cont)

    gpu = tiny_model(10, **GPU_MODEL, dtype=torch.bfloat16, device="cuda")
    plain = teacher_forced_logits(Runner(gpu, cuda_graphs=False), prompts, cont)
    fast = teacher_forced_logits(Runner(with_backend(gpu, "triton")), prompts, cont)
    print(f"relative error vs fp32: torch bf16 {rel_err(plain, ref):.2e}, triton bf16 {rel_err(fast, ref):.2e}; "
          f"triton vs torch {rel_err(fast, plain):.2e}")
    n_fast = check_agreement(fast, ref, 1e-2)
    check_agreement(plain, ref, 1e-2)
    check_agreement(fast, plain.float(), 1e-2)
    assert n_fast >= steps * len(lengths) // 2, "too few clear-margin steps to test anything"


@pytest.mark.gpu
@pytest.mark.parametrize("quantize", [None, "int8", "fp8"])
def test_norms_apart_match_fused_on_gpu(quantize):
    """bf16 (and 8-bit weights): the tuned runner, then every norm forced into its GEMV and forced
    apart: the three agree with the torch backend along its greedy sequence."""
    from minillama.quantization import quantize_model

    model = tiny_model(40, **GPU_MODEL, dtype=torch.bfloat16, device="cuda")
    if quantize:
        quantize_model(model, quantize)
    prompts = prompts_for(41, [9, 14], model.config.vocab_size)
    plain_runner = Runner(model, cuda_graphs=False)
    cont = greedy(plain_runner, prompts, 16)
    plain = teacher_forced_logits(plain_runner, prompts, cont)
    fast_model = with_backend(model, "triton")
    runner = Runner(fast_model)
    runner.tune_gemv()
    tuned = teacher_forced_logits(runner, prompts, cont)
    check_agreement(tuned, plain, 1e-2)
    for fuse_norm in (True, False):
        set_fuse_norm(fast_model, fuse_norm)
        set_norm_next(fast_model, False)
        runner.clear()  # recapture the decode graphs with the norms placed this way
        check_agreement(teacher_forced_logits(runner, prompts, cont), plain, 1e-2)
    set_norm_next(fast_model, True)  # the norms in the GEMV before them
    runner.clear()
    check_agreement(teacher_forced_logits(runner, prompts, cont), plain, 1e-2)


@pytest.mark.gpu
def test_triton_generates_torch_tokens_on_gpu():
    """Free-running greedy generation through TokenLoop: Triton == torch, token for token,
    except from a step whose top-2 margin is within 4x the difference of their logits."""
    model = tiny_model(20, **GPU_MODEL, dtype=torch.bfloat16, device="cuda")
    plain_runner = Runner(model, cuda_graphs=False)
    prompts = prompts_for(21, [17], model.config.vocab_size)
    plain_tokens = greedy(plain_runner, prompts, 32)[0].tolist()
    forced = torch.tensor([plain_tokens])
    plain = teacher_forced_logits(plain_runner, prompts, forced)[:, 0]
    runner = Runner(with_backend(model, "triton"))
    fast = teacher_forced_logits(runner, prompts, forced)[:, 0]
    top2 = plain.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 4 * (fast - plain).abs().amax()
    fast_tokens = greedy(runner, prompts, 32)[0].tolist()
    diverged = [t for t in range(32) if fast_tokens[t] != plain_tokens[t]]
    if diverged:  # both saw the same prefix up to the first difference: there the margin must be unclear
        assert not bool(clear[diverged[0]]), f"triton and torch differ at step {diverged[0]} with a clear margin"
    assert int(clear.sum()) >= 8, "the test model's margins are too small to compare anything"


@pytest.mark.gpu
def test_decode_graph_checks_capacity_on_the_host():
    model = tiny_model(30, dtype=torch.bfloat16, device="cuda", backend="triton")
    runner = Runner(model)
    cache = runner.new_cache(1, 4)
    cache.set_lengths([4])
    with pytest.raises(ValueError, match="4 cached \\+ 1 new token = 5 exceeds the cache capacity S_max=4"):
        runner(torch.zeros(1, 1, dtype=torch.long, device="cuda"), cache)


@pytest.mark.gpu
def test_bucketed_decode_graph_equals_exact_rows():
    """3 rows of a 5-row cache run the 4-row graph; their logits equal a 3-row cache's, and the
    fill of the padded row is untouched."""
    model = tiny_model(31, **GPU_MODEL, dtype=torch.float32, device="cuda", backend="triton")
    runner = Runner(model)
    prompts = prompts_for(32, [6, 6, 6], model.config.vocab_size)
    big, exact = runner.new_cache(5, 16), runner.new_cache(3, 16)
    tokens = torch.tensor(prompts, device="cuda")
    runner(tokens, big.rows(0, 3))
    runner(tokens, exact)
    big.set_lengths([6, 6, 6, 2, 0])
    exact.advance(6)
    step = tokens[:, :1]
    for _ in range(3):
        got = runner(step, big)
        want = runner(step, exact)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        big.advance([1, 1, 1, 0, 0])
        exact.advance(1)
        step = want[:, -1].argmax(-1, keepdim=True)
    assert big.seq_lens_cpu[3:] == [2, 0] and big.seq_lens.tolist()[3:] == [2, 0]
    assert len(runner._graphs) == 2  # bucket 4 over the big cache, 3 rows over the exact one
