"""Write tests/golden/*.json: exact greedy token ids of tiny fixed-seed checkpoints.

Run once, by hand (``python tests/make_goldens.py``); the files are committed. The expected tokens
come only from the independent float64 reference (tests/reference_llama.py) -- minillama is never
imported -- and prompt text is encoded with the tokenizer libraries directly. A prompt is kept only
if every greedy step's top-1 / top-2 logit margin is at least MIN_MARGIN, far above float32 noise,
so a correct float32 engine must reproduce the tokens exactly.
"""
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

import reference_llama as ref
from checkpoints import BEGIN_OF_TEXT, LLAMA3_SPECIAL_TOKENS, load_config, load_state_dict, write_checkpoint

GOLDEN_DIR = Path(__file__).parent / "golden"
MIN_MARGIN = 2e-3  # logits are O(1); float32 engines differ from the reference by ~1e-5

GOLDENS = {
    "sentencepiece_gqa2": dict(
        checkpoint=dict(tokenizer="sentencepiece", hidden_size=32, n_layers=2, n_heads=4, n_kv_heads=2,
                        intermediate_size=64, seed=11),
        texts=["Once upon a time", "Lily and Max went to the park."],
        n_random=3,
        want_stop=True,
        max_new_tokens=16,
    ),
    "llama3_tokenizer_gqa4_hd16": dict(
        checkpoint=dict(tokenizer="llama3", hidden_size=16, n_layers=2, n_heads=4, n_kv_heads=1, head_dim=16,
                        intermediate_size=48, seed=12),
        texts=["Once upon a time", "The sun was bright"],
        n_random=2,
        want_stop=False,
        max_new_tokens=12,
    ),
    "bf16_sharded_llama3_rope": dict(
        checkpoint=dict(tokenizer="sentencepiece", hidden_size=48, n_layers=3, n_heads=6, n_kv_heads=3,
                        intermediate_size=96, dtype="bfloat16", shards=3, rope_scaling="llama3",
                        seed=13),
        texts=["Tom had a red ball."],
        n_random=3,
        want_stop=False,
        max_new_tokens=16,
    ),
}


def encode_text(folder: Path, tokenizer: str, text: str):
    if tokenizer == "llama3":
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(folder / "tokenizer.json")).encode(text).ids  # BOS by post-processor
    import sentencepiece as spm

    return [1] + spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model")).encode(text)


def decode(folder: Path, tokenizer: str, ids):
    if tokenizer == "llama3":
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(folder / "tokenizer.json")).decode(ids, skip_special_tokens=False)
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model")).decode(ids)


def random_prompt(rng, tokenizer: str, vocab_size: int):
    n = int(rng.integers(3, 13))
    if tokenizer == "llama3":
        return [BEGIN_OF_TEXT] + rng.integers(0, BEGIN_OF_TEXT, n).tolist()
    return [1] + rng.integers(3, vocab_size, n).tolist()


def run_case(config, state, folder, tokenizer, prompt_ids, max_new_tokens, stop_ids):
    result = ref.greedy_generate(config, state, prompt_ids, max_new_tokens, stop_ids)
    if min(result.margins) < MIN_MARGIN:
        return None
    if tokenizer == "llama3" and any(t in LLAMA3_SPECIAL_TOKENS for t in result.token_ids):
        return None  # keep .text free of the skip-special-tokens question
    # .text is the continuation: what decoding prompt + new tokens adds to the decoded prompt
    # (so a SentencePiece word-start piece keeps its space, as streaming would show it).
    prompt_text = decode(folder, tokenizer, list(prompt_ids))
    full_text = decode(folder, tokenizer, list(prompt_ids) + result.token_ids)
    if not full_text.startswith(prompt_text):
        return None
    return {
        "prompt_ids": list(prompt_ids),
        "token_ids": result.token_ids,
        "finish_reason": result.finish_reason,
        "text": full_text[len(prompt_text):],
        "min_margin": round(min(result.margins), 6),
    }


def make_golden(name, spec):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_checkpoint(folder, **spec["checkpoint"])
        config = load_config(folder)
        state = load_state_dict(folder)
        stop_ids = json.loads((folder / "generation_config.json").read_text())["eos_token_id"]
        stop_ids = stop_ids if isinstance(stop_ids, list) else [stop_ids]
        tokenizer = spec["checkpoint"]["tokenizer"]
        n_new = spec["max_new_tokens"]
        cases = []
        for text in spec["texts"]:
            case = run_case(config, state, folder, tokenizer, encode_text(folder, tokenizer, text), n_new, stop_ids)
            if case is None:
                print(f"{name}: text prompt {text!r} has an ambiguous step, skipped", file=sys.stderr)
                continue
            cases.append({"prompt_text": text, **case})
        rng = np.random.Generator(np.random.PCG64(1000 + len(name)))
        n_random, stopped = 0, not spec["want_stop"]
        for _ in range(3000):
            if n_random >= spec["n_random"] and stopped:
                break
            case = run_case(config, state, folder, tokenizer, random_prompt(rng, tokenizer, config["vocab_size"]),
                            n_new, stop_ids)
            if case is None:
                continue
            if case["finish_reason"] == "stop" and not stopped:
                cases.append(case)
                stopped = True
            elif case["finish_reason"] == "length" and n_random < spec["n_random"]:
                cases.append(case)
                n_random += 1
        if not stopped:
            raise RuntimeError(f"{name}: found no prompt that ends on a stop id")
    golden = {
        "about": "Made by tests/make_goldens.py from the float64 reference (tests/reference_llama.py), "
                 "never from minillama. Greedy, every step's top-2 margin >= min_margin.",
        "checkpoint": spec["checkpoint"],
        "stop_ids": stop_ids,
        "max_new_tokens": n_new,
        "min_margin": MIN_MARGIN,
        "cases": cases,
    }
    GOLDEN_DIR.mkdir(exist_ok=True)
    path = GOLDEN_DIR / f"{name}.json"
    path.write_text(_format(golden), encoding="utf-8")
    print(f"wrote {path} ({len(cases)} cases)")


def _format(golden: dict) -> str:
    """Indented JSON with one line per case, so a diff shows which case changed."""
    lines = ["{"]
    for key, value in golden.items():
        if key == "cases":
            cases = [json.dumps(c, ensure_ascii=False) for c in value]
            lines.append(' "cases": [\n  ' + ",\n  ".join(cases) + "\n ]")
        else:
            lines.append(f" {json.dumps(key)}: {json.dumps(value, ensure_ascii=False)},")
    return "\n".join(lines) + "\n}\n"


if __name__ == "__main__":
    for golden_name, golden_spec in GOLDENS.items():
        make_golden(golden_name, golden_spec)
