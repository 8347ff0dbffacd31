"""minillama against the independent float64 reference, through the public API only.

Logits of tiny real HF checkpoints (written by tests/checkpoints.py) are compared with
tests/reference_llama.py, and greedy generation with golden token ids made by the reference
(tests/make_goldens.py). Run with ``-s`` to see the measured errors.
"""
import json
from pathlib import Path

import pytest
import torch

from minillama import Llama
from tests import reference_llama as ref
from tests.checkpoints import checkpoint_factory  # noqa: F401  (fixture)
from tests.checkpoints import llama3_rope_scaling, load_state_dict

FP32_BOUND = 1e-5  # max |engine - reference| / max |reference|, float32 compute
BF16_COMPUTE_BOUND = 5e-2  # the same with bfloat16 activations (weights exact in both)
GOLDEN_DIR = Path(__file__).parent / "golden"


def _random_ids(n, vocab_size, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (n,), generator=g).tolist()


BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.triton)]  # triton: the interpreter on the CPU


def _compare(folder, config, ids, label, dtype=torch.float32, backend="torch"):
    llm = Llama.from_pretrained(folder, device="cpu", dtype=dtype, backend=backend)
    got = llm.logits(ids)
    assert got.shape == (len(ids), config["vocab_size"])
    assert got.dtype == torch.float32
    expected = ref.forward(config, load_state_dict(folder), ids)
    err = ref.max_relative_error(got, expected)
    print(f"\nmax relative logits error [{label}]: {err:.2e}")
    return err


