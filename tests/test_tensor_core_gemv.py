"""The single-token product of 8-bit weights on the tensor cores (``minillama.tensor_core_gemv``):
which tilings fit, that the CPU never runs it, and on the GPU its products against float32 math at
Llama-3.1 shapes, its launches as programmatic dependents, and a model whose GEMVs all run it."""
import pytest
import torch

import flashcore
from minillama import Llama, kernels
from minillama.kernels import TensorCoreTiling
from minillama.quantization import dequantize, quantize_per_channel
from tests.checkpoints import write_checkpoint

FP8 = torch.float8_e4m3fn


def fits(tiling, n_rows, K, head_dim=None):
    from minillama import tensor_core_gemv

    return tensor_core_gemv.fits(tiling, n_rows, K, head_dim)


def test_fits_needs_whole_steps_of_k_and_whole_programs_of_pairs():
    t = TensorCoreTiling(2, 256, 1, False)  # 2 pairs a program, steps of 8 x 256 K values
    assert fits(t, 6144, 4096) and fits(t, 4096, 14336)  # 14336 / 8 = 7 x 256
    assert not fits(t, 4096, 7168)  # 7168 / 8 = 896 is not a multiple of 256
    assert fits(TensorCoreTiling(1, 128, 1, False), 4096, 7168)
    assert not fits(t, 4098, 4096)  # 2049 pairs
    assert not fits(t, 6143, 4096)  # an odd number of rows
    assert fits(t, 6144, 4096, head_dim=128) and not fits(TensorCoreTiling(2, 256, 4, True), 6144, 4096, 12)


def test_every_tensor_core_tiling_fits_the_8b_matrices():
    """Every candidate fits Llama-3.1-8B's qkv (with RoPE), o, gate/up, down and the LM head; a TP=2
    share of down (K 7168) only in 128-wide steps. The tuner offers the ones that fit."""
    for t in kernels.TENSOR_CORE_GEMV_TILINGS:
        assert fits(t, 6144, 4096, 128) and fits(t, 4096, 4096) and fits(t, 2 * 14336, 4096) and fits(t, 128256, 4096)
        assert fits(t, 4096, 14336) and fits(t, 4096, 7168) == (t.block_k == 128), t


@pytest.mark.skipif(not flashcore.INTERPRET, reason="the interpreter's path (conftest sets it on the CPU)")
def test_the_cpu_runs_the_triton_gemv_for_a_tensor_core_tiling():
    """Under Triton's interpreter a tensor-core tiling runs the Triton GEMV (Gluon has no interpreter):
    the same product, and the norm before it (which the tensor-core kernel does not run) still applied."""
    g = torch.Generator().manual_seed(3)
    K, N = 64, 32
    x, res = torch.randn(K, generator=g), torch.randn(K, generator=g)
    gain = 1 + 0.1 * torch.randn(K, generator=g)
    q, scale = quantize_per_channel(torch.randn(N, K, generator=g), torch.int8)
    expected = kernels.gemv(x, q, scale=scale, add=res, h_out=torch.empty_like(x), norm_weight=gain, eps=1e-5)
    from minillama.backend import NormedInput, TritonBackend

    backend = TritonBackend()
    new_residual = torch.empty(1, K)
    normed = NormedInput(x[None], res[None], gain, 1e-5, new_residual)
    got = backend.linear(normed, q, weight_scale=scale, gemv_config=TensorCoreTiling(1, 128, 1, False))
    assert torch.allclose(got[0], expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(new_residual[0], x + res)


def test_the_tuner_offers_tensor_core_tilings_only_for_8bit_weights_on_a_gpu(tmp_path):
    """On the CPU no matrix gets them; nor does a model-dtype weight anywhere."""
    write_checkpoint(tmp_path, hidden_size=32, n_layers=1, n_heads=4, n_kv_heads=2, intermediate_size=64,
                     tokenizer="sentencepiece")
    for quantize in ("int8", None):
        runner = Llama.from_pretrained(tmp_path, device="cpu", quantize=quantize, backend="triton").runner
        for role, calls in runner.gemv_roles().items():
            assert runner.tensor_core_tilings(role, [lin for lin, _ in calls]) == [], (quantize, role)


def _x(g, K):
    """bf16 x with values across the range the kernel scales: most ~N(0, 1), some ~1e5 (past float16's
    65504 before the 2^-8 scale), some ~1e-4 (float16 subnormals after it)."""
    x = torch.randn(K, device="cuda", generator=g)
    x[::97] *= 1e5
    x[5::89] *= 1e-4
    return x.bfloat16()


def _close(got, expected, what):
    err = (got.float() - expected).abs().max() / expected.abs().max()
    assert err.item() < 1e-2 and ((got.float() - expected).norm() / expected.norm()).item() < 5e-3, (what, err.item())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.int8, FP8])
