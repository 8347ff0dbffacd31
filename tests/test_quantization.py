"""8-bit weights: quantization error bounds, compressed-tensors config parsing and tensor specs."""
import copy

import pytest
import torch
from safetensors import safe_open

from minillama.quantization import (
    QuantizationConfig,
    QuantScheme,
    dequantize,
    channel_scales,
    module_schemes,
    parse_quantization_config,
    quantize_per_channel,
)
from tests.checkpoints import write_checkpoint
from tests.compressed_checkpoints import dequantized_state_dict, quantization_config, write_compressed_checkpoint

FP8 = torch.float8_e4m3fn
SMALL = dict(hidden_size=32, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=64, tokenizer="sentencepiece")


def weights(n=48, k=80, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g, dtype=torch.float64) * torch.logspace(-3, 1, n, dtype=torch.float64)[:, None]
    w[3, 7] = 40.0  # an outlier sets its row's scale
    w[5] = 0.0  # an all-zero row
    return w.float()


# -- quantize / dequantize, against float64 --


def test_int8_per_channel_error_at_most_half_a_step():
    w = weights()
    q, scale = quantize_per_channel(w, torch.int8)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32 and scale.shape == (48,)
    w64, s64 = w.double(), scale.double()
    expected = w64.abs().amax(1) / 127
    expected[5] = 1.0  # a zero row gets scale 1
    assert torch.allclose(s64, expected, rtol=1e-6)
    err = (q.double() * s64[:, None] - w64).abs()
    assert (err <= s64[:, None] * (0.5 + 1e-5)).all()
    assert q.abs().max() == 127 and (q[5] == 0).all() and scale[5] == 1.0
    assert q[3, 7] == 127  # the row maximum maps to the end of the range


def test_fp8_per_channel_error_is_e4m3_rounding():
    w = weights()
    q, scale = quantize_per_channel(w, FP8)
    assert q.dtype == FP8 and scale.shape == (48,)
    w64, s64 = w.double(), scale.double()
    err = (q.double() * s64[:, None] - w64).abs()
    # 3 mantissa bits: half an ulp is 2^-4 relative; below 2^-6 (subnormal) half a step is 2^-10
    bound = torch.maximum(w64.abs() * 2.0 ** -4, s64[:, None] * 2.0 ** -10) * (1 + 1e-5)
    assert (err <= bound).all()
    assert q.float().abs().max() == 448 and (q[5].float() == 0).all()
    rel = (err.norm() / w64.norm()).item()
    assert rel < 0.03, rel  # typical e4m3 relative error is ~2-3 %


def test_dequantize_rounds_once_to_the_model_dtype():
    w = weights()
    for dtype in (torch.int8, FP8):
        q, scale = quantize_per_channel(w, dtype)
        for out in (torch.float32, torch.bfloat16):
            d = dequantize(q, scale, out)
            assert d.dtype == out
            assert torch.equal(d, (q.double() * scale.double()[:, None]).to(out))


@pytest.mark.parametrize("dtype", [torch.int8, FP8])
def test_quantize_in_row_blocks_matches_one_block_and_keeps_the_input(dtype):
    """Blocks of a few rows (the loader's bounded temporaries), written into ``out``, give the same
    bits as one block over the whole matrix; the input is left as it was."""
    w = weights(seed=torch.seed() % 2**31)
    kept = w.clone()
    whole_q, whole_scale = quantize_per_channel(w, dtype, block_elements=w.numel())
    out = torch.empty(w.shape, dtype=dtype)
    q, scale = quantize_per_channel(w.to(torch.bfloat16), dtype, out=out, block_elements=5 * w.shape[1])
    assert q is out
    bf16_q, bf16_scale = quantize_per_channel(w.to(torch.bfloat16), dtype, block_elements=w.numel())
    assert torch.equal(q.view(torch.int8), bf16_q.view(torch.int8)) and torch.equal(scale, bf16_scale)
    q, scale = quantize_per_channel(w, dtype, block_elements=7 * w.shape[1] + 3)
    assert torch.equal(q.view(torch.int8), whole_q.view(torch.int8)) and torch.equal(scale, whole_scale)
    assert torch.equal(w, kept)
    with pytest.raises(ValueError, match="out is torch.int8"):
        quantize_per_channel(w, FP8, out=torch.empty(w.shape, dtype=torch.int8))


def test_quantize_rejects_other_dtypes_and_shapes():
    with pytest.raises(ValueError, match="torch.int8 or torch.float8_e4m3fn"):
        quantize_per_channel(torch.ones(2, 2), torch.float16)
    with pytest.raises(ValueError, match="2-D"):
        quantize_per_channel(torch.ones(2), torch.int8)


def test_channel_scales_broadcasts_a_tensor_scale():
    assert torch.equal(channel_scales(torch.tensor([0.5], dtype=torch.bfloat16), 3), torch.full((3,), 0.5))
    assert torch.equal(channel_scales(torch.tensor(0.25), 2), torch.full((2,), 0.25))
    per_channel = torch.tensor([[1.0], [2.0]], dtype=torch.bfloat16)
    assert torch.equal(channel_scales(per_channel, 2), torch.tensor([1.0, 2.0]))