# Each case: write_checkpoint arguments. Sentencepiece checkpoints have a 512-token vocabulary,
# "llama3" ones the real 128256 (so keep their hidden size small).
LOGITS_CASES = {
    "fp32 single untied gqa2 hd8": dict(tokenizer="sentencepiece", n_heads=4, n_kv_heads=2),
    "fp32 mha hd16": dict(tokenizer="sentencepiece", hidden_size=32, n_heads=2, n_kv_heads=2, head_dim=16),
    "fp32 gqa4 hd64 (heads*hd != hidden)": dict(
        tokenizer="sentencepiece", hidden_size=32, n_heads=4, n_kv_heads=1, head_dim=64, intermediate_size=40),
    "fp32 gqa2 hd32 sharded4 tied": dict(
        tokenizer="sentencepiece", hidden_size=64, n_heads=4, n_kv_heads=2, head_dim=32, shards=4, tied=True),
    "fp32 llama3 tokenizer vocab128256 sharded2": dict(
        tokenizer="llama3", hidden_size=16, n_heads=2, n_kv_heads=1, intermediate_size=32, shards=2),
    "fp32 llama3 rope_scaling": dict(tokenizer="sentencepiece", rope_scaling="llama3", n_layers=3),
    "fp32 no head_dim key": dict(tokenizer="sentencepiece", write_head_dim=False, hidden_size=64, n_heads=8,
                                 n_kv_heads=2),
    "fp32 padded vocab": dict(tokenizer="sentencepiece", vocab_size=600),
    "bf16 single untied": dict(tokenizer="sentencepiece", dtype="bfloat16"),
    "bf16 sharded3 tied gqa4 llama3 rope": dict(
        tokenizer="sentencepiece", dtype="bfloat16", shards=3, tied=True, n_heads=4, n_kv_heads=1,
        rope_scaling="llama3"),
    "bf16 llama3 tokenizer tied": dict(tokenizer="llama3", dtype="bfloat16", hidden_size=16, n_heads=2,
                                       n_kv_heads=2, tied=True),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("label", list(LOGITS_CASES))
def test_logits_match_reference(checkpoint_factory, label, backend):
    """float32 compute (the CPU default); for bf16 checkpoints the weights are exactly the
    reference's, so the bound is the same as for fp32 checkpoints."""
    folder, config = checkpoint_factory(**LOGITS_CASES[label])
    ids = _random_ids(48, config["vocab_size"], seed=len(label))
    assert _compare(folder, config, ids, f"{label}, {backend}", backend=backend) < FP32_BOUND


def test_default_dtype_on_cpu_is_float32_for_bf16_checkpoint(checkpoint_factory):
    folder, config = checkpoint_factory(**LOGITS_CASES["bf16 single untied"])
    ids = _random_ids(20, config["vocab_size"])
    assert _compare(folder, config, ids, "bf16 checkpoint, dtype=None", dtype=None) < FP32_BOUND


def test_bf16_compute(checkpoint_factory):
    folder, config = checkpoint_factory(**LOGITS_CASES["bf16 single untied"])
    ids = _random_ids(32, config["vocab_size"])
    assert _compare(folder, config, ids, "bf16 checkpoint, bf16 compute", dtype=torch.bfloat16) < BF16_COMPUTE_BOUND


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_bias(checkpoint_factory, backend):
    folder, config = checkpoint_factory(tokenizer="sentencepiece", attention_bias=True)
    ids = _random_ids(24, config["vocab_size"])
    assert _compare(folder, config, ids, f"fp32 attention_bias, {backend}", backend=backend) < FP32_BOUND


def test_llama3_scaling_small_original_context(checkpoint_factory):
    """original_max_position_embeddings 32: positions up to 300 cross all three frequency bands
    (kept, interpolated, divided by 8) cheaply; a missing scaling is off by ~1e-1 here."""
    folder, config = checkpoint_factory(
        tokenizer="sentencepiece", rope_scaling=llama3_rope_scaling(original_max_position_embeddings=32),
        rope_theta=10000.0, head_dim=16, n_heads=2, n_kv_heads=1)
    ids = _random_ids(300, config["vocab_size"], seed=3)
    assert _compare(folder, config, ids, "llama3 scaling, original context 32, 300 positions") < FP32_BOUND
    state = load_state_dict(folder)
    unscaled = ref.forward(dict(config, rope_scaling=None), state, ids)
    assert ref.max_relative_error(unscaled, ref.forward(config, state, ids)) > 1000 * FP32_BOUND


def test_llama31_rope_past_original_context(checkpoint_factory):
    """Llama 3.1's rope_scaling and max_position_embeddings 131072, a 9000-token sequence: positions
    past original_max_position_embeddings (8192). One small layer keeps it to a few seconds.

    Compared with the reference's float32 RoPE angles, which is how HF and Meta form them (with
    exact float64 angles the difference is ~2e-6: float32 rounding of angles near 9000 rad).
    """
    folder, config = checkpoint_factory(
        tokenizer="sentencepiece", n_layers=1, hidden_size=32, n_heads=2, n_kv_heads=1, head_dim=16,
        intermediate_size=32, rope_scaling="llama3", max_position_embeddings=131072)
    assert config["rope_scaling"]["original_max_position_embeddings"] == 8192
    ids = _random_ids(9000, config["vocab_size"], seed=4)
    llm = Llama.from_pretrained(folder, device="cpu", dtype=torch.float32)
    got = llm.logits(ids)
    expected = ref.forward(config, load_state_dict(folder), ids, rope_dtype=torch.float32)
    err = ref.max_relative_error(got, expected)
    err_late = ref.max_relative_error(got[8192:], expected[8192:])
    print(f"\nmax relative logits error [llama3 rope, 9000 positions, float32 angles]: {err:.2e} "
          f"(positions >= 8192: {err_late:.2e})")
    assert err < FP32_BOUND


def test_decode_steps_cross_original_context(checkpoint_factory):
    """Greedy decode from position 8185 to 8200 (through the cache, one position per step) picks
    the argmax of a full forward over the final sequence at every step."""
    folder, config = checkpoint_factory(
        tokenizer="sentencepiece", n_layers=1, hidden_size=32, n_heads=2, n_kv_heads=1, head_dim=16,
        intermediate_size=32, rope_scaling="llama3", max_position_embeddings=131072)
    prompt = _random_ids(8185, config["vocab_size"], seed=5)
    llm = Llama.from_pretrained(folder, device="cpu", dtype=torch.float32)
    result = llm.generate([prompt], max_new_tokens=15, temperature=0.0)[0]
    assert result.finish_reason == "length"  # this prompt never meets </s> (id 2)
    new = result.token_ids
    logits = llm.logits(prompt + new)[len(prompt) - 1 : -1]  # the row that chose each new token
    top2 = logits.topk(2, dim=-1).values
    assert float((top2[:, 0] - top2[:, 1]).min()) > 1e-4  # no near-ties: argmax is well defined
    assert logits.argmax(-1).tolist() == new


# -- greedy goldens -----------------------------------------------------------------------------


def _goldens():
    return sorted(GOLDEN_DIR.glob("*.json"))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("path", _goldens(), ids=lambda p: p.stem)
def test_greedy_goldens(checkpoint_factory, path, backend):
    golden = json.loads(path.read_text(encoding="utf-8"))
    folder, _ = checkpoint_factory(**golden["checkpoint"])
    llm = Llama.from_pretrained(folder, device="cpu", dtype=torch.float32, backend=backend)
    cases = golden["cases"]
    n_new = golden["max_new_tokens"]

    results = llm.generate([c["prompt_ids"] for c in cases], max_new_tokens=n_new, temperature=0.0)
    for case, result in zip(cases, results):
        assert result.token_ids == case["token_ids"], case["prompt_ids"]
        assert result.finish_reason == case["finish_reason"]
        assert result.text == case["text"]

    alone = llm.generate([cases[-1]["prompt_ids"]], max_new_tokens=n_new, temperature=0.0)[0]
    assert alone.token_ids == cases[-1]["token_ids"]

    texts = [c for c in cases if "prompt_text" in c]
    for case in texts:
        assert llm.tokenizer.encode(case["prompt_text"], bos=True) == case["prompt_ids"]
    # text prompts differ from id prompts only before the forward: checked once per golden (under
    # the Triton interpreter a third generate cost 5-15 s a golden and ran no other kernel path)
    if texts and backend == "torch":
        results = llm.generate([c["prompt_text"] for c in texts], max_new_tokens=n_new, temperature=0.0)
        assert [r.token_ids for r in results] == [c["token_ids"] for c in texts]


def test_goldens_exist_and_cover_a_stop():
    goldens = [json.loads(p.read_text(encoding="utf-8")) for p in _goldens()]
    assert len(goldens) >= 3
    assert any(c["finish_reason"] == "stop" for g in goldens for c in g["cases"])
