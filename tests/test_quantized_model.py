"""8-bit weights end to end: quantize at load, compressed-tensors checkpoints, both backends.

* The model's state holds int8 / float8_e4m3fn tensors (and float32 scales) for the projections
  only, nothing dequantized.
* A quantized model computes the logits of its dequantized weights: against the independent
  float64 reference (tests/reference_llama.py) fed ``q * scale``, within 1e-4 relative.
* The Triton backend (its GEMV reading 8-bit weights at single-token steps; interpreted on the CPU,
  float32) agrees with the torch backend (which dequantizes).
* Loading is strict: missing, unexpected, mis-shaped or wrong-dtype tensors are errors naming them.
"""
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import flashcore
from minillama import Llama
from minillama.backend import MODEL_DTYPE_LARGE_ROWS, TritonBackend, runs_model_dtype_matmul
from minillama.hub import DEMO_MODEL_DIR
from minillama.quantization import QuantizedLinear, dequantize, quantize_per_channel
from tests import reference_llama as ref
from tests.checkpoints import load_config, load_state_dict, write_checkpoint
from tests.compressed_checkpoints import dequantized_state_dict, write_compressed_checkpoint

FP8 = torch.float8_e4m3fn
SMALL = dict(hidden_size=32, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=64, tokenizer="sentencepiece")
IDS = [1, 17, 300, 42, 9, 250, 77, 5, 128, 64, 3]
interpreted = pytest.mark.skipif(not flashcore.INTERPRET and not torch.cuda.is_available(),
                                 reason="needs TRITON_INTERPRET=1 (set by conftest on the CPU)")


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    folder = tmp_path_factory.mktemp("full") / "ckpt"
    write_checkpoint(folder, **SMALL)
    return folder


def quantized_reference_state(folder, kind, lm_head=False):
    """HF-named float64 state with every projection (and lm_head) replaced by its per-channel
    quantization."""
    state = load_state_dict(folder)
    for name, w in state.items():
        if name.endswith("_proj.weight") or (lm_head and name == "lm_head.weight"):
            q, scale = quantize_per_channel(w.float(), {"int8": torch.int8, "fp8": FP8}[kind])
            state[name] = q.double() * scale.double()[:, None]
    return state


# -- quantize at load --


@pytest.mark.parametrize("kind,dtype", [("int8", torch.int8), ("fp8", FP8)])
def test_state_holds_8bit_projections_only(full, kind, dtype):
    llm = Llama.from_pretrained(full, device="cpu", quantize=kind)
    state = llm.model.state_dict()
    projections = [n for n in state if n.endswith(("wqkv.weight", "wo.weight", "w13.weight", "w2.weight"))]
    assert len(projections) == 4 * 2
    for name, t in state.items():
        if name in projections:
            assert t.dtype == dtype, name
        elif name.endswith("weight_scale"):
            assert t.dtype == torch.float32 and t.shape == state[name.replace("_scale", "")].shape[:1], name
            assert name.replace("_scale", "") in projections
        else:  # embedding, norms, lm_head: the model dtype, never 8-bit
            assert t.dtype == torch.float32, name
    assert sum(n.endswith("weight_scale") for n in state) == len(projections)
    assert isinstance(llm.model.layers[0].feed_forward.w13, QuantizedLinear)
    assert llm.model.output.weight.dtype == torch.float32 and llm.model.tok_embeddings.weight.dtype == torch.float32


@pytest.mark.parametrize("lm_head", [False, True])
@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_quantized_logits_are_those_of_the_dequantized_weights(full, kind, lm_head):
    config = load_config(full)
    got = Llama.from_pretrained(full, device="cpu", quantize=kind, quantize_lm_head=lm_head).logits(IDS)
    expected = ref.forward(config, quantized_reference_state(full, kind, lm_head), IDS)
    assert ref.max_relative_error(got, expected) < 1e-4
    plain = ref.forward(config, quantized_reference_state(full, kind, not lm_head), IDS)
    assert ref.max_relative_error(got, plain) > 1e-4  # the head's quantization is really there (or not)


@pytest.mark.parametrize("kind,dtype", [("int8", torch.int8), ("fp8", FP8)])
def test_quantize_lm_head_stores_the_head_in_8_bits(full, kind, dtype):
    head = Llama.from_pretrained(full, device="cpu", quantize=kind, quantize_lm_head=True).model.output
    assert isinstance(head, QuantizedLinear) and head.weight.dtype == dtype
    expected, scale = quantize_per_channel(load_state_dict(full)["lm_head.weight"].float(), dtype)
    assert torch.equal(head.weight.view(torch.int8), expected.view(torch.int8)) and torch.equal(head.weight_scale, scale)


def test_quantize_lm_head_errors_before_reading_weights(tmp_path, full, monkeypatch):
    from minillama import weights

    def no_reading(*args, **kwargs):
        raise AssertionError("a tensor was read")

    monkeypatch.setattr(weights, "copy_tensors_from_file", no_reading)
    with pytest.raises(ValueError, match="quantize_lm_head=True quantizes lm_head along with the projections: "
                                         "pass quantize='int8' or 'fp8' too"):
        Llama.from_pretrained(full, device="cpu", quantize_lm_head=True)
    with pytest.raises(TypeError, match="quantize_lm_head must be True or False, got 'yes'"):
        Llama.from_pretrained(full, device="cpu", quantize="fp8", quantize_lm_head="yes")
    write_checkpoint(tmp_path / "tied", tied=True, **SMALL)
    with pytest.raises(ValueError, match=r"lm_head is its embedding table \(tie_word_embeddings\), which stays in "
                                         r"the model dtype; drop quantize_lm_head"):
        Llama.from_pretrained(tmp_path / "tied", device="cpu", quantize="int8", quantize_lm_head=True)
    write_compressed_checkpoint(full, tmp_path / "ct")
    with pytest.raises(ValueError, match="already quantized: its quantization_config's 'ignore' list says whether "
                                         "lm_head is 8-bit"):
        Llama.from_pretrained(tmp_path / "ct", device="cpu", quantize_lm_head=True)


def test_quantize_with_bf16_activations(full):
    llm = Llama.from_pretrained(full, device="cpu", dtype="bfloat16", quantize="fp8")
    assert llm.model.layers[1].attention.wqkv.weight.dtype == FP8
    got = llm.logits(IDS)
    expected = ref.forward(load_config(full), quantized_reference_state(full, "fp8"), IDS)
    assert ref.max_relative_error(got, expected) < 5e-2  # bf16 compute bound of test_model_logits


def test_bad_quantize_values(full):
    with pytest.raises(ValueError, match="quantize must be None or one of \\['fp8', 'int8'\\], got 'int4'"):
        Llama.from_pretrained(full, device="cpu", quantize="int4")


# -- compressed-tensors checkpoints --


CT_CASES = {
    "fp8 channel dynamic bf16 (FP8-dynamic)": dict(kind="float", weight_strategy="channel", activations="dynamic",
                                                  dtype="bfloat16"),
    "fp8 tensor static bf16 (FP8)": dict(kind="float", weight_strategy="tensor", activations="static",
                                         dtype="bfloat16"),
    "fp8 channel weight-only fp32 sharded": dict(kind="float", weight_strategy="channel", activations=None,
                                                 dtype="float32", shards=3),
    "int8 channel dynamic fp32 (W8A8)": dict(kind="int", weight_strategy="channel", activations="dynamic",
                                             dtype="float32"),
    "int8 tensor static tied": dict(kind="int", weight_strategy="tensor", activations="static",
                                    dtype="float32", tied=True),
    "fp8 down_proj ignored": dict(kind="float", weight_strategy="channel", activations="dynamic",
                                  dtype="bfloat16", ignore=["lm_head", "re:.*down_proj"]),
    "int8 channel dynamic fp32, lm_head quantized": dict(kind="int", weight_strategy="channel",
                                                         activations="dynamic", dtype="float32", ignore=[]),
}


def make_ct(tmp_path, dtype="float32", shards=1, tied=False, **kwargs):
    write_checkpoint(tmp_path / "full", dtype=dtype, shards=shards, tied=tied, **SMALL)
    write_compressed_checkpoint(tmp_path / "full", tmp_path / "ct", **kwargs)
    return tmp_path / "ct"


@pytest.mark.parametrize("case", list(CT_CASES))
def test_compressed_checkpoint_gives_the_logits_of_its_dequantized_weights(tmp_path, case):
    folder = make_ct(tmp_path, **CT_CASES[case])
    llm = Llama.from_pretrained(folder, device="cpu", dtype="float32")
    got = llm.logits(IDS)
    expected = ref.forward(load_config(folder), dequantized_state_dict(folder), IDS)
    err = ref.max_relative_error(got, expected)
    print(f"\n[{case}] max relative logits error vs dequantized float64 reference: {err:.1e}")
    assert err < 1e-4
    w2 = llm.model.layers[0].feed_forward.w2
    if "ignored" in case:
        assert not isinstance(w2, QuantizedLinear) and w2.weight.dtype == torch.float32
    else:
        assert w2.weight.dtype == (FP8 if CT_CASES[case]["kind"] == "float" else torch.int8)
    head = llm.model.output
    if "lm_head quantized" in case:
        assert isinstance(head, QuantizedLinear) and head.weight.dtype == torch.int8
    else:
        assert not isinstance(head, QuantizedLinear)
    wqkv = llm.model.layers[0].attention.wqkv
    if CT_CASES[case]["activations"] == "static":
        assert torch.equal(wqkv.input_scale, torch.full((3,), 0.05, dtype=torch.bfloat16 if "bf16" in case
                                                        else torch.float32).float())
    else:
        assert wqkv.input_scale is None


def test_compressed_checkpoint_generates(tmp_path):
    folder = make_ct(tmp_path, kind="float", dtype="bfloat16")
    out = Llama.from_pretrained(folder, device="cpu").generate(["hello world"], max_new_tokens=4)
    assert len(out[0].token_ids) >= 1


