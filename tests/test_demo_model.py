"""The bundled demo model: greedy goldens through the normal loading path, its chat format, and
the training script that made it (a few steps of a tiny model; the full run is not repeated here)."""
import json
import sys
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
from safetensors import safe_open

from minillama import Llama
from minillama.hub import DEMO_MODEL_DIR

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import train_demo  # noqa: E402

BOS, EOS = 1, 2  # <s>, </s>


@pytest.fixture(scope="module")
def demo():
    return Llama.from_pretrained(DEMO_MODEL_DIR, device="cpu")


def test_demo_folder_is_small_and_complete():
    names = {p.name for p in DEMO_MODEL_DIR.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.model",
            "tokenizer_config.json", "special_tokens_map.json", "README.md"} <= names
    assert sum(p.stat().st_size for p in DEMO_MODEL_DIR.iterdir()) <= 10 * 1024 * 1024
    assert json.loads((DEMO_MODEL_DIR / "generation_config.json").read_text())["eos_token_id"] == EOS
    sp = spm.SentencePieceProcessor(model_file=str(DEMO_MODEL_DIR / "tokenizer.model"))
    assert [sp.IdToPiece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]
    assert [sp.IdToPiece(i) for i in range(3, 7)] == ["[INST]", "[/INST]", "<<SYS>>", "<</SYS>>"]
    assert sp.IdToPiece(7) == "<0x00>" and sp.EncodeAsIds("\u00e9")[-2:] == [0xC3 + 7, 0xA9 + 7]  # byte fallback
    with safe_open(DEMO_MODEL_DIR / "model.safetensors", framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}


# Greedy (temperature 0) continuations on the CPU in float32, 40 new tokens: prompt ids (1 = <s>),
# new ids, text. The model knows no copying yet: it names its hero "Kai" whatever the prompt says.
GOLDEN = {
    "Once upon a time": (
        [1, 431, 432, 265, 423],
        [987, 356, 287, 265, 878, 822, 379, 656, 980, 358, 353, 318, 265, 338, 842, 350, 364, 415, 290, 589, 980, 602, 436, 463, 287, 274, 388, 887, 290, 888, 980, 352, 298, 987, 656, 500, 274, 388, 509, 987],
        ", there was a clever boy named Kai. He lived in a big city with his mom and dad. His favorite thing was to play hide and seek. One day, Kai wanted to play outside,",
    ),
    "One day, Lily found": (
        [1, 352, 298, 987, 634, 413],
        [474, 476, 425, 318, 474, 476, 597, 980, 313, 269, 425, 987, 356, 287, 265, 338, 421, 516, 980, 289, 997, 544, 721, 460, 356, 337, 307, 656, 980, 358, 722, 269, 425, 720, 265, 281, 588, 576, 290, 719],
        ' an old map in an old book. On the map, there was a big red X. "I wonder what is there," said Kai. He followed the map past a dark forest and over',
    ),
    "There was once a little cat named Max.": (
        [1, 400, 287, 558, 265, 377, 897, 379, 781, 980],
        [358, 353, 318, 265, 338, 842, 980, 602, 436, 463, 287, 274, 388, 887, 290, 888, 980, 352, 298, 987, 656, 500, 274, 388, 509, 987, 440, 370, 287, 706, 980, 358, 340, 382, 324, 269, 610, 290, 502, 371],
        " He lived in a big city. His favorite thing was to play hide and seek. One day, Kai wanted to play outside, but it was raining. He looked out of the window and felt sad",
    ),
}


@pytest.mark.parametrize("prompt", sorted(GOLDEN))
def test_demo_greedy_golden(demo, prompt):
    expected_prompt_ids, expected_ids, expected_text = GOLDEN[prompt]
    (result,) = demo.generate([prompt], max_new_tokens=40, temperature=0.0)
    assert result.prompt_ids == expected_prompt_ids
    assert result.token_ids == expected_ids
    assert result.text == expected_text


def test_demo_goldens_hold_in_one_batch(demo):
    """Prompts of different lengths in one batch give each prompt's own greedy output."""
    prompts = sorted(GOLDEN)
    results = demo.generate(prompts, max_new_tokens=40, temperature=0.0)
    assert [r.token_ids for r in results] == [GOLDEN[p][1] for p in prompts]


