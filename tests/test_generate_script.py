"""scripts/generate.py end to end on a tiny checkpoint: its output equals the API's, --json and
--stream, timing on stderr, and one-line errors (exit status 2, no traceback) for bad input."""
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from minillama import Llama
from tests.checkpoints import write_checkpoint

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "generate.py"
PROMPTS = ["Lily and Tom", "Once upon a time, in a small town by the sea", "The"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("script")
    write_checkpoint(folder, tokenizer="sentencepiece", seed=5)
    return folder


@pytest.fixture(scope="module")
def expected(folder):
    """What the API gives for PROMPTS, greedy, 12 new tokens."""
    return Llama.from_pretrained(folder, device="cpu").generate(PROMPTS, max_new_tokens=12)


class Completed:
    def __init__(self, proc):
        self.returncode = proc.returncode
        self.stdout = proc.stdout.decode("utf-8")  # bytes as written: no newline translation
        self.stderr = proc.stderr.decode("utf-8")


def run_script(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, env=env, timeout=120)
    return Completed(proc)


@pytest.fixture(scope="module")
def script():
    """The code behind scripts/generate.py and the minillama-generate command."""
    return importlib.import_module("minillama.generate_cli")


def test_text_output_equals_the_api(folder, expected):
    out = run_script("--model", folder, "--device", "cpu", "--max-new-tokens", 12, *PROMPTS)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "\n\n".join(p + r.text for p, r in zip(PROMPTS, expected)) + "\n"
    stats = out.stderr.strip().splitlines()
    assert len(stats) == 1
    assert "3 prompt(s)" in stats[0] and f"{sum(len(r.prompt_ids) for r in expected)} prompt tokens" in stats[0]
    assert "time to first token" in stats[0] and "tok/s per sequence" in stats[0] and "aggregate" in stats[0]


def test_json_from_a_jsonl_prompt_file_in_batches(folder, expected, tmp_path):
    prompt_file = tmp_path / "prompts.jsonl"
    prompt_file.write_text("".join(json.dumps({"prompt": p, "id": i}) + "\n" for i, p in enumerate(PROMPTS)))
    out = run_script("--model", folder, "--device", "cpu", "--max-new-tokens", 12, "--prompt-file", prompt_file,
                     "--json", "--batch-size", 2)
    assert out.returncode == 0, out.stderr
    records = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(records) == 3
    for prompt, r, rec in zip(PROMPTS, expected, records):
        assert rec["prompt"] == prompt
        assert rec["prompt_token_ids"] == r.prompt_ids
        assert rec["token_ids"] == r.token_ids
        assert rec["text"] == r.text
        assert (rec["finish_reason"], rec["stop"]) == (r.finish_reason, r.stop)
        assert set(rec["timing"]) == {"time_to_first_token_s", "decode_s", "decode_tokens_per_s"}
    assert [line.startswith("[batch ") for line in out.stderr.splitlines()] == [True, True]  # 2 + 1 prompts


def test_stream_prints_the_same_text(script, folder, expected, capsys):
    assert script.main(["--model", str(folder), "--device", "cpu", "--max-new-tokens", "12", "--stream",
                        PROMPTS[0]]) == 0
    captured = capsys.readouterr()
    assert captured.out == PROMPTS[0] + expected[0].text + "\n"
    assert "1 prompt(s)" in captured.err and "time to first token" in captured.err


def test_missing_model_is_one_line_error(tmp_path):
    out = run_script("--model", tmp_path / "nowhere", "hello")
    assert out.returncode == 2
    assert out.stdout == ""
    assert out.stderr.count("\n") == 1 and out.stderr.startswith("error: ") and "nowhere" in out.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--top-p", "0", "hi"], "top_p must be in (0, 1]"),
        (["--temperature", "-1", "hi"], "temperature must be >= 0"),
        (["--max-new-tokens", "200000", "hi"], "exceeds the model's context of 131072"),
        (["--stream", "a", "b"], "--stream takes one prompt, got 2"),
        (["--batch-size", "0", "hi"], "--batch-size must be >= 1, got 0"),
        (["--frequency-penalty", "3", "hi"], "frequency_penalty must be in [-2, 2]"),
        (["--repetition-penalty", "0", "hi"], "repetition_penalty must be > 0"),
        (["--min-tokens", "-1", "hi"], "min_tokens must be an integer >= 0 (0 turns it off), got -1"),
        (["--min-tokens", "20", "--max-new-tokens", "10", "hi"],
         "min_tokens 20 is more than max_new_tokens 10: lower min_tokens or raise max_new_tokens"),
        (["--min-tokens", "x", "hi"], "argument --min-tokens: invalid int value: 'x'"),
        (["--temperature", "hot", "hi"], "argument --temperature: invalid float value: 'hot' (see "),
        ([], "no prompts"),
        (["--prompt-file", "MISSING.txt"], "cannot read --prompt-file MISSING.txt"),
        (["--prompt-file", "BAD.jsonl"], "BAD.jsonl:2 has no string field 'prompt'"),
    ],
)
def test_user_errors(script, folder, tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "BAD.jsonl").write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n')
    assert script.main(["--model", str(folder), "--device", "cpu", *args]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("error: ") and captured.err.count("\n") == 1
    assert message in captured.err


@pytest.mark.parametrize("penalties", [dict(presence_penalty=-2.0, frequency_penalty=-1.5),
                                       dict(repetition_penalty=0.1)])
def test_penalties_reach_the_generation(script, folder, expected, capsys, penalties):
    """--presence-penalty, --frequency-penalty and --repetition-penalty give the API's tokens for them
    (negative penalties and a repetition penalty below 1 favour repeats: this greedy run changes)."""
    want = Llama.from_pretrained(folder, device="cpu").generate(PROMPTS[:1], max_new_tokens=12, **penalties)[0]
    assert want.token_ids != expected[0].token_ids
    flags = [x for k, v in penalties.items() for x in ("--" + k.replace("_", "-"), str(v))]
    assert script.main(["--model", str(folder), "--device", "cpu", "--max-new-tokens", "12", "--json", *flags,
                        PROMPTS[0]]) == 0
    assert json.loads(capsys.readouterr().out)["token_ids"] == want.token_ids


def test_ignore_eos_and_min_tokens_reach_the_generation(script, capsys):
    """On the demo model, whose greedy completion of this prompt ends on </s> (id 2) after 27 tokens:
    --ignore-eos runs to --max-new-tokens with the </s> in the text, --min-tokens holds it back, as the API."""
    from minillama.hub import DEMO_MODEL_DIR

    prompt = "The cat sat on the"

    def completion(*flags):
        assert script.main(["--device", "cpu", "--max-new-tokens", "40", "--json", *flags, prompt]) == 0
        return json.loads(capsys.readouterr().out)

    llm = Llama.from_pretrained(DEMO_MODEL_DIR, device="cpu")
    plain = completion()
    assert (len(plain["token_ids"]), plain["finish_reason"], plain["stop"]) == (27, "stop", 2)
    ignored = completion("--ignore-eos")
    want = llm.generate([prompt], max_new_tokens=40, ignore_eos=True)[0]
    assert (ignored["token_ids"], ignored["text"], ignored["finish_reason"]) == (want.token_ids, want.text, "length")
    assert len(ignored["token_ids"]) == 40 and ignored["token_ids"][27] == 2
    assert ignored["text"].startswith(plain["text"] + "</s>")
    skipped = completion("--ignore-eos", "--skip-special-tokens")
    want = llm.generate([prompt], max_new_tokens=40, ignore_eos=True, skip_special_tokens=True)[0]
    assert (skipped["token_ids"], skipped["text"]) == (ignored["token_ids"], want.text) and "</s>" not in want.text
    held = completion("--min-tokens", "30")
    want = llm.generate([prompt], max_new_tokens=40, min_tokens=30)[0]
    assert (held["token_ids"], held["finish_reason"]) == (want.token_ids, "stop") and len(want.token_ids) == 33


def test_a_bad_min_tokens_fails_before_any_weight_is_read(script, tmp_path, capsys):
    assert script.main(["--model", str(tmp_path / "nowhere"), "--min-tokens", "-3", "hi"]) == 2
    assert capsys.readouterr().err == "error: min_tokens must be an integer >= 0 (0 turns it off), got -3\n"


def test_plain_prompt_file(script, folder, expected, tmp_path, capsys):
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("\n".join(PROMPTS[:2]) + "\n\n")  # blank lines are skipped
    assert script.main(["--model", str(folder), "--device", "cpu", "--max-new-tokens", "12",
                        "--prompt-file", str(prompt_file)]) == 0
    assert capsys.readouterr().out == PROMPTS[0] + expected[0].text + "\n\n" + PROMPTS[1] + expected[1].text + "\n"


def test_default_model_missing_is_a_clear_error(script, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(script, "DEMO_MODEL_DIR", tmp_path / "demo_model")
    assert script.main(["hello"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the bundled demo model is not installed") and "--model" in err
