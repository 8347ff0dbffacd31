"""Tensor parallelism on the CPU: 2 processes over gloo against one process, through the public API
and both command-line launch paths (``--tp 2`` and torchrun).

TP=2 computes the same function in another order (partial products summed by all-reduce), so
float32 logits agree within 1e-5 relative and greedy tokens are identical; sampling agrees across
ranks because rank 0's ids are broadcast each step.
"""
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from minillama import Llama
from minillama.config import LlamaConfig
from minillama.layers import Linear
from minillama.parallel import check_degree, degrees_that_work, leave
from tests.checkpoints import write_checkpoint

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["the quick brown fox", "a", "once upon a time there was a little"]
CASES = {
    "untied gqa2 llama3 rope": dict(n_heads=4, n_kv_heads=2, rope_scaling="llama3", hidden_size=64, head_dim=16),
    "tied, padded vocabulary (head replicated)": dict(n_heads=8, n_kv_heads=2, tied=True, vocab_size=601,
                                                       hidden_size=64, intermediate_size=96),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_everything(folder, out_path, device="cpu", dtype=None):
    """What each rank (and the single process) computes; saved (on the CPU) for the parent to compare."""
    llm = Llama.from_pretrained(folder, device=device, dtype=dtype)
    ids = llm.tokenizer.encode("the cat sat on the mat and then it", bos=True)
    out = {"logits": llm.logits(ids).cpu()}
    out["segments"] = mixed_step_logits(llm, ids).cpu()
    out["greedy"] = [r.token_ids for r in llm.generate(PROMPTS, max_new_tokens=12)]
    out["seeded"] = [r.token_ids for r in llm.generate(PROMPTS, max_new_tokens=12, temperature=1.0, seed=7)]
    out["unseeded"] = [r.token_ids for r in llm.generate(PROMPTS, max_new_tokens=12, temperature=1.5, top_p=0.95)]
    stream = llm.stream("the quick", max_new_tokens=10, stop=["fox"])
    out["stream"] = ("".join(stream), stream.result.finish_reason)
    cache = llm.new_cache(1, 64)  # the chat's path: continue on one cache
    first = llm.generate([ids], max_new_tokens=6, cache=cache)[0]
    out["continued"] = first.token_ids + llm.generate([first.token_ids[-1:]], max_new_tokens=6, cache=cache)[0].token_ids
    out["graph_kinds"] = sorted({key[0] for key in llm.runner._graphs})  # CUDA graphs replayed ("decode", "packed")
    model = llm.model
    out["shards"] = {
        "wqkv": tuple(model.layers[0].attention.wqkv.weight.shape),
        "wo": tuple(model.layers[0].attention.wo.weight.shape),
        "head": tuple(model.output.weight.shape),
        "cache_heads": llm.new_cache(1, 4).k.shape[3],
        "head_parallel": model.output.parallel,
    }
    torch.save(out, out_path)


def mixed_step_logits(llm, ids):
    """A scheduler's mixed step: rows 0-1 decode one token each, rows 2 and 3 get prompt chunks of 7
    and 2 tokens, in one forward; logits of the decoding rows and the chunks' last tokens."""
    pool = llm.new_cache(4, 32)
    llm.runner(torch.tensor([ids[:5]], device=llm.device), pool.rows(0, 1))
    llm.runner(torch.tensor([ids[:3]], device=llm.device), pool.rows(1, 2))
    pool.set_lengths([5, 3, 0, 0])
    tokens = torch.tensor([ids[5], ids[3]] + ids[:7] + ids[1:3], device=llm.device)
    return llm.runner.forward_packed(tokens, [(0, 1), (1, 1), (2, 7), (3, 2)], pool, [0, 1, 2 + 6, 2 + 7 + 1])


def run_8bit(folder, out_path, device="cpu", dtype=None):
    """Logits (on the CPU) and greedy tokens with weights quantized at load, int8 and fp8 (and fp8
    with lm_head: each rank quantizes its vocabulary rows), and with the loaded model quantized in
    memory (quantize_model), int8."""
    from minillama.quantization import quantize_model

    out = {}
    for quantize in ("int8", "fp8", "fp8 lm_head", "int8 in memory"):
        if quantize == "int8 in memory":
            llm = Llama.from_pretrained(folder, device=device, dtype=dtype)
            quantize_model(llm.model, "int8")
        else:
            llm = Llama.from_pretrained(folder, device=device, dtype=dtype, quantize=quantize.split()[0],
                                        quantize_lm_head=quantize.endswith("lm_head"))
        ids = llm.tokenizer.encode("the cat sat on the mat and then it", bos=True)
        out[quantize] = (llm.logits(ids).cpu(), [r.token_ids for r in llm.generate(PROMPTS, max_new_tokens=12)])
    torch.save(out, out_path)


def serve_through_a_failed_step(folder, out_path):
    """A scheduler under TP: every rank's second packed step raises (a simulated out-of-memory, before
    any collective); rank 0 fails that request, then serves the next one; the other rank follows."""
    from minillama.scheduler import Request, Scheduler, Token

    llm = Llama.from_pretrained(folder, device="cpu")
    real, calls = llm.runner.forward_packed, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("out of memory (simulated)")
        return real(*args, **kwargs)

    llm.runner.forward_packed = failing
    scheduler = Scheduler(llm, max_batch=2, max_seq_len=64, prefill_chunk=4)
    if int(os.environ["RANK"]) != 0:
        scheduler.follow()
        return
    ends = []
    for _ in range(2):
        tokens, done = [], threading.Event()

        def on_event(event, tokens=tokens, done=done):
            if isinstance(event, Token):
                tokens.append(event.id)
            else:
                ends.append((type(event).__name__, tokens))
                done.set()
        scheduler.submit(Request(list(range(1, 12)), 5), on_event)
        assert done.wait(60)
    scheduler.close()
    torch.save(ends, out_path)


def scheduled_with_scores_and_penalties(folder, out_path=None, device="cpu"):
    """A scheduler (2 rows, 5 prompt tokens per step) serving requests with penalties and a logit bias
    (greedy and seeded) beside one that scores a prompt of several chunks and one with max_tokens 0:
    rank 0 saves each request's tokens, prompt logprobs and end; the other rank follows. Without
    out_path (one process): returns them."""
    from minillama.sampling import SamplingParams
    from minillama.scheduler import Finished, PromptLogprobs, Request, Scheduler, Token

    llm = Llama.from_pretrained(folder, device=device)
    scheduler = Scheduler(llm, max_batch=2, max_seq_len=96, prefill_chunk=5)
    if out_path is not None and int(os.environ["RANK"]) != 0:
        scheduler.follow()
        return None
    encode = llm.tokenizer.encode
    long = encode("once upon a time there was a little girl who lived near the forest " * 2, bos=True)
    requests = [Request(encode(PROMPTS[0], bos=True), 12, SamplingParams(repetition_penalty=1.5, frequency_penalty=0.7)),
                Request(encode(PROMPTS[1], bos=True), 12,
                        SamplingParams(temperature=0.9, seed=4, presence_penalty=1.0, logit_bias={5: 4.0})),
                Request(long, 6, SamplingParams(repetition_penalty=1.3), logprobs=2, prompt_logprobs=True),
                Request(long, 0, logprobs=1, prompt_logprobs=True),
                Request(encode(PROMPTS[0], bos=True), 10)]
    outs, dones = [], []
    for request in requests:
        out, done = {"tokens": [], "prompt": [], "end": None}, threading.Event()

        def on_event(event, out=out, done=done):
            if isinstance(event, Token):
                out["tokens"].append((event.id, event.logprob))
            elif isinstance(event, PromptLogprobs):
                out["prompt"] += [(t.id, t.logprob, [i for i, _ in t.top_logprobs]) for t in event.tokens]
            else:
                out["end"] = (type(event).__name__, event.finish_reason if isinstance(event, Finished) else None)
                done.set()
        scheduler.submit(request, on_event)
        outs.append(out)
        dones.append(done)
    for done in dones:
        assert done.wait(120)
    scheduler.close()
    if out_path is None:
        return outs
    torch.save(outs, out_path)


def close_after_the_thread_died(folder, out_path):
    """Rank 0's scheduler thread dies of a bug outside its per-step guard; close() must still tell
    the other rank's follow() to return."""
    from minillama.scheduler import Request, Scheduler

    llm = Llama.from_pretrained(folder, device="cpu")
    scheduler = Scheduler(llm, max_batch=2, max_seq_len=64, prefill_chunk=4)
    if int(os.environ["RANK"]) != 0:
        scheduler.follow()
        torch.save("followed", out_path)
        return

    def broken():
        raise RuntimeError("a bug in the scheduling loop (simulated)")

    scheduler._admit = broken
    threading.excepthook = lambda args: None  # the thread's death is the point here, not its traceback
    scheduler.submit(Request(list(range(1, 12)), 5), lambda event: None)
    scheduler._thread.join(60)
    assert not scheduler._thread.is_alive()
    scheduler.close()
    torch.save("closed", out_path)


def _rank_main(rank, world, port, folder, out_dir, work=run_everything):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    work(folder, Path(out_dir) / f"rank{rank}.pt")
    leave()  # every rank done, then the group torn down
    os._exit(0)  # as the CLIs do under torchrun: the interpreter's teardown can abort a gloo worker


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tp")
    config = write_checkpoint(folder, tokenizer="sentencepiece", n_layers=2, seed=11, **CASES[request.param])
    single = tmp_path_factory.mktemp("single") / "single.pt"
    run_everything(folder, single)
    out_dir = tmp_path_factory.mktemp("ranks")
    mp.start_processes(_rank_main, args=(2, free_port(), str(folder), str(out_dir)), nprocs=2, start_method="spawn")
    ranks = [torch.load(out_dir / f"rank{r}.pt") for r in range(2)]
    return config, torch.load(single), ranks


@pytest.mark.parametrize("key", ["logits", "segments"])
def test_tp2_logits_equal_tp1(case, key):
    _, single, ranks = case
    for out in ranks:
        err = ((out[key].double() - single[key].double()).norm() / single[key].double().norm()).item()
        assert err < 1e-5, err
    assert torch.equal(ranks[0][key], ranks[1][key])  # every rank holds the same full logits


def test_tp2_greedy_tokens_equal_tp1(case):
    _, single, ranks = case
    for out in ranks:
        assert out["greedy"] == single["greedy"]
        assert out["continued"] == single["continued"]
        assert out["stream"] == single["stream"]


def test_ranks_agree_when_sampling(case):
    _, single, ranks = case
    assert ranks[0]["seeded"] == ranks[1]["seeded"]
    assert ranks[0]["unseeded"] == ranks[1]["unseeded"]
    assert ranks[0]["seeded"] == single["seeded"]  # the same seeded draws on logits equal to 1e-5


def test_each_rank_holds_its_shard(case):
    config, single, ranks = case
    D, H, H_kv = config["head_dim"], config["num_attention_heads"], config["num_key_value_heads"]
    hidden = config["hidden_size"]
    shards = ranks[0]["shards"]
    assert shards["wqkv"] == ((H + 2 * H_kv) * D // 2, hidden)
    assert shards["wo"] == (hidden, H * D // 2)
    assert shards["cache_heads"] == H_kv // 2
    vocab = config["vocab_size"]
    assert shards["head"] == ((vocab // 2, hidden) if vocab % 2 == 0 else (vocab, hidden))
    assert shards["head_parallel"] == ("vocab" if vocab % 2 == 0 else None)
    assert ranks[1]["shards"] == shards


def test_tp2_8bit_weights_equal_tp1(tmp_path):
    """quantize="int8" / "fp8" under TP=2 (at load, or quantize_model in memory) computes what one
    process computes: a row-parallel rank (o, down) quantizes its columns with the whole rows' scales. With each rank's own scales the
    logits were 3.6e-3 (int8) off relative and greedy tokens changed."""
    folder = tmp_path / "ckpt"
    write_checkpoint(folder, tokenizer="sentencepiece", n_layers=2, seed=11, **CASES["untied gqa2 llama3 rope"])
    run_8bit(folder, tmp_path / "single.pt")
    mp.start_processes(_rank_main, args=(2, free_port(), str(folder), str(tmp_path), run_8bit), nprocs=2,
                       start_method="spawn")
    single = torch.load(tmp_path / "single.pt")
    for rank in range(2):
        out = torch.load(tmp_path / f"rank{rank}.pt")
        for quantize, (logits, greedy) in single.items():
            err = ((out[quantize][0].double() - logits.double()).norm() / logits.double().norm()).item()
            assert err < 1e-5, (quantize, err)
            assert out[quantize][1] == greedy, quantize


def test_tp2_scheduler_survives_a_step_that_fails_on_every_rank(tmp_path):
    """The other rank's follow() went on after a failed step as rank 0 does; it raised out, and rank 0's
    next operation waited for it forever (or failed, the group gone)."""
    write_checkpoint(tmp_path, tokenizer="sentencepiece", n_layers=2, seed=11, **CASES["untied gqa2 llama3 rope"])
    mp.start_processes(_rank_main, args=(2, free_port(), str(tmp_path), str(tmp_path), serve_through_a_failed_step),
                       nprocs=2, start_method="spawn")
    (failed, _), (finished, tokens) = torch.load(tmp_path / "rank0.pt")
    assert (failed, finished) == ("Failed", "Finished")
    assert tokens == Llama.from_pretrained(tmp_path, device="cpu").generate([list(range(1, 12))], max_new_tokens=5)[0].token_ids


def test_tp2_scheduler_with_scored_prompts_and_penalties_equals_one_process(tmp_path):
    """Mixed steps that score prompt tokens (logits rows past the sampling ones) and rows whose logits
    the processor changes run the same on the follower: rank 0's tokens, prompt logprobs and ends
    are one process's (tied head, padded vocabulary: the head is replicated)."""
    write_checkpoint(tmp_path, tokenizer="sentencepiece", n_layers=2, seed=11,
                     **CASES["tied, padded vocabulary (head replicated)"])
    single = scheduled_with_scores_and_penalties(tmp_path)
    mp.start_processes(_rank_main, args=(2, free_port(), str(tmp_path), str(tmp_path),
                                         scheduled_with_scores_and_penalties), nprocs=2, start_method="spawn")
    ranks = torch.load(tmp_path / "rank0.pt")
    assert [len(out["prompt"]) for out in single] == [0, 0, 55, 55, 0]  # 11 chunks of 5
    for one, tp in zip(single, ranks):
        assert [t for t, _ in tp["tokens"]] == [t for t, _ in one["tokens"]] and tp["end"] == one["end"] == \
            ("Finished", "length")
        assert [(t, top) for t, _, top in tp["prompt"]] == [(t, top) for t, _, top in one["prompt"]]
        assert [lp for _, lp, _ in tp["prompt"]] == pytest.approx([lp for _, lp, _ in one["prompt"]], abs=1e-4)
        assert [lp for _, lp in tp["tokens"]] == pytest.approx([lp for _, lp in one["tokens"]], abs=1e-4)


def test_tp2_follower_returns_when_rank0_closes_after_its_thread_died(tmp_path):
    write_checkpoint(tmp_path, tokenizer="sentencepiece", n_layers=2, seed=11, **CASES["untied gqa2 llama3 rope"])
    context = mp.start_processes(_rank_main, args=(2, free_port(), str(tmp_path), str(tmp_path),
                                                   close_after_the_thread_died),
                                 nprocs=2, start_method="spawn", join=False)
    deadline = time.monotonic() + 120
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for proc in context.processes:
                proc.kill()
            pytest.fail("rank 1's follow() never returned: rank 0's close() did not tell it")
    assert [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)] == ["closed", "followed"]


def test_degree_that_does_not_divide_names_the_numbers():
    config = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=8,
                         num_key_value_heads=2, vocab_size=100)
    assert degrees_that_work(config) == [1, 2]
    check_degree(config, 2)
    with pytest.raises(ValueError, match=r"degree 4 does not divide num_key_value_heads 2; degrees that work "
                                         r"for this model: \[1, 2\]"):
        check_degree(config, 4)


def test_tp_without_torchrun_is_a_clear_error(tmp_path):
    write_checkpoint(tmp_path, tokenizer="sentencepiece")
    with pytest.raises(ValueError, match="tp=2 but this process was not launched by torchrun"):
        Llama.from_pretrained(tmp_path, device="cpu", tp=2)


def test_row_parallel_linear_needs_a_group_to_split():
    from minillama.backend import TorchBackend

    lin = Linear(8, 4, False, TorchBackend(), parallel="row", tp=None)  # one process: a plain linear
    assert lin.parallel is None and lin.weight.shape == (4, 8)


# -- the command lines ----------------------------------------------------------------------------


def run_cli(args, stdin=None, env=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **(env or {}))
    return subprocess.run([sys.executable, *args], input=stdin, capture_output=True, env=env, timeout=240,
                          cwd=str(ROOT))


@pytest.fixture(scope="module")
def cli_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tp-cli")
    write_checkpoint(folder, tokenizer="sentencepiece", n_heads=4, n_kv_heads=2, rope_scaling="llama3", seed=5)
    return folder


@pytest.mark.slow
def test_generate_script_launch_paths_print_what_one_process_prints(cli_folder):
    common = ["--model", str(cli_folder), "--max-new-tokens", "10", "--json", *PROMPTS]
    single = run_cli(["scripts/generate.py", *common])
    assert single.returncode == 0, single.stderr
    launched = run_cli(["scripts/generate.py", "--tp", "2", *common])
    assert launched.returncode == 0, launched.stderr
    torchrun = run_cli(["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        "scripts/generate.py", *common])
    assert torchrun.returncode == 0, torchrun.stderr

    def tokens(stdout):
        lines = stdout.decode().splitlines()
        assert len(lines) == len(PROMPTS)  # one JSON line per prompt, not one per process
        return [(json.loads(line)["token_ids"], json.loads(line)["text"]) for line in lines]

    assert tokens(launched.stdout) == tokens(single.stdout) == tokens(torchrun.stdout)


@pytest.mark.slow
def test_chat_with_tp_2_replies_as_one_process(cli_folder):
    lines = b"the cat\nand then\n"
    single = run_cli(["-m", "minillama.chat", "--model", str(cli_folder), "--max-new-tokens", "8"], stdin=lines)
    launched = run_cli(["-m", "minillama.chat", "--model", str(cli_folder), "--max-new-tokens", "8", "--tp", "2"],
                       stdin=lines)
    assert single.returncode == 0 and launched.returncode == 0, launched.stderr
    assert launched.stdout == single.stdout and len(single.stdout.splitlines()) == 2


def test_cli_degree_error_exits_2_before_launching(cli_folder):
    out = run_cli(["scripts/generate.py", "--model", str(cli_folder), "--tp", "3", "hello"])
    assert out.returncode == 2
    assert out.stderr.decode().strip() == (
        "error: tensor-parallel degree 3 does not divide num_attention_heads 4, num_key_value_heads 2, "
        "intermediate_size 64; degrees that work for this model: [1, 2]")
