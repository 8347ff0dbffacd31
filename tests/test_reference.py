"""Sanity tests of the independent reference (tests/reference_llama.py) itself: fast, no minillama."""
import math

import pytest
import torch

from tests import reference_llama as ref
from tests.checkpoints import llama3_rope_scaling, make_config, random_state_dict

LLAMA31_8B_ROPE = {  # the RoPE part of meta-llama/Llama-3.1-8B's config
    "hidden_size": 4096,
    "num_attention_heads": 32,
    "head_dim": 128,
    "rope_theta": 500000.0,
    "rope_scaling": llama3_rope_scaling(),
}


def small_config(**overrides):
    kwargs = dict(hidden_size=32, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=48, vocab_size=97)
    kwargs.update(overrides)
    return make_config(**kwargs)


def ids(n, vocab=97, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n,), generator=g).tolist()


# -- RoPE frequencies -----------------------------------------------------------------------


def _one_freq_config(wavelen):
    """head_dim 4 and a theta that puts the second frequency at the given wavelength.

    inv_freq = [1, theta^(-1/2)], so wavelength 2*pi*sqrt(theta) = wavelen.
    """
    theta = (wavelen / (2 * math.pi)) ** 2
    return {"hidden_size": 8, "num_attention_heads": 2, "head_dim": 4, "rope_theta": theta,
            "rope_scaling": llama3_rope_scaling()}


@pytest.mark.parametrize(
    "wavelen, scale",
    [
        (1024.0, 1.0),  # shorter than 8192/4 = 2048: high frequency, kept
        (2048.0, 1.0),  # the boundary: smooth factor (8192/2048 - 1)/3 = 1, still kept
        (4096.0, 5.0 / 12.0),  # smooth = (2 - 1)/3 = 1/3: (2/3)/8 + 1/3 = 5/12
        (6144.0, 2.0 / 9.0),  # smooth = (4/3 - 1)/3 = 1/9: (8/9)/8 + 1/9 = 2/9
        (8192.0, 1.0 / 8.0),  # the other boundary: smooth 0, divided by the factor 8
        (16384.0, 1.0 / 8.0),  # longer than 8192: low frequency, divided by 8
    ],
)
def test_llama3_scaling_hand_computed(wavelen, scale):
    config = _one_freq_config(wavelen)
    inv_freq = ref.rope_inv_freq(config)
    unscaled = 2 * math.pi / wavelen
    assert inv_freq[0].item() == 1.0  # wavelength 2*pi: always kept
    assert inv_freq[1].item() == pytest.approx(unscaled * scale, rel=1e-12)


def test_llama31_8b_frequency_bands():
    """Llama 3.1 8B: 64 frequencies; 0-28 kept (wavelength of 28: 1956 < 2048), 29-34 interpolated,
    35-63 divided by 8 (wavelength of 35: 2*pi*500000^(70/128) = 8218.7 > 8192)."""
    inv_freq = ref.rope_inv_freq(LLAMA31_8B_ROPE)
    base = 500000.0 ** (-torch.arange(0, 128, 2, dtype=torch.float64) / 128)
    ratio = inv_freq / base
    assert inv_freq.shape == (64,)
    assert torch.allclose(ratio[:29], torch.ones(29, dtype=torch.float64), rtol=1e-14, atol=0)
    assert torch.allclose(ratio[35:], torch.full((29,), 1 / 8, dtype=torch.float64), rtol=1e-14, atol=0)
    medium = ratio[29:35]
    assert bool(((medium > 1 / 8) & (medium < 1)).all())
    assert bool((medium[1:] < medium[:-1]).all())  # lower frequency, more scaling


def test_llama31_8b_inv_freq_float32_matches_hf():
    """In float32 the reference repeats HF's arithmetic: these are LlamaRotaryEmbedding.inv_freq
    values printed by transformers 5.24 for the Llama 3.1 8B config."""
    hf = {0: 1.0, 1: 0.8146172165870667, 20: 0.016560440883040428, 28: 0.0032114461064338684,
          29: 0.0021665706299245358, 30: 0.0013718936825171113, 32: 0.0005248460220173001,
          34: 0.0001785077911335975, 35: 9.556212171446532e-05, 50: 4.411534519022098e-06,
          63: 3.068925877869333e-07}
    inv_freq = ref.rope_inv_freq(LLAMA31_8B_ROPE, torch.float32)
    assert inv_freq.dtype == torch.float32
    for i, value in hf.items():
        assert inv_freq[i].item() == value, i
    exact = ref.rope_inv_freq(LLAMA31_8B_ROPE)
    assert torch.allclose(inv_freq.double(), exact, rtol=1e-6, atol=0)


def test_unknown_rope_type_is_refused():
    config = dict(LLAMA31_8B_ROPE, rope_scaling={"rope_type": "yarn", "factor": 4.0})
    with pytest.raises(NotImplementedError, match="yarn"):
        ref.rope_inv_freq(config)