# -- compressed-tensors quantization_config --


@pytest.mark.parametrize("kind,strategy,activations", [
    ("float", "channel", "dynamic"),  # llm-compressor FP8_DYNAMIC (e.g. Meta-Llama-3.1-8B-Instruct-FP8-dynamic)
    ("float", "tensor", "static"),  # llm-compressor FP8 (e.g. Meta-Llama-3.1-8B-Instruct-FP8)
    ("float", "channel", None),  # W8A16 FP8
    ("int", "channel", "dynamic"),  # W8A8 INT8
    ("int", "tensor", "static"),
])
def test_parses_supported_schemes(kind, strategy, activations):
    qc = parse_quantization_config(quantization_config(kind, strategy, activations))
    scheme = qc.scheme_for("model.layers.0.self_attn.q_proj", "Linear")
    assert scheme == QuantScheme(FP8 if kind == "float" else torch.int8, strategy, activations)
    assert qc.scheme_for("lm_head", "Linear") is None  # ignored
    assert qc.compressed


def test_2024_llama31_fp8_config():
    """The quantization_config of the Llama 3.1 8B Instruct FP8 checkpoints published in 2024
    (nm-testing/Meta-Llama-3.1-8B-Instruct-FP8-hf, as the compressed-tensors docs show it): static
    per-tensor FP8, format naive-quantized, status frozen; weights stored in FP8 all the same."""
    fp8 = {"num_bits": 8, "strategy": "tensor", "type": "float"}
    qc = parse_quantization_config({
        "config_groups": {"group_0": {"input_activations": dict(fp8), "targets": ["Linear"], "weights": dict(fp8)}},
        "format": "naive-quantized", "ignore": ["lm_head"], "quant_method": "compressed-tensors",
        "quantization_status": "frozen"})
    assert qc.scheme_for("model.layers.31.mlp.down_proj", "Linear") == QuantScheme(FP8, "tensor", "static")
    assert qc.scheme_for("lm_head", "Linear") is None


def test_at_load_config_round_trips_through_the_checkpoint_format():
    for kind, dtype in (("int8", torch.int8), ("fp8", FP8)):
        qc = QuantizationConfig.at_load(kind)
        assert not qc.compressed
        assert qc.scheme_for("model.layers.3.mlp.down_proj", "Linear") == QuantScheme(dtype, "channel", None)
        again = parse_quantization_config(qc.to_dict())
        assert again.groups == qc.groups and again.ignore == qc.ignore
    with pytest.raises(ValueError, match="quantize='int4' is not supported; use one of"):
        QuantizationConfig.at_load("int4")


@pytest.mark.parametrize("method", ["gptq", "awq", "bitsandbytes", "fp8", None])
def test_other_quant_methods_are_named_in_the_error(method):
    with pytest.raises(NotImplementedError,
                       match=rf"quantization_config \(quant_method {method!r}\) is not supported; minillama reads"):
        parse_quantization_config({"quant_method": method, "bits": 4})


def _edit(path, value, **base):
    cfg = quantization_config(**base)
    target = cfg
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return cfg


GROUP = ("config_groups", "group_0")


@pytest.mark.parametrize("cfg,message", [  # NotImplementedError: a scheme minillama does not run
    (_edit(("format",), "pack-quantized") | {"config_groups": {"group_0": {
        **quantization_config()["config_groups"]["group_0"], "format": "pack-quantized"}}},
     "format 'pack-quantized' .* is not supported"),
    (_edit(GROUP + ("weights", "num_bits"), 4), "num_bits 4 is not supported"),
    (_edit(GROUP + ("weights", "strategy"), "group"), "strategy 'group' is not supported"),
    (_edit(GROUP + ("weights", "strategy"), "block"), "strategy 'block' is not supported"),
    (_edit(GROUP + ("weights", "symmetric"), False), "asymmetric quantization"),
    (_edit(GROUP + ("input_activations", "dynamic"), False), "strategy 'token' with dynamic=False"),
    (_edit(GROUP + ("input_activations", "strategy"), "group"), "strategy 'group' is not supported"),
    (_edit(GROUP + ("output_activations",), {"num_bits": 8}), "output quantization"),
    (_edit(("quantization_status",), "calibration"), "quantization_status 'calibration' is not supported"),
    (_edit(("kv_cache_scheme",), {"num_bits": 8, "type": "float", "strategy": "tensor"}), "kv_cache_scheme"),
    (_edit(("sparsity_config",), {"format": "sparse-24-bitmask"}), "sparsity_config"),
])
def test_unsupported_schemes_are_errors(cfg, message):
    with pytest.raises(NotImplementedError, match=message):
        parse_quantization_config(cfg)