def edit_tensors(folder, fn):
    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    fn(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


L0 = "model.layers.0.self_attn.k_proj"


@pytest.mark.parametrize("edit,message", [
    (lambda t: t.pop(f"{L0}.weight_scale"), f"lacks 1 tensor.*{L0}.weight_scale"),
    (lambda t: t.update({f"{L0}.input_scale": torch.ones(1)}), f"unexpected tensor.*{L0}.input_scale"),
    (lambda t: t.update({f"{L0}.weight_zero_point": torch.zeros(16, 1, dtype=torch.int8)}),
     f"tensor {L0}.weight_zero_point in model.safetensors has dtype I8, expected F8_E4M3"),
    (lambda t: t.update({f"{L0}.weight_zero_point": torch.zeros(16, dtype=FP8)}),
     rf"tensor {L0}.weight_zero_point in model.safetensors has shape \(16,\), expected \(16, 1\)"),
    (lambda t: t.update({f"{L0}.input_zero_point": torch.zeros(1, dtype=FP8)}), f"unexpected tensor.*{L0}.input_zero_point"),
    (lambda t: t.update({f"{L0}.weight_scale": torch.ones(16)}),
     rf"tensor {L0}.weight_scale in model.safetensors has shape \(16,\), expected \(16, 1\)"),
    (lambda t: t.update({f"{L0}.weight": t[f"{L0}.weight"].to(torch.bfloat16)}),
     f"tensor {L0}.weight in model.safetensors has dtype BF16, expected F8_E4M3"),
    (lambda t: t.update({f"{L0}.weight_scale": t[f"{L0}.weight_scale"].to(FP8)}),
     "has dtype F8_E4M3, expected F32 or BF16 or F16"),
])
def test_strict_compressed_loading(tmp_path, edit, message):
    folder = make_ct(tmp_path, kind="float", dtype="bfloat16")
    edit_tensors(folder, edit)
    with pytest.raises(ValueError, match=message):
        Llama.from_pretrained(folder, device="cpu")


@pytest.mark.parametrize("case", ["fp8 channel dynamic bf16 (FP8-dynamic)", "int8 tensor static tied"])
def test_all_zero_zero_points_load_as_symmetric(tmp_path, case):
    """Zero points that are all zeros (compressed-tensors creates them for symmetric schemes too, and
    some checkpoints keep them) change nothing: the logits are those of the checkpoint without them."""
    with_zp = make_ct(tmp_path / "zp", zero_points=True, **CT_CASES[case])
    without = make_ct(tmp_path / "plain", **CT_CASES[case])
    assert f"{L0}.weight_zero_point" in load_file(str(with_zp / "model.safetensors"))
    got = Llama.from_pretrained(with_zp, device="cpu", dtype="float32").logits(IDS)
    assert torch.equal(got, Llama.from_pretrained(without, device="cpu", dtype="float32").logits(IDS))


@pytest.mark.parametrize("name, index", [("weight_zero_point", (3, 0)), ("input_zero_point", (0,))])
def test_a_non_zero_zero_point_is_refused_naming_it(tmp_path, name, index):
    folder = make_ct(tmp_path, kind="int", activations="static", zero_points=True)
    edit_tensors(folder, lambda t: t[f"{L0}.{name}"].__setitem__(index, 2))
    with pytest.raises(NotImplementedError) as e:
        Llama.from_pretrained(folder, device="cpu")
    assert str(e.value) == (f"tensor {L0}.{name} in model.safetensors holds 1 non-zero value(s): asymmetric "
                            f"quantization (non-zero zero points) is not supported; minillama reads symmetric "
                            f"compressed-tensors checkpoints, whose zero points are absent or all zeros")


def test_8bit_tensor_the_config_does_not_quantize_is_an_error(tmp_path):
    folder = make_ct(tmp_path, kind="float")
    config = json.loads((folder / "config.json").read_text())
    del config["quantization_config"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="has dtype F8_E4M3; this checkpoint's weights must be one of F32"):
        Llama.from_pretrained(folder, device="cpu")
    folder = make_ct(tmp_path / "b", kind="float")
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"]["ignore"] = ["lm_head", "model.layers.1.mlp.down_proj"]
    (folder / "config.json").write_text(json.dumps(config))
    edit_tensors(folder, lambda t: t.pop("model.layers.1.mlp.down_proj.weight_scale"))
    with pytest.raises(ValueError, match="tensor model.layers.1.mlp.down_proj.weight in model.safetensors has dtype "
                                         "F8_E4M3, but the quantization_config does not quantize it"):
        Llama.from_pretrained(folder, device="cpu")


def test_unsupported_method_fails_before_any_tensor_is_read(tmp_path):
    folder = make_ct(tmp_path, kind="float")
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 128}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(NotImplementedError, match=r"config.json: quantization_config \(quant_method 'gptq'\) is not "
                                                  r"supported; minillama reads compressed-tensors"):
        Llama.from_pretrained(folder, device="cpu")


def test_quantize_on_a_quantized_checkpoint_is_an_error(tmp_path):
    folder = make_ct(tmp_path, kind="float")
    with pytest.raises(ValueError, match="already quantized"):
        Llama.from_pretrained(folder, device="cpu", quantize="int8")


# -- the Triton backend: 8-bit GEMV (interpreted on the CPU, float32) --


def rope_inputs(g, head_dim, device="cpu", dtype=torch.float32):
    """cos, sin (1, head_dim) of a random position, as the model makes them."""
    from minillama.backend import rope_cos_sin

    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim))
    position = torch.randint(0, 4096, (1,), generator=g, device=device)
    return rope_cos_sin(position, inv_freq, dtype)


@pytest.mark.triton
@interpreted
@pytest.mark.parametrize("dtype", [None, torch.int8, FP8])
@pytest.mark.parametrize("fused_norm", [False, True])
def test_gemv_rope_epilogue_equals_gemv_then_rope(dtype, fused_norm):
    """The GEMV's RoPE epilogue gives the plain GEMV's output rotated by ``kernels.rope_``, bit for
    bit: 3 of 4 heads rotated (q and k), the last (v) untouched; K not a multiple of the block."""
    from minillama import kernels

    g = torch.Generator().manual_seed(1)
    head_dim, K = 16, 96
    w = torch.randn(4 * head_dim, K, generator=g)
    q, scale = (w, None) if dtype is None else quantize_per_channel(w, dtype)
    x, res = torch.randn(K, generator=g), torch.randn(K, generator=g)
    norm = dict(add=res, h_out=torch.empty(K), norm_weight=1 + 0.2 * torch.randn(K, generator=g), eps=1e-5)
    kw = dict(norm if fused_norm else {}, scale=scale)
    cos, sin = rope_inputs(g, head_dim)
    expected = kernels.gemv(x, q, **kw)
    kernels.rope_(expected[None], cos, sin, 3, head_dim)
    got = kernels.gemv(x, q, rope=(cos, sin, 3, head_dim), **kw)
    assert torch.equal(got, expected)
    assert not torch.equal(got[: 3 * head_dim], kernels.gemv(x, q, **kw)[: 3 * head_dim])  # it did rotate


@pytest.mark.triton
@interpreted
@pytest.mark.parametrize("dtype", [torch.int8, FP8])
@pytest.mark.parametrize("add,norm,swiglu", [(False, False, False), (True, True, True), (False, True, False)])
def test_gemv_reads_8bit_weights(dtype, add, norm, swiglu):
    from minillama import kernels

    g = torch.Generator().manual_seed(0)
    K, N = 96, 80  # K not a multiple of the block: the masked path
    x = torch.randn(K, generator=g)
    q, scale = quantize_per_channel(torch.randn(N, K, generator=g), dtype)
    res = torch.randn(K, generator=g) if add else None
    h_out = torch.empty(K) if add else None
    gain = 1 + 0.2 * torch.randn(K, generator=g) if norm else None
    got = kernels.gemv(x, q, add=res, h_out=h_out, norm_weight=gain, eps=1e-5, swiglu=swiglu, scale=scale)
    h = x if res is None else x + res
    if add:
        assert torch.equal(h_out, h)
    xn = h if gain is None else gain * (h * torch.rsqrt(h.pow(2).mean() + 1e-5))
    y = dequantize(q, scale, torch.float64) @ xn.double()
    if swiglu:
        gate, up = y.chunk(2)
        y = torch.nn.functional.silu(gate) * up
    assert torch.allclose(got.double(), y, rtol=1e-5, atol=1e-5)


@pytest.mark.triton
@interpreted
@pytest.mark.parametrize("dtype", [torch.int8, FP8])
@pytest.mark.parametrize("loads", ["pointers", "tma", "tma_swapped", "tma_swapped_persistent"])
@pytest.mark.parametrize("M,split_k", [(3, 1), (20, 1), (3, 2), (20, 3)])
def test_matmul_reads_8bit_weights(dtype, loads, M, split_k):
    """Each way of loading the tiles; masked paths (K, N not multiples of the blocks; rows and
    columns past the tensor read as zeros by TMA) and split K: with 64-column tiles, 2 or 3 splits
    asked for both make 2 (whole tiles per split), the second one a partial tile."""
    from minillama import kernels

    g = torch.Generator().manual_seed(1)
    K, N = 96, 80
    x = torch.randn(M, K, generator=g)
    q, scale = quantize_per_channel(torch.randn(N, K, generator=g), dtype)
    got = kernels.matmul(x, q, scale, config=kernels.INTERPRET_MATMUL[:5] + (split_k, loads))
    expected = x.double() @ dequantize(q, scale, torch.float64).T
    assert torch.allclose(got.double(), expected, rtol=1e-5, atol=1e-5)
    if split_k > 1:  # the last split of each tile summed the partials and zeroed its arrival counter
        assert not kernels._split_arrivals(x.device, 1).any()


def exact_sum_operands(g, M: int, K: int, N: int, dtype):
    """x (M, K) and a weight (N, K) of ``dtype`` (with per-row scales where 8-bit) holding small
    integers and quarters, so that every partial sum of x @ weight^T is exact in float32: a product's
    bits then do not depend on the order in which a tile is summed. Triton's interpreter runs tl.dot
    as numpy's matmul, whose float32 sums depend on a column's place in the tile (numpy 2.4.6's
    OpenBLAS 0.3.31: ``A @ B`` and ``A @ B[:, :40]`` differ in the last bit), so a fused epilogue and
    the same product run apart could differ for reasons that are not the kernel's."""
    x = torch.randint(-1, 2, (M, K), generator=g).float()
    scale = (torch.rand(N, generator=g) + 0.5) / 128  # products of order 1-10, where SiLU bends
    if dtype == torch.int8:
        return x, torch.randint(-127, 128, (N, K), generator=g).to(torch.int8), scale
    quarters = torch.randint(-16, 17, (N, K), generator=g).float() / 4  # exact in e4m3, bf16, fp16
    if dtype == FP8:
        return x, quarters.to(FP8), scale
    return x.to(dtype), quarters.to(dtype), None