def test_rope_is_relative():
    """<R(m) q, R(n) k> depends only on m - n (rotate-half layout, llama3 frequencies)."""
    config = dict(LLAMA31_8B_ROPE, head_dim=16)
    cos, sin = ref.rope_cos_sin(config, 9100)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 16, generator=g, dtype=torch.float64)

    def rotate(x, pos):
        return x * cos[pos] + ref._rotate_half(x) * sin[pos]

    base = torch.dot(rotate(q, 10), rotate(k, 3))
    for shift in (1, 500, 9000):
        assert torch.dot(rotate(q, 10 + shift), rotate(k, 3 + shift)).item() == pytest.approx(base.item(), rel=1e-9)
    assert torch.dot(rotate(q, 11), rotate(k, 3)).item() != pytest.approx(base.item(), rel=1e-3)


def test_rope_float32_angles_differ_only_by_rounding():
    config = LLAMA31_8B_ROPE
    cos64, sin64 = ref.rope_cos_sin(config, 9001)
    cos32, sin32 = ref.rope_cos_sin(config, 9001, rope_dtype=torch.float32)
    err = max((cos64 - cos32).abs().max().item(), (sin64 - sin32).abs().max().item())
    assert 1e-5 < err < 2e-3  # float32 angles near 9000 rad have a ~5e-4 ulp


# -- the forward pass -----------------------------------------------------------------------


def test_causal_prefix_consistency():
    """Logits at position i do not depend on tokens after i."""
    config = small_config(rope_scaling="llama3")
    sd = random_state_dict(config, seed=1)
    seq = ids(40)
    full = ref.forward(config, sd, seq)
    assert full.shape == (40, 97) and full.dtype == torch.float64
    assert torch.allclose(ref.forward(config, sd, seq[:17]), full[:17], rtol=0, atol=1e-12)


def test_chunked_attention_equals_one_block(monkeypatch):
    config = small_config()
    sd = random_state_dict(config, seed=2)
    seq = ids(50)
    whole = ref.forward(config, sd, seq)
    monkeypatch.setattr(ref, "_QUERY_CHUNK", 7)
    assert torch.allclose(ref.forward(config, sd, seq), whole, rtol=0, atol=1e-12)


def _expand_kv_heads(config, sd, order):
    """An MHA (n_kv = n_heads) state dict whose kv head h is GQA kv head order(h)."""
    D = config["head_dim"]
    mha = dict(config, num_key_value_heads=config["num_attention_heads"])
    out = dict(sd)
    for layer in range(config["num_hidden_layers"]):
        for proj in ("k_proj", "v_proj"):
            name = f"model.layers.{layer}.self_attn.{proj}.weight"
            heads = sd[name].view(config["num_key_value_heads"], D, -1)
            out[name] = heads[order].reshape(len(order) * D, -1)
    return mha, out