def test_demo_chat_greeting_golden(demo):
    """A chat turn through the bundled template: the reply ends with </s> (a stop, not in the ids)."""
    ids = demo.tokenizer.encode_chat([{"role": "user", "content": "Hello!"}])
    assert ids == [1, 968, 3, 358, 286, 972, 1001, 968, 4]  # <s> ▁ [INST] ▁Hello ! ▁ [/INST]
    (result,) = demo.generate([ids], max_new_tokens=60, temperature=0.0)
    assert result.finish_reason == "stop" and result.stop == EOS
    assert result.token_ids == [
        358, 286, 972, 1001, 354, 827, 265, 263, 748, 479, 303, 972, 975, 480, 980, 332, 978, 990, 540, 478, 265,
        479, 987, 478, 418, 1005, 316, 988, 309, 430, 265, 897, 987, 265, 855, 285, 979, 265, 817, 379, 634, 987,
        290, 354, 465, 543, 336, 362, 969, 980, 968]
    assert result.text == (" Hello! I am a tiny story model. Ask me for a story, for example about a cat, "
                           "a dog or a girl named Lily, and I will tell you one. ")


def _llama2_reference(sp, messages) -> list:
    """Meta's Llama 2 ``chat_completion`` encoding, written out independently of minillama."""
    if messages[0]["role"] == "system":
        system = "<<SYS>>\n" + messages[0]["content"] + "\n<</SYS>>\n\n"
        messages = [{"role": "user", "content": system + messages[1]["content"]}] + messages[2:]
    ids = []
    for user, answer in zip(messages[::2], messages[1::2]):
        ids += [BOS] + sp.EncodeAsIds(f"[INST] {user['content'].strip()} [/INST] {answer['content'].strip()} ") + [EOS]
    if len(messages) % 2:
        ids += [BOS] + sp.EncodeAsIds(f"[INST] {messages[-1]['content'].strip()} [/INST]")
    return ids



def test_chat_cli_defaults_to_the_demo_model():
    """`python -m minillama.chat` with no --model: piped turns in, only the replies out."""
    import subprocess

    out = subprocess.run([sys.executable, "-m", "minillama.chat"], input="Hello!\n", capture_output=True,
                         text=True, timeout=120, cwd=Path(__file__).resolve().parent.parent)
    assert out.returncode == 0, out.stderr
    assert out.stdout == ("Hello! I am a tiny story model. Ask me for a story, for example about a cat, "
                          "a dog or a girl named Lily, and I will tell you one. \n")

@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": "Tell me a story about a cat."}],
    [{"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "Hi! I tell stories."}],
    [{"role": "system", "content": "You are a friendly storyteller."},
     {"role": "user", "content": "Tell me a story."}, {"role": "assistant", "content": "Once upon a time."},
     {"role": "user", "content": " Thank you! "}],
])
def test_demo_chat_is_llama2_format(demo, messages):
    """The bundled chat template, through minillama's chat encoder, gives Llama 2's ids."""
    sp = spm.SentencePieceProcessor(model_file=str(DEMO_MODEL_DIR / "tokenizer.model"))
    add_prompt = messages[-1]["role"] == "user"
    assert demo.tokenizer.encode_chat(messages, add_generation_prompt=add_prompt) == _llama2_reference(sp, messages)


TINY = ["--steps", "40", "--batch-size", "4", "--context", "64", "--hidden-size", "64", "--layers", "2",
        "--heads", "4", "--kv-heads", "2", "--intermediate-size", "128", "--vocab-size", "320",
        "--tokenizer-docs", "300", "--lr", "1e-2", "--warmup", "5", "--log-every", "1000"]


def test_train_demo_loss_falls_and_is_deterministic(tmp_path, capsys):
    torch_threads = torch.get_num_threads()
    try:
        first = train_demo.main(TINY + ["--out", str(tmp_path / "a")])
        second = train_demo.main(TINY + ["--out", str(tmp_path / "b")])
    finally:
        torch.set_num_threads(torch_threads)
        torch.use_deterministic_algorithms(False)
    losses = first["losses"]
    assert losses[0] > 5.0  # about ln(320) = 5.77 at the start
    assert sum(losses[-5:]) / 5 < losses[0] - 1.5
    assert first["losses"] == second["losses"]
    for name in ("model.safetensors", "tokenizer.model", "config.json", "tokenizer_config.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    # the trained folder loads through the normal path
    llm = Llama.from_pretrained(tmp_path / "a", device="cpu")
    assert llm.config.max_position_embeddings == 64 and llm.stop_ids == [EOS]