@pytest.mark.triton
@interpreted
@pytest.mark.parametrize("dtype", [torch.int8, FP8, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("loads", ["pointers", "tma", "tma_swapped", "tma_swapped_persistent"])
@pytest.mark.parametrize("split_k", [1, 2])
def test_matmul_swiglu_epilogue(dtype, loads, split_k):
    """The matmul's SiLU x up epilogue, over 8-bit weights and weights of x's dtype: silu(gate) * up
    of the (M, 2N) product, bit for bit what the matmul then ``silu_mul`` give (on operands whose
    sums are exact: :func:`exact_sum_operands`), and close to the float64 product's for random ones.
    N = 40 with 64-column tiles: the gate tile's last rows are up rows (masked), the up tile's reach
    past the weight (zeros by TMA). With K split in 2, the last split sums gate and up partials first."""
    from minillama import kernels

    g = torch.Generator().manual_seed(6)
    M, K, N = 12, 96, 40  # fused up to kernels.FUSED_EPILOGUE_ROWS rows
    x = torch.randn(M, K, generator=g)
    if dtype in (torch.int8, FP8):
        w, scale = quantize_per_channel(torch.randn(2 * N, K, generator=g), dtype)
        w64 = dequantize(w, scale, torch.float64)
    else:
        x, w, scale = x.to(dtype), (torch.randn(2 * N, K, generator=g) / 4).to(dtype), None
        w64 = w.double()
    config = kernels.INTERPRET_MATMUL[:5] + (split_k, loads)
    xe, we, se = exact_sum_operands(g, M, K, 2 * N, dtype)
    assert torch.equal(kernels.matmul(xe, we, se, swiglu=True, config=config),
                       kernels.silu_mul(kernels.matmul(xe, we, se, config=config)))
    got = kernels.matmul(x, w, scale, swiglu=True, config=config)
    assert got.shape == (M, N) and got.dtype == x.dtype
    gate, up = (x.double() @ w64.T).chunk(2, dim=1)
    want = torch.nn.functional.silu(gate) * up
    if x.dtype == torch.float32:
        assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-5)
    else:  # gate, up and silu(gate) rounded to x's dtype, as the model's tensor ops round them (the
        # interpreter rounds to bfloat16 by truncation: twice the error of rounding to nearest)
        assert ((got.double() - want).norm() / want.norm()).item() < (2e-2 if x.dtype == torch.bfloat16 else 2e-3)


@pytest.mark.triton
@interpreted
@pytest.mark.parametrize("dtype", [torch.int8, FP8, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("loads", ["pointers", "tma", "tma_swapped"])
@pytest.mark.parametrize("split_k", [1, 2])
def test_matmul_rope_epilogue(dtype, loads, split_k):
    """The matmul's RoPE epilogue: the product's first two heads of three (q, k; then v, untouched)
    rotated with each token row's cos / sin, bit for bit what the matmul then ``rope_`` give (on
    operands whose sums are exact: :func:`exact_sum_operands`), and for float32 the float64 rotation
    of the float64 product. With K split in 2, the last split sums both halves' partials first."""
    from minillama import kernels
    from minillama.backend import rotate_half_rope

    g = torch.Generator().manual_seed(7)
    M, K, D = 12, 96, 32  # fused up to kernels.FUSED_EPILOGUE_ROWS rows, for heads of 32 dims or more
    x = torch.randn(M, K, generator=g)
    cos, sin = torch.randn(M, D, generator=g), torch.randn(M, D, generator=g)
    if dtype in (torch.int8, FP8):
        w, scale = quantize_per_channel(torch.randn(3 * D, K, generator=g), dtype)
        w64 = dequantize(w, scale, torch.float64)
    else:
        x, w, scale = x.to(dtype), (torch.randn(3 * D, K, generator=g) / 4).to(dtype), None
        cos, sin = cos.to(dtype), sin.to(dtype)
        w64 = w.double()
    config = kernels.INTERPRET_MATMUL[:5] + (split_k, loads)
    xe, we, se = exact_sum_operands(g, M, K, 3 * D, dtype)
    want = kernels.matmul(xe, we, se, config=config)
    kernels.rope_(want, cos, sin, 2, D)
    assert torch.equal(kernels.matmul(xe, we, se, rope=(cos, sin, 2, D), config=config), want)
    got = kernels.matmul(x, w, scale, rope=(cos, sin, 2, D), config=config)
    y = x.double() @ w64.T
    rotated = rotate_half_rope(y[:, : 2 * D].view(M, 2, D), cos.double()[:, None], sin.double()[:, None])
    expected = torch.cat([rotated.reshape(M, 2 * D), y[:, 2 * D:]], 1)
    if x.dtype == torch.float32:
        assert torch.allclose(got.double(), expected, rtol=1e-5, atol=1e-5)
    else:  # the product and each rotation's products rounded to x's dtype (the interpreter truncates bfloat16)
        bound = 2e-2 if x.dtype == torch.bfloat16 else 2e-3
        assert ((got.double() - expected).norm() / expected.norm()).item() < bound


def small_integer_operands(g, M: int, K: int, N: int, dtype):
    """x (M, K) and a weight (N, K) of ``dtype`` (with per-row scales where 8-bit) whose product holds
    integers of at most K: every value and square of it exact in float32 and bfloat16, and every sum
    of up to a few hundred squares exact in float32, whatever the order it is summed in."""
    x = torch.randint(-1, 2, (M, K), generator=g).float()
    w = torch.randint(-1, 2, (N, K), generator=g).float()
    if dtype == torch.int8:
        return x, (2 * w).to(torch.int8), torch.full((N,), 0.5)
    if dtype == FP8:
        return x, w.to(FP8), torch.ones(N)
    return x.to(dtype), w.to(dtype), None


@pytest.mark.triton
@interpreted
@pytest.mark.parametrize("dtype", [torch.int8, FP8, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("loads", ["pointers", "tma", "tma_swapped"])
@pytest.mark.parametrize("split_k", [1, 2])
def test_matmul_runs_the_norm_between_two_products(dtype, loads, split_k):
    """The residual add + RMSNorm between two products, in their launches: the first (``norm_next``)
    writes h = product + residual, the same bits as ``add_rms_norm``'s, h * the norm's gain rounded,
    and its tiles' sums of h's squares; the next (``norm``) multiplies h * gain and applies each
    row's 1 / rms in its epilogue: plain, SiLU x up and RoPE products, within float32's (or
    bfloat16's) rounding of that math in float64, and of the float64 math of the norm itself.
    N = 80 with 64-column tiles: two tiles, the second partial."""
    from minillama import kernels
    from minillama.backend import rotate_half_rope

    g = torch.Generator().manual_seed(11)
    M, K, N, D, eps = 12, 96, 80, 32, 1e-5
    config = kernels.INTERPRET_MATMUL[:5] + (split_k, loads)
    act = torch.bfloat16 if dtype == torch.bfloat16 else torch.float32
    gain = (1 + torch.randn(N, generator=g) / 4).to(act)
    cos, sin = torch.randn(M, D, generator=g).to(act), torch.randn(M, D, generator=g).to(act)
    consumers = ({}, {"swiglu": True}, {"rope": (cos, sin, 2, D)})

    def nexts():  # weights of the next products: plain, [gate; up], q k v heads (+ scales where 8-bit)
        out = []
        for n in (48, 2 * 40, 3 * D):
            if dtype in (torch.int8, FP8):
                out.append(quantize_per_channel(torch.randn(n, N, generator=g), dtype))
            else:
                out.append(((torch.randn(n, N, generator=g) / 4).to(dtype), None))
        return out

    def expected(rows64, w2, s2, kw):  # the float64 product of normed rows, then SiLU x up or RoPE
        y = rows64 @ (dequantize(w2, s2, torch.float64) if s2 is not None else w2.double()).T
        if kw.get("swiglu"):
            gate, up = y.chunk(2, dim=1)
            y = torch.nn.functional.silu(gate) * up
        if "rope" in kw:
            rotated = rotate_half_rope(y[:, : 2 * D].view(M, 2, D), cos.double()[:, None], sin.double()[:, None])
            y = torch.cat([rotated.reshape(M, 2 * D), y[:, 2 * D:]], 1)
        return y

    # exact sums of squares: h, h * gain and the sums are the norm kernel's, bit for bit
    x, w, scale = small_integer_operands(g, M, K, N, dtype)
    residual = torch.randint(-3, 4, (M, N), generator=g).to(act)
    h, gained, sumsq = kernels.matmul(x, w, scale, norm_next=(residual, gain), config=config)
    _, h_ref = kernels.add_rms_norm(kernels.matmul(x, w, scale, config=config), residual, gain, eps)
    assert torch.equal(h, h_ref) and h.dtype == act
    gained_ref = (h.float() * gain.float())
    if act == torch.bfloat16:  # the interpreter rounds float32 to bfloat16 toward zero
        gained_ref = (gained_ref.view(torch.int32) & -(1 << 16)).view(torch.float32)
    assert torch.equal(gained, gained_ref.to(act))
    assert sumsq.shape == (2, M) and torch.equal(sumsq.sum(0), h.float().pow(2).sum(1))
    if split_k > 1:
        assert not kernels._split_arrivals(x.device, 1).any()

    # random operands: against the float64 math
    x = torch.randn(M, K, generator=g).to(act)
    if dtype in (torch.int8, FP8):
        w, scale = quantize_per_channel(torch.randn(N, K, generator=g), dtype)
        w64 = dequantize(w, scale, torch.float64)
    else:
        w, scale = (torch.randn(N, K, generator=g) / 4).to(dtype), None
        w64 = w.double()
    residual = torch.randn(M, N, generator=g).to(act)
    h, gained, sumsq = kernels.matmul(x, w, scale, norm_next=(residual, gain), config=config)
    h64 = x.double() @ w64.T + residual.double()
    bound = 2e-2 if act == torch.bfloat16 else 1e-5  # the interpreter rounds to bfloat16 by truncation
    assert ((h.double() - h64).norm() / h64.norm()).item() < bound
    inv_rms64 = torch.rsqrt(h.double().pow(2).mean(1, keepdim=True) + eps)
    normed64 = gain.double() * h.double() * inv_rms64
    for (w2, s2), kw in zip(nexts(), consumers):
        got = kernels.matmul(gained, w2, s2, norm=(sumsq, eps), config=config, **kw).double()
        y = expected(gained.double() * inv_rms64, w2, s2, kw)  # what the kernel computes, in float64
        assert ((got - y).norm() / y.norm()).item() < (2e-2 if act == torch.bfloat16 else 1e-6), kw
        y = expected(normed64, w2, s2, kw)  # the norm's math: h * gain rounded once more
        assert ((got - y).norm() / y.norm()).item() < (5e-2 if act == torch.bfloat16 else 1e-5), kw


@pytest.mark.triton
@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.int8, FP8])
def test_gemv_runs_the_norm_between_two_products(dtype, monkeypatch):
    """``norm_next``: the GEMV adds the residual to its output (the same bits as the GEMV, then
    ``add_rms_norm``), writes h * the norm's gain rounded and each program's sum of squares of its
    piece of h. The next GEMV
    (``norm``) multiplies h * gain and applies the 1 / rms: plain, SiLU x up and RoPE products,
    within float32's rounding of that math in float64, and of the float64 math of the norm itself."""
    from minillama import kernels
    from minillama.backend import rotate_half_rope

    g = torch.Generator().manual_seed(7)
    K, N, D, eps = 96, 80, 16, 1e-5  # N not a power of two: masked lanes
    act = torch.float16 if dtype == torch.float16 else torch.float32
    x = torch.randn(K, generator=g).to(act)
    w = torch.randn(N, K, generator=g) / K ** 0.5
    q, scale = (w.to(dtype), None) if dtype in (torch.float32, torch.float16) else quantize_per_channel(w, dtype)
    residual = (4 * torch.randn(N, generator=g)).to(act)
    gain = (1 + 0.2 * torch.randn(N, generator=g)).to(act)
    cos, sin = rope_inputs(g, D)
    for config in ((1, 32, 4, False), (16, 64, 4, True)):  # several programs: one arrives last
        monkeypatch.setattr(kernels, "INTERPRET_GEMV", config)  # the interpreter's tiling, else fixed
        y = kernels.gemv(x, q, scale=scale, config=config)
        _, want_h = kernels.add_rms_norm(y[None], residual[None], gain, eps)
        h, gained, sumsq = kernels.gemv(x, q, scale=scale, config=config, norm_next=(residual, gain))
        assert torch.equal(h, want_h[0]), config
        assert torch.equal(gained, (h.float() * gain.float()).to(act)), config
        assert sumsq.shape == (-(-N // config[0]), 1), config
        assert torch.allclose(sumsq.sum(), h.float().pow(2).sum(), rtol=1e-6), config
        inv_rms64 = torch.rsqrt(h.double().pow(2).mean() + eps)
        for n_out, kw in ((48, {}), (2 * 40, {"swiglu": True}), (3 * D, {"rope": (cos.to(act), sin.to(act), 2, D)})):
            w2 = torch.randn(n_out, N, generator=g) / N ** 0.5
            q2, s2 = (w2.to(dtype), None) if scale is None else quantize_per_channel(w2, dtype)
            got = kernels.gemv(gained, q2, scale=s2, norm=(sumsq, eps), config=config, **kw).double()
            w64 = dequantize(q2, s2, torch.float64) if s2 is not None else q2.double()

            def expected(normed64):
                y = w64 @ normed64
                if kw.get("swiglu"):
                    gate, up = y.chunk(2)
                    y = torch.nn.functional.silu(gate) * up
                if "rope" in kw:
                    heads = y[: 2 * D].view(1, 2, D)
                    rotated = rotate_half_rope(heads, cos.double().view(1, 1, D), sin.double().view(1, 1, D))
                    y = torch.cat([rotated.reshape(2 * D), y[2 * D:]])
                return y

            bound = 1e-2 if act == torch.float16 else 1e-6
            want = expected(gained.double() * inv_rms64)  # what the kernel computes, in float64
            assert ((got - want).norm() / want.norm()).item() < bound, (config, kw)
            want = expected(gain.double() * h.double() * inv_rms64)  # the norm's math
            assert ((got - want).norm() / want.norm()).item() < 5 * bound, (config, kw)


@pytest.mark.triton
@interpreted
def test_gemv_reads_strided_vectors():
    """The residual, the norm's gain and RoPE's cos/sin as strided views (every other value): the
    GEMV read them at consecutive addresses and gave other numbers (max error ~6)."""
    from minillama import kernels

    g = torch.Generator().manual_seed(5)
    K, head_dim = 40, 8
    x, w = torch.randn(K, generator=g), torch.randn(3 * head_dim, K, generator=g)
    add = torch.randn(2 * K, generator=g)[::2]
    gain = (1 + 0.1 * torch.randn(2 * K, generator=g))[::2]
    cos, sin = rope_inputs(g, head_dim)
    rope = (torch.stack([cos, cos], -1).reshape(1, -1)[:, ::2], torch.stack([sin, sin], -1).reshape(1, -1)[:, ::2],
            2, head_dim)
    assert rope[0].stride(-1) == 2
    h_out = torch.empty(K)
    got = kernels.gemv(x, w, add=add, h_out=h_out, norm_weight=gain, eps=1e-5, rope=rope)
    want = kernels.gemv(x, w, add=add.contiguous(), h_out=torch.empty(K), norm_weight=gain.contiguous(), eps=1e-5,
                        rope=(cos, sin, 2, head_dim))
    assert torch.equal(h_out, x + add)
    assert torch.equal(got, want)


@pytest.mark.triton
@interpreted
@pytest.mark.parametrize("dtype", [torch.int8, FP8])
@pytest.mark.parametrize("loads,split_k", [("pointers", 1), ("pointers", 2), ("tma_swapped", 1)])
def test_matmul_8bit_bfloat16_activations(dtype, loads, split_k):
    """bfloat16 activations, as a bfloat16 model's prefill and batched decode pass them: within
    bfloat16 rounding of the float64 product. Triton's interpreter keeps bfloat16 as raw uint16
    bits and its tl.dot multiplied those (errors ~1e9)."""
    from minillama import kernels

    g = torch.Generator().manual_seed(4)
    M, K, N = 5, 96, 80
    x = torch.randn(M, K, generator=g).to(torch.bfloat16)
    q, scale = quantize_per_channel(torch.randn(N, K, generator=g), dtype)
    got = kernels.matmul(x, q, scale, config=kernels.INTERPRET_MATMUL[:5] + (split_k, loads))
    expected = x.double() @ dequantize(q, scale, torch.float64).T
    assert got.dtype == torch.bfloat16
    assert ((got.double() - expected).abs() <= 2 ** -7 * expected.abs() + 1e-6).all()


@pytest.mark.triton
@interpreted
def test_matmul_prefill_tiling_without_tma():
    """A prefill tiling (256-row TMA tiles) on a weight whose rows TMA cannot load (90 bytes, not a
    multiple of 16) falls back to per-thread loads in tiles that fit without TMA: same product."""
    from minillama import kernels

    g = torch.Generator().manual_seed(2)
    M, K, N = 130, 90, 80
    x = torch.randn(M, K, generator=g)
    q, scale = quantize_per_channel(torch.randn(N, K, generator=g), torch.int8)
    assert not kernels.tma_ready(x, q)
    got = kernels.matmul(x, q, scale, config=(256, 128, 128, 8, 3, 1, "tma_swapped"))
    expected = x.double() @ dequantize(q, scale, torch.float64).T
    assert torch.allclose(got.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.triton
@interpreted
@pytest.mark.parametrize("kind,matmul_8bit,lm_head", [("int8", "triton", False), ("fp8", "triton", False),
                                                     ("fp8", "dequantize", False), ("int8", "triton", True),
                                                     ("fp8", "triton", True)])
def test_triton_backend_matches_torch_on_8bit_weights(full, kind, matmul_8bit, lm_head):
    torch_llm = Llama.from_pretrained(full, device="cpu", quantize=kind, backend="torch", quantize_lm_head=lm_head)
    triton_llm = Llama.from_pretrained(full, device="cpu", quantize=kind, backend="triton", quantize_lm_head=lm_head)
    if matmul_8bit != "triton":
        for module in triton_llm.model.modules():
            if hasattr(module, "backend"):
                module.backend = TritonBackend(matmul_8bit=matmul_8bit)
    for llm in (torch_llm, triton_llm):
        assert llm.model.layers[0].attention.wqkv.weight.dtype == {"int8": torch.int8, "fp8": FP8}[kind]
        assert isinstance(llm.model.output, QuantizedLinear) == lm_head
    prompt = IDS[:6]
    ref_out = torch_llm.generate([prompt], max_new_tokens=3)[0]
    out = triton_llm.generate([prompt], max_new_tokens=3)[0]
    assert out.token_ids == ref_out.token_ids
    # logits of a prefill (dequantize + matmul) and of single-token steps (the 8-bit GEMV)
    for llm_a, llm_b in ((torch_llm, triton_llm),):
        seq = prompt + ref_out.token_ids
        full_a = llm_a.logits(seq)
        cache = llm_b.new_cache(1, 16)
        steps = [llm_b.runner(torch.tensor([prompt]), cache)[0, -1]]
        cache.advance(len(prompt))
        for t in ref_out.token_ids[:-1]:
            steps.append(llm_b.runner(torch.tensor([[t]]), cache)[0, -1])
            cache.advance(1)
        got = torch.stack(steps).float()
        expected = full_a[len(prompt) - 1:len(seq) - 1]
        assert ((got - expected).norm() / expected.norm()).item() < 1e-5


@pytest.mark.triton
@interpreted
@pytest.mark.parametrize("dtype", [torch.int8, FP8])
def test_dequantize_kernel_equals_the_torch_dequantize(dtype):
    """One pass of the Triton kernel gives ``quantization.dequantize``'s numbers, bit for bit
    (shapes not multiples of its 64 x 64 interpreter tiles)."""
    from minillama import kernels

    g = torch.Generator().manual_seed(3)
    q, scale = quantize_per_channel(torch.randn(70, 100, generator=g), dtype)
    assert torch.equal(kernels.dequantize(q, scale, torch.float32), dequantize(q, scale, torch.float32))


@pytest.mark.triton
@interpreted
@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_triton_backend_prefill_past_the_fused_rows(full, kind, monkeypatch):
    """Past ``FUSED_8BIT_ROWS`` rows (``FUSED_8BIT_ROWS_TMA`` where TMA loads tiles, as Triton's
    interpreter emulates it) the Triton backend multiplies by a dequantized copy (cuBLAS on the
    GPU): a 6-token prefill with the bounds at 2 gives the torch backend's logits."""
    from minillama import backend

    monkeypatch.setattr(backend, "FUSED_8BIT_ROWS", 2)
    monkeypatch.setattr(backend, "FUSED_8BIT_ROWS_TMA", 2)
    torch_llm = Llama.from_pretrained(full, device="cpu", quantize=kind, backend="torch")
    triton_llm = Llama.from_pretrained(full, device="cpu", quantize=kind, backend="triton")
    prompt = IDS[:6]
    expected = torch_llm.logits(prompt)
    got = triton_llm.logits(prompt)
    assert ((got - expected).norm() / expected.norm()).item() < 1e-5


# -- quality on the bundled trained model --


def untied_copy(src: Path, dst: Path) -> Path:
    """The checkpoint with its tied head written out as lm_head.weight (tie_word_embeddings false):
    the same model, whose head ``quantize_lm_head`` can quantize."""
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config["tie_word_embeddings"] = False
    (dst / "config.json").write_text(json.dumps(config))
    tensors = load_file(str(dst / "model.safetensors"))
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_demo_model_perplexity_with_8bit_weights(tmp_path):
    """Held-out perplexity (scripts/heldout_stories.txt): int8 within +0.5 %, fp8 within +2 %, with
    lm_head quantized too (the trained head, untied; 2026-12-03: int8 +0.05 %, fp8 +0.06 %)."""
    module = load_script("perplexity")
    docs = module.documents(module.DEFAULT_TEXT.read_text(encoding="utf-8"))
    base = module.perplexity(Llama.from_pretrained(DEMO_MODEL_DIR, device="cpu"), docs)["ppl"]
    untied = untied_copy(DEMO_MODEL_DIR, tmp_path / "untied")
    for kind, bound in (("int8", 0.005), ("fp8", 0.02)):
        for folder, lm_head in ((DEMO_MODEL_DIR, False), (untied, True)):
            llm = Llama.from_pretrained(folder, device="cpu", quantize=kind, quantize_lm_head=lm_head)
            ppl = module.perplexity(llm, docs)["ppl"]
            print(f"\ndemo perplexity {kind}{' + lm_head' * lm_head}: {ppl:.4f} vs {base:.4f} "
                  f"({100 * (ppl / base - 1):+.3f}%)")
            assert ppl <= base * (1 + bound)


# -- GPU (the lead runs these on the lent H200) --


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["int8", "fp8"])
@pytest.mark.parametrize("lm_head", [False, True])
def test_gpu_quantized_bf16_triton_matches_torch(full, kind, lm_head):
    fast = Llama.from_pretrained(full, device="cuda", dtype="bfloat16", quantize=kind, quantize_lm_head=lm_head)
    plain = Llama.from_pretrained(full, device="cuda", dtype="bfloat16", quantize=kind, backend="torch",
                                  quantize_lm_head=lm_head)
    assert fast.model.backend.name == "triton"
    prompt = IDS[:6]
    a = fast.generate([prompt, IDS[2:]], max_new_tokens=8)
    b = plain.generate([prompt, IDS[2:]], max_new_tokens=8)
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    expected = ref.forward(load_config(full), quantized_reference_state(full, kind, lm_head), IDS)
    assert ref.max_relative_error(fast.logits(IDS).cpu(), expected) < 5e-2


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.int8, FP8])
def test_gpu_8bit_head_llama_shapes(dtype):
    """Llama-3.1-8B's LM head (128256 x 4096) in 8 bits through the Triton backend: the GEMV (every
    tiling) and the multi-row products a decode batch or a prefill makes, against float32."""
    from minillama import kernels

    g = torch.Generator(device="cuda").manual_seed(5)
    K, N = 4096, 128256
    q, scale = quantize_per_channel(torch.randn(N, K, device="cuda", generator=g) / 64, dtype)
    w = dequantize(q, scale, torch.float32)
    x = torch.randn(1, K, device="cuda", generator=g, dtype=torch.bfloat16)
    expected = x.float() @ w.T
    for config in kernels.GEMV_CONFIGS:
        got = kernels.gemv(x[0], q, scale=scale, config=config)
        assert ((got.float() - expected[0]).norm() / expected.norm()).item() < 1e-2, config
    backend = TritonBackend()
    for M in (1, 16, 64, 300):
        x = torch.randn(M, K, device="cuda", generator=g, dtype=torch.bfloat16)
        got = backend.linear(x, q, None, weight_scale=scale)
        expected = x.float() @ w.T
        assert got.shape == (M, N) and ((got.float() - expected).norm() / expected.norm()).item() < 1e-2, M


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [None, torch.int8, FP8])
def test_gpu_gemv_rope_epilogue_equals_gemv_then_rope(dtype):
    """Llama-3.1-8B's qkv (32 + 8 heads rotated, 8 not), bf16 activations, every GEMV tiling, the
    residual add + norm in the prologue: bit for bit the plain GEMV's output after ``rope_``."""
    from minillama import kernels

    g = torch.Generator(device="cuda").manual_seed(2)
    K, head_dim = 4096, 128
    w = torch.randn(48 * head_dim, K, device="cuda", generator=g) / 64
    q, scale = (w.bfloat16(), None) if dtype is None else quantize_per_channel(w, dtype)
    x = torch.randn(K, device="cuda", generator=g, dtype=torch.bfloat16)
    res = torch.randn(K, device="cuda", generator=g, dtype=torch.bfloat16)
    gain = (1 + 0.2 * torch.randn(K, device="cuda", generator=g)).bfloat16()
    cos, sin = rope_inputs(g, head_dim, "cuda", torch.bfloat16)
    for config in kernels.GEMV_CONFIGS:
        kw = dict(add=res, h_out=torch.empty_like(x), norm_weight=gain, eps=1e-5, scale=scale, config=config)
        expected = kernels.gemv(x, q, **kw)
        kernels.rope_(expected[None], cos, sin, 40, head_dim)
        assert torch.equal(kernels.gemv(x, q, rope=(cos, sin, 40, head_dim), **kw), expected), config


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.int8, FP8])
def test_gpu_gemv_8bit_llama_shapes(dtype):
    from minillama import kernels

    g = torch.Generator(device="cuda").manual_seed(0)
    K, N = 4096, 2 * 14336
    x = torch.randn(K, device="cuda", generator=g, dtype=torch.bfloat16)
    q, scale = quantize_per_channel(torch.randn(N, K, device="cuda", generator=g) / 64, dtype)
    for config in kernels.GEMV_CONFIGS:
        got = kernels.gemv(x, q, swiglu=True, scale=scale, config=config)
        gate, up = (dequantize(q, scale, torch.float32) @ x.float()).chunk(2)
        expected = torch.nn.functional.silu(gate) * up
        assert ((got.float() - expected).norm() / expected.norm()).item() < 1e-2, config


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.int8, FP8])
def test_gpu_gemv_repeats_bit_for_bit(dtype):
    """Every GEMV tiling, fixed inputs, 30 calls: the same bits each call (a race in compiled code
    shows as a call that differs; Triton 3.6 had one in an 8-bit matmul tiling)."""
    from minillama import kernels

    g = torch.Generator(device="cuda").manual_seed(1)
    K, N = 4096, 2 * 14336
    x = torch.randn(K, device="cuda", generator=g, dtype=torch.bfloat16)
    w = torch.randn(N, K, device="cuda", generator=g) / 64
    q, scale = (w.to(dtype), None) if dtype == torch.bfloat16 else quantize_per_channel(w, dtype)
    for config in kernels.GEMV_CONFIGS:
        first = kernels.gemv(x, q, swiglu=True, scale=scale, config=config)
        differ = sum(not torch.equal(kernels.gemv(x, q, swiglu=True, scale=scale, config=config), first)
                     for _ in range(30))
        assert differ == 0, (config, differ)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.int8, FP8])