@pytest.mark.parametrize("cfg,message", [  # ValueError: a config that contradicts itself or is malformed
    (_edit(GROUP + ("weights", "type"), "int"), "format 'float-quantized' does not store int weights"),
    (_edit(("config_groups",), {}), "no config_groups"),
    (_edit(("ignore",), ["re:("]), "does not compile"),
    (_edit(GROUP + ("targets",), "Linear"), "targets must be a non-empty list of strings"),
    ("compressed-tensors", "quantization_config must be a JSON object"),
])
def test_malformed_configs_are_errors(cfg, message):
    with pytest.raises(ValueError, match=message):
        parse_quantization_config(cfg)


def test_ignore_and_targets_match_like_compressed_tensors():
    cfg = quantization_config(ignore=["lm_head", "re:.*mlp\\.down_proj$", "model.layers.1.self_attn.o_proj"])
    qc = parse_quantization_config(cfg)
    assert qc.scheme_for("model.layers.0.mlp.down_proj", "Linear") is None
    assert qc.scheme_for("model.layers.1.self_attn.o_proj", "Linear") is None
    assert qc.scheme_for("model.layers.0.self_attn.o_proj", "Linear") is not None
    # "re:" is re.match: anchored at the start, so a bare "mlp" pattern matches nothing
    qc = parse_quantization_config(quantization_config(targets=["re:mlp"]))
    assert qc.scheme_for("model.layers.0.mlp.up_proj", "Linear") is None
    qc = parse_quantization_config(quantization_config(targets=["re:model.layers.0.mlp.(gate|up)_proj"]))
    assert qc.scheme_for("model.layers.0.mlp.up_proj", "Linear") is not None
    assert qc.scheme_for("model.layers.0.mlp.down_proj", "Linear") is None


def test_module_schemes_of_a_whole_model():
    schemes = module_schemes(parse_quantization_config(quantization_config()), 2, tie_word_embeddings=False)
    assert len(schemes) == 2 * 7 + 1 and schemes["lm_head"] is None
    assert all(s is not None for n, s in schemes.items() if n != "lm_head")
    tied = module_schemes(parse_quantization_config(quantization_config()), 2, tie_word_embeddings=True)
    assert "lm_head" not in tied
    with pytest.raises(NotImplementedError, match="lm_head, but it is tied"):
        module_schemes(parse_quantization_config(quantization_config(ignore=[])), 2, tie_word_embeddings=True)
    with pytest.raises(NotImplementedError, match="quantizes model.embed_tokens .Embedding.; minillama quantizes Linear"):
        module_schemes(parse_quantization_config(quantization_config(targets=["Linear", "re:.*embed_tokens"])),
                       2, tie_word_embeddings=False)
    with pytest.raises(NotImplementedError, match="q_proj, .*k_proj, .*v_proj are quantized differently"):
        module_schemes(parse_quantization_config(quantization_config(ignore=["lm_head", "re:.*k_proj"])),
                       2, tie_word_embeddings=False)


# -- checkpoint tensors: the specs match what compressed-tensors writes --


@pytest.mark.parametrize("kind,strategy,activations,dtype", [
    ("float", "channel", "dynamic", "bfloat16"),
    ("float", "tensor", "static", "bfloat16"),
    ("int", "channel", None, "float32"),
])
def test_checkpoint_tensor_specs_match_a_written_checkpoint(tmp_path, kind, strategy, activations, dtype):
    write_checkpoint(tmp_path / "full", dtype=dtype, **SMALL)
    written = write_compressed_checkpoint(tmp_path / "full", tmp_path / "ct", kind, strategy, activations)
    qc = parse_quantization_config(quantization_config(kind, strategy, activations))
    schemes = module_schemes(qc, 2, tie_word_embeddings=False)
    expected = {}
    for module, scheme in schemes.items():
        if scheme is not None:
            shape = tuple(written[f"{module}.weight"].shape)
            expected.update(scheme.checkpoint_tensors(module, *shape))
    quantized_names = {n for n in written if n.removesuffix(".weight").endswith("_proj") or n.endswith("_scale")}
    assert quantized_names == set(expected)
    with safe_open(tmp_path / "ct" / "model.safetensors", framework="pt") as f:
        for name, spec in expected.items():
            t = f.get_tensor(name)
            spec.check(name, tuple(t.shape), t.dtype, "model.safetensors")
    wrong = copy.deepcopy(expected[f"model.layers.0.mlp.up_proj.weight"])
    with pytest.raises(ValueError, match="tensor x in f has dtype bfloat16, expected"):
        wrong.check("x", wrong.shapes[0], torch.bfloat16, "f")
    with pytest.raises(ValueError, match=r"tensor x in f has shape \(1, 2\), expected"):
        wrong.check("x", (1, 2), wrong.dtypes[0], "f")
    # what the checkpoint encodes is close to the full-precision weights
    deq = dequantized_state_dict(tmp_path / "ct")
    full = dequantized_state_dict(tmp_path / "full")
    w = "model.layers.1.mlp.down_proj.weight"
    assert (deq[w] - full[w]).norm() / full[w].norm() < (0.05 if kind == "float" else 0.01)