@pytest.mark.parametrize("dependent", [False, True])
def test_gpu_tensor_core_gemv_matches_float32(dtype, dependent):
    """Every tiling that fits, at Llama-3.1-8B's shapes and a TP=2 share of down, fresh inputs each:
    the plain product, SiLU x up, RoPE of 40 of 48 heads; within bf16 rounding of float32 math."""
    from tests.test_quantized_model import rope_inputs

    g = torch.Generator(device="cuda").manual_seed(11)
    cases = [("o", 4096, 4096), ("down", 4096, 14336), ("down TP=2", 4096, 7168), ("qkv", 6144, 4096),
             ("gate_up", 2 * 14336, 4096), ("head", 128256, 4096)]
    for name, N, K in cases:
        q, scale = quantize_per_channel(torch.randn(N, K, device="cuda", generator=g) / 64, dtype)
        w = dequantize(q, scale, torch.float32)
        for t in kernels.TENSOR_CORE_GEMV_TILINGS:
            head_dim = 128 if name == "qkv" else None
            if not fits(t, N, K, head_dim):
                continue
            x = _x(g, K)
            y = w @ x.float()
            if name == "gate_up":
                got = kernels.gemv(x, q, scale=scale, swiglu=True, config=t, dependent=dependent)
                gate, up = y.chunk(2)
                _close(got, torch.nn.functional.silu(gate) * up, (name, t))
            elif name == "qkv":
                cos, sin = rope_inputs(g, 128, "cuda", torch.bfloat16)
                got = kernels.gemv(x, q, scale=scale, rope=(cos, sin, 40, 128), config=t, dependent=dependent)
                heads = y.view(48, 128).clone()
                c, s = cos.float()[0], sin.float()[0]
                rot = heads[:40]
                heads[:40] = rot * c + torch.cat([-rot[:, 64:], rot[:, :64]], 1) * s
                _close(got, heads.reshape(-1), (name, t))
            else:
                _close(kernels.gemv(x, q, scale=scale, config=t, dependent=dependent), y, (name, t))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.int8, FP8])
def test_gpu_tensor_core_gemv_chain_in_a_graph(dtype):
    """o, gate/up (SiLU x up) and down, each reading what the one before wrote, launched as
    programmatic dependents in a CUDA graph, 20 replays: the same bits as plain launches each time."""
    g = torch.Generator(device="cuda").manual_seed(12)
    ws = [quantize_per_channel(torch.randn(N, K, device="cuda", generator=g) / 64, dtype)
          for N, K in ((4096, 4096), (2 * 14336, 4096), (4096, 14336))]
    tilings = [TensorCoreTiling(2, 256, 1, False), TensorCoreTiling(1, 256, 1, True),
               TensorCoreTiling(1, 128, 1, False)]
    x = _x(g, 4096) / 1e3

    def chain(dependent):
        h = x
        for (q, scale), t, swiglu in zip(ws, tilings, (False, True, False)):
            h = kernels.gemv(h, q, scale=scale, swiglu=swiglu, config=t, dependent=dependent)
        return h

    expected = chain(False)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        chain(True)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = chain(True)
    for _ in range(20):
        graph.replay()
        assert torch.equal(out, expected)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_gpu_model_on_tensor_core_gemvs_matches_torch(tmp_path, kind):
    """A random Llama of 1024-wide layers (8 heads of 128, 2 KV heads, FFN 2048), quantized at load: a
    single-token step (the GEMV path) with every 8-bit matrix on a tensor-core tiling gives the torch
    backend's logits (dequantized weights); the tuner offers those tilings for each matrix kind."""
    write_checkpoint(tmp_path, hidden_size=1024, n_layers=2, n_heads=8, n_kv_heads=2, intermediate_size=2048,
                     vocab_size=1024, tokenizer="sentencepiece", dtype="bfloat16")
    path = tmp_path
    fast = Llama.from_pretrained(path, device="cuda", dtype="bfloat16", quantize=kind, quantize_lm_head=True)
    plain = Llama.from_pretrained(path, device="cuda", dtype="bfloat16", quantize=kind, quantize_lm_head=True,
                                  backend="torch")
    runner = fast.runner
    roles = runner.gemv_roles()
    for role, calls in roles.items():
        lins = [lin for lin, _ in calls]
        offered = runner.tensor_core_tilings(role, lins)
        assert offered, role
        for lin in lins:
            lin.gemv_config, lin.fuse_norm, lin.norm_next = offered[0], role not in ("qkv", "gate_up", "head"), False
    runner.gemv_timings = {}  # tuned: keep these settings
    for token in (5, 17, 300, 900):
        got, expected = fast.logits([token]), plain.logits([token])
        assert ((got.float() - expected.float()).norm() / expected.float().norm()).item() < 2e-2, token