def test_gpu_dependent_gemv_chain_equals_plain_launches(dtype):
    """Layers' o, gate/up and down GEMVs, each reading what the one before wrote (h * gain and its sum
    of squares, the residual; after down a norm in a launch of its own that lets the next GEMV launch
    at its start),
    launched as programmatic dependents (PDL: the next may start before this one ends) and plainly,
    eagerly and replayed in a CUDA graph, fresh inputs each round: the same bits. A dependent that
    read before its wait would see the previous round's values."""
    from minillama import kernels

    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("programmatic dependent launch needs Hopper or later")
    g = torch.Generator(device="cuda").manual_seed(11)
    D, F, layers = 4096, 14336, 3

    def weight(n, k):
        w = torch.randn(n, k, device="cuda", generator=g) / k ** 0.5
        return (w.to(dtype), None) if dtype == torch.bfloat16 else quantize_per_channel(w, dtype)

    (wo, so), (wgu, sgu), (wd, sd) = weight(D, D), weight(2 * F, D), weight(D, F)
    gain = (1 + 0.2 * torch.randn(D, device="cuda", generator=g)).to(torch.bfloat16)
    x = torch.empty(D, device="cuda", dtype=torch.bfloat16)
    h = torch.empty(D, device="cuda", dtype=torch.bfloat16)

    def chain(dependent):
        normed, res = x, h
        for _ in range(layers):
            res, gained, sumsq = kernels.gemv(normed, wo, scale=so, norm_next=(res, gain), dependent=dependent)
            act = kernels.gemv(gained, wgu, scale=sgu, swiglu=True, norm=(sumsq, 1e-5), dependent=dependent)
            out = kernels.gemv(act, wd, scale=sd, dependent=dependent)
            normed, res = kernels.add_rms_norm(out, res, gain, 1e-5, launch_dependents=dependent)
        return normed, res

    graphs, outputs = {}, {}
    for dependent in (False, True):
        chain(dependent)  # compiles outside the capture
        graphs[dependent] = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graphs[dependent]):
            outputs[dependent] = chain(dependent)
    for _ in range(3):
        x.copy_(torch.randn(D, device="cuda", generator=g))
        h.copy_(4 * torch.randn(D, device="cuda", generator=g))
        want = chain(False)
        assert all(torch.equal(a, b) for a, b in zip(chain(True), want))
        for dependent in (False, True):
            graphs[dependent].replay()
            assert all(torch.equal(a, b) for a, b in zip(outputs[dependent], want)), dependent


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, FP8])
def test_gpu_dependent_attention_reduce_equals_plain_launches(dtype, monkeypatch):
    """Batch-1 decode layers of Llama-3.1-8B's shapes (qkv GEMV, flashcore's split attention over
    512 cached keys, o GEMV reading its output): with the attention reduce and the GEMVs launched
    as programmatic dependents and with every launch plain, eagerly and replayed in CUDA graphs,
    fresh inputs each round: the same outputs and the same appended cache entries, bit for bit."""
    import flashcore
    from flashcore import triton_attention
    from minillama import kernels

    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("programmatic dependent launch needs Hopper or later")
    g = torch.Generator(device="cuda").manual_seed(12)
    D, H_q, H_kv, hd, fill, layers = 4096, 32, 8, 128, 512, 3

    def weight(n, k):
        w = torch.randn(n, k, device="cuda", generator=g) / k ** 0.5
        return (w.to(dtype), None) if dtype == torch.bfloat16 else quantize_per_channel(w, dtype)

    (wqkv, sqkv), (wo, so) = weight((H_q + 2 * H_kv) * hd, D), weight(D, D)
    gain = (1 + 0.2 * torch.randn(D, device="cuda", generator=g)).to(torch.bfloat16)
    x = torch.empty(D, device="cuda", dtype=torch.bfloat16)
    h = torch.empty(D, device="cuda", dtype=torch.bfloat16)
    lens = torch.full((1,), fill, dtype=torch.int32, device="cuda")
    caches = {True: [torch.randn(1, 1024, H_kv, hd, device="cuda", generator=g).to(torch.bfloat16)
                     for _ in range(2 * layers)]}
    caches[False] = [c.clone() for c in caches[True]]

    def layers_of(dependent):
        normed, res, norm = x, h, None
        for layer in range(layers):
            qkv = kernels.gemv(normed, wqkv, scale=sqkv, norm=norm, dependent=dependent).view(1, 1, H_q + 2 * H_kv, hd)
            q, k, v = qkv.split([H_q, H_kv, H_kv], dim=2)
            k_cache, v_cache = caches[dependent][2 * layer:2 * layer + 2]
            attn = flashcore.attention_with_kv_cache(q, k, v, k_cache, v_cache, lens)
            res, normed, sumsq = kernels.gemv(attn.view(D), wo, scale=so, norm_next=(res, gain), dependent=dependent)
            norm = (sumsq, 1e-5)
        return normed, res, sumsq

    graphs, outputs, plans = {}, {}, {}
    for dependent in (True, False):  # each variant's flashcore plans, made with its launches
        monkeypatch.setattr(triton_attention, "_dependent_launch", lambda device, dependent=dependent: dependent)
        triton_attention._PLANS.clear()
        layers_of(dependent)  # compiles outside the capture
        graphs[dependent] = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graphs[dependent]):
            outputs[dependent] = layers_of(dependent)
        plans[dependent] = dict(triton_attention._PLANS)
        assert any(not plan.direct for plan in plans[dependent].values()
                   if isinstance(plan, triton_attention._DecodePlan))  # the reduce runs
    for _ in range(3):
        x.copy_(torch.randn(D, device="cuda", generator=g))
        h.copy_(4 * torch.randn(D, device="cuda", generator=g))
        results = {}
        for dependent in (False, True):
            triton_attention._PLANS.clear()
            triton_attention._PLANS.update(plans[dependent])
            results[dependent] = layers_of(dependent)
        assert all(torch.equal(a, b) for a, b in zip(results[True], results[False]))
        for dependent in (False, True):
            graphs[dependent].replay()
            assert all(torch.equal(a, b) for a, b in zip(outputs[dependent], results[False])), dependent
        assert all(torch.equal(a, b) for a, b in zip(caches[True], caches[False]))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.int8, FP8])