@pytest.mark.parametrize("n_kv_heads", [1, 2, 4])
def test_gqa_equals_mha_with_repeated_heads(n_kv_heads):
    config = small_config(n_heads=4, n_kv_heads=n_kv_heads)
    sd = random_state_dict(config, seed=3)
    seq = ids(20)
    group = 4 // n_kv_heads
    mha, mha_sd = _expand_kv_heads(config, sd, [h // group for h in range(4)])
    assert torch.allclose(ref.forward(mha, mha_sd, seq), ref.forward(config, sd, seq), rtol=0, atol=1e-12)
    if n_kv_heads == 2:  # the other mapping (h % n_kv, "repeat" instead of "repeat_interleave") differs
        wrong, wrong_sd = _expand_kv_heads(config, sd, [h % n_kv_heads for h in range(4)])
        assert not torch.allclose(ref.forward(wrong, wrong_sd, seq), ref.forward(config, sd, seq), atol=1e-3)


def test_tied_equals_untied_with_embedding_as_head():
    tied = small_config(tied=True)
    sd = random_state_dict(tied, seed=4)
    untied = dict(tied, tie_word_embeddings=False)
    untied_sd = dict(sd, **{"lm_head.weight": sd["model.embed_tokens.weight"]})
    seq = ids(12)
    assert torch.equal(ref.forward(tied, sd, seq), ref.forward(untied, untied_sd, seq))


def test_symmetries_leave_logits_unchanged():
    """Scaling q by c and k by 1/c, permuting MLP units, or permuting query heads (with o_proj's
    columns) inside a GQA group are exact symmetries of the model."""
    config = small_config()
    sd = {k: v.double() for k, v in random_state_dict(config, seed=5).items()}
    seq = ids(16)
    expected = ref.forward(config, sd, seq)
    p = "model.layers.0."
    D, hidden = config["head_dim"], config["hidden_size"]
    out = dict(sd)
    out[p + "self_attn.q_proj.weight"] = sd[p + "self_attn.q_proj.weight"] * 3.0
    out[p + "self_attn.k_proj.weight"] = sd[p + "self_attn.k_proj.weight"] / 3.0
    perm = torch.randperm(config["intermediate_size"], generator=torch.Generator().manual_seed(0))
    out[p + "mlp.gate_proj.weight"] = sd[p + "mlp.gate_proj.weight"][perm]
    out[p + "mlp.up_proj.weight"] = sd[p + "mlp.up_proj.weight"][perm]
    out[p + "mlp.down_proj.weight"] = sd[p + "mlp.down_proj.weight"][:, perm]
    heads = torch.tensor([1, 0, 3, 2])  # swap the two query heads of each kv group
    q = out[p + "self_attn.q_proj.weight"].view(4, D, hidden)
    out[p + "self_attn.q_proj.weight"] = q[heads].reshape(4 * D, hidden)
    o = sd[p + "self_attn.o_proj.weight"].view(hidden, 4, D)
    out[p + "self_attn.o_proj.weight"] = o[:, heads].reshape(hidden, 4 * D)
    assert torch.allclose(ref.forward(config, out, seq), expected, rtol=0, atol=1e-10)


def _meta_interleave(w, n_heads, D):
    """Rotate-half rows -> Meta's interleaved pairs (the inverse of HF's conversion permute)."""
    return w.view(n_heads, 2, D // 2, -1).transpose(1, 2).reshape(n_heads * D, -1)


@pytest.mark.parametrize(
    "change",
    ["interleaved_rope_layout", "swap_kv_heads", "norm_weight", "no_llama3_scaling", "rope_theta"],
)
def test_breaking_changes_show(change):
    """Each plausible engine mistake moves the logits by far more than float32 noise."""
    config = small_config(rope_scaling=llama3_rope_scaling(original_max_position_embeddings=32))
    sd = random_state_dict(config, seed=6)
    seq = ids(64)
    expected = ref.forward(config, sd, seq)
    p = "model.layers.0."
    cfg, out = dict(config), dict(sd)
    if change == "interleaved_rope_layout":
        for proj, heads in (("q_proj", 4), ("k_proj", 2)):
            out[p + f"self_attn.{proj}.weight"] = _meta_interleave(sd[p + f"self_attn.{proj}.weight"], heads, 8)
    elif change == "swap_kv_heads":
        out[p + "self_attn.k_proj.weight"] = sd[p + "self_attn.k_proj.weight"].view(2, 8, -1).flip(0).reshape(16, -1)
    elif change == "norm_weight":
        out[p + "post_attention_layernorm.weight"] = torch.ones(32)
    elif change == "no_llama3_scaling":
        cfg["rope_scaling"] = None
    elif change == "rope_theta":
        cfg["rope_theta"] = 10000.0
    assert ref.max_relative_error(ref.forward(cfg, out, seq), expected) > 1e-3


def test_attention_bias_is_used():
    config = small_config(attention_bias=True)
    sd = random_state_dict(config, seed=7)
    seq = ids(10)
    zero_bias = {k: (torch.zeros_like(v) if k.endswith(".bias") else v) for k, v in sd.items()}
    no_bias_config = dict(config, attention_bias=False)
    no_bias_sd = {k: v for k, v in sd.items() if not k.endswith(".bias")}
    assert torch.allclose(ref.forward(config, zero_bias, seq), ref.forward(no_bias_config, no_bias_sd, seq), atol=1e-12)
    assert ref.max_relative_error(ref.forward(config, sd, seq), ref.forward(config, zero_bias, seq)) > 1e-3


def test_head_dim_defaults_to_hidden_over_heads():
    config = small_config()
    assert config["head_dim"] == 8
    without = {k: v for k, v in config.items() if k != "head_dim"}
    assert ref.head_dim_of(without) == 8
    sd = random_state_dict(config, seed=8)
    seq = ids(9)
    assert torch.equal(ref.forward(without, sd, seq), ref.forward(config, sd, seq))


def test_greedy_generate_rescoring():
    config = small_config()
    sd = random_state_dict(config, seed=9)
    prompt = ids(5)
    result = ref.greedy_generate(config, sd, prompt, 6)
    assert result.finish_reason == "length" and len(result.token_ids) == 6 and len(result.margins) == 6
    logits = ref.forward(config, sd, prompt + result.token_ids)
    assert logits[4:-1].argmax(-1).tolist() == result.token_ids
    first = result.token_ids.index(result.token_ids[2])  # where that token first appears
    stop = ref.greedy_generate(config, sd, prompt, 6, stop_ids=[result.token_ids[2]])
    assert stop.finish_reason == "stop" and stop.token_ids == result.token_ids[:first]