def test_gpu_gemv_next_norm_llama_shapes(dtype):
    """``norm_next`` on Llama-3.1-8B's o and down, every GEMV tiling, fresh inputs: the residual sum
    bit for bit as ``add_rms_norm`` gives it, h * gain rounded, the sums of squares of its pieces,
    the same bits over 20 calls. The next product with ``norm`` (gate/up after o,
    qkv with RoPE after down) in every GEMV tiling, the tensor-core GEMV's too for 8-bit weights:
    the float32 math of the norm and the product within bfloat16's error, no further from it than
    the product after the norm's kernel (one rounding of h * gain against two of the norm's)."""
    from minillama import kernels
    from minillama.backend import rotate_half_rope

    g = torch.Generator(device="cuda").manual_seed(3)
    N, F, D, eps = 4096, 14336, 128, 1e-5
    gain = (1 + 0.2 * torch.randn(N, device="cuda", generator=g)).to(torch.bfloat16)
    cos, sin = rope_inputs(g, D, "cuda", torch.bfloat16)

    def weight(n, k):
        w = torch.randn(n, k, device="cuda", generator=g) / k ** 0.5
        return (w.to(dtype), None) if dtype == torch.bfloat16 else quantize_per_channel(w, dtype)

    for K, next_n, kw in ((4096, 2 * F, {"swiglu": True}), (F, 6144, {"rope": (cos, sin, 40, D)})):
        q, scale = weight(N, K)
        for config in kernels.GEMV_CONFIGS:
            x = torch.randn(K, device="cuda", generator=g, dtype=torch.bfloat16)
            residual = 4 * torch.randn(N, device="cuda", generator=g, dtype=torch.bfloat16)
            _, want_h = kernels.add_rms_norm(kernels.gemv(x, q, scale=scale, config=config)[None], residual[None],
                                             gain, eps)
            first = kernels.gemv(x, q, scale=scale, config=config, norm_next=(residual, gain))
            h, gained, sumsq = first
            assert torch.equal(h, want_h[0]), (K, config)
            assert torch.equal(gained, (h.float() * gain.float()).to(torch.bfloat16)), (K, config)
            assert torch.allclose(sumsq.sum(), h.float().pow(2).sum(), rtol=1e-5), (K, config)
            for _ in range(20):
                again = kernels.gemv(x, q, scale=scale, config=config, norm_next=(residual, gain))
                assert all(torch.equal(a, b) for a, b in zip(again, first)), (K, config)
        q2, scale2 = weight(next_n, N)
        normed = kernels.add_rms_norm(h[None], None, gain, eps)[0][0]
        normed32 = gain.float() * h.float() * torch.rsqrt(h.float().pow(2).mean() + eps)
        y = (q2.float() if scale2 is None else q2.float() * scale2[:, None]) @ normed32
        if "swiglu" in kw:
            gate, up = y.chunk(2)
            y = torch.nn.functional.silu(gate) * up
        else:
            heads = y[: 40 * D].view(1, 40, D)
            heads.copy_(rotate_half_rope(heads, cos.float()[:, None], sin.float()[:, None]))
        err = lambda a: ((a.float() - y).norm() / y.norm()).item()
        tilings = list(kernels.GEMV_CONFIGS)
        if scale2 is not None:
            from minillama import tensor_core_gemv

            tilings += [t for t in kernels.TENSOR_CORE_GEMV_TILINGS
                        if tensor_core_gemv.usable(x, q2) and tensor_core_gemv.fits(t, next_n, N, D)]
        for config in tilings:
            got = kernels.gemv(gained, q2, scale=scale2, norm=(sumsq, eps), config=config, **kw)
            apart = kernels.gemv(normed, q2, scale=scale2, config=config, **kw)  # after the norm's kernel
            assert err(got) < 1e-2 and err(got) < 1.25 * err(apart) + 1e-3, (K, config, err(got), err(apart))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.int8, FP8])
@pytest.mark.parametrize("M", [2, 16, 40, 64])
def test_gpu_matmul_norm_between_products_llama_shapes(dtype, M):
    """The residual add + RMSNorm between Llama-3.1-8B's products at batched-decode rows, in the
    tilings ``matmul_config`` picks: o and down (``norm_next``) give h bit for bit as
    ``add_rms_norm``, and h * gain rounded, the same bits over 10 calls; gate/up (SiLU x up) and qkv
    (RoPE) with ``norm`` give the same bits over 10 calls and the float32 math of the norm and the
    product within bfloat16's error, no further from it than the products after the norm's kernel
    (one rounding of h * gain against two of the norm's), fresh inputs."""
    from minillama import kernels
    from minillama.backend import rotate_half_rope, runs_model_dtype_matmul

    g = torch.Generator(device="cuda").manual_seed(M)
    H, F, D, eps = 4096, 14336, 128, 1e-5
    gain = (1 + 0.2 * torch.randn(H, device="cuda", generator=g)).to(torch.bfloat16)
    positions = torch.arange(M, device="cuda") + 500
    cos, sin = kernels.rope_cos_sin(positions, 1.0 / 500000 ** (torch.arange(0, D, 2, device="cuda") / D),
                                    torch.bfloat16)

    def weight(n, k):
        w = torch.randn(n, k, device="cuda", generator=g) / k ** 0.5
        return (w.to(dtype), None) if dtype == torch.bfloat16 else quantize_per_channel(w, dtype)

    for (K, next_n, kw) in ((4096, 2 * F, {"swiglu": True}), (F, 6144, {"rope": (cos, sin, 40, D)})):
        (q, scale), (q2, scale2) = weight(H, K), weight(next_n, H)
        bf16 = dtype == torch.bfloat16
        if bf16 and not runs_model_dtype_matmul(M, H, K, False):
            continue  # this product runs cuBLAS: no fused norm
        x = torch.randn(M, K, device="cuda", generator=g).to(torch.bfloat16)
        residual = 4 * torch.randn(M, H, device="cuda", generator=g).to(torch.bfloat16)
        normed, want_h = kernels.add_rms_norm(kernels.matmul(x, q, scale), residual, gain, eps)
        h, gained, sumsq = kernels.matmul(x, q, scale, norm_next=(residual, gain))
        assert torch.equal(h, want_h), (K, M)
        assert torch.equal(gained, (h.float() * gain.float()).to(torch.bfloat16)), (K, M)
        assert torch.allclose(sumsq.sum(0), h.float().pow(2).sum(1), rtol=1e-5)
        for _ in range(10):
            again = kernels.matmul(x, q, scale, norm_next=(residual, gain))
            assert all(torch.equal(a, b) for a, b in zip(again, (h, gained, sumsq)))
        assert not kernels._split_arrivals(x.device, 1).any()
        if bf16 and not runs_model_dtype_matmul(M, next_n, H, "swiglu" in kw):
            continue  # the next product runs cuBLAS, after the norm's kernel
        got = kernels.matmul(gained, q2, scale2, norm=(sumsq, eps), **kw).float()
        for _ in range(10):  # the same bits every call
            assert torch.equal(kernels.matmul(gained, q2, scale2, norm=(sumsq, eps), **kw).float(), got), (K, M)
        apart = kernels.matmul(normed, q2, scale2, **kw).float()  # after the norm's kernel
        # the float32 math of the norm and the product
        normed32 = gain.float() * h.float() * torch.rsqrt(h.float().pow(2).mean(1, keepdim=True) + eps)
        y = normed32 @ (q2.float() if scale2 is None else q2.float() * scale2[:, None]).T
        if "swiglu" in kw:
            gate, up = y.chunk(2, dim=1)
            y = torch.nn.functional.silu(gate) * up
        else:
            heads = y[:, : 40 * D].view(M, 40, D)
            heads.copy_(rotate_half_rope(heads, cos.float()[:, None], sin.float()[:, None]))
        err = lambda a: ((a - y).norm() / y.norm()).item()
        assert err(got) < 1e-2 and err(got) < 1.25 * err(apart) + 1e-3, (K, M, err(got), err(apart))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.int8, FP8])
def test_gpu_gemv_converts_every_8bit_value_exactly(dtype):
    """Row n of the weight holds byte n (e4m3's two NaN bytes left out) in every column: with x = 1
    the GEMV sums K equal products, exact in float32, so each output is K * value * scale, rounded
    once to bfloat16, whatever the conversion (int8 through the PRMT path)."""
    from minillama import kernels

    b = torch.arange(256, dtype=torch.int32, device="cuda").to(torch.uint8)
    if dtype == FP8:
        b = b[(b != 0x7F) & (b != 0xFF)]
    K = 1024
    q = b[:, None].expand(-1, K).contiguous().view(dtype)
    scale = torch.rand(q.shape[0], device="cuda") + 0.5
    x = torch.ones(K, device="cuda", dtype=torch.bfloat16)
    expected = (q.float() * scale[:, None]).sum(1).to(torch.bfloat16)
    for config in kernels.GEMV_CONFIGS:
        assert torch.equal(kernels.gemv(x, q, scale=scale, config=config), expected), config


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.int8, FP8])
@pytest.mark.parametrize("M", [16, 32, 64, 128, 512])
def test_gpu_matmul_converts_every_8bit_value_exactly(dtype, M):
    """As the GEMV check above, for the multi-row products at every row count's kernel (the Triton
    kernel in both operand orders, the Gluon kernel; int8 by pairs in PTX where the weight tile is a
    register operand): weight row n holds byte n % 256 (e4m3's NaN bytes as zero) in every column,
    x holds ones and a few rows of zeros, so each output is K * value (exact in float32) * scale,
    rounded once to bfloat16. N = K = 4096 (the 8B's o), and gate/up's shape, with SiLU x up at <= 64
    rows: there the gate rows hold byte 0x64 (100, or 48 in e4m3), whose large products make
    silu(gate) = gate exactly, and the up rows every byte."""
    from minillama import kernels

    b = torch.arange(256, dtype=torch.int32, device="cuda").to(torch.uint8)
    if dtype == FP8:
        b = torch.where((b == 0x7F) | (b == 0xFF), 0, b)
    for N, K, swiglu in ((4096, 4096, False), (28672, 4096, M <= kernels.fused_epilogue_rows(True))):
        q = b.repeat(N // 256)
        if swiglu:
            q[: N // 2] = 0x64
        q = q[:, None].expand(-1, K).contiguous().view(dtype)
        scale = torch.rand(N, device="cuda") + 0.5
        x = torch.ones(M, K, device="cuda", dtype=torch.bfloat16)
        x[1::7] = 0
        exact = (K * q.float()[:, 0] * scale).to(torch.bfloat16).float()
        expected = x[:, :1].float() * exact
        if swiglu:
            gate, up = expected.chunk(2, dim=1)
            expected = (gate * up).to(torch.bfloat16).float()
        got = kernels.matmul(x, q, scale, swiglu=swiglu)
        assert torch.equal(got.float(), expected), (N, M, swiglu, (got.float() - expected).abs().max().item())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.int8, FP8])
def test_gpu_dequantize_kernel_equals_the_torch_dequantize(dtype):
    """bfloat16 (which Triton's interpreter gets wrong), every byte value (e4m3's two NaN bytes left
    out), a Llama matrix shape."""
    from minillama import kernels

    g = torch.Generator(device="cuda").manual_seed(5)
    q, scale = quantize_per_channel(torch.randn(4096, 14336, device="cuda", generator=g) / 64, dtype)
    b = torch.arange(256, dtype=torch.int32, device="cuda").to(torch.uint8)
    if dtype == FP8:
        b = b[(b != 0x7F) & (b != 0xFF)]
    q[: len(b), 0] = b.view(dtype)
    for out_dtype in (torch.bfloat16, torch.float16, torch.float32):
        assert torch.equal(kernels.dequantize(q, scale, out_dtype), dequantize(q, scale, out_dtype)), out_dtype


# (M, N, K) of the multi-row GPU check: between them, every tiling that ``matmul_config`` and
# ``hopper_matmul.tiling`` pick for Llama-3.1-8B / 70B matrices (and their TP=2 shares) at 2-512 rows,
# each where M is a multiple of 16 and where it is not
# (some tilings compile to wrong products: test_every_matmul_tiling_picked_is_one_the_gpu_test_runs keeps
# this list complete)
MULTIROW_CASES = [(16, 6144, 4096), (16, 28672, 4096), (16, 4096, 14336), (5, 28672, 4096), (64, 6144, 4096),
                  (64, 4096, 14336), (64, 28672, 4096), (40, 6144, 4096), (40, 28672, 4096), (512, 6144, 4096),
                  (512, 4096, 14336), (512, 28672, 4096), (512, 4096, 4096), (200, 28672, 4096),
                  (300, 4096, 14336), (77, 6144, 4096), (100, 4096, 4096), (130, 4096, 14336),
                  (384, 4096, 4096), (128, 4096, 14336), (256, 4096, 14336), (128, 4096, 4096),
                  (256, 4096, 4096), (128, 6144, 4096), (300, 6144, 4096), (100, 28672, 4096), (300, 3072, 4096),
                  (24, 28672, 4096), (24, 4096, 14336), (24, 6144, 4096), (24, 4096, 4096), (64, 4096, 4096),
                  # each tiling with M a multiple of 16 and not (compiled apart)
                  (32, 4096, 2048), (2, 4096, 2048), (2, 4096, 14336), (129, 4096, 2048), (272, 4096, 2048),
                  (32, 3072, 4096), (33, 3072, 4096), (272, 3072, 4096), (32, 5120, 8192), (32, 28672, 4096),
                  (80, 28672, 4096), (272, 5120, 8192)]
MULTIROW_GPU_CASES = [(dtype, M, N, K) for M, N, K in MULTIROW_CASES
                      for dtype in (torch.int8, FP8) + ((torch.bfloat16,) if M <= MODEL_DTYPE_LARGE_ROWS else ())]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,M,N,K", MULTIROW_GPU_CASES)
def test_gpu_multirow_paths_agree(dtype, M, N, K):
    """The matmul's tiling for (M, N, K) against float32 math on the (dequantized) weight, in every
    element and over 40 calls with fresh inputs: a race in compiled code (Triton 3.6 had one in fp8's
    split tiles with 8 warps) gives a wrong part of a tile in a few calls in a hundred, far under a
    norm-relative bound (split-K tiles are summed by the split that arrives last, found by an atomic
    counter: a memory-ordering fault would show here too). Then 10 calls with SiLU x up fused and 10
    with RoPE fused (compiled kernels of their own; 8-bit qkv's K split too), against silu(gate) * up and the rotation (heads of
    128, the last sixth not rotated, as v in Llama-3.1-8B's qkv) of the float32 product. The W8A8 path
    (fp8) is checked once, to its activation rounding."""
    from minillama import kernels
    from minillama.backend import rotate_half_rope, scaled_mm_w8a8

    g = torch.Generator(device="cuda")
    seed = g.seed()  # fresh inputs each run; the seed is in the failure message
    if dtype == torch.bfloat16:
        q, scale = (torch.randn(N, K, device="cuda", generator=g) / 64).to(dtype), None
        w = q.float()
    else:
        q, scale = quantize_per_channel(torch.randn(N, K, device="cuda", generator=g) / 64, dtype)
        w = dequantize(q, scale, torch.float32)
    D, rotated_heads = 128, (N // 128) * 5 // 6
    for call in range(60):
        swiglu, rope = 40 <= call < 50, call >= 50
        x = torch.randn(M, K, device="cuda", generator=g, dtype=torch.bfloat16)
        expected = x.float() @ w.T
        cos_sin = None
        if swiglu:
            gate, up = expected.chunk(2, dim=1)
            expected = torch.nn.functional.silu(gate) * up
        if rope:
            angles = torch.rand(M, D // 2, device="cuda", generator=g) * 100
            cos_sin = [torch.cat([t, t], 1).to(torch.bfloat16) for t in (angles.cos(), angles.sin())]
            heads = expected[:, : rotated_heads * D].view(M, rotated_heads, D)
            expected[:, : rotated_heads * D] = rotate_half_rope(heads, *(t.float()[:, None] for t in cos_sin)).flatten(1)
        got = kernels.matmul(x, q, scale, swiglu=swiglu, rope=None if cos_sin is None else (*cos_sin, rotated_heads, D))
        err = (got.float() - expected).abs().max() / expected.abs().max()
        bound = 1.6e-2 if swiglu or rope else 8e-3  # bfloat16 roundings: ~2e-3 each
        assert err.item() < bound, (seed, call, err.item())
    assert not kernels._split_arrivals(x.device, 1).any()  # a split-K product zeroes its arrival counters
    if dtype == FP8:
        expected = x.float() @ w.T
        got = scaled_mm_w8a8(x, q, scale).float()
        assert ((got - expected).norm() / expected.norm()).item() < 6e-2


@pytest.mark.gpu
def test_gpu_hopper_prefill_chunks_run_the_gluon_kernel(monkeypatch):
    """On a Hopper GPU a 512-row 8-bit matmul runs ``minillama.hopper_matmul``'s Gluon kernel (so the
    multi-row check above covers it)."""
    from minillama import hopper_matmul, kernels

    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the Gluon kernel is for Hopper (sm_90)")
    assert hopper_matmul.AVAILABLE, hopper_matmul.UNAVAILABLE_REASON
    calls = []
    gluon_matmul = hopper_matmul.matmul_8bit
    monkeypatch.setattr(hopper_matmul, "matmul_8bit",
                        lambda *args, **kw: calls.append(args[3]) or gluon_matmul(*args, **kw))
    for dtype in (torch.int8, FP8):
        q, scale = quantize_per_channel(torch.randn(6144, 4096, device="cuda") / 64, dtype)
        x = torch.randn(512, 4096, device="cuda", dtype=torch.bfloat16)
        assert torch.equal(kernels.matmul(x, q, scale), gluon_matmul(x, q, scale, calls[-1]))
    assert calls == [hopper_matmul.tiling(512, 6144, 4096)] * 2


def _tiling(M, N, K, dtype, epilogue):
    """The compiled kernel that ``kernels.matmul`` runs on the H200 for (M, N, K) with epilogue None,
    "swiglu" or "rope" (heads of 128): its tiling and constexprs, and whether M is a multiple of 16
    (the JIT compiles each integer argument's two cases apart: a fault of the int8 pairs in one
    tiling showed only where it was not, 2026-12-03)."""
    from minillama import hopper_matmul, kernels

    if M > kernels.fused_epilogue_rows(epilogue == "swiglu"):  # silu_mul or rope_ after the plain product
        epilogue = None
    if dtype != torch.bfloat16 and epilogue != "rope":
        hopper = hopper_matmul.tiling(M, N, K, epilogue == "swiglu")
        if hopper is not None:
            return "gluon", hopper, dtype, M % 16 == 0
    config = kernels.matmul_config(M, N, K, dtype, epilogue == "swiglu", epilogue == "rope")
    return config, dtype, K % config[2] == 0, epilogue, M % 16 == 0  # EVEN_K is a constexpr too


def test_every_matmul_tiling_picked_is_one_the_gpu_test_runs():
    """Each (tiling, weight dtype, EVEN_K, fused epilogue, M a multiple of 16) that the matmul picks for
    Llama-3.1's matrices, 8B and 70B, whole or split over 2 ranks: 8-bit at 2-512 rows, bfloat16 at the
    rows the backend runs it (``runs_model_dtype_matmul``; SiLU x up fused in gate/up's, RoPE in qkv's),
    compiles a kernel that test_gpu_multirow_paths_agree checks on the GPU."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    from llama31_shapes import LLAMA31_8B, LLAMA31_70B

    tested = {_tiling(M, N, K, dtype, epilogue) for dtype, M, N, K in MULTIROW_GPU_CASES
              for epilogue in (None, "swiglu", "rope")}
    shapes = []
    for c in (LLAMA31_8B, LLAMA31_70B):
        hidden, ffn = c["hidden_size"], c["intermediate_size"]
        qkv = (c["num_attention_heads"] + 2 * c["num_key_value_heads"]) * c["head_dim"]
        for tp in (1, 2):  # column-parallel qkv and gate/up split N, row-parallel o and down split K
            shapes += [(qkv // tp, hidden, "rope"), (hidden, hidden // tp, None), (2 * ffn // tp, hidden, "swiglu"),
                       (hidden, ffn // tp, None)]
    untested = {(M, N, K, str(dtype), epilogue) for N, K, epilogue in shapes
                for dtype in (torch.int8, FP8, torch.bfloat16)
                for M in range(2, 513)
                if (dtype != torch.bfloat16 or runs_model_dtype_matmul(M, N, K, epilogue == "swiglu"))
                and _tiling(M, N, K, dtype, epilogue) not in tested}
    assert not untested, sorted(untested)[:5]


def test_quantize_model_in_memory_equals_quantize_at_load(full):
    from minillama.quantization import quantize_model

    at_load = Llama.from_pretrained(full, device="cpu", quantize="fp8")
    llm = Llama.from_pretrained(full, device="cpu")
    quantize_model(llm.model, "fp8")
    assert set(llm.model.state_dict()) == set(at_load.model.state_dict())
    for name, t in at_load.model.state_dict().items():
        assert torch.equal(t.view(torch.int8) if t.dtype == FP8 else t,
                           llm.model.state_dict()[name].view(torch.int8) if t.dtype == FP8
                           else llm.model.state_dict()[name]), name
    assert torch.equal(llm.logits(IDS), at_load.logits(IDS))


# -- the command lines --

ROOT = Path(__file__).resolve().parent.parent


def load_script(name):
    spec = importlib.util.spec_from_file_location(f"{name}_script", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(*args, stdin=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *map(str, args)], input=stdin, capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=120)


def test_generate_and_chat_take_quantize(full):
    llm = Llama.from_pretrained(full, device="cpu", quantize="fp8")
    (out,) = llm.generate(["hello world"], max_new_tokens=5)
    proc = run(ROOT / "scripts" / "generate.py", "--model", full, "--device", "cpu", "--max-new-tokens", 5,
               "--quantize", "fp8", "hello world")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "hello world" + out.text + "\n"
    llm = Llama.from_pretrained(full, device="cpu", quantize="int8")
    (out,) = llm.generate(["Once upon a time"], max_new_tokens=4)
    proc = run("-m", "minillama.chat", "--model", full, "--device", "cpu", "--max-new-tokens", 4,
               "--quantize", "int8", stdin="Once upon a time\n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == out.text + "\n"  # a base model: plain continuation, as generate
    proc = run(ROOT / "scripts" / "generate.py", "--model", full, "--quantize", "int4", "hi")
    assert proc.returncode == 2 and "invalid choice: 'int4'" in proc.stderr
    llm = Llama.from_pretrained(full, device="cpu", quantize="int8", quantize_lm_head=True)
    (out,) = llm.generate(["hello world"], max_new_tokens=5)
    proc = run(ROOT / "scripts" / "generate.py", "--model", full, "--device", "cpu", "--max-new-tokens", 5,
               "--quantize", "int8", "--quantize-lm-head", "hello world")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "hello world" + out.text + "\n"
    for command in ((ROOT / "scripts" / "generate.py", "hi"), ("-m", "minillama.chat"), ("-m", "minillama.serve")):
        proc = run(*command, "--model", full, "--quantize-lm-head")
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
        assert "--quantize-lm-head quantizes lm_head along with the projections: add --quantize int8 or fp8" \
            in proc.stderr


def test_perplexity_script_rows(full, tmp_path, capsys):
    script = load_script("perplexity")
    text = tmp_path / "text.txt"
    text.write_text("hello world, this is a story.\n\nAnother one about a cat and a dog.\n")
    assert script.main(["--model", str(full), "--text", str(text), "--device", "cpu",
                        "--quantize", "none", "int8", "--json", str(tmp_path / "ppl.json")]) == 0
    rows = json.loads((tmp_path / "ppl.json").read_text())["rows"]
    assert [r["quantize"] for r in rows] == ["none", "int8"]
    llm = Llama.from_pretrained(full, device="cpu", quantize="int8")
    expected = script.perplexity(llm, script.documents(text.read_text()))
    assert rows[1]["ppl"] == pytest.approx(expected["ppl"], rel=1e-12) and rows[1]["tokens"] == expected["tokens"]
    assert rows[1]["delta_pct"] == pytest.approx(100 * (rows[1]["ppl"] / rows[0]["ppl"] - 1))
    assert "int8" in capsys.readouterr().out


@pytest.mark.triton
@interpreted
def test_bench_quant_smoke(tmp_path):
    """scripts/bench_quant.py runs end to end (tiny model, Triton interpreter): the lead runs it on the GPU."""
    script = load_script("bench_quant")
    out = tmp_path / "b.json"
    assert script.main(["--device", "cpu", "--tiny", "--formats", "int8", "--matmul-8bit", "triton",
                        "--steps", "1", "--reps", "1", "--prompt-lens", "8", "--cache-len", "8", "--batches", "2",
                        "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["format"], r["matmul_8bit"]) for r in rows] == [("int8", "triton")]
    assert rows[0]["decode_b2_tok_s"] > 0 and rows[0]["decode_b2_loop_tok_s"] > 0 and rows[0]["ttft_8_ms"] > 0


def test_nan_in_8bit_weights_or_scales_is_named(tmp_path):
    from minillama.errors import NonFiniteLogitsError

    folder = make_ct(tmp_path, kind="float", dtype="bfloat16")
    edit_tensors(folder, lambda t: t["model.layers.1.mlp.down_proj.weight_scale"].__setitem__((3, 0), float("nan")))
    with pytest.raises(NonFiniteLogitsError, match=r"layers\.1\.feed_forward\.w2\.weight_scale \(1 of 32 values\)"):
        Llama.from_pretrained(folder, device="cpu").generate(["hello"], max_new_tokens=2)
    folder = make_ct(tmp_path / "b", kind="float", dtype="bfloat16")
    edit_tensors(folder, lambda t: t["model.layers.0.mlp.up_proj.weight"].view(torch.uint8).__setitem__((2, 5), 0x7F))
    with pytest.raises(NonFiniteLogitsError, match=r"model\.layers\.0\.mlp\.up_proj\.weight \(1 of 2048 values\)"):
        Llama.from_pretrained(folder, device="cpu").generate(["hello"], max_new_tokens=2)


@pytest.mark.parametrize("preset", ["FP8_DYNAMIC", "FP8", "W8A8"])
def test_checkpoint_written_by_the_compressed_tensors_library(full, tmp_path, preset):
    """Optional (skipped unless compressed-tensors and transformers are installed): the library itself
    quantizes a model as llm-compressor does (apply the scheme, min-max weight scales, compress,
    save_pretrained); minillama loads the result and gives the logits of its dequantized weights."""
    pytest.importorskip("compressed_tensors")
    transformers = pytest.importorskip("transformers")
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config

    def args(kind, strategy, dynamic):
        return {"num_bits": 8, "type": kind, "symmetric": True, "dynamic": dynamic, "strategy": strategy}

    scheme = {"FP8_DYNAMIC": {"weights": args("float", "channel", False), "input_activations": args("float", "token", True)},
              "FP8": {"weights": args("float", "tensor", False), "input_activations": args("float", "tensor", False)},
              "W8A8": {"weights": args("int", "channel", False), "input_activations": args("int", "token", True)}}[preset]
    model = transformers.LlamaForCausalLM.from_pretrained(full, dtype=torch.bfloat16)
    apply_quantization_config(model, QuantizationConfig.model_validate(
        {"config_groups": {"group_0": {"targets": ["Linear"], **scheme}}, "ignore": ["lm_head"]}))
    for module in model.modules():  # what the min-max observer computes
        if hasattr(module, "weight_scale"):
            w = module.weight.float().abs()
            amax = w.amax(dim=1, keepdim=True) if module.weight_scale.dim() == 2 else w.amax().reshape(1)
            module.weight_scale.data.copy_(amax / (448.0 if "FP8" in preset else 127.5))
        if hasattr(module, "input_scale"):
            module.input_scale.data.fill_(0.05)
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    out = tmp_path / "ct"
    model.save_pretrained(out)
    compressor.update_config(out)
    for f in full.iterdir():
        if not f.name.endswith(".safetensors") and f.name != "config.json":
            (out / f.name).write_bytes(f.read_bytes())
    llm = Llama.from_pretrained(out, device="cpu", dtype="float32")
    assert llm.model.layers[0].attention.wqkv.weight.dtype == (torch.int8 if preset == "W8A8" else FP8)
    config = load_config(full)  # the same model; the library's config.json spells RoPE as rope_parameters
    expected = ref.forward(config, dequantized_state_dict(out), IDS)
    assert ref.max_relative_error(llm.logits(IDS), expected) < 1e-4


@pytest.mark.slow
def test_quantizing_at_load_never_holds_the_full_precision_model(tmp_path):
    """scripts/bench_load.py in a fresh process: loading a bf16 checkpoint with quantize="int8" to the
    CPU raises peak host memory by the 8-bit model plus about one shard, less than the bf16 model."""
    proc = run(ROOT / "scripts" / "bench_load.py", "--gb", "0.6", "--shards", "8", "--hidden", "1024",
               "--dir", tmp_path, "--quantize", "int8")
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["loaded_model_bytes"] < 0.8 * r["model_bytes"]  # int8 projections, bf16 embedding and head
    # + one shard, the tensor read from it, one row block's float32 temporaries, and allocator slack
    assert r["load_peak_increase"] <= r["loaded_model_bytes"] + r["largest_shard_bytes"] + 96 * 2**20, r
    assert r["load_peak_increase"] < r["model_bytes"], r  # loading it in bf16 takes the model + one shard


# -- tensor parallelism (2 processes over gloo on the CPU) --


def _tp_rank(rank, world, port, folder, quantize, out_dir):
    from minillama.parallel import leave

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    llm = Llama.from_pretrained(folder, device="cpu", quantize=quantize)
    layer = llm.model.layers[0]
    torch.save({"logits": llm.logits(IDS), "greedy": llm.generate([IDS[:5]], max_new_tokens=6)[0].token_ids,
                "wqkv": (layer.attention.wqkv.weight.dtype, tuple(layer.attention.wqkv.weight.shape)),
                "w2": (layer.feed_forward.w2.parallel, tuple(layer.feed_forward.w2.weight.shape),
                       tuple(layer.feed_forward.w2.weight_scale.shape))},
               Path(out_dir) / f"rank{rank}.pt")
    leave()  # every rank done, then the group torn down
    os._exit(0)  # as the CLIs do under torchrun: the interpreter's teardown can abort a gloo worker


@pytest.mark.slow
@pytest.mark.parametrize("source", ["compressed fp8 tensor-static", "compressed int8 channel", "int8 at load"])
def test_tensor_parallel_with_8bit_weights(tmp_path, source):
    """TP=2 holds each rank's share of the 8-bit weights and scales and computes what TP=1 does:
    the same numbers for a compressed checkpoint; quantized at load, a row-parallel rank scales its
    own half of each row, so the logits differ by quantization noise only."""
    import socket

    import torch.multiprocessing as mp

    kind = {"compressed fp8 tensor-static": "float", "compressed int8 channel": "int"}.get(source)
    if kind is None:
        folder, quantize = tmp_path / "full", "int8"
        write_checkpoint(folder, **SMALL)
    else:
        strategy, activations = ("tensor", "static") if kind == "float" else ("channel", "dynamic")
        folder, quantize = make_ct(tmp_path, kind=kind, weight_strategy=strategy, activations=activations), None
    single = Llama.from_pretrained(folder, device="cpu", quantize=quantize)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_tp_rank, args=(2, port, str(folder), quantize, str(tmp_path)), nprocs=2, start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    expected = single.logits(IDS)
    w2 = single.model.layers[0].feed_forward.w2
    for r in ranks:
        dtype, shape = r["wqkv"]
        wqkv = single.model.layers[0].attention.wqkv
        assert dtype == wqkv.weight.dtype and shape == (wqkv.out_features // 2, wqkv.in_features)
        assert r["w2"] == ("row", (w2.out_features, w2.in_features // 2), (w2.out_features,))
        err = ((r["logits"] - expected).norm() / expected.norm()).item()
        assert err < (2e-2 if source == "int8 at load" else 1e-5), err
    if source != "int8 at load":
        assert ranks[0]["greedy"] == ranks[1]["greedy"] == single.generate([IDS[:5]], max_new_tokens=6)[0].token_ids
